//! vhost-device-scsi: a vhost-user SCSI target serving raw disk images.
//!
//! Three layers, one direction: [`virtio`] (the vhost-user virtio-scsi
//! device) hands requests to [`scsi`] (the SCSI target emulator), which reads
//! and writes [`storage`] (image files).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fdlimit;
pub mod frontend;
pub mod logging;
pub mod scsi;
pub mod storage;
pub mod virtio;
