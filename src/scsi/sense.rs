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
pub(crate) const NO_ADDITIONAL_SENSE: Sense = sense(SenseKey::NoSense, 0x00, 0x00);
pub(crate) const INVALID_COMMAND_OPERATION_CODE: Sense =
    sense(SenseKey::IllegalRequest, 0x20, 0x00);
pub const LBA_OUT_OF_RANGE: Sense = sense(SenseKey::IllegalRequest, 0x21, 0x00);
pub const INVALID_FIELD_IN_CDB: Sense = sense(SenseKey::IllegalRequest, 0x24, 0x00);
pub(crate) const LOGICAL_UNIT_NOT_SUPPORTED: Sense = sense(SenseKey::IllegalRequest, 0x25, 0x00);
pub(crate) const SAVING_PARAMETERS_NOT_SUPPORTED: Sense =
    sense(SenseKey::IllegalRequest, 0x39, 0x00);
pub const WRITE_PROTECTED: Sense = sense(SenseKey::DataProtect, 0x27, 0x00);
pub(crate) const UNRECOVERED_READ_ERROR: Sense = sense(SenseKey::MediumError, 0x11, 0x00);
pub const WRITE_ERROR: Sense = sense(SenseKey::MediumError, 0x0c, 0x00);
pub(crate) const INTERNAL_TARGET_FAILURE: Sense = sense(SenseKey::HardwareError, 0x44, 0x00);
pub(crate) const PARAMETER_LIST_LENGTH_ERROR: Sense = sense(SenseKey::IllegalRequest, 0x1a, 0x00);
pub(crate) const INVALID_FIELD_IN_PARAMETER_LIST: Sense =
    sense(SenseKey::IllegalRequest, 0x26, 0x00);
/// The command's data does not match what its CDB implies (the transport's
/// command as a whole, not one CDB field, is at fault).
pub(crate) const INVALID_FIELD_IN_COMMAND_IU: Sense = sense(SenseKey::IllegalRequest, 0x0e, 0x03);
pub(crate) const MISCOMPARE_DURING_VERIFY: Sense = sense(SenseKey::Miscompare, 0x1d, 0x00);
/// Unit attention conditions (SAM-5 §5.14; SPC-4 Annex D, table D.1).
pub(crate) const BUS_DEVICE_RESET_FUNCTION_OCCURRED: Sense =
    sense(SenseKey::UnitAttention, 0x29, 0x03);
pub(crate) const I_T_NEXUS_LOSS_OCCURRED: Sense = sense(SenseKey::UnitAttention, 0x29, 0x07);
pub(crate) const CAPACITY_DATA_HAS_CHANGED: Sense = sense(SenseKey::UnitAttention, 0x2a, 0x09);
pub(crate) const REPORTED_LUNS_DATA_HAS_CHANGED: Sense = sense(SenseKey::UnitAttention, 0x3f, 0x0e);
/// A command that could not reach the storage behind the unit (a network
/// server or remote target unreachable): SPC-4 Annex D, 08h/00h and
/// 08h/01h, with ABORTED COMMAND, which initiators retry (the command was
/// not carried out, or may be again).
pub(crate) const LOGICAL_UNIT_COMMUNICATION_FAILURE: Sense =
    sense(SenseKey::AbortedCommand, 0x08, 0x00);
pub(crate) const LOGICAL_UNIT_COMMUNICATION_TIME_OUT: Sense =
    sense(SenseKey::AbortedCommand, 0x08, 0x01);
/// SBC-3 §4.7.3.6: a thin-provisioned write that found no space.
pub(crate) const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Sense =
    sense(SenseKey::DataProtect, 0x27, 0x07);

/// Where the offending field is: in the CDB or in the parameter list
/// (SPC-4 §4.5.2.4.2, field pointer sense-key specific data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// The field is in the CDB (C/D=1), not in the parameter data.
    pub in_cdb: bool,
    /// Byte holding the field.
    pub byte: u16,
    /// Most significant bit of the field within that byte, if it does not
    /// start on a byte boundary.
    pub bit: Option<u8>,
}

impl FieldPointer {
    /// The three sense-key specific bytes: SKSV, C/D, BPV, bit pointer,
    /// field pointer.
    fn bytes(self) -> [u8; 3] {
        let mut b = [0x80, 0, 0];
        if self.in_cdb {
            b[0] |= 0x40;
        }
        if let Some(bit) = self.bit {
            b[0] |= 0x08 | (bit & 0x07);
        }
        b[1..3].copy_from_slice(&self.byte.to_be_bytes());
        b
    }
}

/// Length of fixed-format sense data with the sense-key specific bytes
/// (SPC-4 §4.5.3: additional sense length 10).
pub(crate) const FIXED_SENSE_LEN: usize = 18;
/// Longest sense data built here: descriptor format with an information
/// and a sense-key specific descriptor.
pub(crate) const MAX_SENSE_LEN: usize = 8 + 12 + 8;

/// Response codes for current errors (SPC-4 §4.5.1, table 27).
const RESPONSE_CODE_CURRENT_FIXED: u8 = 0x70;
const RESPONSE_CODE_CURRENT_DESCRIPTOR: u8 = 0x72;

/// Sense data as returned to the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenseData {
    pub sense: Sense,
    pub field: Option<FieldPointer>,
    /// The INFORMATION field (e.g. the offset of a miscompare).
    pub information: Option<u64>,
    /// Descriptor format (D_SENSE=1 in the control mode page) rather than
    /// fixed format.
    pub descriptor_format: bool,
}

/// Encoded sense data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenseBytes {
    buf: [u8; MAX_SENSE_LEN],
    len: usize,
}

impl SenseBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl SenseData {
    pub const fn new(sense: Sense) -> Self {
        SenseData {
            sense,
            field: None,
            information: None,
            descriptor_format: false,
        }
    }

    /// Encodes in the format `descriptor_format` selects.
    pub fn encode(&self) -> SenseBytes {
        let mut buf = [0u8; MAX_SENSE_LEN];
        let len = if self.descriptor_format {
            self.write_descriptor(&mut buf)
        } else {
            buf[..FIXED_SENSE_LEN].copy_from_slice(&self.to_fixed());
            FIXED_SENSE_LEN
        };
        SenseBytes { buf, len }
    }

    /// Fixed-format encoding (SPC-4 §4.5.3, table 45).
    pub fn to_fixed(self) -> [u8; FIXED_SENSE_LEN] {
        let mut buf = [0u8; FIXED_SENSE_LEN];
        buf[0] = RESPONSE_CODE_CURRENT_FIXED;
        buf[2] = self.sense.key as u8;
        buf[7] = (FIXED_SENSE_LEN - 8) as u8;
        buf[12] = self.sense.asc;
        buf[13] = self.sense.ascq;
        // The 4-byte INFORMATION field; VALID only if the value fits.
        if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
            buf[0] |= 0x80;
            buf[3..7].copy_from_slice(&info.to_be_bytes());
        }
        if let Some(field) = self.field {
            buf[15..18].copy_from_slice(&field.bytes());
        }
        buf
    }

    /// Descriptor-format encoding (SPC-4 §4.5.2): information descriptor
    /// (§4.5.2.2) and sense-key specific descriptor (§4.5.2.3) as needed.
    fn write_descriptor(&self, buf: &mut [u8; MAX_SENSE_LEN]) -> usize {
        buf[0] = RESPONSE_CODE_CURRENT_DESCRIPTOR;
        buf[1] = self.sense.key as u8;
        buf[2] = self.sense.asc;
        buf[3] = self.sense.ascq;
        let mut len = 8;
        if let Some(info) = self.information {
            buf[len..len + 4].copy_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
            buf[len + 4..len + 12].copy_from_slice(&info.to_be_bytes());
            len += 12;
        }
        if let Some(field) = self.field {
            buf[len..len + 4].copy_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            buf[len + 4..len + 7].copy_from_slice(&field.bytes());
            len += 8;
        }
        buf[7] = (len - 8) as u8;
        len
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
            field: Some(FieldPointer {
                in_cdb: true,
                byte: 2,
                bit: Some(5),
            }),
            ..SenseData::new(INVALID_FIELD_IN_CDB)
        }
        .to_fixed();
        assert_eq!(data[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(&data[16..18], &[0, 2]);
    }

    #[test]
    fn field_pointer_whole_byte() {
        let data = SenseData {
            field: Some(FieldPointer {
                in_cdb: true,
                byte: 0x0102,
                bit: None,
            }),
            ..SenseData::new(INVALID_FIELD_IN_CDB)
        }
        .to_fixed();
        assert_eq!(data[15], 0xc0);
        assert_eq!(&data[16..18], &[1, 2]);
    }

    #[test]
    fn parameter_list_field_pointer_has_cd_zero() {
        let data = SenseData {
            field: Some(FieldPointer {
                in_cdb: false,
                byte: 14,
                bit: Some(2),
            }),
            ..SenseData::new(INVALID_FIELD_IN_PARAMETER_LIST)
        }
        .to_fixed();
        assert_eq!(data[15], 0x80 | 0x08 | 2);
        assert_eq!(&data[16..18], &[0, 14]);
    }

    #[test]
    fn information_field() {
        let mut s = SenseData::new(MISCOMPARE_DURING_VERIFY);
        s.information = Some(1234);
        let fixed = s.to_fixed();
        assert_eq!(fixed[0], 0xf0);
        assert_eq!(fixed[2], 0x0e);
        assert_eq!(&fixed[3..7], &1234u32.to_be_bytes());
        // Too large for 4 bytes: not VALID.
        s.information = Some(1 << 40);
        assert_eq!(s.to_fixed()[0], 0x70);
    }

    #[test]
    fn descriptor_format() {
        let mut s = SenseData::new(MISCOMPARE_DURING_VERIFY);
        s.descriptor_format = true;
        s.information = Some(0x1_0000_0001);
        let e = s.encode();
        let b = e.as_slice();
        assert_eq!(&b[..4], &[0x72, 0x0e, 0x1d, 0x00]);
        assert_eq!(b[7] as usize, b.len() - 8);
        assert_eq!(&b[8..12], &[0x00, 0x0a, 0x80, 0x00]);
        assert_eq!(&b[12..20], &0x1_0000_0001u64.to_be_bytes());
        let mut s = SenseData::new(INVALID_FIELD_IN_CDB);
        s.descriptor_format = true;
        s.field = Some(FieldPointer {
            in_cdb: true,
            byte: 1,
            bit: None,
        });
        let e = s.encode();
        assert_eq!(
            e.as_slice(),
            &[0x72, 5, 0x24, 0, 0, 0, 0, 8, 2, 6, 0, 0, 0xc0, 0, 1, 0]
        );
        // Plain errors are 8 bytes.
        let mut s = SenseData::new(LBA_OUT_OF_RANGE);
        s.descriptor_format = true;
        assert_eq!(s.encode().as_slice().len(), 8);
    }
}
