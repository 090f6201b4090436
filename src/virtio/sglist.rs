//! A scatter-gather list over guest memory: the device-readable or the
//! device-writable part of one descriptor chain, consumed front to back.
//! Every slice was bounds-checked against the guest's memory map when the
//! list was built, so no access through it can leave guest memory.

use std::io;
use std::sync::Arc;

use smallvec::SmallVec;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::chain::GuestMem;
use crate::scsi::{DataIn, DataOut};
use crate::storage::engine::transfer_sync;
use crate::storage::{
    Direction, IoBufsMut, PinSink, PinnedBufs, Storage, Transfer, TransferMemory,
};

// Writes through raw pointers bypass vm-memory's dirty bitmap (the backend
// uses none): for live migration, the chain's writable ranges are marked in
// the VMM's dirty log explicitly once answered (dirty_log.rs).

/// How many iovecs are handed to the storage at once (kept on the stack).
const IOVEC_BATCH: usize = 64;

/// Slices kept inline before spilling to the heap: a typical request has a
/// handful per direction.
pub const INLINE_SLICES: usize = 8;

/// The slices of one direction of a chain.
pub type Slices<'a, B> = SmallVec<[VolatileSlice<'a, B>; INLINE_SLICES]>;

pub struct SgList<'a, B> {
    slices: Slices<'a, B>,
    /// Index of the first slice not fully consumed.
    index: usize,
    /// Bytes consumed of `slices[index]`.
    offset: usize,
    remaining: usize,
    consumed: usize,
    /// The guest memory every slice lies in, when the list was built from
    /// a mapping an `Arc` owns: the list's memory can then be pinned for
    /// an asynchronous transfer (see [`SgList::in_guest_memory`]).
    owner: Option<&'a Arc<GuestMem>>,
}

impl<'a> SgList<'a, ()> {
    /// A list over guest memory that `owner` maps; `total` as for
    /// [`SgList::new`].
    ///
    /// # Safety
    /// Every slice must lie in `owner`'s mappings (taken from `**owner`):
    /// [`TransferMemory::pin`] relies on `owner` keeping them mapped.
    pub(super) unsafe fn in_guest_memory(
        slices: Slices<'a, ()>,
        total: usize,
        owner: &'a Arc<GuestMem>,
    ) -> Self {
        SgList {
            owner: Some(owner),
            ..SgList::new(slices, total)
        }
    }
}

impl<'a, B: BitmapSlice> SgList<'a, B> {
    /// `total` must be the sum of the slices' lengths (the caller computed it
    /// with checked arithmetic while building `slices`). Such a list cannot
    /// be pinned.
    pub fn new(slices: Slices<'a, B>, total: usize) -> Self {
        SgList {
            slices,
            index: 0,
            offset: 0,
            remaining: total,
            consumed: 0,
            owner: None,
        }
    }

    pub fn remaining(&self) -> usize {
        self.remaining
    }

    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// Calls `f` on successive pieces covering the next `len` bytes (or
    /// fewer if the list ends), consuming them. `f` returns how many bytes
    /// of its piece it used; consumption stops at the first short use.
    fn consume_with<F>(&mut self, len: usize, mut f: F) -> usize
    where
        F: FnMut(&VolatileSlice<'a, B>, usize) -> usize,
    {
        let mut done = 0;
        while done < len && self.index < self.slices.len() {
            let slice = &self.slices[self.index];
            let avail = slice.len() - self.offset;
            let want = avail.min(len - done);
            let Ok(piece) = slice.subslice(self.offset, want) else {
                break;
            };
            let used = f(&piece, done).min(want);
            self.advance(used);
            done += used;
            if used < want {
                break;
            }
        }
        done
    }

    /// Consumes `n` bytes (at most `remaining`), across as many slices as
    /// they span.
    fn advance(&mut self, n: usize) {
        let n = n.min(self.remaining);
        self.remaining -= n;
        self.consumed += n;
        let mut left = n;
        while self.index < self.slices.len() {
            let avail = self.slices[self.index].len() - self.offset;
            if left < avail {
                self.offset += left;
                break;
            }
            left -= avail;
            self.index += 1;
            self.offset = 0;
        }
    }

    /// Copies the next `buf.len()` bytes out of guest memory; returns the
    /// count copied (short only at the end of the list).
    pub fn read_into(&mut self, buf: &mut [u8]) -> usize {
        self.consume_with(buf.len(), |piece, at| {
            piece.copy_to(&mut buf[at..at + piece.len()])
        })
    }

    /// Copies `data` into guest memory; returns the count copied.
    pub fn write_from(&mut self, data: &[u8]) -> usize {
        self.consume_with(data.len(), |piece, at| {
            piece.copy_from(&data[at..at + piece.len()]);
            piece.len()
        })
    }

    /// Skips `len` bytes; returns the count skipped.
    pub fn skip(&mut self, len: usize) -> usize {
        self.consume_with(len, |piece, _| piece.len())
    }

    /// Splits off the first `len` bytes as a list of their own (the rest
    /// stays in `self`). Returns `None` if fewer than `len` bytes remain.
    pub fn split_front(&mut self, len: usize) -> Option<SgList<'a, B>> {
        if len > self.remaining {
            return None;
        }
        let mut front = Slices::new();
        let consumed = self.consumed;
        self.consume_with(len, |piece, _| {
            front.push(piece.clone());
            piece.len()
        });
        // Splitting is not a transfer: `consumed` keeps counting only the
        // bytes read or written through `self`.
        self.consumed = consumed;
        Some(SgList {
            // The pieces lie where `self`'s do.
            owner: self.owner,
            ..SgList::new(front, len)
        })
    }
}

impl<'a> SgList<'a, ()> {
    /// Hands the next `len` bytes to `io` as batches of pieces (with the
    /// byte offset of each batch), consuming them as each batch succeeds.
    ///
    /// Every batch starts and ends at a multiple of `granule` from the
    /// start (but the last, which ends at `len`): storage opened with
    /// O_DIRECT takes only transfers whose offset and length are multiples
    /// of its alignment, and bounces each call's memory as a whole. Where a
    /// batch of `IOVEC_BATCH` pieces does not reach the next multiple
    /// (a chain cut into tiny pieces), that stretch goes through a buffer of
    /// `granule` bytes instead, copied in the direction `flow` says.
    pub fn transfer(
        &mut self,
        len: usize,
        granule: usize,
        flow: Flow,
        io: &mut dyn FnMut(&mut IoBufsMut<'_>, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        if len > self.remaining {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let granule = granule.max(1);
        let mut done = 0usize;
        while done < len {
            let mut bufs = IoBufsMut::new();
            let mut count = 0;
            let mut batch_len = 0usize;
            let mut index = self.index;
            let mut offset_in = self.offset;
            while count < IOVEC_BATCH && index < self.slices.len() && done + batch_len < len {
                let slice = &self.slices[index];
                let take = (slice.len() - offset_in).min(len - done - batch_len);
                let Ok(piece) = slice.subslice(offset_in, take) else {
                    return Err(io::Error::from(io::ErrorKind::InvalidInput));
                };
                bufs.push_guest(&piece);
                count += 1;
                batch_len += take;
                index += 1;
                offset_in = 0;
            }
            if done + batch_len < len {
                // Not the last batch: end it at a multiple of `granule`
                // (`done` is one), cutting its last pieces short.
                let excess = (done + batch_len) % granule;
                if excess == batch_len {
                    let stretch = granule.min(len - done);
                    self.transfer_through_buffer(done, stretch, flow, io)?;
                    done += stretch;
                    continue;
                }
                batch_len -= excess;
                bufs.truncate(batch_len);
            }
            io(&mut bufs, done as u64)?;
            self.advance(batch_len);
            done += batch_len;
        }
        Ok(())
    }

    /// Moves the next `len` bytes between guest memory and `io` through a
    /// buffer of their own (a stretch too finely cut for one batch).
    fn transfer_through_buffer(
        &mut self,
        done: usize,
        len: usize,
        flow: Flow,
        io: &mut dyn FnMut(&mut IoBufsMut<'_>, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        // At most one storage alignment unit (4 KiB on common devices):
        // chosen by the storage, not the guest.
        let mut buf = vec![0u8; len];
        match flow {
            Flow::ToGuest => {
                let mut whole = IoBufsMut::new();
                whole.push_bytes(&mut buf);
                io(&mut whole, done as u64)?;
                if self.write_from(&buf) < len {
                    return Err(io::Error::from(io::ErrorKind::InvalidInput));
                }
            }
            Flow::FromGuest => {
                if self.read_into(&mut buf) < len {
                    return Err(io::Error::from(io::ErrorKind::InvalidInput));
                }
                let mut whole = IoBufsMut::new();
                whole.push_bytes(&mut buf);
                io(&mut whole, done as u64)?;
            }
        }
        Ok(())
    }
}

/// A list over guest memory is the memory of a READ's data-in or a
/// WRITE's data-out, for whichever engine carries the transfer out.
impl TransferMemory for SgList<'_, ()> {
    fn transfer(
        &mut self,
        len: usize,
        granule: usize,
        direction: Direction,
        io: &mut dyn FnMut(&mut IoBufsMut<'_>, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let flow = match direction {
            Direction::Read => Flow::ToGuest,
            Direction::Write { .. } => Flow::FromGuest,
        };
        SgList::transfer(self, len, granule, flow, io)
    }

    fn pin(&self, len: usize, max_pieces: usize, out: &mut PinnedBufs) -> bool {
        let Some(owner) = self.owner else {
            out.release();
            return false;
        };
        if len > self.remaining {
            out.release();
            return false;
        }
        let fill = |sink: &mut PinSink<'_>| {
            let mut left = len;
            let mut index = self.index;
            let mut offset_in = self.offset;
            while left > 0 && index < self.slices.len() {
                let slice = &self.slices[index];
                let take = (slice.len() - offset_in).min(left);
                let Ok(piece) = slice.subslice(offset_in, take) else {
                    return false;
                };
                if take > 0 {
                    if sink.pieces() == max_pieces {
                        // More pieces than the caller takes: the list
                        // never grows past `max_pieces` for a guest's chain.
                        return false;
                    }
                    sink.push(&piece);
                }
                left -= take;
                index += 1;
                offset_in = 0;
            }
            left == 0
        };
        // SAFETY: every slice of a list with an owner lies in the owner's
        // mappings (`in_guest_memory`'s contract, kept by `split_front`),
        // and `fill` pushes pieces of those slices; the `Arc` handed over
        // keeps the mappings alive for as long as `out` holds it.
        unsafe { out.pin_with(owner.clone(), fill) }
    }
}

/// Which way a [`SgList::transfer`] moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// From storage into guest memory (a read).
    ToGuest,
    /// From guest memory to storage (a write).
    FromGuest,
}

/// Data-in over guest memory.
pub struct GuestDataIn<'s, 'a>(pub &'s mut SgList<'a, ()>);

impl DataIn for GuestDataIn<'_, '_> {
    fn remaining(&self) -> usize {
        self.0.remaining()
    }

    fn written(&self) -> usize {
        self.0.consumed()
    }

    fn write_bytes(&mut self, data: &[u8]) -> usize {
        self.0.write_from(data)
    }

    fn read_from(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> io::Result<()> {
        let transfer = Transfer {
            offset,
            len,
            direction: Direction::Read,
        };
        transfer_sync(storage, transfer, self.0)
    }
}

/// Data-out over guest memory.
pub struct GuestDataOut<'s, 'a>(pub &'s mut SgList<'a, ()>);

impl DataOut for GuestDataOut<'_, '_> {
    fn remaining(&self) -> usize {
        self.0.remaining()
    }

    fn read_bytes(&mut self, buf: &mut [u8]) -> usize {
        self.0.read_into(buf)
    }

    fn write_to(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        len: usize,
        durable: bool,
    ) -> io::Result<()> {
        let transfer = Transfer {
            offset,
            len,
            direction: Direction::Write { durable },
        };
        transfer_sync(storage, transfer, self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transfers `len` bytes of `memory` cut into `piece`-byte slices with
    /// `granule`, out to a byte vector; returns each call's (offset, length)
    /// and the bytes that arrived.
    fn transfer_out(
        memory: &mut [u8],
        piece: usize,
        granule: usize,
    ) -> (Vec<(u64, usize)>, Vec<u8>) {
        let len = memory.len();
        let slices: Slices<'_, ()> = memory.chunks_mut(piece).map(VolatileSlice::from).collect();
        let mut list = SgList::new(slices, len);
        let mut calls = Vec::new();
        let mut arrived = vec![0u8; len];
        list.transfer(len, granule, Flow::FromGuest, &mut |bufs, at| {
            let pos = at as usize;
            let call_len = bufs.gather_into(&mut arrived[pos..]);
            assert_eq!(call_len, bufs.len());
            calls.push((at, call_len));
            Ok(())
        })
        .unwrap();
        assert_eq!(list.remaining(), 0);
        (calls, arrived)
    }

    #[test]
    fn batches_end_at_multiples_of_the_granule() {
        let mut memory: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let expected = memory.clone();
        // 132 pieces of 500 bytes (the last 36): three batches.
        let (calls, arrived) = transfer_out(&mut memory, 500, 512);
        assert_eq!(arrived, expected);
        assert!(calls.len() >= 2, "{calls:?}");
        for &(at, len) in &calls {
            assert_eq!((at % 512, len % 512), (0, 0), "{calls:?}");
        }
        assert_eq!(calls.iter().map(|c| c.1).sum::<usize>(), 65536);
    }

    #[test]
    fn stretches_finer_than_a_batch_go_through_a_buffer() {
        let mut memory: Vec<u8> = (0..2048u32).map(|i| (i % 253) as u8).collect();
        let expected = memory.clone();
        let (calls, arrived) = transfer_out(&mut memory, 1, 512);
        assert_eq!(arrived, expected);
        assert_eq!(calls, vec![(0, 512), (512, 512), (1024, 512), (1536, 512)]);
    }

    #[test]
    fn granule_one_takes_full_batches() {
        let mut memory = vec![7u8; 1000];
        let (calls, _) = transfer_out(&mut memory, 10, 1);
        assert_eq!(calls, vec![(0, 640), (640, 360)]);
    }
}
