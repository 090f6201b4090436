//! The SCSI target emulator (SPC-4 / SBC-3). It knows nothing about virtio:
//! input is a LUN address, CDB bytes and two data buffers behind small
//! traits; output is a [`target::Completion`] and the bytes written to the
//! data-in buffer.

pub(crate) mod attention;
pub(crate) mod buffer;
pub(crate) mod cdb;
pub(crate) mod disk;
pub(crate) mod error;
pub mod inquiry;
pub(crate) mod lun;
pub(crate) mod mode;
pub(crate) mod opcodes;
pub mod passthrough;
pub(crate) mod sense;
pub(crate) mod stats;
pub(crate) mod target;

pub(crate) use crate::storage::Direction;
pub use attention::UnitAttention;
pub use buffer::{DataIn, DataOut, SliceDataOut, VecDataIn};
pub(crate) use disk::TransferAccess;
pub use disk::{Disk, DiskConfig, DiskError, GuestState};
pub use lun::LunAddress;
pub use stats::{
    CommandCounts, CommandKind, CommandOutcome, LatencySummary, LunStats, StatsSnapshot,
};
pub use target::{ActivateError, Completion, Target};
pub(crate) use target::{Planned, Prepared};
