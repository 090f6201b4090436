//! Sense data (SPC-4 §4.5) as an initiator reads it, and the checks the
//! tests make on it: the sense key, ASC and ASCQ of a CHECK CONDITION in
//! fixed (§4.5.3) or descriptor (§4.5.2) format, field pointers (§4.5.2.4.2)
//! and INFORMATION, written out from the standard, never taken from the
//! daemon. The `assert_*` functions panic where a test should fail (they
//! are test assertions); [`key_asc_ascq`] and [`check_sense`] read any
//! bytes.
//!
//! A CHECK CONDITION comes from the emulator as a
//! [`Completion`], over a socket as a
//! [`Reply`] or as raw sense bytes: all three are a [`CheckCondition`].

use vhost_device_scsi::scsi::Completion;

use crate::Reply;

/// SCSI status CHECK CONDITION (SAM-5).
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys (SPC-4 §4.5.6, table 49).
pub mod key {
    pub const NO_SENSE: u8 = 0x00;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const MISCOMPARE: u8 = 0x0e;
}

/// Sense key, ASC and ASCQ (SPC-4 Annex D) of the conditions the tests
/// expect.
pub mod code {
    use super::key::*;

    pub const INVALID_COMMAND_OPERATION_CODE: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x24, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x25, 0x00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x39, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x26, 0x00);
    pub const INVALID_FIELD_IN_COMMAND_IU: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x0e, 0x03);
    pub const WRITE_PROTECTED: (u8, u8, u8) = (DATA_PROTECT, 0x27, 0x00);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: (u8, u8, u8) = (DATA_PROTECT, 0x27, 0x07);
    pub const UNRECOVERED_READ_ERROR: (u8, u8, u8) = (MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: (u8, u8, u8) = (MEDIUM_ERROR, 0x0c, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: (u8, u8, u8) = (MISCOMPARE, 0x1d, 0x00);
}

/// Sense key, ASC and ASCQ of sense data in either format, by its response
/// code: descriptor format (72h/73h) keeps them in bytes 1-3, fixed format
/// in bytes 2, 12 and 13. Bytes missing read as zero.
pub fn key_asc_ascq(sense: &[u8]) -> (u8, u8, u8) {
    let at = |i: usize| sense.get(i).copied().unwrap_or(0);
    if matches!(at(0) & 0x7f, 0x72 | 0x73) {
        (at(1) & 0x0f, at(2), at(3))
    } else {
        (at(2) & 0x0f, at(12), at(13))
    }
}

/// Something that must be a CHECK CONDITION, and its sense bytes.
pub trait CheckCondition {
    /// The sense bytes; panics if this is not a CHECK CONDITION.
    #[track_caller]
    fn sense(self) -> Vec<u8>;
}

impl CheckCondition for Completion {
    /// The sense data in the format the logical unit uses; in fixed format
    /// it must be what the sense data's fixed form is.
    #[track_caller]
    fn sense(self) -> Vec<u8> {
        let Completion::CheckCondition(data) = &self else {
            panic!("expected CHECK CONDITION, got {self:?}");
        };
        assert_eq!(self.status(), CHECK_CONDITION);
        let bytes = data.encode().as_slice().to_vec();
        if bytes.first().is_some_and(|b| b & 0x7f == 0x70) {
            assert_eq!(bytes, data.to_fixed(), "sent in fixed format");
        }
        bytes
    }
}

impl CheckCondition for &Reply {
    /// VIRTIO_SCSI_S_OK with status CHECK CONDITION.
    #[track_caller]
    fn sense(self) -> Vec<u8> {
        assert_eq!(
            (self.response, self.status),
            (0, CHECK_CONDITION),
            "CHECK CONDITION expected: {self:?}"
        );
        self.sense.clone()
    }
}

impl CheckCondition for &[u8] {
    fn sense(self) -> Vec<u8> {
        self.to_vec()
    }
}

/// CHECK CONDITION with fixed-format sense (SPC-4 §4.5.3): current error
/// (70h), ADDITIONAL SENSE LENGTH 10, `key`/`asc`/`ascq`; returns the 18
/// bytes.
#[track_caller]
pub fn assert_sense(c: impl CheckCondition, key: u8, asc: u8, ascq: u8) -> [u8; 18] {
    let bytes = c.sense();
    let Ok(s) = <[u8; 18]>::try_from(bytes.as_slice()) else {
        panic!("fixed-format sense is 18 bytes: {bytes:02x?}");
    };
    assert_eq!(s[0], 0x70, "current error, fixed format: {s:02x?}");
    assert_eq!(s[7], 10, "additional sense length: {s:02x?}");
    assert_eq!((s[2], s[12], s[13]), (key, asc, ascq), "sense {s:02x?}");
    s
}

/// [`assert_sense`], without sense-key specific data (SKSV=0).
#[track_caller]
pub fn assert_plain_sense(c: impl CheckCondition, key: u8, asc: u8, ascq: u8) {
    let s = assert_sense(c, key, asc, ascq);
    assert_eq!(&s[15..18], &[0, 0, 0], "no SKSV: {s:02x?}");
}

/// ILLEGAL REQUEST / INVALID FIELD IN CDB with the field pointer at CDB
/// byte `byte`, bit `bit` (None: the field starts on a byte boundary):
/// SKSV=1, C/D=1, BPV and BIT POINTER (SPC-4 §4.5.2.4.2).
#[track_caller]
pub fn assert_invalid_field(c: impl CheckCondition, byte: u16, bit: Option<u8>) {
    let s = assert_sense(c, key::ILLEGAL_REQUEST, 0x24, 0x00);
    let b15 = match bit {
        Some(bit) => 0xc8 | bit,
        None => 0xc0,
    };
    assert_eq!(s[15], b15, "sense-key specific byte 15: {s:02x?}");
    assert_eq!(&s[16..18], &byte.to_be_bytes(), "field pointer: {s:02x?}");
}

/// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST with the field
/// pointer at byte `byte` of the parameter list: C/D=0 (SPC-4 §4.5.2.4.2).
#[track_caller]
pub fn assert_invalid_param(c: impl CheckCondition, byte: u16, bit: Option<u8>) {
    let s = assert_sense(c, key::ILLEGAL_REQUEST, 0x26, 0x00);
    let b15 = match bit {
        Some(bit) => 0x88 | bit,
        None => 0x80,
    };
    assert_eq!(s[15], b15, "sense-key specific byte 15: {s:02x?}");
    assert_eq!(&s[16..18], &byte.to_be_bytes(), "field pointer: {s:02x?}");
}

#[track_caller]
pub fn assert_invalid_opcode(c: impl CheckCondition) {
    let (key, asc, ascq) = code::INVALID_COMMAND_OPERATION_CODE;
    assert_plain_sense(c, key, asc, ascq);
}

#[track_caller]
pub fn assert_lba_out_of_range(c: impl CheckCondition) {
    let (key, asc, ascq) = code::LBA_OUT_OF_RANGE;
    assert_plain_sense(c, key, asc, ascq);
}

#[track_caller]
pub fn assert_lun_not_supported(c: impl CheckCondition) {
    let (key, asc, ascq) = code::LOGICAL_UNIT_NOT_SUPPORTED;
    assert_plain_sense(c, key, asc, ascq);
}

#[track_caller]
pub fn assert_write_protected(c: impl CheckCondition) {
    let (key, asc, ascq) = code::WRITE_PROTECTED;
    assert_plain_sense(c, key, asc, ascq);
}

/// MEDIUM ERROR / UNRECOVERED READ ERROR.
#[track_caller]
pub fn assert_medium_error(c: impl CheckCondition) {
    let (key, asc, ascq) = code::UNRECOVERED_READ_ERROR;
    assert_plain_sense(c, key, asc, ascq);
}

/// MEDIUM ERROR / WRITE ERROR: a failed write or flush.
#[track_caller]
pub fn assert_write_error(c: impl CheckCondition) {
    let (key, asc, ascq) = code::WRITE_ERROR;
    assert_plain_sense(c, key, asc, ascq);
}

/// DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (SBC-3 §4.7.3.6).
#[track_caller]
pub fn assert_space_allocation_failed(c: impl CheckCondition) {
    let (key, asc, ascq) = code::SPACE_ALLOCATION_FAILED_WRITE_PROTECT;
    assert_plain_sense(c, key, asc, ascq);
}

#[track_caller]
pub fn assert_param_list_length_error(c: impl CheckCondition) {
    let (key, asc, ascq) = code::PARAMETER_LIST_LENGTH_ERROR;
    assert_plain_sense(c, key, asc, ascq);
}

/// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION in fixed format, with
/// VALID=1 and the INFORMATION field (bytes 3-6) holding `offset` (SBC-3
/// §5.3, SPC-4 §4.5.3).
#[track_caller]
pub fn assert_miscompare(c: impl CheckCondition, offset: u32) {
    let s = c.sense();
    let mut expected = vec![0u8; 18];
    expected[0] = 0xf0;
    expected[2] = key::MISCOMPARE;
    expected[3..7].copy_from_slice(&offset.to_be_bytes());
    expected[7] = 10;
    expected[12] = 0x1d;
    assert_eq!(s, expected);
}

/// CHECK CONDITION with descriptor-format sense (SPC-4 §4.5.2): response
/// code 72h, `key`/`asc`/`ascq`, the additional length matching; returns
/// the descriptors.
#[track_caller]
pub fn assert_descriptor_sense(c: impl CheckCondition, key: u8, asc: u8, ascq: u8) -> Vec<u8> {
    let s = c.sense();
    assert!(s.len() >= 8, "descriptor sense too short: {s:02x?}");
    assert_eq!(&s[..4], &[0x72, key, asc, ascq], "{s:02x?}");
    assert_eq!(&s[4..7], &[0, 0, 0], "{s:02x?}");
    assert_eq!(
        usize::from(s[7]),
        s.len() - 8,
        "additional length: {s:02x?}"
    );
    s[8..].to_vec()
}

/// Every (key, ASC, ASCQ) the target may report, written out here rather
/// than taken from the daemon.
const KNOWN_SENSE: [(u8, u8, u8); 13] = [
    code::INVALID_COMMAND_OPERATION_CODE,
    code::LBA_OUT_OF_RANGE,
    code::INVALID_FIELD_IN_CDB,
    code::LOGICAL_UNIT_NOT_SUPPORTED,
    code::SAVING_PARAMETERS_NOT_SUPPORTED,
    code::PARAMETER_LIST_LENGTH_ERROR,
    code::INVALID_FIELD_IN_PARAMETER_LIST,
    code::INVALID_FIELD_IN_COMMAND_IU,
    code::WRITE_PROTECTED,
    code::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    code::UNRECOVERED_READ_ERROR,
    code::WRITE_ERROR,
    code::MISCOMPARE_DURING_VERIFY,
];

/// What is known about the command a sense came from.
pub struct SenseContext {
    /// CDB length the operation code implies (field pointers into the CDB
    /// must stay inside it).
    pub cdb_len: usize,
    /// Bytes of parameter data the command had (field pointers into the
    /// parameter list must stay inside it).
    pub param_len: usize,
    /// The descriptor format the logical unit is in (D_SENSE).
    pub descriptor: bool,
}

/// The parts of a well-formed sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    pub information: Option<u64>,
}

/// Checks that `sense` is well-formed current-error sense data (SPC-4
/// §4.5.2 descriptor or §4.5.3 fixed format) in the format the unit is in,
/// with a known key/ASC/ASCQ, a field pointer only for INVALID FIELD (and
/// pointing inside the CDB or parameter list), and INFORMATION only for a
/// miscompare. Panics otherwise.
pub fn check_sense(sense: &[u8], ctx: &SenseContext) -> Parsed {
    assert!(!sense.is_empty(), "empty sense data");
    let (parsed, field) = if ctx.descriptor {
        check_descriptor_sense(sense)
    } else {
        check_fixed_sense(sense)
    };
    assert!(
        KNOWN_SENSE.contains(&(parsed.key, parsed.asc, parsed.ascq)),
        "unknown sense {sense:02x?}"
    );
    match field {
        Some(sks) => {
            assert!(
                parsed.key == key::ILLEGAL_REQUEST && matches!(parsed.asc, 0x24 | 0x26),
                "field pointer without INVALID FIELD: {sense:02x?}"
            );
            let in_cdb = sks[0] & 0x40 != 0;
            assert_eq!(in_cdb, parsed.asc == 0x24, "C/D bit: {sense:02x?}");
            assert_eq!(sks[0] & 0x30, 0, "reserved bits: {sense:02x?}");
            let byte = usize::from(u16::from_be_bytes([sks[1], sks[2]]));
            let limit = if in_cdb { ctx.cdb_len } else { ctx.param_len };
            assert!(
                byte < limit,
                "field pointer {byte} outside the {limit}-byte {}: {sense:02x?}",
                if in_cdb { "CDB" } else { "parameter list" }
            );
        }
        None => assert!(
            !(parsed.key == key::ILLEGAL_REQUEST && parsed.asc == 0x24),
            "INVALID FIELD IN CDB without a field pointer: {sense:02x?}"
        ),
    }
    if parsed.information.is_some() {
        assert_eq!(parsed.key, key::MISCOMPARE, "INFORMATION: {sense:02x?}");
    }
    parsed
}

fn check_fixed_sense(sense: &[u8]) -> (Parsed, Option<[u8; 3]>) {
    assert_eq!(sense.len(), 18, "fixed sense length: {sense:02x?}");
    assert_eq!(
        sense[0] & 0x7f,
        0x70,
        "fixed-format response code: {sense:02x?}"
    );
    assert_eq!(
        usize::from(sense[7]),
        sense.len() - 8,
        "ADDITIONAL SENSE LENGTH"
    );
    assert_eq!(sense[2] & 0xf0, 0, "FILEMARK/EOM/ILI: {sense:02x?}");
    let information = (sense[0] & 0x80 != 0).then(|| {
        u64::from(u32::from_be_bytes(
            sense[3..7].try_into().unwrap_or_default(),
        ))
    });
    let sks = [sense[15], sense[16], sense[17]];
    let field = if sks[0] & 0x80 != 0 {
        Some(sks)
    } else {
        assert_eq!(sks, [0, 0, 0], "sense-key specific bytes without SKSV");
        None
    };
    let parsed = Parsed {
        key: sense[2] & 0x0f,
        asc: sense[12],
        ascq: sense[13],
        information,
    };
    (parsed, field)
}

fn check_descriptor_sense(sense: &[u8]) -> (Parsed, Option<[u8; 3]>) {
    assert!(sense.len() >= 8, "descriptor sense too short: {sense:02x?}");
    assert_eq!(
        sense[0], 0x72,
        "descriptor-format response code: {sense:02x?}"
    );
    assert_eq!(
        usize::from(sense[7]),
        sense.len() - 8,
        "ADDITIONAL SENSE LENGTH"
    );
    let mut information = None;
    let mut field = None;
    let mut rest = &sense[8..];
    while !rest.is_empty() {
        assert!(rest.len() >= 2, "truncated descriptor: {sense:02x?}");
        let len = 2 + usize::from(rest[1]);
        assert!(
            rest.len() >= len,
            "descriptor overruns the sense: {sense:02x?}"
        );
        let d = &rest[..len];
        match d[0] {
            // Information (SPC-4 §4.5.2.2): VALID set, 8-byte INFORMATION.
            0x00 => {
                assert_eq!(&d[1..4], &[0x0a, 0x80, 0x00], "{sense:02x?}");
                assert!(information.is_none(), "two information descriptors");
                information = Some(u64::from_be_bytes(d[4..12].try_into().unwrap_or_default()));
            }
            // Sense-key specific (SPC-4 §4.5.2.3).
            0x02 => {
                assert_eq!(&d[1..4], &[0x06, 0x00, 0x00], "{sense:02x?}");
                assert!(field.is_none(), "two sense-key specific descriptors");
                assert!(d[4] & 0x80 != 0, "SKSV clear: {sense:02x?}");
                field = Some([d[4], d[5], d[6]]);
            }
            other => panic!("unexpected sense descriptor type {other:#x}: {sense:02x?}"),
        }
        rest = &rest[len..];
    }
    let parsed = Parsed {
        key: sense[1] & 0x0f,
        asc: sense[2],
        ascq: sense[3],
        information,
    };
    (parsed, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_asc_ascq_in_both_formats() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x05;
        fixed[12] = 0x24;
        assert_eq!(key_asc_ascq(&fixed), code::INVALID_FIELD_IN_CDB);
        assert_eq!(
            key_asc_ascq(&[0x72, 0x07, 0x27, 0x07, 0, 0, 0, 0]),
            code::SPACE_ALLOCATION_FAILED_WRITE_PROTECT
        );
        assert_eq!(key_asc_ascq(&[]), (0, 0, 0));
    }
}
