//! The driver's side of a split virtqueue (virtio 1.2 §2.7): descriptor
//! table writes, publishing heads in the available ring, reading the used
//! ring, and the EVENT_IDX rules for kicks and interrupts (§2.7.7, §2.7.10).
//!
//! Everything the device writes (used index, used elements, avail_event,
//! used flags) is read from shared memory and checked before use: a
//! misbehaving device yields a [`FrontendError`], never a panic.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use virtio_bindings::{virtio_config, virtio_ring};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::FrontendError;

/// Descriptor flags (virtio 1.2 §2.7.5), as the 16-bit field holds them.
pub const VRING_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
pub const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
pub const VRING_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// Used ring flag: the device asks not to be kicked (without EVENT_IDX).
const VRING_USED_F_NO_NOTIFY: u16 = virtio_ring::VRING_USED_F_NO_NOTIFY as u16;

/// Feature bits a driver negotiates (virtio 1.2 §6), as masks.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
pub const FEATURE_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const FEATURE_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// A split-ring descriptor (virtio 1.2 §2.7.5), little-endian in memory.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

// SAFETY: plain integers, no padding (8 + 4 + 2 + 2 bytes), any bit pattern
// is valid.
unsafe impl ByteValued for Descriptor {}

/// `vring_need_event` (virtio 1.2 §2.7.10): does moving an index from `old`
/// to `new` pass `event`?
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Guest addresses of one ring's three parts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RingAddrs {
    pub fn desc_bytes(size: u16) -> u64 {
        16 * u64::from(size)
    }
    /// `flags`, `idx`, `ring[size]`, `used_event`.
    pub fn avail_bytes(size: u16) -> u64 {
        6 + 2 * u64::from(size)
    }
    /// `flags`, `idx`, `ring[size]` of (`id`, `len`), `avail_event`.
    pub fn used_bytes(size: u16) -> u64 {
        6 + 8 * u64::from(size)
    }
}

/// The driver's view of one split virtqueue.
pub(crate) struct SplitRing {
    mem: Arc<GuestMemoryMmap<()>>,
    size: u16,
    addrs: RingAddrs,
    event_idx: bool,
    /// Next free slot of the available ring (the driver's avail->idx).
    avail_idx: u16,
    /// avail->idx when the kick decision was last taken (Linux's
    /// `avail_idx_shadow - num_added`).
    notified_idx: u16,
    /// Used entries consumed so far.
    last_used: u16,
}

impl SplitRing {
    /// A ring whose memory is zeroed (indexes 0, flags 0).
    pub fn new(
        mem: Arc<GuestMemoryMmap<()>>,
        size: u16,
        addrs: RingAddrs,
        event_idx: bool,
    ) -> Self {
        SplitRing {
            mem,
            size,
            addrs,
            event_idx,
            avail_idx: 0,
            notified_idx: 0,
            last_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn write_desc(&self, index: u16, desc: Descriptor) -> Result<(), FrontendError> {
        let addr = self.addrs.desc + 16 * u64::from(index);
        self.mem.write_obj(desc, GuestAddress(addr))?;
        Ok(())
    }

    /// Puts `head` in the available ring and publishes it (release store of
    /// avail->idx after the ring entry and the descriptors).
    pub fn publish(&mut self, head: u16) -> Result<(), FrontendError> {
        let slot = self.addrs.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.store(
            self.avail_idx,
            GuestAddress(self.addrs.avail + 2),
            Ordering::Release,
        )?;
        Ok(())
    }

    /// Whether the device must be kicked for what was published since the
    /// last call: with EVENT_IDX, only if avail->idx moved past the device's
    /// avail_event (§2.7.10); without, unless the device set NO_NOTIFY.
    pub fn kick_needed(&mut self) -> Result<bool, FrontendError> {
        let (old, new) = (self.notified_idx, self.avail_idx);
        self.notified_idx = new;
        if old == new {
            return Ok(false);
        }
        // The index store must be visible before the device's event index
        // is read (the device does the mirror image: writes avail_event,
        // then re-reads avail->idx).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let avail_event: u16 = self.mem.load(
                GuestAddress(self.addrs.used + 4 + 8 * u64::from(self.size)),
                Ordering::Acquire,
            )?;
            Ok(vring_need_event(avail_event, new, old))
        } else {
            let flags: u16 = self
                .mem
                .load(GuestAddress(self.addrs.used), Ordering::Acquire)?;
            Ok(flags & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Stores `idx` as avail->idx without changing what the driver
    /// believes it published (a broken driver, for tests); `None` stores the
    /// true index back.
    pub fn store_raw_avail_idx(&self, idx: Option<u16>) -> Result<(), FrontendError> {
        self.mem.store(
            idx.unwrap_or(self.avail_idx),
            GuestAddress(self.addrs.avail + 2),
            Ordering::Release,
        )?;
        Ok(())
    }

    /// The device's avail_event (used ring, after the elements), which the
    /// device writes when it re-enables notifications with EVENT_IDX.
    pub fn avail_event(&self) -> Result<u16, FrontendError> {
        Ok(self.mem.load(
            GuestAddress(self.addrs.used + 4 + 8 * u64::from(self.size)),
            Ordering::Acquire,
        )?)
    }

    /// Overwrites avail_event (a marker to see when the device next writes it).
    pub fn set_avail_event(&self, value: u16) -> Result<(), FrontendError> {
        self.mem.store(
            value,
            GuestAddress(self.addrs.used + 4 + 8 * u64::from(self.size)),
            Ordering::Release,
        )?;
        Ok(())
    }

    /// Whether the device returned an element not yet taken.
    pub fn has_used(&self) -> Result<bool, FrontendError> {
        Ok(self.used_idx()? != self.last_used)
    }

    fn used_idx(&self) -> Result<u16, FrontendError> {
        Ok(self
            .mem
            .load(GuestAddress(self.addrs.used + 2), Ordering::Acquire)?)
    }

    /// The next used element (id, len), if the device returned one;
    /// `in_flight` bounds how far the used index may have moved.
    pub fn next_used(
        &mut self,
        queue: usize,
        in_flight: usize,
    ) -> Result<Option<(u32, u32)>, FrontendError> {
        let used_idx = self.used_idx()?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = usize::from(used_idx.wrapping_sub(self.last_used));
        if pending > in_flight {
            return Err(FrontendError::UsedIndex {
                queue,
                last: self.last_used,
                device: used_idx,
                in_flight,
            });
        }
        let elem = self.addrs.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(elem))?;
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4))?;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some((id, len)))
    }

    /// Asks for an interrupt at the next used entry (used_event =
    /// last_used, §2.7.7) and tells whether one already arrived meanwhile,
    /// in which case the caller must not sleep.
    pub fn arm_interrupt(&mut self) -> Result<bool, FrontendError> {
        if self.event_idx {
            let used_event = self.addrs.avail + 4 + 2 * u64::from(self.size);
            self.mem
                .store(self.last_used, GuestAddress(used_event), Ordering::Release)?;
        }
        // The event index store must be visible before the used index is
        // re-read, or a completion in between would neither be seen nor
        // signalled.
        fence(Ordering::SeqCst);
        Ok(self.used_idx()? != self.last_used)
    }
}

#[cfg(test)]
mod tests {
    use super::vring_need_event;

    #[test]
    fn need_event_matches_the_spec() {
        // Moving 0 -> 1 passes event 0 only.
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(1, 1, 0));
        // A batch 5 -> 9 passes events 5..=8.
        for e in 5..=8 {
            assert!(vring_need_event(e, 9, 5), "event {e}");
        }
        assert!(!vring_need_event(9, 9, 5));
        assert!(!vring_need_event(4, 9, 5));
        // Wrapping.
        assert!(vring_need_event(0xffff, 2, 0xfffe));
        assert!(!vring_need_event(2, 2, 0xfffe));
    }
}
