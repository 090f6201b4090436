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
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

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
///
/// One difference, after the end only: a walk refused at an indirect
/// descriptor stays ended, where virtio-queue's iterator would read that
/// descriptor again if called again. `chain::split_chain`, which stops at
/// the first `None`, sees the same sequence from both.
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

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    /// Where the queue's rings start (a zero avail address is "not ready"
    /// to virtio-queue).
    const QUEUE: GuestAddress = GuestAddress(0x1000);
    const MEM_SIZE: usize = 0x10_0000;

    type Fields = (u64, u32, u16, u16);

    fn fields(d: &Descriptor) -> Fields {
        (d.addr().0, d.len(), d.flags(), d.next())
    }

    /// Writes `table` (index, descriptor) into a queue of `queue_size` and
    /// `extra` descriptors at absolute addresses (indirect tables), makes
    /// `head` available, and returns what virtio-queue's popped chain
    /// yields and what `walk_chain` yields for the same head.
    fn both(
        queue_size: u16,
        table: &[(u16, Descriptor)],
        extra: &[(u64, Descriptor)],
        head: u16,
    ) -> (Vec<Fields>, Vec<Fields>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mock = MockSplitQueue::create(&mem, QUEUE, queue_size);
        for &(index, desc) in table {
            mock.desc_table()
                .store(index, RawDescriptor::from(desc))
                .unwrap();
        }
        for &(addr, desc) in extra {
            mem.write_obj(desc, GuestAddress(addr)).unwrap();
        }
        mock.avail().ring().ref_at(0).unwrap().store(head.to_le());
        mock.avail().idx().store(1u16.to_le());
        let mut queue: Queue = mock.create_queue().unwrap();
        let crate_chain: Vec<Fields> = queue
            .iter(&mem)
            .unwrap()
            .next()
            .unwrap()
            .map(|d| fields(&d))
            .collect();
        let ours = walk_chain(&mem, mock.desc_table_addr(), queue_size, head)
            .map(|d| fields(&d))
            .collect();
        (crate_chain, ours)
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, next)
    }

    #[test]
    fn a_plain_chain_follows_next() {
        let table = [
            (2, d(0x8000, 12, NEXT, 5)),
            (5, d(0x9000, 100, NEXT, 1)),
            (1, d(0xa000, 512, WRITE, 7)),
        ];
        let (theirs, ours) = both(8, &table, &[], 2);
        assert_eq!(
            ours,
            [
                (0x8000, 12, NEXT, 5),
                (0x9000, 100, NEXT, 1),
                (0xa000, 512, WRITE, 7)
            ]
        );
        assert_eq!(ours, theirs);
    }

    #[test]
    fn an_indirect_table_replaces_the_rest_of_the_chain() {
        // The INDIRECT descriptor's own NEXT is not followed.
        let table = [
            (0, d(0x4_0000, 48, INDIRECT | NEXT, 1)),
            (1, d(0x9000, 1, 0, 0)),
        ];
        let extra = [
            (0x4_0000, d(0x8000, 16, NEXT, 2)),
            (0x4_0020, d(0x8100, 32, NEXT, 1)),
            (0x4_0010, d(0x8200, 64, WRITE, 0)),
        ];
        let (theirs, ours) = both(8, &table, &extra, 0);
        assert_eq!(
            ours,
            [
                (0x8000, 16, NEXT, 2),
                (0x8100, 32, NEXT, 1),
                (0x8200, 64, WRITE, 0)
            ]
        );
        assert_eq!(ours, theirs);
    }

    #[test]
    fn an_indirect_table_after_direct_descriptors() {
        let table = [
            (3, d(0x8000, 16, NEXT, 4)),
            (4, d(0x4_0000, 16, INDIRECT, 0)),
        ];
        let extra = [(0x4_0000, d(0x8200, 64, WRITE, 0))];
        let (theirs, ours) = both(8, &table, &extra, 3);
        assert_eq!(ours, [(0x8000, 16, NEXT, 4), (0x8200, 64, WRITE, 0)]);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_loop_stops_after_queue_size_descriptors() {
        let table = [(0, d(0x8000, 1, NEXT, 1)), (1, d(0x9000, 2, NEXT, 0))];
        let (theirs, ours) = both(4, &table, &[], 0);
        // Four descriptors, the last still with NEXT.
        assert_eq!(
            ours,
            [
                (0x8000, 1, NEXT, 1),
                (0x9000, 2, NEXT, 0),
                (0x8000, 1, NEXT, 1),
                (0x9000, 2, NEXT, 0)
            ]
        );
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_loop_in_an_indirect_table_stops_after_its_entries() {
        let table = [(0, d(0x4_0000, 32, INDIRECT, 0))];
        let extra = [
            (0x4_0000, d(0x8000, 1, NEXT, 1)),
            (0x4_0010, d(0x9000, 2, NEXT, 0)),
        ];
        let (theirs, ours) = both(8, &table, &extra, 0);
        assert_eq!(ours, [(0x8000, 1, NEXT, 1), (0x9000, 2, NEXT, 0)]);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_next_past_the_table_stops() {
        let table = [(0, d(0x8000, 1, NEXT, 8))];
        let (theirs, ours) = both(8, &table, &[], 0);
        assert_eq!(ours, [(0x8000, 1, NEXT, 8)]);
        assert_eq!(ours, theirs);
        // In an indirect table of two entries, next = 2 is past it.
        let table = [(0, d(0x4_0000, 32, INDIRECT, 0))];
        let extra = [(0x4_0000, d(0x8000, 1, NEXT, 2))];
        let (theirs, ours) = both(8, &table, &extra, 0);
        assert_eq!(ours, [(0x8000, 1, NEXT, 2)]);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_nested_indirect_table_stops() {
        let table = [(0, d(0x4_0000, 32, INDIRECT, 0))];
        let extra = [
            (0x4_0000, d(0x8000, 1, NEXT, 1)),
            (0x4_0010, d(0x5_0000, 16, INDIRECT, 0)),
            (0x5_0000, d(0x9000, 1, 0, 0)),
        ];
        let (theirs, ours) = both(8, &table, &extra, 0);
        assert_eq!(ours, [(0x8000, 1, NEXT, 1)]);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn unusable_indirect_tables_yield_nothing() {
        let tables = [
            d(0x4_0000, 0, INDIRECT, 0),          // empty
            d(0x4_0000, 24, INDIRECT, 0),         // not a multiple of 16
            d(0x4_0000, 16 * 65536, INDIRECT, 0), // more than 65535 entries
            d(MEM_SIZE as u64, 16, INDIRECT, 0),  // outside guest memory
            d(u64::MAX - 15, 32, INDIRECT, 0),    // second entry overflows
        ];
        let extra = [(0x4_0000, d(0x8000, 1, 0, 0))];
        for table in tables {
            let (theirs, ours) = both(8, &[(0, table)], &extra, 0);
            assert_eq!(ours, [], "{table:?}");
            assert_eq!(ours, theirs, "{table:?}");
        }
    }

    #[test]
    fn the_largest_indirect_table_is_followed() {
        // 65535 entries: accepted; only entry 0 is read.
        let table = [(0, d(0x4_0000, 16 * 65535, INDIRECT, 0))];
        let extra = [(0x4_0000, d(0x8000, 7, 0, 0))];
        let (theirs, ours) = both(8, &table, &extra, 0);
        assert_eq!(ours, [(0x8000, 7, 0, 0)]);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_head_past_the_table_yields_nothing() {
        let table = [(0, d(0x8000, 1, 0, 0))];
        for head in [8, u16::MAX] {
            let (theirs, ours) = both(8, &table, &[], head);
            assert_eq!(ours, []);
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn a_chain_past_4_gib_stops_before_the_descriptor_crossing() {
        let table = [
            (0, d(0x8000, 0x8000_0000, NEXT, 1)),
            (1, d(0x9000, 0x7fff_ffff, NEXT, 2)),
            (2, d(0xa000, 1, 0, 0)),
        ];
        let (theirs, ours) = both(8, &table, &[], 0);
        assert_eq!(
            ours,
            [
                (0x8000, 0x8000_0000, NEXT, 1),
                (0x9000, 0x7fff_ffff, NEXT, 2)
            ]
        );
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_descriptor_table_outside_memory_yields_nothing() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert_eq!(walk_chain(&mem, GuestAddress(0x1000), 8, 0).count(), 0);
        assert_eq!(
            walk_chain(&mem, GuestAddress(u64::MAX - 15), 8, 1).count(),
            0
        );
    }
}
