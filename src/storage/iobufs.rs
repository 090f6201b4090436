//! Memory a transfer moves bytes into or out of, as the lists of
//! (address, length) pieces that `preadv(2)` and io_uring take.
//!
//! Raw iovecs say nothing about how long their memory lives; these types
//! do. [`IoBufsMut`] (a read's destination) and [`IoBufs`] (a write's
//! source) borrow their memory for a lifetime and can only be built from
//! byte slices or guest memory slices (`vm-memory`'s `VolatileSlice`), so
//! a safe function that takes one can hand its pieces to the kernel.
//! [`PinnedBufs`] is the owned form an asynchronous engine keeps while the
//! kernel works: its pieces stay valid because it holds the owner of their
//! memory (the guest memory mapping); building one is the single unsafe
//! step, [`PinnedBufs::pin_with`].

use std::any::Any;
use std::marker::PhantomData;
use std::sync::Arc;

use smallvec::SmallVec;
use vm_memory::VolatileSlice;

/// Pieces kept inline: a transfer batch of the transport (64) without a
/// heap allocation.
const INLINE_PIECES: usize = 64;

type Pieces = SmallVec<[libc::iovec; INLINE_PIECES]>;

/// The piece list both borrowed types share.
#[derive(Default)]
struct PieceList {
    pieces: Pieces,
    /// Sum of the pieces' lengths.
    len: usize,
}

impl PieceList {
    /// # Safety
    /// `base` names `len` bytes valid for the accesses the owning list
    /// type allows, for the owning list's lifetime.
    unsafe fn push(&mut self, base: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        self.pieces.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
        // A list covers memory that exists, so its length fits in usize.
        self.len = self.len.saturating_add(len);
    }

    fn truncate(&mut self, len: usize) {
        truncate_pieces(&mut self.pieces, &mut self.len, len);
    }

    fn advance(&mut self, n: usize) {
        let n = n.min(self.len);
        let whole = advance_pieces(&mut self.pieces, n);
        self.pieces.drain(..whole);
        self.len -= n;
    }

    /// Copies bytes out of the pieces into `out`, in order; returns the
    /// count copied.
    fn gather(&self, out: &mut [u8]) -> usize {
        // SAFETY: the pieces of every list are valid for reads while it
        // lives (each list type's invariant, kept by `push`'s callers).
        unsafe { gather(&self.pieces, out) }
    }
}

/// Cuts `pieces` (of total `total`) back to their first `len` bytes.
fn truncate_pieces(pieces: &mut Pieces, total: &mut usize, len: usize) {
    if len >= *total {
        return;
    }
    let mut kept = 0usize;
    let mut count = 0;
    for piece in pieces.iter_mut() {
        if kept == len {
            break;
        }
        let take = piece.iov_len.min(len - kept);
        piece.iov_len = take;
        kept += take;
        count += 1;
    }
    pieces.truncate(count);
    *total = len;
}

/// Shortens the pieces by their first `n` bytes (at most their total) and
/// returns how many pieces were used up whole; the caller removes those.
pub(super) fn advance_pieces(pieces: &mut [libc::iovec], mut n: usize) -> usize {
    let mut whole = 0;
    for piece in pieces.iter_mut() {
        if n < piece.iov_len {
            // Stays inside the piece: `n` is below its length.
            piece.iov_base = piece.iov_base.cast::<u8>().wrapping_add(n).cast();
            piece.iov_len -= n;
            break;
        }
        n -= piece.iov_len;
        whole += 1;
    }
    whole
}

/// Copies bytes out of `pieces` into `out`, in order; returns the count
/// copied.
///
/// # Safety
/// Every piece is valid for reads of its length for the call.
unsafe fn gather(pieces: &[libc::iovec], out: &mut [u8]) -> usize {
    let mut done = 0;
    for piece in pieces {
        if done == out.len() {
            break;
        }
        let n = piece.iov_len.min(out.len() - done);
        // SAFETY: every piece is valid for reads of its length (this
        // function's contract); `n` is at most that, and
        // `out[done..done + n]` is in bounds. Raw copies: guest memory may
        // change under us, so no reference to it is made.
        unsafe {
            std::ptr::copy_nonoverlapping(piece.iov_base.cast::<u8>(), out[done..].as_mut_ptr(), n);
        }
        done += n;
    }
    done
}

/// Copies `data` into the pieces from byte `at` of the list on; returns
/// the count copied.
///
/// # Safety
/// Every piece is valid for writes of its length for the call.
unsafe fn scatter(pieces: &[libc::iovec], mut at: usize, data: &[u8]) -> usize {
    let mut done = 0;
    for piece in pieces {
        if done == data.len() {
            break;
        }
        if at >= piece.iov_len {
            at -= piece.iov_len;
            continue;
        }
        let n = (piece.iov_len - at).min(data.len() - done);
        // SAFETY: every piece is valid for writes of its length (this
        // function's contract); `at + n` is at most that, and
        // `data[done..done + n]` is in bounds.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data[done..].as_ptr(),
                piece.iov_base.cast::<u8>().add(at),
                n,
            );
        }
        at = 0;
        done += n;
    }
    done
}

/// Memory a read fills: every piece is valid for writes (and reads) for
/// `'a`.
#[derive(Default)]
pub struct IoBufsMut<'a> {
    list: PieceList,
    _memory: PhantomData<&'a mut [u8]>,
}

impl<'a> IoBufsMut<'a> {
    pub fn new() -> Self {
        IoBufsMut::default()
    }

    /// Adds a byte slice.
    pub fn push_bytes(&mut self, bytes: &'a mut [u8]) {
        // SAFETY: the slice is borrowed mutably for 'a.
        unsafe { self.list.push(bytes.as_mut_ptr(), bytes.len()) };
    }

    /// Adds a slice of guest memory. Guest memory here has no dirty bitmap
    /// (the `()` type parameter): bytes written through the pointer need no
    /// marking, and the pointer is the mapping itself, valid for `'a`.
    pub fn push_guest(&mut self, slice: &VolatileSlice<'a, ()>) {
        // SAFETY: a volatile slice names `len` bytes of mapped memory,
        // valid for reads and writes for 'a; without a bitmap, its pointer
        // guard is the mapping itself, not a copy that ends with the guard.
        unsafe { self.list.push(slice.ptr_guard_mut().as_ptr(), slice.len()) };
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.list.len
    }

    pub fn is_empty(&self) -> bool {
        self.list.len == 0
    }

    /// Keeps only the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.list.truncate(len);
    }

    /// Drops the first `n` bytes (after a short transfer).
    pub fn advance(&mut self, n: usize) {
        self.list.advance(n);
    }

    /// Copies `data` into the pieces, in order; returns the count copied
    /// (short if the pieces hold less).
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        self.fill_at(0, data)
    }

    /// As [`IoBufsMut::fill_from`], from byte `at` of the list on.
    pub fn fill_at(&mut self, at: usize, data: &[u8]) -> usize {
        // SAFETY: the pieces are valid for writes while `self` lives.
        unsafe { scatter(&self.list.pieces, at, data) }
    }

    /// Copies the pieces' bytes into `out`; returns the count copied.
    pub fn gather_into(&self, out: &mut [u8]) -> usize {
        self.list.gather(out)
    }

    /// The pieces, for a system call (valid for writes of their lengths
    /// while `self` lives).
    pub(crate) fn iovecs(&self) -> &[libc::iovec] {
        &self.list.pieces
    }

    /// The same memory as a write's source.
    pub fn as_source(&self) -> IoBufs<'_> {
        IoBufs {
            list: PieceList {
                pieces: self.list.pieces.clone(),
                len: self.list.len,
            },
            _memory: PhantomData,
        }
    }
}

/// Memory a write takes its bytes from: every piece is valid for reads
/// for `'a`.
#[derive(Default)]
pub struct IoBufs<'a> {
    list: PieceList,
    _memory: PhantomData<&'a [u8]>,
}

impl<'a> IoBufs<'a> {
    pub fn new() -> Self {
        IoBufs::default()
    }

    /// Adds a byte slice.
    pub fn push_bytes(&mut self, bytes: &'a [u8]) {
        // SAFETY: the slice is borrowed for 'a, and an `IoBufs` is only
        // ever read through (the kernel reads a write's source).
        unsafe { self.list.push(bytes.as_ptr().cast_mut(), bytes.len()) };
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.list.len
    }

    pub fn is_empty(&self) -> bool {
        self.list.len == 0
    }

    /// Copies the pieces' bytes into `out`; returns the count copied.
    pub fn gather_into(&self, out: &mut [u8]) -> usize {
        self.list.gather(out)
    }

    /// The pieces, for a system call (valid for reads of their lengths
    /// while `self` lives).
    pub(crate) fn iovecs(&self) -> &[libc::iovec] {
        &self.list.pieces
    }
}

impl<'a> From<IoBufsMut<'a>> for IoBufs<'a> {
    fn from(bufs: IoBufsMut<'a>) -> Self {
        IoBufs {
            list: bufs.list,
            _memory: PhantomData,
        }
    }
}

/// What keeps pinned memory valid: for guest memory, its mapping.
pub type MemoryOwner = Arc<dyn Any + Send + Sync>;

/// Memory an asynchronous transfer uses after the call that started it
/// returned: pieces, and the owner that keeps them valid (mapped) for as
/// long as this holds it. Reused from transfer to transfer; its piece
/// vector stays at a stable address while nothing changes it, as io_uring
/// needs for an in-flight READV/WRITEV.
#[derive(Default)]
pub struct PinnedBufs {
    pieces: Vec<libc::iovec>,
    len: usize,
    owner: Option<MemoryOwner>,
}

// SAFETY: the pieces name memory that `owner` (Send + Sync) keeps valid;
// they may be used from any thread, as the owner may.
unsafe impl Send for PinnedBufs {}

impl PinnedBufs {
    pub fn new() -> Self {
        PinnedBufs::default()
    }

    /// Pins the slices `fill` pushes (replacing any held) and keeps
    /// `owner` until [`PinnedBufs::release`]; if `fill` returns false,
    /// nothing is held. Pieces go straight into the reused vector: no
    /// allocation once it has grown, no copy of a list.
    ///
    /// # Safety
    /// Every slice `fill` pushes must lie in memory that `owner` keeps valid
    /// for reads and writes (mapped, never freed) for as long as `owner`
    /// lives, whatever the slice's own lifetime says.
    pub unsafe fn pin_with(
        &mut self,
        owner: MemoryOwner,
        fill: impl FnOnce(&mut PinSink<'_>) -> bool,
    ) -> bool {
        self.release();
        let mut sink = PinSink { bufs: self };
        if fill(&mut sink) {
            self.owner = Some(owner);
            true
        } else {
            self.release();
            false
        }
    }

    /// Forgets the pieces and drops the owner.
    pub fn release(&mut self) {
        self.pieces.clear();
        self.len = 0;
        self.owner = None;
    }

    /// Drops the first `n` bytes (after a short transfer).
    pub fn advance(&mut self, n: usize) {
        let n = n.min(self.len);
        let whole = advance_pieces(&mut self.pieces, n);
        self.pieces.drain(..whole);
        self.len -= n;
    }

    /// Copies `data` into the pieces, in order; returns the count copied.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        // SAFETY: the pieces are valid for writes while the owner is held
        // (`pin`'s contract); released pieces are gone.
        unsafe { scatter(&self.pieces, 0, data) }
    }

    /// The pinned memory, borrowed for a synchronous call.
    pub fn borrow_mut(&mut self) -> IoBufsMut<'_> {
        IoBufsMut {
            list: PieceList {
                pieces: self.pieces.iter().copied().collect(),
                len: self.len,
            },
            _memory: PhantomData,
        }
    }

    /// The pieces, at a stable address until `self` is changed (valid
    /// while the owner is held).
    pub(crate) fn iovecs(&self) -> &[libc::iovec] {
        &self.pieces
    }
}

/// Where [`PinnedBufs::pin_with`] takes its slices from.
pub struct PinSink<'p> {
    bufs: &'p mut PinnedBufs,
}

impl PinSink<'_> {
    /// Adds a slice of guest memory (bitmap-less, as
    /// [`IoBufsMut::push_guest`] takes).
    pub fn push(&mut self, slice: &VolatileSlice<'_, ()>) {
        if slice.is_empty() {
            return;
        }
        self.bufs.pieces.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
        self.bufs.len = self.bufs.len.saturating_add(slice.len());
    }

    /// Pieces pushed so far.
    pub fn pieces(&self) -> usize {
        self.bufs.pieces.len()
    }
}

/// Whether every piece meets O_DIRECT's alignment: addresses to `memory`,
/// lengths to `offset`.
pub(crate) fn aligned(pieces: &[libc::iovec], memory: usize, offset: u64) -> bool {
    pieces.iter().all(|v| {
        (v.iov_base as usize) % memory.max(1) == 0 && (v.iov_len as u64) % offset.max(1) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_gather_follow_the_pieces_in_order() {
        let (mut a, mut b) = ([0u8; 3], [0u8; 5]);
        let mut bufs = IoBufsMut::new();
        bufs.push_bytes(&mut a);
        bufs.push_bytes(&mut []);
        bufs.push_bytes(&mut b);
        assert_eq!(bufs.len(), 8);
        assert_eq!(bufs.iovecs().len(), 2, "empty pieces are not kept");
        assert_eq!(bufs.fill_from(b"abcdefghij"), 8);
        let mut out = [0u8; 8];
        assert_eq!(bufs.gather_into(&mut out), 8);
        assert_eq!(&out, b"abcdefgh");
        assert_eq!(bufs.fill_at(2, b"XYZ"), 3);
        assert_eq!(bufs.fill_at(7, b"!?"), 1);
        assert_eq!(bufs.fill_at(9, b"!"), 0);
        drop(bufs);
        assert_eq!((&a, &b), (b"abX", b"YZfg!"));
    }

    #[test]
    fn advance_and_truncate_cut_inside_pieces() {
        let (mut a, mut b, mut c) = (*b"0123", *b"4567", *b"89");
        let mut bufs = IoBufsMut::new();
        bufs.push_bytes(&mut a);
        bufs.push_bytes(&mut b);
        bufs.push_bytes(&mut c);
        bufs.advance(5);
        assert_eq!(bufs.len(), 5);
        let mut out = [0u8; 5];
        bufs.gather_into(&mut out);
        assert_eq!(&out, b"56789");
        bufs.truncate(2);
        assert_eq!(bufs.len(), 2);
        assert_eq!(bufs.iovecs().len(), 1);
        let mut out = [0u8; 2];
        assert_eq!(bufs.gather_into(&mut out), 2);
        assert_eq!(&out, b"56");
        bufs.advance(100);
        assert!(bufs.is_empty());
    }

    #[test]
    fn pinned_memory_lives_as_long_as_its_owner() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        let memory: Arc<GuestMemoryMmap<()>> =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
        let mut pinned = PinnedBufs::new();
        {
            let slice = memory.get_slice(GuestAddress(4), 8).unwrap();
            // SAFETY: the slice lies in the mapping `memory` owns.
            let pinned_ok = unsafe {
                pinned.pin_with(memory.clone(), |sink| {
                    sink.push(&slice);
                    sink.pieces() == 1
                })
            };
            assert!(pinned_ok);
        }
        // A fill that gives up leaves nothing pinned.
        // SAFETY: nothing is pushed.
        assert!(!unsafe { PinnedBufs::new().pin_with(memory.clone(), |_| false) });
        assert_eq!(pinned.borrow_mut().len(), 8);
        assert_eq!(Arc::strong_count(&memory), 2, "the pin holds the mapping");
        pinned.advance(2);
        assert_eq!(pinned.fill_from(b"xyz"), 3);
        let mut borrowed = pinned.borrow_mut();
        assert_eq!(borrowed.fill_from(b"XY"), 2);
        pinned.release();
        assert_eq!(Arc::strong_count(&memory), 1, "released with the pin");
        let mut got = [0u8; 16];
        memory.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert_eq!(&got, b"\0\0\0\0\0\0XYz\0\0\0\0\0\0\0");
    }

    #[test]
    fn alignment_checks_addresses_and_lengths() {
        let mut buf = vec![0u8; 8192 + 512];
        let base = buf.as_mut_ptr() as usize;
        let skip = (512 - base % 512) % 512;
        let mut bufs = IoBufsMut::new();
        bufs.push_bytes(&mut buf[skip..skip + 4096]);
        assert!(aligned(bufs.iovecs(), 512, 512));
        bufs.truncate(4000);
        assert!(!aligned(bufs.iovecs(), 512, 512));
    }
}
