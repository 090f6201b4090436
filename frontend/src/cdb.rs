//! CDBs and parameter lists, written out from SPC-4 and SBC-3: the one set
//! of builders the load generator, the daemon's tests and the fuzz targets
//! share. Nothing here is taken from the daemon's own tables (its parser is
//! what they test): every operation code and field offset is the
//! standard's, and each builder cites the section whose CDB layout it
//! encodes. Section numbers are those the daemon's sources cite.
//!
//! Builders fill the fields they are given and leave the rest zero
//! (reserved fields, CONTROL byte). Where a test needs a malformed CDB it
//! changes the bytes of a well-formed one.

/// Operation codes (SPC-4 §6 and SBC-3 §5; the group code in the top three
/// bits gives the CDB length, [`length`]).
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
}

/// Service actions in byte 1 of SERVICE ACTION IN(16) (SBC-3 §5.16, §5.7)
/// and MAINTENANCE IN (SPC-4 §6.35, §6.36).
pub mod service_action {
    pub const READ_CAPACITY_16: u8 = 0x10;
    pub const GET_LBA_STATUS: u8 = 0x12;
    pub const REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0c;
    pub const REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS: u8 = 0x0d;
}

/// FUA, byte 1 bit 3 of READ(10/12/16), WRITE(10/12/16) and COMPARE AND
/// WRITE (SBC-3 §5.8-5.11, §5.32-5.36, §5.3).
pub const FUA: u8 = 0x08;

/// MODE SELECT byte 1: PF (page format) and SP (save pages) (SPC-4 §6.9).
pub const MODE_SELECT_PF: u8 = 0x10;
pub const MODE_SELECT_SP: u8 = 0x01;

/// WRITE SAME byte 1: ANCHOR, UNMAP and (16 only) NDOB (SBC-3 §5.41,
/// §5.42).
pub const WRITE_SAME_ANCHOR: u8 = 0x10;
pub const WRITE_SAME_UNMAP: u8 = 0x08;
pub const WRITE_SAME_NDOB: u8 = 0x01;

/// SYNCHRONIZE CACHE(10) of the whole medium (SBC-3 §5.24: LBA 0 and
/// NUMBER OF LOGICAL BLOCKS 0, "through the last logical block").
pub const SYNCHRONIZE_CACHE_10: [u8; 10] = [op::SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The CDB length the operation code's group implies (SPC-4 §4.2.5.1):
/// group 0 six bytes, groups 1 and 2 ten, group 4 sixteen, group 5 twelve;
/// 0 for the reserved and vendor-specific groups 3, 6 and 7.
pub fn length(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 0,
    }
}

/// A block command — READ, WRITE, WRITE AND VERIFY, VERIFY, WRITE SAME,
/// SYNCHRONIZE CACHE — of the length `op`'s group implies, with the LOGICAL
/// BLOCK ADDRESS `lba` and the TRANSFER LENGTH (or NUMBER OF LOGICAL
/// BLOCKS) `blocks` where SBC-3 puts them: 6 bytes, a 21-bit LBA in bytes
/// 1-3 and the length in byte 4, where 256 is written 0 (§5.8); 10 bytes,
/// LBA in bytes 2-5 and length in bytes 7-8; 12 bytes, LBA in 2-5 and
/// length in 6-9; 16 bytes, LBA in 2-9 and length in 10-13 (READ
/// §5.8-5.11, SYNCHRONIZE CACHE §5.24, VERIFY §5.33, WRITE §5.32-5.36,
/// WRITE AND VERIFY §5.38-5.40, WRITE SAME §5.41-5.42).
///
/// # Panics
///
/// If `lba` or `blocks` does not fit its field, or `op` is not in a group
/// of 6-, 10-, 12- or 16-byte CDBs: a test that wants a field out of range
/// says so with [`block_truncating`].
pub fn block(op: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let (lba_max, blocks_max) = match length(op) {
        6 => ((1 << 21) - 1, 256),
        10 => (u64::from(u32::MAX), u32::from(u16::MAX)),
        12 => (u64::from(u32::MAX), u32::MAX),
        16 => (u64::MAX, u32::MAX),
        _ => panic!("not a block command: {op:#04x}"),
    };
    assert!(
        lba <= lba_max && blocks <= blocks_max,
        "LBA {lba} or length {blocks} does not fit the CDB of {op:#04x}"
    );
    block_truncating(op, lba, blocks)
}

/// [`block`] for generators: fields that do not fit are truncated to their
/// width (the 6-byte LBA to 21 bits), and an operation code of a reserved
/// group gets the 6-byte layout.
pub fn block_truncating(op: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; length(op).max(6)];
    c[0] = op;
    match c.len() {
        6 => {
            c[1] = (lba >> 16) as u8 & 0x1f;
            c[2..4].copy_from_slice(&(lba as u16).to_be_bytes());
            c[4] = blocks as u8;
        }
        10 => {
            c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
            c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
        }
        12 => {
            c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
            c[6..10].copy_from_slice(&blocks.to_be_bytes());
        }
        _ => {
            c[2..10].copy_from_slice(&lba.to_be_bytes());
            c[10..14].copy_from_slice(&blocks.to_be_bytes());
        }
    }
    c
}

/// `cdb` with FUA set (byte 1 bit 3, SBC-3 §5.11, table 38).
pub fn fua(mut cdb: Vec<u8>) -> Vec<u8> {
    cdb[1] |= FUA;
    cdb
}

/// READ(10) (SBC-3 §5.8-5.11, the layout of [`block`]), without
/// allocation.
pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = op::READ_10;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// WRITE(10) (SBC-3 §5.32-5.36, the layout of [`block`]), FUA if asked.
pub fn write10(lba: u32, blocks: u16, fua: bool) -> [u8; 10] {
    let mut cdb = read10(lba, blocks);
    cdb[0] = op::WRITE_10;
    if fua {
        cdb[1] = FUA;
    }
    cdb
}

/// READ(16) (SBC-3 §5.8-5.11), without allocation.
pub fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = op::READ_16;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// WRITE(16) (SBC-3 §5.32-5.36), FUA if asked.
pub fn write16(lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
    let mut cdb = read16(lba, blocks);
    cdb[0] = op::WRITE_16;
    if fua {
        cdb[1] = FUA;
    }
    cdb
}

/// A CDB of up to 16 bytes, without allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cdb {
    bytes: [u8; 16],
    len: u8,
}

impl Cdb {
    /// `bytes` must be at most 16 bytes long; longer input is truncated.
    pub fn new(bytes: &[u8]) -> Cdb {
        let len = bytes.len().min(16);
        let mut cdb = Cdb {
            bytes: [0; 16],
            len: len as u8,
        };
        cdb.bytes[..len].copy_from_slice(&bytes[..len]);
        cdb
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// READ or WRITE of `blocks` at `lba`: the 10-byte CDB when the range fits
/// it (LBA below 2^32, at most 65535 blocks), else the 16-byte one, as
/// Linux's sd driver chooses.
pub fn read_write(write: bool, lba: u64, blocks: u32) -> Cdb {
    let end = lba.checked_add(u64::from(blocks));
    match (u32::try_from(lba), u16::try_from(blocks), end) {
        (Ok(lba10), Ok(blocks10), Some(end)) if end <= 1 << 32 => {
            if write {
                Cdb::new(&write10(lba10, blocks10, false))
            } else {
                Cdb::new(&read10(lba10, blocks10))
            }
        }
        _ => {
            if write {
                Cdb::new(&write16(lba, blocks, false))
            } else {
                Cdb::new(&read16(lba, blocks))
            }
        }
    }
}

/// WRITE SAME(10/16) (SBC-3 §5.41, §5.42): the [`block`] layout with
/// `byte1` holding ANCHOR, UNMAP and (16 only) NDOB.
pub fn write_same(op: u8, byte1: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = block(op, lba, blocks);
    c[1] = byte1;
    c
}

/// VERIFY(10/12/16) (SBC-3 §5.33): the [`block`] layout with BYTCHK in
/// byte 1 bits 2-1.
pub fn verify(op: u8, lba: u64, blocks: u32, bytchk: u8) -> Vec<u8> {
    let mut c = block(op, lba, blocks);
    c[1] = bytchk << 1;
    c
}

/// WRITE AND VERIFY(10/12/16) (SBC-3 §5.38-5.40): the [`block`] layout with
/// BYTCHK in byte 1 bits 2-1 (00b: verify the medium, 01b: compare with the
/// data-out).
pub fn write_and_verify(op: u8, lba: u64, blocks: u32, bytchk: u8) -> Vec<u8> {
    verify(op, lba, blocks, bytchk)
}

/// COMPARE AND WRITE (SBC-3 §5.3): `byte1` holds WRPROTECT, DPO, FUA and
/// FUA_NV; LBA in bytes 2-9, NUMBER OF LOGICAL BLOCKS in byte 13.
pub fn compare_and_write(byte1: u8, lba: u64, blocks: u8) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op::COMPARE_AND_WRITE;
    c[1] = byte1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

/// UNMAP (SBC-3 §5.28): `byte1` holds ANCHOR; PARAMETER LIST LENGTH in
/// bytes 7-8.
pub fn unmap(byte1: u8, param_len: u16) -> Vec<u8> {
    let l = param_len.to_be_bytes();
    vec![op::UNMAP, byte1, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

/// The UNMAP parameter list (SBC-3 §5.28.2): the header (UNMAP DATA LENGTH,
/// UNMAP BLOCK DESCRIPTOR DATA LENGTH) and one 16-byte block descriptor per
/// (LBA, number of logical blocks).
pub fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let descriptors = 16 * ranges.len();
    let mut out = ((6 + descriptors) as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&(descriptors as u16).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for &(lba, blocks) in ranges {
        out.extend_from_slice(&lba.to_be_bytes());
        out.extend_from_slice(&blocks.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
    }
    out
}

/// SERVICE ACTION IN(16) with service action `sa`: READ CAPACITY(16)
/// (SBC-3 §5.16) and GET LBA STATUS (SBC-3 §5.7) put an LBA in bytes 2-9
/// and the ALLOCATION LENGTH in bytes 10-13.
pub fn service_action_in(sa: u8, lba: u64, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op::SERVICE_ACTION_IN_16;
    c[1] = sa;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// READ CAPACITY(16) (SBC-3 §5.16).
pub fn read_capacity16(alloc: u32) -> Vec<u8> {
    service_action_in(service_action::READ_CAPACITY_16, 0, alloc)
}

/// GET LBA STATUS (SBC-3 §5.7) from `lba`.
pub fn get_lba_status(lba: u64, alloc: u32) -> Vec<u8> {
    service_action_in(service_action::GET_LBA_STATUS, lba, alloc)
}

/// READ CAPACITY(10) (SBC-3 §5.15): LBA in bytes 2-5, PMI in byte 8 bit 0.
pub fn read_capacity10(lba: u32, pmi: bool) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = op::READ_CAPACITY_10;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[8] = u8::from(pmi);
    c
}

/// INQUIRY (SPC-4 §6.6): EVPD in byte 1 bit 0, PAGE CODE in byte 2,
/// ALLOCATION LENGTH in bytes 3-4.
pub fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![op::INQUIRY, u8::from(evpd), page, a[0], a[1], 0]
}

/// REQUEST SENSE (SPC-4 §6.39): `byte1` holds DESC, ALLOCATION LENGTH in
/// byte 4.
pub fn request_sense(byte1: u8, alloc: u8) -> Vec<u8> {
    vec![op::REQUEST_SENSE, byte1, 0, 0, alloc, 0]
}

/// MODE SENSE(6) (SPC-4 §6.11): `byte1` holds DBD, `byte2` PC and PAGE
/// CODE, SUBPAGE CODE in byte 3, ALLOCATION LENGTH in byte 4.
pub fn mode_sense6(byte1: u8, byte2: u8, subpage: u8, alloc: u8) -> Vec<u8> {
    vec![op::MODE_SENSE_6, byte1, byte2, subpage, alloc, 0]
}

/// MODE SENSE(10) (SPC-4 §6.12): `byte1` holds LLBAA and DBD, `byte2` PC
/// and PAGE CODE, SUBPAGE CODE in byte 3, ALLOCATION LENGTH in bytes 7-8.
pub fn mode_sense10(byte1: u8, byte2: u8, subpage: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![
        op::MODE_SENSE_10,
        byte1,
        byte2,
        subpage,
        0,
        0,
        0,
        a[0],
        a[1],
        0,
    ]
}

/// MODE SELECT(6) (SPC-4 §6.9): `byte1` holds PF and SP, PARAMETER LIST
/// LENGTH in byte 4.
pub fn mode_select6(byte1: u8, len: u8) -> Vec<u8> {
    vec![op::MODE_SELECT_6, byte1, 0, 0, len, 0]
}

/// MODE SELECT(10) (SPC-4 §6.10): `byte1` holds PF and SP, PARAMETER LIST
/// LENGTH in bytes 7-8.
pub fn mode_select10(byte1: u8, len: u16) -> Vec<u8> {
    let l = len.to_be_bytes();
    vec![op::MODE_SELECT_10, byte1, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

/// A MODE SELECT(6) parameter list (SPC-4 §7.5.4, table 450): the mode
/// parameter header (MODE DATA LENGTH, MEDIUM TYPE and DEVICE-SPECIFIC
/// PARAMETER zero, BLOCK DESCRIPTOR LENGTH), the block descriptor, the
/// pages.
pub fn mode_select6_list(descriptor: &[u8], pages: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0, descriptor.len() as u8];
    out.extend_from_slice(descriptor);
    out.extend_from_slice(pages);
    out
}

/// A MODE SELECT(10) parameter list (SPC-4 §7.5.4, table 451): the mode
/// parameter header with LONGLBA (byte 4 bit 0) and a two-byte BLOCK
/// DESCRIPTOR LENGTH, the block descriptor, the pages.
pub fn mode_select10_list(long_lba: bool, descriptor: &[u8], pages: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0, u8::from(long_lba), 0];
    out.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
    out.extend_from_slice(descriptor);
    out.extend_from_slice(pages);
    out
}

/// REPORT LUNS (SPC-4 §6.33): SELECT REPORT in byte 2, ALLOCATION LENGTH
/// in bytes 6-9.
pub fn report_luns(select: u8, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = op::REPORT_LUNS;
    c[2] = select;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35): `byte2` holds RCTD and
/// REPORTING OPTIONS, REQUESTED OPERATION CODE in byte 3, REQUESTED SERVICE
/// ACTION in bytes 4-5, ALLOCATION LENGTH in bytes 6-9.
pub fn report_supported_opcodes(byte2: u8, opcode: u8, sa: u16, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = op::MAINTENANCE_IN;
    c[1] = service_action::REPORT_SUPPORTED_OPERATION_CODES;
    c[2] = byte2;
    c[3] = opcode;
    c[4..6].copy_from_slice(&sa.to_be_bytes());
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.36): REPD in byte
/// 2 bit 7, ALLOCATION LENGTH in bytes 6-9.
pub fn report_supported_tmfs(repd: bool, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = op::MAINTENANCE_IN;
    c[1] = service_action::REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS;
    c[2] = if repd { 0x80 } else { 0 };
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_byte_cdbs_below_two_tib() {
        assert_eq!(read_write(false, 8, 8).as_slice(), &read10(8, 8));
        assert_eq!(
            read_write(true, 0xffff_fff8, 8).as_slice(),
            &write10(0xffff_fff8, 8, false)
        );
        // The last block below 2^32 is still reachable with READ(10).
        assert_eq!(read_write(false, 0xffff_ffff, 1).as_slice()[0], 0x28);
    }

    #[test]
    fn sixteen_byte_cdbs_beyond() {
        assert_eq!(
            read_write(false, 1 << 32, 8).as_slice(),
            &read16(1 << 32, 8)
        );
        // Crossing 2^32 blocks.
        assert_eq!(read_write(true, 0xffff_fffc, 8).as_slice()[0], 0x8a);
        // More blocks than READ(10) can carry.
        assert_eq!(read_write(false, 0, 0x1_0000).as_slice()[0], 0x88);
    }

    #[test]
    fn block_layouts_by_group() {
        // READ(6): 21-bit LBA, 256 blocks written as 0.
        assert_eq!(
            block(op::READ_6, 0x12_3456, 256),
            [0x08, 0x12, 0x34, 0x56, 0, 0]
        );
        assert_eq!(
            block(op::WRITE_10, 0x0102_0304, 0x0506),
            [0x2a, 0, 1, 2, 3, 4, 0, 5, 6, 0]
        );
        assert_eq!(
            block(op::READ_12, 0x0102_0304, 0x0506_0708),
            [0xa8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0]
        );
        assert_eq!(
            block(op::VERIFY_16, 0x0102_0304_0506_0708, 0x090a_0b0c),
            [0x8f, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0]
        );
        assert_eq!(&block(op::READ_10, 7, 2)[..], &read10(7, 2));
        assert_eq!(&fua(block(op::WRITE_16, 3, 1))[..], &write16(3, 1, true));
    }

    #[test]
    fn truncating_keeps_the_low_bits() {
        assert_eq!(
            block_truncating(op::READ_6, 0xff_ffff, 0x1ff),
            [0x08, 0x1f, 0xff, 0xff, 0xff, 0]
        );
        assert_eq!(
            block_truncating(op::READ_10, 1 << 32 | 5, 1 << 16 | 3),
            [0x28, 0, 0, 0, 0, 5, 0, 0, 3, 0]
        );
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn block_refuses_what_does_not_fit() {
        block(op::READ_10, 1 << 32, 1);
    }

    #[test]
    fn lengths_by_group() {
        for (opcode, len) in [
            (op::INQUIRY, 6),
            (op::READ_10, 10),
            (op::UNMAP, 10),
            (0x60, 0),
            (op::READ_16, 16),
            (op::REPORT_LUNS, 12),
            (0xc0, 0),
        ] {
            assert_eq!(length(opcode), len, "{opcode:#x}");
        }
    }
}
