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
    #[error("invalid field in parameter list at byte {byte}{}", bit.map(|b| format!(" bit {b}")).unwrap_or_default())]
    InvalidParamField { byte: u16, bit: Option<u8> },
    #[error("parameter list length error")]
    ParamListLength,
    /// The data-out buffer holds other than the exact number of bytes the
    /// CDB implies, for a command that cannot take less or more (WRITE
    /// SAME: one logical block).
    #[error("data-out buffer of {available} bytes where the command takes exactly {expected}")]
    DataOutLength { expected: u64, available: usize },
    #[error("miscompare at byte {offset}")]
    Miscompare { offset: u64 },
    #[error("no space left for a write: {0}")]
    NoSpace(io::Error),
    #[error("logical block address out of range")]
    LbaOutOfRange,
    #[error("logical unit not supported")]
    LunNotSupported,
    /// A pending unit attention condition terminated the command
    /// (SAM-5 §5.14).
    #[error("unit attention {0:?}")]
    UnitAttention(super::attention::UnitAttention),
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
    /// The same for the data-out buffer.
    #[error("data-out buffer of {available} bytes is smaller than the {required} bytes the command transfers")]
    DataOutTooSmall { required: u64, available: usize },
}

impl CommandError {
    /// INVALID FIELD IN CDB pointing at a whole byte.
    pub fn field(byte: u16) -> Self {
        CommandError::InvalidField { byte, bit: None }
    }

    /// INVALID FIELD IN CDB pointing at a bit field whose most significant
    /// bit is `bit`.
    pub(crate) fn field_bit(byte: u16, bit: u8) -> Self {
        CommandError::InvalidField {
            byte,
            bit: Some(bit),
        }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at a byte of the parameter
    /// data.
    pub(crate) fn param(byte: usize) -> Self {
        CommandError::InvalidParamField {
            byte: u16::try_from(byte).unwrap_or(u16::MAX),
            bit: None,
        }
    }

    /// Whether `e` says the storage could not be reached (its network
    /// server or session gone, or no answer in time) rather than that it
    /// failed the request: reported as a retryable ABORTED COMMAND, and
    /// never taken as lost data (see `Disk::written`).
    pub fn is_unreachable(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::TimedOut
                | io::ErrorKind::NotConnected
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
        )
    }

    /// A failed write: out of space is reported as such (SBC-3 §4.7.3.6),
    /// anything else as a medium write error.
    pub fn write(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => CommandError::NoSpace(e),
            _ => CommandError::WriteError(e),
        }
    }

    /// The sense data reported for this error (SPC-4 §4.5), in fixed
    /// format; the logical unit switches it to descriptor format if asked.
    pub(crate) fn sense_data(&self) -> SenseData {
        let plain = SenseData::new;
        let field = |in_cdb, byte: u16, bit: Option<u8>, sense| SenseData {
            field: Some(FieldPointer { in_cdb, byte, bit }),
            ..SenseData::new(sense)
        };
        match self {
            CommandError::InvalidOpcode(_) => plain(sense::INVALID_COMMAND_OPERATION_CODE),
            CommandError::InvalidField { byte, bit } => {
                field(true, *byte, *bit, sense::INVALID_FIELD_IN_CDB)
            }
            CommandError::InvalidParamField { byte, bit } => {
                field(false, *byte, *bit, sense::INVALID_FIELD_IN_PARAMETER_LIST)
            }
            CommandError::ParamListLength => plain(sense::PARAMETER_LIST_LENGTH_ERROR),
            // The transports that carry an expected data length (FCP-4
            // FCP_DL, SRP) report a data-out that disagrees with the CDB as
            // INVALID FIELD IN COMMAND INFORMATION UNIT (SPC-4 table D.1:
            // 0Eh/03h); there is no CDB field to point at.
            CommandError::DataOutLength { .. } => plain(sense::INVALID_FIELD_IN_COMMAND_IU),
            CommandError::Miscompare { offset } => SenseData {
                information: Some(*offset),
                ..SenseData::new(sense::MISCOMPARE_DURING_VERIFY)
            },
            CommandError::LbaOutOfRange => plain(sense::LBA_OUT_OF_RANGE),
            CommandError::LunNotSupported => plain(sense::LOGICAL_UNIT_NOT_SUPPORTED),
            CommandError::UnitAttention(condition) => plain(condition.sense()),
            CommandError::SavingNotSupported => plain(sense::SAVING_PARAMETERS_NOT_SUPPORTED),
            CommandError::WriteProtected => plain(sense::WRITE_PROTECTED),
            CommandError::NoSpace(_) => plain(sense::SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
            CommandError::ReadError(e) | CommandError::WriteError(e)
                if CommandError::is_unreachable(e) =>
            {
                plain(if e.kind() == io::ErrorKind::TimedOut {
                    sense::LOGICAL_UNIT_COMMUNICATION_TIME_OUT
                } else {
                    sense::LOGICAL_UNIT_COMMUNICATION_FAILURE
                })
            }
            CommandError::ReadError(_) => plain(sense::UNRECOVERED_READ_ERROR),
            CommandError::WriteError(_) => plain(sense::WRITE_ERROR),
            // Never reaches the initiator as sense; kept total for safety.
            CommandError::DataInTooSmall { .. } | CommandError::DataOutTooSmall { .. } => {
                plain(sense::INTERNAL_TARGET_FAILURE)
            }
        }
    }
}

pub(crate) type CommandResult<T> = Result<T, CommandError>;
