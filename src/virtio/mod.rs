//! The virtio-scsi transport (virtio 1.2 §5.6) over vhost-user: queues,
//! descriptor chains, the control queue and the configuration space. Knows
//! nothing of SCSI semantics beyond handing CDBs to [`crate::scsi::Target`].

pub(crate) mod answer;
pub mod backend;
pub mod chain;
pub(crate) mod config;
pub(crate) mod control;
pub mod desc_walk;
pub mod dirty_log;
pub mod events;
pub mod handler;
pub(crate) mod inflight;
pub mod inflight_shm;
pub(crate) mod memory;
pub(crate) mod request;
pub(crate) mod sglist;
pub mod tracking;
pub(crate) mod wire;
pub(crate) mod worker;

pub use backend::ScsiBackend;
pub use dirty_log::{DirtyLog, DirtyLogError, LogSwitch};
pub use events::{DeviceEvent, EventHub};
