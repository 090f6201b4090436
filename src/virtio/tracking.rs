//! In-flight tracking on one queue (vhost-user "Inflight I/O tracking",
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): every head the daemon takes
//! from the available ring is marked in flight in the region the VMM
//! keeps ([`super::inflight_shm`]) until it is on the used ring, so a
//! daemon started after a crash (or SIGKILL) knows which requests the
//! guest still waits for and serves them again, in the order they were
//! taken, before anything new.
//!
//! One [`Tracking`] per queue, shared by everything that takes or returns
//! the queue's chains (its worker thread's passes, the transfers it
//! reaps, the event delivery, the handler thread's stop); without a
//! region (the VMM did not negotiate the feature) each step is one atomic
//! load.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use log::{debug, warn};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{Error as QueueError, QueueT};

use super::inflight_shm::QueueInflight;

/// A queue's part of the in-flight region, if any, and the heads left to
/// serve again after a reconnect.
#[derive(Default)]
pub struct Tracking {
    region: ArcSwapOption<QueueInflight>,
    /// Whether `region` is set: the one load the I/O path pays without.
    tracked: AtomicBool,
    resubmit: Mutex<VecDeque<u16>>,
    /// Whether `resubmit` has heads.
    resubmitting: AtomicBool,
}

impl Tracking {
    /// Tracks the queue in `region` from now on (`None`: not at all).
    pub fn set_region(&self, region: Option<QueueInflight>) {
        self.tracked.store(region.is_some(), Ordering::Release);
        self.region.store(region.map(Arc::new));
        self.resubmitting.store(false, Ordering::Release);
        self.resubmit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Whether a region tracks the queue.
    pub fn is_tracked(&self) -> bool {
        self.region.load().is_some()
    }

    /// `head` was taken from the available ring (before the next one is).
    pub fn taken(&self, queue: usize, head: u16) {
        if !self.tracked.load(Ordering::Relaxed) {
            return;
        }
        if let Some(region) = &*self.region.load() {
            if let Err(e) = region.begin(head) {
                debug!("queue {queue}: in-flight region: {e}");
            }
        }
    }

    /// Puts `head` on the used ring with `len` bytes written, its
    /// in-flight state cleared around it as the specification orders it:
    /// the batch (of one) recorded before the used index moves, the head
    /// no longer in flight and the region's used index after.
    pub fn add_used(&self, state: &mut VringState, head: u16, len: u32) -> Result<(), QueueError> {
        if !self.tracked.load(Ordering::Relaxed) {
            return state.add_used(head, len);
        }
        let region = self.region.load();
        if let Some(region) = &*region {
            if let Err(e) = region.before_used(head) {
                debug!("in-flight region: {e}");
            }
        }
        state.add_used(head, len)?;
        if let Some(region) = &*region {
            if let Err(e) = region.after_used(head, state.get_queue().next_used()) {
                debug!("in-flight region: {e}");
            }
        }
        Ok(())
    }

    /// When queue `queue` (`vring`) starts, with a region: the heads the
    /// region says a daemon before took and never returned are queued to
    /// be served first (in the order they were taken), and the queue's
    /// next available index becomes the used index plus their number
    /// (whatever SET_VRING_BASE said: after a crash the VMM can only give
    /// the used index). Heads past the ring's size are dropped with a
    /// warning (a region that does not match the ring).
    pub fn start(&self, queue: usize, vring: &VringRwLock) {
        let Some(region) = self.region.load_full() else {
            return;
        };
        let used = match vring.queue_used_idx() {
            Ok(used) => used,
            Err(e) => {
                warn!(
                    "queue {queue}: cannot read the used index to resume in-flight requests: {e}"
                );
                return;
            }
        };
        let resubmit = match region.recover(used) {
            Ok(resubmit) => resubmit,
            Err(e) => {
                warn!("queue {queue}: in-flight region unusable: {e}");
                return;
            }
        };
        let size = vring.get_ref().get_queue().size();
        let mut heads: VecDeque<u16> = resubmit.heads.iter().copied().collect();
        let before = heads.len();
        heads.retain(|&head| head < size);
        if heads.len() != before {
            warn!(
                "queue {queue}: {} in-flight head(s) past the queue's {size} entries ignored",
                before - heads.len()
            );
        }
        if !heads.is_empty() {
            warn!(
                "queue {queue}: serving again {} request(s) a daemon before this one took and did not complete",
                heads.len()
            );
        }
        // Heads dropped above were never taken from this ring: not counted.
        let dropped = (before - heads.len()) as u16;
        vring.set_queue_next_avail(resubmit.next_avail.wrapping_sub(dropped));
        vring.set_queue_next_used(used);
        self.resubmitting
            .store(!heads.is_empty(), Ordering::Release);
        *self.resubmit.lock().unwrap_or_else(PoisonError::into_inner) = heads;
    }

    /// The next head to serve again, if any.
    pub fn next_resubmit(&self) -> Option<u16> {
        if !self.resubmitting.load(Ordering::Acquire) {
            return None;
        }
        let mut heads = self.resubmit.lock().unwrap_or_else(PoisonError::into_inner);
        let head = heads.pop_front();
        if heads.is_empty() {
            self.resubmitting.store(false, Ordering::Release);
        }
        head
    }

    /// Whether heads are waiting to be served again.
    pub fn has_resubmits(&self) -> bool {
        self.resubmitting.load(Ordering::Acquire)
    }
}
