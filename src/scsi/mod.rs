//! The SCSI target emulator (SPC-4 / SBC-3). It knows nothing about virtio:
//! input is a LUN address, CDB bytes and two data buffers behind small
//! traits; output is a [`target::Completion`] and the bytes written to the
//! data-in buffer.

pub mod buffer;
pub mod cdb;
pub mod disk;
pub mod error;
pub mod inquiry;
pub mod lun;
pub mod mode;
pub mod opcodes;
pub mod sense;
pub mod target;

pub use crate::storage::{Direction, Transfer};
pub use buffer::{DataIn, DataOut, SliceDataOut, VecDataIn};
pub use disk::{Disk, DiskConfig, DiskError, TransferAccess};
pub use lun::LunAddress;
pub use target::{Completion, Planned, Prepared, Target};
