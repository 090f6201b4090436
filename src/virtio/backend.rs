//! The vhost-user device: features, configuration space, and the queue
//! handler that hands each request to the SCSI target.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::{VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::chain::{split_chain, GuestMem};
use super::config::ScsiConfig;
use super::control::handle_control;
use super::request::{handle_command, Sizes};
use crate::scsi::lun::MAX_LUN;
use crate::scsi::Target;

/// Queue indexes (virtio 1.2 §5.6.2).
pub const CONTROL_QUEUE: usize = 0;
pub const EVENT_QUEUE: usize = 1;
pub const FIRST_REQUEST_QUEUE: usize = 2;

/// Request queues offered. QEMU's vhost-user-scsi-pci asks for one per vCPU
/// by default, so offer enough for typical VMs; all are served.
pub const NUM_REQUEST_QUEUES: usize = 16;
pub const NUM_QUEUES: usize = FIRST_REQUEST_QUEUE + NUM_REQUEST_QUEUES;

/// Largest virtqueue the driver may set up (virtio split ring maximum).
pub const MAX_QUEUE_SIZE: usize = 1024;

pub struct ScsiBackend {
    target: Arc<Target>,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMem>>>,
    config: Mutex<ScsiConfig>,
    /// One warning per connection for malformed requests; the rest go to
    /// debug so a guest cannot flood the host's log.
    warned_malformed: AtomicBool,
}

impl ScsiBackend {
    pub fn new(target: Arc<Target>) -> ScsiBackend {
        let config = ScsiConfig {
            num_request_queues: NUM_REQUEST_QUEUES as u32,
            // Linux uses seg_max as its scatter-gather table size.
            seg_max: 254,
            max_sectors: 0xffff,
            cmd_per_lun: 128,
            sizes: Sizes::default(),
            max_target: 0,
            max_lun: u32::from(MAX_LUN),
        };
        ScsiBackend {
            target,
            mem: Mutex::new(None),
            config: Mutex::new(config),
            warned_malformed: AtomicBool::new(false),
        }
    }

    fn sizes(&self) -> Sizes {
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sizes
    }

    fn malformed(&self, queue: usize, what: &dyn std::fmt::Display) {
        if !self.warned_malformed.swap(true, Ordering::Relaxed) {
            warn!("queue {queue}: malformed request from the guest: {what} (further ones logged at debug level)");
        } else {
            debug!("queue {queue}: malformed request: {what}");
        }
    }

    /// Serves every available request on `vring`, re-checking after
    /// notifications are re-enabled so that no kick is lost (virtio 1.2
    /// §2.7.10 with VIRTIO_F_EVENT_IDX).
    pub fn process_queue(&self, queue_index: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic_mem) = self
            .mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let mem = atomic_mem.memory();
        let sizes = self.sizes();
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            let mut completed = 0usize;
            loop {
                let mut state = vring.get_mut();
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                    break;
                };
                let head = chain.head_index();
                let used_len = match split_chain(&mem, chain) {
                    Err(e) => {
                        self.malformed(queue_index, &e);
                        0
                    }
                    Ok(split) if queue_index == CONTROL_QUEUE => {
                        let (len, err) = handle_control(split, &self.target);
                        if let Some(e) = err {
                            self.malformed(queue_index, &e);
                        }
                        len
                    }
                    Ok(split) => {
                        let (len, err) = handle_command(split, &self.target, sizes);
                        if let Some(e) = err {
                            self.malformed(queue_index, &e);
                        }
                        len
                    }
                };
                state
                    .get_queue_mut()
                    .add_used(&*mem, head, used_len)
                    .map_err(io::Error::other)?;
                completed += 1;
            }
            if completed > 0 {
                let needs = vring
                    .get_mut()
                    .get_queue_mut()
                    .needs_notification(&*mem)
                    .map_err(io::Error::other)?;
                if needs {
                    vring.signal_used_queue()?;
                }
            }
            if !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }
}

impl VhostUserBackend for ScsiBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // VIRTIO_SCSI_F_CHANGE and _HOTPLUG are accepted because QEMU offers
        // them to the guest without asking the backend and then forwards the
        // guest's acknowledgement; no events are ever sent for them.
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_SCSI_F_HOTPLUG)
            | (1 << VIRTIO_SCSI_F_CHANGE)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: QEMU's vhost-user-scsi-pci builds the configuration
        // space itself and warns at every start when a backend offers it.
        // get_config/set_config below still describe this device's config
        // space for the vhost-user library's callers.
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves; process_queue uses the
        // same code path either way.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(offset, buf)
            .map_err(|e| {
                debug!("refused config write: {e}");
                io::Error::new(io::ErrorKind::InvalidInput, e)
            })
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the worker thread could never be stopped
        // when the connection ends.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create the worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            return Err(io::Error::other(format!("event for unknown queue {index}")));
        };
        match index {
            // No events are ever reported: the buffers the driver posts stay
            // available (virtio 1.2 §5.6.6.3).
            EVENT_QUEUE => Ok(()),
            _ => self.process_queue(index, vring),
        }
    }
}
