//! Turning a descriptor chain into its device-readable and device-writable
//! parts (virtio 1.2 §2.7.4: readable descriptors first, then writable).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions};

use super::sglist::{SgList, Slices};

/// Guest memory as the daemon maps it (no dirty bitmap).
pub type GuestMem = GuestMemoryMmap<()>;

/// Why a chain cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("chain longer than the address space")]
    TooLong,
}

/// The two halves of a descriptor chain.
pub struct SplitChain<'a> {
    pub readable: SgList<'a, ()>,
    pub writable: SgList<'a, ()>,
}

/// Splits `chain` into guest memory slices, checking every descriptor
/// against the memory map. The chain's own iterator bounds its length
/// (queue size, indirect table size) and rejects loops.
pub fn split_chain<'a, M>(
    mem: &'a GuestMem,
    chain: DescriptorChain<M>,
) -> Result<SplitChain<'a>, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut readable: Slices<'a, ()> = Slices::new();
    let mut writable: Slices<'a, ()> = Slices::new();
    let (mut readable_len, mut writable_len) = (0usize, 0usize);
    for desc in chain {
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
    }
    Ok(SplitChain {
        readable: SgList::new(readable, readable_len),
        writable: SgList::new(writable, writable_len),
    })
}
