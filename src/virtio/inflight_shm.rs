//! The vhost-user shared region for in-flight I/O tracking of split
//! virtqueues (vhost-user specification, "Inflight I/O tracking", protocol
//! feature `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`; messages
//! `VHOST_USER_GET_INFLIGHT_FD` and `VHOST_USER_SET_INFLIGHT_FD`).
//!
//! The backend records in this region which descriptor heads it has taken
//! from the available ring and not yet returned to the used ring. The VMM
//! keeps the region's file descriptor, so a backend that crashed and is
//! started again gets the region back and resubmits those heads.
//!
//! Layout of one queue's part (little-endian, C layout, as the
//! specification gives it):
//!
//! ```text
//! struct DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; }  // 16 bytes
//! struct QueueRegionSplit {
//!     u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;  // 16 bytes
//!     DescStateSplit desc[desc_num];
//! }
//! ```
//!
//! The queues follow one another, each taking
//! `align_up(16 * queue_size + 2, 64)` bytes: the size libvhost-user and
//! QEMU compute (`vu_inflight_queue_size`, `INFLIGHT_ALIGNMENT` 64), which
//! counts only 2 bytes of the 16-byte header but still always leaves room
//! for it (see [`queue_region_size`]).
//!
//! The VMM shares this memory and may write it at any time: it is only
//! accessed through vm-memory's volatile slices with atomic loads and
//! stores, never through Rust references; every offset is bounds-checked,
//! and the geometry (number of queues, descriptors per queue) is the one
//! checked when the region was taken, never read again from the region.

use std::fs::File;
use std::io;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{MemfdFlags, SealFlags};
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileMemoryError};

/// `INFLIGHT_ALIGNMENT` of libvhost-user: each queue's part of the region
/// starts at a multiple of 64 bytes.
pub const INFLIGHT_ALIGNMENT: u64 = 64;
/// The only layout version the specification defines (`INFLIGHT_VERSION`).
pub const INFLIGHT_VERSION: u16 = 1;
/// Most queues a region may describe. vhost-user carries the count in a
/// `u16`; this daemon offers far fewer queues, and the cap bounds what a
/// VMM can make it map and scan.
pub const MAX_QUEUES: u16 = 1024;
/// Largest queue size: a split virtqueue has at most 32768 entries
/// (virtio 1.2 §2.7: "Queue Size ... maximum ... 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Size of a `DescStateSplit`.
const DESC_STATE_SIZE: usize = 16;
/// Size of a `QueueRegionSplit` header.
const HEADER_SIZE: usize = 16;
// Header fields (offsets within a queue's part).
const VERSION: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
// `DescStateSplit` fields (offsets within a descriptor state).
const INFLIGHT: usize = 0;
const NEXT: usize = 6;
const COUNTER: usize = 8;

/// What is wrong with an in-flight region, or with its use.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region: {0} queues, 1 to {MAX_QUEUES} accepted")]
    QueueCount(u16),
    #[error("inflight region: queue size {0}, 1 to {MAX_QUEUE_SIZE} accepted")]
    QueueSize(u16),
    #[error("inflight region: mmap_size {given} is less than the {needed} bytes the queues need")]
    TooSmall { given: u64, needed: u64 },
    #[error("inflight region: mmap_offset {offset:#x} + mmap_size {size:#x} overflows")]
    Overflow { offset: u64, size: u64 },
    #[error("inflight region: mmap_offset {0:#x} is not a multiple of the page size")]
    Unaligned(u64),
    #[error(
        "inflight region: mmap_offset {offset:#x} + mmap_size {size:#x} \
         runs past the end of its {file_size}-byte file"
    )]
    PastEndOfFile {
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("inflight region: cannot read the file's seals (not a memfd?): {0}")]
    Seals(#[source] io::Error),
    #[error("inflight region: file not sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
    #[error("inflight region: cannot stat the file: {0}")]
    Stat(#[source] io::Error),
    #[error("inflight region: cannot create its memfd: {0}")]
    Create(#[source] io::Error),
    #[error("inflight region: cannot map it: {0}")]
    Map(#[source] MmapRegionError),
    #[error("inflight region: queue {queue}: header version {version}, only 1 is known")]
    Version { queue: u16, version: u16 },
    #[error("inflight region: queue {queue}: {desc_num} descriptor states for a queue size of {queue_size}")]
    DescNum {
        queue: u16,
        desc_num: u16,
        queue_size: u16,
    },
    #[error("inflight region: queue {queue}: head {head} outside a queue of {queue_size}")]
    Head {
        queue: u16,
        head: u16,
        queue_size: u16,
    },
    #[error("inflight region: access outside the mapping: {0}")]
    Access(#[from] VolatileMemoryError),
}

/// Bytes one queue's part of the region takes: `align_up(16 * queue_size
/// + 2, 64)`, libvhost-user's `vu_inflight_queue_size` (QEMU sizes the
/// region it hands back the same way). Since `16 * queue_size` is a
/// multiple of 16, rounding `16 * queue_size + 2` up to a multiple of 64
/// gives at least `16 * queue_size + 16`: the header always fits.
pub fn queue_region_size(queue_size: u16) -> u64 {
    let unaligned = 16 * u64::from(queue_size) + 2;
    unaligned.div_ceil(INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT
}

/// Bytes the whole region takes for `num_queues` queues of `queue_size`
/// (the queues' parts one after the other), after checking both counts.
pub fn region_size(num_queues: u16, queue_size: u16) -> Result<u64, InflightError> {
    if num_queues == 0 || num_queues > MAX_QUEUES {
        return Err(InflightError::QueueCount(num_queues));
    }
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::QueueSize(queue_size));
    }
    // At most 1024 * 524352 bytes: no overflow.
    Ok(u64::from(num_queues) * queue_region_size(queue_size))
}

/// The mapping and what was checked about it, shared by the region and
/// its queue views.
#[derive(Debug)]
struct Shared {
    mapping: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
    /// Bytes of one queue's part ([`queue_region_size`]).
    stride: usize,
    /// Per queue, the counter the next head taken gets (not part of the
    /// shared region: the specification derives it again on reconnect).
    counters: Box<[AtomicU64]>,
}

/// A mapped in-flight region (`Send + Sync`; clones share the mapping).
#[derive(Debug, Clone)]
pub struct InflightRegion {
    shared: Arc<Shared>,
}

/// What [`QueueInflight::recover`] found: the heads to serve again and
/// where the available ring resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resubmit {
    /// Heads still in flight, in the order they were taken (ascending
    /// counter; equal counters, which only a corrupted region has, by head).
    pub heads: Vec<u16>,
    /// The next available-ring index to take: the used ring's index plus
    /// the number of heads in flight (libvhost-user's
    /// `vu_check_queue_inflights`): every head taken before the crash is
    /// either on the used ring or in flight.
    pub next_avail: u16,
}

impl InflightRegion {
    /// A new region for `VHOST_USER_GET_INFLIGHT_FD`: a memfd of
    /// [`region_size`] bytes, sealed against shrinking and growing and
    /// against further seals (as QEMU's `qemu_memfd_alloc` seals it), each
    /// queue's header set to version 1 and `desc_num = queue_size`, the
    /// rest zero. Returns the region and a duplicate of its descriptor for
    /// the reply (mmap_offset 0, mmap_size [`Self::mmap_size`]).
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(InflightRegion, File), InflightError> {
        let size = region_size(num_queues, queue_size)?;
        let fd = rustix::fs::memfd_create(
            "vhost-scsi-inflight",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        // A new memfd's pages read as zero.
        rustix::fs::ftruncate(&fd, size).map_err(|e| InflightError::Create(e.into()))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| InflightError::Create(e.into()))?;
        let file = File::from(fd);
        let reply = file.try_clone().map_err(InflightError::Create)?;
        let region = Self::map(file, 0, size, num_queues, queue_size)?;
        for queue in 0..num_queues {
            region.init_header(queue)?;
        }
        Ok((region, reply))
    }

    /// The region the VMM hands over with `VHOST_USER_SET_INFLIGHT_FD`.
    ///
    /// Checked before anything is mapped: the counts (as [`region_size`]),
    /// `mmap_size` at least the size the queues need, `mmap_offset` a
    /// multiple of the page size, no overflow, the file sealed against
    /// shrinking (`F_SEAL_SHRINK`: a VMM truncating it later would make
    /// the daemon's next access raise SIGBUS; the regions [`Self::create`]
    /// makes are sealed, and QEMU hands back the same descriptor), and the
    /// range within the file. Only the size the queues need is mapped.
    ///
    /// Then each queue's header: version 0 means a region never used (the
    /// specification: the backend initializes it), which is cleared and
    /// set to version 1 and `desc_num = queue_size`; version 1 must have
    /// `desc_num == queue_size`; any other version is refused. A
    /// `desc_num` that differs is refused rather than reset: the region was
    /// made for this geometry (GET_INFLIGHT_FD carries the same counts), so
    /// a mismatch means it is not what the VMM says, and resetting it would
    /// silently drop the requests the guest waits for while reading it at
    /// either size could resubmit heads never taken. Nothing is written
    /// unless every header passes.
    pub fn from_vmm(
        file: File,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let needed = region_size(num_queues, queue_size)?;
        if mmap_size < needed {
            return Err(InflightError::TooSmall {
                given: mmap_size,
                needed,
            });
        }
        let overflow = InflightError::Overflow {
            offset: mmap_offset,
            size: mmap_size,
        };
        let end = mmap_offset.checked_add(mmap_size).ok_or(overflow)?;
        let page = u64::try_from(rustix::param::page_size()).unwrap_or(4096);
        if mmap_offset % page != 0 {
            return Err(InflightError::Unaligned(mmap_offset));
        }
        // The seals first: once F_SEAL_SHRINK is on, the size read next
        // cannot decrease.
        let seals =
            rustix::fs::fcntl_get_seals(&file).map_err(|e| InflightError::Seals(e.into()))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(InflightError::NotSealed);
        }
        let file_size = file.metadata().map_err(InflightError::Stat)?.len();
        if end > file_size {
            return Err(InflightError::PastEndOfFile {
                offset: mmap_offset,
                size: mmap_size,
                file_size,
            });
        }
        let region = Self::map(file, mmap_offset, needed, num_queues, queue_size)?;
        let mut uninitialized = Vec::new();
        for queue in 0..num_queues {
            let slice = region.queue_slice(queue)?;
            let version = u16::from_le(slice.load::<u16>(VERSION, Ordering::Acquire)?);
            match version {
                0 => uninitialized.push(queue),
                INFLIGHT_VERSION => {
                    let desc_num = u16::from_le(slice.load::<u16>(DESC_NUM, Ordering::Relaxed)?);
                    if desc_num != queue_size {
                        return Err(InflightError::DescNum {
                            queue,
                            desc_num,
                            queue_size,
                        });
                    }
                }
                version => return Err(InflightError::Version { queue, version }),
            }
        }
        for queue in uninitialized {
            region.clear_queue(queue)?;
            region.init_header(queue)?;
        }
        Ok(region)
    }

    /// Maps `size` bytes of `file` from `offset`, shared and writable.
    fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        // Both at most 1024 * 524352 bytes (region_size's caps).
        let size = usize::try_from(size).map_err(|_| InflightError::QueueCount(num_queues))?;
        let stride = usize::try_from(queue_region_size(queue_size))
            .map_err(|_| InflightError::QueueSize(queue_size))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(InflightError::Map)?;
        let counters = (0..num_queues).map(|_| AtomicU64::new(0)).collect();
        Ok(InflightRegion {
            shared: Arc::new(Shared {
                mapping,
                num_queues,
                queue_size,
                stride,
                counters,
            }),
        })
    }

    /// Queue `queue`'s part of the mapping.
    fn queue_slice(&self, queue: u16) -> Result<vm_memory::VolatileSlice<'_>, InflightError> {
        let shared = &self.shared;
        let base = usize::from(queue)
            .checked_mul(shared.stride)
            .ok_or(InflightError::QueueCount(queue))?;
        Ok(shared.mapping.get_slice(base, shared.stride)?)
    }

    /// Zeroes queue `queue`'s header and descriptor states.
    fn clear_queue(&self, queue: u16) -> Result<(), InflightError> {
        let slice = self.queue_slice(queue)?;
        let used = HEADER_SIZE + DESC_STATE_SIZE * usize::from(self.shared.queue_size);
        for offset in (0..used).step_by(8) {
            slice.store(0u64, offset, Ordering::Relaxed)?;
        }
        Ok(())
    }

    /// Writes queue `queue`'s `desc_num` and then (after a fence, so the
    /// header only says "initialized" once the rest is) its version.
    fn init_header(&self, queue: u16) -> Result<(), InflightError> {
        let slice = self.queue_slice(queue)?;
        slice.store(self.shared.queue_size.to_le(), DESC_NUM, Ordering::Relaxed)?;
        fence(Ordering::Release);
        slice.store(INFLIGHT_VERSION.to_le(), VERSION, Ordering::Relaxed)?;
        Ok(())
    }

    /// Bytes of the region (the reply's `mmap_size` to GET_INFLIGHT_FD).
    pub fn mmap_size(&self) -> u64 {
        // usize → u64 never loses bits on the targets vhost-user runs on.
        self.shared.mapping.size() as u64
    }

    /// Number of queues the region describes.
    pub fn num_queues(&self) -> u16 {
        self.shared.num_queues
    }

    /// Descriptor states per queue.
    pub fn queue_size(&self) -> u16 {
        self.shared.queue_size
    }

    /// The view of queue `index` a worker thread uses, or `None` past the
    /// last queue.
    pub fn queue(&self, index: u16) -> Option<QueueInflight> {
        (index < self.shared.num_queues).then(|| QueueInflight {
            region: self.clone(),
            index,
        })
    }
}

/// One queue's part of an [`InflightRegion`] (keeps the mapping alive).
///
/// Clones share the queue's counter; the protocol's steps on one queue are
/// meant to come from one thread (the queue's worker), in the order the
/// methods give.
#[derive(Debug, Clone)]
pub struct QueueInflight {
    region: InflightRegion,
    index: u16,
}

impl QueueInflight {
    /// The queue's index in the region.
    pub fn index(&self) -> u16 {
        self.index
    }

    fn slice(&self) -> Result<vm_memory::VolatileSlice<'_>, InflightError> {
        self.region.queue_slice(self.index)
    }

    fn counter(&self) -> Result<&AtomicU64, InflightError> {
        // `index < num_queues == counters.len()` (checked by `queue`).
        let shared = &self.region.shared;
        shared
            .counters
            .get(usize::from(self.index))
            .ok_or(InflightError::QueueCount(self.index))
    }

    /// Offset of `head`'s descriptor state in the queue's part, after
    /// checking the head against the queue size.
    fn desc(&self, head: u16) -> Result<usize, InflightError> {
        let queue_size = self.region.shared.queue_size;
        if head >= queue_size {
            return Err(InflightError::Head {
                queue: self.index,
                head,
                queue_size,
            });
        }
        // At most 16 + 16 * 32767: within the stride (queue_region_size).
        Ok(HEADER_SIZE + DESC_STATE_SIZE * usize::from(head))
    }

    /// The head was taken from the available ring: its state gets the next
    /// counter, then (ordered after it) `inflight = 1` (specification,
    /// split virtqueue: "Set the inflight field ... counter field ...").
    /// Call it before taking the next head: a crash before it leaves the
    /// head to be taken again from the available ring.
    pub fn begin(&self, head: u16) -> Result<(), InflightError> {
        let desc = self.desc(head)?;
        let slice = self.slice()?;
        let counter = self
            .counter()?
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_add(1))
            })
            .unwrap_or(u64::MAX);
        slice.store(counter.to_le(), desc + COUNTER, Ordering::Relaxed)?;
        fence(Ordering::Release);
        slice.store(1u8, desc + INFLIGHT, Ordering::Relaxed)?;
        Ok(())
    }

    /// The head is about to be put on the used ring, as a batch of one:
    /// `last_batch_head = head`, and the head's `next` points to itself
    /// (the end of the batch list). Call it before the used ring's index
    /// is increased.
    ///
    /// `next` is not linked to the previous batch's head: a head returned
    /// earlier may have been taken again and be in flight, and a recovery
    /// walking further than the last batch (a used index the guest moved
    /// by more than one) would clear it.
    pub fn before_used(&self, head: u16) -> Result<(), InflightError> {
        let desc = self.desc(head)?;
        let slice = self.slice()?;
        slice.store(head.to_le(), desc + NEXT, Ordering::Relaxed)?;
        slice.store(head.to_le(), LAST_BATCH_HEAD, Ordering::Relaxed)?;
        // Ordered before the used index store that follows.
        fence(Ordering::Release);
        Ok(())
    }

    /// The used ring's index `used_idx` (its new value) was published with
    /// the head: `inflight = 0`, then `used_idx` (specification: "After
    /// updating the used ring ... set inflight to 0 ... set used_idx").
    pub fn after_used(&self, head: u16, used_idx: u16) -> Result<(), InflightError> {
        let desc = self.desc(head)?;
        let slice = self.slice()?;
        // Ordered after the used index store that preceded.
        fence(Ordering::SeqCst);
        slice.store(0u8, desc + INFLIGHT, Ordering::Relaxed)?;
        fence(Ordering::Release);
        slice.store(used_idx.to_le(), USED_IDX, Ordering::Relaxed)?;
        Ok(())
    }

    /// On reconnect, with the used ring's current index: if the region's
    /// `used_idx` differs, the last batch reached the used ring but was not
    /// cleared, so its heads' `inflight` is cleared, walking the batch
    /// list from `last_batch_head` through `next` for as many entries as
    /// the two indexes differ (at most the queue size; a head outside the
    /// queue or a self-link ends it), and `used_idx` is set to the ring's.
    /// Then the heads still in flight are returned in ascending counter
    /// order and the queue's counter continues after the largest
    /// (specification, "When reconnecting"; libvhost-user's
    /// `vu_check_queue_inflights`).
    ///
    /// Every head returned is below the region's queue size, which may be
    /// above the size the driver set for the ring: the caller checks each
    /// against the ring before using it.
    pub fn recover(&self, used_ring_idx: u16) -> Result<Resubmit, InflightError> {
        let queue_size = self.region.shared.queue_size;
        let slice = self.slice()?;
        let region_used = u16::from_le(slice.load::<u16>(USED_IDX, Ordering::Acquire)?);
        if region_used != used_ring_idx {
            let batch = used_ring_idx.wrapping_sub(region_used).min(queue_size);
            let mut head = u16::from_le(slice.load::<u16>(LAST_BATCH_HEAD, Ordering::Relaxed)?);
            for _ in 0..batch {
                let Ok(desc) = self.desc(head) else { break };
                slice.store(0u8, desc + INFLIGHT, Ordering::Relaxed)?;
                let next = u16::from_le(slice.load::<u16>(desc + NEXT, Ordering::Relaxed)?);
                if next == head {
                    break;
                }
                head = next;
            }
            fence(Ordering::Release);
            slice.store(used_ring_idx.to_le(), USED_IDX, Ordering::Relaxed)?;
        }
        let mut inflight = Vec::new();
        for head in 0..queue_size {
            let desc = self.desc(head)?;
            if slice.load::<u8>(desc + INFLIGHT, Ordering::Acquire)? == 1 {
                let counter = u64::from_le(slice.load::<u64>(desc + COUNTER, Ordering::Relaxed)?);
                inflight.push((counter, head));
            }
        }
        inflight.sort_unstable();
        let next_counter = inflight
            .last()
            .map_or(0, |&(counter, _)| counter.saturating_add(1));
        self.counter()?.store(next_counter, Ordering::Relaxed);
        // At most queue_size ≤ 32768 heads.
        let in_flight = u16::try_from(inflight.len()).unwrap_or(u16::MAX);
        Ok(Resubmit {
            heads: inflight.into_iter().map(|(_, head)| head).collect(),
            next_avail: used_ring_idx.wrapping_add(in_flight),
        })
    }
}

#[cfg(test)]
mod tests;
