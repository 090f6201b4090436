//! The SCSI target emulator through the crate's public API only: CDB bytes
//! in, data + status + sense out, for every implemented command and every
//! error path (SPC-4, SBC-3). Disks live in memory ([`MemImage`]) with known
//! contents.
//!
//! Expected bytes are written out from the standards here rather than taken
//! from the crate's constants, so that a wrong constant fails a test.

use vhost_device_scsi::scsi::inquiry::Identity;
use vhost_device_scsi::scsi::{
    Completion, Disk, DiskConfig, DiskError, LunAddress, SliceDataOut, Target, VecDataIn,
};
use vhost_device_scsi::storage::MemImage;

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
// Status and sense assertions
// ---------------------------------------------------------------------------

#[track_caller]
fn assert_good(c: Completion) {
    assert_eq!(c, Completion::Good);
    assert_eq!(c.status(), 0x00);
}

/// Checks CHECK CONDITION with fixed-format sense `key`/`asc`/`ascq`;
/// returns the 18 sense bytes.
#[track_caller]
fn assert_sense(c: Completion, key: u8, asc: u8, ascq: u8) -> [u8; 18] {
    let Completion::CheckCondition(data) = c else {
        panic!("expected CHECK CONDITION, got {c:?}");
    };
    assert_eq!(c.status(), 0x02);
    let s = data.to_fixed();
    assert_eq!(s[0], 0x70, "current error, fixed format: {s:02x?}");
    assert_eq!(s[7], 10, "additional sense length: {s:02x?}");
    assert_eq!((s[2], s[12], s[13]), (key, asc, ascq), "sense {s:02x?}");
    s
}

/// CHECK CONDITION without sense-key specific data.
#[track_caller]
fn assert_plain_sense(c: Completion, key: u8, asc: u8, ascq: u8) {
    let s = assert_sense(c, key, asc, ascq);
    assert_eq!(&s[15..18], &[0, 0, 0], "no SKSV: {s:02x?}");
}

/// ILLEGAL REQUEST / INVALID FIELD IN CDB with the field pointer at CDB
/// byte `byte`, bit `bit` (None: the field starts on a byte boundary).
#[track_caller]
fn assert_invalid_field(c: Completion, byte: u16, bit: Option<u8>) {
    let s = assert_sense(c, 0x05, 0x24, 0x00);
    // SKSV=1, C/D=1, BPV and BIT POINTER (SPC-4 §4.5.2.4.2).
    let b15 = match bit {
        Some(bit) => 0xc8 | bit,
        None => 0xc0,
    };
    assert_eq!(s[15], b15, "sense-key specific byte 15: {s:02x?}");
    assert_eq!(&s[16..18], &byte.to_be_bytes(), "field pointer: {s:02x?}");
}

#[track_caller]
fn assert_invalid_opcode(c: Completion) {
    assert_plain_sense(c, 0x05, 0x20, 0x00);
}

#[track_caller]
fn assert_lba_out_of_range(c: Completion) {
    assert_plain_sense(c, 0x05, 0x21, 0x00);
}

#[track_caller]
fn assert_lun_not_supported(c: Completion) {
    assert_plain_sense(c, 0x05, 0x25, 0x00);
}

#[track_caller]
fn assert_write_protected(c: Completion) {
    assert_plain_sense(c, 0x07, 0x27, 0x00);
}

#[track_caller]
fn assert_medium_error(c: Completion) {
    assert_plain_sense(c, 0x03, 0x11, 0x00);
}

// ---------------------------------------------------------------------------
// CDB builders
// ---------------------------------------------------------------------------

const TEST_UNIT_READY: u8 = 0x00;
const REQUEST_SENSE: u8 = 0x03;
const READ_6: u8 = 0x08;
const WRITE_6: u8 = 0x0a;
const INQUIRY: u8 = 0x12;
const MODE_SENSE_6: u8 = 0x1a;
const START_STOP_UNIT: u8 = 0x1b;
const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
const READ_CAPACITY_10: u8 = 0x25;
const READ_10: u8 = 0x28;
const WRITE_10: u8 = 0x2a;
const WRITE_AND_VERIFY_10: u8 = 0x2e;
const VERIFY_10: u8 = 0x2f;
const SYNCHRONIZE_CACHE_10: u8 = 0x35;
const MODE_SENSE_10: u8 = 0x5a;
const READ_16: u8 = 0x88;
const WRITE_16: u8 = 0x8a;
const WRITE_AND_VERIFY_16: u8 = 0x8e;
const VERIFY_16: u8 = 0x8f;
const SYNCHRONIZE_CACHE_16: u8 = 0x91;
const SERVICE_ACTION_IN_16: u8 = 0x9e;
const REPORT_LUNS: u8 = 0xa0;
const MAINTENANCE_IN: u8 = 0xa3;
const READ_12: u8 = 0xa8;
const WRITE_12: u8 = 0xaa;
const WRITE_AND_VERIFY_12: u8 = 0xae;
const VERIFY_12: u8 = 0xaf;

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

/// A READ/WRITE/VERIFY/SYNCHRONIZE CACHE CDB of the size the opcode's group
/// implies, with `lba` and transfer length `len` (which must fit).
fn block_cdb(op: u8, lba: u64, len: u32) -> Vec<u8> {
    match op >> 5 {
        0 => {
            assert!(lba < 1 << 21 && len <= 256);
            // Transfer length 256 is encoded as 0.
            vec![
                op,
                (lba >> 16) as u8,
                (lba >> 8) as u8,
                lba as u8,
                len as u8,
                0,
            ]
        }
        1 => {
            let mut c = vec![0u8; 10];
            c[0] = op;
            c[2..6].copy_from_slice(&u32::try_from(lba).unwrap().to_be_bytes());
            c[7..9].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            c
        }
        5 => {
            let mut c = vec![0u8; 12];
            c[0] = op;
            c[2..6].copy_from_slice(&u32::try_from(lba).unwrap().to_be_bytes());
            c[6..10].copy_from_slice(&len.to_be_bytes());
            c
        }
        4 => {
            let mut c = vec![0u8; 16];
            c[0] = op;
            c[2..10].copy_from_slice(&lba.to_be_bytes());
            c[10..14].copy_from_slice(&len.to_be_bytes());
            c
        }
        _ => unreachable!("not a block command: {op:#x}"),
    }
}

/// CDB byte holding the transfer length of a block command.
fn length_byte(op: u8) -> u16 {
    match op >> 5 {
        0 => 4,
        1 => 7,
        5 => 6,
        4 => 10,
        _ => unreachable!(),
    }
}

fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![INQUIRY, u8::from(evpd), page, a[0], a[1], 0]
}

fn request_sense(byte1: u8, alloc: u8) -> Vec<u8> {
    vec![REQUEST_SENSE, byte1, 0, 0, alloc, 0]
}

/// MODE SENSE(6): `byte1` holds DBD, `byte2` PC and page code.
fn mode_sense6(byte1: u8, byte2: u8, subpage: u8, alloc: u8) -> Vec<u8> {
    vec![MODE_SENSE_6, byte1, byte2, subpage, alloc, 0]
}

/// MODE SENSE(10): `byte1` holds LLBAA and DBD, `byte2` PC and page code.
fn mode_sense10(byte1: u8, byte2: u8, subpage: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![MODE_SENSE_10, byte1, byte2, subpage, 0, 0, 0, a[0], a[1], 0]
}

fn rc10_cdb(lba: u32, pmi: bool) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = READ_CAPACITY_10;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[8] = u8::from(pmi);
    c
}

fn rc16_cdb(alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = SERVICE_ACTION_IN_16;
    c[1] = 0x10;
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

fn report_luns(select: u8, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = REPORT_LUNS;
    c[2] = select;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// REPORT SUPPORTED OPERATION CODES; `byte2` holds RCTD and REPORTING
/// OPTIONS.
fn rsoc(byte2: u8, opcode: u8, sa: u16, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = MAINTENANCE_IN;
    c[1] = 0x0c;
    c[2] = byte2;
    c[3] = opcode;
    c[4..6].copy_from_slice(&sa.to_be_bytes());
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

fn rstmf(repd: bool, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = MAINTENANCE_IN;
    c[1] = 0x0d;
    c[2] = if repd { 0x80 } else { 0 };
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
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

#[test]
fn request_sense_descriptor_format_is_invalid_field() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &request_sense(0x01, 252), 4096);
    assert_invalid_field(c, 1, Some(0));
    assert!(data.is_empty());
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
    let data = vpd(&f, L0, 0xb0);
    let mut expected = vec![0u8; 64];
    expected[1] = 0xb0;
    expected[3] = 0x3c;
    expected[6..8].copy_from_slice(&8u16.to_be_bytes());
    expected[8..12].copy_from_slice(&((32u32 << 20) / 512).to_be_bytes());
    assert_eq!(data, expected);
    assert_eq!(be32(&data[8..]), 65536);
    // 4096-byte blocks: granularity 1, maximum 8192 blocks.
    let data = vpd(&f, L2, 0xb0);
    expected[6..8].copy_from_slice(&1u16.to_be_bytes());
    expected[8..12].copy_from_slice(&((32u32 << 20) / 4096).to_be_bytes());
    assert_eq!(data, expected);
    assert_eq!(be32(&data[8..]), 8192);
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

#[test]
fn verify_byte_check_is_invalid_field() {
    let f = Fixture::new();
    for op in VERIFIES {
        for bytchk in 1..4u8 {
            let mut cdb = block_cdb(op, 0, 1);
            cdb[1] = bytchk << 1;
            let (c, _) = run_with_out(&f.target, L0, &cdb, 0, &[0u8; 512]);
            assert_invalid_field(c, 1, Some(2));
        }
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

const RW_ERROR_RECOVERY_PAGE: [u8; 12] = [0x01, 0x0a, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn caching_page() -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    p
}

/// GLTSD=1, QUEUE ALGORITHM MODIFIER 1, BUSY TIMEOUT PERIOD FFFFh.
const CONTROL_PAGE: [u8; 12] = [0x0a, 0x0a, 0x02, 0x10, 0, 0, 0, 0, 0xff, 0xff, 0, 0];

fn all_pages() -> Vec<u8> {
    let mut p = RW_ERROR_RECOVERY_PAGE.to_vec();
    p.extend_from_slice(&caching_page());
    p.extend_from_slice(&CONTROL_PAGE);
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

const WP: u8 = 0x80;

#[test]
fn mode_sense6_all_pages() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &mode_sense6(0, 0x3f, 0, 255), 4096);
    assert_good(c);
    let expected = mode6(WP, &short_descriptor(2048, 512), &all_pages());
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
        mode10(WP, false, &short_descriptor(2048, 512), &all_pages())
    );
    assert_eq!(data.len(), 60);
    assert_eq!(usize::from(be16(&data)), data.len() - 2);
}

#[test]
fn mode_sense_single_pages() {
    let f = Fixture::new();
    let pages: [(u8, Vec<u8>); 3] = [
        (0x01, RW_ERROR_RECOVERY_PAGE.to_vec()),
        (0x08, caching_page()),
        (0x0a, CONTROL_PAGE.to_vec()),
    ];
    let desc = short_descriptor(2048, 512);
    for (code, page) in &pages {
        let (c, data) = f.run(L0, &mode_sense6(0, *code, 0, 255), 4096);
        assert_good(c);
        assert_eq!(data, mode6(WP, &desc, page), "page {code:#x}");
        // DBD: no block descriptor.
        let (c, data) = f.run(L0, &mode_sense6(0x08, *code, 0, 255), 4096);
        assert_good(c);
        assert_eq!(data, mode6(WP, &[], page));
        let (c, data) = f.run(L0, &mode_sense10(0, *code, 0, 4096), 4096);
        assert_good(c);
        assert_eq!(data, mode10(WP, false, &desc, page));
        let (c, data) = f.run(L0, &mode_sense10(0x08, *code, 0, 4096), 4096);
        assert_good(c);
        assert_eq!(data, mode10(WP, false, &[], page));
        // Subpage FFh of a page without subpages is the page itself.
        let (c, data) = f.run(L0, &mode_sense6(0x08, *code, 0xff, 255), 4096);
        assert_good(c);
        assert_eq!(data, mode6(WP, &[], page));
    }
}

#[test]
fn mode_sense10_long_lba_descriptor() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &mode_sense10(0x10, 0x3f, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(
        data,
        mode10(WP, true, &long_descriptor(2048, 512), &all_pages())
    );
    assert_eq!(data[4], 0x01, "LONGLBA");
    assert_eq!(be16(&data[6..]), 16);
    // LLBAA with DBD: no descriptor, LONGLBA clear.
    let (c, data) = f.run(L0, &mode_sense10(0x18, 0x0a, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, mode10(WP, false, &[], &CONTROL_PAGE));
}

#[test]
fn mode_sense_huge_disk_block_descriptors() {
    let f = Fixture::new();
    // Short descriptors saturate at FFFFFFFFh.
    let sat = short_descriptor(u32::MAX, 512);
    let (c, data) = f.run(L3, &mode_sense6(0, 0x0a, 0, 255), 4096);
    assert_good(c);
    assert_eq!(data, mode6(WP, &sat, &CONTROL_PAGE));
    let (c, data) = f.run(L3, &mode_sense10(0, 0x0a, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, mode10(WP, false, &sat, &CONTROL_PAGE));
    // The long descriptor holds the real count.
    let (c, data) = f.run(L3, &mode_sense10(0x10, 0x0a, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(
        data,
        mode10(WP, true, &long_descriptor(L3_BLOCKS, 512), &CONTROL_PAGE)
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
    // Changeable: nothing is, so every page is zero after its header.
    let mut changeable = vec![0x01, 0x0a];
    changeable.extend_from_slice(&[0; 10]);
    changeable.extend_from_slice(&[0x08, 0x12]);
    changeable.extend_from_slice(&[0; 18]);
    changeable.extend_from_slice(&[0x0a, 0x0a]);
    changeable.extend_from_slice(&[0; 10]);
    let (c, data) = f.run(L0, &mode_sense6(0, 0x40 | 0x3f, 0, 255), 4096);
    assert_good(c);
    assert_eq!(data, mode6(WP, &desc, &changeable));
    let (c, data) = f.run(L0, &mode_sense10(0x08, 0x40 | 0x08, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, mode10(WP, false, &[], &changeable[12..32]));
    // Default values equal the current ones.
    let (c, data) = f.run(L0, &mode_sense6(0, 0x80 | 0x3f, 0, 255), 4096);
    assert_good(c);
    assert_eq!(data, mode6(WP, &desc, &all_pages()));
    let (c, data) = f.run(L0, &mode_sense10(0, 0x80 | 0x01, 0, 4096), 4096);
    assert_good(c);
    assert_eq!(data, mode10(WP, false, &desc, &RW_ERROR_RECOVERY_PAGE));
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
    for (lun, wp) in [(L0, WP), (L1, WP), (L2, WP), (L4, WP), (L5, 0)] {
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
    let full6 = mode6(WP, &short_descriptor(2048, 512), &all_pages());
    for alloc in [0u8, 1, 4, 12, 13] {
        let (c, data) = f.run(L0, &mode_sense6(0, 0x3f, 0, alloc), 4096);
        assert_good(c);
        assert_eq!(data, full6[..usize::from(alloc)]);
    }
    let full10 = mode10(WP, false, &short_descriptor(2048, 512), &all_pages());
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
/// length), in the order the all-commands listing gives them.
const SUPPORTED: [(u8, Option<u16>, u16); 28] = [
    (TEST_UNIT_READY, None, 6),
    (REQUEST_SENSE, None, 6),
    (READ_6, None, 6),
    (WRITE_6, None, 6),
    (INQUIRY, None, 6),
    (MODE_SENSE_6, None, 6),
    (START_STOP_UNIT, None, 6),
    (PREVENT_ALLOW_MEDIUM_REMOVAL, None, 6),
    (READ_CAPACITY_10, None, 10),
    (READ_10, None, 10),
    (WRITE_10, None, 10),
    (WRITE_AND_VERIFY_10, None, 10),
    (VERIFY_10, None, 10),
    (SYNCHRONIZE_CACHE_10, None, 10),
    (MODE_SENSE_10, None, 10),
    (READ_16, None, 16),
    (WRITE_16, None, 16),
    (WRITE_AND_VERIFY_16, None, 16),
    (VERIFY_16, None, 16),
    (SYNCHRONIZE_CACHE_16, None, 16),
    (SERVICE_ACTION_IN_16, Some(0x10), 16),
    (REPORT_LUNS, None, 12),
    (MAINTENANCE_IN, Some(0x0c), 12),
    (MAINTENANCE_IN, Some(0x0d), 12),
    (READ_12, None, 12),
    (WRITE_12, None, 12),
    (WRITE_AND_VERIFY_12, None, 12),
    (VERIFY_12, None, 12),
];

const TIMEOUTS_DESCRIPTOR: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[test]
fn rsoc_all_commands() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &rsoc(0, 0, 0, 4096), 4096);
    assert_good(c);
    let mut expected = ((SUPPORTED.len() * 8) as u32).to_be_bytes().to_vec();
    for (op, sa, len) in SUPPORTED {
        expected.extend_from_slice(&[op, 0]);
        expected.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
        expected.extend_from_slice(&[0, u8::from(sa.is_some())]);
        expected.extend_from_slice(&len.to_be_bytes());
    }
    assert_eq!(data, expected);
    // The requested opcode and service action are ignored.
    let (c, data) = f.run(L0, &rsoc(0, 0x28, 7, 4096), 4096);
    assert_good(c);
    assert_eq!(data, expected);
}

#[test]
fn rsoc_all_commands_with_timeouts() {
    let f = Fixture::new();
    let (c, data) = f.run(L0, &rsoc(0x80, 0, 0, 4096), 4096);
    assert_good(c);
    let mut expected = ((SUPPORTED.len() * 20) as u32).to_be_bytes().to_vec();
    for (op, sa, len) in SUPPORTED {
        expected.extend_from_slice(&[op, 0]);
        expected.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
        // CTDP=1.
        expected.extend_from_slice(&[0, 0x02 | u8::from(sa.is_some())]);
        expected.extend_from_slice(&len.to_be_bytes());
        expected.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
    }
    assert_eq!(data, expected);
}

#[test]
fn rsoc_one_command_without_service_action() {
    let f = Fixture::new();
    let read10_usage = [READ_10, 0xe0, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04];
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
    // Not supported: SUPPORT 001b, no usage data.
    for op in [0x01u8, 0x42, 0x41, 0x7f, 0xff] {
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

/// The listing agrees with what the target executes: every listed command
/// is recognised, and every other operation code is INVALID COMMAND
/// OPERATION CODE. Every CDB bit the usage data marks as not evaluated is
/// indeed ignored.
#[test]
fn rsoc_listing_matches_the_commands_executed() {
    let f = Fixture::new();
    for op in 0..=255u8 {
        let listed: Vec<_> = SUPPORTED.iter().filter(|s| s.0 == op).collect();
        let mut cdb = [0u8; 16];
        cdb[0] = op;
        if let Some((_, Some(sa), _)) = listed.first() {
            cdb[1] = *sa as u8;
        }
        let (c, _) = f.run(L0, &cdb, 4096);
        if listed.is_empty() {
            assert_invalid_opcode(c);
        } else if let Completion::CheckCondition(s) = c {
            assert_ne!(s.to_fixed()[12], 0x20, "{op:#x} listed but not executed");
        }
    }
    for (op, sa, len) in SUPPORTED {
        let (c, data) = f.run(L0, &rsoc(0x03, op, sa.unwrap_or(0), 4096), 4096);
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
        let reference = f.run(L0, &base, 4096);
        // ... behaves the same with any bit the usage data calls ignored.
        for (i, &mask) in usage.iter().enumerate().skip(1) {
            for bit in 0..8 {
                if mask & (1 << bit) != 0 || (sa.is_some() && i == 1 && bit < 5) {
                    continue;
                }
                let mut cdb = base.clone();
                cdb[i] |= 1 << bit;
                assert_eq!(
                    f.run(L0, &cdb, 4096),
                    reference,
                    "{op:#x}: byte {i} bit {bit} is said to be ignored"
                );
            }
        }
    }
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
    // FORMAT UNIT, READ BUFFER, UNMAP, WRITE SAME, COMPARE AND WRITE,
    // variable length, vendor specific...
    for op in [
        0x01u8, 0x04, 0x15, 0x3c, 0x41, 0x42, 0x55, 0x7f, 0x89, 0x93, 0xc0, 0xff,
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
    let (c, _) = f.run(WLUN, &request_sense(1, 252), 4096);
    assert_invalid_field(c, 1, Some(0));
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
    let (c, _) = f.run(WLUN, &inquiry(true, 0x00, 255), 4096);
    assert_invalid_field(c, 1, Some(0));
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
// Robustness
// ---------------------------------------------------------------------------

/// Random CDBs never panic, always complete in one of the three ways, never
/// write past the data-in buffer, and transfer data only with GOOD status.
#[test]
fn random_cdbs_never_panic() {
    const KNOWN: [u8; 27] = [
        TEST_UNIT_READY,
        REQUEST_SENSE,
        READ_6,
        WRITE_6,
        INQUIRY,
        MODE_SENSE_6,
        START_STOP_UNIT,
        PREVENT_ALLOW_MEDIUM_REMOVAL,
        READ_CAPACITY_10,
        READ_10,
        WRITE_10,
        WRITE_AND_VERIFY_10,
        VERIFY_10,
        SYNCHRONIZE_CACHE_10,
        MODE_SENSE_10,
        READ_16,
        WRITE_16,
        WRITE_AND_VERIFY_16,
        VERIFY_16,
        SYNCHRONIZE_CACHE_16,
        SERVICE_ACTION_IN_16,
        REPORT_LUNS,
        MAINTENANCE_IN,
        READ_12,
        WRITE_12,
        WRITE_AND_VERIFY_12,
        VERIFY_12,
    ];
    const BUFFERS: [usize; 9] = [0, 1, 4, 18, 36, 255, 512, 4096, 65536];
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
    let data_out = pattern(99, 4096);
    let mut rng = XorShift::new(0x5eed);
    let (mut good, mut check, mut too_small) = (0u32, 0u32, 0u32);
    for _ in 0..100_000 {
        let len = rng.below(33) as usize;
        let mut cdb: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if len > 0 && rng.below(2) == 0 {
            cdb[0] = KNOWN[rng.below(KNOWN.len() as u64) as usize];
            // Keep the interesting cases reachable: small service actions,
            // a clear NACA bit, often small LBAs and lengths.
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
        let lun = luns[rng.below(luns.len() as u64) as usize];
        let buffer = BUFFERS[rng.below(BUFFERS.len() as u64) as usize];
        let out = &data_out[..rng.below(data_out.len() as u64 + 1) as usize];
        let mut din = VecDataIn::with_capacity(buffer);
        let mut dout = SliceDataOut::new(out);
        let completion = f.target.execute(lun, &cdb, &mut din, &mut dout);
        assert!(din.data.len() <= buffer, "{cdb:02x?}");
        match completion {
            Completion::Good => good += 1,
            Completion::CheckCondition(s) => {
                check += 1;
                let fixed = s.to_fixed();
                assert!(
                    matches!(fixed[2], 0x03 | 0x05 | 0x07),
                    "unexpected sense key: {fixed:02x?} for {cdb:02x?}"
                );
                assert!(din.data.is_empty(), "data with CHECK CONDITION: {cdb:02x?}");
            }
            Completion::BufferTooSmall => {
                too_small += 1;
                assert!(din.data.is_empty(), "{cdb:02x?}");
            }
        }
    }
    // The generator reaches all three outcomes.
    assert!(
        good > 1000 && check > 1000 && too_small > 10,
        "{good} {check} {too_small}"
    );
}
