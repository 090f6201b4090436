//! The event queue (virtio 1.2 §5.6.6.3): telling the guest's driver that
//! a LUN appeared, went, or changed capacity.
//!
//! Whoever changes the LUN table (the management API) posts a
//! [`DeviceEvent`] to the daemon's [`EventHub`]; the hub keeps it and wakes
//! the worker thread that serves the event queue, which writes it into a
//! buffer the driver posted there. An event waits in the hub until the
//! driver has a buffer for it: when it found none, the next event written
//! carries `VIRTIO_SCSI_T_EVENTS_MISSED`, so the driver rescans the target
//! as the spec asks (Linux rescans, then handles the event); the events
//! already waiting then are covered by that rescan, so a backlog brings
//! about one rescan, not one per event. At most [`MAX_PENDING_EVENTS`]
//! wait; beyond that the oldest is dropped, which the rescan that
//! EVENTS_MISSED brings about makes up for. After each delivery the thread
//! asks for a kick when the driver posts its next buffer (with EVENT_IDX,
//! `avail_event`), so a waiting event goes out then.
//!
//! Which events the guest gets depends on the features it acknowledged:
//! `TRANSPORT_RESET` events need `VIRTIO_SCSI_F_HOTPLUG`, `PARAM_CHANGE`
//! events `VIRTIO_SCSI_F_CHANGE`. Others are dropped at delivery: the
//! guest learns of the change from the unit attentions alone.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use log::debug;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_EVT_RESET_REMOVED, VIRTIO_SCSI_EVT_RESET_RESCAN, VIRTIO_SCSI_F_CHANGE,
    VIRTIO_SCSI_F_HOTPLUG, VIRTIO_SCSI_T_EVENTS_MISSED, VIRTIO_SCSI_T_PARAM_CHANGE,
    VIRTIO_SCSI_T_TRANSPORT_RESET,
};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{split_chain, GuestMem};
use super::dirty_log::LogSwitch;
use crate::scsi::LunAddress;

/// Most events kept while the driver has no buffer for them.
pub const MAX_PENDING_EVENTS: usize = 256;

/// Most buffers one delivery takes from the event queue (usable or not);
/// if events are left and buffers too, the queue is served again after
/// the thread's other events, as a request queue after its pass budget.
pub const MAX_BUFFERS_PER_DELIVERY: usize = 256;

/// Bytes of `struct virtio_scsi_event`: `event`, `lun[8]`, `reason`.
pub const EVENT_LEN: usize = 16;

/// A change of the target the driver is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// A logical unit was added at this LUN: `TRANSPORT_RESET`,
    /// `EVT_RESET_RESCAN`.
    LunAdded(u16),
    /// The logical unit at this LUN was removed: `TRANSPORT_RESET`,
    /// `EVT_RESET_REMOVED`.
    LunRemoved(u16),
    /// The capacity of the unit at this LUN changed: `PARAM_CHANGE` with
    /// ASC 2Ah, ASCQ 09h (CAPACITY DATA HAS CHANGED).
    CapacityChanged(u16),
}

impl DeviceEvent {
    /// The feature bit the driver must have acknowledged to get it.
    fn feature(self) -> u64 {
        match self {
            DeviceEvent::LunAdded(_) | DeviceEvent::LunRemoved(_) => 1 << VIRTIO_SCSI_F_HOTPLUG,
            DeviceEvent::CapacityChanged(_) => 1 << VIRTIO_SCSI_F_CHANGE,
        }
    }

    /// `struct virtio_scsi_event` (virtio 1.2 §5.6.6.3), little-endian,
    /// with EVENTS_MISSED if `missed`.
    pub fn encode(self, missed: bool) -> [u8; EVENT_LEN] {
        let (event, lun, reason) = match self {
            DeviceEvent::LunAdded(lun) => (
                VIRTIO_SCSI_T_TRANSPORT_RESET,
                lun,
                VIRTIO_SCSI_EVT_RESET_RESCAN,
            ),
            DeviceEvent::LunRemoved(lun) => (
                VIRTIO_SCSI_T_TRANSPORT_RESET,
                lun,
                VIRTIO_SCSI_EVT_RESET_REMOVED,
            ),
            // §5.6.6.3.2: the reason carries the ASC in bits 0-7 and the
            // ASCQ in bits 8-15.
            DeviceEvent::CapacityChanged(lun) => {
                (VIRTIO_SCSI_T_PARAM_CHANGE, lun, 0x2a | 0x09 << 8)
            }
        };
        let event = if missed {
            event | VIRTIO_SCSI_T_EVENTS_MISSED
        } else {
            event
        };
        let mut bytes = [0u8; EVENT_LEN];
        bytes[..4].copy_from_slice(&event.to_le_bytes());
        // §5.6.6.1: byte 0 is 1, byte 1 the target, bytes 2-3 the LUN as
        // in REPORT LUNS (what Linux decodes it with).
        bytes[4] = 1;
        bytes[5] = 0;
        let address = LunAddress::Lun(lun).encode();
        bytes[6..8].copy_from_slice(&address[..2]);
        bytes[12..16].copy_from_slice(&reason.to_le_bytes());
        bytes
    }
}

/// What waits for the driver.
#[derive(Debug, Default)]
struct Pending {
    events: VecDeque<DeviceEvent>,
    /// An event found no buffer (or was dropped): the next one written
    /// carries EVENTS_MISSED.
    missed: bool,
    /// How many events at the front were already waiting when an event
    /// with EVENTS_MISSED was written: the rescan it brings about finds
    /// them, so their waiting again is not another miss.
    covered: usize,
}

/// The events posted and not yet delivered, shared by whoever posts them
/// and the backend of each VMM connection in turn.
#[derive(Debug)]
pub struct EventHub {
    pending: Mutex<Pending>,
    /// Written when an event is posted; the event queue's worker thread
    /// watches it.
    wake: EventFd,
}

impl EventHub {
    pub fn new() -> io::Result<Arc<EventHub>> {
        Ok(Arc::new(EventHub {
            pending: Mutex::new(Pending::default()),
            wake: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// Keeps `event` for the driver and wakes the event queue's thread.
    pub fn post(&self, event: DeviceEvent) {
        {
            let mut pending = self.lock();
            if pending.events.len() >= MAX_PENDING_EVENTS {
                pending.events.pop_front();
                pending.covered = pending.covered.saturating_sub(1);
                pending.missed = true;
            }
            pending.events.push_back(event);
        }
        if let Err(e) = self.wake.write(1) {
            debug!("cannot wake the event queue: {e}");
        }
    }

    /// The descriptor the event queue's thread watches.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Consumes the wake-up (the thread then delivers what is pending).
    pub fn consume_wake(&self) {
        let _ = self.wake.read();
    }

    /// Events waiting, oldest first.
    #[cfg(test)]
    fn pending(&self) -> Vec<DeviceEvent> {
        self.lock().events.iter().copied().collect()
    }

    /// Holds the hub: no event is delivered or posted meanwhile (for a
    /// daemon about to exit).
    pub fn hold(&self) -> impl Drop + '_ {
        self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the pending events the driver acknowledged the features for
    /// (`features`) into buffers it posted on the event queue `vring`, in
    /// guest memory `mem`, and signals it if it asked (virtio 1.2 §2.7.10).
    /// Events without their feature are dropped. At most
    /// [`MAX_BUFFERS_PER_DELIVERY`] buffers are taken. What is written is
    /// marked in the dirty log `log` holds, if any: each buffer before it
    /// goes on the used ring, the used ring after.
    pub fn deliver(
        &self,
        vring: &VringRwLock,
        mem: &Arc<GuestMem>,
        features: u64,
        log: &LogSwitch,
    ) -> Delivery {
        let mut pending = self.lock();
        let mut written = 0;
        let mut returned = 0;
        // Buffers taken: a driver that keeps posting buffers the events
        // cannot use (too short) does not keep the thread (or the hub's
        // lock) here.
        let mut popped = 0;
        let mut unfinished = false;
        'deliver: loop {
            while let Some(&event) = pending.events.front() {
                if popped == MAX_BUFFERS_PER_DELIVERY {
                    unfinished = true;
                    break 'deliver;
                }
                if features & event.feature() == 0 {
                    pending.events.pop_front();
                    pending.covered = pending.covered.saturating_sub(1);
                    continue;
                }
                let chain = {
                    let mut state = vring.get_mut();
                    // Stopped meanwhile (GET_VRING_BASE waits for this
                    // lock, then answers): nothing more is taken.
                    if !(state.get_queue().ready() && state.is_enabled()) {
                        break 'deliver;
                    }
                    state.get_queue_mut().pop_descriptor_chain(&**mem)
                };
                let Some(chain) = chain else {
                    // No buffer: kept, and the driver is told it missed one
                    // (unless a rescan it was told of finds them all).
                    if pending.events.len() > pending.covered {
                        pending.missed = true;
                    }
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                let used = match split_chain(mem, chain) {
                    Ok(mut split) if split.writable.remaining() >= EVENT_LEN => {
                        let n = split.writable.write_from(&event.encode(pending.missed));
                        log.with(|log| log.mark_ranges(&split.written));
                        pending.events.pop_front();
                        pending.covered = if pending.missed {
                            pending.events.len()
                        } else {
                            pending.covered.saturating_sub(1)
                        };
                        pending.missed = false;
                        written += 1;
                        n
                    }
                    // virtio 1.2 §5.6.6.3: the driver's buffers are at least an
                    // event long; a shorter or malformed one is returned empty
                    // and the event waits for the next.
                    Ok(_) => {
                        debug!("event queue buffer shorter than an event: returned unused");
                        0
                    }
                    Err(e) => {
                        debug!("event queue buffer malformed ({e}): returned unused");
                        0
                    }
                };
                let used = u32::try_from(used).unwrap_or(0);
                {
                    let mut state = vring.get_mut();
                    let queue = state.get_queue_mut();
                    if let Err(e) = queue.add_used(&**mem, head, used) {
                        debug!("cannot return an event buffer: {e}");
                        break 'deliver;
                    }
                    log.with(|log| {
                        log.mark_used(queue.used_ring(), queue.size(), queue.next_used());
                    });
                }
                returned += 1;
            }
            // Asks for a kick when the driver posts its next buffer (with
            // EVENT_IDX: avail_event is the next index to pop, virtio 1.2
            // §2.7.10), or a driver that follows it never kicks again and an
            // event waiting for a buffer waits for the next event. A buffer
            // posted meanwhile is taken now.
            let enabled = vring.enable_notification();
            // avail_event (or the flags) written.
            log.with(|log| {
                let state = vring.get_ref();
                let queue = state.get_queue();
                log.mark_used_notification(
                    queue.used_ring(),
                    queue.size(),
                    queue.event_idx_enabled(),
                );
            });
            match enabled {
                Ok(true) if !pending.events.is_empty() => continue 'deliver,
                Ok(_) => break 'deliver,
                Err(e) => {
                    debug!("cannot enable event queue notifications: {e}");
                    break 'deliver;
                }
            }
        }
        drop(pending);
        if returned > 0 && vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                debug!("cannot signal the event queue: {e}");
            }
        }
        Delivery {
            written,
            unfinished,
        }
    }
}

/// What one [`EventHub::deliver`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Events written into the driver's buffers.
    pub written: usize,
    /// It stopped after [`MAX_BUFFERS_PER_DELIVERY`] buffers with events
    /// left: the caller serves the queue again later.
    pub unfinished: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_encoded_as_virtio_1_2_section_5_6_6_3_says() {
        // TRANSPORT_RESET = 1, EVT_RESET_RESCAN = 1, LUN 3 as 01 00 00 03.
        assert_eq!(
            DeviceEvent::LunAdded(3).encode(false),
            [1, 0, 0, 0, 1, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0, 0]
        );
        // EVT_RESET_REMOVED = 2; LUN 300 in flat space: 41h 2Ch.
        assert_eq!(
            DeviceEvent::LunRemoved(300).encode(false),
            [1, 0, 0, 0, 1, 0, 0x41, 0x2c, 0, 0, 0, 0, 2, 0, 0, 0]
        );
        // PARAM_CHANGE = 3, reason ASC 2Ah | ASCQ 09h << 8; EVENTS_MISSED
        // is bit 31.
        assert_eq!(
            DeviceEvent::CapacityChanged(0).encode(true),
            [3, 0, 0, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0x2a, 0x09, 0, 0]
        );
    }

    #[test]
    fn the_hub_keeps_at_most_its_bound_oldest_dropped() {
        let hub = EventHub::new().unwrap();
        for lun in 0..(MAX_PENDING_EVENTS as u16 + 2) {
            hub.post(DeviceEvent::LunAdded(lun));
        }
        let pending = hub.pending();
        assert_eq!(pending.len(), MAX_PENDING_EVENTS);
        assert_eq!(pending[0], DeviceEvent::LunAdded(2));
        assert!(hub.lock().missed);
    }
}
