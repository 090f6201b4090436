//! Why a command did not complete with GOOD status, and the one place where
//! that maps to sense data.

use std::io;

use super::sense::{self, FieldPointer, SenseData};

/// A command that ends in CHECK CONDITION (or, for [`CommandError::DataInTooSmall`],
/// is not executed at all).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("invalid command operation code {0:#04x}")]
    InvalidOpcode(u8),
    #[error("invalid field in CDB at byte {byte}{}", bit.map(|b| format!(" bit {b}")).unwrap_or_default())]
    InvalidField { byte: u16, bit: Option<u8> },
    #[error("logical block address out of range")]
    LbaOutOfRange,
    #[error("logical unit not supported")]
    LunNotSupported,
    #[error("saving parameters not supported")]
    SavingNotSupported,
    #[error("write protected")]
    WriteProtected,
    #[error("read error: {0}")]
    ReadError(io::Error),
    #[error("write or flush error: {0}")]
    WriteError(io::Error),
    /// The initiator's data-in buffer cannot hold what the CDB requires the
    /// device to return (e.g. a READ longer than the buffer). The transport
    /// reports this as a delivery failure (virtio: VIRTIO_SCSI_S_OVERRUN).
    #[error("data-in buffer of {available} bytes is smaller than the {required} bytes the command transfers")]
    DataInTooSmall { required: u64, available: usize },
}

impl CommandError {
    /// INVALID FIELD IN CDB pointing at a whole byte.
    pub fn field(byte: u16) -> Self {
        CommandError::InvalidField { byte, bit: None }
    }

    /// INVALID FIELD IN CDB pointing at a bit field whose most significant
    /// bit is `bit`.
    pub fn field_bit(byte: u16, bit: u8) -> Self {
        CommandError::InvalidField {
            byte,
            bit: Some(bit),
        }
    }

    /// The sense data reported for this error (SPC-4 §4.5).
    pub fn sense_data(&self) -> SenseData {
        let plain = |s| SenseData::new(s);
        match self {
            CommandError::InvalidOpcode(_) => plain(sense::INVALID_COMMAND_OPERATION_CODE),
            CommandError::InvalidField { byte, bit } => SenseData {
                sense: sense::INVALID_FIELD_IN_CDB,
                field: Some(FieldPointer {
                    byte: *byte,
                    bit: *bit,
                }),
            },
            CommandError::LbaOutOfRange => plain(sense::LBA_OUT_OF_RANGE),
            CommandError::LunNotSupported => plain(sense::LOGICAL_UNIT_NOT_SUPPORTED),
            CommandError::SavingNotSupported => plain(sense::SAVING_PARAMETERS_NOT_SUPPORTED),
            CommandError::WriteProtected => plain(sense::WRITE_PROTECTED),
            CommandError::ReadError(_) => plain(sense::UNRECOVERED_READ_ERROR),
            CommandError::WriteError(_) => plain(sense::WRITE_ERROR),
            // Never reaches the initiator as sense; kept total for safety.
            CommandError::DataInTooSmall { .. } => plain(sense::INTERNAL_TARGET_FAILURE),
        }
    }
}

pub type CommandResult<T> = Result<T, CommandError>;
