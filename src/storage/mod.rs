//! Storage backends: where a logical unit's blocks live. Knows files and
//! syscalls (and, for tests and fuzzing, memory), nothing of SCSI or virtio.

pub(crate) mod engine;
mod file;
mod iobufs;
pub mod iscsi;
pub(crate) mod lock;
mod mem;
pub mod nbd;
pub mod remote;
pub(crate) mod uring;

pub use engine::IoEngine;
pub(crate) use engine::{
    Direction, Engine, Request, Submission, Submitted, SyncEngine, Transfer, TransferMemory,
};
pub use file::{DirectAlignment, FileImage, ImageKind, OpenError};
pub use iobufs::{IoBufs, IoBufsMut};
// Public for remote backends' tests, which pin memory of their own.
pub use iobufs::{MemoryOwner, PinSink, PinnedBufs};
pub use lock::{Holder, ImageLocks, LockError};
pub use mem::MemImage;
pub use nbd::{NbdError, NbdImage, NbdOptions};

use std::io;
use std::path::Path;

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
    /// Whether `bufs` can be transferred as they are (O_DIRECT alignment).
    pub fn accepts(&self, bufs: &PinnedBufs) -> bool {
        self.direct
            .is_none_or(|align| iobufs::aligned(bufs.iovecs(), align.memory, align.offset))
    }
}

/// Byte-addressed storage behind a logical unit.
pub trait Storage: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Whether writes are refused.
    fn read_only(&self) -> bool;

    /// Makes the image active: takes its image locks (`lock.rs`) unless
    /// it holds them already, for an image opened inactive or made
    /// inactive since. Errors name who holds a lock in the way; the image
    /// then stays inactive. Safe while I/O runs: locks do not change what
    /// reads and writes do. Storage without locks (memory) has nothing
    /// to take.
    fn activate(&self) -> Result<ImageLocks, LockError> {
        Ok(ImageLocks::Unsupported)
    }

    /// Makes the image inactive: releases its image locks, keeping it
    /// open. Idempotent; safe while I/O runs.
    fn deactivate(&self) {}

    /// Where the image stands with its locks; `None` for storage without
    /// any (memory).
    fn image_locks(&self) -> Option<ImageLocks> {
        None
    }

    /// The image's path, for messages; `None` for storage without one.
    fn image_path(&self) -> Option<&Path> {
        None
    }

    /// Drops what the host caches of the image (another host may have
    /// written it meanwhile: a migration's destination taking it over).
    /// Nothing to do for storage without a cache.
    fn drop_cache(&self) {}

    /// Reads the backing's size again (the operator may have grown or
    /// shrunk the file or block device since it was opened), makes it
    /// [`Storage::size`] and returns it. Storage of a fixed size returns
    /// its size.
    fn refresh_size(&self) -> io::Result<u64> {
        Ok(self.size())
    }

    /// Sets the backing's length to `size` bytes (a regular file: growing
    /// adds a hole) and makes it [`Storage::size`]. `Unsupported` where
    /// the length is not the daemon's to set (block devices, read-only
    /// images).
    fn set_len(&self, size: u64) -> io::Result<()> {
        let _ = size;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Fills `bufs`, in order, with the bytes starting at `offset`. Either
    /// all bytes are transferred or an error is returned (a read past the
    /// end is `UnexpectedEof`).
    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()>;

    /// Writes `bufs`, in order, starting at `offset`. With `durable`, the
    /// data is on stable storage when this returns (as with `RWF_DSYNC`);
    /// otherwise it may sit in a volatile cache until [`Storage::flush`].
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64, durable: bool) -> io::Result<()>;

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

    /// The backend's asynchronous side, for storage reached over the
    /// network: the worker hands READ, WRITE and SYNCHRONIZE CACHE (and,
    /// for passthrough, every forwarded command) to it and never waits
    /// for a round trip. `None` for local storage.
    fn remote(&self) -> Option<&dyn remote::RemoteStorage> {
        None
    }

    /// Whether the storage executes SCSI commands itself (an iSCSI
    /// logical unit): its unit forwards commands as they are
    /// ([`remote::RemoteOp::Scsi`] through [`Storage::remote`]) instead
    /// of emulating a disk over byte reads and writes.
    fn scsi_passthrough(&self) -> bool {
        false
    }
}
