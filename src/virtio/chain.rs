//! Turning a descriptor chain into its device-readable and device-writable
//! parts (virtio 1.2 §2.7.4: readable descriptors first, then writable).

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions};

use smallvec::SmallVec;

use super::sglist::{SgList, Slices, INLINE_SLICES};

/// Guest memory as the daemon maps it (no dirty bitmap).
pub type GuestMem = GuestMemoryMmap<()>;

/// Why a chain cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChainError {
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("chain longer than the address space")]
    TooLong,
    #[error(
        "broken chain: a loop, a link past its table, a nested or unreadable \
         indirect table, or more than 4 GiB"
    )]
    Broken,
}

/// The guest physical ranges (address, length) of a chain's
/// device-writable descriptors: what the dirty log marks once the chain is
/// answered (see `dirty_log.rs`). Recorded for every chain, log or not, so
/// that a log switched on while a transfer is in flight covers it.
pub type WrittenRanges = SmallVec<[(u64, u32); INLINE_SLICES]>;

/// The two halves of a descriptor chain.
pub struct SplitChain<'a> {
    pub readable: SgList<'a, ()>,
    pub writable: SgList<'a, ()>,
    /// Where `writable` lies in guest physical memory.
    pub written: WrittenRanges,
}

/// Splits `chain` (a `DescriptorChain`, or a chain walked from a head
/// being resubmitted) into slices of the guest memory `mem`, checking every descriptor
/// against the memory map. The chain's own iterator bounds its length
/// (queue size, indirect table size), but it reports a chain it cannot
/// follow to the end only by stopping early: a chain whose last descriptor
/// still has VIRTQ_DESC_F_NEXT, or that yields no descriptor at all, is
/// refused whole ([`ChainError::Broken`]) rather than served from the part
/// before the break.
pub(crate) fn split_chain<'a>(
    mem: &'a Arc<GuestMem>,
    chain: impl IntoIterator<Item = Descriptor>,
) -> Result<SplitChain<'a>, ChainError> {
    let mut readable: Slices<'a, ()> = Slices::new();
    let mut writable: Slices<'a, ()> = Slices::new();
    let mut written = WrittenRanges::new();
    let (mut readable_len, mut writable_len) = (0usize, 0usize);
    // Whether the last descriptor seen ended the chain (no NEXT flag).
    let mut ended = false;
    for desc in chain {
        ended = !desc.has_next();
        let len = desc.len();
        if len == 0 {
            continue;
        }
        let (list, total, access) = if desc.is_write_only() {
            (&mut writable, &mut writable_len, Permissions::Write)
        } else {
            if !writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            (&mut readable, &mut readable_len, Permissions::Read)
        };
        *total = total.checked_add(len as usize).ok_or(ChainError::TooLong)?;
        let outside = || ChainError::OutsideMemory {
            addr: desc.addr().0,
            len,
        };
        let slices = mem
            .get_slices(desc.addr(), len as usize, access)
            .map_err(|_| outside())?;
        for slice in slices {
            list.push(slice.map_err(|_| outside())?);
        }
        if access == Permissions::Write {
            // Indirect tables are device-readable: only these are written.
            written.push((desc.addr().0, len));
        }
    }
    // The iterator stops early, with NEXT still set on the last descriptor
    // it yielded (or with none yielded), when the chain runs longer than the
    // queue size or its indirect table (a loop: virtio 1.2 §2.7.5.2 forbids
    // loops, and §2.7.5.3.1 chains "longer than the Queue Size"), links to a
    // descriptor past its table (§2.7.5: `next` indexes the table), reaches
    // an INDIRECT descriptor inside an indirect table (§2.7.5.3.1: "MUST NOT
    // set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor"), an
    // indirect table of a length that is not a whole number of descriptors
    // or that cannot be read, or more than 4 GiB in total. Serving the part before the break would execute a command
    // the driver never completed describing (a WRITE whose chain goes on
    // into a nested table, say), so nothing of it is used: the chain is
    // returned with nothing written, like one outside guest memory.
    if !ended {
        return Err(ChainError::Broken);
    }
    // SAFETY: every slice was taken from `**mem` above.
    let (readable, writable) = unsafe {
        (
            SgList::in_guest_memory(readable, readable_len, mem),
            SgList::in_guest_memory(writable, writable_len, mem),
        )
    };
    Ok(SplitChain {
        readable,
        writable,
        written,
    })
}
