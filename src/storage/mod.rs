//! Storage backends: where a logical unit's blocks live. Knows files and
//! syscalls (and, for tests and fuzzing, memory), nothing of SCSI or virtio.

mod file;
mod mem;

pub use file::{FileImage, ImageKind, OpenError};
pub use mem::MemImage;

use std::io;

/// A (pointer, length) pair naming memory to transfer into or out of, as
/// `preadv(2)` takes it. Built from guest memory by the transport, or from
/// plain buffers in tests.
pub type IoVec = libc::iovec;

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

    /// Make all completed writes durable.
    fn flush(&self) -> io::Result<()>;
}
