//! Storage backends: where a logical unit's blocks live. Knows files and
//! syscalls (and, for tests and fuzzing, memory), nothing of SCSI or virtio.

mod file;
pub mod lock;
mod mem;

pub use file::{DirectAlignment, FileImage, ImageKind, OpenError};
pub use mem::MemImage;

use std::io;

/// A (pointer, length) pair naming memory to transfer into or out of, as
/// `preadv(2)` takes it. Built from guest memory by the transport, or from
/// plain buffers in tests.
pub type IoVec = libc::iovec;

/// An allocation extent: a run of bytes that are all allocated (mapped) or
/// all deallocated (a hole, reading as zeroes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub allocated: bool,
    pub len: u64,
}

/// What an asynchronous I/O engine needs to issue reads and writes to a
/// storage object itself: its file descriptor and the rules its transfers
/// must follow. Storage without one (memory images) is always accessed
/// through the [`Storage`] methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncFile {
    pub fd: std::os::unix::io::RawFd,
    /// Opened with O_DIRECT: transfers must meet this alignment (the
    /// engine hands unaligned ones to the synchronous path, which bounces
    /// them).
    pub direct: Option<DirectAlignment>,
    /// The file takes `RWF_DSYNC` writes (durable writes may be issued as
    /// such; otherwise they go through [`Storage::write_vectored_at`]).
    pub dsync: bool,
}

impl AsyncFile {
    /// Whether `iov` can be transferred as it is (O_DIRECT alignment).
    pub fn accepts(&self, iov: &[IoVec]) -> bool {
        self.direct.is_none_or(|align| file::is_aligned(iov, align))
    }
}

/// Byte-addressed storage behind a logical unit.
pub trait Storage: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Whether writes are refused.
    fn read_only(&self) -> bool;

    /// Fill every buffer in `iov`, in order, with the bytes starting at
    /// `offset`. Either all bytes are transferred or an error is returned
    /// (a read past the end is `UnexpectedEof`).
    ///
    /// # Safety contract for implementors
    /// Each `iov` entry must point to memory valid for writes of its length
    /// for the duration of the call; callers guarantee that.
    fn read_vectored_at(&self, iov: &[IoVec], offset: u64) -> io::Result<()>;

    /// Write every buffer in `iov`, in order, starting at `offset`. With
    /// `durable`, the data is on stable storage when this returns (as with
    /// `RWF_DSYNC`); otherwise it may sit in a volatile cache until
    /// [`Storage::flush`]. Each `iov` entry points to memory valid for reads
    /// of its length for the duration of the call.
    fn write_vectored_at(&self, iov: &[IoVec], offset: u64, durable: bool) -> io::Result<()>;

    /// Offsets and lengths of one vectored transfer must be multiples of
    /// this for it to succeed (O_DIRECT's offset alignment; 1 where any
    /// will do). Callers splitting a transfer split it at such multiples.
    fn transfer_granule(&self) -> usize {
        1
    }

    /// Make all completed writes durable.
    fn flush(&self) -> io::Result<()>;

    /// Make `len` bytes at `offset` read as zeroes. With `deallocate`, the
    /// space is released where the backing can do that (a hole in a file).
    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()>;

    /// The extent that starts at `offset` (which is below the size).
    fn extent(&self, offset: u64) -> io::Result<Extent>;

    /// The file an asynchronous engine may read and write directly, if
    /// any. The file descriptor stays open as long as `self` lives.
    fn async_file(&self) -> Option<AsyncFile> {
        None
    }
}
