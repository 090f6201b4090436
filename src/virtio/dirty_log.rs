//! Dirty page logging for live migration (vhost-user specification,
//! "Migration"; VHOST_USER_SET_LOG_BASE with VHOST_USER_PROTOCOL_F_LOG_SHMFD,
//! VHOST_F_LOG_ALL).
//!
//! While the VMM migrates the guest it copies guest memory in rounds and
//! asks the backend to tell it which pages the backend wrote: a bitmap in a
//! shared memory file it sends with SET_LOG_BASE, bit `gpa / 4096` (byte
//! `gpa / 4096 / 8`, bit `(gpa / 4096) % 8`) for the page at guest physical
//! address `gpa`, set with an atomic OR. The VMM takes the bits with an
//! atomic exchange and copies the pages again.
//!
//! The daemon writes guest memory through raw iovecs (`preadv`, io_uring
//! READV) and vm-memory's slices, none of which go through a vm-memory
//! dirty bitmap, so it marks explicitly, as libvhost-user's `vu_log_write`
//! does: every chain's device-writable descriptors *after* the response and
//! data-in are written and *before* the chain goes on the used ring (a mark
//! made before the write could let the VMM copy the page and clear the bit
//! before the data lands), then the used ring's element and index after
//! `add_used`, and the used ring's flags and `avail_event` after a pass
//! wrote them. Over-marking a byte not written costs a page copy; missing
//! one corrupts the migrated guest.
//!
//! Workers read the log through a [`LogSwitch`] once after each write they
//! mark (a lock-free load), so a log the VMM's handler switches on while a
//! request is in flight covers that request's completion.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use log::warn;
use rustix::fs::SealFlags;
use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

/// The page size of the log: one bit per 4 KiB of guest physical address
/// space, whatever the host's page size (VHOST_LOG_PAGE in QEMU).
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// Largest log taken: 2 GiB of bitmap covers 64 TiB of guest physical
/// address space (46 bits, what common x86 hosts address). QEMU sizes its
/// log to the highest guest physical address of its memory map; a larger
/// one is refused rather than mapped.
pub const MAX_LOG_SIZE: u64 = (64 << 40) / LOG_PAGE_SIZE / 8;

/// Bytes of a used ring element (`struct virtq_used_elem`: id, len).
const USED_ELEM_SIZE: u64 = 8;
/// Bytes of the used ring's header (`flags`, `idx`) before its elements.
const USED_HEADER_SIZE: u64 = 4;

/// Why a log the VMM sent cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("dirty log of size 0")]
    Empty,
    #[error("dirty log of {0} bytes: more than {MAX_LOG_SIZE} (64 TiB of guest memory)")]
    TooLarge(u64),
    #[error("dirty log at file offset {offset} of {size} bytes: the end overflows")]
    Overflow { offset: u64, size: u64 },
    #[error("cannot stat the dirty log's file: {0}")]
    Stat(io::Error),
    #[error("the dirty log's file is not a regular file (a memfd)")]
    NotRegularFile,
    #[error(
        "dirty log of {size} bytes at file offset {offset} runs past the end of its \
         {file_len}-byte file"
    )]
    PastEndOfFile {
        offset: u64,
        size: u64,
        file_len: u64,
    },
    #[error(
        "the dirty log's file is not sealed against shrinking (F_SEAL_SHRINK): \
         it could be cut short under the mapping"
    )]
    NotSealed,
    #[error("cannot read the dirty log's file seals: {0}")]
    Seals(io::Error),
    #[error("cannot map the dirty log: {0}")]
    Map(MmapRegionError),
}

/// The VMM's dirty page bitmap, mapped shared.
#[derive(Debug)]
pub struct DirtyLog {
    region: MmapRegion<()>,
    /// Bytes of bitmap (the mapping's size).
    len: u64,
    /// Pages whose bit was set (counting each page of each mark).
    pages_marked: AtomicU64,
    /// Pages written past the end of the log, whose bits do not exist.
    pages_past_log: AtomicU64,
    warned_past_log: AtomicBool,
}

impl DirtyLog {
    /// Maps the log the VMM sent with SET_LOG_BASE: `mmap_size` bytes of
    /// `file` from `mmap_offset`.
    ///
    /// The file must be a regular file (QEMU's is a memfd), hold the whole
    /// range, and be sealed against shrinking: the bitmap is written from
    /// every worker thread at every completion, and a file cut short under
    /// its mapping would end the daemon with SIGBUS at the next write.
    /// QEMU creates its log with `qemu_memfd_alloc("vhost-log", ...,
    /// F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)` (hw/virtio/vhost.c,
    /// `vhost_log_alloc`); a VMM that sends an unsealed file gets no
    /// logging (and so no migration) rather than a daemon it can crash. An
    /// offset that is not a multiple of the host's page size is refused by
    /// mmap.
    pub fn from_vmm(
        file: File,
        mmap_offset: u64,
        mmap_size: u64,
    ) -> Result<DirtyLog, DirtyLogError> {
        if mmap_size == 0 {
            return Err(DirtyLogError::Empty);
        }
        if mmap_size > MAX_LOG_SIZE {
            return Err(DirtyLogError::TooLarge(mmap_size));
        }
        let overflow = DirtyLogError::Overflow {
            offset: mmap_offset,
            size: mmap_size,
        };
        let end = mmap_offset.checked_add(mmap_size).ok_or(overflow)?;
        // Seals first: once F_SEAL_SHRINK is on, the size read next cannot
        // decrease (read the other way round, the VMM could shrink the file
        // and seal it in between). A file that cannot be sealed at all (not
        // a memfd) answers EINVAL: it could shrink just the same.
        let seals = match rustix::fs::fcntl_get_seals(file.as_fd()) {
            Ok(seals) => seals,
            Err(rustix::io::Errno::INVAL) => SealFlags::empty(),
            Err(e) => return Err(DirtyLogError::Seals(e.into())),
        };
        if !seals.contains(SealFlags::SHRINK) {
            return Err(DirtyLogError::NotSealed);
        }
        let meta = file.metadata().map_err(DirtyLogError::Stat)?;
        if !meta.is_file() {
            return Err(DirtyLogError::NotRegularFile);
        }
        if end > meta.len() {
            return Err(DirtyLogError::PastEndOfFile {
                offset: mmap_offset,
                size: mmap_size,
                file_len: meta.len(),
            });
        }
        // `mmap_size` ≤ MAX_LOG_SIZE fits a usize on the 64-bit hosts the
        // daemon runs on; refused elsewhere rather than truncated.
        let size = usize::try_from(mmap_size).map_err(|_| DirtyLogError::TooLarge(mmap_size))?;
        let region = MmapRegion::<()>::from_file(FileOffset::new(file, mmap_offset), size)
            .map_err(DirtyLogError::Map)?;
        Ok(DirtyLog {
            region,
            len: mmap_size,
            pages_marked: AtomicU64::new(0),
            pages_past_log: AtomicU64::new(0),
            warned_past_log: AtomicBool::new(false),
        })
    }

    /// Marks every page the guest physical range [`gpa`, `gpa + len`)
    /// touches as written. Pages past the end of the log are ignored
    /// (counted, and a warning logged once): the VMM sized the log to its
    /// memory map, so such a page is not guest memory it migrates. Whole
    /// bytes of the bitmap are set at once; each with one atomic OR
    /// (Release: the writes being logged come before it, for a VMM that
    /// takes the bits with an atomic exchange).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE_SIZE;
        // A range running past the top of the address space ends there.
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        // `len` ≤ MAX_LOG_SIZE: no overflow; the log is never empty.
        let log_pages = self.len * 8;
        let last_in_log = last.min(log_pages - 1);
        let past = if first > last_in_log {
            last - first + 1
        } else {
            last - last_in_log
        };
        if past > 0 {
            self.pages_past_log.fetch_add(past, Ordering::Relaxed);
            if !self.warned_past_log.swap(true, Ordering::Relaxed) {
                warn!(
                    "wrote guest memory at {gpa:#x} (+{len}) past the dirty log's {} bytes; \
                     pages past it are not logged (further ones counted only)",
                    self.len
                );
            }
        }
        if first > last_in_log {
            return;
        }
        let bitmap = self.region.as_volatile_slice();
        let mut page = first;
        while page <= last_in_log {
            let bit = page % 8;
            // Bits of this byte in the range: 1..=8.
            let count = (8 - bit).min(last_in_log - page + 1);
            let mask = (((1u16 << count) - 1) << bit) as u8;
            // Within the mapping: page ≤ last_in_log < len * 8. An atomic
            // accessor of vm-memory's (no plain reference into memory the
            // VMM writes concurrently); AtomicU8 needs no alignment.
            match bitmap.get_atomic_ref::<AtomicU8>((page / 8) as usize) {
                Ok(byte) => {
                    byte.fetch_or(mask, Ordering::Release);
                }
                Err(e) => {
                    // Cannot happen (checked above); a missed mark is
                    // reported rather than panicking.
                    warn!("dirty log byte {} out of reach: {e}", page / 8);
                }
            }
            page += count;
        }
        self.pages_marked
            .fetch_add(last_in_log - first + 1, Ordering::Relaxed);
    }

    /// Marks the guest physical ranges `ranges` (a chain's device-writable
    /// descriptors).
    pub fn mark_ranges(&self, ranges: &[(u64, u32)]) {
        for &(gpa, len) in ranges {
            self.mark(gpa, u64::from(len));
        }
    }

    /// Marks what `add_used` wrote to the used ring at guest physical
    /// address `used_ring` of a queue of `size` entries whose next used
    /// index is now `next_used`: the element it filled, slot
    /// `(next_used - 1) % size` (id and len, 8 bytes), and the index (with
    /// the flags before it: 4 bytes).
    pub fn mark_used(&self, used_ring: u64, size: u16, next_used: u16) {
        if size == 0 {
            return;
        }
        let slot = u64::from(next_used.wrapping_sub(1) % size);
        // Small numbers: a ring of at most 32768 entries.
        let elem = USED_HEADER_SIZE + slot * USED_ELEM_SIZE;
        self.mark(used_ring, USED_HEADER_SIZE);
        if let Some(at) = used_ring.checked_add(elem) {
            self.mark(at, USED_ELEM_SIZE);
        }
    }

    /// Marks the used ring field enabling and disabling notifications
    /// writes (virtio-queue's `set_notification`): with EVENT_IDX
    /// (`event_idx`), `avail_event`, after the ring's `size` elements;
    /// without, `flags` (marked with the index after it, 4 bytes).
    pub fn mark_used_notification(&self, used_ring: u64, size: u16, event_idx: bool) {
        if !event_idx {
            self.mark(used_ring, USED_HEADER_SIZE);
            return;
        }
        let avail_event = USED_HEADER_SIZE + u64::from(size) * USED_ELEM_SIZE;
        if let Some(at) = used_ring.checked_add(avail_event) {
            self.mark(at, 2);
        }
    }

    /// Bytes of bitmap: the log covers `len() * 8` pages.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never: an empty log is refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages marked so far (each page of each mark).
    pub fn pages_marked(&self) -> u64 {
        self.pages_marked.load(Ordering::Relaxed)
    }

    /// Pages written past the end of the log (not marked).
    pub fn pages_past_log(&self) -> u64 {
        self.pages_past_log.load(Ordering::Relaxed)
    }
}

/// Waits until no worker marks `previous`, a log just taken out of force,
/// any more: until only `held` references to it are left besides
/// `previous` itself (the caller's own). The VMM reads a log it replaced
/// or stopped one last time once the request is answered, then unmaps it:
/// a mark that comes after that read is lost. arc-swap turns each
/// reader's outstanding load into a reference of its own when the value is
/// swapped out, so the count says who still uses it. Marking a chain is
/// short; the wait is bounded all the same (1 s), sleeping, not spinning.
pub fn wait_until_unused(previous: &Arc<DirtyLog>, held: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while Arc::strong_count(previous) > 1 + held && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// The dirty log in force, if any: set by the vhost-user handler when the
/// VMM sent SET_LOG_BASE and acknowledged VHOST_F_LOG_ALL, cleared when it
/// drops LOG_ALL; read lock-free by the worker threads after each write
/// they mark. A log replaced while a worker marks it stays mapped until
/// that worker is done (its `Arc`).
#[derive(Debug, Default)]
pub struct LogSwitch {
    current: ArcSwapOption<DirtyLog>,
}

impl LogSwitch {
    /// Puts `log` in force; the one it replaces, if any.
    pub fn set(&self, log: Option<Arc<DirtyLog>>) -> Option<Arc<DirtyLog>> {
        self.current.swap(log)
    }

    /// The log in force now.
    pub fn get(&self) -> Option<Arc<DirtyLog>> {
        self.current.load_full()
    }

    /// Runs `f` on the log in force, if any (one lock-free load: call it
    /// after the write it marks).
    #[inline]
    pub fn with(&self, f: impl FnOnce(&DirtyLog)) {
        if let Some(log) = &*self.current.load() {
            f(log);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags};

    /// A memfd of `len` bytes, sealed as QEMU seals its log.
    fn sealed(len: u64) -> File {
        let fd = memfd_create("dirty-log-test", MemfdFlags::ALLOW_SEALING).unwrap();
        let file = File::from(fd);
        file.set_len(len).unwrap();
        fcntl_add_seals(
            file.as_fd(),
            SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
        )
        .unwrap();
        file
    }

    fn log(len: u64) -> (DirtyLog, File) {
        let file = sealed(len);
        let log = DirtyLog::from_vmm(file.try_clone().unwrap(), 0, len).unwrap();
        (log, file)
    }

    /// The bitmap as the VMM sees it through its own descriptor.
    fn bitmap(file: &File, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut out = vec![0u8; len];
        file.read_exact_at(&mut out, 0).unwrap();
        out
    }

    #[test]
    fn bits_are_where_the_spec_puts_them() {
        let (log, file) = log(64);
        // Page 0: byte 0, bit 0.
        log.mark(0, 1);
        // 0x9000 is page 9: byte 1, bit 1.
        log.mark(0x9000, 1);
        // 0x3_f123 is page 63 (0x3f): byte 7, bit 7.
        log.mark(0x3_f123, 1);
        // The last byte of page 20 (0x14): byte 2, bit 4.
        log.mark(0x1_4fff, 1);
        let mut expected = vec![0u8; 64];
        expected[0] = 0b0000_0001;
        expected[1] = 0b0000_0010;
        expected[2] = 0b0001_0000;
        expected[7] = 0b1000_0000;
        assert_eq!(bitmap(&file, 64), expected);
        assert_eq!(log.pages_marked(), 4);
        assert_eq!(log.pages_past_log(), 0);
    }

    #[test]
    fn ranges_crossing_pages_mark_every_page() {
        let (log, file) = log(64);
        // Two bytes straddling pages 2 and 3.
        log.mark(0x2fff, 2);
        // Pages 6 to 17 (0x6800 .. 0x11800): bits 6, 7 of byte 0, all of
        // byte 1, bits 0, 1 of byte 2.
        log.mark(0x6800, 0xb000);
        // Exactly one page: page 40 only, not 41.
        log.mark(40 * 0x1000, 0x1000);
        let mut expected = vec![0u8; 64];
        expected[0] = 0b1100_1100;
        expected[1] = 0xff;
        expected[2] = 0b0000_0011;
        expected[5] = 0b0000_0001;
        assert_eq!(bitmap(&file, 64), expected);
        assert_eq!(log.pages_marked(), 2 + 12 + 1);
        // Nothing for an empty range.
        log.mark(0x5000, 0);
        assert_eq!(bitmap(&file, 64), expected);
    }

    #[test]
    fn pages_past_the_log_are_counted_not_marked() {
        // 2 bytes: pages 0 to 15.
        let (log, file) = log(2);
        // Pages 14 to 17: 14 and 15 marked, 16 and 17 past the log.
        log.mark(14 * 0x1000, 4 * 0x1000);
        assert_eq!(bitmap(&file, 2), [0, 0b1100_0000]);
        assert_eq!((log.pages_marked(), log.pages_past_log()), (2, 2));
        // Wholly past, and at the top of the address space (the range's
        // end saturates instead of wrapping to page 0).
        log.mark(16 * 0x1000, 1);
        log.mark(u64::MAX - 10, 100);
        log.mark(u64::MAX, u64::MAX);
        assert_eq!(bitmap(&file, 2), [0, 0b1100_0000]);
        assert_eq!(log.pages_marked(), 2);
        assert_eq!(log.pages_past_log(), 2 + 1 + 1 + 1);
        // A range from page 0 to the end of the address space: the two
        // bytes full, the rest counted, in 2 atomic ORs (not 2^52 steps).
        log.mark(0, u64::MAX);
        assert_eq!(bitmap(&file, 2), [0xff, 0xff]);
    }

    #[test]
    fn used_ring_fields() {
        let (log, file) = log(64);
        // A 256-entry used ring at 0x1_0ff8: header on page 16, next_used 2
        // wrote slot 1 at +12 (page 17); avail_event at +4 + 8 * 256 =
        // 0x1_17fc (page 17).
        log.mark_used(0x1_0ff8, 256, 2);
        assert_eq!(bitmap(&file, 64)[2], 0b0000_0011);
        // Slot 255 after a wrap (next_used 0): 0x5_0000 + 4 + 8 * 255 on
        // page 80; avail_event of a 1024-entry ring at 0x6_0000 + 8196, page
        // 98 (byte 12, bit 2), and not its flags (page 96).
        log.mark_used(0x5_0000, 256, 0);
        log.mark_used_notification(0x6_0000, 1024, true);
        // Without EVENT_IDX, flags and idx: at 0x6_3ffe, pages 99 and 100
        // (byte 12, bits 3 and 4).
        log.mark_used_notification(0x6_3ffe, 1024, false);
        let map = bitmap(&file, 64);
        assert_eq!(map[10], 0b0000_0001);
        assert_eq!(map[12], 0b0001_1100);
        // A zero-sized ring marks nothing (no division by zero).
        log.mark_used(0x7_0000, 0, 1);
        assert_eq!(bitmap(&file, 64)[14], 0);
    }

    #[test]
    fn hostile_offsets_and_sizes_are_refused() {
        let file = sealed(8192);
        let from = |offset, size| DirtyLog::from_vmm(file.try_clone().unwrap(), offset, size);
        assert!(matches!(from(0, 0), Err(DirtyLogError::Empty)));
        assert!(matches!(
            from(0, MAX_LOG_SIZE + 1),
            Err(DirtyLogError::TooLarge(_))
        ));
        assert!(matches!(
            from(u64::MAX - 10, 100),
            Err(DirtyLogError::Overflow { .. })
        ));
        assert!(matches!(
            from(4096, 4097),
            Err(DirtyLogError::PastEndOfFile { .. })
        ));
        assert!(matches!(
            from(0, 8193),
            Err(DirtyLogError::PastEndOfFile { .. })
        ));
        // Not a multiple of the page size: mmap refuses it.
        assert!(matches!(from(100, 16), Err(DirtyLogError::Map(_))));
        // The whole file, and its second page.
        assert_eq!(from(0, 8192).unwrap().len(), 8192);
        let second = from(4096, 4096).unwrap();
        second.mark(0, 1);
        assert_eq!(bitmap(&file, 8192)[4096], 1);
    }

    #[test]
    fn files_that_can_shrink_are_refused() {
        // A memfd without F_SEAL_SHRINK.
        let fd = memfd_create("dirty-log-test", MemfdFlags::ALLOW_SEALING).unwrap();
        let file = File::from(fd);
        file.set_len(4096).unwrap();
        fcntl_add_seals(file.as_fd(), SealFlags::GROW).unwrap();
        assert!(matches!(
            DirtyLog::from_vmm(file, 0, 4096),
            Err(DirtyLogError::NotSealed)
        ));
        // A file that cannot be sealed at all.
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        assert!(matches!(
            DirtyLog::from_vmm(file, 0, 4096),
            Err(DirtyLogError::NotSealed)
        ));
        // Not a regular file: it cannot be sealed either, which is found
        // first (seals are read before the size).
        let dev_null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        assert!(matches!(
            DirtyLog::from_vmm(dev_null, 0, 4096),
            Err(DirtyLogError::NotSealed)
        ));
    }

    #[test]
    fn the_switch_is_read_lock_free_and_cleared() {
        let switch = LogSwitch::default();
        let mut calls = 0;
        switch.with(|_| calls += 1);
        assert_eq!(calls, 0);
        let (log, _file) = log(8);
        let log = Arc::new(log);
        switch.set(Some(log.clone()));
        switch.with(|l| l.mark(0, 1));
        assert_eq!(log.pages_marked(), 1);
        switch.set(None);
        switch.with(|l| l.mark(0, 1));
        assert_eq!(log.pages_marked(), 1);
        assert!(switch.get().is_none());
    }
}
