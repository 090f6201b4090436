//! Sense data (SPC-4 §4.5): named sense key / ASC / ASCQ triples and their
//! fixed-format encoding.
//!
//! Command code never writes bare triples: it returns a [`super::error::CommandError`],
//! which maps to one of the constants here in a single place.

/// Sense keys (SPC-4 §4.5.6, table 49).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    AbortedCommand = 0xb,
    Miscompare = 0xe,
}

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
}

const fn sense(key: SenseKey, asc: u8, ascq: u8) -> Sense {
    Sense { key, asc, ascq }
}

// Additional sense codes (SPC-4 Annex D, table D.1).
pub const NO_ADDITIONAL_SENSE: Sense = sense(SenseKey::NoSense, 0x00, 0x00);
pub const INVALID_COMMAND_OPERATION_CODE: Sense = sense(SenseKey::IllegalRequest, 0x20, 0x00);
pub const LBA_OUT_OF_RANGE: Sense = sense(SenseKey::IllegalRequest, 0x21, 0x00);
pub const INVALID_FIELD_IN_CDB: Sense = sense(SenseKey::IllegalRequest, 0x24, 0x00);
pub const LOGICAL_UNIT_NOT_SUPPORTED: Sense = sense(SenseKey::IllegalRequest, 0x25, 0x00);
pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = sense(SenseKey::IllegalRequest, 0x39, 0x00);
pub const WRITE_PROTECTED: Sense = sense(SenseKey::DataProtect, 0x27, 0x00);
pub const UNRECOVERED_READ_ERROR: Sense = sense(SenseKey::MediumError, 0x11, 0x00);
pub const WRITE_ERROR: Sense = sense(SenseKey::MediumError, 0x0c, 0x00);
pub const INTERNAL_TARGET_FAILURE: Sense = sense(SenseKey::HardwareError, 0x44, 0x00);

/// Where in the CDB the offending field is (SPC-4 §4.5.2.4.2, field pointer
/// sense-key specific data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// Byte of the CDB holding the field.
    pub byte: u16,
    /// Most significant bit of the field within that byte, if it does not
    /// start on a byte boundary.
    pub bit: Option<u8>,
}

/// Length of fixed-format sense data with the sense-key specific bytes
/// (SPC-4 §4.5.3: additional sense length 10).
pub const FIXED_SENSE_LEN: usize = 18;

/// Response code for current errors in fixed format (SPC-4 §4.5.3).
const RESPONSE_CODE_CURRENT_FIXED: u8 = 0x70;

/// Sense data as returned to the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenseData {
    pub sense: Sense,
    pub field: Option<FieldPointer>,
}

impl SenseData {
    pub const fn new(sense: Sense) -> Self {
        SenseData { sense, field: None }
    }

    /// Fixed-format encoding (SPC-4 §4.5.3, table 45).
    pub fn to_fixed(self) -> [u8; FIXED_SENSE_LEN] {
        let mut buf = [0u8; FIXED_SENSE_LEN];
        buf[0] = RESPONSE_CODE_CURRENT_FIXED;
        buf[2] = self.sense.key as u8;
        buf[7] = (FIXED_SENSE_LEN - 8) as u8;
        buf[12] = self.sense.asc;
        buf[13] = self.sense.ascq;
        if let Some(field) = self.field {
            // SKSV=1, C/D=1 (the error is in the CDB), BPV and bit pointer.
            buf[15] = 0x80 | 0x40;
            if let Some(bit) = field.bit {
                buf[15] |= 0x08 | (bit & 0x07);
            }
            buf[16..18].copy_from_slice(&field.byte.to_be_bytes());
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let data = SenseData::new(LBA_OUT_OF_RANGE).to_fixed();
        assert_eq!(data[0], 0x70);
        assert_eq!(data[2], 0x05);
        assert_eq!(data[7], 10);
        assert_eq!((data[12], data[13]), (0x21, 0x00));
        assert_eq!(data[15], 0);
    }

    #[test]
    fn field_pointer_with_bit() {
        let data = SenseData {
            sense: INVALID_FIELD_IN_CDB,
            field: Some(FieldPointer {
                byte: 2,
                bit: Some(5),
            }),
        }
        .to_fixed();
        assert_eq!(data[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(&data[16..18], &[0, 2]);
    }

    #[test]
    fn field_pointer_whole_byte() {
        let data = SenseData {
            sense: INVALID_FIELD_IN_CDB,
            field: Some(FieldPointer {
                byte: 0x0102,
                bit: None,
            }),
        }
        .to_fixed();
        assert_eq!(data[15], 0xc0);
        assert_eq!(&data[16..18], &[1, 2]);
    }
}
