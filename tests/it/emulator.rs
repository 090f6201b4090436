//! The SCSI target emulator through the crate's public API only: CDB bytes
//! in, data + status + sense out, for every implemented command and every
//! error path (SPC-4, SBC-3). Disks live in memory ([`MemImage`]) with known
//! contents; writable ones sit behind a recording wrapper that shows what
//! reached the storage (durable or cached writes, flushes, deallocation) and
//! can fail flushes. Where allocation matters (holes, GET LBA STATUS) the
//! image is a file in a temporary directory ([`FileImage`]).
//!
//! Expected bytes are written out from the standards, here or in the test
//! kit (`vhost_scsi_frontend`'s CDB builders, sense assertions and mode
//! pages), rather than taken from the crate's constants, so that a wrong
//! constant fails a test.

use crate::common;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vhost_device_scsi::scsi::inquiry::Identity;
use vhost_device_scsi::scsi::{
    Completion, Disk, DiskConfig, DiskError, LunAddress, SliceDataOut, Target, VecDataIn,
};
use vhost_device_scsi::storage::{Extent, FileImage, IoBufs, IoBufsMut, MemImage, Storage};
use vhost_scsi_frontend::cdb::op::*;
use vhost_scsi_frontend::cdb::{
    block as block_cdb, compare_and_write, fua, get_lba_status, inquiry, mode_select10,
    mode_select10_list, mode_select6, mode_select6_list, mode_sense10, mode_sense6,
    read_capacity10 as rc10_cdb, read_capacity16 as rc16_cdb, report_luns,
    report_supported_opcodes as rsoc, report_supported_tmfs as rstmf, request_sense,
    unmap as unmap_cdb, unmap_list, verify as verify_cdb, write_same, MODE_SELECT_PF as PF,
    MODE_SELECT_SP as SP, WRITE_SAME_ANCHOR as WS_ANCHOR, WRITE_SAME_NDOB as WS_NDOB,
    WRITE_SAME_UNMAP as WS_UNMAP,
};
use vhost_scsi_frontend::sense::{
    assert_descriptor_sense, assert_invalid_field, assert_invalid_opcode, assert_invalid_param,
    assert_lba_out_of_range, assert_lun_not_supported, assert_medium_error, assert_miscompare,
    assert_param_list_length_error, assert_plain_sense, assert_space_allocation_failed,
    assert_write_error, assert_write_protected, CheckCondition,
};
use vhost_scsi_frontend::testkit::{caching_page, control_page, RW_ERROR_RECOVERY_PAGE};

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// LUN 0: 512-byte blocks, read-only, solid state.
const L0: LunAddress = LunAddress::Lun(0);
const L0_BLOCKS: u64 = 2048;
/// LUN 1: 512-byte blocks, read-only, rotating.
const L1: LunAddress = LunAddress::Lun(1);
const L1_BLOCKS: u64 = 64;
/// LUN 2: 4096-byte blocks, read-only, solid state.
const L2: LunAddress = LunAddress::Lun(2);
const L2_BLOCKS: u64 = 16;
/// LUN 3: 512-byte blocks, more than 2^32 of them (sparse: 1 MiB stored,
/// zeroes after), read-only, rotating.
const L3: LunAddress = LunAddress::Lun(3);
const L3_BLOCKS: u64 = (1 << 32) + 8;
const L3_STORED: usize = 1 << 20;
/// LUN 4: 512-byte blocks, read-only; blocks 8 and 9 cannot be read (EIO).
const L4: LunAddress = LunAddress::Lun(4);
const L4_BLOCKS: u64 = 32;
const L4_BAD_BLOCKS: std::ops::Range<u64> = 8..10;
/// LUN 5: 512-byte blocks, writable storage.
const L5: LunAddress = LunAddress::Lun(5);
const L5_BLOCKS: u64 = 32;
/// No logical unit here.
const ABSENT: LunAddress = LunAddress::Lun(6);
const LUN_COUNT: usize = 6;

const WLUN: LunAddress = LunAddress::ReportLunsWlun;

/// xorshift64: deterministic test data and random CDBs.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift::new(seed + 1);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn identity(lun: u16) -> Identity {
    Identity::derived(&format!("mem:test-image-{lun}"), lun)
}

fn disk(storage: MemImage, lun: u16, block_size: u32, solid_state: bool) -> Disk {
    Disk::new(
        Box::new(storage),
        DiskConfig {
            block_size,
            identity: identity(lun),
            solid_state,
            discard: false,
        },
    )
    .expect("valid disk")
}

struct Fixture {
    target: Target,
    /// Stored bytes of each LUN.
    contents: Vec<Vec<u8>>,
}

impl Fixture {
    fn new() -> Self {
        let contents = vec![
            pattern(0, (L0_BLOCKS * 512) as usize),
            pattern(1, (L1_BLOCKS * 512) as usize),
            pattern(2, (L2_BLOCKS * 4096) as usize),
            pattern(3, L3_STORED),
            pattern(4, (L4_BLOCKS * 512) as usize),
            pattern(5, (L5_BLOCKS * 512) as usize),
        ];
        let bad = L4_BAD_BLOCKS.start * 512..L4_BAD_BLOCKS.end * 512;
        let disks = vec![
            disk(MemImage::new(contents[0].clone(), true), 0, 512, true),
            disk(MemImage::new(contents[1].clone(), true), 1, 512, false),
            disk(MemImage::new(contents[2].clone(), true), 2, 4096, true),
            disk(
                MemImage::sparse(contents[3].clone(), L3_BLOCKS * 512, true),
                3,
                512,
                false,
            ),
            disk(
                MemImage::new(contents[4].clone(), true).with_read_error(bad),
                4,
                512,
                true,
            ),
            disk(MemImage::new(contents[5].clone(), false), 5, 512, true),
        ];
        assert_eq!(disks.len(), LUN_COUNT);
        Fixture {
            target: Target::new(disks),
            contents,
        }
    }

    /// The image bytes of `blocks` blocks at `lba` on a LUN.
    fn blocks(&self, lun: usize, block_size: usize, lba: u64, blocks: u64) -> &[u8] {
        let start = lba as usize * block_size;
        &self.contents[lun][start..start + blocks as usize * block_size]
    }

    fn run(&self, lun: LunAddress, cdb: &[u8], alloc: usize) -> (Completion, Vec<u8>) {
        run(&self.target, lun, cdb, alloc)
    }
}

/// A target with two disks (LUNs 0 and 1).
fn two_disk_target() -> Target {
    Target::new(vec![
        disk(MemImage::new(pattern(10, 64 * 512), true), 0, 512, true),
        disk(MemImage::new(pattern(11, 64 * 512), true), 1, 512, true),
    ])
}

/// Executes `cdb` with a data-in buffer of `alloc` bytes and no data-out.
fn run(target: &Target, lun: LunAddress, cdb: &[u8], alloc: usize) -> (Completion, Vec<u8>) {
    run_with_out(target, lun, cdb, alloc, &[])
}

fn run_with_out(
    target: &Target,
    lun: LunAddress,
    cdb: &[u8],
    alloc: usize,
    data_out: &[u8],
) -> (Completion, Vec<u8>) {
    let mut din = VecDataIn::with_capacity(alloc);
    let mut dout = SliceDataOut::new(data_out);
    let completion = target.execute(lun, cdb, &mut din, &mut dout);
    assert!(din.data.len() <= alloc, "wrote past the data-in buffer");
    (completion, din.data)
}

// ---------------------------------------------------------------------------
// Writable disks
// ---------------------------------------------------------------------------

/// One call that reached the storage under a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
        durable: bool,
    },
    Flush,
    Zeroes {
        offset: u64,
        len: u64,
        deallocate: bool,
    },
}

/// A [`Storage`] over a shared [`MemImage`] that logs every call, so tests
/// can see what became durable, and can fail the next flushes (durable
/// writes included) with EIO once each, the way the kernel reports a
/// write-back error once and then forgets it.
struct Recorder {
    image: Arc<MemImage>,
    log: Arc<Mutex<Vec<Op>>>,
    failing_flushes: Arc<AtomicUsize>,
    /// The errno those flushes fail with.
    flush_errno: Arc<AtomicI32>,
}

impl Recorder {
    fn record(&self, op: Op) {
        self.log.lock().unwrap().push(op);
    }

    fn sync(&self) -> io::Result<()> {
        let failed = self
            .failing_flushes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            return Err(io::Error::from_raw_os_error(
                self.flush_errno.load(Ordering::Relaxed),
            ));
        }
        self.image.flush()
    }
}

impl Storage for Recorder {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        self.image.read_only()
    }

    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        self.record(Op::Read {
            offset,
            len: bufs.len() as u64,
        });
        self.image.read_vectored_at(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64, durable: bool) -> io::Result<()> {
        self.record(Op::Write {
            offset,
            len: bufs.len() as u64,
            durable,
        });
        self.image.write_vectored_at(bufs, offset, false)?;
        if durable {
            self.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.record(Op::Flush);
        self.sync()
    }

    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        self.record(Op::Zeroes {
            offset,
            len,
            deallocate,
        });
        self.image.write_zeroes(offset, len, deallocate)
    }

    fn extent(&self, offset: u64) -> io::Result<Extent> {
        self.image.extent(offset)
    }
}

fn disk_config(lun: u16, block_size: u32, discard: bool) -> DiskConfig {
    DiskConfig {
        block_size,
        identity: identity(lun),
        solid_state: true,
        discard,
    }
}

/// A target whose LUN 0 is a disk over a [`Recorder`].
struct Rig {
    target: Target,
    image: Arc<MemImage>,
    log: Arc<Mutex<Vec<Op>>>,
    failing_flushes: Arc<AtomicUsize>,
    flush_errno: Arc<AtomicI32>,
    block_size: usize,
}

/// Blocks of the standard writable rig.
const RIG_BLOCKS: u64 = 512;

impl Rig {
    fn new(image: MemImage, block_size: u32, discard: bool) -> Rig {
        let image = Arc::new(image);
        let log = Arc::new(Mutex::new(Vec::new()));
        let failing_flushes = Arc::new(AtomicUsize::new(0));
        let flush_errno = Arc::new(AtomicI32::new(libc::EIO));
        let recorder = Recorder {
            image: image.clone(),
            log: log.clone(),
            failing_flushes: failing_flushes.clone(),
            flush_errno: flush_errno.clone(),
        };
        let disk =
            Disk::new(Box::new(recorder), disk_config(0, block_size, discard)).expect("valid disk");
        Rig {
            target: Target::new(vec![disk]),
            image,
            log,
            failing_flushes,
            flush_errno,
            block_size: block_size as usize,
        }
    }

    /// A writable disk of [`RIG_BLOCKS`] 512-byte blocks holding
    /// `pattern(seed)`, thin provisioning offered.
    fn writable(seed: u64) -> Rig {
        let len = (RIG_BLOCKS * 512) as usize;
        Rig::new(MemImage::new(pattern(seed, len), false), 512, true)
    }

    /// Runs `cdb` on LUN 0 with `out` as data-out.
    fn run(&self, cdb: &[u8], alloc: usize, out: &[u8]) -> (Completion, Vec<u8>) {
        run_with_out(&self.target, L0, cdb, alloc, out)
    }

    /// The storage calls since the last call of this.
    fn ops(&self) -> Vec<Op> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn data(&self) -> Vec<u8> {
        self.image.data()
    }

    /// The bytes of `blocks` blocks at `lba` as the image holds them.
    fn stored(&self, lba: u64, blocks: u64) -> Vec<u8> {
        let start = lba as usize * self.block_size;
        self.data()[start..start + blocks as usize * self.block_size].to_vec()
    }

    /// READ(16) of `blocks` blocks at `lba`, which must succeed.
    #[track_caller]
    fn read(&self, lba: u64, blocks: u32) -> Vec<u8> {
        let (c, data) = self.run(&block_cdb(READ_16, lba, blocks), 64 << 20, &[]);
        assert_good(c);
        data
    }

    /// From now on, the next `n` flushes of the storage (durable writes
    /// included) fail with EIO; later ones succeed again.
    fn fail_next_flushes(&self, n: usize) {
        self.fail_next_flushes_with(n, libc::EIO);
    }

    /// As [`Rig::fail_next_flushes`], with `errno` instead of EIO.
    fn fail_next_flushes_with(&self, n: usize, errno: i32) {
        self.flush_errno.store(errno, Ordering::Relaxed);
        self.failing_flushes.store(n, Ordering::Relaxed);
    }

    /// MODE SELECT(6) of one page, which must succeed.
    #[track_caller]
    fn select(&self, page: &[u8]) {
        let params = mode_select6_list(&[], page);
        let (c, _) = self.run(&mode_select6(PF, params.len() as u8), 0, &params);
        assert_good(c);
    }

    fn set_write_cache(&self, on: bool) {
        self.select(&caching_page(on));
    }

    fn set_descriptor_sense(&self, on: bool) {
        self.select(&control_page(on));
    }

    /// WCE in the caching page, for page control `pc` (0 current, 1
    /// changeable, 2 default).
    fn wce(&self, pc: u8) -> bool {
        let (c, data) = self.run(&mode_sense6(0x08, pc << 6 | 0x08, 0, 255), 255, &[]);
        assert_good(c);
        data[4 + 2] & 0x04 != 0
    }
}

/// A disk over an image file in a temporary directory.
struct FileRig {
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    target: Target,
}

impl FileRig {
    /// A `size`-byte sparse file, then `prepare` on it, opened writable.
    fn new(size: u64, discard: bool, prepare: impl FnOnce(&std::fs::File)) -> FileRig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        prepare(&file);
        file.sync_all().unwrap();
        drop(file);
        let image = FileImage::open(&path, false).unwrap();
        let disk = Disk::new(Box::new(image), disk_config(0, 512, discard)).unwrap();
        FileRig {
            dir,
            path,
            target: Target::new(vec![disk]),
        }
    }

    fn run(&self, cdb: &[u8], alloc: usize, out: &[u8]) -> (Completion, Vec<u8>) {
        run_with_out(&self.target, L0, cdb, alloc, out)
    }

    /// Bytes the file system has allocated to the image.
    fn allocated(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().blocks() * 512
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    /// Whether the file system under the rig punches holes, tried on a
    /// scratch file next to the image.
    fn can_punch_holes(&self) -> bool {
        let probe = self.dir.path().join("probe");
        let file = std::fs::File::create(&probe).unwrap();
        std::io::Write::write_all(&mut &file, &vec![0x5a; 1 << 20]).unwrap();
        file.sync_all().unwrap();
        let before = file.metadata().unwrap().blocks();
        // SAFETY: fallocate on a file this test owns; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                1 << 20,
            )
        };
        let after = file.metadata().unwrap().blocks();
        rc == 0 && after < before
    }

    /// The file's allocation map as SEEK_DATA/SEEK_HOLE report it: (start,
    /// end, allocated) byte ranges covering the file, computed here
    /// independently of the crate.
    fn allocation_map(&self) -> Vec<(u64, u64, bool)> {
        let file = std::fs::File::open(&self.path).unwrap();
        let size = file.metadata().unwrap().len();
        let seek = |pos: u64, whence| {
            // SAFETY: lseek on a file this test owns.
            let rc = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
            if rc < 0 {
                Err(io::Error::last_os_error().raw_os_error())
            } else {
                Ok(rc as u64)
            }
        };
        let mut map = Vec::new();
        let mut pos = 0;
        while pos < size {
            let data = match seek(pos, libc::SEEK_DATA) {
                Ok(data) => data.min(size),
                // No data after `pos`.
                Err(Some(libc::ENXIO)) => size,
                // No SEEK_DATA: everything counts as data.
                Err(_) => pos,
            };
            if data > pos {
                map.push((pos, data, false));
                pos = data;
                continue;
            }
            let hole = seek(pos, libc::SEEK_HOLE).unwrap_or(size).min(size);
            map.push((pos, hole, true));
            pos = hole;
        }
        map
    }
}

/// GET LBA STATUS parameter data (SBC-3 §5.7) as (LBA, blocks, provisioning status),
/// after checking the header.
#[track_caller]
fn lba_status_descriptors(data: &[u8]) -> Vec<(u64, u32, u8)> {
    assert!(data.len() >= 8);
    assert_eq!(be32(data) as usize, data.len() - 4, "parameter data length");
    assert_eq!(&data[4..8], &[0; 4]);
    assert_eq!((data.len() - 8) % 16, 0);
    data[8..]
        .chunks(16)
        .map(|d| {
            assert_eq!(&d[13..16], &[0; 3], "reserved");
            assert_eq!(d[12] & 0xf0, 0, "reserved");
            (
                u64::from_be_bytes(d[..8].try_into().unwrap()),
                be32(&d[8..]),
                d[12],
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Status and sense assertions: GOOD here, CHECK CONDITION in the test kit
// (vhost_scsi_frontend::sense)
// ---------------------------------------------------------------------------

#[track_caller]
fn assert_good(c: Completion) {
    assert_eq!(c, Completion::Good);
    assert_eq!(c.status(), 0x00);
}

// ---------------------------------------------------------------------------
// CDBs: the builders are the test kit's (vhost_scsi_frontend::cdb), the mode
// pages as reported too (vhost_scsi_frontend::testkit)
// ---------------------------------------------------------------------------

const READS: [u8; 3] = [READ_10, READ_12, READ_16];
const WRITES: [u8; 7] = [
    WRITE_6,
    WRITE_10,
    WRITE_12,
    WRITE_16,
    WRITE_AND_VERIFY_10,
    WRITE_AND_VERIFY_12,
    WRITE_AND_VERIFY_16,
];
const VERIFIES: [u8; 3] = [VERIFY_10, VERIFY_12, VERIFY_16];
const SYNCS: [u8; 2] = [SYNCHRONIZE_CACHE_10, SYNCHRONIZE_CACHE_16];

/// CDB byte holding the transfer length of a block command.
fn length_byte(op: u8) -> u16 {
    match op >> 5 {
        0 => 4,
        1 | 2 => 7,
        5 => 6,
        4 => 10,
        _ => unreachable!(),
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

// ---------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------

#[test]
fn completion_status_bytes() {
    let f = Fixture::new();
    let (c, _) = f.run(L0, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], 0);
    assert_eq!(c.status(), 0x00);
    let (c, _) = f.run(L0, &[0xff; 16], 0);
    assert_eq!(c.status(), 0x02);
}

// ---------------------------------------------------------------------------
// TEST UNIT READY, REQUEST SENSE
// ---------------------------------------------------------------------------

#[test]
fn test_unit_ready_is_good_on_every_lun() {
    let f = Fixture::new();
    for n in 0..LUN_COUNT as u16 {
        let (c, data) = f.run(LunAddress::Lun(n), &[TEST_UNIT_READY, 0, 0, 0, 0, 0], 512);
        assert_good(c);
        assert!(data.is_empty());
    }
}

#[test]
fn request_sense_returns_fixed_no_sense() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &request_sense(0, 252), 4096);
    assert_good(c);
    let mut expected = [0u8; 18];
    expected[0] = 0x70;
    expected[7] = 10;
    assert_eq!(data, expected);
}

/// SPC-4 §6.39: DESC=1 asks for descriptor-format sense data (§4.5.2),
/// which is supported: response code 72h, no descriptors for NO SENSE.
#[test]
fn request_sense_descriptor_format() {
    let f = Fixture::new();
    for lun in [L0, L2, L5] {
        let (c, data) = f.run(lun, &request_sense(0x01, 252), 4096);
        assert_good(c);
        assert_eq!(data, [0x72, 0, 0, 0, 0, 0, 0, 0]);
    }
    let (c, data) = f.run(L0, &request_sense(0x01, 3), 4096);
    assert_good(c);
    assert_eq!(data, [0x72, 0, 0]);
    // A LUN without a logical unit: LOGICAL UNIT NOT SUPPORTED, descriptor
    // format.
    let (c, data) = f.run(ABSENT, &request_sense(0x01, 252), 4096);
    assert_good(c);
    assert_eq!(data, [0x72, 0x05, 0x25, 0x00, 0, 0, 0, 0]);
}

#[test]
fn request_sense_truncates_to_allocation_length_and_buffer() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &request_sense(0, 8), 4096);
    assert_good(c);
    assert_eq!(data, [0x70, 0, 0, 0, 0, 0, 0, 10]);
    let (c, data) = f.run(L0, &request_sense(0, 0), 4096);
    assert_good(c);
    assert!(data.is_empty());
    // A buffer smaller than the allocation length is not an error.
    let (c, data) = f.run(L0, &request_sense(0, 18), 3);
    assert_good(c);
    assert_eq!(data, [0x70, 0, 0]);
}

// ---------------------------------------------------------------------------
// INQUIRY
// ---------------------------------------------------------------------------

/// The product revision the crate reports: "major.minor" of its version.
fn expected_revision() -> [u8; 4] {
    let v: Vec<&str> = env!("CARGO_PKG_VERSION").split('.').take(2).collect();
    let s = format!("{:<4}", v.join("."));
    s.as_bytes()[..4].try_into().unwrap()
}

fn expected_standard_inquiry(byte0: u8) -> Vec<u8> {
    let mut e = vec![0u8; 74];
    e[0] = byte0;
    e[2] = 0x06; // SPC-4
    e[3] = 0x02; // response data format
    e[4] = 74 - 5;
    e[7] = 0x02; // CMDQUE
    e[8..16].copy_from_slice(b"RUSTVMM ");
    e[16..32].copy_from_slice(b"VHOST-SCSI DISK ");
    e[32..36].copy_from_slice(&expected_revision());
    // Version descriptors: SAM-5, SPC-4, SBC-3.
    e[58..64].copy_from_slice(&[0x00, 0xa0, 0x04, 0x60, 0x04, 0xc0]);
    e
}

#[test]
fn inquiry_standard_data() {
    let f = Fixture::new();
    for lun in [L0, L1, L2, L3, L4, L5] {
        let (c, data) = f.run(lun, &inquiry(false, 0, 255), 4096);
        assert_good(c);
        assert_eq!(data, expected_standard_inquiry(0x00), "{lun:?}");
    }
    // The identity passed in is what is reported.
    let id = identity(0);
    let (_, data) = f.run(L0, &inquiry(false, 0, 255), 4096);
    assert_eq!(&data[8..16], &id.vendor);
    assert_eq!(&data[16..32], &id.product);
    assert_eq!(&data[32..36], &id.revision);
}

#[test]
fn inquiry_standard_truncation() {
    let f = Fixture::new();
    let full = expected_standard_inquiry(0x00);
    let (c, data) = f.run(L0, &inquiry(false, 0, 5), 4096);
    assert_good(c);
    assert_eq!(data, full[..5]);
    let (c, data) = f.run(L0, &inquiry(false, 0, 0), 4096);
    assert_good(c);
    assert!(data.is_empty());
    // The allocation length is 16 bits wide (bytes 3-4).
    let (c, data) = f.run(L0, &inquiry(false, 0, 0x0100), 4096);
    assert_good(c);
    assert_eq!(data, full);
    // The initiator's buffer limits too.
    let (c, data) = f.run(L0, &inquiry(false, 0, 255), 36);
    assert_good(c);
    assert_eq!(data, full[..36]);
}

#[test]
fn inquiry_cmddt_is_invalid_field() {
    let f = Fixture::new();
    for byte1 in [0x02, 0x03] {
        let (c, data) = f.run(L0, &[INQUIRY, byte1, 0, 0, 255, 0], 4096);
        assert_invalid_field(c, 1, Some(1));
        assert!(data.is_empty());
    }
}

#[test]
fn inquiry_page_code_without_evpd_is_invalid_field() {
    let f = Fixture::new();
    for page in [0x00u8, 0x80, 0x83] {
        let (c, data) = f.run(L0, &inquiry(false, page, 255), 4096);
        if page == 0 {
            assert_good(c);
        } else {
            assert_invalid_field(c, 2, None);
            assert!(data.is_empty());
        }
    }
}

fn vpd(f: &Fixture, lun: LunAddress, page: u8) -> Vec<u8> {
    let (c, data) = f.run(lun, &inquiry(true, page, 0xffff), 0xffff);
    assert_good(c);
    assert_eq!(data[0], 0x00, "peripheral qualifier 0, type disk");
    assert_eq!(data[1], page);
    assert_eq!(usize::from(be16(&data[2..])), data.len() - 4, "page length");
    data
}

#[test]
fn vpd_supported_pages() {
    let f = Fixture::new();
    let data = vpd(&f, L0, 0x00);
    assert_eq!(data, [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    // Every listed page is served on every disk.
    for lun in [L0, L1, L2, L3, L4, L5] {
        for &page in &data[4..] {
            vpd(&f, lun, page);
        }
    }
}

#[test]
fn vpd_unit_serial_number() {
    let f = Fixture::new();
    for n in 0..LUN_COUNT as u16 {
        let id = identity(n);
        let data = vpd(&f, LunAddress::Lun(n), 0x80);
        assert_eq!(&data[4..], id.serial.as_bytes());
        assert_eq!(id.serial.len(), 16);
    }
    // Serial numbers differ between LUNs.
    assert_ne!(vpd(&f, L0, 0x80), vpd(&f, L1, 0x80));
}

#[test]
fn vpd_device_identification() {
    let f = Fixture::new();
    for n in 0..LUN_COUNT as u16 {
        let id = identity(n);
        let data = vpd(&f, LunAddress::Lun(n), 0x83);
        let mut expected = vec![0x00, 0x83, 0, 0];
        // NAA designator: binary, associated with the LU, type 3, 8 bytes.
        expected.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
        expected.extend_from_slice(&id.naa.to_be_bytes());
        // T10 vendor ID designator: ASCII, type 1: vendor + serial.
        expected.extend_from_slice(&[0x02, 0x01, 0x00, 8 + 16]);
        expected.extend_from_slice(b"RUSTVMM ");
        expected.extend_from_slice(id.serial.as_bytes());
        expected[3] = (expected.len() - 4) as u8;
        assert_eq!(data, expected);
        // Locally assigned NAA (3h).
        assert_eq!(data[8] >> 4, 3);
    }
}

#[test]
fn vpd_block_limits() {
    let f = Fixture::new();
    // 512-byte blocks: granularity one 4 KiB physical block (8), maximum
    // transfer 32 MiB / 512 = 65536 blocks.
    // WSNZ=1 (WRITE SAME of zero blocks is refused), MAXIMUM COMPARE AND
    // WRITE LENGTH 64, MAXIMUM WRITE SAME LENGTH 1 GiB in blocks; no UNMAP
    // (no thin provisioning on these disks).
    let data = vpd(&f, L0, 0xb0);
    let mut expected = vec![0u8; 64];
    expected[1] = 0xb0;
    expected[3] = 0x3c;
    expected[4] = 0x01;
    expected[5] = 64;
    expected[6..8].copy_from_slice(&8u16.to_be_bytes());
    expected[8..12].copy_from_slice(&((32u32 << 20) / 512).to_be_bytes());
    expected[36..44].copy_from_slice(&((1u64 << 30) / 512).to_be_bytes());
    assert_eq!(data, expected);
    assert_eq!(be32(&data[8..]), 65536);
    // 4096-byte blocks: granularity 1, maximum 8192 blocks.
    let data = vpd(&f, L2, 0xb0);
    expected[6..8].copy_from_slice(&1u16.to_be_bytes());
    expected[8..12].copy_from_slice(&((32u32 << 20) / 4096).to_be_bytes());
    expected[36..44].copy_from_slice(&((1u64 << 30) / 4096).to_be_bytes());
    assert_eq!(data, expected);
    assert_eq!(be32(&data[8..]), 8192);
    // A writable disk without discard reports the same.
    assert_eq!(vpd(&f, L5, 0xb0)[4..], vpd(&f, L0, 0xb0)[4..]);
}

#[test]
fn vpd_block_device_characteristics() {
    let f = Fixture::new();
    let mut expected = vec![0u8; 64];
    expected[1] = 0xb1;
    expected[3] = 0x3c;
    // Solid state: MEDIUM ROTATION RATE 0001h (non-rotating).
    expected[5] = 1;
    assert_eq!(vpd(&f, L0, 0xb1), expected);
    assert_eq!(vpd(&f, L2, 0xb1), expected);
    // Otherwise 0000h (not reported).
    expected[5] = 0;
    assert_eq!(vpd(&f, L1, 0xb1), expected);
    assert_eq!(vpd(&f, L3, 0xb1), expected);
}

#[test]
fn vpd_logical_block_provisioning() {
    let f = Fixture::new();
    // No UNMAP, no WRITE SAME unmap, LBPRZ=0, fully provisioned.
    assert_eq!(vpd(&f, L0, 0xb2), [0, 0xb2, 0, 4, 0, 0, 0, 0]);
}

#[test]
fn vpd_unsupported_pages_are_invalid_field() {
    let f = Fixture::new();
    for page in [0x01u8, 0x81, 0x82, 0x86, 0x87, 0x89, 0xb3, 0xb7, 0xc0, 0xff] {
        let (c, data) = f.run(L0, &inquiry(true, page, 255), 4096);
        assert_invalid_field(c, 2, None);
        assert!(data.is_empty(), "page {page:#x}");
    }
}

#[test]
fn vpd_truncation() {
    let f = Fixture::new();
    let full = vpd(&f, L0, 0x83);
    for alloc in [0u16, 1, 4, 9, 20] {
        let (c, data) = f.run(L0, &inquiry(true, 0x83, alloc), 4096);
        assert_good(c);
        assert_eq!(data, full[..usize::from(alloc)]);
    }
}

// ---------------------------------------------------------------------------
// READ CAPACITY
// ---------------------------------------------------------------------------

#[test]
fn read_capacity10() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &rc10_cdb(0, false), 4096);
    assert_good(c);
    assert_eq!(data, [0, 0, 0x07, 0xff, 0, 0, 0x02, 0x00]);
    let (c, data) = f.run(L2, &rc10_cdb(0, false), 4096);
    assert_good(c);
    assert_eq!(data, [0, 0, 0, 15, 0, 0, 0x10, 0x00]);
    let (c, data) = f.run(L1, &rc10_cdb(0, false), 4096);
    assert_good(c);
    assert_eq!(be32(&data), (L1_BLOCKS - 1) as u32);
}

#[test]
fn read_capacity10_saturates_beyond_32_bits() {
    let f = Fixture::new();
    let (c, data) = f.run(L3, &rc10_cdb(0, false), 4096);
    assert_good(c);
    assert_eq!(data, [0xff, 0xff, 0xff, 0xff, 0, 0, 0x02, 0x00]);
}

#[test]
fn read_capacity10_lba_without_pmi_is_invalid_field() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &rc10_cdb(1, false), 4096);
    assert_invalid_field(c, 2, None);
    assert!(data.is_empty());
    // With PMI=1 the LBA is allowed.
    let (c, data) = f.run(L0, &rc10_cdb(1, true), 4096);
    assert_good(c);
    assert_eq!(data.len(), 8);
}

#[test]
fn read_capacity10_short_buffer() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &rc10_cdb(0, false), 4);
    assert_good(c);
    assert_eq!(data, [0, 0, 0x07, 0xff]);
}

fn expected_capacity16(blocks: u64, block_size: u32, exponent: u8) -> Vec<u8> {
    let mut e = vec![0u8; 32];
    e[..8].copy_from_slice(&(blocks - 1).to_be_bytes());
    e[8..12].copy_from_slice(&block_size.to_be_bytes());
    e[13] = exponent;
    // Byte 12: no protection; byte 14: LBPME=0, LBPRZ=0, lowest aligned 0.
    e
}

#[test]
fn read_capacity16() {
    let f = Fixture::new();
    let cases = [
        (L0, L0_BLOCKS, 512, 3),
        (L1, L1_BLOCKS, 512, 3),
        (L2, L2_BLOCKS, 4096, 0),
        (L3, L3_BLOCKS, 512, 3),
    ];
    for (lun, blocks, block_size, exponent) in cases {
        let (c, data) = f.run(lun, &rc16_cdb(32), 4096);
        assert_good(c);
        assert_eq!(data, expected_capacity16(blocks, block_size, exponent));
        assert_eq!(data[14] & 0x80, 0, "LBPME");
    }
}

#[test]
fn read_capacity16_truncation() {
    let f = Fixture::new();
    let full = expected_capacity16(L0_BLOCKS, 512, 3);
    for alloc in [0u32, 8, 12, 31] {
        let (c, data) = f.run(L0, &rc16_cdb(alloc), 4096);
        assert_good(c);
        assert_eq!(data, full[..alloc as usize]);
    }
    let (c, data) = f.run(L0, &rc16_cdb(4096), 4096);
    assert_good(c);
    assert_eq!(data, full);
}

#[test]
fn service_action_in_unknown_action_is_invalid_field() {
    let f = Fixture::new();
    for sa in [0x00u8, 0x11, 0x12, 0x1f] {
        let mut cdb = rc16_cdb(32);
        cdb[1] = sa;
        let (c, _) = f.run(L0, &cdb, 4096);
        assert_invalid_field(c, 1, Some(4));
    }
}

// ---------------------------------------------------------------------------
// READ
// ---------------------------------------------------------------------------

#[test]
fn read6_returns_image_bytes() {
    let f = Fixture::new();
    for (lba, len) in [(0u64, 1u32), (5, 3), (L0_BLOCKS - 1, 1), (100, 255)] {
        let (c, data) = f.run(L0, &block_cdb(READ_6, lba, len), 1 << 20);
        assert_good(c);
        assert_eq!(data, f.blocks(0, 512, lba, u64::from(len)), "lba {lba}");
    }
}

#[test]
fn read6_transfer_length_zero_means_256_blocks() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &[READ_6, 0, 0, 10, 0, 0], 1 << 20);
    assert_good(c);
    assert_eq!(data.len(), 256 * 512);
    assert_eq!(data, f.blocks(0, 512, 10, 256));
    // 256 blocks from the last 255 do not fit.
    let lba = L0_BLOCKS - 255;
    let cdb = [READ_6, 0, (lba >> 8) as u8, lba as u8, 0, 0];
    let (c, data) = f.run(L0, &cdb, 1 << 20);
    assert_lba_out_of_range(c);
    assert!(data.is_empty());
}

#[test]
fn read6_lba_out_of_range() {
    let f = Fixture::new();
    for lba in [L0_BLOCKS, 0x1f_ffff] {
        let (c, data) = f.run(L0, &block_cdb(READ_6, lba, 1), 1 << 20);
        assert_lba_out_of_range(c);
        assert!(data.is_empty());
    }
}

#[test]
fn read_10_12_16_return_image_bytes() {
    let f = Fixture::new();
    for op in READS {
        for (lba, len) in [(0u64, 1u32), (100, 7), (L0_BLOCKS - 3, 3), (1, 300)] {
            let (c, data) = f.run(L0, &block_cdb(op, lba, len), 1 << 20);
            assert_good(c);
            assert_eq!(data, f.blocks(0, 512, lba, u64::from(len)), "{op:#x}");
        }
        // The whole disk at once.
        let (c, data) = f.run(L0, &block_cdb(op, 0, L0_BLOCKS as u32), 1 << 20);
        assert_good(c);
        assert_eq!(data, f.contents[0]);
    }
}

#[test]
fn read_ignores_dpo_fua_and_group_number() {
    let f = Fixture::new();
    for op in READS {
        let mut cdb = block_cdb(op, 4, 2);
        cdb[1] |= 0x18; // DPO, FUA
                        // GROUP NUMBER: byte 6 of READ(10), the byte before the control
                        // byte otherwise.
        let group = if op == READ_10 { 6 } else { cdb.len() - 2 };
        cdb[group] = 0x1f;
        let (c, data) = f.run(L0, &cdb, 4096);
        assert_good(c);
        assert_eq!(data, f.blocks(0, 512, 4, 2));
    }
}

#[test]
fn read_transfer_length_zero_is_good_without_data() {
    let f = Fixture::new();
    for op in READS {
        for lba in [0, L0_BLOCKS - 1, L0_BLOCKS] {
            let (c, data) = f.run(L0, &block_cdb(op, lba, 0), 4096);
            assert_good(c);
            assert!(data.is_empty());
        }
        // Even a zero-length transfer must start on the medium.
        let (c, _) = f.run(L0, &block_cdb(op, L0_BLOCKS + 1, 0), 4096);
        assert_lba_out_of_range(c);
    }
}

#[test]
fn read_beyond_capacity_is_lba_out_of_range() {
    let f = Fixture::new();
    for op in READS {
        for (lba, len) in [
            (L0_BLOCKS - 1, 2),
            (L0_BLOCKS, 1),
            (L0_BLOCKS + 1000, 1),
            (0, L0_BLOCKS as u32 + 1),
            (u64::from(u32::MAX), 1),
        ] {
            let (c, data) = f.run(L0, &block_cdb(op, lba, len), 4 << 20);
            assert_lba_out_of_range(c);
            assert!(data.is_empty(), "{op:#x} lba {lba} len {len}");
        }
    }
}

#[test]
fn read16_lba_overflow_is_lba_out_of_range() {
    let f = Fixture::new();
    for (lba, len) in [
        (u64::MAX, 0),
        (u64::MAX, 1),
        (u64::MAX, 2),
        (u64::MAX - 1, 65536),
        (1 << 63, 1),
    ] {
        for lun in [L0, L3] {
            let (c, data) = f.run(lun, &block_cdb(READ_16, lba, len), 64 << 20);
            assert_lba_out_of_range(c);
            assert!(data.is_empty());
        }
    }
}

#[test]
fn read_transfer_length_above_maximum_is_invalid_field() {
    let f = Fixture::new();
    // 512-byte blocks: at most 65536. READ(10) cannot exceed it.
    for op in [READ_12, READ_16] {
        for len in [65537, u32::MAX] {
            let (c, data) = f.run(L0, &block_cdb(op, 0, len), 64 << 20);
            assert_invalid_field(c, length_byte(op), None);
            assert!(data.is_empty());
        }
        // The maximum itself is a valid length: here it runs off the end.
        let (c, _) = f.run(L0, &block_cdb(op, 0, 65536), 64 << 20);
        assert_lba_out_of_range(c);
    }
    // 4096-byte blocks: at most 8192, reachable with READ(10) too.
    for op in READS {
        let (c, _) = f.run(L2, &block_cdb(op, 0, 8193), 64 << 20);
        assert_invalid_field(c, length_byte(op), None);
        let (c, _) = f.run(L2, &block_cdb(op, 0, 8192), 64 << 20);
        assert_lba_out_of_range(c);
    }
    // The length is checked before the LBA.
    let (c, _) = f.run(L0, &block_cdb(READ_16, u64::MAX, 65537), 64 << 20);
    assert_invalid_field(c, 10, None);
}

#[test]
fn read_maximum_transfer_on_a_huge_disk() {
    let f = Fixture::new();
    // 65536 blocks = 32 MiB: the stored megabyte, then zeroes.
    let (c, data) = f.run(L3, &block_cdb(READ_16, 0, 65536), 32 << 20);
    assert_good(c);
    assert_eq!(data.len(), 32 << 20);
    assert_eq!(&data[..L3_STORED], &f.contents[3][..]);
    assert!(data[L3_STORED..].iter().all(|&b| b == 0));
}

#[test]
fn read_on_a_huge_disk_across_32_bits() {
    let f = Fixture::new();
    for lba in [(1u64 << 32) - 4, L3_BLOCKS - 8] {
        let (c, data) = f.run(L3, &block_cdb(READ_16, lba, 8), 4096);
        assert_good(c);
        assert_eq!(data, vec![0u8; 4096]);
    }
    // The last block, and one past it.
    let (c, _) = f.run(L3, &block_cdb(READ_16, L3_BLOCKS - 1, 1), 4096);
    assert_good(c);
    let (c, _) = f.run(L3, &block_cdb(READ_16, L3_BLOCKS - 1, 2), 4096);
    assert_lba_out_of_range(c);
    // READ(10) and READ(12) reach the first 2^32 blocks.
    for op in [READ_10, READ_12] {
        let (c, data) = f.run(L3, &block_cdb(op, u64::from(u32::MAX), 1), 4096);
        assert_good(c);
        assert_eq!(data, vec![0u8; 512]);
        let (c, data) = f.run(L3, &block_cdb(op, 2, 2), 4096);
        assert_good(c);
        assert_eq!(data, f.contents[3][1024..2048]);
    }
}

#[test]
fn read_rdprotect_is_invalid_field() {
    let f = Fixture::new();
    for op in READS {
        for rdprotect in 1..8u8 {
            let mut cdb = block_cdb(op, 0, 1);
            cdb[1] = rdprotect << 5;
            let (c, data) = f.run(L0, &cdb, 4096);
            assert_invalid_field(c, 1, Some(7));
            assert!(data.is_empty());
        }
    }
}

#[test]
fn read_into_too_small_a_buffer_is_not_executed() {
    let f = Fixture::new();
    for op in [READ_6, READ_10, READ_12, READ_16] {
        for buffer in [0, 1, 511, 2047] {
            let (c, data) = f.run(L0, &block_cdb(op, 0, 4), buffer);
            assert_eq!(c, Completion::BufferTooSmall, "{op:#x} into {buffer}");
            assert!(data.is_empty());
        }
        // Exactly large enough.
        let (c, data) = f.run(L0, &block_cdb(op, 0, 4), 2048);
        assert_good(c);
        assert_eq!(data.len(), 2048);
    }
    // READ(6) with length 0 needs 256 blocks of room.
    let (c, data) = f.run(L0, &[READ_6, 0, 0, 0, 0, 0], 255 * 512);
    assert_eq!(c, Completion::BufferTooSmall);
    assert!(data.is_empty());
    // Range errors are reported before the buffer size matters.
    let (c, _) = f.run(L0, &block_cdb(READ_10, L0_BLOCKS, 1), 0);
    assert_lba_out_of_range(c);
}

#[test]
fn read_error_is_medium_error() {
    let f = Fixture::new();
    for op in [READ_6, READ_10, READ_12, READ_16] {
        for (lba, len) in [(8u64, 1u32), (9, 1), (0, 32), (7, 2), (9, 5)] {
            let (c, data) = f.run(L4, &block_cdb(op, lba, len), 1 << 20);
            assert_medium_error(c);
            assert!(data.is_empty(), "no data on a failed read");
        }
        // The rest of the disk reads fine.
        for (lba, len) in [(0u64, 8u32), (10, 22)] {
            let (c, data) = f.run(L4, &block_cdb(op, lba, len), 1 << 20);
            assert_good(c);
            assert_eq!(data, f.blocks(4, 512, lba, u64::from(len)));
        }
    }
    // A range error is reported as such, not as a medium error.
    let (c, _) = f.run(L4, &block_cdb(READ_10, 8, 100), 1 << 20);
    assert_lba_out_of_range(c);
}

// ---------------------------------------------------------------------------
// WRITE, WRITE AND VERIFY
// ---------------------------------------------------------------------------

#[test]
fn writes_on_read_only_disks_are_write_protected() {
    let f = Fixture::new();
    let payload = vec![0x5au8; 8 * 4096];
    for (lun, blocks) in [
        (L0, L0_BLOCKS),
        (L1, L1_BLOCKS),
        (L2, L2_BLOCKS),
        (L3, L3_BLOCKS),
        (L4, L4_BLOCKS),
    ] {
        for op in WRITES {
            for (lba, len) in [(0u64, 1u32), (3, 2), (15, 1)] {
                let (c, data) = run_with_out(
                    &f.target,
                    lun,
                    &block_cdb(op, lba, len),
                    4096,
                    &payload[..len as usize * 4096],
                );
                assert_write_protected(c);
                assert!(data.is_empty());
            }
        }
        // WRITE(6) transfer length 0 means 256 blocks.
        let (c, _) = f.run(lun, &[WRITE_6, 0, 0, 0, 0, 0], 0);
        if blocks < 256 {
            assert_lba_out_of_range(c);
        } else {
            assert_write_protected(c);
        }
    }
    // Nothing changed.
    let (_, data) = f.run(L0, &block_cdb(READ_10, 0, 16), 1 << 20);
    assert_eq!(data, f.blocks(0, 512, 0, 16));
}

#[test]
fn write_out_of_range_is_lba_out_of_range() {
    let f = Fixture::new();
    for op in WRITES {
        for (lba, len) in [(L0_BLOCKS, 1u32), (L0_BLOCKS - 1, 2)] {
            let (c, _) = f.run(L0, &block_cdb(op, lba, len), 0);
            assert_lba_out_of_range(c);
        }
        if op >> 5 == 4 {
            let (c, _) = f.run(L0, &block_cdb(op, u64::MAX, 1), 0);
            assert_lba_out_of_range(c);
        }
    }
}

#[test]
fn write_invalid_fields() {
    let f = Fixture::new();
    for op in WRITES.into_iter().filter(|&op| op != WRITE_6) {
        // WRPROTECT (bits 7-5 of byte 1).
        let mut cdb = block_cdb(op, 0, 1);
        cdb[1] = 0x20;
        let (c, _) = f.run(L0, &cdb, 0);
        assert_invalid_field(c, 1, Some(7));
        // Longer than the maximum transfer length (4096-byte blocks: 8192).
        let (c, _) = f.run(L2, &block_cdb(op, 0, 8193), 0);
        assert_invalid_field(c, length_byte(op), None);
    }
}

// ---------------------------------------------------------------------------
// VERIFY
// ---------------------------------------------------------------------------

#[test]
fn verify_without_byte_check_is_good() {
    let f = Fixture::new();
    for op in VERIFIES {
        for (lba, len) in [(0u64, 0u32), (0, 1), (10, 100), (0, L0_BLOCKS as u32)] {
            let (c, data) = f.run(L0, &block_cdb(op, lba, len), 4096);
            assert_good(c);
            assert!(data.is_empty(), "VERIFY transfers no data");
        }
        // 32 MiB on the huge disk, through the fixed scratch buffer.
        let (c, _) = f.run(L3, &block_cdb(op, 1 << 20, 65535), 0);
        assert_good(c);
    }
}

#[test]
fn verify_range_errors() {
    let f = Fixture::new();
    for op in VERIFIES {
        for (lba, len) in [(L0_BLOCKS, 1u32), (L0_BLOCKS - 1, 2), (L0_BLOCKS + 1, 0)] {
            let (c, _) = f.run(L0, &block_cdb(op, lba, len), 0);
            assert_lba_out_of_range(c);
        }
        let (c, _) = f.run(L2, &block_cdb(op, 0, 8193), 0);
        assert_invalid_field(c, length_byte(op), None);
    }
    let (c, _) = f.run(L0, &block_cdb(VERIFY_16, u64::MAX, 1), 0);
    assert_lba_out_of_range(c);
    let (c, _) = f.run(L0, &block_cdb(VERIFY_12, 0, 65537), 0);
    assert_invalid_field(c, 6, None);
}

/// SBC-3 §5.33: BYTCHK 01b compares with the data-out, 11b compares every
/// block with one data-out block; 10b is reserved.
#[test]
fn verify_byte_check_on_read_only_disks() {
    let f = Fixture::new();
    for op in VERIFIES {
        let mut cdb = block_cdb(op, 1, 1);
        cdb[1] = 0b10 << 1;
        let (c, _) = run_with_out(&f.target, L0, &cdb, 0, &[0u8; 512]);
        assert_invalid_field(c, 1, Some(2));
        cdb[1] = 0b01 << 1;
        let (c, _) = run_with_out(&f.target, L0, &cdb, 0, f.blocks(0, 512, 1, 1));
        assert_good(c);
        let (c, _) = run_with_out(&f.target, L0, &cdb, 0, &[0u8; 512]);
        assert_miscompare(c, 0);
        cdb[1] = 0b11 << 1;
        let (c, _) = run_with_out(&f.target, L0, &cdb, 0, f.blocks(0, 512, 1, 1));
        assert_good(c);
    }
}

#[test]
fn verify_vrprotect_is_invalid_field() {
    let f = Fixture::new();
    for op in VERIFIES {
        let mut cdb = block_cdb(op, 0, 1);
        cdb[1] = 0xe0;
        let (c, _) = f.run(L0, &cdb, 0);
        assert_invalid_field(c, 1, Some(7));
    }
}

#[test]
fn verify_read_error_is_medium_error() {
    let f = Fixture::new();
    for op in VERIFIES {
        let (c, _) = f.run(L4, &block_cdb(op, 0, L4_BLOCKS as u32), 0);
        assert_medium_error(c);
        let (c, _) = f.run(L4, &block_cdb(op, 10, 22), 0);
        assert_good(c);
    }
}

// ---------------------------------------------------------------------------
// SYNCHRONIZE CACHE
// ---------------------------------------------------------------------------

#[test]
fn synchronize_cache() {
    let f = Fixture::new();
    for op in SYNCS {
        for (lba, blocks) in [
            (0u64, 0u32),
            (L0_BLOCKS - 1, 0),
            (0, L0_BLOCKS as u32),
            (L0_BLOCKS - 1, 1),
            (100, 5),
        ] {
            let (c, data) = f.run(L0, &block_cdb(op, lba, blocks), 4096);
            assert_good(c);
            assert!(data.is_empty());
        }
        for (lba, blocks) in [
            (L0_BLOCKS, 0u32),
            (L0_BLOCKS, 1),
            (L0_BLOCKS - 1, 2),
            (0, L0_BLOCKS as u32 + 1),
        ] {
            let (c, _) = f.run(L0, &block_cdb(op, lba, blocks), 4096);
            assert_lba_out_of_range(c);
        }
        // IMMED is accepted.
        let mut cdb = block_cdb(op, 0, 0);
        cdb[1] = 0x02;
        let (c, _) = f.run(L0, &cdb, 0);
        assert_good(c);
    }
    for (lba, blocks) in [(u64::MAX, 0u32), (u64::MAX, 1), (u64::MAX - 1, 2)] {
        let (c, _) = f.run(L0, &block_cdb(SYNCHRONIZE_CACHE_16, lba, blocks), 0);
        assert_lba_out_of_range(c);
    }
    // Beyond 32 bits on the huge disk.
    let (c, _) = f.run(L3, &block_cdb(SYNCHRONIZE_CACHE_16, L3_BLOCKS - 1, 0), 0);
    assert_good(c);
    let (c, _) = f.run(L3, &block_cdb(SYNCHRONIZE_CACHE_16, L3_BLOCKS, 0), 0);
    assert_lba_out_of_range(c);
}

// ---------------------------------------------------------------------------
// MODE SENSE
// ---------------------------------------------------------------------------

// The pages as reported: the test kit's RW_ERROR_RECOVERY_PAGE,
// caching_page and control_page.

fn all_pages() -> Vec<u8> {
    let mut p = RW_ERROR_RECOVERY_PAGE.to_vec();
    p.extend_from_slice(&caching_page(true));
    p.extend_from_slice(&control_page(false));
    p
}

/// Short block descriptor: NUMBER OF LOGICAL BLOCKS, LOGICAL BLOCK LENGTH.
fn short_descriptor(blocks: u32, block_size: u32) -> Vec<u8> {
    let mut d = blocks.to_be_bytes().to_vec();
    d.push(0);
    d.extend_from_slice(&block_size.to_be_bytes()[1..]);
    d
}

fn long_descriptor(blocks: u64, block_size: u32) -> Vec<u8> {
    let mut d = blocks.to_be_bytes().to_vec();
    d.extend_from_slice(&[0; 4]);
    d.extend_from_slice(&block_size.to_be_bytes());
    d
}

fn mode6(device_specific: u8, descriptor: &[u8], pages: &[u8]) -> Vec<u8> {
    let mut out = vec![
        (3 + descriptor.len() + pages.len()) as u8,
        0,
        device_specific,
        descriptor.len() as u8,
    ];
    out.extend_from_slice(descriptor);
    out.extend_from_slice(pages);
    out
}

fn mode10(device_specific: u8, long_lba: bool, descriptor: &[u8], pages: &[u8]) -> Vec<u8> {
    let mut out = ((6 + descriptor.len() + pages.len()) as u16)
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&[0, device_specific, u8::from(long_lba), 0]);
    out.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
    out.extend_from_slice(descriptor);
    out.extend_from_slice(pages);
    out
}

/// Device-specific parameter (SBC-3 §6.4.1): WP, and DPOFUA (the DPO and
/// FUA bits are supported), which every disk reports.
const WP: u8 = 0x80;
const DPOFUA: u8 = 0x10;
/// What a read-only disk reports.
const RO: u8 = WP | DPOFUA;

#[test]
fn mode_sense6_all_pages() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &mode_sense6(0, 0x3f, 0, 255), 4096);
    assert_good(c);
    let expected = mode6(RO, &short_descriptor(2048, 512), &all_pages());
    assert_eq!(data, expected);
    assert_eq!(data.len(), 56);
    assert_eq!(usize::from(data[0]), data.len() - 1);
    // "All subpages" gives the same.
    let (c, data) = f.run(L0, &mode_sense6(0, 0x3f, 0xff, 255), 4096);
    assert_good(c);
    assert_eq!(data, expected);
}

#[test]
fn mode_sense10_all_pages() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &mode_sense10(0, 0x3f, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(
        data,
        mode10(RO, false, &short_descriptor(2048, 512), &all_pages())
    );
    assert_eq!(data.len(), 60);
    assert_eq!(usize::from(be16(&data)), data.len() - 2);
}

#[test]
fn mode_sense_single_pages() {
    let f = Fixture::new();
    let pages: [(u8, Vec<u8>); 3] = [
        (0x01, RW_ERROR_RECOVERY_PAGE.to_vec()),
        (0x08, caching_page(true)),
        (0x0a, control_page(false)),
    ];
    let desc = short_descriptor(2048, 512);
    for (code, page) in &pages {
        let (c, data) = f.run(L0, &mode_sense6(0, *code, 0, 255), 4096);
        assert_good(c);
        assert_eq!(data, mode6(RO, &desc, page), "page {code:#x}");
        // DBD: no block descriptor.
        let (c, data) = f.run(L0, &mode_sense6(0x08, *code, 0, 255), 4096);
        assert_good(c);
        assert_eq!(data, mode6(RO, &[], page));
        let (c, data) = f.run(L0, &mode_sense10(0, *code, 0, 4096), 4096);
        assert_good(c);
        assert_eq!(data, mode10(RO, false, &desc, page));
        let (c, data) = f.run(L0, &mode_sense10(0x08, *code, 0, 4096), 4096);
        assert_good(c);
        assert_eq!(data, mode10(RO, false, &[], page));
        // Subpage FFh of a page without subpages is the page itself.
        let (c, data) = f.run(L0, &mode_sense6(0x08, *code, 0xff, 255), 4096);
        assert_good(c);
        assert_eq!(data, mode6(RO, &[], page));
    }
}

#[test]
fn mode_sense10_long_lba_descriptor() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &mode_sense10(0x10, 0x3f, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(
        data,
        mode10(RO, true, &long_descriptor(2048, 512), &all_pages())
    );
    assert_eq!(data[4], 0x01, "LONGLBA");
    assert_eq!(be16(&data[6..]), 16);
    // LLBAA with DBD: no descriptor, LONGLBA clear.
    let (c, data) = f.run(L0, &mode_sense10(0x18, 0x0a, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, mode10(RO, false, &[], &control_page(false)));
}

#[test]
fn mode_sense_huge_disk_block_descriptors() {
    let f = Fixture::new();
    // Short descriptors saturate at FFFFFFFFh.
    let sat = short_descriptor(u32::MAX, 512);
    let (c, data) = f.run(L3, &mode_sense6(0, 0x0a, 0, 255), 4096);
    assert_good(c);
    assert_eq!(data, mode6(RO, &sat, &control_page(false)));
    let (c, data) = f.run(L3, &mode_sense10(0, 0x0a, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, mode10(RO, false, &sat, &control_page(false)));
    // The long descriptor holds the real count.
    let (c, data) = f.run(L3, &mode_sense10(0x10, 0x0a, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(
        data,
        mode10(
            RO,
            true,
            &long_descriptor(L3_BLOCKS, 512),
            &control_page(false)
        )
    );
}

#[test]
fn mode_sense_4096_block_descriptor() {
    let f = Fixture::new();
    let (c, data) = f.run(L2, &mode_sense6(0, 0x0a, 0, 255), 4096);
    assert_good(c);
    assert_eq!(&data[4..12], &[0, 0, 0, 16, 0, 0, 0x10, 0]);
}

#[test]
fn mode_sense_page_control() {
    let f = Fixture::new();
    let desc = short_descriptor(2048, 512);
    // Changeable: only WCE (caching page byte 2 bit 2) and D_SENSE
    // (control page byte 2 bit 2); everything else is zero after the page
    // headers.
    let mut changeable = vec![0x01, 0x0a];
    changeable.extend_from_slice(&[0; 10]);
    changeable.extend_from_slice(&[0x08, 0x12, 0x04]);
    changeable.extend_from_slice(&[0; 17]);
    changeable.extend_from_slice(&[0x0a, 0x0a, 0x04]);
    changeable.extend_from_slice(&[0; 9]);
    let (c, data) = f.run(L0, &mode_sense6(0, 0x40 | 0x3f, 0, 255), 4096);
    assert_good(c);
    assert_eq!(data, mode6(RO, &desc, &changeable));
    let (c, data) = f.run(L0, &mode_sense10(0x08, 0x40 | 0x08, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, mode10(RO, false, &[], &changeable[12..32]));
    // Default values equal the current ones (nothing was changed).
    let (c, data) = f.run(L0, &mode_sense6(0, 0x80 | 0x3f, 0, 255), 4096);
    assert_good(c);
    assert_eq!(data, mode6(RO, &desc, &all_pages()));
    let (c, data) = f.run(L0, &mode_sense10(0, 0x80 | 0x01, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, mode10(RO, false, &desc, &RW_ERROR_RECOVERY_PAGE));
}

#[test]
fn mode_sense_saved_values_not_supported() {
    let f = Fixture::new();
    for page in [0x01u8, 0x08, 0x0a, 0x3f] {
        let (c, data) = f.run(L0, &mode_sense6(0, 0xc0 | page, 0, 255), 4096);
        assert_plain_sense(c, 0x05, 0x39, 0x00);
        assert!(data.is_empty());
        let (c, _) = f.run(L0, &mode_sense10(0, 0xc0 | page, 0, 4096), 4096);
        assert_plain_sense(c, 0x05, 0x39, 0x00);
    }
}

#[test]
fn mode_sense_unsupported_page_is_invalid_field() {
    let f = Fixture::new();
    for page in [0x00u8, 0x02, 0x03, 0x04, 0x07, 0x1c, 0x19, 0x3e] {
        let (c, data) = f.run(L0, &mode_sense6(0, page, 0, 255), 4096);
        assert_invalid_field(c, 2, Some(5));
        assert!(data.is_empty());
        let (c, _) = f.run(L0, &mode_sense10(0, page, 0, 4096), 4096);
        assert_invalid_field(c, 2, Some(5));
    }
}

#[test]
fn mode_sense_bad_subpage_is_invalid_field() {
    let f = Fixture::new();
    for (page, subpage) in [(0x08u8, 0x01u8), (0x0a, 0x01), (0x0a, 0xf1), (0x3f, 0x01)] {
        let (c, _) = f.run(L0, &mode_sense6(0, page, subpage, 255), 4096);
        assert_invalid_field(c, 3, None);
        let (c, _) = f.run(L0, &mode_sense10(0, page, subpage, 4096), 4096);
        assert_invalid_field(c, 3, None);
    }
}

#[test]
fn mode_sense_write_protect_bit() {
    let f = Fixture::new();
    for (lun, wp) in [(L0, RO), (L1, RO), (L2, RO), (L4, RO), (L5, DPOFUA)] {
        let (c, data) = f.run(lun, &mode_sense6(0x08, 0x3f, 0, 255), 4096);
        assert_good(c);
        assert_eq!(data[2], wp, "{lun:?}");
        let (c, data) = f.run(lun, &mode_sense10(0x08, 0x3f, 0, 4096), 4096);
        assert_good(c);
        assert_eq!(data[3], wp, "{lun:?}");
    }
}

#[test]
fn mode_sense_truncation() {
    let f = Fixture::new();
    let full6 = mode6(RO, &short_descriptor(2048, 512), &all_pages());
    for alloc in [0u8, 1, 4, 12, 13] {
        let (c, data) = f.run(L0, &mode_sense6(0, 0x3f, 0, alloc), 4096);
        assert_good(c);
        assert_eq!(data, full6[..usize::from(alloc)]);
    }
    let full10 = mode10(RO, false, &short_descriptor(2048, 512), &all_pages());
    for alloc in [0u16, 2, 8, 59] {
        let (c, data) = f.run(L0, &mode_sense10(0, 0x3f, 0, alloc), 4096);
        assert_good(c);
        assert_eq!(data, full10[..usize::from(alloc)]);
    }
    // The header still reports the full length.
    let (_, data) = f.run(L0, &mode_sense10(0, 0x3f, 0, 8), 4096);
    assert_eq!(be16(&data), 58);
}

// ---------------------------------------------------------------------------
// REPORT LUNS
// ---------------------------------------------------------------------------

fn lun_entry(n: u8) -> [u8; 8] {
    [0, n, 0, 0, 0, 0, 0, 0]
}

const WLUN_ENTRY: [u8; 8] = [0xc1, 0x01, 0, 0, 0, 0, 0, 0];

fn report_luns_data(entries: &[[u8; 8]]) -> Vec<u8> {
    let mut out = ((entries.len() * 8) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&[0; 4]);
    for e in entries {
        out.extend_from_slice(e);
    }
    out
}

#[test]
fn report_luns_select_reports() {
    let f = Fixture::new();
    let ordinary: Vec<[u8; 8]> = (0..LUN_COUNT as u8).map(lun_entry).collect();
    let (c, data) = f.run(L0, &report_luns(0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, report_luns_data(&ordinary));
    let (c, data) = f.run(L0, &report_luns(1, 4096), 4096);
    assert_good(c);
    assert_eq!(data, report_luns_data(&[WLUN_ENTRY]));
    let (c, data) = f.run(L0, &report_luns(2, 4096), 4096);
    assert_good(c);
    let mut all = ordinary.clone();
    all.push(WLUN_ENTRY);
    assert_eq!(data, report_luns_data(&all));
}

#[test]
fn report_luns_other_select_reports_are_invalid_field() {
    let f = Fixture::new();
    for select in [0x03u8, 0x04, 0x10, 0x11, 0x12, 0x80, 0xff] {
        let (c, data) = f.run(L0, &report_luns(select, 4096), 4096);
        assert_invalid_field(c, 2, None);
        assert!(data.is_empty());
    }
}

#[test]
fn report_luns_allocation_length() {
    let f = Fixture::new();
    for alloc in [0u32, 1, 8, 15] {
        let (c, data) = f.run(L0, &report_luns(0, alloc), 4096);
        assert_invalid_field(c, 6, None);
        assert!(data.is_empty());
    }
    // 16 bytes: the header (with the full list length) and one entry.
    let (c, data) = f.run(L0, &report_luns(0, 16), 4096);
    assert_good(c);
    let mut expected = ((LUN_COUNT * 8) as u32).to_be_bytes().to_vec();
    expected.extend_from_slice(&[0; 4]);
    expected.extend_from_slice(&lun_entry(0));
    assert_eq!(data, expected);
    // The initiator's buffer limits as well.
    let (c, data) = f.run(L0, &report_luns(0, 4096), 10);
    assert_good(c);
    assert_eq!(data.len(), 10);
}

#[test]
fn report_luns_on_absent_lun_and_wlun() {
    let f = Fixture::new();
    let (_, expected) = f.run(L0, &report_luns(2, 4096), 4096);
    for lun in [
        ABSENT,
        LunAddress::Lun(255),
        LunAddress::Lun(0x3fff),
        LunAddress::Unsupported,
        WLUN,
        L3,
    ] {
        let (c, data) = f.run(lun, &report_luns(2, 4096), 4096);
        assert_good(c);
        assert_eq!(data, expected, "{lun:?}");
        let (c, _) = f.run(lun, &report_luns(7, 4096), 4096);
        assert_invalid_field(c, 2, None);
    }
}

#[test]
fn report_luns_flat_space_entries_above_255() {
    let disks: Vec<Disk> = (0..300u16)
        .map(|n| disk(MemImage::new(vec![0; 512], true), n, 512, true))
        .collect();
    let target = Target::new(disks);
    let (c, data) = run(
        &target,
        LunAddress::Lun(299),
        &report_luns(0, 1 << 16),
        1 << 16,
    );
    assert_good(c);
    assert_eq!(be32(&data), 300 * 8);
    assert_eq!(&data[8 + 255 * 8..8 + 256 * 8], &lun_entry(255));
    // 256 and up: flat space addressing (01b), 14-bit LUN.
    assert_eq!(
        &data[8 + 256 * 8..8 + 257 * 8],
        &[0x41, 0x00, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(&data[8 + 299 * 8..], &[0x41, 0x2b, 0, 0, 0, 0, 0, 0]);
}

// ---------------------------------------------------------------------------
// REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS
// ---------------------------------------------------------------------------

/// Every command the target implements: (opcode, service action, CDB
/// length, only with thin provisioning), in the order the all-commands
/// listing gives them (by opcode, then service action).
const ALL_COMMANDS: [(u8, Option<u16>, u16, bool); 35] = [
    (TEST_UNIT_READY, None, 6, false),
    (REQUEST_SENSE, None, 6, false),
    (READ_6, None, 6, false),
    (WRITE_6, None, 6, false),
    (INQUIRY, None, 6, false),
    (MODE_SELECT_6, None, 6, false),
    (MODE_SENSE_6, None, 6, false),
    (START_STOP_UNIT, None, 6, false),
    (PREVENT_ALLOW_MEDIUM_REMOVAL, None, 6, false),
    (READ_CAPACITY_10, None, 10, false),
    (READ_10, None, 10, false),
    (WRITE_10, None, 10, false),
    (WRITE_AND_VERIFY_10, None, 10, false),
    (VERIFY_10, None, 10, false),
    (SYNCHRONIZE_CACHE_10, None, 10, false),
    (WRITE_SAME_10, None, 10, false),
    (UNMAP, None, 10, true),
    (MODE_SELECT_10, None, 10, false),
    (MODE_SENSE_10, None, 10, false),
    (READ_16, None, 16, false),
    (COMPARE_AND_WRITE, None, 16, false),
    (WRITE_16, None, 16, false),
    (WRITE_AND_VERIFY_16, None, 16, false),
    (VERIFY_16, None, 16, false),
    (SYNCHRONIZE_CACHE_16, None, 16, false),
    (WRITE_SAME_16, None, 16, false),
    (SERVICE_ACTION_IN_16, Some(0x10), 16, false),
    (SERVICE_ACTION_IN_16, Some(0x12), 16, true),
    (REPORT_LUNS, None, 12, false),
    (MAINTENANCE_IN, Some(0x0c), 12, false),
    (MAINTENANCE_IN, Some(0x0d), 12, false),
    (READ_12, None, 12, false),
    (WRITE_12, None, 12, false),
    (WRITE_AND_VERIFY_12, None, 12, false),
    (VERIFY_12, None, 12, false),
];

/// The commands of a logical unit with or without thin provisioning
/// (UNMAP and GET LBA STATUS only with it).
fn supported(thin: bool) -> Vec<(u8, Option<u16>, u16)> {
    ALL_COMMANDS
        .iter()
        .filter(|c| thin || !c.3)
        .map(|&(op, sa, len, _)| (op, sa, len))
        .collect()
}

fn rsoc_listing(commands: &[(u8, Option<u16>, u16)], rctd: bool) -> Vec<u8> {
    let descriptor = if rctd { 20 } else { 8 };
    let mut expected = ((commands.len() * descriptor) as u32)
        .to_be_bytes()
        .to_vec();
    for &(op, sa, len) in commands {
        expected.extend_from_slice(&[op, 0]);
        expected.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
        // CTDP with RCTD; SERVACTV.
        let ctdp = if rctd { 0x02 } else { 0 };
        expected.extend_from_slice(&[0, ctdp | u8::from(sa.is_some())]);
        expected.extend_from_slice(&len.to_be_bytes());
        if rctd {
            expected.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
        }
    }
    expected
}

const TIMEOUTS_DESCRIPTOR: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[test]
fn rsoc_all_commands() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &rsoc(0, 0, 0, 4096), 4096);
    assert_good(c);
    let expected = rsoc_listing(&supported(false), false);
    assert_eq!(data, expected);
    // The requested opcode and service action are ignored.
    let (c, data) = f.run(L0, &rsoc(0, 0x28, 7, 4096), 4096);
    assert_good(c);
    assert_eq!(data, expected);
    // A writable disk without thin provisioning lists the same.
    let (c, data) = f.run(L5, &rsoc(0, 0, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, expected);
    // With it, UNMAP and GET LBA STATUS too.
    let rig = Rig::writable(0);
    let (c, data) = rig.run(&rsoc(0, 0, 0, 4096), 4096, &[]);
    assert_good(c);
    assert_eq!(data, rsoc_listing(&supported(true), false));
}

#[test]
fn rsoc_all_commands_with_timeouts() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &rsoc(0x80, 0, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, rsoc_listing(&supported(false), true));
    let rig = Rig::writable(0);
    let (c, data) = rig.run(&rsoc(0x80, 0, 0, 4096), 4096, &[]);
    assert_good(c);
    assert_eq!(data, rsoc_listing(&supported(true), true));
}

#[test]
fn rsoc_one_command_without_service_action() {
    let f = Fixture::new();
    // RDPROTECT and FUA (a FUA read writes cached blocks back first).
    let read10_usage = [READ_10, 0xe8, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04];
    let (c, data) = f.run(L0, &rsoc(0x01, READ_10, 0, 4096), 4096);
    assert_good(c);
    let mut expected = vec![0, 0x03, 0, 10];
    expected.extend_from_slice(&read10_usage);
    assert_eq!(data, expected);
    // With RCTD: CTDP and the timeouts descriptor.
    let (c, data) = f.run(L0, &rsoc(0x81, READ_10, 0, 4096), 4096);
    assert_good(c);
    expected[1] = 0x83;
    expected.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
    assert_eq!(data, expected);
    // Other commands' usage data.
    let cases: [(u8, &[u8]); 4] = [
        (TEST_UNIT_READY, &[TEST_UNIT_READY, 0, 0, 0, 0, 0x04]),
        (INQUIRY, &[INQUIRY, 0x03, 0xff, 0xff, 0xff, 0x04]),
        (
            READ_CAPACITY_10,
            &[
                READ_CAPACITY_10,
                0,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0,
                0x01,
                0x04,
            ],
        ),
        (
            REPORT_LUNS,
            &[
                REPORT_LUNS,
                0,
                0xff,
                0,
                0,
                0,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0x04,
            ],
        ),
    ];
    for (op, usage) in cases {
        let (c, data) = f.run(L0, &rsoc(0x01, op, 0, 4096), 4096);
        assert_good(c);
        assert_eq!(&data[..4], &[0, 0x03, 0, usage.len() as u8]);
        assert_eq!(&data[4..], usage);
    }
    // Not supported: SUPPORT 001b, no usage data. UNMAP only exists with
    // thin provisioning.
    for op in [0x01u8, UNMAP, 0x7f, 0xff] {
        let (c, data) = f.run(L0, &rsoc(0x01, op, 0, 4096), 4096);
        assert_good(c);
        assert_eq!(data, [0, 0x01, 0, 0], "{op:#x}");
    }
    // An opcode with service actions is an invalid field for option 1.
    for op in [SERVICE_ACTION_IN_16, MAINTENANCE_IN] {
        let (c, _) = f.run(L0, &rsoc(0x01, op, 0, 4096), 4096);
        assert_invalid_field(c, 2, Some(2));
    }
}

#[test]
fn rsoc_one_command_with_service_action() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &rsoc(0x02, SERVICE_ACTION_IN_16, 0x10, 4096), 4096);
    assert_good(c);
    let mut expected = vec![0, 0x03, 0, 16, SERVICE_ACTION_IN_16, 0x10];
    expected.extend_from_slice(&[0; 8]);
    expected.extend_from_slice(&[0xff; 4]);
    expected.extend_from_slice(&[0, 0x04]);
    assert_eq!(data, expected);
    let (c, data) = f.run(L0, &rsoc(0x02, MAINTENANCE_IN, 0x0c, 4096), 4096);
    assert_good(c);
    assert_eq!(&data[..4], &[0, 0x03, 0, 12]);
    assert_eq!(
        &data[4..],
        &[
            MAINTENANCE_IN,
            0x0c,
            0x87,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
            0x04
        ]
    );
    let (c, data) = f.run(L0, &rsoc(0x02, MAINTENANCE_IN, 0x0d, 4096), 4096);
    assert_good(c);
    assert_eq!(&data[..6], &[0, 0x03, 0, 12, MAINTENANCE_IN, 0x0d]);
    // Unsupported service actions and opcodes.
    for (op, sa) in [
        (SERVICE_ACTION_IN_16, 0x11u16),
        (SERVICE_ACTION_IN_16, 0x12),
        (MAINTENANCE_IN, 0x0a),
        (0x7f, 0x0001),
    ] {
        let (c, data) = f.run(L0, &rsoc(0x02, op, sa, 4096), 4096);
        assert_good(c);
        assert_eq!(data, [0, 0x01, 0, 0], "{op:#x}/{sa:#x}");
    }
    // A supported opcode without service actions is an invalid field.
    for op in [READ_10, TEST_UNIT_READY, REPORT_LUNS] {
        let (c, _) = f.run(L0, &rsoc(0x02, op, 0, 4096), 4096);
        assert_invalid_field(c, 2, Some(2));
    }
    // UNMAP is one only where this logical unit supports it.
    let (c, data) = f.run(L0, &rsoc(0x02, UNMAP, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, [0, 0x01, 0, 0]);
    let (c, _) = Rig::writable(0).run(&rsoc(0x02, UNMAP, 0, 4096), 4096, &[]);
    assert_invalid_field(c, 2, Some(2));
}

#[test]
fn rsoc_one_command_option_3() {
    let f = Fixture::new();
    // The service action is ignored for opcodes without service actions.
    for sa in [0u16, 7, 0xffff] {
        let (c, data) = f.run(L0, &rsoc(0x03, READ_10, sa, 4096), 4096);
        assert_good(c);
        assert_eq!(&data[..5], &[0, 0x03, 0, 10, READ_10]);
    }
    let (c, data) = f.run(L0, &rsoc(0x03, SERVICE_ACTION_IN_16, 0x10, 4096), 4096);
    assert_good(c);
    assert_eq!(&data[..6], &[0, 0x03, 0, 16, SERVICE_ACTION_IN_16, 0x10]);
    let (c, data) = f.run(L0, &rsoc(0x03, SERVICE_ACTION_IN_16, 0x11, 4096), 4096);
    assert_good(c);
    assert_eq!(data, [0, 0x01, 0, 0]);
    let (c, data) = f.run(L0, &rsoc(0x03, 0x42, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, [0, 0x01, 0, 0]);
    // RCTD.
    let (c, data) = f.run(L0, &rsoc(0x83, MAINTENANCE_IN, 0x0d, 4096), 4096);
    assert_good(c);
    assert_eq!(data[1], 0x83);
    assert_eq!(data.len(), 4 + 12 + 12);
    assert_eq!(&data[16..], &TIMEOUTS_DESCRIPTOR);
}

#[test]
fn rsoc_invalid_reporting_options() {
    let f = Fixture::new();
    for options in 4..8u8 {
        for rctd in [0, 0x80] {
            let (c, data) = f.run(L0, &rsoc(rctd | options, READ_10, 0, 4096), 4096);
            assert_invalid_field(c, 2, Some(2));
            assert!(data.is_empty());
        }
    }
}

#[test]
fn rsoc_truncation() {
    let f = Fixture::new();
    let (_, full) = f.run(L0, &rsoc(0, 0, 0, 4096), 4096);
    for alloc in [0u32, 3, 4, 11, 100] {
        let (c, data) = f.run(L0, &rsoc(0, 0, 0, alloc), 4096);
        assert_good(c);
        assert_eq!(data, full[..alloc as usize]);
    }
}

/// The listing agrees with what the target executes on `lun`: every listed
/// command is recognised, every other operation code is INVALID COMMAND
/// OPERATION CODE (an unlisted service action INVALID FIELD IN CDB). Every
/// CDB bit the usage data marks as not evaluated is indeed ignored.
#[track_caller]
fn check_listing(target: &Target, lun: LunAddress, thin: bool) {
    let commands = supported(thin);
    let (c, data) = run(target, lun, &rsoc(0, 0, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, rsoc_listing(&commands, false));
    for op in 0..=255u8 {
        let listed: Vec<_> = commands.iter().filter(|s| s.0 == op).collect();
        let mut cdb = [0u8; 16];
        cdb[0] = op;
        if let Some((_, Some(sa), _)) = listed.first() {
            cdb[1] = *sa as u8;
        }
        let (c, _) = run(target, lun, &cdb, 4096);
        if listed.is_empty() {
            assert_invalid_opcode(c);
        } else if let Completion::CheckCondition(s) = c {
            assert_ne!(s.to_fixed()[12], 0x20, "{op:#x} listed but not executed");
        }
    }
    // Service actions not listed.
    for &(op, sa, _, _) in ALL_COMMANDS.iter().filter(|c| c.1.is_some()) {
        if !commands.iter().any(|c| c.0 == op && c.1 == sa) {
            let mut cdb = vec![0u8; 16];
            cdb[0] = op;
            cdb[1] = sa.unwrap() as u8;
            let (c, _) = run(target, lun, &cdb, 4096);
            assert_invalid_field(c, 1, Some(4));
        }
    }
    for (op, sa, len) in commands {
        let (c, data) = run(target, lun, &rsoc(0x03, op, sa.unwrap_or(0), 4096), 4096);
        assert_good(c);
        assert_eq!(data[1], 0x03);
        assert_eq!(be16(&data[2..]), len);
        let usage = &data[4..];
        assert_eq!(usage.len(), usize::from(len));
        assert_eq!(usage[0], op);
        // A CDB with every evaluated field zero (but the service action, and
        // for REPORT LUNS a valid allocation length) ...
        let mut base = vec![0u8; usize::from(len)];
        base[0] = op;
        if let Some(sa) = sa {
            base[1] = sa as u8;
        }
        if op == REPORT_LUNS {
            base[9] = 16;
        }
        let reference = run(target, lun, &base, 4096);
        // ... behaves the same with any bit the usage data calls ignored.
        for (i, &mask) in usage.iter().enumerate().skip(1) {
            for bit in 0..8 {
                if mask & (1 << bit) != 0 || (sa.is_some() && i == 1 && bit < 5) {
                    continue;
                }
                let mut cdb = base.clone();
                cdb[i] |= 1 << bit;
                assert_eq!(
                    run(target, lun, &cdb, 4096),
                    reference,
                    "{op:#x}: byte {i} bit {bit} is said to be ignored"
                );
            }
        }
    }
}

#[test]
fn rsoc_listing_matches_the_commands_executed() {
    let f = Fixture::new();
    // Read-only, and writable, without thin provisioning.
    check_listing(&f.target, L0, false);
    check_listing(&f.target, L5, false);
    // Writable with thin provisioning, 512- and 4096-byte blocks.
    check_listing(&Rig::writable(0).target, L0, true);
    let rig = Rig::new(MemImage::new(vec![0; 64 * 4096], false), 4096, true);
    check_listing(&rig.target, L0, true);
    // Writable, thin provisioning not configured.
    let rig = Rig::new(MemImage::new(vec![0; 64 * 512], false), 512, false);
    check_listing(&rig.target, L0, false);
}

#[test]
fn report_supported_task_management_functions() {
    let f = Fixture::new();
    // ATS, ATSS, CTSS, LURS, QTS; QTSS, ITNRS.
    let (c, data) = f.run(L0, &rstmf(false, 4096), 4096);
    assert_good(c);
    assert_eq!(data, [0xdc, 0x03, 0, 0]);
    let (c, data) = f.run(L0, &rstmf(true, 4096), 4096);
    assert_good(c);
    let mut expected = vec![0u8; 16];
    expected[0] = 0xdc;
    expected[1] = 0x03;
    expected[3] = 0x0c;
    assert_eq!(data, expected);
    let (c, data) = f.run(L0, &rstmf(true, 2), 4096);
    assert_good(c);
    assert_eq!(data, [0xdc, 0x03]);
    let (c, data) = f.run(L0, &rstmf(false, 0), 4096);
    assert_good(c);
    assert!(data.is_empty());
}

#[test]
fn maintenance_in_unknown_service_action_is_invalid_field() {
    let f = Fixture::new();
    for sa in [0x00u8, 0x05, 0x0a, 0x0e, 0x1f] {
        let mut cdb = rsoc(0, 0, 0, 4096);
        cdb[1] = sa;
        let (c, _) = f.run(L0, &cdb, 4096);
        assert_invalid_field(c, 1, Some(4));
    }
}

// ---------------------------------------------------------------------------
// START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, unknown opcodes, NACA
// ---------------------------------------------------------------------------

#[test]
fn start_stop_and_prevent_allow_are_good() {
    let f = Fixture::new();
    for byte4 in [0x00u8, 0x01, 0x02, 0x03] {
        let (c, data) = f.run(L0, &[START_STOP_UNIT, 0, 0, 0, byte4, 0], 4096);
        assert_good(c);
        assert!(data.is_empty());
        let (c, data) = f.run(L0, &[PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, byte4, 0], 4096);
        assert_good(c);
        assert!(data.is_empty());
    }
}

#[test]
fn unknown_opcodes_are_invalid_command_operation_code() {
    let f = Fixture::new();
    // REZERO UNIT, FORMAT UNIT, READ BUFFER, UNMAP (no thin provisioning
    // here), SANITIZE, PERSISTENT RESERVE IN, variable length, ORWRITE,
    // WRITE LONG(16), vendor specific...
    for op in [
        0x01u8, 0x04, 0x3c, 0x42, 0x48, 0x5e, 0x7f, 0x8b, 0x9f, 0xc0, 0xff,
    ] {
        let mut cdb = [0u8; 16];
        cdb[0] = op;
        let (c, data) = f.run(L0, &cdb, 4096);
        assert_invalid_opcode(c);
        assert!(data.is_empty());
    }
}

#[test]
fn naca_is_invalid_field() {
    let f = Fixture::new();
    let cdbs: Vec<Vec<u8>> = vec![
        vec![TEST_UNIT_READY, 0, 0, 0, 0, 0],
        inquiry(false, 0, 255),
        block_cdb(READ_6, 0, 1),
        block_cdb(READ_10, 0, 1),
        block_cdb(READ_12, 0, 1),
        block_cdb(READ_16, 0, 1),
        rc16_cdb(32),
        report_luns(0, 4096),
        mode_sense10(0, 0x3f, 0, 4096),
    ];
    for mut cdb in cdbs {
        let control = cdb.len() - 1;
        cdb[control] |= 0x04;
        let (c, data) = f.run(L0, &cdb, 4096);
        assert_invalid_field(c, control as u16, Some(2));
        assert!(data.is_empty());
        // Other control byte bits (vendor specific, obsolete) are ignored.
        cdb[control] = 0xc3;
        let (c, _) = f.run(L0, &cdb, 1 << 20);
        assert_good(c);
    }
}

// ---------------------------------------------------------------------------
// LUNs without a logical unit, the REPORT LUNS well-known LU
// ---------------------------------------------------------------------------

#[test]
fn absent_lun_inquiry_has_qualifier_011b() {
    let target = two_disk_target();
    for lun in [
        LunAddress::Lun(2),
        LunAddress::Lun(7),
        LunAddress::Lun(0x3fff),
        LunAddress::Unsupported,
    ] {
        let (c, data) = run(&target, lun, &inquiry(false, 0, 255), 4096);
        assert_good(c);
        let mut expected = vec![0u8; 36];
        expected[0] = 0x7f;
        expected[2] = 0x06;
        expected[3] = 0x02;
        expected[4] = 31;
        assert_eq!(data, expected, "{lun:?}");
        let (c, data) = run(&target, lun, &inquiry(false, 0, 1), 4096);
        assert_good(c);
        assert_eq!(data, [0x7f]);
    }
}

#[test]
fn absent_lun_request_sense_reports_lun_not_supported() {
    let target = two_disk_target();
    for lun in [LunAddress::Lun(7), LunAddress::Unsupported] {
        let (c, data) = run(&target, lun, &request_sense(0, 252), 4096);
        assert_good(c);
        let mut expected = [0u8; 18];
        expected[0] = 0x70;
        expected[2] = 0x05;
        expected[7] = 10;
        expected[12] = 0x25;
        assert_eq!(data, expected);
    }
}

#[test]
fn absent_lun_other_commands_are_lun_not_supported() {
    let target = two_disk_target();
    let cdbs: Vec<Vec<u8>> = vec![
        vec![TEST_UNIT_READY, 0, 0, 0, 0, 0],
        block_cdb(READ_10, 0, 1),
        block_cdb(READ_16, 0, 1),
        block_cdb(WRITE_10, 0, 1),
        rc10_cdb(0, false),
        rc16_cdb(32),
        mode_sense6(0, 0x3f, 0, 255),
        inquiry(true, 0x00, 255),
        rsoc(0, 0, 0, 4096),
        rstmf(false, 4096),
        vec![START_STOP_UNIT, 0, 0, 0, 1, 0],
        block_cdb(SYNCHRONIZE_CACHE_10, 0, 0),
        // Invalid CDBs: the missing LU is reported first.
        vec![0xff; 16],
        vec![0x42; 10],
        inquiry(false, 0x80, 255),
        vec![TEST_UNIT_READY, 0, 0, 0, 0, 0x04],
        {
            let mut c = block_cdb(READ_10, 0, 1);
            c[1] = 0xe0;
            c
        },
    ];
    for lun in [LunAddress::Lun(7), LunAddress::Unsupported] {
        for cdb in &cdbs {
            let (c, data) = run(&target, lun, cdb, 4096);
            assert_lun_not_supported(c);
            assert!(data.is_empty(), "{cdb:02x?}");
        }
    }
}

#[test]
fn well_known_lun() {
    let f = Fixture::new();
    let (c, data) = f.run(WLUN, &inquiry(false, 0, 255), 4096);
    assert_good(c);
    assert_eq!(data.len(), 74);
    assert_eq!(data[0], 0x1e, "well known logical unit");
    assert_eq!(&data[2..5], &[0x06, 0x02, 69]);
    let (c, data) = f.run(WLUN, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], 4096);
    assert_good(c);
    assert!(data.is_empty());
    let (c, data) = f.run(WLUN, &request_sense(0, 252), 4096);
    assert_good(c);
    assert_eq!(&data[..3], &[0x70, 0, 0]);
    assert_eq!(data.len(), 18);
    let (c, data) = f.run(WLUN, &request_sense(1, 252), 4096);
    assert_good(c);
    assert_eq!(data, [0x72, 0, 0, 0, 0, 0, 0, 0]);
    // Only INQUIRY, REPORT LUNS, REQUEST SENSE and TEST UNIT READY.
    for cdb in [
        block_cdb(READ_10, 0, 1),
        block_cdb(READ_16, 0, 1),
        rc10_cdb(0, false),
        mode_sense6(0, 0x3f, 0, 255),
        rsoc(0, 0, 0, 4096),
        vec![0xff; 16],
    ] {
        let (c, data) = f.run(WLUN, &cdb, 4096);
        assert_invalid_opcode(c);
        assert!(data.is_empty());
    }
    // CDB errors are reported as such.
    let (c, _) = f.run(WLUN, &inquiry(false, 0x80, 255), 4096);
    assert_invalid_field(c, 2, None);
    // INQUIRY with EVPD: see well_known_lun_vpd_pages.
    let (c, _) = f.run(WLUN, &[TEST_UNIT_READY, 0, 0, 0, 0, 0x04], 4096);
    assert_invalid_field(c, 5, Some(2));
}

// ---------------------------------------------------------------------------
// Several LUNs, 4096-byte blocks, disk construction
// ---------------------------------------------------------------------------

#[test]
fn each_lun_reads_its_own_data() {
    let f = Fixture::new();
    let mut seen = Vec::new();
    for (n, bs) in [
        (0u16, 512usize),
        (1, 512),
        (2, 4096),
        (3, 512),
        (4, 512),
        (5, 512),
    ] {
        let (c, data) = f.run(LunAddress::Lun(n), &block_cdb(READ_10, 0, 4), 1 << 20);
        assert_good(c);
        assert_eq!(data, f.blocks(usize::from(n), bs, 0, 4), "LUN {n}");
        seen.push(data[..512].to_vec());
    }
    for (i, a) in seen.iter().enumerate() {
        for b in &seen[i + 1..] {
            assert_ne!(a, b);
        }
    }
    // Also through the two-disk target's own data.
    let target = two_disk_target();
    let (_, a) = run(&target, L0, &block_cdb(READ_10, 0, 64), 1 << 20);
    let (_, b) = run(&target, L1, &block_cdb(READ_10, 0, 64), 1 << 20);
    assert_eq!(a, pattern(10, 64 * 512));
    assert_eq!(b, pattern(11, 64 * 512));
}

#[test]
fn disk_with_4096_byte_blocks() {
    let f = Fixture::new();
    for op in [READ_6, READ_10, READ_12, READ_16] {
        let (c, data) = f.run(L2, &block_cdb(op, 3, 2), 1 << 20);
        assert_good(c);
        assert_eq!(data, f.blocks(2, 4096, 3, 2));
        let (c, data) = f.run(L2, &block_cdb(op, 0, L2_BLOCKS as u32), 1 << 20);
        assert_good(c);
        assert_eq!(data, f.contents[2]);
        let (c, _) = f.run(L2, &block_cdb(op, L2_BLOCKS - 1, 2), 1 << 20);
        assert_lba_out_of_range(c);
        // One 4096-byte block does not fit in 4095 bytes.
        let (c, _) = f.run(L2, &block_cdb(op, 0, 1), 4095);
        assert_eq!(c, Completion::BufferTooSmall);
    }
    let (c, data) = f.run(L2, &rc16_cdb(32), 4096);
    assert_good(c);
    assert_eq!(data[13], 0, "one logical block per physical block");
}

#[test]
fn disk_construction_errors() {
    let config = |block_size| DiskConfig {
        block_size,
        identity: identity(0),
        solid_state: false,
        discard: false,
    };
    let d = Disk::new(Box::new(MemImage::new(Vec::new(), true)), config(512));
    assert_eq!(d.err(), Some(DiskError::Empty));
    let d = Disk::new(Box::new(MemImage::new(vec![0; 1000], true)), config(512));
    assert_eq!(
        d.err(),
        Some(DiskError::NotBlockMultiple {
            size: 1000,
            block_size: 512
        })
    );
    let d = Disk::new(Box::new(MemImage::new(vec![0; 4096], true)), config(1024));
    assert_eq!(d.err(), Some(DiskError::BadBlockSize(1024)));
    let d = Disk::new(Box::new(MemImage::new(vec![0; 512], true)), config(4096));
    assert!(d.is_err());
    let d = Disk::new(
        Box::new(MemImage::sparse(vec![], 1 << 40, true)),
        config(4096),
    )
    .unwrap();
    assert_eq!(d.blocks(), 1 << 28);
}

// ---------------------------------------------------------------------------
// WRITE on writable disks (SBC-3 §5.32-§5.36, §5.39-§5.41)
// ---------------------------------------------------------------------------

#[test]
fn writes_land_in_the_image() {
    let rig = Rig::writable(20);
    let mut model = rig.data();
    let mut seed = 100;
    for op in WRITES {
        for (lba, len) in [(0u64, 1u32), (7, 3), (RIG_BLOCKS - 2, 2), (100, 200)] {
            let payload = pattern(seed, len as usize * 512);
            seed += 1;
            let (c, data) = rig.run(&block_cdb(op, lba, len), 4096, &payload);
            assert_good(c);
            assert!(data.is_empty());
            let at = lba as usize * 512;
            model[at..at + payload.len()].copy_from_slice(&payload);
            assert_eq!(rig.read(lba, len), payload, "{op:#x} lba {lba}");
            assert_eq!(rig.data(), model, "{op:#x} lba {lba}");
        }
    }
    // WRITE(6) with transfer length 0 writes 256 blocks.
    let payload = pattern(seed, 256 * 512);
    let (c, _) = rig.run(&[WRITE_6, 0, 0, 10, 0, 0], 0, &payload);
    assert_good(c);
    model[10 * 512..266 * 512].copy_from_slice(&payload);
    assert_eq!(rig.data(), model);
    // Data-out beyond the transfer length is not written.
    let mut long = pattern(seed + 1, 3 * 512);
    let (c, _) = rig.run(&block_cdb(WRITE_10, 300, 2), 0, &long);
    assert_good(c);
    long.truncate(2 * 512);
    model[300 * 512..302 * 512].copy_from_slice(&long);
    assert_eq!(rig.data(), model);
    // 4096-byte blocks.
    let rig = Rig::new(MemImage::new(vec![0; 16 * 4096], false), 4096, false);
    for (i, op) in WRITES.into_iter().enumerate() {
        let payload = pattern(i as u64, 2 * 4096);
        let (c, _) = rig.run(&block_cdb(op, 3 + i as u64, 2), 0, &payload);
        assert_good(c);
        assert_eq!(rig.stored(3 + i as u64, 2), payload, "{op:#x}");
        assert_eq!(rig.read(3 + i as u64, 2), payload);
    }
}

#[test]
fn write_fua_is_durable_at_completion() {
    let rig = Rig::writable(21);
    let payload = pattern(1, 4 * 512);
    let write = |durable| Op::Write {
        offset: 8 * 512,
        len: 4 * 512,
        durable,
    };
    rig.ops();
    for op in [WRITE_10, WRITE_12, WRITE_16] {
        // Write cache on: completion means "in the cache".
        let (c, _) = rig.run(&block_cdb(op, 8, 4), 0, &payload);
        assert_good(c);
        assert_eq!(rig.ops(), [write(false)], "{op:#x}");
        // FUA: durable when it completes, and no flush of anything else.
        let (c, _) = rig.run(&fua(block_cdb(op, 8, 4)), 0, &payload);
        assert_good(c);
        assert_eq!(rig.ops(), [write(true)], "{op:#x}");
        // DPO and FUA_NV change nothing.
        let mut cdb = block_cdb(op, 8, 4);
        cdb[1] = 0x10 | 0x02;
        let (c, _) = rig.run(&cdb, 0, &payload);
        assert_good(c);
        assert_eq!(rig.ops(), [write(false)], "{op:#x}");
    }
    // WRITE(6) has no FUA bit.
    let (c, _) = rig.run(&block_cdb(WRITE_6, 8, 4), 0, &payload);
    assert_good(c);
    assert_eq!(rig.ops(), [write(false)]);
    // WRITE AND VERIFY: the data is on the medium, then read back.
    for op in [
        WRITE_AND_VERIFY_10,
        WRITE_AND_VERIFY_12,
        WRITE_AND_VERIFY_16,
    ] {
        let (c, _) = rig.run(&block_cdb(op, 8, 4), 0, &payload);
        assert_good(c);
        assert_eq!(
            rig.ops(),
            [
                write(true),
                Op::Read {
                    offset: 8 * 512,
                    len: 4 * 512
                }
            ],
            "{op:#x}"
        );
    }
    assert_eq!(rig.stored(8, 4), payload);
}

#[test]
fn write_and_verify_reports_a_failed_read_back() {
    let image = MemImage::new(pattern(22, 64 * 512), false).with_read_error(10 * 512..11 * 512);
    let rig = Rig::new(image, 512, false);
    let payload = pattern(23, 4 * 512);
    for op in [
        WRITE_AND_VERIFY_10,
        WRITE_AND_VERIFY_12,
        WRITE_AND_VERIFY_16,
    ] {
        let (c, _) = rig.run(&block_cdb(op, 8, 4), 0, &payload);
        assert_medium_error(c);
        let (c, _) = rig.run(&block_cdb(op, 12, 4), 0, &payload);
        assert_good(c);
    }
}

#[test]
fn write_transfer_length_zero_writes_nothing() {
    let rig = Rig::writable(24);
    let before = rig.data();
    rig.ops();
    for op in WRITES.into_iter().filter(|&op| op != WRITE_6) {
        for lba in [0, RIG_BLOCKS - 1, RIG_BLOCKS] {
            let (c, _) = rig.run(&block_cdb(op, lba, 0), 0, &[1, 2, 3]);
            assert_good(c);
            let (c, _) = rig.run(&fua(block_cdb(op, lba, 0)), 0, &[]);
            assert_good(c);
        }
        // Even a zero-length transfer must start on the medium.
        let (c, _) = rig.run(&block_cdb(op, RIG_BLOCKS + 1, 0), 0, &[]);
        assert_lba_out_of_range(c);
    }
    assert_eq!(rig.ops(), []);
    assert_eq!(rig.data(), before);
}

#[test]
fn write_out_of_range_on_a_writable_disk_writes_nothing() {
    let rig = Rig::writable(25);
    let before = rig.data();
    rig.ops();
    let payload = vec![0xee; 4 * 512];
    for op in WRITES {
        for (lba, len) in [(RIG_BLOCKS, 1u32), (RIG_BLOCKS - 1, 2), (RIG_BLOCKS - 3, 4)] {
            let (c, _) = rig.run(&block_cdb(op, lba, len), 0, &payload);
            assert_lba_out_of_range(c);
        }
        if op >> 5 == 4 {
            for (lba, len) in [(u64::MAX, 1u32), (u64::MAX - 1, 4), (1 << 63, 1)] {
                let (c, _) = rig.run(&block_cdb(op, lba, len), 0, &payload);
                assert_lba_out_of_range(c);
            }
        }
    }
    let (c, _) = rig.run(&block_cdb(WRITE_6, 0x1f_ffff, 1), 0, &payload);
    assert_lba_out_of_range(c);
    // WRITE(6) length 0 (256 blocks) from the last 255.
    let lba = RIG_BLOCKS - 255;
    let cdb = [WRITE_6, 0, (lba >> 8) as u8, lba as u8, 0, 0];
    let (c, _) = rig.run(&cdb, 0, &vec![0; 256 * 512]);
    assert_lba_out_of_range(c);
    assert_eq!(rig.ops(), []);
    assert_eq!(rig.data(), before);
}

#[test]
fn write_longer_than_the_maximum_transfer_is_invalid_field() {
    let rig = Rig::writable(26);
    rig.ops();
    // 512-byte blocks: at most 65536; WRITE(10) cannot ask for more.
    for op in [WRITE_12, WRITE_16, WRITE_AND_VERIFY_12, WRITE_AND_VERIFY_16] {
        for len in [65537, u32::MAX] {
            let (c, _) = rig.run(&block_cdb(op, 0, len), 0, &[]);
            assert_invalid_field(c, length_byte(op), None);
        }
        // The length is checked before the LBA.
        let (c, _) = rig.run(&block_cdb(op, RIG_BLOCKS, 65537), 0, &[]);
        assert_invalid_field(c, length_byte(op), None);
    }
    // 4096-byte blocks: at most 8192, reachable with the 10-byte CDBs too.
    let rig4k = Rig::new(MemImage::new(vec![0; 16 * 4096], false), 4096, true);
    for op in WRITES.into_iter().filter(|&op| op != WRITE_6) {
        let (c, _) = rig4k.run(&block_cdb(op, 0, 8193), 0, &[]);
        assert_invalid_field(c, length_byte(op), None);
        let (c, _) = rig4k.run(&block_cdb(op, 0, 8192), 0, &[]);
        assert_lba_out_of_range(c);
    }
    assert_eq!(rig.ops(), []);
    assert_eq!(rig4k.ops(), []);
    // The maximum itself, 32 MiB in one command.
    let big = Rig::new(MemImage::new(vec![0; 32 << 20], false), 512, false);
    let payload = pattern(27, 32 << 20);
    let (c, _) = big.run(&fua(block_cdb(WRITE_16, 0, 65536)), 0, &payload);
    assert_good(c);
    assert!(big.data() == payload);
}

#[test]
fn write_with_short_data_out_is_not_executed() {
    let rig = Rig::writable(28);
    let before = rig.data();
    rig.ops();
    for op in WRITES {
        for short in [0usize, 1, 511, 4 * 512 - 1] {
            let out = vec![0xaa; short];
            let (c, data) = rig.run(&block_cdb(op, 4, 4), 4096, &out);
            assert_eq!(c, Completion::BufferTooSmall, "{op:#x} from {short}");
            assert!(data.is_empty());
            if op != WRITE_6 {
                let (c, _) = rig.run(&fua(block_cdb(op, 4, 4)), 4096, &out);
                assert_eq!(c, Completion::BufferTooSmall);
            }
        }
    }
    // WRITE(6) with length 0 needs 256 blocks.
    let (c, _) = rig.run(&[WRITE_6, 0, 0, 0, 0, 0], 0, &vec![0; 255 * 512]);
    assert_eq!(c, Completion::BufferTooSmall);
    assert_eq!(rig.ops(), []);
    assert_eq!(rig.data(), before);
    // Range errors are reported before the buffer size matters.
    let (c, _) = rig.run(&block_cdb(WRITE_10, RIG_BLOCKS, 1), 0, &[]);
    assert_lba_out_of_range(c);
}

#[test]
fn write_on_a_read_only_unit_changes_nothing() {
    let image = pattern(29, 64 * 512);
    let rig = Rig::new(MemImage::new(image.clone(), true), 512, true);
    rig.ops();
    let payload = vec![0x11; 2 * 512];
    for op in WRITES {
        let (c, _) = rig.run(&block_cdb(op, 1, 2), 0, &payload);
        assert_write_protected(c);
        if op != WRITE_6 {
            let (c, _) = rig.run(&fua(block_cdb(op, 1, 2)), 0, &payload);
            assert_write_protected(c);
        }
    }
    assert_eq!(rig.ops(), []);
    assert_eq!(rig.data(), image);
    // The device-specific parameter says so.
    let (c, data) = rig.run(&mode_sense6(0x08, 0x08, 0, 255), 255, &[]);
    assert_good(c);
    assert_eq!(data[2], WP | DPOFUA);
}

#[test]
fn write_into_the_unallocated_tail_finds_no_space() {
    // 64 KiB (128 blocks) stored of 1 MiB.
    let sparse = || {
        Rig::new(
            MemImage::sparse(pattern(30, 64 << 10), 1 << 20, false),
            512,
            false,
        )
    };
    let payload = vec![0x77; 8 * 512];
    for op in WRITES {
        // In the tail, and straddling the end of the stored bytes.
        for lba in [200u64, 124, 2040] {
            let rig = sparse();
            let before = rig.data();
            let (c, _) = rig.run(&block_cdb(op, lba, 8), 0, &payload);
            assert_space_allocation_failed(c);
            assert_eq!(rig.data(), before);
            // A durable write's failure is sticky whatever its errno (its
            // sync may have reported an earlier write-back error): WRITE
            // AND VERIFY writes to the medium, so later flushes fail; a
            // cached write's failure leaves them alone.
            let (c, _) = rig.run(&block_cdb(SYNCHRONIZE_CACHE_10, 0, 0), 0, &[]);
            if WRITES[4..].contains(&op) {
                assert_write_error(c);
            } else {
                assert_good(c);
            }
        }
    }
    let rig = sparse();
    // The stored part takes writes; the tail still reads as zeroes.
    let (c, _) = rig.run(&block_cdb(WRITE_10, 120, 8), 0, &payload);
    assert_good(c);
    assert_eq!(rig.stored(120, 8), payload);
    assert_eq!(rig.read(128, 8), vec![0; 8 * 512]);
}

// ---------------------------------------------------------------------------
// Write-back cache: SYNCHRONIZE CACHE, FUA, failed flushes (SBC-3 §4.15)
// ---------------------------------------------------------------------------

#[test]
fn synchronize_cache_flushes() {
    let rig = Rig::writable(31);
    rig.ops();
    for op in SYNCS {
        for (lba, blocks) in [(0u64, 0u32), (10, 5), (RIG_BLOCKS - 1, 1)] {
            let (c, _) = rig.run(&block_cdb(op, lba, blocks), 0, &[]);
            assert_good(c);
            assert_eq!(rig.ops(), [Op::Flush]);
        }
        // IMMED is accepted; the flush still happens before completion.
        let mut cdb = block_cdb(op, 0, 0);
        cdb[1] = 0x02;
        let (c, _) = rig.run(&cdb, 0, &[]);
        assert_good(c);
        assert_eq!(rig.ops(), [Op::Flush]);
        // A range off the medium flushes nothing.
        let (c, _) = rig.run(&block_cdb(op, RIG_BLOCKS, 1), 0, &[]);
        assert_lba_out_of_range(c);
        assert_eq!(rig.ops(), []);
    }
}

/// A failed flush is reported, and every later flush and durable write
/// fails too, even once the storage would flush again: the kernel reports a
/// write-back error only once, so data that may be lost must never be
/// reported as flushed. Cached writes and reads keep working.
#[test]
fn a_failed_flush_is_never_forgotten() {
    let rig = Rig::writable(32);
    let payload = pattern(33, 2 * 512);
    let (c, _) = rig.run(&block_cdb(WRITE_10, 4, 2), 0, &payload);
    assert_good(c);
    rig.fail_next_flushes(1);
    let (c, _) = rig.run(&block_cdb(SYNCHRONIZE_CACHE_10, 0, 0), 0, &[]);
    assert_write_error(c);
    // The storage would flush fine now.
    for _ in 0..3 {
        for op in SYNCS {
            let (c, _) = rig.run(&block_cdb(op, 0, 0), 0, &[]);
            assert_write_error(c);
        }
    }
    rig.ops();
    // Durable writes fail, before anything is written.
    for op in [WRITE_10, WRITE_12, WRITE_16] {
        let (c, _) = rig.run(&fua(block_cdb(op, 20, 2)), 0, &payload);
        assert_write_error(c);
    }
    for op in [
        WRITE_AND_VERIFY_10,
        WRITE_AND_VERIFY_12,
        WRITE_AND_VERIFY_16,
    ] {
        let (c, _) = rig.run(&block_cdb(op, 20, 2), 0, &payload);
        assert_write_error(c);
    }
    let mut cw = rig.stored(20, 2);
    cw.extend_from_slice(&payload);
    let (c, _) = rig.run(&compare_and_write(0x08, 20, 2), 0, &cw);
    assert_write_error(c);
    assert!(!rig.ops().iter().any(|op| matches!(op, Op::Write { .. })));
    // So do the commands that must reach the medium: a FUA read, VERIFY.
    let (c, data) = rig.run(&fua(block_cdb(READ_10, 4, 2)), 4096, &[]);
    assert_write_error(c);
    assert!(data.is_empty());
    for op in VERIFIES {
        let (c, _) = rig.run(&block_cdb(op, 4, 2), 0, &[]);
        assert_write_error(c);
        // Nothing to verify: nothing to flush.
        let (c, _) = rig.run(&block_cdb(op, 4, 0), 0, &[]);
        assert_good(c);
    }
    // Turning the write cache off needs a flush: refused, WCE stays on.
    let params = mode_select6_list(&[], &caching_page(false));
    let (c, _) = rig.run(&mode_select6(PF, params.len() as u8), 0, &params);
    assert_write_error(c);
    assert!(rig.wce(0));
    // Cached writes, reads and COMPARE AND WRITE without FUA still work.
    let (c, _) = rig.run(&block_cdb(WRITE_16, 40, 2), 0, &payload);
    assert_good(c);
    assert_eq!(rig.read(40, 2), payload);
    assert_eq!(rig.read(4, 2), payload);
    let (c, _) = rig.run(&compare_and_write(0, 20, 2), 0, &cw);
    assert_good(c);
    assert_eq!(rig.stored(20, 2), payload);
}

/// The same with the in-memory image's own failure switch, and with the
/// write cache off, where every write is durable.
#[test]
fn mem_image_flush_failure_with_the_write_cache_off() {
    let rig = Rig::writable(34);
    let payload = pattern(35, 512);
    rig.set_write_cache(false);
    let (c, _) = rig.run(&block_cdb(WRITE_10, 1, 1), 0, &payload);
    assert_good(c);
    rig.image.fail_flushes();
    // A plain write cannot be made durable.
    let (c, _) = rig.run(&block_cdb(WRITE_10, 2, 1), 0, &payload);
    assert_write_error(c);
    let (c, _) = rig.run(&block_cdb(SYNCHRONIZE_CACHE_16, 0, 0), 0, &[]);
    assert_write_error(c);
    // Write cache back on (no flush needed): cached writes work, flushes
    // and FUA writes still fail.
    rig.set_write_cache(true);
    let (c, _) = rig.run(&block_cdb(WRITE_10, 3, 1), 0, &payload);
    assert_good(c);
    assert_eq!(rig.read(3, 1), payload);
    let (c, _) = rig.run(&fua(block_cdb(WRITE_10, 4, 1)), 0, &payload);
    assert_write_error(c);
    let (c, _) = rig.run(&block_cdb(SYNCHRONIZE_CACHE_10, 0, 0), 0, &[]);
    assert_write_error(c);
    // Reads work.
    assert_eq!(rig.read(1, 1), payload);
}

/// A durable write whose sync fails poisons later flushes: that sync may
/// have consumed a write-back error of earlier cached writes.
#[test]
fn a_failed_durable_write_poisons_later_flushes() {
    let rig = Rig::writable(36);
    let payload = pattern(37, 512);
    let (c, _) = rig.run(&block_cdb(WRITE_10, 1, 1), 0, &payload);
    assert_good(c);
    rig.fail_next_flushes(1);
    let (c, _) = rig.run(&fua(block_cdb(WRITE_10, 2, 1)), 0, &payload);
    assert_write_error(c);
    let (c, _) = rig.run(&block_cdb(SYNCHRONIZE_CACHE_10, 0, 0), 0, &[]);
    assert_write_error(c);
    let (c, _) = rig.run(&fua(block_cdb(WRITE_10, 2, 1)), 0, &payload);
    assert_write_error(c);
}

/// Whatever the errno of a durable write's failure, later flushes fail:
/// a sync reports an earlier write-back error once, with the errno of its
/// cause (ENOSPC or EDQUOT from thin storage, NFS or btrfs).
#[test]
fn a_durable_write_failing_with_any_errno_poisons_later_flushes() {
    for (errno, write_cache) in [
        (libc::ENOSPC, true),
        (libc::EDQUOT, true),
        (libc::ENOSPC, false),
        (libc::EROFS, true),
    ] {
        let what = format!("errno {errno}, WCE={write_cache}");
        let rig = Rig::writable(39);
        let payload = pattern(40, 512);
        rig.set_write_cache(write_cache);
        let (c, _) = rig.run(&block_cdb(WRITE_10, 1, 1), 0, &payload);
        assert_good(c);
        rig.fail_next_flushes_with(1, errno);
        // FUA, or any write with the write cache off: durable.
        let (c, _) = rig.run(&fua(block_cdb(WRITE_10, 2, 1)), 0, &payload);
        if matches!(errno, libc::ENOSPC | libc::EDQUOT) {
            assert_space_allocation_failed(c);
        } else {
            assert_write_error(c);
        }
        // The storage would flush fine now; the unit must not say so.
        for op in [SYNCHRONIZE_CACHE_10, SYNCHRONIZE_CACHE_16] {
            let (c, _) = rig.run(&block_cdb(op, 0, 0), 0, &[]);
            assert_write_error(c);
        }
        let (c, _) = rig.run(&fua(block_cdb(WRITE_10, 3, 1)), 0, &payload);
        assert_write_error(c);
        eprintln!("{what}: later flushes fail");
    }
}

#[test]
fn read_with_fua_writes_the_cache_back_first() {
    let rig = Rig::writable(38);
    rig.ops();
    let read = Op::Read {
        offset: 4 * 512,
        len: 2 * 512,
    };
    for op in READS {
        let (c, data) = rig.run(&fua(block_cdb(op, 4, 2)), 4096, &[]);
        assert_good(c);
        assert_eq!(data, rig.stored(4, 2));
        assert_eq!(rig.ops(), [Op::Flush, read], "{op:#x}");
        let (c, _) = rig.run(&block_cdb(op, 4, 2), 4096, &[]);
        assert_good(c);
        assert_eq!(rig.ops(), [read]);
        let (c, _) = rig.run(&fua(block_cdb(op, 4, 0)), 4096, &[]);
        assert_good(c);
        assert_eq!(rig.ops(), []);
    }
    // With the write cache off nothing is cached.
    rig.set_write_cache(false);
    rig.ops();
    let (c, _) = rig.run(&fua(block_cdb(READ_16, 4, 2)), 4096, &[]);
    assert_good(c);
    assert_eq!(rig.ops(), [read]);
    // Nor on a read-only unit.
    let ro = Rig::new(MemImage::new(vec![3; 64 * 512], true), 512, false);
    ro.ops();
    let (c, _) = ro.run(&fua(block_cdb(READ_10, 4, 2)), 4096, &[]);
    assert_good(c);
    assert_eq!(ro.ops(), [read]);
}

#[test]
fn verify_writes_the_cache_back_first() {
    let rig = Rig::writable(39);
    rig.ops();
    for op in VERIFIES {
        let (c, _) = rig.run(&block_cdb(op, 4, 2), 0, &[]);
        assert_good(c);
        assert_eq!(
            rig.ops(),
            [
                Op::Flush,
                Op::Read {
                    offset: 4 * 512,
                    len: 2 * 512
                }
            ]
        );
        let (c, _) = rig.run(&block_cdb(op, 4, 0), 0, &[]);
        assert_good(c);
        assert_eq!(rig.ops(), []);
    }
    rig.set_write_cache(false);
    rig.ops();
    let (c, _) = rig.run(&block_cdb(VERIFY_10, 4, 2), 0, &[]);
    assert_good(c);
    assert_eq!(
        rig.ops().first(),
        Some(&Op::Read {
            offset: 2048,
            len: 1024
        })
    );
}

// ---------------------------------------------------------------------------
// MODE SELECT (SPC-4 §6.9, §6.10): WCE and D_SENSE
// ---------------------------------------------------------------------------

#[test]
fn mode_select_turns_the_write_cache_off_and_on() {
    let rig = Rig::writable(40);
    // Current, changeable, default: WCE on, changeable, on.
    assert!(rig.wce(0) && rig.wce(1) && rig.wce(2));
    let payload = pattern(41, 512);
    let (c, _) = rig.run(&block_cdb(WRITE_10, 1, 1), 0, &payload);
    assert_good(c);
    rig.ops();
    // As Linux does it: MODE SENSE the current caching page, clear WCE,
    // MODE SELECT it back.
    let (c, sensed) = rig.run(&mode_sense6(0x08, 0x08, 0, 255), 255, &[]);
    assert_good(c);
    let mut page = sensed[4..].to_vec();
    assert_eq!(page, caching_page(true));
    page[2] &= !0x04;
    let params = mode_select6_list(&[], &page);
    let (c, data) = rig.run(&mode_select6(PF, params.len() as u8), 255, &params);
    assert_good(c);
    assert!(data.is_empty());
    // What the cache held was flushed first.
    assert_eq!(rig.ops(), [Op::Flush]);
    // Current values show it; default values still say WCE=1.
    assert!(!rig.wce(0) && rig.wce(1) && rig.wce(2));
    let (c, data) = rig.run(&mode_sense10(0, 0x3f, 0, 4096), 4096, &[]);
    assert_good(c);
    let mut pages = RW_ERROR_RECOVERY_PAGE.to_vec();
    pages.extend_from_slice(&caching_page(false));
    pages.extend_from_slice(&control_page(false));
    let desc = short_descriptor(RIG_BLOCKS as u32, 512);
    assert_eq!(data, mode10(DPOFUA, false, &desc, &pages));
    let (c, data) = rig.run(&mode_sense10(0, 0x80 | 0x3f, 0, 4096), 4096, &[]);
    assert_good(c);
    assert_eq!(data, mode10(DPOFUA, false, &desc, &all_pages()));
    // Every write is durable at completion now; WRITE SAME and UNMAP flush
    // before completing.
    let (c, _) = rig.run(&block_cdb(WRITE_10, 2, 1), 0, &payload);
    assert_good(c);
    assert_eq!(
        rig.ops(),
        [Op::Write {
            offset: 1024,
            len: 512,
            durable: true
        }]
    );
    let (c, _) = rig.run(&write_same(WRITE_SAME_10, 0, 4, 2), 0, &payload);
    assert_good(c);
    assert_eq!(
        rig.ops(),
        [
            Op::Write {
                offset: 2048,
                len: 1024,
                durable: false
            },
            Op::Flush
        ]
    );
    let list = unmap_list(&[(8, 2)]);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_good(c);
    assert_eq!(
        rig.ops(),
        [
            Op::Zeroes {
                offset: 4096,
                len: 1024,
                deallocate: true
            },
            Op::Flush
        ]
    );
    // Back on with MODE SELECT(10): no flush needed, writes are cached.
    let params = mode_select10_list(false, &[], &caching_page(true));
    let (c, _) = rig.run(&mode_select10(PF, params.len() as u16), 0, &params);
    assert_good(c);
    assert!(rig.wce(0));
    assert_eq!(rig.ops(), []);
    let (c, _) = rig.run(&block_cdb(WRITE_10, 2, 1), 0, &payload);
    assert_good(c);
    assert_eq!(
        rig.ops(),
        [Op::Write {
            offset: 1024,
            len: 512,
            durable: false
        }]
    );
}

#[test]
fn mode_select_with_block_descriptors() {
    let rig = Rig::writable(42);
    let short = short_descriptor(RIG_BLOCKS as u32, 512);
    let long = long_descriptor(RIG_BLOCKS, 512);
    // (MODE SELECT(10), parameter list, WCE afterwards)
    let cases = [
        (
            false,
            mode_select6_list(&short, &caching_page(false)),
            false,
        ),
        (
            false,
            mode_select6_list(&short_descriptor(0, 512), &caching_page(true)),
            true,
        ),
        (
            true,
            mode_select10_list(false, &short, &caching_page(false)),
            false,
        ),
        (
            true,
            mode_select10_list(true, &long, &caching_page(true)),
            true,
        ),
        (
            true,
            mode_select10_list(true, &long_descriptor(0, 512), &caching_page(false)),
            false,
        ),
        // Several pages at once; PS (byte 0 bit 7) is ignored.
        (
            false,
            {
                let mut pages = all_pages();
                pages[12] |= 0x80;
                mode_select6_list(&short, &pages)
            },
            true,
        ),
        // A block descriptor alone changes nothing.
        (true, mode_select10_list(false, &short, &[]), true),
    ];
    for (ten, params, wce) in cases {
        let cdb = if ten {
            mode_select10(PF, params.len() as u16)
        } else {
            mode_select6(PF, params.len() as u8)
        };
        let (c, _) = rig.run(&cdb, 0, &params);
        assert_good(c);
        assert_eq!(rig.wce(0), wce, "{params:02x?}");
    }
}

#[test]
fn mode_select_d_sense_switches_to_descriptor_sense() {
    let rig = Rig::writable(43);
    rig.set_descriptor_sense(true);
    // The control page shows it (current), not as default.
    let (c, data) = rig.run(&mode_sense6(0x08, 0x0a, 0, 255), 255, &[]);
    assert_good(c);
    assert_eq!(data[4..], control_page(true));
    let (c, data) = rig.run(&mode_sense6(0x08, 0x80 | 0x0a, 0, 255), 255, &[]);
    assert_good(c);
    assert_eq!(data[4..], control_page(false));
    // INVALID FIELD IN CDB: a sense-key specific descriptor (02h, length
    // 6) with SKSV, C/D=1 and the field pointer.
    let (c, _) = rig.run(&inquiry(false, 0x80, 255), 255, &[]);
    let d = assert_descriptor_sense(c, 0x05, 0x24, 0x00);
    assert_eq!(d, [0x02, 0x06, 0, 0, 0xc0, 0, 2, 0]);
    // With a bit pointer (CMDDT, byte 1 bit 1).
    let (c, _) = rig.run(&[INQUIRY, 0x02, 0, 0, 255, 0], 255, &[]);
    let d = assert_descriptor_sense(c, 0x05, 0x24, 0x00);
    assert_eq!(d, [0x02, 0x06, 0, 0, 0xc9, 0, 1, 0]);
    let (c, _) = rig.run(&write_same(WRITE_SAME_16, 0, 0, 0), 0, &[0; 512]);
    let d = assert_descriptor_sense(c, 0x05, 0x24, 0x00);
    assert_eq!(d, [0x02, 0x06, 0, 0, 0xc0, 0, 10, 0]);
    // No sense-key specific data: no descriptors.
    let (c, _) = rig.run(&block_cdb(READ_10, RIG_BLOCKS, 1), 4096, &[]);
    assert_eq!(assert_descriptor_sense(c, 0x05, 0x21, 0x00), [0u8; 0]);
    let (c, _) = rig.run(&[0xc0, 0, 0, 0, 0, 0], 0, &[]);
    assert_eq!(assert_descriptor_sense(c, 0x05, 0x20, 0x00), [0u8; 0]);
    // INVALID FIELD IN PARAMETER LIST: C/D=0, pointing into the list.
    let mut page = caching_page(true);
    page[2] |= 0x01;
    let params = mode_select6_list(&[], &page);
    let (c, _) = rig.run(&mode_select6(PF, params.len() as u8), 0, &params);
    let d = assert_descriptor_sense(c, 0x05, 0x26, 0x00);
    assert_eq!(d, [0x02, 0x06, 0, 0, 0x88, 0, 6, 0]);
    // MISCOMPARE: an information descriptor (00h, length 0Ah, VALID) with
    // the offset.
    let mut out = rig.stored(3, 1);
    out[300] ^= 1;
    out.extend_from_slice(&[0; 512]);
    let (c, _) = rig.run(&compare_and_write(0, 3, 1), 0, &out);
    let d = assert_descriptor_sense(c, 0x0e, 0x1d, 0x00);
    let mut info = vec![0x00, 0x0a, 0x80, 0];
    info.extend_from_slice(&300u64.to_be_bytes());
    assert_eq!(d, info);
    // REQUEST SENSE follows its DESC bit, not D_SENSE.
    let (c, data) = rig.run(&request_sense(0, 252), 252, &[]);
    assert_good(c);
    assert_eq!(data.len(), 18);
    assert_eq!(data[0], 0x70);
    // A LUN without a logical unit keeps fixed format.
    let (c, _) = run(
        &rig.target,
        LunAddress::Lun(1),
        &block_cdb(READ_10, 0, 1),
        512,
    );
    assert_lun_not_supported(c);
    // Off again: fixed format.
    rig.set_descriptor_sense(false);
    let (c, _) = rig.run(&inquiry(false, 0x80, 255), 255, &[]);
    assert_invalid_field(c, 2, None);
}

#[test]
fn mode_select_of_a_non_changeable_field_is_invalid_field_in_parameter_list() {
    let rig = Rig::writable(44);
    rig.ops();
    // (page, byte in the page, new value, most significant differing bit)
    let cases: [(Vec<u8>, usize, u8, u8); 9] = [
        (caching_page(true), 2, 0x05, 0),              // RCD
        (caching_page(true), 2, 0x84, 7),              // IC
        (caching_page(true), 3, 0x01, 0),              // retention priorities
        (caching_page(true), 12, 0x20, 5),             // FSW/LBCSS/DRA
        (caching_page(false), 19, 0x01, 0),            // reserved
        (control_page(false), 2, 0x00, 1),             // GLTSD
        (control_page(false), 3, 0x00, 4),             // QUEUE ALGORITHM MODIFIER
        (control_page(false), 8, 0x7f, 7),             // BUSY TIMEOUT PERIOD
        (RW_ERROR_RECOVERY_PAGE.to_vec(), 2, 0x40, 7), // AWRE
    ];
    for (page, at, value, bit) in cases {
        let mut page = page;
        page[at] = value;
        let short = short_descriptor(RIG_BLOCKS as u32, 512);
        let long = long_descriptor(RIG_BLOCKS, 512);
        for (ten, params, header) in [
            (false, mode_select6_list(&[], &page), 4),
            (false, mode_select6_list(&short, &page), 12),
            (true, mode_select10_list(false, &[], &page), 8),
            (true, mode_select10_list(true, &long, &page), 24),
        ] {
            let cdb = if ten {
                mode_select10(PF, params.len() as u16)
            } else {
                mode_select6(PF, params.len() as u8)
            };
            let (c, _) = rig.run(&cdb, 0, &params);
            assert_invalid_param(c, (header + at) as u16, Some(bit));
        }
    }
    // Nothing is applied when a later page is invalid.
    let mut pages = caching_page(false);
    let mut control = control_page(true);
    control[2] &= !0x02;
    pages.extend_from_slice(&control);
    let params = mode_select6_list(&[], &pages);
    let (c, _) = rig.run(&mode_select6(PF, params.len() as u8), 0, &params);
    assert_invalid_param(c, 4 + 20 + 2, Some(1));
    assert!(rig.wce(0));
    let (c, _) = rig.run(&inquiry(false, 0x80, 255), 255, &[]);
    assert_invalid_field(c, 2, None);
    assert!(!rig.ops().contains(&Op::Flush));
}

#[test]
fn mode_select_cdb_errors() {
    let rig = Rig::writable(45);
    let params6 = mode_select6_list(&[], &caching_page(false));
    let params10 = mode_select10_list(false, &[], &caching_page(false));
    // PF=0: vendor-specific pages are not supported.
    let (c, _) = rig.run(&mode_select6(0, params6.len() as u8), 0, &params6);
    assert_invalid_field(c, 1, Some(4));
    let (c, _) = rig.run(&mode_select10(0, params10.len() as u16), 0, &params10);
    assert_invalid_field(c, 1, Some(4));
    // SP=1: saving is not supported.
    let (c, _) = rig.run(&mode_select6(PF | SP, params6.len() as u8), 0, &params6);
    assert_invalid_field(c, 1, Some(0));
    let (c, _) = rig.run(&mode_select10(PF | SP, params10.len() as u16), 0, &params10);
    assert_invalid_field(c, 1, Some(0));
    // NACA.
    let mut cdb = mode_select6(PF, params6.len() as u8);
    cdb[5] = 0x04;
    let (c, _) = rig.run(&cdb, 0, &params6);
    assert_invalid_field(c, 5, Some(2));
    let mut cdb = mode_select10(PF, params10.len() as u16);
    cdb[9] = 0x04;
    let (c, _) = rig.run(&cdb, 0, &params10);
    assert_invalid_field(c, 9, Some(2));
    assert!(rig.wce(0));
}

#[test]
fn mode_select_parameter_list_errors() {
    let rig = Rig::writable(46);
    // Length zero: nothing to do.
    let (c, _) = rig.run(&mode_select6(PF, 0), 0, &[]);
    assert_good(c);
    let (c, _) = rig.run(&mode_select10(PF, 0), 0, &[]);
    assert_good(c);
    let params6 = mode_select6_list(&[], &caching_page(false));
    let params10 = mode_select10_list(false, &[], &caching_page(false));
    // Truncated header, page header or page: PARAMETER LIST LENGTH ERROR.
    for len in [1usize, 3, 5, 10, 23] {
        let (c, _) = rig.run(&mode_select6(PF, len as u8), 0, &params6[..len]);
        assert_param_list_length_error(c);
    }
    for len in [1usize, 7, 9, 27] {
        let (c, _) = rig.run(&mode_select10(PF, len as u16), 0, &params10[..len]);
        assert_param_list_length_error(c);
    }
    // A block descriptor cut short.
    let params = mode_select6_list(&short_descriptor(0, 512), &[]);
    let (c, _) = rig.run(&mode_select6(PF, 8), 0, &params[..8]);
    assert_param_list_length_error(c);
    // Data-out shorter than the parameter list length: not executed.
    let (c, _) = rig.run(&mode_select6(PF, 24), 0, &params6[..20]);
    assert_eq!(c, Completion::BufferTooSmall);
    let (c, _) = rig.run(&mode_select10(PF, 28), 0, &[]);
    assert_eq!(c, Completion::BufferTooSmall);
    assert!(rig.wce(0));
    // Medium type must be zero.
    let mut p = params6.clone();
    p[1] = 1;
    let (c, _) = rig.run(&mode_select6(PF, p.len() as u8), 0, &p);
    assert_invalid_param(c, 1, None);
    let mut p = params10.clone();
    p[2] = 1;
    let (c, _) = rig.run(&mode_select10(PF, p.len() as u16), 0, &p);
    assert_invalid_param(c, 2, None);
    // Block descriptor length other than 0 or 8 (16 with LONGLBA).
    let mut p = mode_select6_list(&[0; 4], &[]);
    p[3] = 4;
    let (c, _) = rig.run(&mode_select6(PF, p.len() as u8), 0, &p);
    assert_invalid_param(c, 3, None);
    let p = mode_select10_list(true, &short_descriptor(0, 512), &[]);
    let (c, _) = rig.run(&mode_select10(PF, p.len() as u16), 0, &p);
    assert_invalid_param(c, 6, None);
    // A different block length or number of blocks.
    for (params, ten, at) in [
        (
            mode_select6_list(&short_descriptor(0, 4096), &caching_page(false)),
            false,
            4 + 5,
        ),
        (
            mode_select6_list(&short_descriptor(0, 520), &[]),
            false,
            4 + 5,
        ),
        (
            mode_select10_list(false, &short_descriptor(0, 4096), &[]),
            true,
            8 + 5,
        ),
        (
            mode_select10_list(true, &long_descriptor(0, 4096), &[]),
            true,
            8 + 12,
        ),
        (mode_select6_list(&short_descriptor(1, 512), &[]), false, 4),
        (
            mode_select10_list(true, &long_descriptor(RIG_BLOCKS + 1, 512), &[]),
            true,
            8,
        ),
    ] {
        let cdb = if ten {
            mode_select10(PF, params.len() as u16)
        } else {
            mode_select6(PF, params.len() as u8)
        };
        let (c, _) = rig.run(&cdb, 0, &params);
        assert_invalid_param(c, at as u16, None);
    }
    // Unknown page, wrong page length, sub-page format.
    let p = mode_select6_list(&[], &[0x1c, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let (c, _) = rig.run(&mode_select6(PF, p.len() as u8), 0, &p);
    assert_invalid_param(c, 4, None);
    let mut page = caching_page(false);
    page[1] = 0x0a;
    let p = mode_select6_list(&[], &page[..12]);
    let (c, _) = rig.run(&mode_select6(PF, p.len() as u8), 0, &p);
    assert_invalid_param(c, 5, None);
    let mut page = caching_page(false);
    page[0] |= 0x40;
    let p = mode_select10_list(false, &[], &page);
    let (c, _) = rig.run(&mode_select10(PF, p.len() as u16), 0, &p);
    assert_invalid_param(c, 8, Some(6));
    // None of it changed anything.
    assert!(rig.wce(0));
}

// ---------------------------------------------------------------------------
// UNMAP (SBC-3 §5.28)
// ---------------------------------------------------------------------------

#[test]
fn unmap_deallocates_and_reads_back_zeroes() {
    let rig = Rig::writable(50);
    let mut model = rig.data();
    rig.ops();
    let list = unmap_list(&[(10, 5), (100, 20), (RIG_BLOCKS - 1, 1)]);
    let (c, data) = rig.run(&unmap_cdb(0, list.len() as u16), 4096, &list);
    assert_good(c);
    assert!(data.is_empty());
    assert_eq!(
        rig.ops(),
        [
            Op::Zeroes {
                offset: 10 * 512,
                len: 5 * 512,
                deallocate: true
            },
            Op::Zeroes {
                offset: 100 * 512,
                len: 20 * 512,
                deallocate: true
            },
            Op::Zeroes {
                offset: (RIG_BLOCKS - 1) * 512,
                len: 512,
                deallocate: true
            },
        ]
    );
    for (lba, blocks) in [(10usize, 5usize), (100, 20), (RIG_BLOCKS as usize - 1, 1)] {
        model[lba * 512..(lba + blocks) * 512].fill(0);
    }
    assert_eq!(rig.data(), model);
    assert_eq!(rig.read(100, 20), vec![0; 20 * 512]);
    // Overlapping descriptors, a zero-length one, GROUP NUMBER, and a
    // parameter list longer than the descriptors: all fine.
    let mut list = unmap_list(&[(200, 10), (205, 10), (RIG_BLOCKS, 0)]);
    list.extend_from_slice(&[0xff; 7]);
    let mut cdb = unmap_cdb(0, list.len() as u16);
    cdb[6] = 0x1f;
    let (c, _) = rig.run(&cdb, 0, &list);
    assert_good(c);
    model[200 * 512..215 * 512].fill(0);
    assert_eq!(rig.data(), model);
}

#[test]
fn unmap_punches_holes_in_a_file_image() {
    const MIB: u64 = 1 << 20;
    let rig = FileRig::new(4 * MIB, true, |_| {});
    // 1 MiB at 1 MiB, written through the disk and made durable.
    let payload = pattern(51, MIB as usize);
    let (c, _) = rig.run(&block_cdb(WRITE_16, 2048, 2048), 0, &payload);
    assert_good(c);
    let (c, _) = rig.run(&block_cdb(SYNCHRONIZE_CACHE_10, 0, 0), 0, &[]);
    assert_good(c);
    let allocated = rig.allocated();
    assert!(allocated >= MIB, "{allocated}");
    let list = unmap_list(&[(2048, 2048)]);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_good(c);
    let (c, data) = rig.run(&block_cdb(READ_16, 2048, 2048), MIB as usize, &[]);
    assert_good(c);
    assert!(data.iter().all(|&b| b == 0));
    assert!(rig.contents().iter().all(|&b| b == 0));
    if rig.can_punch_holes() {
        let now = rig.allocated();
        assert!(now + MIB / 2 <= allocated, "{allocated} -> {now}");
        // GET LBA STATUS agrees.
        let (c, data) = rig.run(&get_lba_status(2048, 4096), 4096, &[]);
        assert_good(c);
        assert_eq!(lba_status_descriptors(&data)[0], (2048, 6144, 1));
    } else {
        common::skipped(
            "the temporary directory's file system does not punch holes; allocation not checked",
        );
    }
}

#[test]
fn unmap_parameter_list_errors() {
    let rig = Rig::writable(52);
    let before = rig.data();
    rig.ops();
    // Parameter list length zero: nothing to do.
    let (c, _) = rig.run(&unmap_cdb(0, 0), 0, &[]);
    assert_good(c);
    // 1 to 7 bytes cannot hold the header.
    let list = unmap_list(&[(0, 1)]);
    for len in 1..8u16 {
        let (c, _) = rig.run(&unmap_cdb(0, len), 0, &list[..usize::from(len)]);
        assert_param_list_length_error(c);
    }
    // More descriptors than MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (64).
    let ranges: Vec<(u64, u32)> = (0..65).map(|i| (i, 1)).collect();
    let list = unmap_list(&ranges);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_invalid_param(c, 2, None);
    // Data-out shorter than the parameter list length: not executed.
    let list = unmap_list(&[(0, 1), (4, 1)]);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list[..list.len() - 1]);
    assert_eq!(c, Completion::BufferTooSmall);
    // A descriptor off the medium: LBA OUT OF RANGE, and nothing is
    // unmapped, not even the valid descriptors before it.
    for bad in [
        (RIG_BLOCKS - 1, 2),
        (RIG_BLOCKS, 1),
        (RIG_BLOCKS + 1, 0),
        (u64::MAX, 1),
    ] {
        let list = unmap_list(&[(0, 4), (8, 8), bad]);
        let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
        assert_lba_out_of_range(c);
    }
    assert_eq!(rig.ops(), []);
    assert_eq!(rig.data(), before);
    // 64 descriptors are fine.
    let ranges: Vec<(u64, u32)> = (0..64).map(|i| (i * 2, 1)).collect();
    let list = unmap_list(&ranges);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_good(c);
    assert_eq!(rig.ops().len(), 64);
    // A descriptor cut by the parameter list length or by the block
    // descriptor data length is ignored.
    let list = unmap_list(&[(300, 1), (RIG_BLOCKS, 1)]);
    let (c, _) = rig.run(&unmap_cdb(0, 8 + 16 + 15), 0, &list);
    assert_good(c);
    let mut list = unmap_list(&[(301, 1), (RIG_BLOCKS, 1)]);
    list[2..4].copy_from_slice(&16u16.to_be_bytes());
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_good(c);
    let mut list = unmap_list(&[(302, 1), (RIG_BLOCKS, 1)]);
    list[2..4].copy_from_slice(&20u16.to_be_bytes());
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_good(c);
    assert_eq!(
        rig.ops(),
        (300..303)
            .map(|lba| Op::Zeroes {
                offset: lba * 512,
                len: 512,
                deallocate: true
            })
            .collect::<Vec<_>>()
    );
    // Only a header: nothing to do.
    let list = unmap_list(&[]);
    let (c, _) = rig.run(&unmap_cdb(0, 8), 0, &list);
    assert_good(c);
    assert_eq!(rig.ops(), []);
}

/// MAXIMUM UNMAP LBA COUNT bounds the blocks of all descriptors together.
#[test]
fn unmap_lba_count_is_limited_over_all_descriptors() {
    let max = 1u32 << 20; // 1 Mi blocks (512 MiB of 512-byte blocks)
    let rig = Rig::new(MemImage::sparse(Vec::new(), 4 << 30, false), 512, true);
    let (c, data) = rig.run(&inquiry(true, 0xb0, 64), 64, &[]);
    assert_good(c);
    assert_eq!(be32(&data[20..]), max);
    rig.ops();
    for (ranges, field) in [
        (vec![(0, max + 1)], 8 + 8),
        (
            vec![(0, max / 2), (u64::from(max), max / 2 + 1)],
            8 + 16 + 8,
        ),
        (vec![(0, 1), (10, 1), (u64::from(max), max - 1)], 8 + 32 + 8),
    ] {
        let list = unmap_list(&ranges);
        let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
        assert_invalid_param(c, field, None);
    }
    assert_eq!(rig.ops(), []);
    for ranges in [
        vec![(0, max)],
        vec![(0, max / 2), (u64::from(max), max / 2)],
    ] {
        let list = unmap_list(&ranges);
        let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
        assert_good(c);
    }
}

#[test]
fn unmap_cdb_and_unit_errors() {
    let list = unmap_list(&[(0, 4)]);
    let rig = Rig::writable(53);
    let before = rig.data();
    // ANCHOR: anchored LBAs are not supported (ANC_SUP=0).
    let (c, _) = rig.run(&unmap_cdb(0x01, list.len() as u16), 0, &list);
    assert_invalid_field(c, 1, Some(0));
    // NACA.
    let mut cdb = unmap_cdb(0, list.len() as u16);
    cdb[9] = 0x04;
    let (c, _) = rig.run(&cdb, 0, &list);
    assert_invalid_field(c, 9, Some(2));
    assert_eq!(rig.data(), before);
    // Without thin provisioning UNMAP does not exist, writable or not.
    for read_only in [false, true] {
        let rig = Rig::new(MemImage::new(before.clone(), read_only), 512, false);
        let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
        assert_invalid_opcode(c);
        assert_eq!(rig.data(), before);
    }
    // Thin provisioning configured on a read-only unit: not offered there
    // (see read_only_unit_with_discard_offers_no_unmap_anywhere).
    let rig = Rig::new(MemImage::new(before.clone(), true), 512, true);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_invalid_opcode(c);
    assert_eq!(rig.ops(), []);
}

// ---------------------------------------------------------------------------
// WRITE SAME (SBC-3 §5.41, §5.42)
// ---------------------------------------------------------------------------

#[test]
fn write_same_replicates_one_block() {
    for op in [WRITE_SAME_10, WRITE_SAME_16] {
        let rig = Rig::writable(60);
        let mut model = rig.data();
        let block = pattern(61, 512);
        // 300 blocks: more than one 64 KiB piece.
        let (c, data) = rig.run(&write_same(op, 0, 50, 300), 4096, &block);
        assert_good(c);
        assert!(data.is_empty());
        for b in 50..350 {
            model[b * 512..(b + 1) * 512].copy_from_slice(&block);
        }
        assert_eq!(rig.data(), model);
        // The last block.
        let out = pattern(62, 512);
        let (c, _) = rig.run(&write_same(op, 0, RIG_BLOCKS - 1, 1), 0, &out);
        assert_good(c);
        model[(RIG_BLOCKS as usize - 1) * 512..].copy_from_slice(&out);
        assert_eq!(rig.data(), model);
    }
    // 4096-byte blocks.
    let rig = Rig::new(MemImage::new(vec![0; 64 * 4096], false), 4096, true);
    let block = pattern(63, 4096);
    let (c, _) = rig.run(&write_same(WRITE_SAME_16, 0, 2, 40), 0, &block);
    assert_good(c);
    let data = rig.data();
    for b in 0..64 {
        let expected = if (2..42).contains(&b) {
            &block[..]
        } else {
            &[0u8; 4096][..]
        };
        assert_eq!(&data[b * 4096..(b + 1) * 4096], expected, "block {b}");
    }
}

#[test]
fn write_same_of_zeroes_and_with_unmap() {
    let rig = Rig::writable(64);
    let mut model = rig.data();
    rig.ops();
    let zeroes = |offset: u64, len: u64, deallocate| Op::Zeroes {
        offset,
        len,
        deallocate,
    };
    for op in [WRITE_SAME_10, WRITE_SAME_16] {
        // Zeroes: written as zeroes, the blocks stay mapped.
        let (c, _) = rig.run(&write_same(op, 0, 10, 20), 0, &[0; 512]);
        assert_good(c);
        assert_eq!(rig.ops(), [zeroes(5120, 10240, false)]);
        // UNMAP=1 with zeroes: deallocated (reads back as zeroes, LBPRZ).
        let (c, _) = rig.run(&write_same(op, WS_UNMAP, 40, 20), 0, &[0; 512]);
        assert_good(c);
        assert_eq!(rig.ops(), [zeroes(40 * 512, 10240, true)]);
        // UNMAP=1 with other data: that data is written.
        let block = pattern(65, 512);
        let (c, _) = rig.run(&write_same(op, WS_UNMAP, 70, 4), 0, &block);
        assert_good(c);
        assert_eq!(
            rig.ops(),
            [Op::Write {
                offset: 70 * 512,
                len: 2048,
                durable: false
            }]
        );
        for b in 70..74 {
            model[b * 512..(b + 1) * 512].copy_from_slice(&block);
        }
    }
    model[10 * 512..30 * 512].fill(0);
    model[40 * 512..60 * 512].fill(0);
    assert_eq!(rig.data(), model);
    // NDOB (16 only): no data-out, zeroes.
    let (c, _) = rig.run(&write_same(WRITE_SAME_16, WS_NDOB, 80, 4), 0, &[]);
    assert_good(c);
    assert_eq!(rig.ops(), [zeroes(80 * 512, 2048, false)]);
    let (c, _) = rig.run(
        &write_same(WRITE_SAME_16, WS_NDOB | WS_UNMAP, 90, 4),
        0,
        &[],
    );
    assert_good(c);
    assert_eq!(rig.ops(), [zeroes(90 * 512, 2048, true)]);
    model[80 * 512..84 * 512].fill(0);
    model[90 * 512..94 * 512].fill(0);
    assert_eq!(rig.data(), model);
    // WRITE SAME(10) has no NDOB: bit 0 is ignored, data-out is needed.
    let (c, _) = rig.run(&write_same(WRITE_SAME_10, 0x01, 80, 4), 0, &[]);
    assert_plain_sense(c, 0x05, 0x0e, 0x03);
    // Zeroes into the unallocated tail of a sparse image need space unless
    // they deallocate.
    let sparse = Rig::new(
        MemImage::sparse(vec![1; 64 << 10], 1 << 20, false),
        512,
        true,
    );
    let (c, _) = sparse.run(&write_same(WRITE_SAME_16, 0, 120, 16), 0, &[0; 512]);
    assert_space_allocation_failed(c);
    let (c, _) = sparse.run(&write_same(WRITE_SAME_16, 0, 120, 16), 0, &[1; 512]);
    assert_space_allocation_failed(c);
    assert_eq!(sparse.data(), vec![1; 64 << 10]);
    let (c, _) = sparse.run(&write_same(WRITE_SAME_16, WS_UNMAP, 120, 16), 0, &[0; 512]);
    assert_good(c);
    let mut expected = vec![1; 64 << 10];
    expected[120 * 512..].fill(0);
    assert_eq!(sparse.data(), expected);
}

#[test]
fn write_same_unmap_punches_holes_in_a_file_image() {
    const MIB: u64 = 1 << 20;
    let rig = FileRig::new(4 * MIB, true, |_| {});
    let payload = pattern(66, 2 * MIB as usize);
    let (c, _) = rig.run(&block_cdb(WRITE_16, 0, 4096), 0, &payload);
    assert_good(c);
    let (c, _) = rig.run(&block_cdb(SYNCHRONIZE_CACHE_16, 0, 0), 0, &[]);
    assert_good(c);
    let allocated = rig.allocated();
    let (c, _) = rig.run(&write_same(WRITE_SAME_16, WS_UNMAP, 0, 2048), 0, &[0; 512]);
    assert_good(c);
    let (c, _) = rig.run(
        &write_same(WRITE_SAME_16, WS_UNMAP | WS_NDOB, 2048, 2048),
        0,
        &[],
    );
    assert_good(c);
    assert!(rig.contents().iter().all(|&b| b == 0));
    if rig.can_punch_holes() {
        let now = rig.allocated();
        assert!(now + MIB <= allocated, "{allocated} -> {now}");
    } else {
        common::skipped(
            "the temporary directory's file system does not punch holes; allocation not checked",
        );
    }
}

#[test]
fn write_same_errors() {
    let rig = Rig::writable(67);
    let before = rig.data();
    rig.ops();
    let block = vec![1; 512];
    for op in [WRITE_SAME_10, WRITE_SAME_16] {
        let len_byte = length_byte(op);
        // WSNZ=1: zero blocks is refused.
        let (c, _) = rig.run(&write_same(op, 0, 0, 0), 0, &block);
        assert_invalid_field(c, len_byte, None);
        // ANCHOR (ANC_SUP=0).
        let (c, _) = rig.run(&write_same(op, WS_ANCHOR, 0, 1), 0, &block);
        assert_invalid_field(c, 1, Some(4));
        let (c, _) = rig.run(&write_same(op, WS_ANCHOR | WS_UNMAP, 0, 1), 0, &block);
        assert_invalid_field(c, 1, Some(4));
        // WRPROTECT.
        let (c, _) = rig.run(&write_same(op, 0x20, 0, 1), 0, &block);
        assert_invalid_field(c, 1, Some(7));
        // Off the medium.
        let (c, _) = rig.run(&write_same(op, 0, RIG_BLOCKS - 1, 2), 0, &block);
        assert_lba_out_of_range(c);
        let (c, _) = rig.run(&write_same(op, WS_UNMAP, RIG_BLOCKS, 1), 0, &block);
        assert_lba_out_of_range(c);
        // Less than one block of data-out: see
        // write_same_data_out_other_than_one_block_is_illegal_request.
        let (c, _) = rig.run(&write_same(op, 0, 0, 1), 0, &block[..511]);
        assert_plain_sense(c, 0x05, 0x0e, 0x03);
    }
    let (c, _) = rig.run(&write_same(WRITE_SAME_16, 0, u64::MAX, 1), 0, &block);
    assert_lba_out_of_range(c);
    // Longer than MAXIMUM WRITE SAME LENGTH (1 GiB: 2^21 blocks), checked
    // before the LBA.
    for blocks in [(1 << 21) + 1, u32::MAX] {
        let (c, _) = rig.run(&write_same(WRITE_SAME_16, 0, 0, blocks), 0, &block);
        assert_invalid_field(c, 10, None);
        let (c, _) = rig.run(&write_same(WRITE_SAME_16, 0, u64::MAX, blocks), 0, &block);
        assert_invalid_field(c, 10, None);
    }
    let (c, _) = rig.run(&write_same(WRITE_SAME_16, 0, 0, 1 << 21), 0, &block);
    assert_lba_out_of_range(c);
    assert_eq!(rig.ops(), []);
    assert_eq!(rig.data(), before);
    // The maximum itself, on a large sparse disk.
    let big = Rig::new(MemImage::sparse(Vec::new(), 2 << 30, false), 512, true);
    let (c, _) = big.run(
        &write_same(WRITE_SAME_16, WS_UNMAP, 1, 1 << 21),
        0,
        &[0; 512],
    );
    assert_good(c);
    // 4096-byte blocks: 2^18.
    let rig4k = Rig::new(MemImage::new(vec![0; 16 * 4096], false), 4096, true);
    let (c, _) = rig4k.run(
        &write_same(WRITE_SAME_16, 0, 0, (1 << 18) + 1),
        0,
        &[0; 4096],
    );
    assert_invalid_field(c, 10, None);
    let (c, _) = rig4k.run(&write_same(WRITE_SAME_16, 0, 0, 1 << 18), 0, &[0; 4096]);
    assert_lba_out_of_range(c);
    // UNMAP without thin provisioning: the bit is not supported (LBPWS=0).
    let plain = Rig::new(MemImage::new(before.clone(), false), 512, false);
    for op in [WRITE_SAME_10, WRITE_SAME_16] {
        let (c, _) = plain.run(&write_same(op, WS_UNMAP, 0, 4), 0, &[0; 512]);
        assert_invalid_field(c, 1, Some(3));
        let (c, _) = plain.run(&write_same(op, 0, 0, 4), 0, &[0; 512]);
        assert_good(c);
    }
    // A read-only unit.
    let ro = Rig::new(MemImage::new(before.clone(), true), 512, true);
    for op in [WRITE_SAME_10, WRITE_SAME_16] {
        for byte1 in [0, WS_UNMAP] {
            let (c, _) = ro.run(&write_same(op, byte1, 0, 4), 0, &block);
            assert_write_protected(c);
        }
    }
    let (c, _) = ro.run(&write_same(WRITE_SAME_16, WS_NDOB, 0, 4), 0, &[]);
    assert_write_protected(c);
    assert_eq!(ro.ops(), []);
    assert_eq!(ro.data(), before);
}

// ---------------------------------------------------------------------------
// GET LBA STATUS (SBC-3 §5.7)
// ---------------------------------------------------------------------------

/// An allocation map in bytes as LBA status descriptors: 512-byte blocks,
/// a hole only where it covers whole blocks, neighbours of one status
/// merged.
fn expected_lba_status(map: &[(u64, u64, bool)], from: u64) -> Vec<(u64, u32, u8)> {
    let mut status: Vec<u8> = Vec::new();
    for &(start, end, allocated) in map {
        for block in start / 512..end.div_ceil(512) {
            let whole_hole = !allocated && block * 512 >= start && (block + 1) * 512 <= end;
            match status.get_mut(block as usize) {
                // A block partly mapped is mapped.
                Some(s) => *s = (*s).min(u8::from(whole_hole)),
                None => status.push(u8::from(whole_hole)),
            }
        }
    }
    let mut out: Vec<(u64, u32, u8)> = Vec::new();
    for (block, &s) in status.iter().enumerate().skip(from as usize) {
        match out.last_mut() {
            Some(last) if last.2 == s => last.1 += 1,
            _ => out.push((block as u64, 1, s)),
        }
    }
    out
}

#[test]
fn get_lba_status_reports_mapped_and_deallocated_extents() {
    use std::os::unix::fs::FileExt;
    const BLOCKS: u64 = 4096; // 2 MiB
                              // A sparse file with 64 KiB of data at 256 KiB.
    let rig = FileRig::new(BLOCKS * 512, true, |f| {
        f.write_all_at(&[0x5a; 64 << 10], 256 << 10).unwrap();
    });
    let map = rig.allocation_map();
    let holes = map.iter().any(|e| !e.2);
    let (c, data) = rig.run(&get_lba_status(0, 4096), 4096, &[]);
    assert_good(c);
    let d = lba_status_descriptors(&data);
    assert_eq!(d, expected_lba_status(&map, 0));
    // The written blocks are mapped.
    assert!(d
        .iter()
        .any(|&(lba, n, s)| s == 0 && lba <= 512 && lba + u64::from(n) >= 640));
    if holes {
        assert_eq!(d, [(0, 512, 1), (512, 128, 0), (640, 3456, 1)]);
    } else {
        common::skipped(
            "the temporary directory's file system reports no holes; extents not checked",
        );
    }
    // From an LBA inside an extent, which the first descriptor starts at.
    for lba in [100u64, 600, 700, BLOCKS - 1] {
        let (c, data) = rig.run(&get_lba_status(lba, 4096), 4096, &[]);
        assert_good(c);
        let d = lba_status_descriptors(&data);
        assert_eq!(d, expected_lba_status(&map, lba), "from {lba}");
        assert_eq!(d[0].0, lba);
        let end = d.last().map(|&(l, n, _)| l + u64::from(n));
        assert_eq!(end, Some(BLOCKS));
    }
    // The allocation length truncates; the header still counts what was
    // prepared (at least one descriptor).
    let (_, full) = rig.run(&get_lba_status(0, 4096), 4096, &[]);
    let (c, data) = rig.run(&get_lba_status(0, 8), 4096, &[]);
    assert_good(c);
    assert_eq!(data, [0, 0, 0, 20, 0, 0, 0, 0]);
    let (c, data) = rig.run(&get_lba_status(0, 24), 4096, &[]);
    assert_good(c);
    assert_eq!(data[..4], [0, 0, 0, 20]);
    assert_eq!(data[8..], full[8..24]);
    let (c, data) = rig.run(&get_lba_status(0, 0), 4096, &[]);
    assert_good(c);
    assert!(data.is_empty());
    let (c, data) = rig.run(&get_lba_status(0, 4096), 30, &[]);
    assert_good(c);
    assert_eq!(data, full[..30]);
    // A write into a hole maps it.
    let (c, _) = rig.run(&block_cdb(WRITE_10, 0, 8), 0, &[7; 4096]);
    assert_good(c);
    let (c, data) = rig.run(&get_lba_status(0, 4096), 4096, &[]);
    assert_good(c);
    let d = lba_status_descriptors(&data);
    assert_eq!(d, expected_lba_status(&rig.allocation_map(), 0));
    assert_eq!((d[0].0, d[0].2), (0, 0));
}

#[test]
fn get_lba_status_errors() {
    let rig = FileRig::new(64 * 512, true, |_| {});
    for lba in [64u64, 65, u64::MAX] {
        let (c, data) = rig.run(&get_lba_status(lba, 4096), 4096, &[]);
        assert_lba_out_of_range(c);
        assert!(data.is_empty());
    }
    // Without thin provisioning the service action does not exist.
    let plain = FileRig::new(64 * 512, false, |_| {});
    let (c, _) = plain.run(&get_lba_status(0, 4096), 4096, &[]);
    assert_invalid_field(c, 1, Some(4));
    let ro = Rig::new(MemImage::new(vec![0; 64 * 512], true), 512, true);
    let (c, _) = ro.run(&get_lba_status(0, 4096), 4096, &[]);
    assert_invalid_field(c, 1, Some(4));
}

/// In-memory images: the stored bytes are mapped, a sparse tail is
/// deallocated; an extent of 2^32 blocks or more continues in the next
/// descriptor, so the descriptors stay contiguous.
#[test]
fn get_lba_status_on_memory_images() {
    let rig = Rig::writable(70);
    let (c, data) = rig.run(&get_lba_status(0, 4096), 4096, &[]);
    assert_good(c);
    assert_eq!(lba_status_descriptors(&data), [(0, RIG_BLOCKS as u32, 0)]);
    let blocks = (1u64 << 32) + 16;
    let huge = Rig::new(
        MemImage::sparse(pattern(71, 4096), blocks * 512, false),
        512,
        true,
    );
    let (c, data) = huge.run(&get_lba_status(0, 4096), 4096, &[]);
    assert_good(c);
    let first = 8 + u64::from(u32::MAX);
    assert_eq!(
        lba_status_descriptors(&data),
        [
            (0, 8, 0),
            (8, u32::MAX, 1),
            (first, (blocks - first) as u32, 1)
        ]
    );
    let (c, data) = huge.run(&get_lba_status(blocks - 1, 4096), 4096, &[]);
    assert_good(c);
    assert_eq!(lba_status_descriptors(&data), [(blocks - 1, 1, 1)]);
    let (c, _) = huge.run(&get_lba_status(blocks, 4096), 4096, &[]);
    assert_lba_out_of_range(c);
}

// ---------------------------------------------------------------------------
// COMPARE AND WRITE (SBC-3 §5.3)
// ---------------------------------------------------------------------------

#[test]
fn compare_and_write_writes_when_the_data_matches() {
    let rig = Rig::writable(80);
    rig.ops();
    let verify = rig.stored(20, 3);
    let new = pattern(81, 3 * 512);
    let out = [verify, new.clone()].concat();
    let (c, data) = rig.run(&compare_and_write(0, 20, 3), 4096, &out);
    assert_good(c);
    assert!(data.is_empty());
    assert_eq!(rig.stored(20, 3), new);
    let range = (20 * 512, 3 * 512);
    assert_eq!(
        rig.ops(),
        [
            Op::Read {
                offset: range.0,
                len: range.1
            },
            Op::Write {
                offset: range.0,
                len: range.1,
                durable: false
            }
        ]
    );
    // FUA: the write is durable at completion.
    let newer = pattern(82, 3 * 512);
    let (c, _) = rig.run(
        &compare_and_write(0x08, 20, 3),
        0,
        &[new, newer.clone()].concat(),
    );
    assert_good(c);
    assert_eq!(rig.stored(20, 3), newer);
    assert_eq!(
        rig.ops()[1],
        Op::Write {
            offset: range.0,
            len: range.1,
            durable: true
        }
    );
    // The largest, MAXIMUM COMPARE AND WRITE LENGTH (64 blocks), at the end.
    let lba = RIG_BLOCKS - 64;
    let new = pattern(83, 64 * 512);
    let (c, _) = rig.run(
        &compare_and_write(0, lba, 64),
        0,
        &[rig.stored(lba, 64), new.clone()].concat(),
    );
    assert_good(c);
    assert_eq!(rig.stored(lba, 64), new);
    // 4096-byte blocks.
    let rig4k = Rig::new(MemImage::new(vec![9; 8 * 4096], false), 4096, true);
    let new = pattern(84, 4096);
    let (c, _) = rig4k.run(
        &compare_and_write(0, 7, 1),
        0,
        &[vec![9; 4096], new.clone()].concat(),
    );
    assert_good(c);
    assert_eq!(rig4k.stored(7, 1), new);
}

#[test]
fn compare_and_write_miscompare_reports_the_offset_and_writes_nothing() {
    let rig = Rig::writable(85);
    let before = rig.data();
    rig.ops();
    for at in [0usize, 1, 511, 700, 3 * 512 - 1] {
        let mut verify = rig.stored(20, 3);
        verify[at] ^= 0x40;
        // Later differences do not matter: the first one is reported.
        verify[3 * 512 - 1] ^= 0x01;
        let out = [verify, vec![0xee; 3 * 512]].concat();
        let (c, data) = rig.run(&compare_and_write(0x08, 20, 3), 4096, &out);
        assert_miscompare(c, at as u32);
        assert!(data.is_empty());
        assert_eq!(
            rig.ops(),
            [Op::Read {
                offset: 20 * 512,
                len: 3 * 512
            }]
        );
    }
    assert_eq!(rig.data(), before);
}

#[test]
fn compare_and_write_errors() {
    let rig = Rig::writable(86);
    let before = rig.data();
    rig.ops();
    // Zero blocks: nothing compared or written, not an error.
    let (c, _) = rig.run(&compare_and_write(0, 5, 0), 0, &[]);
    assert_good(c);
    let (c, _) = rig.run(&compare_and_write(0, RIG_BLOCKS, 0), 0, &[]);
    assert_good(c);
    // More than MAXIMUM COMPARE AND WRITE LENGTH.
    for blocks in [65u8, 128, 255] {
        let (c, _) = rig.run(&compare_and_write(0, 0, blocks), 0, &vec![0; 2 * 255 * 512]);
        assert_invalid_field(c, 13, None);
    }
    // Data-out must hold the verify and the write data.
    for len in [0usize, 512, 2 * 1024 - 1] {
        let (c, _) = rig.run(&compare_and_write(0, 5, 2), 0, &before[..len]);
        assert_eq!(c, Completion::BufferTooSmall);
    }
    // Off the medium.
    for (lba, blocks) in [(RIG_BLOCKS - 1, 2u8), (RIG_BLOCKS, 1), (u64::MAX, 1)] {
        let (c, _) = rig.run(&compare_and_write(0, lba, blocks), 0, &[0; 2048]);
        assert_lba_out_of_range(c);
    }
    // WRPROTECT.
    let (c, _) = rig.run(&compare_and_write(0x20, 0, 1), 0, &[0; 1024]);
    assert_invalid_field(c, 1, Some(7));
    assert_eq!(rig.ops(), []);
    assert_eq!(rig.data(), before);
    // Read-only.
    let ro = Rig::new(MemImage::new(before.clone(), true), 512, true);
    let out = [before[..512].to_vec(), vec![0; 512]].concat();
    let (c, _) = ro.run(&compare_and_write(0, 0, 1), 0, &out);
    assert_write_protected(c);
    // The medium cannot be read: MEDIUM ERROR, nothing written.
    let bad = Rig::new(
        MemImage::new(before.clone(), false).with_read_error(512..1024),
        512,
        true,
    );
    let out = [before[..1024].to_vec(), vec![0; 1024]].concat();
    let (c, _) = bad.run(&compare_and_write(0, 0, 2), 0, &out);
    assert_medium_error(c);
    assert_eq!(bad.data(), before);
}

// ---------------------------------------------------------------------------
// VERIFY with byte check (SBC-3 §5.33)
// ---------------------------------------------------------------------------

#[test]
fn verify_byte_check_01_compares_with_the_data_out() {
    let rig = Rig::writable(90);
    // 200 blocks: compared in several 64 KiB pieces.
    let expected = rig.stored(10, 200);
    for op in VERIFIES {
        let (c, data) = rig.run(&verify_cdb(op, 10, 200, 0b01), 4096, &expected);
        assert_good(c);
        assert!(data.is_empty());
        for at in [0usize, 511, 65_535, 65_536, 70_000, 200 * 512 - 1] {
            let mut out = expected.clone();
            out[at] ^= 0x80;
            let (c, _) = rig.run(&verify_cdb(op, 10, 200, 0b01), 0, &out);
            assert_miscompare(c, at as u32);
        }
        // Zero blocks: no data-out needed.
        let (c, _) = rig.run(&verify_cdb(op, 10, 0, 0b01), 0, &[]);
        assert_good(c);
        // Short data-out: not executed.
        let (c, _) = rig.run(
            &verify_cdb(op, 10, 200, 0b01),
            0,
            &expected[..200 * 512 - 1],
        );
        assert_eq!(c, Completion::BufferTooSmall);
        // Range errors first.
        let (c, _) = rig.run(&verify_cdb(op, RIG_BLOCKS, 1, 0b01), 0, &expected);
        assert_lba_out_of_range(c);
    }
    // A read error is a medium error.
    let bad = Rig::new(
        MemImage::new(vec![0; 64 * 512], false).with_read_error(4 * 512..5 * 512),
        512,
        false,
    );
    let (c, _) = bad.run(&verify_cdb(VERIFY_16, 0, 8, 0b01), 0, &[0; 8 * 512]);
    assert_medium_error(c);
}

#[test]
fn verify_byte_check_11_compares_every_block_with_one() {
    let rig = Rig::writable(91);
    let block = pattern(92, 512);
    let (c, _) = rig.run(&write_same(WRITE_SAME_16, 0, 30, 300), 0, &block);
    assert_good(c);
    let mut other = block.clone();
    other[77] ^= 1;
    for op in VERIFIES {
        let (c, _) = rig.run(&verify_cdb(op, 30, 300, 0b11), 0, &block);
        assert_good(c);
        // Only one block of data-out is taken.
        let mut out = block.clone();
        out.extend_from_slice(&[0xff; 512]);
        let (c, _) = rig.run(&verify_cdb(op, 30, 300, 0b11), 0, &out);
        assert_good(c);
        let (c, _) = rig.run(&verify_cdb(op, 30, 300, 0b11), 0, &other);
        assert_miscompare(c, 77);
        let (c, _) = rig.run(&verify_cdb(op, 30, 300, 0b11), 0, &block[..511]);
        assert_eq!(c, Completion::BufferTooSmall);
        // BYTCHK 10b is reserved.
        let (c, _) = rig.run(&verify_cdb(op, 30, 300, 0b10), 0, &block);
        assert_invalid_field(c, 1, Some(2));
    }
    // One block differing far into the range: the offset counts from the
    // start of the range, as if the block were replicated into the
    // data-out.
    let mut changed = block.clone();
    changed[5] ^= 1;
    let (c, _) = rig.run(&block_cdb(WRITE_10, 30 + 250, 1), 0, &changed);
    assert_good(c);
    let (c, _) = rig.run(&verify_cdb(VERIFY_12, 30, 300, 0b11), 0, &block);
    assert_miscompare(c, 250 * 512 + 5);
}

// ---------------------------------------------------------------------------
// Thin provisioning reported: READ CAPACITY(16), VPD B0h and B2h
// ---------------------------------------------------------------------------

#[test]
fn thin_provisioning_is_reported_where_it_is_offered() {
    // (block size, read only, discard) -> offered
    for (block_size, read_only, discard) in [
        (512u32, false, true),
        (4096, false, true),
        (512, false, false),
        (512, true, true),
        (4096, true, false),
    ] {
        let blocks = 64u64;
        let rig = Rig::new(
            MemImage::new(
                vec![0; (blocks * u64::from(block_size)) as usize],
                read_only,
            ),
            block_size,
            discard,
        );
        let offered = discard && !read_only;
        let exponent = if block_size == 512 { 3 } else { 0 };
        // READ CAPACITY(16): LBPME and LBPRZ.
        let (c, data) = rig.run(&rc16_cdb(32), 32, &[]);
        assert_good(c);
        let mut expected = expected_capacity16(blocks, block_size, exponent);
        if offered {
            expected[14] = 0xc0;
        }
        assert_eq!(data, expected, "{block_size} {read_only} {discard}");
        // Logical block provisioning VPD: LBPU, LBPWS, LBPWS10, LBPRZ,
        // thin provisioned; or nothing.
        let (c, data) = rig.run(&inquiry(true, 0xb2, 255), 255, &[]);
        assert_good(c);
        if offered {
            assert_eq!(data, [0, 0xb2, 0, 4, 0, 0xe4, 0x02, 0]);
        } else {
            assert_eq!(data, [0, 0xb2, 0, 4, 0, 0, 0, 0]);
        }
        // Block limits: the UNMAP limits only where UNMAP exists.
        let (c, data) = rig.run(&inquiry(true, 0xb0, 255), 255, &[]);
        assert_good(c);
        let mut limits = vec![0u8; 64];
        limits[1] = 0xb0;
        limits[3] = 0x3c;
        limits[4] = 0x01;
        limits[5] = 64;
        limits[6..8].copy_from_slice(&(1u16 << exponent).to_be_bytes());
        limits[8..12].copy_from_slice(&((32u32 << 20) / block_size).to_be_bytes());
        // MAXIMUM UNMAP LBA COUNT: 1 GiB, at most 1 Mi blocks (1048576
        // for 512-byte blocks, 262144 for 4096).
        let max_unmap: u32 = if block_size == 512 { 1048576 } else { 262144 };
        let max_write_same = (1u32 << 30) / block_size;
        if offered {
            limits[20..24].copy_from_slice(&max_unmap.to_be_bytes());
            limits[24..28].copy_from_slice(&64u32.to_be_bytes());
            limits[28..32].copy_from_slice(&(1u32 << exponent).to_be_bytes());
            limits[32] = 0x80;
        }
        limits[36..44].copy_from_slice(&u64::from(max_write_same).to_be_bytes());
        assert_eq!(data, limits, "{block_size} {read_only} {discard}");
        // REPORT SUPPORTED OPERATION CODES lists UNMAP and GET LBA STATUS
        // only then.
        let (c, data) = rig.run(&rsoc(0x01, UNMAP, 0, 64), 64, &[]);
        assert_good(c);
        assert_eq!(data[1] & 0x07, if offered { 0x03 } else { 0x01 });
        let (c, data) = rig.run(&rsoc(0x02, SERVICE_ACTION_IN_16, 0x12, 64), 64, &[]);
        assert_good(c);
        assert_eq!(data[1] & 0x07, if offered { 0x03 } else { 0x01 });
    }
}

// ---------------------------------------------------------------------------
// Conformance details (SPC-4, SBC-3)
// ---------------------------------------------------------------------------

/// The DPO bit of VERIFY and WRITE AND VERIFY (SBC-3 §5.33-5.35,
/// §5.38-5.40: byte 1 bit 4) is evaluated: the CDB usage data of REPORT
/// SUPPORTED OPERATION CODES (SPC-4 §6.35.3) has it set, and the commands
/// complete with DPO=1.
#[test]
fn verify_and_write_and_verify_accept_dpo() {
    let rig = Rig::writable(200);
    // Byte 1 as the usage data must show it: VRPROTECT/WRPROTECT (bits
    // 7-5), DPO (bit 4) and BYTCHK (bits 2-1) for VERIFY; WRPROTECT and
    // DPO for WRITE AND VERIFY (BYTCHK: see the BYTCHK tests).
    for (op, len, byte1) in [
        (VERIFY_10, 10u8, 0b1111_0110u8),
        (VERIFY_12, 12, 0b1111_0110),
        (VERIFY_16, 16, 0b1111_0110),
    ] {
        let (c, data) = rig.run(&rsoc(0x01, op, 0, 4096), 4096, &[]);
        assert_good(c);
        assert_eq!(&data[..6], &[0, 0x03, 0, len, op, byte1], "{op:#x}");
    }
    for (op, len) in [
        (WRITE_AND_VERIFY_10, 10u8),
        (WRITE_AND_VERIFY_12, 12),
        (WRITE_AND_VERIFY_16, 16),
    ] {
        let (c, data) = rig.run(&rsoc(0x01, op, 0, 4096), 4096, &[]);
        assert_good(c);
        assert_eq!(&data[..5], &[0, 0x03, 0, len, op], "{op:#x}");
        assert_eq!(data[5] & 0xf0, 0xf0, "{op:#x}: WRPROTECT and DPO");
    }
    // DPO=1 is accepted.
    for op in VERIFIES {
        let mut cdb = block_cdb(op, 3, 2);
        cdb[1] = 0x10;
        let (c, _) = rig.run(&cdb, 0, &[]);
        assert_good(c);
        cdb[1] = 0x10 | 0b01 << 1;
        let expected = rig.stored(3, 2);
        let (c, _) = rig.run(&cdb, 0, &expected);
        assert_good(c);
    }
    for (i, op) in [
        WRITE_AND_VERIFY_10,
        WRITE_AND_VERIFY_12,
        WRITE_AND_VERIFY_16,
    ]
    .into_iter()
    .enumerate()
    {
        let mut cdb = block_cdb(op, 8, 2);
        cdb[1] = 0x10;
        let data = pattern(201 + i as u64, 1024);
        let (c, _) = rig.run(&cdb, 0, &data);
        assert_good(c);
        assert_eq!(rig.stored(8, 2), data);
    }
}

/// WRITE SAME(10/16) takes exactly one logical block of data-out (SBC-3
/// §5.41, §5.42). Any other length is CHECK CONDITION, ILLEGAL REQUEST,
/// INVALID FIELD IN COMMAND INFORMATION UNIT (0Eh/03h), with nothing
/// written, on 512- and 4096-byte blocks; not a transport-level failure.
#[test]
fn write_same_data_out_other_than_one_block_is_illegal_request() {
    for (block, blocks) in [(512usize, 64u64), (4096, 16)] {
        let rig = Rig::new(
            MemImage::new(pattern(210, blocks as usize * block), false),
            block as u32,
            true,
        );
        let before = rig.data();
        rig.ops();
        for op in [WRITE_SAME_10, WRITE_SAME_16] {
            for byte1 in [0, WS_UNMAP] {
                for len in [0, 1, block - 1, block + 1, 2 * block, 4 * block] {
                    let out = vec![0u8; len];
                    let (c, data) = rig.run(&write_same(op, byte1, 2, 4), 4096, &out);
                    assert_ne!(c, Completion::BufferTooSmall, "{op:#x} {len}");
                    // Fixed format: 70h, ILLEGAL REQUEST, additional length
                    // 10, ASC 0Eh ASCQ 03h, no sense-key specific data.
                    let mut expected = [0u8; 18];
                    expected[0] = 0x70;
                    expected[2] = 0x05;
                    expected[7] = 10;
                    expected[12] = 0x0e;
                    expected[13] = 0x03;
                    assert_eq!(c.sense(), expected, "{op:#x} byte1 {byte1:#x} {len}");
                    assert!(data.is_empty());
                }
            }
        }
        assert_eq!(rig.ops(), []);
        assert_eq!(rig.data(), before);
        // Exactly one block is written to every block of the range.
        let one = pattern(211, block);
        let (c, _) = rig.run(&write_same(WRITE_SAME_16, 0, 2, 4), 0, &one);
        assert_good(c);
        assert_eq!(rig.stored(2, 4), one.repeat(4));
        // NDOB: no data-out at all.
        let (c, _) = rig.run(&write_same(WRITE_SAME_16, WS_NDOB, 2, 4), 0, &[]);
        assert_good(c);
        assert_eq!(rig.stored(2, 4), vec![0; 4 * block]);
    }
}

/// Every limit of the Block Limits VPD page (SBC-3 §6.5.3, table 197) is
/// what the commands accept: a request at the limit completes, one past it
/// is refused with the sense SBC-3 gives. MAXIMUM UNMAP LBA COUNT is at
/// most 1 Mi blocks.
#[test]
fn block_limits_are_what_the_commands_accept() {
    // 512-byte blocks, thin provisioned: 1 GiB + 1 MiB, 33 MiB of it
    // stored (memory), the rest a sparse tail that only deallocation
    // touches.
    const BLOCKS: u64 = (1 << 21) + 2048;
    const STORED: usize = 33 << 20;
    let rig = Rig::new(
        MemImage::sparse(pattern(220, STORED), BLOCKS * 512, false),
        512,
        true,
    );
    let (c, page) = rig.run(&inquiry(true, 0xb0, 255), 255, &[]);
    assert_good(c);
    let mut expected = vec![0u8; 64];
    expected[1] = 0xb0;
    expected[3] = 0x3c;
    expected[4] = 0x01; // WSNZ
    expected[5] = 64; // MAXIMUM COMPARE AND WRITE LENGTH
    expected[6..8].copy_from_slice(&[0, 8]); // OPTIMAL TRANSFER LENGTH GRANULARITY
    expected[8..12].copy_from_slice(&[0, 0x01, 0, 0]); // MAXIMUM TRANSFER LENGTH 65536
    expected[20..24].copy_from_slice(&[0, 0x10, 0, 0]); // MAXIMUM UNMAP LBA COUNT 1048576
    expected[24..28].copy_from_slice(&[0, 0, 0, 64]); // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
    expected[28..32].copy_from_slice(&[0, 0, 0, 8]); // OPTIMAL UNMAP GRANULARITY
    expected[32] = 0x80; // UGAVALID, alignment 0
    expected[36..44].copy_from_slice(&[0, 0, 0, 0, 0, 0x20, 0, 0]); // MAXIMUM WRITE SAME LENGTH 2097152
    assert_eq!(page, expected);

    // MAXIMUM TRANSFER LENGTH, 65536 blocks: READ, WRITE, VERIFY, WRITE
    // AND VERIFY. One more is INVALID FIELD IN CDB at the transfer length.
    let max_transfer = 65536u32;
    let data = pattern(221, max_transfer as usize * 512);
    for op in [WRITE_16, WRITE_AND_VERIFY_16] {
        let (c, _) = rig.run(&block_cdb(op, 1, max_transfer), 0, &data);
        assert_good(c);
        let (c, _) = rig.run(
            &block_cdb(op, 1, max_transfer + 1),
            0,
            &[data.clone(), vec![0; 512]].concat(),
        );
        assert_invalid_field(c, 10, None);
    }
    assert_eq!(rig.read(1, max_transfer), data);
    let (c, _) = rig.run(&block_cdb(READ_16, 1, max_transfer + 1), 64 << 20, &[]);
    assert_invalid_field(c, 10, None);
    let (c, _) = rig.run(&block_cdb(VERIFY_16, 1, max_transfer), 0, &[]);
    assert_good(c);
    let (c, _) = rig.run(&verify_cdb(VERIFY_16, 1, max_transfer, 0b01), 0, &data);
    assert_good(c);
    let (c, _) = rig.run(&block_cdb(VERIFY_16, 1, max_transfer + 1), 0, &[]);
    assert_invalid_field(c, 10, None);

    // MAXIMUM COMPARE AND WRITE LENGTH, 64 blocks; 65 is INVALID FIELD IN
    // CDB at NUMBER OF LOGICAL BLOCKS (byte 13).
    let verify = data[..64 * 512].to_vec();
    let new = pattern(222, 64 * 512);
    let (c, _) = rig.run(
        &compare_and_write(0, 1, 64),
        0,
        &[verify, new.clone()].concat(),
    );
    assert_good(c);
    assert_eq!(rig.read(1, 64), new);
    let (c, _) = rig.run(&compare_and_write(0, 1, 65), 0, &vec![0; 130 * 512]);
    assert_invalid_field(c, 13, None);

    // MAXIMUM WRITE SAME LENGTH, 2097152 blocks; one more is INVALID FIELD
    // IN CDB at the NUMBER OF LOGICAL BLOCKS. WSNZ: zero is refused too.
    let (c, _) = rig.run(
        &write_same(WRITE_SAME_16, WS_UNMAP, 100, 2097152),
        0,
        &[0; 512],
    );
    assert_good(c);
    let (c, _) = rig.run(
        &write_same(WRITE_SAME_16, WS_UNMAP, 100, 2097153),
        0,
        &[0; 512],
    );
    assert_invalid_field(c, 10, None);
    let (c, _) = rig.run(&write_same(WRITE_SAME_16, 0, 100, 0), 0, &[0; 512]);
    assert_invalid_field(c, 10, None);

    // MAXIMUM UNMAP LBA COUNT, 1048576 blocks over all descriptors; one
    // more is INVALID FIELD IN PARAMETER LIST at the NUMBER OF LOGICAL
    // BLOCKS of the descriptor that goes past it (SBC-3 §5.28.2).
    let list = unmap_list(&[(0, 1048576)]);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_good(c);
    let list = unmap_list(&[(0, 1048577)]);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_invalid_param(c, 16, None);
    let list = unmap_list(&[(0, 1048576), (1048576, 1)]);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_invalid_param(c, 32, None);

    // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT, 64; 65 is INVALID FIELD IN
    // PARAMETER LIST at the UNMAP BLOCK DESCRIPTOR DATA LENGTH (byte 2).
    let ranges: Vec<(u64, u32)> = (0..64).map(|i| (i * 8, 1)).collect();
    let list = unmap_list(&ranges);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_good(c);
    let ranges: Vec<(u64, u32)> = (0..65).map(|i| (i * 8, 1)).collect();
    let list = unmap_list(&ranges);
    let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_invalid_param(c, 2, None);

    // 4096-byte blocks: MAXIMUM UNMAP LBA COUNT 262144 (1 GiB), MAXIMUM
    // TRANSFER LENGTH 8192, MAXIMUM WRITE SAME LENGTH 262144.
    let rig4k = Rig::new(MemImage::sparse(Vec::new(), 2 << 30, false), 4096, true);
    let (c, page) = rig4k.run(&inquiry(true, 0xb0, 255), 255, &[]);
    assert_good(c);
    assert_eq!(&page[8..12], &[0, 0, 0x20, 0]);
    assert_eq!(&page[20..24], &[0, 0x04, 0, 0]);
    assert_eq!(&page[36..44], &[0, 0, 0, 0, 0, 0x04, 0, 0]);
    let list = unmap_list(&[(0, 262144)]);
    let (c, _) = rig4k.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_good(c);
    let list = unmap_list(&[(0, 262145)]);
    let (c, _) = rig4k.run(&unmap_cdb(0, list.len() as u16), 0, &list);
    assert_invalid_param(c, 16, None);
    let (c, _) = rig4k.run(
        &write_same(WRITE_SAME_16, WS_UNMAP, 0, 262144),
        0,
        &[0; 4096],
    );
    assert_good(c);
    let (c, _) = rig4k.run(
        &write_same(WRITE_SAME_16, WS_UNMAP, 0, 262145),
        0,
        &[0; 4096],
    );
    assert_invalid_field(c, 10, None);
}

/// A read-only unit configured with discard is not thin provisioned, and
/// every command says so alike (SBC-3 §4.7.3, §6.5.4): READ CAPACITY(16)
/// LBPME=0 and LBPRZ=0, the logical block provisioning VPD page with
/// LBPU, LBPWS and LBPWS10 zero, no UNMAP limits in the block limits page,
/// REPORT SUPPORTED OPERATION CODES without UNMAP and GET LBA STATUS,
/// UNMAP an INVALID COMMAND OPERATION CODE, GET LBA STATUS an unsupported
/// service action, WRITE SAME with UNMAP write protected like any WRITE
/// SAME: exactly the answers of a read-only unit without discard.
#[test]
fn read_only_unit_with_discard_offers_no_unmap_anywhere() {
    let image = pattern(230, 64 * 512);
    let with = Rig::new(MemImage::new(image.clone(), true), 512, true);
    let without = Rig::new(MemImage::new(image.clone(), true), 512, false);
    let list = unmap_list(&[(0, 4)]);
    for rig in [&with, &without] {
        let (c, data) = rig.run(&rc16_cdb(32), 32, &[]);
        assert_good(c);
        assert_eq!(data[14], 0x00, "LBPME=0, LBPRZ=0");
        let (c, data) = rig.run(&inquiry(true, 0xb2, 255), 255, &[]);
        assert_good(c);
        assert_eq!(data, [0, 0xb2, 0, 4, 0, 0, 0, 0]);
        let (c, data) = rig.run(&inquiry(true, 0xb0, 255), 255, &[]);
        assert_good(c);
        assert_eq!(&data[20..32], &[0; 12], "no UNMAP limits, no granularity");
        assert_eq!(data[32], 0, "UGAVALID=0");
        let (c, data) = rig.run(&rsoc(0x01, UNMAP, 0, 64), 64, &[]);
        assert_good(c);
        assert_eq!(data, [0, 0x01, 0, 0], "UNMAP not supported");
        let (c, data) = rig.run(&rsoc(0x02, SERVICE_ACTION_IN_16, 0x12, 64), 64, &[]);
        assert_good(c);
        assert_eq!(data, [0, 0x01, 0, 0], "GET LBA STATUS not supported");
        let (c, _) = rig.run(&unmap_cdb(0, list.len() as u16), 0, &list);
        assert_invalid_opcode(c);
        let (c, _) = rig.run(&get_lba_status(0, 4096), 4096, &[]);
        assert_invalid_field(c, 1, Some(4));
        for op in [WRITE_SAME_10, WRITE_SAME_16] {
            for byte1 in [0, WS_UNMAP] {
                let (c, _) = rig.run(&write_same(op, byte1, 0, 4), 0, &[0; 512]);
                assert_write_protected(c);
            }
        }
        assert_eq!(rig.ops(), []);
        assert_eq!(rig.data(), image);
    }
    // Byte for byte the same listing and pages.
    for cdb in [
        rsoc(0, 0, 0, 4096),
        inquiry(true, 0xb0, 255),
        inquiry(true, 0xb2, 255),
        rc16_cdb(32),
    ] {
        assert_eq!(with.run(&cdb, 4096, &[]), without.run(&cdb, 4096, &[]));
    }
}

/// A writable [`MemImage`] whose medium holds the byte at `at` inverted
/// after every write that covers it: a stuck cell, which a read-back
/// succeeds on and only a byte-by-byte comparison catches.
struct StuckByte {
    image: MemImage,
    at: u64,
}

impl Storage for StuckByte {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        self.image.read_only()
    }

    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        self.image.read_vectored_at(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64, durable: bool) -> io::Result<()> {
        self.image.write_vectored_at(bufs, offset, durable)?;
        if (offset..offset + bufs.len() as u64).contains(&self.at) {
            let mut byte = [0u8; 1];
            let mut into = IoBufsMut::new();
            into.push_bytes(&mut byte);
            self.image.read_vectored_at(&mut into, self.at)?;
            byte[0] ^= 0xff;
            let mut from = IoBufs::new();
            from.push_bytes(&byte);
            self.image.write_vectored_at(&from, self.at, durable)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.image.flush()
    }

    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        self.image.write_zeroes(offset, len, deallocate)
    }

    fn extent(&self, offset: u64) -> io::Result<Extent> {
        self.image.extent(offset)
    }
}

/// WRITE AND VERIFY BYTCHK (SBC-3 §5.38-5.40, byte 1 bits 2-1): 00b writes
/// and verifies the medium without comparing; 01b compares the medium with
/// the data-out after the write, a mismatch being MISCOMPARE, MISCOMPARE
/// DURING VERIFY OPERATION with the offset into the data-out in the
/// INFORMATION field; 10b and 11b are reserved: INVALID FIELD IN CDB at
/// byte 1 bit 2, nothing written. The usage data shows BYTCHK evaluated.
#[test]
fn write_and_verify_byte_check() {
    const OPS: [u8; 3] = [
        WRITE_AND_VERIFY_10,
        WRITE_AND_VERIFY_12,
        WRITE_AND_VERIFY_16,
    ];
    let wv = |op: u8, lba: u64, blocks: u32, bytchk: u8| {
        let mut c = block_cdb(op, lba, blocks);
        c[1] = bytchk << 1;
        c
    };
    // Byte 1 of the usage data: WRPROTECT, DPO, BYTCHK.
    let rig = Rig::writable(240);
    for op in OPS {
        let (c, data) = rig.run(&rsoc(0x01, op, 0, 64), 64, &[]);
        assert_good(c);
        assert_eq!(data[5], 0b1111_0110, "{op:#x}");
    }
    // A sound medium: 00b and 01b both write, and compare equal.
    for (i, op) in OPS.into_iter().enumerate() {
        for bytchk in [0u8, 1] {
            let data = pattern(241 + 2 * i as u64 + u64::from(bytchk), 200 * 512);
            let (c, _) = rig.run(&wv(op, 20, 200, bytchk), 0, &data);
            assert_good(c);
            assert_eq!(rig.stored(20, 200), data, "{op:#x} {bytchk}");
        }
    }
    // Reserved values: nothing reaches the storage.
    rig.ops();
    let before = rig.data();
    for op in OPS {
        for bytchk in [0b10u8, 0b11] {
            let (c, _) = rig.run(&wv(op, 20, 2, bytchk), 0, &[0x33; 1024]);
            assert_invalid_field(c, 1, Some(2));
        }
    }
    assert_eq!(rig.ops(), []);
    assert_eq!(rig.data(), before);
    // A stuck byte at image offset 64 KiB + 700, i.e. byte
    // 65536 + 700 - 100 * 512 = 15036 of a data-out written at LBA 100
    // (past the first 64 KiB piece, and not on a piece boundary).
    let at = (64 << 10) + 700;
    let disk = Disk::new(
        Box::new(StuckByte {
            image: MemImage::new(pattern(250, 512 * 512), false),
            at,
        }),
        disk_config(0, 512, false),
    )
    .unwrap();
    let target = Target::new(vec![disk]);
    for op in OPS {
        let data = pattern(251, 300 * 512);
        // BYTCHK 00b reads the medium back, which succeeds.
        let (c, _) = run_with_out(&target, L0, &wv(op, 100, 300, 0), 0, &data);
        assert_good(c);
        // BYTCHK 01b finds the difference.
        let (c, _) = run_with_out(&target, L0, &wv(op, 100, 300, 1), 0, &data);
        assert_miscompare(c, 15036);
        // A range without the stuck byte compares equal.
        let (c, _) = run_with_out(&target, L0, &wv(op, 300, 100, 1), 0, &data[..100 * 512]);
        assert_good(c);
    }
}

/// The REPORT LUNS well-known logical unit answers INQUIRY with EVPD=1
/// for the VPD pages every logical unit has (SPC-4 §8.1, §7.8): Supported
/// VPD Pages (00h) listing 00h and 83h, and Device Identification (83h),
/// which holds no logical unit name (a well-known logical unit has none).
/// Any other page is ILLEGAL REQUEST, INVALID FIELD IN CDB at the PAGE
/// CODE (byte 2).
#[test]
fn well_known_lun_vpd_pages() {
    let f = Fixture::new();
    // Byte 0: peripheral qualifier 000b, device type 1Eh (well known).
    let (c, data) = f.run(WLUN, &inquiry(true, 0x00, 255), 4096);
    assert_good(c);
    assert_eq!(data, [0x1e, 0x00, 0x00, 0x02, 0x00, 0x83]);
    let (c, data) = f.run(WLUN, &inquiry(true, 0x83, 255), 4096);
    assert_good(c);
    assert_eq!(data, [0x1e, 0x83, 0x00, 0x00]);
    // The allocation length truncates.
    let (c, data) = f.run(WLUN, &inquiry(true, 0x00, 5), 4096);
    assert_good(c);
    assert_eq!(data, [0x1e, 0x00, 0x00, 0x02, 0x00]);
    for page in [0x80u8, 0xb0, 0xb1, 0xb2, 0x86, 0xff] {
        let (c, data) = f.run(WLUN, &inquiry(true, page, 255), 4096);
        assert_invalid_field(c, 2, None);
        assert!(data.is_empty(), "page {page:#x}");
    }
}

/// WRITE SAME(16) with UNMAP on a thin-provisioned unit (LBPRZ=1): every
/// accepted range reads back as zeroes (SBC-3 §4.7.3.4.2, §5.42), up to
/// and including MAXIMUM WRITE SAME LENGTH (2097152 blocks of 512 bytes),
/// on a sparse image file; blocks next to the range keep their data. With
/// a zero block of data-out and with NDOB, and over ranges that start and
/// end inside a file system block.
#[test]
fn write_same_unmap_largest_range_reads_back_zeroes() {
    use std::os::unix::fs::FileExt;
    const MAX: u64 = 2097152;
    const LBA: u64 = 8;
    let size = (LBA + MAX + 16) * 512;
    // Data at the first, a middle and the last block of the range, and on
    // both sides of it.
    let marked = [LBA - 1, LBA, LBA + MAX / 2, LBA + MAX - 1, LBA + MAX];
    for ndob in [false, true] {
        let rig = FileRig::new(size, true, |f| {
            for &b in &marked {
                f.write_all_at(&[0x5a; 512], b * 512).unwrap();
            }
        });
        let (c, data) = rig.run(&rc16_cdb(32), 32, &[]);
        assert_good(c);
        assert_eq!(data[14] & 0xc0, 0xc0, "LBPME=1, LBPRZ=1");
        let (cdb, out) = if ndob {
            (
                write_same(WRITE_SAME_16, WS_UNMAP | WS_NDOB, LBA, MAX as u32),
                vec![],
            )
        } else {
            (
                write_same(WRITE_SAME_16, WS_UNMAP, LBA, MAX as u32),
                vec![0u8; 512],
            )
        };
        let (c, _) = rig.run(&cdb, 0, &out);
        assert_good(c);
        for &b in &marked {
            let (c, data) = rig.run(&block_cdb(READ_16, b, 1), 512, &[]);
            assert_good(c);
            let inside = (LBA..LBA + MAX).contains(&b);
            let expected = if inside { [0u8; 512] } else { [0x5a; 512] };
            assert_eq!(data, expected, "block {b} (ndob {ndob})");
        }
        // Blocks 1 and 2 past the range's start and end, read in one go.
        let (c, data) = rig.run(&block_cdb(READ_16, LBA + MAX - 2, 3), 3 * 512, &[]);
        assert_good(c);
        assert_eq!(data[..1024], [0u8; 1024]);
        assert_eq!(data[1024..], [0x5a; 512]);
    }
    // Ranges inside file system blocks: every block of the range reads
    // back as zeroes, its neighbours keep their data.
    let rig = FileRig::new(64 * 512, true, |f| {
        f.write_all_at(&[0x77; 64 * 512], 0).unwrap();
    });
    for (lba, blocks) in [(3u64, 1u32), (9, 6), (17, 14), (40, 9)] {
        let (c, _) = rig.run(
            &write_same(WRITE_SAME_16, WS_UNMAP, lba, blocks),
            0,
            &[0; 512],
        );
        assert_good(c);
        let (c, data) = rig.run(&block_cdb(READ_16, lba - 1, blocks + 2), 64 * 512, &[]);
        assert_good(c);
        let n = blocks as usize * 512;
        assert_eq!(data[..512], [0x77; 512], "{lba}+{blocks}");
        assert!(data[512..512 + n].iter().all(|&b| b == 0), "{lba}+{blocks}");
        assert_eq!(data[512 + n..], [0x77; 512], "{lba}+{blocks}");
    }
}

/// GET LBA STATUS (SBC-3 §5.7): the first LBA status descriptor starts at
/// the STARTING LOGICAL BLOCK ADDRESS, wherever it falls in an extent
/// (first, inner or last block of a mapped or deallocated one), and the
/// descriptors run on contiguously from there.
#[test]
fn get_lba_status_starts_at_the_starting_lba() {
    use std::os::unix::fs::FileExt;
    // Holes at 0..512 and 640..4096 (blocks), data at 512..640 — where the
    // file system makes holes; the starting LBA is honoured either way.
    let rig = FileRig::new(4096 * 512, true, |f| {
        f.write_all_at(&[0x5a; 64 << 10], 256 << 10).unwrap();
    });
    for lba in [
        0u64, 1, 255, 511, 512, 513, 600, 639, 640, 641, 2000, 4094, 4095,
    ] {
        let (c, data) = rig.run(&get_lba_status(lba, 4096), 4096, &[]);
        assert_good(c);
        let d = lba_status_descriptors(&data);
        assert_eq!(d[0].0, lba, "first descriptor from {lba}: {d:?}");
        let mut next = lba;
        for &(start, blocks, _) in &d {
            assert_eq!(start, next, "contiguous from {lba}: {d:?}");
            assert!(blocks > 0);
            next = start + u64::from(blocks);
        }
        assert_eq!(next, 4096, "from {lba}: {d:?}");
    }
    // An in-memory image with 4096-byte blocks: 2 stored (mapped) blocks,
    // then a deallocated tail of 2^32 blocks and more.
    let blocks = (1u64 << 32) + 40;
    let rig = Rig::new(
        MemImage::sparse(pattern(260, 2 * 4096), blocks * 4096, false),
        4096,
        true,
    );
    for (lba, expected) in [
        (
            0u64,
            vec![
                (0u64, 2u32, 0u8),
                (2, u32::MAX, 1),
                (2 + u64::from(u32::MAX), 39, 1),
            ],
        ),
        (
            1,
            vec![
                (1, 1, 0),
                (2, u32::MAX, 1),
                (2 + u64::from(u32::MAX), 39, 1),
            ],
        ),
        (2, vec![(2, u32::MAX, 1), (2 + u64::from(u32::MAX), 39, 1)]),
        // 2^32 + 40 - 1000 = 4294966336 blocks: one descriptor.
        (1000, vec![(1000, 4294966336, 1)]),
        (blocks - 1, vec![(blocks - 1, 1, 1)]),
    ] {
        let (c, data) = rig.run(&get_lba_status(lba, 4096), 4096, &[]);
        assert_good(c);
        assert_eq!(lba_status_descriptors(&data), expected, "from {lba}");
    }
}

// ---------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------

/// A random CDB: random length and bytes; half the time a supported
/// opcode, often with small service actions, a clear NACA bit and small
/// LBAs and lengths, so the interesting paths are reached.
fn random_cdb(rng: &mut XorShift) -> Vec<u8> {
    if rng.below(3) == 0 {
        return structured_cdb(rng);
    }
    let len = rng.below(33) as usize;
    let mut cdb: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    if len > 0 && rng.below(2) == 0 {
        cdb[0] = ALL_COMMANDS[rng.below(ALL_COMMANDS.len() as u64) as usize].0;
        if rng.below(2) == 0 {
            if let Some(b) = cdb.get_mut(1) {
                *b &= 0x1f;
            }
            for b in cdb.iter_mut().skip(2).take(6) {
                if rng.below(3) != 0 {
                    *b = 0;
                }
            }
            if let Some(last) = cdb.last_mut() {
                *last &= !0x04;
            }
        }
    }
    cdb
}

/// A supported command's CDB of the right length with random flags in
/// byte 1, a small (sometimes huge) LBA and a small length, and now and
/// then one random byte.
fn structured_cdb(rng: &mut XorShift) -> Vec<u8> {
    let (op, sa, len, _) = ALL_COMMANDS[rng.below(ALL_COMMANDS.len() as u64) as usize];
    let mut cdb = vec![0u8; usize::from(len)];
    cdb[0] = op;
    cdb[1] = rng.next() as u8 & if rng.below(8) == 0 { 0xff } else { 0x1f };
    if let Some(sa) = sa {
        cdb[1] = (cdb[1] & 0xe0) | sa as u8;
    }
    let lba = match rng.below(8) {
        0 => rng.next(),
        1 => rng.below(1 << 22),
        2 | 3 => rng.below(600),
        _ => rng.below(32),
    };
    let blocks = match rng.below(8) {
        0 => rng.next() as u32,
        1 => rng.below(70_000) as u32,
        _ => rng.below(20) as u32,
    };
    match len {
        6 => {
            cdb[1] = (cdb[1] & 0xe0) | (lba >> 16) as u8 & 0x1f;
            cdb[2..4].copy_from_slice(&(lba as u16).to_be_bytes());
            cdb[4] = blocks as u8;
        }
        10 => {
            cdb[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
            cdb[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
        }
        12 => {
            cdb[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
            cdb[6..10].copy_from_slice(&blocks.to_be_bytes());
        }
        _ if op == COMPARE_AND_WRITE => {
            cdb[2..10].copy_from_slice(&lba.to_be_bytes());
            cdb[13] = blocks as u8;
        }
        _ => {
            cdb[2..10].copy_from_slice(&lba.to_be_bytes());
            cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        }
    }
    if rng.below(4) == 0 {
        let i = rng.below(u64::from(len)) as usize;
        cdb[i] = rng.next() as u8;
    }
    cdb
}

/// Data-out for `cdb`: a random slice of `pool`, or for MODE SELECT and
/// UNMAP sometimes a well-formed parameter list with random contents.
fn random_data_out(rng: &mut XorShift, cdb: &[u8], pool: &[u8]) -> Vec<u8> {
    let op = cdb.first().copied().unwrap_or(0);
    if rng.below(2) == 0 && (op == MODE_SELECT_6 || op == MODE_SELECT_10) {
        let page = match rng.below(3) {
            0 => caching_page(rng.below(2) == 0),
            1 => control_page(rng.below(4) == 0),
            _ => RW_ERROR_RECOVERY_PAGE.to_vec(),
        };
        return if op == MODE_SELECT_6 {
            mode_select6_list(&[], &page)
        } else {
            mode_select10_list(false, &[], &page)
        };
    }
    if rng.below(2) == 0 && op == UNMAP {
        let ranges: Vec<(u64, u32)> = (0..rng.below(5))
            .map(|_| (rng.below(600), rng.below(100) as u32))
            .collect();
        return unmap_list(&ranges);
    }
    let len = match rng.below(5) {
        0 => 0,
        1 => rng.below(64),
        2 => rng.below(4097),
        3 => rng.below(pool.len() as u64 / 2 + 1),
        _ => pool.len() as u64 / 2,
    } as usize;
    let start = rng.below((pool.len() - len) as u64 + 1) as usize;
    pool[start..start + len].to_vec()
}

/// Outcome counts of a random run: GOOD, CHECK CONDITION, buffer too small.
#[derive(Debug, Default)]
struct Outcomes {
    good: u32,
    check: u32,
    too_small: u32,
}

/// Runs `count` random CDBs on random LUNs of `target` with random data-in
/// buffer sizes and data-out slices of `pool`, checking that every command
/// completes in one of the three ways, never writes past the data-in buffer,
/// transfers data only with GOOD status, and reports only the sense keys
/// `keys` allows (MISCOMPARE only for commands that compare).
fn fuzz(
    target: &Target,
    luns: &[LunAddress],
    pool: &[u8],
    count: u32,
    seed: u64,
    keys: &[u8],
    mut after_each: impl FnMut(&[u8]),
) -> Outcomes {
    const BUFFERS: [usize; 9] = [0, 1, 4, 18, 36, 255, 512, 4096, 65536];
    let mut rng = XorShift::new(seed);
    let mut seen = Outcomes::default();
    for _ in 0..count {
        let cdb = random_cdb(&mut rng);
        let lun = luns[rng.below(luns.len() as u64) as usize];
        let buffer = BUFFERS[rng.below(BUFFERS.len() as u64) as usize];
        let out = random_data_out(&mut rng, &cdb, pool);
        let mut din = VecDataIn::with_capacity(buffer);
        let mut dout = SliceDataOut::new(&out);
        let completion = target.execute(lun, &cdb, &mut din, &mut dout);
        assert!(din.data.len() <= buffer, "{cdb:02x?}");
        match completion {
            Completion::Good => seen.good += 1,
            Completion::CheckCondition(s) => {
                seen.check += 1;
                let fixed = s.to_fixed();
                assert!(
                    keys.contains(&fixed[2]),
                    "unexpected sense: {fixed:02x?} for {cdb:02x?}"
                );
                if fixed[2] == 0x0e {
                    assert!(
                        matches!(cdb[0], 0x2f | 0x8f | 0xaf | COMPARE_AND_WRITE),
                        "MISCOMPARE from {cdb:02x?}"
                    );
                }
                assert!(din.data.is_empty(), "data with CHECK CONDITION: {cdb:02x?}");
            }
            Completion::BufferTooSmall => {
                seen.too_small += 1;
                assert!(din.data.is_empty(), "{cdb:02x?}");
            }
            Completion::Forwarded(outcome) => {
                panic!("forwarded by an emulated unit: {outcome:?} for {cdb:02x?}")
            }
        }
        after_each(&cdb);
    }
    seen
}

/// Random CDBs never panic, always complete in one of the three ways, never
/// write past the data-in buffer, and transfer data only with GOOD status.
#[test]
fn random_cdbs_never_panic() {
    let f = Fixture::new();
    let luns = [
        L0,
        L1,
        L2,
        L3,
        L4,
        L5,
        ABSENT,
        LunAddress::Lun(300),
        WLUN,
        LunAddress::Unsupported,
    ];
    let pool = pattern(99, 4096);
    // MEDIUM ERROR (LUN 4's read errors), ILLEGAL REQUEST, DATA PROTECT,
    // MISCOMPARE (VERIFY with byte check).
    let seen = fuzz(
        &f.target,
        &luns,
        &pool,
        100_000,
        0x5eed,
        &[0x03, 0x05, 0x07, 0x0e],
        |_| {},
    );
    // The generator reaches all three outcomes.
    assert!(
        seen.good > 1000 && seen.check > 1000 && seen.too_small > 10,
        "{seen:?}"
    );
}

/// The same on writable disks with random data-out: every write that
/// reaches the storage lies inside the image, and no write or flush fails
/// on healthy storage (MEDIUM ERROR only for injected read errors, and
/// WRITE ERROR on the sparse disk once a durable write found no space).
#[test]
fn random_cdbs_on_writable_disks() {
    // Random bytes, then zeroes (short, mostly empty parameter lists).
    let mut pool = pattern(98, 64 << 10);
    pool.extend_from_slice(&vec![0u8; 64 << 10]);
    let rigs = [
        Rig::new(
            MemImage::new(pattern(1, 256 * 512), false).with_read_error(100 * 512..102 * 512),
            512,
            true,
        ),
        Rig::new(MemImage::new(pattern(2, 32 * 4096), false), 4096, true),
        Rig::new(MemImage::new(pattern(3, 64 * 512), false), 512, false),
        // Sparse: writes into the tail find no space.
        Rig::new(
            MemImage::sparse(pattern(4, 64 << 10), 1 << 30, false),
            512,
            true,
        ),
    ];
    for (i, rig) in rigs.iter().enumerate() {
        let size = rig.image.size();
        let stored = rig.data().len();
        let seen = fuzz(
            &rig.target,
            &[L0, L0, L0, LunAddress::Lun(1)],
            &pool,
            40_000,
            0xd15c + i as u64,
            &[0x03, 0x05, 0x07, 0x0e],
            |cdb| {
                for op in rig.ops() {
                    let (offset, len) = match op {
                        Op::Write { offset, len, .. } | Op::Zeroes { offset, len, .. } => {
                            (offset, len)
                        }
                        Op::Read { offset, len } => (offset, len),
                        Op::Flush => continue,
                    };
                    assert!(
                        offset.checked_add(len).is_some_and(|end| end <= size),
                        "{op:?} outside the image from {cdb:02x?}"
                    );
                }
            },
        );
        assert!(seen.good > 1000 && seen.check > 1000, "{i}: {seen:?}");
        assert_eq!(rig.data().len(), stored);
        // Every MEDIUM ERROR was a read error: run a few more and look.
        let mut rng = XorShift::new(7);
        for _ in 0..20_000 {
            let cdb = random_cdb(&mut rng);
            let n = rng.below(8193) as usize;
            let (c, _) = rig.run(&cdb, 65536, &pool[..n]);
            if let Completion::CheckCondition(s) = c {
                let fixed = s.to_fixed();
                // On the sparse disk a durable write into the tail fails
                // with ENOSPC, which makes later flushes and durable
                // writes fail with WRITE ERROR.
                assert!(
                    fixed[2] != 0x03 || matches!((fixed[12], i), (0x11, 0) | (0x0c, 3)),
                    "{fixed:02x?} from {cdb:02x?}"
                );
            }
        }
        for op in rig.ops() {
            if let Op::Write { offset, len, .. } | Op::Zeroes { offset, len, .. } = op {
                assert!(offset + len <= size, "{op:?}");
            }
        }
    }
    // A file image: nothing is written past its end.
    let file = FileRig::new(1 << 20, true, |_| {});
    let seen = fuzz(
        &file.target,
        &[L0],
        &pool,
        5_000,
        0xf11e,
        &[0x05, 0x07, 0x0e],
        |_| {},
    );
    assert!(seen.good > 100 && seen.check > 100, "{seen:?}");
    assert_eq!(std::fs::metadata(&file.path).unwrap().len(), 1 << 20);
}

/// The identity derived from an image's path and LUN must never change
/// between releases (it names the disk in the guest's /dev/disk/by-id): the
/// serial number is FNV-1a (64-bit) of "LUN:canonical path" as 16 upper-case
/// hex digits, and the NAA 3h designator (SPC-4 §7.8.6.6.2) holds the
/// hash's low 60 bits. The values were computed outside the project (an
/// independent FNV-1a in Python).
#[test]
fn derived_identities_are_stable() {
    for (path, lun, serial, naa) in [
        (
            "/var/lib/images/vm1-disk0.raw",
            0u16,
            "861BB0A0A071FC55",
            0x361b_b0a0_a071_fc55u64,
        ),
        (
            "/var/lib/images/vm1-disk0.raw",
            1,
            "1F1AF006A764C6FA",
            0x3f1a_f006_a764_c6fa,
        ),
        ("/dev/vdb", 16383, "59D3549E3EA70173", 0x39d3_549e_3ea7_0173),
    ] {
        let id = Identity::derived(path, lun);
        assert_eq!((id.serial.as_str(), id.naa), (serial, naa), "{lun}:{path}");
    }
}

// ---------------------------------------------------------------------------
// Unit attentions (SAM-5 §5.14) of LUNs added, removed, resized and reset
// ---------------------------------------------------------------------------

mod unit_attentions {
    use super::*;

    const TUR: [u8; 6] = [0; 6];
    const UA: u8 = 0x06;
    const LUNS_CHANGED: (u8, u8) = (0x3f, 0x0e);
    const CAPACITY_CHANGED: (u8, u8) = (0x2a, 0x09);
    const LU_RESET: (u8, u8) = (0x29, 0x03);
    const NEXUS_LOSS: (u8, u8) = (0x29, 0x07);

    fn writable(lun: u16, blocks: usize) -> Disk {
        disk(
            MemImage::new(pattern(20 + u64::from(lun), blocks * 512), false),
            lun,
            512,
            true,
        )
    }

    /// LUNs 0 and 1, writable, 64 blocks each.
    fn target() -> Target {
        Target::new(vec![writable(0, 64), writable(1, 64)])
    }

    #[track_caller]
    fn assert_ua(target: &Target, lun: u16, cdb: &[u8], (asc, ascq): (u8, u8)) {
        let (c, _) = run(target, LunAddress::Lun(lun), cdb, 512);
        assert_plain_sense(c, UA, asc, ascq);
    }

    #[track_caller]
    fn assert_good(target: &Target, lun: u16, cdb: &[u8]) {
        let (c, _) = run(target, LunAddress::Lun(lun), cdb, 512);
        assert_eq!(c, Completion::Good, "LUN {lun} {cdb:02x?}");
    }

    #[test]
    fn insert_and_remove_establish_luns_changed_on_the_others_only() {
        let t = target();
        t.insert(2, writable(2, 64)).unwrap();
        assert_ua(&t, 0, &TUR, LUNS_CHANGED);
        assert_ua(&t, 1, &TUR, LUNS_CHANGED);
        assert_good(&t, 2, &TUR);
        assert_good(&t, 0, &TUR);
        assert!(t.remove(1).is_some());
        assert_ua(&t, 0, &TUR, LUNS_CHANGED);
        assert_ua(&t, 2, &TUR, LUNS_CHANGED);
        assert_lun_not_supported(run(&t, LunAddress::Lun(1), &TUR, 0).0);
        assert!(t.remove(1).is_none(), "removed twice");
    }

    #[test]
    fn insert_at_a_used_or_too_high_lun_fails_and_lowest_free_lun() {
        let t = target();
        assert_eq!(t.lowest_free_lun(), Some(2));
        assert!(t.insert(1, writable(1, 8)).is_err());
        assert!(t.insert(16384, writable(9, 8)).is_err());
        assert_good(&t, 0, &TUR);
        t.insert(5, writable(5, 8)).unwrap();
        assert_eq!(t.lowest_free_lun(), Some(2));
        t.remove(0).unwrap();
        assert_eq!(t.lowest_free_lun(), Some(0));
        t.insert(0, writable(0, 8)).unwrap();
        t.insert(2, writable(2, 8)).unwrap();
        assert_eq!(t.lowest_free_lun(), Some(3));
    }

    #[test]
    fn resets_establish_their_conditions() {
        let t = target();
        assert!(t.reset_unit(1));
        assert!(!t.reset_unit(7), "no unit at LUN 7");
        assert_good(&t, 0, &TUR);
        assert_ua(&t, 1, &TUR, LU_RESET);
        assert_good(&t, 1, &TUR);
        t.reset_nexus();
        assert_ua(&t, 0, &TUR, NEXUS_LOSS);
        assert_ua(&t, 1, &TUR, NEXUS_LOSS);
        assert_good(&t, 0, &TUR);
    }

    #[test]
    fn several_are_reported_one_per_command_resets_first() {
        let t = target();
        t.insert(2, writable(2, 64)).unwrap();
        t.unit(0).unwrap().resize(128 * 512, true).unwrap();
        t.reset_nexus();
        t.reset_unit(0);
        for ua in [LU_RESET, NEXUS_LOSS, CAPACITY_CHANGED, LUNS_CHANGED] {
            assert_ua(&t, 0, &TUR, ua);
        }
        assert_good(&t, 0, &TUR);
    }

    #[test]
    fn inquiry_neither_reports_nor_clears() {
        let t = target();
        t.reset_unit(0);
        for _ in 0..2 {
            let (c, data) = run(&t, L0, &inquiry(false, 0, 36), 36);
            assert_eq!(c, Completion::Good);
            assert_eq!(data[0], 0x00);
            let (c, _) = run(&t, L0, &inquiry(true, 0x80, 255), 255);
            assert_eq!(c, Completion::Good);
        }
        assert_ua(&t, 0, &TUR, LU_RESET);
    }

    #[test]
    fn report_luns_to_any_lun_clears_luns_changed_everywhere_but_not_the_others() {
        for lun in [L0, LunAddress::Lun(9), WLUN] {
            let t = target();
            t.insert(2, writable(2, 64)).unwrap();
            t.unit(1).unwrap().resize(128 * 512, true).unwrap();
            let (c, data) = run(&t, lun, &report_luns(0, 4096), 4096);
            assert_eq!(c, Completion::Good, "REPORT LUNS to {lun:?}");
            assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), 24);
            assert_good(&t, 0, &TUR);
            // CAPACITY DATA HAS CHANGED stays (it is not about the inventory).
            assert_ua(&t, 1, &TUR, CAPACITY_CHANGED);
            assert_good(&t, 1, &TUR);
        }
    }

    #[test]
    fn request_sense_returns_and_clears_in_both_formats() {
        let t = target();
        t.reset_unit(0);
        t.reset_nexus();
        // Fixed format (SPC-4 §4.5.3): 70h, key in byte 2, ASC/ASCQ 12-13.
        let (c, data) = run(&t, L0, &request_sense(0, 252), 252);
        assert_eq!(c, Completion::Good);
        assert_eq!(data.len(), 18);
        assert_eq!(
            (data[0], data[2] & 0x0f, data[12], data[13]),
            (0x70, UA, 0x29, 0x03)
        );
        // Descriptor format (DESC=1, §4.5.2): 72h, key, ASC, ASCQ in 1-3.
        let (c, data) = run(&t, L0, &request_sense(1, 252), 252);
        assert_eq!(c, Completion::Good);
        assert_eq!(&data[..4], &[0x72, UA, 0x29, 0x07]);
        // Nothing pending: NO SENSE, and commands run.
        let (c, data) = run(&t, L0, &request_sense(0, 252), 252);
        assert_eq!(c, Completion::Good);
        assert_eq!((data[2] & 0x0f, data[12], data[13]), (0, 0, 0));
        assert_good(&t, 0, &TUR);
    }

    #[test]
    fn resize_establishes_capacity_changed_only_when_the_capacity_changes() {
        let t = target();
        let unit = t.unit(0).unwrap();
        unit.resize(64 * 512, true).unwrap();
        assert_good(&t, 0, &TUR);
        assert!(unit.resize(64 * 512 + 100, true).is_err());
        assert_good(&t, 0, &TUR);
        unit.resize(96 * 512, true).unwrap();
        assert_ua(&t, 0, &rc16_cdb(32), CAPACITY_CHANGED);
        let (c, data) = run(&t, L0, &rc16_cdb(32), 32);
        assert_eq!(c, Completion::Good);
        assert_eq!(data[..8], 95u64.to_be_bytes());
        unit.resize(32 * 512, true).unwrap();
        assert_ua(&t, 0, &TUR, CAPACITY_CHANGED);
        assert_good(&t, 1, &TUR);
    }
}
