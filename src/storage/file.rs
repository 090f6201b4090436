//! A raw image in a regular file or a block device, served with
//! synchronous positional I/O (`preadv(2)`).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use log::warn;

use rustix::fs::{AtFlags, FallocateFlags, OFlags, StatxFlags};
use rustix::io::Errno;

use super::lock::{self, ImageLocks, LockError};
use super::{AsyncFile, Extent, IoBufs, IoBufsMut, Storage};

/// An entry of the piece lists handed to `preadv(2)` and friends. These
/// calls stay `libc`'s: rustix's `preadv`/`pwritev2` take std's
/// `IoSliceMut`, a `&mut [u8]`, which cannot soundly be formed over guest
/// memory the guest may change at any time; `IoBufsMut`/`IoBufs` hand the
/// kernel raw pieces instead, each valid for the call.
type IoVec = libc::iovec;

/// At most this many iovecs go to one `preadv` call (well below IOV_MAX).
const IOVECS_PER_CALL: usize = 64;

/// What kind of file backs an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    RegularFile,
    BlockDevice,
}

/// Why an image could not be opened. Each message names what is wrong; the
/// caller adds the path.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no such file")]
    NotFound,
    #[error("permission denied")]
    PermissionDenied,
    #[error("is a directory, not an image")]
    IsDirectory,
    #[error("is neither a regular file nor a block device")]
    NotAnImage,
    #[error("cannot open: {0}")]
    Io(io::Error),
    #[error("cannot determine size: {0}")]
    Size(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound => OpenError::NotFound,
            io::ErrorKind::PermissionDenied => OpenError::PermissionDenied,
            _ if e.raw_os_error() == Some(libc::EISDIR) => OpenError::IsDirectory,
            _ => OpenError::Io(e),
        }
    }
}

/// An open image file.
#[derive(Debug)]
pub struct FileImage {
    file: File,
    path: PathBuf,
    /// Bytes: read at open, and again when the LUN is resized.
    size: AtomicU64,
    kind: ImageKind,
    read_only: bool,
    /// FUA writes use `pwritev2(RWF_DSYNC)`; cleared where it is refused.
    dsync_writes: AtomicBool,
    /// Opened with O_DIRECT (the host page cache bypassed), and the
    /// alignment that needs.
    direct: Option<DirectAlignment>,
    /// Its image locks (`storage/lock.rs`): none at open; taken by
    /// [`FileImage::activate`], released by [`FileImage::deactivate`].
    /// Only those two take this mutex; I/O never does (locks are
    /// advisory: they say who may use the image, not what a read or
    /// write does).
    locks: Mutex<ImageLocks>,
}

/// What O_DIRECT transfers must be aligned to (statx STATX_DIOALIGN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectAlignment {
    /// Alignment of memory addresses.
    pub memory: usize,
    /// Alignment of file offsets and lengths.
    pub offset: u64,
}

/// Where STATX_DIOALIGN is not reported: safe values for any device.
const FALLBACK_DIRECT_ALIGNMENT: DirectAlignment = DirectAlignment {
    memory: 4096,
    offset: 4096,
};

impl FileImage {
    /// Opens `path`; read-only images are opened `O_RDONLY`, so no byte of
    /// them can change through this daemon. The image is opened inactive,
    /// without image locks: [`FileImage::activate`] takes them.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, OpenError> {
        FileImage::open_with(path, read_only, false)
    }

    /// Opens `path` with O_DIRECT: reads and writes bypass the host page
    /// cache (as QEMU's cache=none). Transfers whose guest buffers do not
    /// meet the alignment go through an aligned bounce buffer.
    pub fn open_direct(path: &Path, read_only: bool) -> Result<Self, OpenError> {
        FileImage::open_with(path, read_only, true)
    }

    fn open_with(path: &Path, read_only: bool, direct: bool) -> Result<Self, OpenError> {
        // Open first, then look at what was opened: a type checked on the
        // path before opening could be swapped meanwhile. O_NONBLOCK, so
        // that opening a FIFO (or a device that waits for a carrier)
        // cannot block startup; O_NOCTTY, so a terminal never becomes
        // ours (it matters only at open). O_NONBLOCK is cleared, and
        // O_DIRECT set, once the descriptor is known to be an image: a FIFO
        // refuses O_DIRECT at open, which would hide what is wrong with it.
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        let mut file = options.open(path)?;
        let file_type = file.metadata().map_err(OpenError::Io)?.file_type();
        let kind = if file_type.is_file() {
            ImageKind::RegularFile
        } else if file_type.is_block_device() {
            ImageKind::BlockDevice
        } else if file_type.is_dir() {
            return Err(OpenError::IsDirectory);
        } else {
            return Err(OpenError::NotAnImage);
        };
        // Blocking from here on (io_uring would otherwise hand EAGAIN back
        // instead of waiting), with O_DIRECT if asked.
        let flags = if direct {
            OFlags::DIRECT
        } else {
            OFlags::empty()
        };
        set_status_flags(&file, flags).map_err(OpenError::Io)?;
        let direct = direct.then(|| direct_alignment(&file));
        // Seeking to the end gives the size of regular files and of block
        // devices alike (for the latter it equals BLKGETSIZE64).
        let size = file.seek(SeekFrom::End(0)).map_err(OpenError::Size)?;
        Ok(FileImage {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            kind,
            read_only,
            dsync_writes: AtomicBool::new(true),
            direct,
            locks: Mutex::new(ImageLocks::Inactive),
        })
    }

    /// Makes the image active: takes QEMU's locks for a LUN that writes,
    /// or only reads if the image was opened read-only
    /// (`lock::lock_image`), unless it holds them already. An error is
    /// another user's lock in the way, naming the holder; the image stays
    /// inactive and holds no lock byte of this call. A file system that
    /// cannot lock makes the image active without locks, with a warning
    /// ([`ImageLocks::Unsupported`]). Returns where the image stands.
    pub fn activate(&self) -> Result<ImageLocks, LockError> {
        let mut locks = self.locks();
        if *locks != ImageLocks::Inactive {
            return Ok(*locks);
        }
        *locks = match lock::lock_image(&self.file, self.read_only) {
            Ok(()) => ImageLocks::Held,
            Err(LockError::Unsupported(e)) => {
                warn!(
                    "image {}: served without image locks, so nothing keeps another writer out: {e}",
                    self.path.display()
                );
                ImageLocks::Unsupported
            }
            Err(e) => return Err(e),
        };
        Ok(*locks)
    }

    /// Makes the image inactive: releases every lock byte it holds
    /// (`lock::unlock_image`), keeping the file open; I/O goes on as
    /// before. Nothing to do on an inactive image.
    pub fn deactivate(&self) {
        let mut locks = self.locks();
        if *locks == ImageLocks::Held {
            lock::unlock_image(&self.file, self.read_only);
        }
        *locks = ImageLocks::Inactive;
    }

    /// Where the image stands with its locks.
    pub fn image_locks(&self) -> ImageLocks {
        *self.locks()
    }

    fn locks(&self) -> std::sync::MutexGuard<'_, ImageLocks> {
        // The state is one value written whole: a panic elsewhere
        // cannot leave it half-changed.
        self.locks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The O_DIRECT alignment, if the image was opened with O_DIRECT.
    pub fn direct_alignment(&self) -> Option<DirectAlignment> {
        self.direct
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    /// Refuses a write reaching past the image's size: a write that was
    /// checked against the capacity before a shrink must not extend the
    /// file again (the logical unit's range check is the guest-facing one).
    fn check_within(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write past the end of the image (shrunk meanwhile)",
            )),
        }
    }

    /// The open file, e.g. for taking image locks on it.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn activate(&self) -> Result<ImageLocks, LockError> {
        FileImage::activate(self)
    }

    fn deactivate(&self) {
        FileImage::deactivate(self);
    }

    fn image_locks(&self) -> Option<ImageLocks> {
        Some(FileImage::image_locks(self))
    }

    fn image_path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn drop_cache(&self) {
        // As QEMU's raw_co_invalidate_cache: clean pages go, dirty ones
        // (none: the image was flushed when it was handed over) are
        // written first. Advice only: a failure changes nothing served.
        if let Err(e) = rustix::fs::fadvise(&self.file, 0, None, rustix::fs::Advice::DontNeed) {
            log::debug!("image {}: cannot drop its cache: {e}", self.path.display());
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn refresh_size(&self) -> io::Result<u64> {
        // As at open: the end offset is the size of regular files and of
        // block devices alike. Transfers are positional, so moving the
        // file offset disturbs none.
        let size = rustix::fs::seek(&self.file, rustix::fs::SeekFrom::End(0))?;
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    fn set_len(&self, size: u64) -> io::Result<()> {
        if self.read_only || self.kind != ImageKind::RegularFile {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        self.file.set_len(size)?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        let preadv = |fd, v, n, off| {
            // SAFETY: `transfer` hands `n` entries of memory valid for
            // writes (its contract).
            unsafe { libc::preadv(fd, v, n, off) }
        };
        // SAFETY: `bufs`' pieces are valid for writes while it is borrowed
        // (IoBufsMut's invariant), for all of this call.
        unsafe { self.transfer(bufs.iovecs(), offset, io::ErrorKind::UnexpectedEof, preadv) }
    }

    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64, durable: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check_within(offset, bufs.len() as u64)?;
        let pwritev2_dsync = |fd, v, n, off| {
            // SAFETY: `transfer` hands `n` entries of memory valid for
            // reads (its contract).
            unsafe { libc::pwritev2(fd, v, n, off, libc::RWF_DSYNC) }
        };
        let pwritev = |fd, v, n, off| {
            // SAFETY: as above.
            unsafe { libc::pwritev(fd, v, n, off) }
        };
        let iov = bufs.iovecs();
        if durable && self.dsync_writes.load(Ordering::Relaxed) {
            // SAFETY: `bufs`' pieces are valid for reads while it is
            // borrowed (IoBufs' invariant), for all of this call.
            let result =
                unsafe { self.transfer(iov, offset, io::ErrorKind::WriteZero, pwritev2_dsync) };
            match result {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                    // Kernel or file system without RWF_DSYNC: write, then
                    // fdatasync, from now on.
                    self.dsync_writes.store(false, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        // SAFETY: as above.
        unsafe { self.transfer(iov, offset, io::ErrorKind::WriteZero, pwritev) }?;
        if durable {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if len == 0 {
            return Ok(());
        }
        self.check_within(offset, len)?;
        let modes: &[FallocateFlags] = if deallocate {
            &[
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            ]
        } else {
            &[FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE]
        };
        // The kernel takes signed offsets (loff_t), which rustix would cast
        // to silently: refused here, as before.
        if i64::try_from(offset).is_err() || i64::try_from(len).is_err() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        for &mode in modes {
            match rustix::fs::fallocate(&self.file, mode, offset, len) {
                Ok(()) => return Ok(()),
                // Not this mode here: the next one, or zeroes written.
                Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // No fallocate support for this mode: write zeroes.
        static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64) as usize;
            let mut zeroes = IoBufs::new();
            zeroes.push_bytes(&ZEROES[..n]);
            self.write_vectored_at(&zeroes, offset + done, false)?;
            done += n as u64;
        }
        Ok(())
    }

    fn transfer_granule(&self) -> usize {
        self.direct.map_or(1, |align| {
            usize::try_from(align.offset).unwrap_or(usize::MAX)
        })
    }

    fn async_file(&self) -> Option<AsyncFile> {
        Some(AsyncFile {
            fd: self.file.as_raw_fd(),
            direct: self.direct,
            dsync: self.dsync_writes.load(Ordering::Relaxed),
        })
    }

    fn extent(&self, offset: u64) -> io::Result<Extent> {
        let size = self.size();
        let rest = size.saturating_sub(offset);
        if self.kind == ImageKind::BlockDevice {
            return Ok(Extent {
                allocated: true,
                len: rest,
            });
        }
        match self.fiemap_extent(offset, rest) {
            Ok(extent) => return Ok(extent),
            // No FIEMAP here (e.g. tmpfs): SEEK_DATA/SEEK_HOLE below.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
                ) => {}
            Err(e) => return Err(e),
        }
        // lseek takes a signed offset, which rustix would cast to silently:
        // refused here, as before.
        if i64::try_from(offset).is_err() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // The file offset is not used by positional I/O, so moving it is
        // harmless.
        let seek = |pos| match rustix::fs::seek(&self.file, pos) {
            Ok(found) => Ok(Some(found)),
            // No data at or after `offset`.
            Err(Errno::NXIO) => Ok(None),
            Err(e) => Err(e),
        };
        let data = match seek(rustix::fs::SeekFrom::Data(offset)) {
            Ok(data) => data,
            // A file system without SEEK_DATA: everything counts as mapped.
            Err(Errno::INVAL) => Some(offset),
            Err(e) => return Err(e.into()),
        };
        Ok(match data {
            None => Extent {
                allocated: false,
                len: rest,
            },
            Some(start) if start > offset => Extent {
                allocated: false,
                len: (start - offset).min(rest),
            },
            Some(_) => {
                let hole = seek(rustix::fs::SeekFrom::Hole(offset))?.unwrap_or(size);
                Extent {
                    allocated: true,
                    len: hole.saturating_sub(offset).min(rest).max(1),
                }
            }
        })
    }
}

impl FileImage {
    /// The extent at `offset` from FIEMAP, which — unlike SEEK_DATA — counts
    /// preallocated ("unwritten") extents, such as those a zeroing
    /// `fallocate(ZERO_RANGE)` leaves, as allocated: SBC-3 calls those
    /// blocks mapped, and SEEK_DATA would see a hole in them as soon as the
    /// page cache forgets them. Delayed-allocation data counts as allocated
    /// too.
    fn fiemap_extent(&self, offset: u64, rest: u64) -> io::Result<Extent> {
        /// struct fiemap with room for one struct fiemap_extent
        /// (linux/fiemap.h).
        #[repr(C)]
        #[derive(Default)]
        struct Fiemap {
            start: u64,
            length: u64,
            flags: u32,
            mapped_extents: u32,
            extent_count: u32,
            reserved: u32,
            // struct fiemap_extent
            fe_logical: u64,
            fe_physical: u64,
            fe_length: u64,
            fe_reserved64: [u64; 2],
            fe_flags: u32,
            fe_reserved: [u32; 3],
        }
        /// _IOWR('f', 11, struct fiemap)
        const FS_IOC_FIEMAP: libc::c_ulong = 0xc020_660b;
        let mut map = Fiemap {
            start: offset,
            length: rest,
            extent_count: 1,
            ..Fiemap::default()
        };
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most
        // `extent_count` (1) extents into the struct, which has room for one.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), FS_IOC_FIEMAP, &mut map) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = offset.saturating_add(rest);
        Ok(if map.mapped_extents == 0 || map.fe_logical >= end {
            Extent {
                allocated: false,
                len: rest,
            }
        } else if map.fe_logical > offset {
            Extent {
                allocated: false,
                len: map.fe_logical - offset,
            }
        } else {
            let extent_end = map.fe_logical.saturating_add(map.fe_length);
            Extent {
                allocated: true,
                len: extent_end.min(end).saturating_sub(offset).max(1),
            }
        })
    }

    /// Runs `op` (preadv/pwritev-like) until every byte of `iov` is
    /// transferred, retrying short transfers and EINTR; a zero-byte
    /// transfer is `on_zero`.
    ///
    /// # Safety
    /// Every entry of `iov` names memory valid for the access `op` makes
    /// (writes for a read, reads for a write) for the duration of the call.
    unsafe fn transfer<F>(
        &self,
        iov: &[IoVec],
        offset: u64,
        on_zero: io::ErrorKind,
        op: F,
    ) -> io::Result<()>
    where
        F: Fn(libc::c_int, *const IoVec, libc::c_int, libc::off_t) -> isize,
    {
        let Some(align) = self.direct else {
            // SAFETY: the caller's guarantee.
            return unsafe { self.transfer_as_is(iov, offset, on_zero, &op) };
        };
        if super::iobufs::aligned(iov, align.memory, align.offset) {
            // SAFETY: the caller's guarantee.
            match unsafe { self.transfer_as_is(iov, offset, on_zero, &op) } {
                // The kernel wanted a stricter alignment than statx said.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        // SAFETY: the caller's guarantee.
        unsafe { self.transfer_bounced(iov, offset, on_zero, align, &op) }
    }

    /// O_DIRECT with guest buffers the kernel cannot take as they are: the
    /// data goes through an aligned buffer (bounded by the largest
    /// transfer the SCSI layer allows, 32 MiB).
    ///
    /// # Safety
    /// As [`FileImage::transfer`].
    unsafe fn transfer_bounced<F>(
        &self,
        iov: &[IoVec],
        offset: u64,
        on_zero: io::ErrorKind,
        align: DirectAlignment,
        op: &F,
    ) -> io::Result<()>
    where
        F: Fn(libc::c_int, *const IoVec, libc::c_int, libc::off_t) -> isize,
    {
        let total = iov
            .iter()
            .try_fold(0usize, |acc, v| acc.checked_add(v.iov_len))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if total == 0 {
            return Ok(());
        }
        let mut bounce = AlignedBuffer::new(total, align.memory.max(512))?;
        // Writes are the transfers whose zero-byte result is WriteZero.
        let writing = on_zero == io::ErrorKind::WriteZero;
        if writing {
            let mut at = 0;
            for v in iov.iter().filter(|v| v.iov_len > 0) {
                // SAFETY: each entry is readable for its length (this
                // function's contract); `bounce` holds `total` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.iov_base.cast::<u8>(),
                        bounce.as_mut_ptr().add(at),
                        v.iov_len,
                    );
                }
                at += v.iov_len;
            }
        }
        let whole = [IoVec {
            iov_base: bounce.as_mut_ptr().cast(),
            iov_len: total,
        }];
        // SAFETY: `whole` names `bounce`, `total` bytes valid for both
        // accesses while it lives.
        unsafe { self.transfer_as_is(&whole, offset, on_zero, op) }?;
        if !writing {
            let mut at = 0;
            for v in iov.iter().filter(|v| v.iov_len > 0) {
                // SAFETY: each entry is writable for its length (this
                // function's contract); `bounce` holds `total` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bounce.as_mut_ptr().add(at),
                        v.iov_base.cast::<u8>(),
                        v.iov_len,
                    );
                }
                at += v.iov_len;
            }
        }
        Ok(())
    }

    /// # Safety
    /// As [`FileImage::transfer`].
    unsafe fn transfer_as_is<F>(
        &self,
        iov: &[IoVec],
        offset: u64,
        on_zero: io::ErrorKind,
        op: &F,
    ) -> io::Result<()>
    where
        F: Fn(libc::c_int, *const IoVec, libc::c_int, libc::off_t) -> isize,
    {
        let mut offset = offset;
        for group in iov.chunks(IOVECS_PER_CALL) {
            let mut local = [IoVec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; IOVECS_PER_CALL];
            local[..group.len()].copy_from_slice(group);
            let mut pending = &mut local[..group.len()];
            while !pending.is_empty() && pending.iter().any(|v| v.iov_len > 0) {
                let file_offset = libc::off_t::try_from(offset)
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                let n = op(
                    self.file.as_raw_fd(),
                    pending.as_ptr(),
                    pending.len() as libc::c_int,
                    file_offset,
                );
                if n < 0 {
                    let err = io::Error::last_os_error();
                    if err.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(err);
                }
                if n == 0 {
                    return Err(io::Error::from(on_zero));
                }
                let n = n as usize;
                offset += n as u64;
                pending = advance(pending, n);
            }
        }
        Ok(())
    }
}

/// Replaces the file status flags fcntl(F_SETFL) may change (O_APPEND,
/// O_ASYNC, O_DIRECT, O_NOATIME, O_NONBLOCK) with `flags`.
fn set_status_flags(file: &File, flags: OFlags) -> io::Result<()> {
    Ok(rustix::fs::fcntl_setfl(file, flags)?)
}

/// The O_DIRECT alignment of an open file (statx STATX_DIOALIGN, Linux 6.1),
/// or a safe fallback where the kernel or file system does not say.
fn direct_alignment(file: &File) -> DirectAlignment {
    // The path is empty with AT_EMPTY_PATH: statx describes the open
    // descriptor. A kernel without statx (rustix reports NOSYS) gets the
    // fallback too.
    match rustix::fs::statx(file, c"", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(stx)
            if StatxFlags::from_bits_retain(stx.stx_mask).contains(StatxFlags::DIOALIGN)
                && stx.stx_dio_mem_align > 0
                && stx.stx_dio_offset_align > 0 =>
        {
            DirectAlignment {
                memory: stx.stx_dio_mem_align as usize,
                offset: u64::from(stx.stx_dio_offset_align),
            }
        }
        _ => FALLBACK_DIRECT_ALIGNMENT,
    }
}

/// A zeroed heap buffer with a given alignment, freed on drop.
struct AlignedBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuffer {
    fn new(len: usize, align: usize) -> io::Result<AlignedBuffer> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align.next_power_of_two())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(AlignedBuffer { ptr, layout })
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Drops the first `n` bytes from an iovec list (after a short transfer).
fn advance(iov: &mut [IoVec], n: usize) -> &mut [IoVec] {
    let whole = super::iobufs::advance_pieces(iov, n);
    &mut iov[whole..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `bufs` as one list to read into.
    fn into_bufs<'a>(bufs: impl IntoIterator<Item = &'a mut [u8]>) -> IoBufsMut<'a> {
        let mut list = IoBufsMut::new();
        for buf in bufs {
            list.push_bytes(buf);
        }
        list
    }

    fn from_bytes(buf: &[u8]) -> IoBufs<'_> {
        let mut list = IoBufs::new();
        list.push_bytes(buf);
        list
    }

    fn image(bytes: &[u8]) -> (tempfile::NamedTempFile, FileImage) {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(bytes).unwrap();
        let img = FileImage::open(tmp.path(), true).unwrap();
        (tmp, img)
    }

    fn rw_image(len: usize) -> (tempfile::NamedTempFile, FileImage) {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&vec![0x5a; len]).unwrap();
        let img = FileImage::open(tmp.path(), false).unwrap();
        (tmp, img)
    }

    /// Another open of the image, to see its locks from outside.
    fn observer(tmp: &tempfile::NamedTempFile) -> File {
        File::open(tmp.path()).unwrap()
    }

    /// An image opens inactive: opened, sized, readable and writable, no
    /// lock byte held; `activate` takes QEMU's bytes (101 write, 100
    /// consistent read, 201 write unshared), `deactivate` releases them
    /// and keeps the file open, both idempotent.
    #[test]
    fn opens_inactive_activates_and_deactivates() {
        let (tmp, img) = rw_image(4096);
        let observer = observer(&tmp);
        assert_eq!(img.image_locks(), ImageLocks::Inactive);
        assert_eq!(lock::locked_bytes(&observer), [] as [i64; 0]);
        assert_eq!(img.size(), 4096);
        img.write_vectored_at(&from_bytes(&[1; 512]), 0, false)
            .unwrap();
        assert_eq!(img.activate().unwrap(), ImageLocks::Held);
        assert_eq!(lock::locked_bytes(&observer), [100, 101, 201]);
        assert_eq!(img.activate().unwrap(), ImageLocks::Held, "idempotent");
        assert_eq!(lock::locked_bytes(&observer), [100, 101, 201]);
        img.deactivate();
        assert_eq!(img.image_locks(), ImageLocks::Inactive);
        assert_eq!(lock::locked_bytes(&observer), [] as [i64; 0]);
        img.deactivate();
        assert_eq!(lock::locked_bytes(&observer), [] as [i64; 0]);
        // Still open and usable.
        let mut buf = [0u8; 512];
        img.read_vectored_at(&mut into_bufs([&mut buf[..]]), 0)
            .unwrap();
        assert_eq!(buf, [1; 512]);
        // And active again.
        img.activate().unwrap();
        assert_eq!(lock::locked_bytes(&observer), [100, 101, 201]);
        drop(img);
        assert_eq!(lock::locked_bytes(&observer), [] as [i64; 0]);
    }

    /// Two inactive opens of one image coexist (two daemons waiting for
    /// a migration); the first to activate wins, the other's activation
    /// names it and leaves nothing behind; once the winner deactivates,
    /// the other may activate.
    #[test]
    fn activation_conflicts_name_the_holder_and_deactivation_hands_over() {
        let (tmp, source) = rw_image(4096);
        let destination = FileImage::open(tmp.path(), false).unwrap();
        let observer = observer(&tmp);
        source.activate().unwrap();
        let err = destination.activate().unwrap_err();
        assert!(
            matches!(
                err,
                LockError::Conflict {
                    holder: lock::Holder::ThisProcess,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("locked by another LUN of this daemon (it is being written)"),
            "{err}"
        );
        assert_eq!(destination.image_locks(), ImageLocks::Inactive);
        source.deactivate();
        assert_eq!(
            lock::locked_bytes(&observer),
            [] as [i64; 0],
            "the failed activation left no byte behind"
        );
        assert_eq!(destination.activate().unwrap(), ImageLocks::Held);
        assert!(source.activate().is_err(), "the roles are swapped");
        // A read-only open: CONSISTENT_READ and WRITE unshared only.
        destination.deactivate();
        let reader = FileImage::open(tmp.path(), true).unwrap();
        reader.activate().unwrap();
        assert_eq!(lock::locked_bytes(&observer), [100, 201]);
    }

    /// The handler thread activates and deactivates while another thread
    /// does I/O: neither waits for nor disturbs the other.
    #[test]
    fn activation_under_io() {
        let (tmp, img) = rw_image(1 << 16);
        let img = std::sync::Arc::new(img);
        let io = {
            let img = img.clone();
            std::thread::spawn(move || {
                for i in 0..2000u64 {
                    let offset = (i % 128) * 512;
                    img.write_vectored_at(&from_bytes(&[i as u8; 512]), offset, false)
                        .unwrap();
                    let mut buf = [0u8; 512];
                    img.read_vectored_at(&mut into_bufs([&mut buf[..]]), offset)
                        .unwrap();
                    assert_eq!(buf, [i as u8; 512]);
                }
            })
        };
        while !io.is_finished() {
            img.activate().unwrap();
            img.deactivate();
        }
        io.join().unwrap();
        assert_eq!(lock::locked_bytes(&observer(&tmp)), [] as [i64; 0]);
    }

    /// A write checked against the old capacity that reaches the image
    /// after it shrank is refused: it must not extend the file again.
    #[test]
    fn a_write_past_the_end_after_a_shrink_is_refused() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&[7u8; 8192]).unwrap();
        let img = FileImage::open(tmp.path(), false).unwrap();
        img.set_len(4096).unwrap();
        assert_eq!(img.size(), 4096);
        let err = img
            .write_vectored_at(&from_bytes(&[1u8; 512]), 4096, false)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(img.write_zeroes(4096, 512, true).is_err());
        assert!(img.write_zeroes(3584, 1024, false).is_err());
        assert_eq!(std::fs::metadata(tmp.path()).unwrap().len(), 4096);
        // Within the image: written.
        img.write_vectored_at(&from_bytes(&[1u8; 512]), 3584, false)
            .unwrap();
        // Grown again (the operator grew the file): the new end counts.
        std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .unwrap()
            .set_len(8192)
            .unwrap();
        assert_eq!(img.refresh_size().unwrap(), 8192);
        img.write_vectored_at(&from_bytes(&[1u8; 512]), 4096, false)
            .unwrap();
    }

    #[test]
    fn reads_into_scattered_buffers() {
        let data: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let (_tmp, img) = image(&data);
        assert_eq!(img.size(), 4096);
        assert_eq!(img.kind(), ImageKind::RegularFile);
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 100], [0u8; 1]);
        img.read_vectored_at(&mut into_bufs([&mut a[..], &mut b[..], &mut c[..]]), 10)
            .unwrap();
        assert_eq!(a, data[10..13]);
        assert_eq!(b, data[13..113]);
        assert_eq!(c, data[113..114]);
    }

    #[test]
    fn more_iovecs_than_one_call_takes() {
        let data: Vec<u8> = (0..200u8).collect();
        let (_tmp, img) = image(&data);
        let mut bufs = [[0u8; 2]; 100];
        img.read_vectored_at(&mut into_bufs(bufs.iter_mut().map(|b| &mut b[..])), 0)
            .unwrap();
        let flat: Vec<u8> = bufs.concat();
        assert_eq!(flat, data);
    }

    #[test]
    fn read_past_end_is_eof() {
        let (_tmp, img) = image(&[1u8; 512]);
        let mut buf = [0u8; 16];
        let err = img
            .read_vectored_at(&mut into_bufs([&mut buf[..]]), 504)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Opened with O_NONBLOCK (a FIFO must not block startup), the image
    /// is blocking afterwards: io_uring hands EAGAIN back for a
    /// non-blocking file instead of waiting.
    #[test]
    fn an_opened_image_is_blocking_and_close_on_exec() {
        let flags_of = |img: &FileImage| {
            let fd_flags = rustix::io::fcntl_getfd(img.file()).unwrap();
            assert!(fd_flags.contains(rustix::io::FdFlags::CLOEXEC));
            let flags = rustix::fs::fcntl_getfl(img.file()).unwrap();
            flags & (OFlags::NONBLOCK | OFlags::DIRECT)
        };
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(4096).unwrap();
        for read_only in [true, false] {
            let img = FileImage::open(tmp.path(), read_only).unwrap();
            assert_eq!(flags_of(&img), OFlags::empty());
            if let Some((_tmp, img)) = direct_image(&[0; 4096], read_only) {
                assert_eq!(flags_of(&img), OFlags::DIRECT);
            }
        }
    }

    #[test]
    fn open_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileImage::open(dir.path(), true),
            Err(OpenError::IsDirectory)
        ));
        assert!(matches!(
            FileImage::open(&dir.path().join("missing"), true),
            Err(OpenError::NotFound)
        ));
        assert!(matches!(
            FileImage::open(Path::new("/dev/null"), true),
            Err(OpenError::NotAnImage)
        ));
    }

    /// A file for O_DIRECT tests on a file system that supports it (the
    /// crate's directory, not a tmpfs /tmp), or None with a note.
    fn direct_image(bytes: &[u8], read_only: bool) -> Option<(tempfile::NamedTempFile, FileImage)> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".direct-test")
            .tempfile_in(env!("CARGO_MANIFEST_DIR"))
            .unwrap();
        tmp.write_all(bytes).unwrap();
        match FileImage::open_direct(tmp.path(), read_only) {
            Ok(img) => Some((tmp, img)),
            Err(e) => {
                eprintln!("O_DIRECT not supported here ({e}); skipping");
                None
            }
        }
    }

    #[test]
    fn direct_io_aligned_and_bounced() {
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
        let Some((tmp, img)) = direct_image(&data, false) else {
            return;
        };
        let align = img.direct_alignment().unwrap();
        assert!(align.memory.is_power_of_two() && align.offset.is_power_of_two());
        assert!(align.offset <= 4096);
        // Aligned buffer.
        let mut aligned = AlignedBuffer::new(8192, 4096).unwrap();
        // SAFETY: the buffer holds 8192 zeroed bytes, only accessed
        // through this slice while it lives.
        let aligned_bytes = unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr(), 8192) };
        img.read_vectored_at(&mut into_bufs([&mut aligned_bytes[..]]), 8192)
            .unwrap();
        assert_eq!(&aligned_bytes[..], &data[8192..16384]);
        // A misaligned guest buffer (odd address, odd split) is bounced.
        let mut raw = vec![0u8; 4096 + 1];
        let (a, b) = raw[1..].split_at_mut(1000);
        img.read_vectored_at(&mut into_bufs([a, b]), 4096).unwrap();
        assert_eq!(&raw[1..], &data[4096..8192]);
        // Writes both ways, durable and not.
        let mut new = vec![0x77u8; 4096 + 1];
        let (a, b) = new[1..].split_at_mut(3);
        img.write_vectored_at(&into_bufs([a, b]).into(), 0, true)
            .unwrap();
        img.write_vectored_at(&from_bytes(aligned_bytes), 12288, false)
            .unwrap();
        img.flush().unwrap();
        let on_disk = std::fs::read(tmp.path()).unwrap();
        assert_eq!(&on_disk[..4096], &[0x77u8; 4096][..]);
        assert_eq!(&on_disk[12288..20480], &data[8192..16384]);
        // Zeroing without fallocate support falls back to written zeroes
        // from an unaligned static buffer: bounced too.
        img.write_zeroes(16384, 4096, false).unwrap();
        assert!(std::fs::read(tmp.path()).unwrap()[16384..20480]
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn extents_count_zeroed_ranges_as_allocated() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("sparse.raw");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        let img = FileImage::open(&path, false).unwrap();
        // Data at 256 KiB, a zeroed (ZERO_RANGE) range at 512 KiB, holes
        // elsewhere.
        let data = vec![0x11u8; 64 << 10];
        img.write_vectored_at(&from_bytes(&data), 256 << 10, true)
            .unwrap();
        img.write_zeroes(512 << 10, 64 << 10, false).unwrap();
        img.flush().unwrap();
        let e = img.extent(0).unwrap();
        assert_eq!((e.allocated, e.len), (false, 256 << 10));
        let e = img.extent(256 << 10).unwrap();
        assert!(e.allocated);
        assert!(e.len >= 64 << 10 && e.len < 256 << 10, "{e:?}");
        let e = img.extent(512 << 10).unwrap();
        assert!(e.allocated, "a zeroed range stays mapped: {e:?}");
        let e = img.extent(1020 << 10).unwrap();
        assert_eq!((e.allocated, e.len), (false, 4 << 10));
        // A punched range is a hole again.
        img.write_zeroes(256 << 10, 64 << 10, true).unwrap();
        let e = img.extent(256 << 10).unwrap();
        assert!(!e.allocated, "{e:?}");
    }
}
