//! An image held in memory: for tests and fuzz targets, which need storage
//! with known contents, sizes no host file could have, and read errors on
//! demand. Every operation is bounds-checked and panic-free.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use super::{Extent, IoBufs, IoBufsMut, Storage};

/// A byte-addressed image in memory.
///
/// The image has a *size* (what [`Storage::size`] reports) of at least the
/// number of stored bytes; bytes between the end of the stored data and the
/// size read as zeroes, so that a multi-terabyte disk costs only the bytes
/// that were actually given (see [`MemImage::sparse`]).
///
/// Reads touching an injected error range fail with `EIO` (see
/// [`MemImage::with_read_error`]), as a failing disk sector would; flushes
/// and durable writes fail with `EIO` after [`MemImage::fail_flushes`].
///
/// Writes may change only the stored bytes: a write reaching into the zero
/// tail of a sparse image fails with `ENOSPC` (the tail takes no memory and
/// stays that way), as does zeroing it without deallocating; deallocating it
/// succeeds (it is a hole already). The stored bytes count as allocated, the
/// tail as a hole.
#[derive(Default)]
pub struct MemImage {
    data: RwLock<Vec<u8>>,
    size: AtomicU64,
    read_only: bool,
    read_error: Option<Range<u64>>,
    flush_fails: AtomicBool,
}

impl MemImage {
    /// An image whose contents and size are exactly `data`.
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        let size = data.len() as u64;
        MemImage {
            data: RwLock::new(data),
            size: AtomicU64::new(size),
            read_only,
            read_error: None,
            flush_fails: AtomicBool::new(false),
        }
    }

    /// An image of `size` bytes starting with `data`; the bytes after `data`
    /// read as zeroes and take no memory. If `data` is longer than `size`,
    /// the size is the length of `data`.
    pub fn sparse(data: Vec<u8>, size: u64, read_only: bool) -> Self {
        let size = size.max(data.len() as u64);
        MemImage {
            data: RwLock::new(data),
            size: AtomicU64::new(size),
            read_only,
            read_error: None,
            flush_fails: AtomicBool::new(false),
        }
    }

    /// Makes every read that touches a byte in `range` fail with `EIO`,
    /// transferring nothing. An empty range injects no error.
    pub fn with_read_error(mut self, range: Range<u64>) -> Self {
        self.read_error = if range.is_empty() { None } else { Some(range) };
        self
    }

    /// A copy of the stored bytes (without the zero tail of a sparse
    /// image).
    pub fn data(&self) -> Vec<u8> {
        self.stored().clone()
    }

    /// Calls `f` with the stored bytes (without the zero tail), without
    /// copying them; writes wait until it returns.
    pub fn with_data<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.stored())
    }

    /// From now on, every flush and durable write fails with `EIO`, as
    /// after a write-back error on a real disk.
    pub fn fail_flushes(&self) {
        self.flush_fails.store(true, Ordering::Relaxed);
    }

    fn stored(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks `len` bytes at `offset` lie within the stored bytes; returns
    /// the range as indexes.
    fn writable_range(&self, offset: u64, len: u64) -> io::Result<Range<usize>> {
        let end = self.writable_end(offset, len)?;
        let stored = self.stored().len() as u64;
        if end > stored {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(offset as usize..end as usize)
    }

    /// Checks the image is writable and `len` bytes at `offset` lie within
    /// its size; returns the end offset.
    fn writable_end(&self, offset: u64, len: u64) -> io::Result<u64> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        offset
            .checked_add(len)
            .filter(|&end| end <= self.size())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
    }

    fn read_fails(&self, start: u64, end: u64) -> bool {
        self.read_error
            .as_ref()
            .is_some_and(|bad| start < bad.end && bad.start < end)
    }
}

impl fmt::Debug for MemImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemImage")
            .field("stored", &self.stored().len())
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .field("read_error", &self.read_error)
            .finish()
    }
}

impl Storage for MemImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Shrinking drops the stored bytes past the new size; growing adds to
    /// the zero tail.
    fn set_len(&self, size: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
        if (data.len() as u64) > size {
            data.truncate(size as usize);
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        // Check the whole transfer before touching any buffer, so that an
        // error leaves the destination unmodified.
        let total = bufs.len() as u64;
        if total == 0 {
            return Ok(());
        }
        let end = match offset.checked_add(total) {
            Some(end) if end <= self.size() => end,
            _ => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        };
        if self.read_fails(offset, end) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // Offsets at or beyond the stored data (including any that do not
        // fit in usize) are in the zero tail.
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let data = self.stored();
        let stored = data.get(start..).unwrap_or(&[]);
        let n = stored.len().min(bufs.len());
        bufs.fill_from(&stored[..n]);
        drop(data);
        static ZEROES: [u8; 4096] = [0; 4096];
        let mut at = n;
        while at < bufs.len() {
            let chunk = (bufs.len() - at).min(ZEROES.len());
            at += bufs.fill_at(at, &ZEROES[..chunk]);
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64, durable: bool) -> io::Result<()> {
        let range = self.writable_range(offset, bufs.len() as u64)?;
        let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
        bufs.gather_into(&mut data[range]);
        drop(data);
        if durable {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.flush_fails.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        if deallocate {
            // Deallocating needs no space: the part in the zero tail is a
            // hole already; stored bytes are zeroed (they stay allocated).
            let end = self.writable_end(offset, len)?;
            let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
            let stored = data.len() as u64;
            if offset < stored {
                data[offset as usize..end.min(stored) as usize].fill(0);
            }
            return Ok(());
        }
        let range = self.writable_range(offset, len)?;
        self.data.write().unwrap_or_else(PoisonError::into_inner)[range].fill(0);
        Ok(())
    }

    fn extent(&self, offset: u64) -> io::Result<Extent> {
        let stored = self.stored().len() as u64;
        Ok(if offset < stored {
            Extent {
                allocated: true,
                len: stored - offset,
            }
        } else {
            Extent {
                allocated: false,
                len: self.size().saturating_sub(offset),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bufs<'a>(bufs: impl IntoIterator<Item = &'a mut [u8]>) -> IoBufsMut<'a> {
        let mut list = IoBufsMut::new();
        for buf in bufs {
            list.push_bytes(buf);
        }
        list
    }

    fn iov(buf: &mut [u8]) -> IoBufsMut<'_> {
        bufs([buf])
    }

    #[test]
    fn reads_into_scattered_buffers() {
        let data: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let img = MemImage::new(data.clone(), true);
        assert_eq!(img.size(), 4096);
        assert!(img.read_only());
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 100], [0u8; 1]);
        img.read_vectored_at(&mut bufs([&mut a[..], &mut b[..], &mut c[..]]), 10)
            .unwrap();
        assert_eq!(a, data[10..13]);
        assert_eq!(b, data[13..113]);
        assert_eq!(c, data[113..114]);
        img.flush().unwrap();
    }

    #[test]
    fn read_past_end_is_eof_and_writes_nothing() {
        let img = MemImage::new(vec![1u8; 512], false);
        let mut buf = [7u8; 16];
        let err = img.read_vectored_at(&mut iov(&mut buf), 504).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(buf, [7u8; 16]);
        let err = img
            .read_vectored_at(&mut iov(&mut buf), u64::MAX)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // The last bytes are readable.
        img.read_vectored_at(&mut iov(&mut buf), 496).unwrap();
        assert_eq!(buf, [1u8; 16]);
    }

    #[test]
    fn empty_reads_succeed() {
        let img = MemImage::new(vec![1u8; 8], true);
        img.read_vectored_at(&mut IoBufsMut::new(), u64::MAX)
            .unwrap();
        img.read_vectored_at(&mut bufs([&mut [][..], &mut [][..]]), 4)
            .unwrap();
    }

    #[test]
    fn sparse_tail_reads_zero() {
        let img = MemImage::sparse(vec![9u8; 4], 1 << 40, true);
        assert_eq!(img.size(), 1 << 40);
        assert_eq!(img.data(), vec![9u8; 4]);
        assert!(img.with_data(|d| d == [9u8; 4]));
        let mut buf = [0xaau8; 8];
        img.read_vectored_at(&mut iov(&mut buf), 0).unwrap();
        assert_eq!(buf, [9, 9, 9, 9, 0, 0, 0, 0]);
        let mut buf = [0xaau8; 8];
        img.read_vectored_at(&mut iov(&mut buf), (1 << 40) - 8)
            .unwrap();
        assert_eq!(buf, [0u8; 8]);
        // A size below the data length grows to it.
        assert_eq!(MemImage::sparse(vec![0; 16], 4, true).size(), 16);
    }

    #[test]
    fn sparse_tail_takes_no_writes_but_deallocates() {
        let img = MemImage::sparse(vec![7u8; 1024], 4096, false);
        let mut buf = [1u8; 512];
        img.write_vectored_at(&iov(&mut buf).into(), 512, false)
            .unwrap();
        let err = img
            .write_vectored_at(&iov(&mut buf).into(), 768, false)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let err = img.write_zeroes(512, 1024, false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(img.data(), [vec![7u8; 512], vec![1u8; 512]].concat());
        // Deallocating reaches into the tail: the stored part is zeroed.
        img.write_zeroes(768, 4096 - 768, true).unwrap();
        assert_eq!(
            img.data(),
            [vec![7u8; 512], vec![1u8; 256], vec![0u8; 256]].concat()
        );
        img.write_zeroes(2048, 1024, true).unwrap();
        assert_eq!(img.data().len(), 1024);
        let err = img.write_zeroes(0, 4097, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let ro = MemImage::sparse(vec![7u8; 16], 64, true);
        let err = ro.write_zeroes(32, 16, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    }

    #[test]
    fn injected_read_error() {
        let img = MemImage::new(vec![3u8; 1024], true).with_read_error(512..520);
        let mut buf = [0u8; 512];
        img.read_vectored_at(&mut iov(&mut buf), 0).unwrap();
        let mut buf = [0u8; 8];
        let err = img.read_vectored_at(&mut iov(&mut buf), 516).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(buf, [0u8; 8]);
        img.read_vectored_at(&mut iov(&mut buf), 520).unwrap();
        assert_eq!(buf, [3u8; 8]);
        // An empty range injects nothing.
        let img = MemImage::new(vec![3u8; 16], true).with_read_error(4..4);
        img.read_vectored_at(&mut iov(&mut buf), 0).unwrap();
    }
}
