//! A direct-access block device logical unit (SBC-3) over a [`Storage`].
//!
//! Durability (SBC-3 §4.15, write caching): with the write cache enabled
//! (caching page WCE=1, the default) a completed WRITE is in the host page
//! cache; SYNCHRONIZE CACHE makes every earlier completed write durable
//! before it completes; a FUA write is durable when it completes. With WCE=0
//! every write is durable at completion. A FUA read and a VERIFY write the
//! cache back before they read the medium (SBC-3 §5.11, §5.33). Once a
//! flush (or a durable write) has failed, every later flush and durable
//! write fails too: the kernel reports a write-back error only once, and
//! data it failed to write must never be reported as flushed ("fsyncgate").

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

use super::attention::{UnitAttention, UnitAttentions};
use super::buffer::{DataIn, DataOut};
use super::cdb::{BlockRange, Command};
use super::error::{CommandError, CommandResult};
use super::inquiry::{self, Identity, VpdParams};
use super::mode::{self, ModeParams};
use super::sense::{self, SenseData};
use super::stats::LunStats;
use crate::storage::lock::ImageLocks;
use crate::storage::{Direction, IoBufs, IoBufsMut, Storage, Transfer};

/// The largest single transfer, in bytes, reported in the block limits VPD
/// page (and enforced): 32 MiB.
pub const MAX_TRANSFER_BYTES: u32 = 32 << 20;

/// Largest WRITE SAME range, in bytes (block limits VPD, MAXIMUM WRITE
/// SAME LENGTH).
pub const MAX_WRITE_SAME_BYTES: u64 = 1 << 30;
/// Largest UNMAP total, in bytes (block limits VPD, MAXIMUM UNMAP LBA
/// COUNT), further capped at [`MAX_UNMAP_LBA_COUNT`] blocks.
pub const MAX_UNMAP_BYTES: u64 = 1 << 30;
/// Largest UNMAP total in logical blocks whatever the block size: 1 Mi.
/// Initiators sanity-check MAXIMUM UNMAP LBA COUNT, and larger values are
/// not worth the risk of being taken for garbage.
pub const MAX_UNMAP_LBA_COUNT: u32 = 1 << 20;
/// Most block descriptors in one UNMAP parameter list (block limits VPD).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 64;
/// Largest COMPARE AND WRITE, in logical blocks (block limits VPD).
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 64;
/// Most descriptors one GET LBA STATUS returns.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 256;

/// Scratch space VERIFY, WRITE SAME and comparisons go through, so that
/// memory use does not depend on the lengths the initiator asks for.
const CHUNK: usize = 64 << 10;

/// Physical block size reported to the guest when the logical block is
/// smaller: host file systems and devices work in 4 KiB units, so guests
/// that align to it avoid read-modify-write cycles.
const PHYSICAL_BLOCK: u32 = 4096;

/// How a disk is presented.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub block_size: u32,
    pub identity: Identity,
    pub solid_state: bool,
    /// Offer thin provisioning: UNMAP, WRITE SAME with UNMAP, LBPME.
    pub discard: bool,
}

/// Why a storage object cannot be served as a disk.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskError {
    #[error("image is empty")]
    Empty,
    #[error("size {size} is not a multiple of the {block_size}-byte block size")]
    NotBlockMultiple { size: u64, block_size: u32 },
    #[error("block size {0} is not supported (512 or 4096)")]
    BadBlockSize(u32),
}

/// The state a guest sets on a unit (or that it has pending), carried
/// from a stopping daemon to the next (`state.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestState {
    /// Caching mode page WCE.
    pub write_cache: bool,
    /// Control mode page D_SENSE.
    pub descriptor_sense: bool,
    /// Pending unit attention conditions, as `UnitAttentions::bits`.
    pub unit_attentions: u8,
    /// A flush or durable write failed.
    pub flush_failed: bool,
}

/// Why a unit could not be resized.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("{0}")]
    Disk(DiskError),
    #[error("cannot set the image's length: {0}")]
    Image(io::Error),
}

/// A logical unit. Shared (`Arc`) by the LUN table and by every command
/// in flight to it: a unit removed from the table lives, its image open,
/// until the last of them completes.
pub struct Disk {
    storage: Arc<dyn Storage>,
    config: DiskConfig,
    /// The capacity in logical blocks; changed by [`Disk::resize`] while
    /// commands run, so each command reads it once.
    blocks: AtomicU64,
    /// Unit attention conditions pending for the initiator.
    attention: UnitAttentions,
    /// What the management API's `stats` reports.
    stats: LunStats,
    /// Caching mode page WCE.
    write_cache: AtomicBool,
    /// Control mode page D_SENSE: descriptor-format sense data.
    descriptor_sense: AtomicBool,
    /// A flush or durable write failed: no later flush may succeed.
    flush_failed: AtomicBool,
    /// COMPARE AND WRITE holds this exclusively; every other data access
    /// holds it shared (or a [`TransferAccess`], taken with it shared), so
    /// the compare and the write are atomic (SBC-3 §5.3).
    io_lock: RwLock<()>,
    /// READ and WRITE transfers handed over and not yet finished.
    handed_over: Arc<HandedOver>,
    /// A passthrough unit forwards even the commands the filter keeps
    /// from the remote (see `passthrough.rs`).
    unfiltered: bool,
    /// Told when the unit is dropped (the last field, so it is dropped
    /// after `storage`: the image is closed by then unless whoever is told
    /// holds the storage too, as `lun_remove` does to flush it).
    closed: ClosedNotice,
}

/// Sends on its channel, if one was set, when dropped: how whoever removes
/// a unit learns that the last command using it has completed and its
/// image is closed (engines hold the storage only while a command that
/// holds the unit is in flight, and let go of it first).
#[derive(Debug, Default)]
struct ClosedNotice(Mutex<Option<SyncSender<()>>>);

impl Drop for ClosedNotice {
    fn drop(&mut self) {
        let sender = self.0.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = sender.take() {
            let _ = sender.try_send(());
        }
    }
}

/// The count of a unit's transfers handed over to be carried out
/// elsewhere, and the condition COMPARE AND WRITE waits on until none is
/// left.
#[derive(Debug, Default)]
struct HandedOver {
    count: AtomicUsize,
    /// Whether a COMPARE AND WRITE waits for the count to reach zero: only
    /// then does the access that brings it there notify (a notification is
    /// a system call; without a waiter, every request would pay it).
    waiter: AtomicBool,
    /// Taken by the waiter, and by whoever brings the count to zero
    /// before notifying, so no wake-up is lost.
    lock: Mutex<()>,
    idle: Condvar,
}

impl HandedOver {
    fn wait_idle(&self) {
        let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        // SeqCst here and in `end`: either the waiter sees the count at
        // zero, or the one that brings it there sees the waiter.
        self.waiter.store(true, Ordering::SeqCst);
        let guard = self
            .idle
            .wait_while(guard, |_| self.count.load(Ordering::SeqCst) != 0)
            .unwrap_or_else(PoisonError::into_inner);
        self.waiter.store(false, Ordering::SeqCst);
        drop(guard);
    }

    fn end(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 && self.waiter.load(Ordering::SeqCst) {
            let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.idle.notify_all();
        }
    }
}

/// Access to a unit for one handed-over request (a READ's or WRITE's
/// transfer, a flush): while it lives, COMPARE AND WRITE waits (SBC-3
/// §5.3). Dropping it ends the request's access; a request in flight
/// keeps it until its result is in.
pub struct TransferAccess {
    handed_over: Arc<HandedOver>,
}

impl Drop for TransferAccess {
    fn drop(&mut self) {
        self.handed_over.end();
    }
}

impl std::fmt::Debug for TransferAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferAccess").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("config", &self.config)
            .field("blocks", &self.blocks())
            .finish()
    }
}

impl Disk {
    pub fn new(storage: Box<dyn Storage>, config: DiskConfig) -> Result<Disk, DiskError> {
        let block_size = config.block_size;
        if block_size != 512 && block_size != 4096 {
            return Err(DiskError::BadBlockSize(block_size));
        }
        let size = storage.size();
        if size == 0 {
            return Err(DiskError::Empty);
        }
        if size % u64::from(block_size) != 0 {
            return Err(DiskError::NotBlockMultiple { size, block_size });
        }
        Ok(Disk {
            blocks: AtomicU64::new(size / u64::from(block_size)),
            attention: UnitAttentions::default(),
            stats: LunStats::new(),
            closed: ClosedNotice::default(),
            storage: Arc::from(storage),
            config,
            write_cache: AtomicBool::new(true),
            descriptor_sense: AtomicBool::new(false),
            flush_failed: AtomicBool::new(false),
            io_lock: RwLock::new(()),
            handed_over: Arc::default(),
            unfiltered: false,
        })
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    /// The unit attention conditions pending on this unit.
    pub fn attention(&self) -> &UnitAttentions {
        &self.attention
    }

    /// The unit's command statistics.
    pub fn stats(&self) -> &LunStats {
        &self.stats
    }

    /// The image's size in bytes now: read again from the file or block
    /// device.
    pub fn image_size(&self) -> io::Result<u64> {
        self.storage.refresh_size()
    }

    /// Makes the capacity `size` bytes, which must be a whole number of
    /// blocks, and more than none. With `set_len`, the image is first
    /// grown (or, after the capacity, shrunk) to it; otherwise the image
    /// already has that size. Establishes CAPACITY DATA HAS CHANGED when
    /// the capacity changed (SBC-3 §4.6). Commands already past their range
    /// check keep the capacity they were checked against.
    pub fn resize(&self, size: u64, set_len: bool) -> Result<(), ResizeError> {
        let block_size = self.config.block_size;
        if size == 0 {
            return Err(ResizeError::Disk(DiskError::Empty));
        }
        if size % u64::from(block_size) != 0 {
            return Err(ResizeError::Disk(DiskError::NotBlockMultiple {
                size,
                block_size,
            }));
        }
        let blocks = size / u64::from(block_size);
        let before = self.blocks();
        if blocks > before {
            // Growing: the bytes exist before any command may address them.
            if set_len {
                self.storage.set_len(size).map_err(ResizeError::Image)?;
            }
            self.blocks.store(blocks, Ordering::Release);
        } else if blocks < before {
            // Shrinking: no new command addresses the bytes that go; the
            // ones already past their range check end before the image is
            // cut (the unit held as COMPARE AND WRITE holds it: every data
            // access done, no handed-over transfer left), and one that
            // reaches the image after it is refused by the storage (its
            // size is the new one by then).
            self.blocks.store(blocks, Ordering::Release);
            if set_len {
                let _exclusive = self.exclusive();
                self.wait_async_idle();
                if let Err(e) = self.storage.set_len(size) {
                    self.blocks.store(before, Ordering::Release);
                    return Err(ResizeError::Image(e));
                }
            }
        } else {
            return Ok(());
        }
        self.attention.establish(UnitAttention::CapacityChanged);
        Ok(())
    }

    /// What the guest set or left pending on this unit, which a daemon
    /// taking over from this one restores ([`Disk::restore_guest_state`]).
    pub fn guest_state(&self) -> GuestState {
        GuestState {
            write_cache: self.write_cache(),
            descriptor_sense: self.descriptor_sense(),
            unit_attentions: self.attention.bits(),
            flush_failed: self.flush_failed.load(Ordering::Acquire),
        }
    }

    /// Takes over `state` from the daemon before: the caching and control
    /// mode pages' WCE and D_SENSE as the guest set them, its pending unit
    /// attentions, and a flush failure (later flushes keep failing: the
    /// kernel reported the write-back error once, to the daemon before).
    pub fn restore_guest_state(&self, state: &GuestState) {
        self.write_cache.store(state.write_cache, Ordering::Release);
        self.descriptor_sense
            .store(state.descriptor_sense, Ordering::Release);
        self.attention.establish_bits(state.unit_attentions);
        if state.flush_failed {
            self.flush_failed.store(true, Ordering::Release);
        }
    }

    /// Has `sender` told when the unit is dropped (the image is closed by
    /// then, unless whoever is told holds the storage too).
    pub(crate) fn notify_closed(&self, sender: SyncSender<()>) {
        *self.closed.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
    }

    pub fn block_size(&self) -> u32 {
        self.config.block_size
    }

    /// Whether the unit forwards commands to the logical unit its storage
    /// reaches (an iSCSI LUN) instead of emulating a disk
    /// (`passthrough.rs`).
    pub fn forwards_commands(&self) -> bool {
        self.storage.scsi_passthrough()
    }

    /// For a passthrough unit: forward every command, the filter off
    /// (the `unfiltered` LUN option).
    pub fn with_unfiltered(mut self, unfiltered: bool) -> Disk {
        self.unfiltered = unfiltered;
        self
    }

    pub fn unfiltered(&self) -> bool {
        self.unfiltered
    }

    pub fn read_only(&self) -> bool {
        self.storage.read_only()
    }

    /// Where the image stands with its locks (`None`: storage without
    /// any, e.g. memory).
    pub fn image_locks(&self) -> Option<ImageLocks> {
        self.storage.image_locks()
    }

    pub fn identity(&self) -> &Identity {
        &self.config.identity
    }

    /// Whether sense data goes out in descriptor format (D_SENSE=1).
    pub fn descriptor_sense(&self) -> bool {
        self.descriptor_sense.load(Ordering::Relaxed)
    }

    /// Thin provisioning is offered: configured, and the unit is writable.
    pub fn discard_enabled(&self) -> bool {
        self.config.discard && !self.read_only()
    }

    fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    fn max_transfer_blocks(&self) -> u32 {
        MAX_TRANSFER_BYTES / self.config.block_size
    }

    /// MAXIMUM UNMAP LBA COUNT (SBC-3 §6.5.3), where UNMAP is offered.
    fn max_unmap_blocks(&self) -> u32 {
        let blocks = MAX_UNMAP_BYTES / u64::from(self.config.block_size);
        u32::try_from(blocks)
            .unwrap_or(u32::MAX)
            .min(MAX_UNMAP_LBA_COUNT)
    }

    /// MAXIMUM WRITE SAME LENGTH (SBC-3 §6.5.3).
    fn max_write_same_blocks(&self) -> u32 {
        let blocks = MAX_WRITE_SAME_BYTES / u64::from(self.config.block_size);
        u32::try_from(blocks).unwrap_or(u32::MAX)
    }

    fn physical_exponent(&self) -> u8 {
        (PHYSICAL_BLOCK.max(self.config.block_size) / self.config.block_size).trailing_zeros() as u8
    }

    /// Standard INQUIRY data of this unit.
    pub fn inquiry(&self) -> Vec<u8> {
        inquiry::standard(inquiry::TYPE_DISK, &self.config.identity)
    }

    /// Executes a block command (everything but the target-level commands
    /// REPORT LUNS and REPORT SUPPORTED ...).
    pub fn execute(
        &self,
        cmd: &Command,
        data_in: &mut dyn DataIn,
        data_out: &mut dyn DataOut,
    ) -> CommandResult<()> {
        match cmd {
            Command::TestUnitReady
            | Command::StartStopUnit
            | Command::PreventAllowMediumRemoval => Ok(()),
            Command::RequestSense { desc, alloc_len } => request_sense(
                SenseData::new(sense::NO_ADDITIONAL_SENSE),
                *desc,
                *alloc_len,
                data_in,
            ),
            Command::Inquiry {
                evpd: false,
                alloc_len,
                ..
            } => {
                send(data_in, &self.inquiry(), usize::from(*alloc_len));
                Ok(())
            }
            Command::Inquiry {
                evpd: true,
                page,
                alloc_len,
            } => {
                let data = inquiry::vpd(*page, &self.vpd_params())?;
                send(data_in, &data, usize::from(*alloc_len));
                Ok(())
            }
            Command::ModeSense(req) => {
                let data = mode::mode_sense(req, &self.mode_params())?;
                send(data_in, &data, usize::from(req.alloc_len));
                Ok(())
            }
            Command::ModeSelect { ten, param_len } => {
                self.mode_select(*ten, usize::from(*param_len), data_out)
            }
            Command::ReadCapacity10 => {
                // SBC-3 §5.16: a last LBA beyond 32 bits reads FFFFFFFFh,
                // telling the initiator to use READ CAPACITY(16).
                let last = u32::try_from(self.blocks().saturating_sub(1)).unwrap_or(u32::MAX);
                let mut data = [0u8; 8];
                data[..4].copy_from_slice(&last.to_be_bytes());
                data[4..].copy_from_slice(&self.config.block_size.to_be_bytes());
                send(data_in, &data, data.len());
                Ok(())
            }
            Command::ReadCapacity16 { alloc_len } => {
                // SBC-3 §5.17, table 65: no protection; LBPME and LBPRZ
                // when thin provisioning is offered (unmapped blocks read
                // as zeroes: they are holes).
                let mut data = [0u8; 32];
                data[..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
                data[8..12].copy_from_slice(&self.config.block_size.to_be_bytes());
                data[13] = self.physical_exponent();
                if self.discard_enabled() {
                    data[14] = 0x80 | 0x40;
                }
                send(data_in, &data, *alloc_len as usize);
                Ok(())
            }
            Command::Read { range, fua } => self.read(range, *fua, data_in),
            Command::Write {
                range,
                fua,
                verify: false,
                ..
            } => self.write(range, *fua, data_out),
            Command::Write {
                range,
                bytchk: false,
                ..
            } => {
                // WRITE AND VERIFY, BYTCHK 00b (SBC-3 §5.38): written
                // durably, then the medium is read back.
                self.write(range, true, data_out)?;
                self.verify_medium(range)
            }
            Command::Write {
                range,
                bytchk: true,
                ..
            } => self.write_and_compare(range, data_out),
            Command::WriteSame { range, unmap, ndob } => {
                self.write_same(range, *unmap, *ndob, data_out)
            }
            Command::Unmap { param_len } => self.unmap(usize::from(*param_len), data_out),
            Command::GetLbaStatus { lba, alloc_len } => {
                self.get_lba_status(*lba, *alloc_len, data_in)
            }
            Command::CompareAndWrite { lba, blocks, fua } => {
                self.compare_and_write(*lba, *blocks, *fua, data_out)
            }
            Command::Verify { range, bytchk } => self.verify(range, *bytchk, data_out),
            Command::SynchronizeCache(range) => {
                self.plan_flush(range)?;
                self.flush()
            }
            Command::ReportLuns { .. }
            | Command::ReportSupportedOpcodes(_)
            | Command::ReportSupportedTmfs { .. } => {
                // Target-level commands never reach a disk; be total anyway.
                Err(CommandError::InvalidOpcode(0))
            }
        }
    }

    /// Checks `range` against the capacity with overflow-safe arithmetic.
    fn check_range(&self, lba: u64, blocks: u64) -> CommandResult<()> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks() => Ok(()),
            _ => Err(CommandError::LbaOutOfRange),
        }
    }

    /// Checks the transfer length against the block limits and the range
    /// against the capacity.
    fn check_transfer(&self, range: &BlockRange) -> CommandResult<()> {
        if range.blocks > self.max_transfer_blocks() {
            // SBC-3 §6.5.3: longer than MAXIMUM TRANSFER LENGTH.
            return Err(CommandError::field(range.length_field));
        }
        self.check_range(range.lba, u64::from(range.blocks))
    }

    fn check_writable(&self) -> CommandResult<()> {
        if self.read_only() {
            // SBC-3 §4.10: write protection.
            Err(CommandError::WriteProtected)
        } else {
            Ok(())
        }
    }

    fn byte_offset(&self, lba: u64) -> u64 {
        // lba <= blocks, and blocks * block_size is the image size: no
        // overflow.
        lba * u64::from(self.config.block_size)
    }

    /// Bytes in `blocks` logical blocks (callers bound `blocks`).
    fn bytes(&self, blocks: u64) -> u64 {
        blocks * u64::from(self.config.block_size)
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.io_lock.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.io_lock.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Flushes the storage, remembering a failure for good.
    fn flush(&self) -> CommandResult<()> {
        if self.flush_failed.load(Ordering::Relaxed) {
            return Err(CommandError::WriteError(earlier_flush_failed()));
        }
        self.flushed(self.storage.flush())
    }

    /// SYNCHRONIZE CACHE (SBC-3 §5.24): validates the range; the flush is
    /// the caller's, with its result handed to [`Disk::flushed`]. Fails
    /// at once once a flush has failed.
    pub fn plan_flush(&self, range: &BlockRange) -> CommandResult<()> {
        // NUMBER OF LOGICAL BLOCKS zero means "through the last LBA"; the
        // range must still be on the medium.
        let end = if range.blocks == 0 {
            range.lba.checked_add(1)
        } else {
            range.lba.checked_add(u64::from(range.blocks))
        };
        if end.is_none_or(|end| end > self.blocks()) {
            return Err(CommandError::LbaOutOfRange);
        }
        if self.flush_failed.load(Ordering::Relaxed) {
            return Err(CommandError::WriteError(earlier_flush_failed()));
        }
        Ok(())
    }

    /// Turns the result of a flush of the storage into the command's,
    /// remembering a failure for good.
    pub fn flushed(&self, result: io::Result<()>) -> CommandResult<()> {
        result.map_err(|e| {
            if CommandError::is_unreachable(&e) {
                // Not carried out (the remote storage was unreachable): the
                // initiator retries; nothing is known to be lost. A remote
                // that may have lost acknowledged writes fails the flush
                // with an I/O error instead (see storage/nbd).
                return CommandError::WriteError(e);
            }
            self.flush_failed.store(true, Ordering::Relaxed);
            log::error!(
                "flush of LUN with serial {} failed: {e}; all later flushes will fail",
                self.config.identity.serial
            );
            CommandError::write(e)
        })
    }

    /// Maps the result of a write; a failed durable write poisons later
    /// flushes, whatever its error: its sync may have consumed a
    /// write-back error that belongs to earlier writes, and the kernel
    /// reports that error with the errno of its cause (EIO, but also
    /// ENOSPC or EDQUOT from thin storage, NFS or btrfs), only once.
    fn written(&self, result: io::Result<()>, durable: bool) -> CommandResult<()> {
        result.map_err(|e| {
            // A write that could not reach remote storage is retried by the
            // initiator and proves no loss (see `Disk::flushed`).
            if durable
                && !CommandError::is_unreachable(&e)
                && !self.flush_failed.swap(true, Ordering::Relaxed)
            {
                log::error!(
                    "durable write to LUN with serial {} failed: {e}; all later flushes will fail",
                    self.config.identity.serial
                );
            }
            CommandError::write(e)
        })
    }

    /// Makes every completed write durable if any may still sit in the
    /// write cache (a writable unit with WCE=1): for commands that must
    /// reach the medium itself (a FUA read, VERIFY).
    fn write_back(&self) -> CommandResult<()> {
        if self.write_cache() && !self.read_only() {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Whether a write must be durable at completion, and whether that can
    /// still be promised.
    fn durability(&self, fua: bool) -> CommandResult<bool> {
        let durable = fua || !self.write_cache();
        if durable && self.flush_failed.load(Ordering::Relaxed) {
            return Err(CommandError::WriteError(earlier_flush_failed()));
        }
        Ok(durable)
    }

    /// READ (SBC-3 §5.8-5.11): validates and plans the transfer, which
    /// the caller (or `Disk::read`) carries out, then hands the result
    /// to [`Disk::finish_transfer`]. `None`: nothing to transfer.
    pub fn plan_read(
        &self,
        range: &BlockRange,
        fua: bool,
        available: usize,
    ) -> CommandResult<Option<Transfer>> {
        self.check_transfer(range)?;
        // blocks <= MAX_TRANSFER_BYTES / block_size, so this fits in u32.
        let len = self.bytes(u64::from(range.blocks)) as usize;
        if len > available {
            return Err(CommandError::DataInTooSmall {
                required: len as u64,
                available,
            });
        }
        if len == 0 {
            return Ok(None);
        }
        if fua {
            // SBC-3 §5.11, table 38: with FUA=1 a more recent cached version
            // of a block is written to the medium before it is read.
            self.write_back()?;
        }
        Ok(Some(Transfer {
            offset: self.byte_offset(range.lba),
            len,
            direction: Direction::Read,
        }))
    }

    /// WRITE (SBC-3 §5.32-5.36) without verification: validates and plans
    /// the transfer of data-out straight to the image.
    pub fn plan_write(
        &self,
        range: &BlockRange,
        fua: bool,
        available: usize,
    ) -> CommandResult<Option<Transfer>> {
        self.check_transfer(range)?;
        self.check_writable()?;
        let len = self.bytes(u64::from(range.blocks)) as usize;
        if len > available {
            return Err(CommandError::DataOutTooSmall {
                required: len as u64,
                available,
            });
        }
        if len == 0 {
            return Ok(None);
        }
        let durable = self.durability(fua)?;
        Ok(Some(Transfer {
            offset: self.byte_offset(range.lba),
            len,
            direction: Direction::Write { durable },
        }))
    }

    /// Turns the outcome of a planned transfer into the command's result
    /// (a failed durable write poisons later flushes, as in
    /// `Disk::written`).
    pub fn finish_transfer(
        &self,
        transfer: &Transfer,
        result: io::Result<()>,
    ) -> CommandResult<()> {
        match transfer.direction {
            Direction::Read => result.map_err(CommandError::ReadError),
            Direction::Write { durable } => self.written(result, durable),
        }
    }

    /// The storage handed-over requests are carried out on.
    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Access for a planned transfer handed over to be carried out
    /// elsewhere, without waiting: `None` while COMPARE AND WRITE holds the
    /// unit (the caller must then finish its own transfers in flight before
    /// it waits with [`Disk::wait_transfer_access`], or the COMPARE AND
    /// WRITE would wait for them for good).
    pub fn try_transfer_access(&self) -> Option<TransferAccess> {
        match self.io_lock.try_read() {
            Ok(_shared) => Some(self.transfer_access()),
            Err(_) => None,
        }
    }

    /// As [`Disk::try_transfer_access`], waiting while COMPARE AND WRITE
    /// holds the unit.
    pub fn wait_transfer_access(&self) -> TransferAccess {
        let _shared = self.shared();
        self.transfer_access()
    }

    /// Registers a handed-over transfer; called with the unit's lock held
    /// shared, so that a COMPARE AND WRITE taking it next waits for it.
    fn transfer_access(&self) -> TransferAccess {
        self.handed_over.count.fetch_add(1, Ordering::SeqCst);
        TransferAccess {
            handed_over: self.handed_over.clone(),
        }
    }

    /// With the unit held exclusively, waits until every handed-over
    /// transfer has ended. Each engine thread completes its transfers
    /// without taking the unit's lock (and drains them before any command
    /// that does; a thread whose event loop ends drains them first), so
    /// this wait ends.
    fn wait_async_idle(&self) {
        self.handed_over.wait_idle();
    }

    fn read(&self, range: &BlockRange, fua: bool, data_in: &mut dyn DataIn) -> CommandResult<()> {
        let Some(transfer) = self.plan_read(range, fua, data_in.remaining())? else {
            return Ok(());
        };
        let result = {
            let _shared = self.shared();
            data_in.read_from(&*self.storage, transfer.offset, transfer.len)
        };
        self.finish_transfer(&transfer, result)
    }

    /// WRITE (SBC-3 §5.32-5.36): data-out straight to the image.
    fn write(
        &self,
        range: &BlockRange,
        fua: bool,
        data_out: &mut dyn DataOut,
    ) -> CommandResult<()> {
        let Some(transfer) = self.plan_write(range, fua, data_out.remaining())? else {
            return Ok(());
        };
        let durable = matches!(transfer.direction, Direction::Write { durable: true });
        let result = {
            let _shared = self.shared();
            data_out.write_to(&*self.storage, transfer.offset, transfer.len, durable)
        };
        self.finish_transfer(&transfer, result)
    }

    /// WRITE AND VERIFY with BYTCHK 01b (SBC-3 §5.38-5.40): the data-out
    /// is written durably, read back from the medium and compared byte by
    /// byte with the data-out; on a mismatch, MISCOMPARE with the offset of
    /// the first differing byte in the data-out. Goes through the bounded
    /// scratch buffers, a piece at a time.
    fn write_and_compare(
        &self,
        range: &BlockRange,
        data_out: &mut dyn DataOut,
    ) -> CommandResult<()> {
        let Some(transfer) = self.plan_write(range, true, data_out.remaining())? else {
            return Ok(());
        };
        let durable = matches!(transfer.direction, Direction::Write { durable: true });
        let mut written = vec![0u8; CHUNK.min(transfer.len)];
        let mut medium = vec![0u8; written.len()];
        let _shared = self.shared();
        let mut done = 0usize;
        while done < transfer.len {
            let n = (transfer.len - done).min(written.len());
            let offset = transfer.offset + done as u64;
            data_out.read_bytes(&mut written[..n]);
            let mut source = IoBufs::new();
            source.push_bytes(&written[..n]);
            let result = self.storage.write_vectored_at(&source, offset, durable);
            self.written(result, durable)?;
            self.read_medium(&mut medium[..n], offset)?;
            if let Some(at) = first_difference(&medium[..n], &written[..n]) {
                return Err(CommandError::Miscompare {
                    offset: (done + at) as u64,
                });
            }
            done += n;
        }
        Ok(())
    }

    /// WRITE SAME(10/16) (SBC-3 §5.41, §5.42).
    fn write_same(
        &self,
        range: &BlockRange,
        unmap: bool,
        ndob: bool,
        data_out: &mut dyn DataOut,
    ) -> CommandResult<()> {
        if range.blocks > self.max_write_same_blocks() {
            // Longer than MAXIMUM WRITE SAME LENGTH (SBC-3 §6.5.3).
            return Err(CommandError::field(range.length_field));
        }
        self.check_range(range.lba, u64::from(range.blocks))?;
        self.check_writable()?;
        if unmap && !self.discard_enabled() {
            // LBPWS=0: the UNMAP bit is not supported.
            return Err(CommandError::field_bit(1, 3));
        }
        let block = self.config.block_size as usize;
        let mut pattern = vec![0u8; block];
        if !ndob {
            // SBC-3 §5.41, §5.42: the data-out is one logical block. Any
            // other length is the initiator's error, answered with sense
            // rather than left to the transport (which would report a
            // short buffer as a delivery failure, and a long one not at
            // all).
            if data_out.remaining() != block {
                return Err(CommandError::DataOutLength {
                    expected: block as u64,
                    available: data_out.remaining(),
                });
            }
            data_out.read_bytes(&mut pattern);
        }
        let durable = self.durability(false)?;
        let offset = self.byte_offset(range.lba);
        let len = self.bytes(u64::from(range.blocks));
        let _shared = self.shared();
        if pattern.iter().all(|&b| b == 0) {
            // Zeroes: a hole where unmapping is asked for (it reads back
            // as zeroes, LBPRZ=1), else zeroed but allocated blocks.
            let result = self.storage.write_zeroes(offset, len, unmap);
            self.written(result, false)?;
        } else {
            let mut chunk = Vec::with_capacity(CHUNK.max(block));
            while chunk.len() + block <= CHUNK.max(block) {
                chunk.extend_from_slice(&pattern);
            }
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(chunk.len() as u64) as usize;
                let mut source = IoBufs::new();
                source.push_bytes(&chunk[..n]);
                let result = self
                    .storage
                    .write_vectored_at(&source, offset + done, false);
                self.written(result, false)?;
                done += n as u64;
            }
        }
        if durable {
            self.flush()?;
        }
        Ok(())
    }

    /// UNMAP (SBC-3 §5.28): every descriptor is checked before any range is
    /// deallocated.
    fn unmap(&self, param_len: usize, data_out: &mut dyn DataOut) -> CommandResult<()> {
        if !self.discard_enabled() {
            // Not offered (LBPU=0, not listed by REPORT SUPPORTED OPERATION
            // CODES): SPC-4 §4.3.5.1, an unsupported command. A read-only
            // unit never offers it, discard configured or not: SBC-3
            // §4.7.3.3, its logical blocks are never unmapped, so it is
            // not thin provisioned (LBPME=0, VPD B2h all zero).
            return Err(CommandError::InvalidOpcode(super::cdb::opcode::UNMAP));
        }
        if param_len == 0 {
            return Ok(());
        }
        if param_len < 8 {
            return Err(CommandError::ParamListLength);
        }
        if data_out.remaining() < param_len {
            return Err(CommandError::DataOutTooSmall {
                required: param_len as u64,
                available: data_out.remaining(),
            });
        }
        let mut header = [0u8; 8];
        data_out.read_bytes(&mut header);
        let descriptors_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let count = descriptors_len.min(param_len - 8) / 16;
        if count > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(CommandError::param(2));
        }
        let mut list = vec![0u8; count * 16];
        data_out.read_bytes(&mut list);
        let mut ranges = Vec::with_capacity(count);
        let mut total = 0u64;
        for (i, d) in list.chunks_exact(16).enumerate() {
            let lba = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
            let blocks = u32::from_be_bytes(d[8..12].try_into().unwrap_or_default());
            // SBC-3 §5.28.2: the total over all descriptors is bounded by
            // MAXIMUM UNMAP LBA COUNT.
            total += u64::from(blocks);
            if total > u64::from(self.max_unmap_blocks()) {
                return Err(CommandError::param(8 + 16 * i + 8));
            }
            self.check_range(lba, u64::from(blocks))?;
            ranges.push((lba, blocks));
        }
        let durable = self.durability(false)?;
        let _shared = self.shared();
        for (lba, blocks) in ranges {
            let result = self.storage.write_zeroes(
                self.byte_offset(lba),
                self.bytes(u64::from(blocks)),
                true,
            );
            self.written(result, false)?;
        }
        if durable {
            self.flush()?;
        }
        Ok(())
    }

    /// GET LBA STATUS (SBC-3 §5.7): mapped and deallocated extents from
    /// `lba` on, as the image's holes say (SEEK_DATA/SEEK_HOLE).
    fn get_lba_status(
        &self,
        lba: u64,
        alloc_len: u32,
        data_in: &mut dyn DataIn,
    ) -> CommandResult<()> {
        if !self.discard_enabled() {
            return Err(CommandError::field_bit(1, 4));
        }
        // The capacity this command works with, read once.
        let capacity = self.blocks();
        if lba >= capacity {
            return Err(CommandError::LbaOutOfRange);
        }
        let room = (alloc_len as usize).saturating_sub(8) / 16;
        let max = room.clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
        let block = u64::from(self.config.block_size);
        let mut extents: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = lba;
        // Each step advances at least one block; the step count is capped
        // too, so a backing that reports tiny extents cannot keep the queue
        // thread busy (the reply just ends early, as SBC-3 allows).
        let mut steps = 0usize;
        while pos < capacity && extents.len() < max && steps < 4 * MAX_LBA_STATUS_DESCRIPTORS {
            steps += 1;
            let e = self
                .storage
                .extent(self.byte_offset(pos))
                .map_err(CommandError::ReadError)?;
            // Holes count in whole blocks; a partial block is mapped.
            let (blocks, deallocated) = if e.allocated || e.len < block {
                (e.len.div_ceil(block).max(1), false)
            } else {
                (e.len / block, true)
            };
            // A descriptor counts at most 2^32 - 1 blocks; a longer extent
            // continues in the next one, so the descriptors stay contiguous.
            let blocks = blocks.min(capacity - pos).min(u64::from(u32::MAX));
            match extents.last_mut() {
                Some(last) if last.2 == deallocated && last.1 + blocks <= u64::from(u32::MAX) => {
                    last.1 += blocks;
                }
                _ => extents.push((pos, blocks, deallocated)),
            }
            pos += blocks;
        }
        let mut data = Vec::with_capacity(8 + 16 * extents.len());
        data.extend_from_slice(&((4 + 16 * extents.len()) as u32).to_be_bytes());
        data.extend_from_slice(&[0; 4]);
        for (start, blocks, deallocated) in extents {
            data.extend_from_slice(&start.to_be_bytes());
            data.extend_from_slice(&(blocks as u32).to_be_bytes());
            // PROVISIONING STATUS: 0 mapped, 1 deallocated.
            data.push(u8::from(deallocated));
            data.extend_from_slice(&[0; 3]);
        }
        send(data_in, &data, alloc_len as usize);
        Ok(())
    }

    /// COMPARE AND WRITE (SBC-3 §5.3): data-out holds the verify data then
    /// the write data; both steps run with every other access excluded.
    fn compare_and_write(
        &self,
        lba: u64,
        blocks: u8,
        fua: bool,
        data_out: &mut dyn DataOut,
    ) -> CommandResult<()> {
        if blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
            return Err(CommandError::field(13));
        }
        self.check_range(lba, u64::from(blocks))?;
        self.check_writable()?;
        if blocks == 0 {
            return Ok(());
        }
        let len = self.bytes(u64::from(blocks)) as usize;
        if data_out.remaining() < 2 * len {
            return Err(CommandError::DataOutTooSmall {
                required: 2 * len as u64,
                available: data_out.remaining(),
            });
        }
        let durable = self.durability(fua)?;
        let offset = self.byte_offset(lba);
        let _exclusive = self.exclusive();
        // SBC-3 §5.3: no other command may touch the medium between the
        // compare and the write, asynchronous transfers included.
        self.wait_async_idle();
        let mut medium = vec![0u8; len];
        self.read_medium(&mut medium, offset)?;
        let mut expected = vec![0u8; len];
        data_out.read_bytes(&mut expected);
        if let Some(at) = first_difference(&medium, &expected) {
            return Err(CommandError::Miscompare { offset: at as u64 });
        }
        let result = data_out.write_to(&*self.storage, offset, len, durable);
        self.written(result, durable)
    }

    /// VERIFY (SBC-3 §5.33): BYTCHK 00b reads the range back; 01b compares
    /// it with data-out; 11b compares every block with one data-out block.
    fn verify(
        &self,
        range: &BlockRange,
        bytchk: u8,
        data_out: &mut dyn DataOut,
    ) -> CommandResult<()> {
        self.check_transfer(range)?;
        let block = self.config.block_size as usize;
        let len = self.bytes(u64::from(range.blocks));
        // Data-out the comparison takes: the whole range, or one block.
        let needed = match bytchk {
            0 => 0,
            1 => len as usize,
            3 => block,
            _ => return Err(CommandError::field_bit(1, 2)),
        };
        if range.blocks == 0 {
            return Ok(());
        }
        if data_out.remaining() < needed {
            return Err(CommandError::DataOutTooSmall {
                required: needed as u64,
                available: data_out.remaining(),
            });
        }
        // SBC-3 §5.33: referenced cached blocks are written to the medium
        // first, as SYNCHRONIZE CACHE would.
        self.write_back()?;
        if bytchk == 0 {
            return self.verify_medium(range);
        }
        let mut single = vec![0u8; if bytchk == 3 { block } else { 0 }];
        data_out.read_bytes(&mut single);
        let _shared = self.shared();
        let mut medium = vec![0u8; CHUNK.min(len as usize)];
        let mut expected = vec![0u8; medium.len()];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(medium.len() as u64) as usize;
            self.read_medium(&mut medium[..n], self.byte_offset(range.lba) + done)?;
            if bytchk == 1 {
                data_out.read_bytes(&mut expected[..n]);
            } else {
                // CHUNK is a multiple of the block size.
                for piece in expected[..n].chunks_mut(block) {
                    piece.copy_from_slice(&single[..piece.len()]);
                }
            }
            if let Some(at) = first_difference(&medium[..n], &expected[..n]) {
                // The offset into the data-out (for 11b, into the block
                // replicated over the range, SBC-3 §5.33).
                return Err(CommandError::Miscompare {
                    offset: done + at as u64,
                });
            }
            done += n as u64;
        }
        Ok(())
    }

    fn read_medium(&self, buf: &mut [u8], offset: u64) -> CommandResult<()> {
        let mut destination = IoBufsMut::new();
        destination.push_bytes(buf);
        self.storage
            .read_vectored_at(&mut destination, offset)
            .map_err(CommandError::ReadError)
    }

    /// Reads the range back through a bounded buffer, to make sure the
    /// medium can deliver it.
    fn verify_medium(&self, range: &BlockRange) -> CommandResult<()> {
        let total = self.bytes(u64::from(range.blocks));
        let mut scratch = vec![0u8; CHUNK.min(total as usize)];
        let _shared = self.shared();
        let mut done = 0u64;
        while done < total {
            let n = scratch.len().min((total - done) as usize);
            self.read_medium(&mut scratch[..n], self.byte_offset(range.lba) + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// MODE SELECT(6/10) (SPC-4 §6.9, §6.10).
    fn mode_select(
        &self,
        ten: bool,
        param_len: usize,
        data_out: &mut dyn DataOut,
    ) -> CommandResult<()> {
        if data_out.remaining() < param_len {
            return Err(CommandError::DataOutTooSmall {
                required: param_len as u64,
                available: data_out.remaining(),
            });
        }
        let mut data = vec![0u8; param_len];
        data_out.read_bytes(&mut data);
        let changes = mode::mode_select(ten, &data, &self.mode_params())?;
        if self.write_cache() && !changes.write_cache {
            // Turning the write cache off: what it held becomes durable
            // first (SBC-3 §4.15).
            self.flush()?;
        }
        self.write_cache
            .store(changes.write_cache, Ordering::Relaxed);
        self.descriptor_sense
            .store(changes.descriptor_sense, Ordering::Relaxed);
        Ok(())
    }

    fn vpd_params(&self) -> VpdParams<'_> {
        let discard = self.discard_enabled();
        VpdParams {
            identity: &self.config.identity,
            physical_exponent: self.physical_exponent(),
            max_transfer_blocks: self.max_transfer_blocks(),
            solid_state: self.config.solid_state,
            max_compare_and_write_blocks: MAX_COMPARE_AND_WRITE_BLOCKS,
            max_write_same_blocks: self.max_write_same_blocks(),
            max_unmap_blocks: if discard { self.max_unmap_blocks() } else { 0 },
            max_unmap_descriptors: if discard { MAX_UNMAP_DESCRIPTORS } else { 0 },
            thin_provisioning: discard,
        }
    }

    fn mode_params(&self) -> ModeParams {
        ModeParams {
            blocks: self.blocks(),
            block_size: self.config.block_size,
            read_only: self.read_only(),
            write_cache: self.write_cache(),
            descriptor_sense: self.descriptor_sense(),
        }
    }
}

fn earlier_flush_failed() -> io::Error {
    io::Error::other("an earlier flush failed; data may have been lost")
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Sends parameter data truncated to the allocation length and to the
/// initiator's buffer (SPC-4 §4.2.5.6: returning less is not an error).
pub fn send(data_in: &mut dyn DataIn, data: &[u8], alloc_len: usize) {
    data_in.write_bytes(&data[..data.len().min(alloc_len)]);
}

/// REQUEST SENSE (SPC-4 §6.39): returns `sense` as parameter data, in
/// descriptor format if DESC=1, else fixed format.
pub fn request_sense(
    sense: SenseData,
    desc: bool,
    alloc_len: u8,
    data_in: &mut dyn DataIn,
) -> CommandResult<()> {
    let encoded = SenseData {
        descriptor_format: desc,
        ..sense
    }
    .encode();
    send(data_in, encoded.as_slice(), usize::from(alloc_len));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::scsi::{Completion, SliceDataOut, Target, VecDataIn};
    use crate::storage::MemImage;

    /// COMPARE AND WRITE(16) of one block at LBA 0 (SBC-3 §5.3: opcode
    /// 89h, NUMBER OF LOGICAL BLOCKS in byte 13).
    const COMPARE_AND_WRITE_1: [u8; 16] = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];

    /// SBC-3 §5.3: no other command touches the medium between the compare
    /// and the write. A handed-over request holds its access while in
    /// flight; COMPARE AND WRITE waits until the last access is dropped,
    /// and no longer.
    #[test]
    fn compare_and_write_waits_for_handed_over_requests() {
        let config = DiskConfig {
            block_size: 512,
            identity: Identity::derived("/caw-test.raw", 0),
            solid_state: false,
            discard: false,
        };
        let disk = Disk::new(Box::new(MemImage::new(vec![0; 4096], false)), config).unwrap();
        let target = Arc::new(Target::new(vec![disk]));
        let first = target.unit(0).unwrap().try_transfer_access().unwrap();
        let second = target.unit(0).unwrap().wait_transfer_access();
        let (done, completed) = mpsc::channel();
        let caw = {
            let target = target.clone();
            std::thread::spawn(move || {
                // Compare with zeroes (the medium), write 0x5a.
                let mut data_out = vec![0u8; 512];
                data_out.extend_from_slice(&[0x5a; 512]);
                let completion = target.execute(
                    crate::scsi::LunAddress::Lun(0),
                    &COMPARE_AND_WRITE_1,
                    &mut VecDataIn::with_capacity(0),
                    &mut SliceDataOut::new(&data_out),
                );
                done.send(completion).unwrap();
            })
        };
        assert!(
            completed.recv_timeout(Duration::from_millis(100)).is_err(),
            "COMPARE AND WRITE ran with two requests in flight"
        );
        // While it waits, no new access is given out without waiting.
        assert!(target.unit(0).unwrap().try_transfer_access().is_none());
        drop(first);
        assert!(
            completed.recv_timeout(Duration::from_millis(100)).is_err(),
            "COMPARE AND WRITE ran with a request in flight"
        );
        drop(second);
        let completion = completed
            .recv_timeout(Duration::from_secs(10))
            .expect("COMPARE AND WRITE still waits after the last access ended");
        assert_eq!(completion, Completion::Good);
        caw.join().unwrap();
        assert!(target.unit(0).unwrap().try_transfer_access().is_some());
    }
}
