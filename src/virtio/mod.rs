//! The virtio-scsi transport (virtio 1.2 §5.6) over vhost-user: queues,
//! descriptor chains, the control queue and the configuration space. Knows
//! nothing of SCSI semantics beyond handing CDBs to [`crate::scsi::Target`].

pub mod answer;
pub mod backend;
pub mod chain;
pub mod config;
pub mod control;
pub mod inflight;
pub mod memory;
pub mod request;
pub mod sglist;
pub(crate) mod wire;

pub use backend::ScsiBackend;
