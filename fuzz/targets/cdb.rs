//! Target `cdb`: CDBs straight into the SCSI emulator (`Target::execute`),
//! no virtio.
//!
//! Input: up to [`MAX_COMMANDS`] commands, run in order on one fresh
//! target (so MODE SELECT can change what later commands see), each
//!
//! ```text
//! u8   LUN choice (mod 10: the LUNs of LUNS, then LUN 6 (absent), LUN 300,
//!      the REPORT LUNS well-known LUN, an unsupported address)
//! u8   CDB length (mod 33), then the CDB bytes
//! u24  data-in buffer size (little endian)
//! u16  data-out length, then the data-out bytes
//! ```
//!
//! Invariants: no panic; every storage access inside the image and none
//! that changes a read-only image (see [`Checked`]); data-in never exceeds
//! the buffer; data only with GOOD; sense well-formed, in the format the
//! unit is in, with a key the LUN can produce (MEDIUM ERROR only where
//! errors are injected, DATA PROTECT only on read-only or full images,
//! MISCOMPARE only from VERIFY and COMPARE AND WRITE); a command that ends
//! in ILLEGAL REQUEST, MISCOMPARE (COMPARE AND WRITE) or a too-small buffer
//! changes no image; and what the data oracle checks (see
//! [`super::oracle`]): READ data, the images after each change, and the
//! exact outcome of well-formed block commands.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use vhost_device_scsi::scsi::inquiry::Identity;
use vhost_device_scsi::scsi::{
    Completion, Disk, DiskConfig, LunAddress, SliceDataOut, Target, VecDataIn,
};
use vhost_device_scsi::storage::MemImage;

use super::oracle::{Model, Outcome, Plan};
use super::{check_sense, count, key, pattern, Checked, Encoder, Handle, Input, Rng, SenseContext};

/// Most commands one input runs.
pub const MAX_COMMANDS: usize = 8;

/// One logical unit of the target every input starts from.
pub struct LunSpec {
    pub block_size: u32,
    /// Image size in bytes.
    pub size: u64,
    /// Bytes stored (the rest of a sparse image reads as zeroes and takes
    /// no writes: ENOSPC).
    pub stored: usize,
    pub read_only: bool,
    pub discard: bool,
    /// Blocks whose reads fail with EIO.
    pub read_errors: Range<u64>,
    /// Every flush and durable write fails with EIO.
    pub failing_flushes: bool,
}

const fn lun(block_size: u32, blocks: u64, read_only: bool, discard: bool) -> LunSpec {
    let size = blocks * block_size as u64;
    LunSpec {
        block_size,
        size,
        stored: size as usize,
        read_only,
        discard,
        read_errors: 0..0,
        failing_flushes: false,
    }
}

/// Writable and read-only, 512- and 4096-byte blocks, discard on and off,
/// a sparse image that runs out of space, and one with read and flush
/// errors.
pub const LUNS: [LunSpec; 6] = [
    lun(512, 128, false, true),
    lun(512, 64, true, true),
    lun(4096, 16, false, false),
    lun(4096, 8, true, false),
    LunSpec {
        stored: 16 << 10,
        ..lun(512, 2048, false, true)
    },
    LunSpec {
        read_errors: 8..10,
        failing_flushes: true,
        ..lun(512, 32, false, true)
    },
];

/// LUN choices past the LUNs of [`LUNS`].
pub const LUN_CHOICES: u8 = LUNS.len() as u8 + 4;

pub fn address(choice: u8) -> LunAddress {
    match choice % LUN_CHOICES {
        n if usize::from(n) < LUNS.len() => LunAddress::Lun(u16::from(n)),
        6 => LunAddress::Lun(6),
        7 => LunAddress::Lun(300),
        8 => LunAddress::ReportLunsWlun,
        _ => LunAddress::Unsupported,
    }
}

/// The initial contents of LUN `n`'s stored bytes.
pub fn contents(n: usize) -> Vec<u8> {
    initial_contents(n).to_vec()
}

/// [`contents`] without a copy.
pub fn initial_contents(n: usize) -> &'static [u8] {
    static CONTENTS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    &CONTENTS.get_or_init(|| {
        LUNS.iter()
            .enumerate()
            .map(|(i, l)| pattern(0x1000 + i as u64, l.stored))
            .collect()
    })[n]
}

/// A fresh target with the LUNs of [`LUNS`], each over a [`Checked`]
/// storage; also returns the checked storages' images and change counters.
pub fn target() -> (Target, Vec<Handle>) {
    let mut disks = Vec::new();
    let mut handles = Vec::new();
    for (n, spec) in LUNS.iter().enumerate() {
        let mut image = MemImage::sparse(contents(n), spec.size, spec.read_only);
        if !spec.read_errors.is_empty() {
            let b = u64::from(spec.block_size);
            image = image.with_read_error(spec.read_errors.start * b..spec.read_errors.end * b);
        }
        if spec.failing_flushes {
            image.fail_flushes();
        }
        let image = Arc::new(image);
        let checked = Checked::new(image, "cdb target LUN");
        handles.push(checked.handle());
        let config = DiskConfig {
            block_size: spec.block_size,
            identity: Identity::derived("/fuzz/cdb", n as u16),
            solid_state: n % 2 == 0,
            discard: spec.discard,
        };
        disks.push(Disk::new(Box::new(checked), config).expect("valid fuzz LUN"));
    }
    (Target::new(disks), handles)
}

/// One command of an input.
#[derive(Clone, Debug, Default)]
pub struct Command {
    pub lun: u8,
    pub cdb: Vec<u8>,
    pub data_in: u32,
    pub data_out: Vec<u8>,
}

impl Command {
    pub fn read(input: &mut Input<'_>) -> Command {
        let lun = input.u8();
        let cdb_len = usize::from(input.u8() % 33);
        let cdb = input.bytes(cdb_len).to_vec();
        let data_in = input.u24();
        let out_len = usize::from(input.u16());
        let data_out = input.bytes(out_len).to_vec();
        Command {
            lun,
            cdb,
            data_in,
            data_out,
        }
    }

    pub fn encode(&self, e: &mut Encoder) {
        let cdb = &self.cdb[..self.cdb.len().min(32)];
        let out = &self.data_out[..self.data_out.len().min(0xffff)];
        e.u8(self.lun)
            .u8(cdb.len() as u8)
            .bytes(cdb)
            .u24(self.data_in.min(0xff_ffff))
            .u16(out.len() as u16)
            .bytes(out);
    }
}

pub fn encode(commands: &[Command]) -> Vec<u8> {
    let mut e = Encoder::default();
    for c in commands {
        c.encode(&mut e);
    }
    e.0
}

/// The fuzz target.
pub fn run(data: &[u8]) {
    let (target, handles) = target();
    let mut model = Model::default();
    let mut input = Input::new(data);
    for _ in 0..MAX_COMMANDS {
        if input.is_empty() {
            break;
        }
        let command = Command::read(&mut input);
        execute(&target, &handles, &mut model, &command);
    }
    for (n, (spec, h)) in LUNS.iter().zip(&handles).enumerate() {
        if spec.read_only {
            assert_eq!(h.changes.load(Ordering::Relaxed), 0, "LUN {n} is read-only");
        }
        assert_eq!(h.image.data().len(), spec.stored, "LUN {n}: stored bytes");
    }
}

/// Names of the counters [`run`] keeps (see [`super::stats`]).
pub const STATS: [&str; 9] = [
    "GOOD",
    "buffer too small",
    "ILLEGAL REQUEST",
    "DATA PROTECT",
    "MEDIUM ERROR",
    "MISCOMPARE",
    "descriptor sense",
    "outcome decided by the oracle",
    "image compared with the model",
];

/// CDB length the operation code's group implies: the parser's own rule.
pub use vhost_scsi_frontend::cdb::length as cdb_length;

fn execute(target: &Target, handles: &[Handle], model: &mut Model, command: &Command) {
    let address = address(command.lun);
    let lun = match address {
        LunAddress::Lun(n) if usize::from(n) < LUNS.len() => Some(usize::from(n)),
        _ => None,
    };
    let spec = lun.map(|n| &LUNS[n]);
    let changes = || -> [usize; LUNS.len()] {
        std::array::from_fn(|i| handles[i].changes.load(Ordering::Relaxed))
    };
    let before = changes();
    let capacity = command.data_in as usize;
    let plan = Plan::new(model, lun, &command.cdb, &command.data_out, capacity);
    let mut din = VecDataIn::with_capacity(capacity);
    let mut dout = SliceDataOut::new(&command.data_out);
    let completion = target.execute(address, &command.cdb, &mut din, &mut dout);
    let after = changes();
    let changed_luns: [bool; LUNS.len()] = std::array::from_fn(|i| after[i] != before[i]);
    let changed = changed_luns.contains(&true);
    let what = || format!("{address:?} CDB {:02x?}", command.cdb);
    assert!(din.data.len() <= capacity, "data-in overflow: {}", what());
    let op = command.cdb.first().copied().unwrap_or(0);
    let mut parsed = None;
    let outcome = match completion {
        Completion::Good => {
            count(0);
            Outcome::Good
        }
        // The fuzzed target has no passthrough unit.
        Completion::Forwarded(outcome) => {
            panic!("forwarded without a passthrough unit: {outcome:?}")
        }
        Completion::BufferTooSmall => {
            count(1);
            assert!(din.data.is_empty(), "data with BufferTooSmall: {}", what());
            assert!(!changed, "BufferTooSmall changed an image: {}", what());
            Outcome::TooSmall
        }
        Completion::CheckCondition(sense) => {
            assert!(din.data.is_empty(), "data with CHECK CONDITION: {}", what());
            let disk = match address {
                LunAddress::Lun(n) => target.unit(n),
                _ => None,
            };
            let ctx = SenseContext {
                cdb_len: cdb_length(op),
                param_len: command.data_out.len(),
                descriptor: disk.as_deref().is_some_and(Disk::descriptor_sense),
            };
            let encoded = sense.encode();
            let s = check_sense(encoded.as_slice(), &ctx);
            count(match s.key {
                key::ILLEGAL_REQUEST => 2,
                key::DATA_PROTECT => 3,
                key::MEDIUM_ERROR => 4,
                _ => 5,
            });
            if ctx.descriptor {
                count(6);
            }
            let allowed = match (s.key, s.asc, s.ascq) {
                (key::ILLEGAL_REQUEST, ..) => true,
                (key::DATA_PROTECT, 0x27, 0x00) => spec.is_some_and(|l| l.read_only),
                (key::DATA_PROTECT, 0x27, 0x07) => spec.is_some_and(|l| (l.stored as u64) < l.size),
                (key::MEDIUM_ERROR, 0x11, 0x00) => spec.is_some_and(|l| !l.read_errors.is_empty()),
                // Failing flushes, or a durable write that found no space
                // on the sparse LUN: sticky whatever the errno.
                (key::MEDIUM_ERROR, 0x0c, 0x00) => {
                    spec.is_some_and(|l| l.failing_flushes || (l.stored as u64) < l.size)
                }
                (key::MISCOMPARE, ..) => {
                    matches!(op, VERIFY_10 | VERIFY_12 | VERIFY_16 | COMPARE_AND_WRITE)
                }
                _ => false,
            };
            assert!(allowed, "sense {:02x?} from {}", encoded.as_slice(), what());
            if s.key == key::ILLEGAL_REQUEST
                || (s.key == key::MISCOMPARE && op == COMPARE_AND_WRITE)
            {
                assert!(!changed, "failed command changed an image: {}", what());
            }
            parsed = Some(s);
            Outcome::Sense(s.key, s.asc, s.ascq)
        }
    };
    plan.check(
        model,
        handles,
        &changed_luns,
        outcome,
        parsed.as_ref(),
        &din.data,
        &command.data_out,
        &what,
    );
}

// ---------------------------------------------------------------------------
// CDBs and parameter lists, for the generators of both targets
// ---------------------------------------------------------------------------

// The test kit's operation codes and builders (vhost_scsi_frontend::cdb),
// the ones the daemon's tests use, written out from SPC-4 and SBC-3.
pub use vhost_scsi_frontend::cdb::op::*;
pub use vhost_scsi_frontend::cdb::{
    block_truncating as block_cdb, compare_and_write, inquiry, service_action_in,
};
use vhost_scsi_frontend::cdb::{
    mode_select10, mode_select10_list, mode_select6, mode_select6_list, mode_sense10, mode_sense6,
    report_luns, report_supported_opcodes, report_supported_tmfs, unmap_list, MODE_SELECT_PF,
};
pub use vhost_scsi_frontend::testkit::{caching_page, control_page};

pub fn mode_sense(ten: bool, byte1: u8, byte2: u8, alloc: u16) -> Vec<u8> {
    if ten {
        mode_sense10(byte1, byte2, 0, alloc)
    } else {
        mode_sense6(byte1, byte2, 0, alloc as u8)
    }
}

/// MODE SELECT with PF=1 and its parameter list: a header without block
/// descriptor, then `pages`.
pub fn mode_select(ten: bool, pages: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if ten {
        let list = mode_select10_list(false, &[], pages);
        (mode_select10(MODE_SELECT_PF, list.len() as u16), list)
    } else {
        let list = mode_select6_list(&[], pages);
        (mode_select6(MODE_SELECT_PF, list.len() as u8), list)
    }
}

/// Read-write error recovery mode page (SBC-3 §6.4.7) as reported.
pub fn rw_error_recovery_page() -> Vec<u8> {
    vhost_scsi_frontend::testkit::RW_ERROR_RECOVERY_PAGE.to_vec()
}

/// UNMAP CDB and parameter list (SBC-3 §5.28) for `ranges`.
pub fn unmap(ranges: &[(u64, u32)]) -> (Vec<u8>, Vec<u8>) {
    let list = unmap_list(ranges);
    (vhost_scsi_frontend::cdb::unmap(0, list.len() as u16), list)
}

/// A random command for a disk of `blocks` blocks of `block_size` bytes
/// whose contents start with `image`: mostly well-formed (so that the deep
/// paths run), with random flags, ranges near the edges and now and then a
/// random byte. Returns the CDB, the data-out and a fitting data-in size.
pub fn random_command(
    rng: &mut Rng,
    block_size: u32,
    blocks: u64,
    image: &[u8],
) -> (Vec<u8>, Vec<u8>, u32) {
    let bs = block_size as usize;
    let lba = match rng.below(8) {
        0 => rng.next(),
        1 => blocks.saturating_sub(rng.below(4)),
        2 => blocks + rng.below(4),
        _ => rng.below(blocks.max(1)),
    };
    let count = match rng.below(8) {
        0 => rng.next() as u32,
        1 => 0,
        _ => 1 + rng.below(8) as u32,
    };
    let bytes = (count as usize).min(64) * bs;
    let stored = |lba: u64, n: usize| -> Vec<u8> {
        let start = (lba as usize).saturating_mul(bs);
        let mut v = image.get(start..).unwrap_or(&[]).to_vec();
        v.resize(n, 0);
        v.truncate(n);
        v
    };
    let (mut cdb, out, din) = match rng.below(16) {
        0..=3 => {
            let op = rng.pick(&[READ_6, READ_10, READ_12, READ_16]);
            let mut c = block_cdb(op, lba, count);
            if op != READ_6 && rng.one_in(3) {
                c[1] |= 0x08; // FUA
            }
            (c, vec![], bytes as u32)
        }
        4..=6 => {
            let op = rng.pick(&[
                WRITE_6,
                WRITE_10,
                WRITE_12,
                WRITE_16,
                WRITE_AND_VERIFY_10,
                WRITE_AND_VERIFY_12,
                WRITE_AND_VERIFY_16,
            ]);
            let mut c = block_cdb(op, lba, count);
            if rng.one_in(3) {
                c[1] |= 0x08;
            }
            (c, rng.bytes(bytes), 0)
        }
        7 => {
            let op = rng.pick(&[VERIFY_10, VERIFY_12, VERIFY_16]);
            let bytchk = rng.below(4) as u8;
            let mut c = block_cdb(op, lba, count);
            c[1] |= bytchk << 1;
            let mut out = match bytchk {
                1 => stored(lba, bytes),
                3 => stored(lba, bs),
                _ => vec![],
            };
            if !out.is_empty() && rng.one_in(2) {
                let i = rng.below(out.len() as u64) as usize;
                out[i] ^= 1 << rng.below(8);
            }
            (c, out, 0)
        }
        8 => {
            let evpd = rng.one_in(2);
            let page = if evpd {
                let any = rng.next() as u8;
                rng.pick(&[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2, any])
            } else {
                0
            };
            let alloc = rng.pick(&[0, 1, 4, 36, 96, 255, 0xffff]);
            (inquiry(evpd, page, alloc), vec![], u32::from(alloc))
        }
        9 => {
            let ten = rng.one_in(2);
            let any = rng.below(64) as u8;
            let page = rng.pick(&[0x01, 0x08, 0x0a, 0x3f, any]);
            let pc = (rng.below(4) as u8) << 6;
            let byte1 = rng.pick(&[0, 0x08, 0x10, 0x18]);
            let alloc = rng.pick(&[0, 4, 8, 64, 255, 1024]);
            (
                mode_sense(ten, byte1, pc | page, alloc),
                vec![],
                u32::from(alloc),
            )
        }
        10 => {
            let mut pages = Vec::new();
            for _ in 0..1 + rng.below(3) {
                pages.extend(match rng.below(3) {
                    0 => caching_page(rng.one_in(2)),
                    1 => control_page(rng.one_in(2)),
                    _ => rw_error_recovery_page(),
                });
            }
            let (cdb, list) = mode_select(rng.one_in(2), &pages);
            (cdb, list, 0)
        }
        11 => {
            let ranges: Vec<(u64, u32)> = (0..rng.below(5))
                .map(|_| (rng.below(blocks + 2), rng.below(blocks / 2 + 2) as u32))
                .collect();
            let (cdb, list) = unmap(&ranges);
            (cdb, list, 0)
        }
        12 => {
            let op = rng.pick(&[WRITE_SAME_10, WRITE_SAME_16]);
            let mut c = block_cdb(op, lba, count);
            c[1] = rng.pick(&[0, 0x08, 0x01, 0x09]);
            let out = if rng.one_in(2) {
                vec![0; bs]
            } else {
                rng.bytes(bs)
            };
            (c, out, 0)
        }
        13 => {
            let n = count.min(4) as u8;
            let len = usize::from(n) * bs;
            let mut out = stored(lba, len);
            if rng.one_in(3) && len > 0 {
                let i = rng.below(len as u64) as usize;
                out[i] ^= 0x80;
            }
            out.extend(rng.bytes(len));
            let byte1 = if rng.one_in(3) { 0x08 } else { 0 };
            (compare_and_write(byte1, lba, n), out, 0)
        }
        14 => match rng.below(6) {
            0 => (service_action_in(0x12, lba, 4096), vec![], 4096),
            1 => (service_action_in(0x10, 0, 32), vec![], 32),
            2 => (vec![READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![], 8),
            3 => (report_luns(rng.below(3) as u8, 4096), vec![], 4096),
            4 => {
                let options = rng.below(4) as u8;
                let op = rng.pick(&[READ_10, WRITE_SAME_16, SERVICE_ACTION_IN_16]);
                (report_supported_opcodes(options, op, 0, 8192), vec![], 8192)
            }
            _ => (report_supported_tmfs(true, 16), vec![], 16),
        },
        _ => {
            let op = rng.pick(&[
                TEST_UNIT_READY,
                REQUEST_SENSE,
                START_STOP_UNIT,
                PREVENT_ALLOW_MEDIUM_REMOVAL,
                SYNCHRONIZE_CACHE_10,
                SYNCHRONIZE_CACHE_16,
            ]);
            match op {
                REQUEST_SENSE => (vec![op, rng.below(2) as u8, 0, 0, 252, 0], vec![], 252),
                SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
                    (block_cdb(op, lba, count), vec![], 0)
                }
                _ => (vec![op, 0, 0, 0, 0, 0], vec![], 0),
            }
        }
    };
    if rng.one_in(8) && !cdb.is_empty() {
        let i = rng.below(cdb.len() as u64) as usize;
        cdb[i] = rng.next() as u8;
    }
    (cdb, out, din)
}

/// A random input: one to four commands, mostly well-formed, on random
/// LUNs, with data-in sizes around what the command needs.
pub fn generate(rng: &mut Rng) -> Vec<u8> {
    let n = 1 + rng.below(4) as usize;
    let commands: Vec<Command> = (0..n)
        .map(|_| {
            let lun = if rng.one_in(8) {
                rng.below(u64::from(LUN_CHOICES)) as u8
            } else {
                rng.below(LUNS.len() as u64) as u8
            };
            let (bs, blocks, n) = match LUNS.get(usize::from(lun)) {
                Some(l) => (
                    l.block_size,
                    l.size / u64::from(l.block_size),
                    usize::from(lun),
                ),
                None => (512, 128, 0),
            };
            let (cdb, mut data_out, fit) = random_command(rng, bs, blocks, &contents(n));
            let data_in = match rng.below(6) {
                0 => rng.below(1 << 17) as u32,
                1 => fit.saturating_sub(1 + rng.below(16) as u32),
                2 => fit + rng.below(4096) as u32,
                _ => fit,
            };
            if rng.one_in(8) {
                data_out.truncate(rng.below(data_out.len() as u64 + 1) as usize);
            }
            Command {
                lun,
                cdb,
                data_in,
                data_out,
            }
        })
        .collect();
    encode(&commands)
}

// ---------------------------------------------------------------------------
// Seed corpus
// ---------------------------------------------------------------------------

fn cmd(lun: u8, cdb: Vec<u8>, data_in: u32, data_out: Vec<u8>) -> Command {
    Command {
        lun,
        cdb,
        data_in,
        data_out,
    }
}

/// The seed corpus (`fuzz/corpus/cdb/`), by file name: one valid input per
/// command family and per LUN kind, and the error paths.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let fua = |mut c: Vec<u8>| {
        c[1] |= 0x08;
        c
    };
    let image0 = contents(0);
    let wlun = 8;
    let absent = 6;
    let unsupported = 9;
    let mut out: Vec<(&'static str, Vec<Command>)> = vec![
        (
            "read10-lun0",
            vec![cmd(0, block_cdb(READ_10, 0, 8), 4096, vec![])],
        ),
        (
            "read6-readonly",
            vec![cmd(1, block_cdb(READ_6, 3, 2), 1024, vec![])],
        ),
        (
            "read12-4k",
            vec![cmd(2, block_cdb(READ_12, 1, 2), 8192, vec![])],
        ),
        (
            "read16-fua-4k-readonly",
            vec![cmd(3, fua(block_cdb(READ_16, 7, 1)), 4096, vec![])],
        ),
        (
            "read-too-small-buffer",
            vec![cmd(0, block_cdb(READ_10, 0, 8), 1000, vec![])],
        ),
        (
            "read-past-end",
            vec![cmd(0, block_cdb(READ_16, 127, 2), 1024, vec![])],
        ),
        (
            "read-error",
            vec![cmd(5, block_cdb(READ_10, 7, 2), 1024, vec![])],
        ),
        (
            "write10",
            vec![cmd(0, block_cdb(WRITE_10, 4, 2), 0, pattern(1, 1024))],
        ),
        (
            "write16-fua-4k",
            vec![cmd(2, fua(block_cdb(WRITE_16, 3, 1)), 0, pattern(2, 4096))],
        ),
        (
            "write-and-verify",
            vec![cmd(
                0,
                block_cdb(WRITE_AND_VERIFY_10, 9, 1),
                0,
                pattern(3, 512),
            )],
        ),
        (
            "write-readonly",
            vec![cmd(1, block_cdb(WRITE_10, 0, 1), 0, pattern(4, 512))],
        ),
        (
            "write-no-space",
            vec![cmd(4, block_cdb(WRITE_10, 100, 1), 0, pattern(5, 512))],
        ),
        (
            "write-fua-flush-fails",
            vec![cmd(5, fua(block_cdb(WRITE_10, 0, 1)), 0, pattern(6, 512))],
        ),
        (
            "sync-cache-flush-fails",
            vec![cmd(5, block_cdb(SYNCHRONIZE_CACHE_10, 0, 0), 0, vec![])],
        ),
        (
            "sync-cache16",
            vec![cmd(0, block_cdb(SYNCHRONIZE_CACHE_16, 0, 128), 0, vec![])],
        ),
        ("inquiry", vec![cmd(0, inquiry(false, 0, 96), 96, vec![])]),
        (
            "inquiry-absent-lun",
            vec![cmd(absent, inquiry(false, 0, 36), 36, vec![])],
        ),
        (
            "inquiry-wlun",
            vec![cmd(wlun, inquiry(false, 0, 36), 36, vec![])],
        ),
        (
            "tur-unsupported-address",
            vec![cmd(unsupported, vec![0; 6], 0, vec![])],
        ),
        (
            "report-luns",
            vec![cmd(0, report_luns(2, 256), 256, vec![])],
        ),
        (
            "report-luns-wlun",
            vec![cmd(wlun, report_luns(0, 64), 64, vec![])],
        ),
        (
            "rsoc-all",
            vec![cmd(
                0,
                report_supported_opcodes(0, 0, 0, 8192),
                8192,
                vec![],
            )],
        ),
        (
            "rsoc-one",
            vec![cmd(
                2,
                report_supported_opcodes(0x83, WRITE_SAME_16, 0, 64),
                64,
                vec![],
            )],
        ),
        (
            "rstmf",
            vec![cmd(0, report_supported_tmfs(true, 16), 16, vec![])],
        ),
        (
            "request-sense-desc",
            vec![cmd(0, vec![REQUEST_SENSE, 1, 0, 0, 252, 0], 252, vec![])],
        ),
        (
            "read-capacity",
            vec![
                cmd(
                    0,
                    vec![READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    8,
                    vec![],
                ),
                cmd(4, service_action_in(0x10, 0, 32), 32, vec![]),
            ],
        ),
        (
            "get-lba-status",
            vec![cmd(4, service_action_in(0x12, 0, 4096), 4096, vec![])],
        ),
        (
            "mode-sense",
            vec![
                cmd(0, mode_sense(false, 0, 0x3f, 255), 255, vec![]),
                cmd(2, mode_sense(true, 0x10, 0x48, 1024), 1024, vec![]),
            ],
        ),
        (
            "unmap",
            vec![{
                let (c, l) = unmap(&[(0, 8), (64, 16)]);
                cmd(0, c, 0, l)
            }],
        ),
        (
            "unmap-readonly",
            vec![{
                let (c, l) = unmap(&[(0, 1)]);
                cmd(1, c, 0, l)
            }],
        ),
        (
            "write-same16-unmap",
            vec![{
                let mut c = block_cdb(WRITE_SAME_16, 10, 20);
                c[1] = 0x08;
                cmd(0, c, 0, vec![0; 512])
            }],
        ),
        (
            "write-same10-pattern",
            vec![cmd(2, block_cdb(WRITE_SAME_10, 1, 3), 0, pattern(7, 4096))],
        ),
        (
            "write-same16-ndob",
            vec![{
                let mut c = block_cdb(WRITE_SAME_16, 4, 2);
                c[1] = 0x09;
                cmd(4, c, 0, vec![])
            }],
        ),
        (
            "compare-and-write",
            vec![{
                let mut data = image0[1024..2048].to_vec();
                data.extend(pattern(8, 1024));
                cmd(0, compare_and_write(0, 2, 2), 0, data)
            }],
        ),
        (
            "compare-and-write-miscompare",
            vec![cmd(0, compare_and_write(0x08, 2, 1), 0, pattern(9, 1024))],
        ),
        (
            "verify-bytchk1",
            vec![{
                let mut c = block_cdb(VERIFY_16, 4, 2);
                c[1] = 0x02;
                cmd(0, c, 0, image0[2048..3072].to_vec())
            }],
        ),
        (
            "verify-bytchk3",
            vec![{
                let mut c = block_cdb(VERIFY_10, 0, 1);
                c[1] = 0x06;
                cmd(0, c, 0, image0[..512].to_vec())
            }],
        ),
        (
            "mode-select-wce-off-then-write",
            vec![
                {
                    let (c, l) = mode_select(false, &caching_page(false));
                    cmd(0, c, 0, l)
                },
                cmd(0, block_cdb(WRITE_10, 0, 1), 0, pattern(10, 512)),
            ],
        ),
        (
            "mode-select-d-sense-then-error",
            vec![
                {
                    let (c, l) = mode_select(true, &control_page(true));
                    cmd(2, c, 0, l)
                },
                cmd(2, block_cdb(READ_10, 1000, 1), 4096, vec![]),
                cmd(2, vec![0xff; 10], 0, vec![]),
            ],
        ),
        (
            "misc",
            vec![
                cmd(0, vec![TEST_UNIT_READY, 0, 0, 0, 0, 0], 0, vec![]),
                cmd(0, vec![START_STOP_UNIT, 0, 0, 0, 1, 0], 0, vec![]),
                cmd(
                    0,
                    vec![PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0, 0],
                    0,
                    vec![],
                ),
            ],
        ),
    ]
    .into_iter()
    .collect();
    out.sort_by_key(|(name, _)| *name);
    out.into_iter().map(|(n, c)| (n, encode(&c))).collect()
}
