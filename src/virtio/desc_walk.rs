//! Walking a split virtqueue's descriptor chain from a head index (virtio
//! 1.2 §2.7.5 "The Virtqueue Descriptor Table", §2.7.5.3 "Indirect
//! Descriptors").
//!
//! virtio-queue 0.18 builds a `DescriptorChain` only for a head it pops
//! from the available ring (its constructor is `pub(crate)`). A head
//! recorded in the in-flight region ([`super::inflight_shm`]) is served
//! again without being popped, so [`walk_chain`] follows a chain from any
//! head with the same rules as that iterator, and ends the same way when
//! the chain cannot be followed: the iterator stops, the last descriptor
//! it yielded still having `VIRTQ_DESC_F_NEXT` (or none yielded), which
//! [`super::chain`] refuses as a broken chain.

use std::mem::size_of;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Size of a split descriptor (virtio 1.2 §2.7.5: `le64 addr; le32 len;
/// le16 flags; le16 next;`), and the unit an indirect table's length must
/// be a multiple of (§2.7.5.3: "a table of indirect descriptors, `len`
/// bytes ... of struct virtq_desc").
const DESC_SIZE: u32 = 16;

const _: () = assert!(size_of::<Descriptor>() == DESC_SIZE as usize);

/// The descriptors of the chain starting at `head` in the descriptor table
/// at `desc_table` of a queue of `queue_size` entries, read from `mem`.
///
/// The rules of virtio-queue's `DescriptorChain` iterator:
/// - at most `queue_size` descriptors are followed in the queue's table
///   (§2.7.5.3.1: a chain is no longer than the queue size, so a longer one
///   is a loop), at most the table's entry count in an indirect table;
/// - a `next` (or the head) at or past the table's entry count ends it
///   (§2.7.5: `next` indexes the table);
/// - a descriptor with `VIRTQ_DESC_F_INDIRECT` is not yielded: the walk
///   continues at entry 0 of the table it points to, whose length must be
///   a multiple of 16 (a length of 0 gives an empty table) of at most
///   65535 entries, and only from the queue's own table (§2.7.5.3.1: "MUST
///   NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect
///   descriptor"); the rest of the queue's chain is not followed;
/// - a descriptor that cannot be read from `mem` (its address overflowing
///   or outside guest memory) ends it;
/// - the walk ends before a descriptor that would bring the bytes yielded
///   past `u32::MAX` (§2.7.5.2: "MUST NOT add a descriptor chain longer
///   than 2^32 bytes in total").
pub fn walk_chain<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> ChainWalk<'_, M> {
    ChainWalk {
        mem,
        table: desc_table,
        table_len: queue_size,
        next: head,
        remaining: queue_size,
        yielded_bytes: 0,
        in_indirect: false,
    }
}

/// The iterator [`walk_chain`] returns.
#[derive(Debug, Clone)]
pub struct ChainWalk<'a, M> {
    mem: &'a M,
    /// The table being walked: the queue's, then possibly an indirect one.
    table: GuestAddress,
    /// Entries in that table.
    table_len: u16,
    /// Index of the next descriptor to read in it.
    next: u16,
    /// Descriptors that may still be followed in it.
    remaining: u16,
    /// Sum of the lengths yielded so far.
    yielded_bytes: u32,
    /// Whether `table` is an indirect table.
    in_indirect: bool,
}

impl<M: GuestMemory> ChainWalk<'_, M> {
    /// Reads the descriptor at index `next` of the current table.
    fn read(&self) -> Option<Descriptor> {
        let offset = u64::from(self.next).checked_mul(u64::from(DESC_SIZE))?;
        let addr = self.table.checked_add(offset)?;
        self.mem.read_obj::<Descriptor>(addr).ok()
    }

    /// Moves to the indirect table `desc` points to, or `None` if it
    /// cannot be used.
    fn enter_indirect(&mut self, desc: &Descriptor) -> Option<()> {
        if self.in_indirect || desc.len() % DESC_SIZE != 0 {
            return None;
        }
        let entries = u16::try_from(desc.len() / DESC_SIZE).ok()?;
        self.table = desc.addr();
        self.table_len = entries;
        self.next = 0;
        self.remaining = entries;
        self.in_indirect = true;
        Some(())
    }
}

impl<M: GuestMemory> Iterator for ChainWalk<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        // At most two rounds: an indirect descriptor is only followed from
        // the queue's table.
        loop {
            if self.remaining == 0 || self.next >= self.table_len {
                return None;
            }
            let desc = self.read()?;
            if desc.refers_to_indirect_table() {
                // A refused table ends the walk for good: the next call
                // would read the same descriptor and refuse it again.
                if self.enter_indirect(&desc).is_none() {
                    self.remaining = 0;
                    return None;
                }
                continue;
            }
            self.yielded_bytes = self.yielded_bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.remaining -= 1;
            } else {
                self.remaining = 0;
            }
            return Some(desc);
        }
    }
}
