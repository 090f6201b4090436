//! The SCSI target device: a LUN map of disks, command dispatch, and the
//! target-level commands (REPORT LUNS, REPORT SUPPORTED ...). No virtio here.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;

use super::attention::{UnitAttention, UnitAttentions};
use super::buffer::{DataIn, DataOut};
use super::cdb::{
    opcode::{REPORT_LUNS, REQUEST_SENSE},
    Command,
};
use super::disk::{request_sense, send, Disk};
use super::error::{CommandError, CommandResult};
use super::inquiry::{self, Identity};
use super::lun::{LunAddress, MAX_LUN};
use super::opcodes;
use super::passthrough::{self, Forwarded};
use super::sense::{self, SenseData};
use super::stats::{CommandKind, CommandOutcome};
use crate::storage::lock::LockError;
use crate::storage::remote::{
    DataDirection, RemoteResult, ScsiOutcome, TaskManagement, TaskManagementResponse,
};
use crate::storage::{Direction, Transfer};

/// SAM-5 status codes (§5.3.1, table 26).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
}

/// How a command ended.
// Not boxed: a forwarded command's status and sense (up to 252 bytes)
// are built in place, with no allocation per command.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// GOOD status.
    Good,
    /// CHECK CONDITION with this sense data.
    CheckCondition(SenseData),
    /// Not executed: the data-in or data-out buffer is smaller than what the
    /// command must transfer. Reported by the transport, not as SCSI status.
    BufferTooSmall,
    /// A command forwarded to a passthrough unit's remote ended with this
    /// status and sense, as the remote gave them.
    Forwarded(ScsiOutcome),
}

impl Completion {
    /// `descriptor_sense`: the logical unit asks for descriptor-format
    /// sense data (control mode page D_SENSE=1).
    fn from_result(result: CommandResult<()>, descriptor_sense: bool) -> Completion {
        match result {
            Ok(()) => Completion::Good,
            Err(CommandError::DataInTooSmall { .. } | CommandError::DataOutTooSmall { .. }) => {
                Completion::BufferTooSmall
            }
            Err(e) => {
                log::debug!("command failed: {e}");
                let mut sense = e.sense_data();
                sense.descriptor_format = descriptor_sense;
                Completion::CheckCondition(sense)
            }
        }
    }

    /// SAM status byte.
    pub fn status(&self) -> u8 {
        match self {
            Completion::Good => status::GOOD,
            Completion::Forwarded(outcome) => outcome.status,
            _ => status::CHECK_CONDITION,
        }
    }
}

/// What [`Target::prepare`] decided about a command.
#[derive(Clone, Debug)]
pub enum Prepared {
    /// Not a plain READ or WRITE: run it with [`Target::execute`].
    Execute,
    /// As `Execute`, for a command that holds its unit exclusively and
    /// waits until every asynchronous transfer on it has ended (COMPARE AND
    /// WRITE, SBC-3 §5.3): whoever reaps transfers must be able to run.
    ExecuteExclusive,
    /// Already complete: invalid, refused, or nothing to transfer.
    Complete(Completion),
    /// A validated READ, WRITE or SYNCHRONIZE CACHE of `unit`: the caller
    /// carries out `work` and reports its result to [`Target::finish_work`].
    /// The unit stays alive (its image open) while the caller holds it,
    /// even if it is removed from the LUN table meanwhile. `started`: when
    /// the command began (its latency is counted from there).
    HandOver {
        unit: Arc<Disk>,
        work: Planned,
        started: Instant,
    },
}

/// Storage work a command was planned into, for the caller to carry out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planned {
    /// A READ's or WRITE's data transfer.
    Transfer(Transfer),
    /// SYNCHRONIZE CACHE's flush (SBC-3 §5.24).
    Flush,
    /// A command forwarded as it is to a passthrough unit's remote
    /// (`passthrough.rs`).
    Forward(Forwarded),
}

/// The LUN table: entry N is LUN N's logical unit, if there is one.
type Units = Vec<Option<Arc<Disk>>>;

/// A SCSI target: logical units at LUNs 0 to 16383, some of them absent.
///
/// The LUN table changes while commands run on every worker thread
/// ([`Target::insert`], [`Target::remove`]): it is an `ArcSwap`, so
/// finding a command's unit is a lock-free load that never waits for a
/// change, and a change (a copy of the table, swapped in) never waits for
/// a command. A command holds its unit's `Arc` until it completes.
///
/// The images are active (holding their image locks) or inactive (open
/// without locks) together: a daemon started for an incoming live
/// migration opens them inactive and activates them when its VMM starts
/// the device; a daemon whose VM migrated away deactivates them
/// ([`Target::activate_images`], [`Target::deactivate_images`]). A unit
/// inserted takes the target's state. Locks do not change what commands
/// do.
#[derive(Debug)]
pub struct Target {
    units: ArcSwap<Units>,
    /// Serializes changes of the table and of the images' activity;
    /// commands never take it.
    changing: Mutex<()>,
    /// Whether the images are active; written only under `changing`.
    active: AtomicBool,
}

impl Default for Target {
    /// A target without units, active.
    fn default() -> Target {
        Target::new(Vec::new())
    }
}

/// An image whose locks could not be taken: someone else's locks are in
/// the way. One line naming the image and the holder.
#[derive(Debug, thiserror::Error)]
#[error("image {} (LUN {lun}): {source}", .image.as_ref().map_or_else(|| "?".into(), |p| p.display().to_string()))]
pub struct ActivateError {
    pub lun: u16,
    /// The image's path (`None` for storage without one).
    pub image: Option<PathBuf>,
    pub source: LockError,
}

/// An image that could not be flushed before its locks were to be handed
/// over: the locks are kept. One line naming the image.
#[derive(Debug, thiserror::Error)]
#[error("image {} (LUN {lun}): cannot flush it before handing its locks over: {source}", .image.as_ref().map_or_else(|| "?".into(), |p| p.display().to_string()))]
pub struct HandOverError {
    pub lun: u16,
    /// The image's path (`None` for storage without one).
    pub image: Option<PathBuf>,
    pub source: std::io::Error,
}

/// A LUN that is taken, or beyond the highest one; or the unit's image
/// cannot take its locks in an active target.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("LUN {0} is in use")]
    InUse(u16),
    #[error("LUN {0} is beyond the highest LUN, {MAX_LUN}")]
    TooHigh(u16),
    #[error(transparent)]
    Activate(#[from] ActivateError),
}

impl Target {
    /// A target with `luns` at LUNs 0..N-1, active: their images hold
    /// their locks already, or have none (memory).
    pub fn new(luns: Vec<Disk>) -> Target {
        Target::with_activity(luns, true)
    }

    /// A target with `luns` at LUNs 0..N-1, inactive: their images were
    /// opened without locks, and [`Target::activate_images`] takes them
    /// (`--incoming`).
    pub fn new_inactive(luns: Vec<Disk>) -> Target {
        Target::with_activity(luns, false)
    }

    fn with_activity(luns: Vec<Disk>, active: bool) -> Target {
        let units: Units = luns.into_iter().map(|d| Some(Arc::new(d))).collect();
        Target {
            units: ArcSwap::from_pointee(units),
            changing: Mutex::new(()),
            active: AtomicBool::new(active),
        }
    }

    /// Whether the images are active (their locks taken, where they can
    /// lock): false from `--incoming` until [`Target::activate_images`],
    /// and after [`Target::deactivate_images`].
    pub fn images_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Makes every LUN's image active: takes the locks start-up takes
    /// without `--incoming` (storage/lock.rs), as QEMU's destination does
    /// when the VM starts there (`bdrv_activate_all`). Nothing to do if
    /// the images are active. If one cannot (another user's lock is in
    /// the way), the images this call activated are made inactive again,
    /// the target stays inactive, and the error names the first such
    /// image and the holder. LUNs added meanwhile wait (one mutex, which
    /// commands never take); I/O goes on throughout.
    pub fn activate_images(&self) -> Result<(), ActivateError> {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        if self.images_active() {
            return Ok(());
        }
        // The target is inactive, so is every unit in it (`insert` keeps
        // them alike): each activated here is one this call took.
        let units: Vec<(u16, Arc<Disk>)> = present(&self.units.load()).collect();
        for (taken, (lun, unit)) in units.iter().enumerate() {
            if let Err(e) = activate(*lun, unit) {
                for (_, unit) in &units[..taken] {
                    unit.storage().deactivate();
                }
                return Err(e);
            }
        }
        // What this host cached of the images may be stale: another
        // host's daemon served them until now (QEMU's
        // bdrv_activate_all → raw_co_invalidate_cache).
        for (_, unit) in &units {
            unit.storage().drop_cache();
        }
        self.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes every LUN's image inactive: releases their locks, keeping
    /// them open, as QEMU's source does when its VM has migrated away
    /// (`bdrv_inactivate_all`); another daemon may then activate them.
    /// Idempotent; I/O goes on (the VMM stops the guest before this).
    pub fn deactivate_images(&self) -> Result<(), HandOverError> {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let units: Vec<(u16, Arc<Disk>)> = present(&self.units.load()).collect();
        // What the guest wrote reaches the image before another process
        // may take it over (QEMU flushes at the migration's stop too,
        // bdrv_flush_all); an image that cannot be flushed keeps every
        // lock, so the destination cannot start on stale data.
        for (lun, unit) in &units {
            if !unit.storage().read_only() {
                unit.storage().flush().map_err(|source| HandOverError {
                    lun: *lun,
                    image: unit
                        .storage()
                        .image_path()
                        .map(std::path::Path::to_path_buf),
                    source,
                })?;
            }
        }
        for (_, unit) in &units {
            unit.storage().deactivate();
        }
        self.active.store(false, Ordering::Release);
        Ok(())
    }

    /// The logical unit at `lun`, if any.
    pub fn unit(&self, lun: u16) -> Option<Arc<Disk>> {
        self.units.load().get(usize::from(lun))?.clone()
    }

    /// Whether a logical unit is at `lun`.
    pub fn has_unit(&self, lun: u16) -> bool {
        self.units
            .load()
            .get(usize::from(lun))
            .is_some_and(Option::is_some)
    }

    /// The logical units, by LUN, as the table is now.
    pub fn units(&self) -> Vec<(u16, Arc<Disk>)> {
        present(&self.units.load_full()).collect()
    }

    /// The lowest LUN without a logical unit, if any is left.
    pub fn lowest_free_lun(&self) -> Option<u16> {
        let units = self.units.load();
        let free = units
            .iter()
            .position(Option::is_none)
            .unwrap_or(units.len());
        u16::try_from(free).ok().filter(|&lun| lun <= MAX_LUN)
    }

    /// Adds `disk` at `lun`, and establishes REPORTED LUNS DATA HAS
    /// CHANGED on every other unit (SPC-4 §6.33). Its image is made
    /// active or inactive as the target's are (whatever it was opened
    /// as: the target may have changed since); an image that cannot take
    /// its locks in an active target is not added.
    pub fn insert(&self, lun: u16, disk: Disk) -> Result<Arc<Disk>, InsertError> {
        if lun > MAX_LUN {
            return Err(InsertError::TooHigh(lun));
        }
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut units: Units = Units::clone(&self.units.load());
        let index = usize::from(lun);
        if units.get(index).is_some_and(Option::is_some) {
            return Err(InsertError::InUse(lun));
        }
        if self.images_active() {
            activate(lun, &disk)?;
        } else {
            disk.storage().deactivate();
        }
        if units.len() <= index {
            units.resize(index + 1, None);
        }
        let unit = Arc::new(disk);
        units[index] = Some(unit.clone());
        self.units.store(Arc::new(units));
        self.luns_changed(lun);
        Ok(unit)
    }

    /// Takes the unit at `lun` out of the table, and establishes REPORTED
    /// LUNS DATA HAS CHANGED on every other unit. Commands that found it
    /// before keep it until they complete.
    pub fn remove(&self, lun: u16) -> Option<Arc<Disk>> {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut units: Units = Units::clone(&self.units.load());
        let unit = units.get_mut(usize::from(lun))?.take()?;
        while units.last().is_some_and(Option::is_none) {
            units.pop();
        }
        self.units.store(Arc::new(units));
        self.luns_changed(lun);
        Some(unit)
    }

    fn luns_changed(&self, changed: u16) {
        for (lun, unit) in present(&self.units.load()) {
            if lun != changed {
                unit.attention()
                    .establish(UnitAttention::ReportedLunsChanged);
            }
        }
    }

    /// A LOGICAL UNIT RESET of `lun` (SAM-5 §7.7): BUS DEVICE RESET
    /// FUNCTION OCCURRED. False if no unit is there.
    pub fn reset_unit(&self, lun: u16) -> bool {
        match self.unit(lun) {
            Some(unit) => {
                unit.attention().establish(UnitAttention::LogicalUnitReset);
                true
            }
            None => false,
        }
    }

    /// Carries out a task management function at a passthrough unit's
    /// remote (its session's ABORT TASK, ABORT TASK SET, LOGICAL UNIT
    /// RESET), waiting at most `timeout`; `None` if no passthrough unit
    /// is at `lun` (the caller's local handling applies). The remote
    /// establishes its own unit attentions.
    pub fn forward_task_management(
        &self,
        lun: u16,
        tmf: TaskManagement,
        timeout: std::time::Duration,
    ) -> Option<TaskManagementResponse> {
        let unit = self.unit(lun)?;
        if !unit.forwards_commands() {
            return None;
        }
        let remote = unit.storage().remote()?;
        let response = remote.task_management(tmf, timeout);
        log::info!("LUN {lun}: {tmf:?} at the remote: {response:?}");
        Some(response)
    }

    /// An I_T NEXUS RESET (SAM-5 §7.8): I_T NEXUS LOSS OCCURRED on every
    /// unit.
    pub fn reset_nexus(&self) {
        for (_, unit) in present(&self.units.load()) {
            unit.attention().establish(UnitAttention::NexusLoss);
        }
    }

    /// Executes one command addressed to `lun` with the CDB bytes `cdb`.
    pub fn execute(
        &self,
        lun: LunAddress,
        cdb: &[u8],
        data_in: &mut dyn DataIn,
        data_out: &mut dyn DataOut,
    ) -> Completion {
        let units = self.units.load();
        let disk = match lun {
            LunAddress::Lun(n) => units.get(usize::from(n)).and_then(Option::as_deref),
            _ => None,
        };
        let Some(disk) = disk else {
            return self.execute_without_unit(lun, cdb, data_in);
        };
        let started = Instant::now();
        disk.stats().started();
        let (data_in_before, data_out_before) = (data_in.remaining(), data_out.remaining());
        let completion = match unit_attention(disk, cdb, data_in) {
            Some(completion) => completion,
            // A passthrough unit's command left here for a unit attention
            // that another thread's command took meanwhile: it was not
            // carried out, and is retried (REPORT LUNS is the daemon's).
            None if disk.forwards_commands() && cdb.first() != Some(&REPORT_LUNS) => {
                Completion::from_result(
                    Err(CommandError::ReadError(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "unit attention taken meanwhile; not forwarded",
                    ))),
                    disk.descriptor_sense(),
                )
            }
            None => {
                let result = match Command::parse(cdb) {
                    Ok(cmd) => self.execute_on_disk(disk, &cmd, data_in, data_out),
                    Err(e) => Err(e),
                };
                Completion::from_result(result, disk.descriptor_sense())
            }
        };
        let kind = CommandKind::of(cdb.first().copied().unwrap_or(0));
        let moved = |before: usize, after: usize| (before.saturating_sub(after)) as u64;
        record(
            disk,
            kind,
            completion,
            match kind {
                CommandKind::Read => moved(data_in_before, data_in.remaining()),
                _ => 0,
            },
            match kind {
                CommandKind::Write => moved(data_out_before, data_out.remaining()),
                _ => 0,
            },
            started,
        );
        completion
    }

    /// Executes a command addressed to a LUN without a logical unit.
    fn execute_without_unit(
        &self,
        lun: LunAddress,
        cdb: &[u8],
        data_in: &mut dyn DataIn,
    ) -> Completion {
        let result = match Command::parse(cdb) {
            Ok(cmd) if lun == LunAddress::ReportLunsWlun => {
                self.execute_on_wlun(&cmd, cdb, data_in)
            }
            Ok(cmd) => self.execute_without_lu(&cmd, data_in),
            Err(e) if lun == LunAddress::ReportLunsWlun => Err(e),
            // SAM-5 §5.10: a LUN with no logical unit reports that before
            // anything about the CDB.
            Err(_) => Err(CommandError::LunNotSupported),
        };
        Completion::from_result(result, false)
    }

    /// Validates and plans a READ(6/10/12/16), WRITE(6/10/12/16) (not
    /// WRITE AND VERIFY) or SYNCHRONIZE CACHE(10/16) addressed to `lun`,
    /// with data-in and data-out buffers of the given sizes, so that an I/O
    /// engine can carry out its storage work. Errors complete with the same
    /// sense as [`Target::execute`] gives; every other command is left to
    /// it.
    ///
    /// Every command to a passthrough unit but REPORT LUNS (and those a
    /// pending unit attention terminates) is planned as
    /// `Planned::Forward`, or refused by its filter and write
    /// protection (`passthrough.rs`). `tag`: the initiator's tag of the
    /// command.
    pub fn prepare(
        &self,
        lun: LunAddress,
        cdb: &[u8],
        tag: u64,
        data_in: usize,
        data_out: usize,
    ) -> Prepared {
        let LunAddress::Lun(n) = lun else {
            return Prepared::Execute;
        };
        let units = self.units.load();
        let Some(disk) = units.get(usize::from(n)).and_then(Option::as_ref) else {
            return Prepared::Execute;
        };
        if disk.forwards_commands() {
            return Self::prepare_forward(disk, cdb, tag, data_in, data_out);
        }
        if disk.attention().any() {
            // Reported (or not) by `execute`, by the command's kind.
            return Prepared::Execute;
        }
        let started = Instant::now();
        let planned = match Command::parse(cdb) {
            Ok(Command::Read { range, fua }) => disk
                .plan_read(&range, fua, data_in)
                .map(|t| t.map(Planned::Transfer)),
            Ok(Command::Write {
                range,
                fua,
                verify: false,
                ..
            }) => disk
                .plan_write(&range, fua, data_out)
                .map(|t| t.map(Planned::Transfer)),
            Ok(Command::SynchronizeCache(range)) => {
                disk.plan_flush(&range).map(|()| Some(Planned::Flush))
            }
            Ok(Command::CompareAndWrite { .. }) => return Prepared::ExecuteExclusive,
            _ => return Prepared::Execute,
        };
        disk.stats().started();
        let completion = match planned {
            Ok(Some(work)) => {
                return Prepared::HandOver {
                    unit: disk.clone(),
                    work,
                    started,
                }
            }
            Ok(None) => Completion::Good,
            Err(e) => Completion::from_result(Err(e), disk.descriptor_sense()),
        };
        let kind = CommandKind::of(cdb.first().copied().unwrap_or(0));
        record(disk, kind, completion, 0, 0, started);
        Prepared::Complete(completion)
    }

    /// [`Target::prepare`] for a passthrough unit.
    fn prepare_forward(
        disk: &Arc<Disk>,
        cdb: &[u8],
        tag: u64,
        data_in: usize,
        data_out: usize,
    ) -> Prepared {
        let Some(&opcode) = cdb.first() else {
            return Prepared::Execute;
        };
        // REPORT LUNS: the daemon's LUN map. REQUEST SENSE and commands a
        // pending unit attention of the daemon's own terminates (SAM-5
        // §5.14): reported by `execute`.
        if opcode == REPORT_LUNS
            || (disk.attention().any()
                && (opcode == REQUEST_SENSE || UnitAttentions::terminates(opcode)))
        {
            return Prepared::Execute;
        }
        let started = Instant::now();
        disk.stats().started();
        match passthrough::plan(
            cdb,
            tag,
            data_in,
            data_out,
            disk.read_only(),
            disk.unfiltered(),
            disk.block_size(),
        ) {
            Ok(forwarded) => Prepared::HandOver {
                unit: disk.clone(),
                work: Planned::Forward(forwarded),
                started,
            },
            Err(e) => {
                let completion = Completion::from_result(Err(e), disk.descriptor_sense());
                record(disk, CommandKind::of(opcode), completion, 0, 0, started);
                Prepared::Complete(completion)
            }
        }
    }

    /// Completes work planned by [`Target::prepare`] with its result,
    /// whoever carried it out: an engine's or a remote backend's
    /// transfer, or a forwarded command.
    pub fn finish_work(
        unit: &Disk,
        work: &Planned,
        started: Instant,
        result: RemoteResult,
    ) -> Completion {
        let mismatched = |what: &str| std::io::Error::other(what.to_string());
        match work {
            Planned::Forward(forwarded) => {
                let result = match result {
                    RemoteResult::Scsi(result) => result,
                    // A forwarded command its backend dropped.
                    RemoteResult::Io(result) => result.and_then(|()| {
                        Err(mismatched("a transfer's result for a forwarded command"))
                    }),
                };
                Self::finish_forwarded(unit, forwarded, started, result)
            }
            _ => {
                let result = match result {
                    RemoteResult::Io(result) => result,
                    RemoteResult::Scsi(_) => {
                        Err(mismatched("a forwarded command's result for a transfer"))
                    }
                };
                Self::finish(unit, work, started, result)
            }
        }
    }

    /// Completes a forwarded command: the remote's status and sense as
    /// they are, or a retryable ABORTED COMMAND if it never got there.
    fn finish_forwarded(
        unit: &Disk,
        forwarded: &Forwarded,
        started: Instant,
        result: io::Result<ScsiOutcome>,
    ) -> Completion {
        let opcode = forwarded.cdb.as_slice()[0];
        let (completion, moved) = match result {
            Ok(outcome) => (Completion::Forwarded(outcome), outcome.transferred as u64),
            Err(e) => {
                log::debug!("forwarded command {opcode:#04x} failed: {e}");
                let error = if CommandError::is_unreachable(&e) {
                    CommandError::ReadError(e)
                } else {
                    // Anything else the backend reports (a request it
                    // could not build) is the target's failure.
                    CommandError::ReadError(std::io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        e,
                    ))
                };
                (
                    Completion::from_result(Err(error), unit.descriptor_sense()),
                    0,
                )
            }
        };
        let (read, written) = match forwarded.direction {
            DataDirection::FromDevice => (moved, 0),
            DataDirection::ToDevice => (0, moved),
            DataDirection::None => (0, 0),
        };
        record(
            unit,
            CommandKind::of(opcode),
            completion,
            read,
            written,
            started,
        );
        completion
    }

    /// Completes work planned by [`Target::prepare`] with the result of
    /// carrying it out.
    pub fn finish(
        unit: &Disk,
        work: &Planned,
        started: Instant,
        result: io::Result<()>,
    ) -> Completion {
        let (kind, read, written) = match work {
            Planned::Transfer(t) => {
                let moved = if result.is_ok() { t.len as u64 } else { 0 };
                match t.direction {
                    Direction::Read => (CommandKind::Read, moved, 0),
                    Direction::Write { .. } => (CommandKind::Write, 0, moved),
                }
            }
            Planned::Flush => (CommandKind::Flush, 0, 0),
            Planned::Forward(forwarded) => {
                return Self::finish_forwarded(
                    unit,
                    forwarded,
                    started,
                    result.map(|()| ScsiOutcome::new(status::GOOD, &[], 0)),
                )
            }
        };
        let completion = Completion::from_result(
            match work {
                Planned::Transfer(transfer) => unit.finish_transfer(transfer, result),
                Planned::Flush | Planned::Forward(_) => unit.flushed(result),
            },
            unit.descriptor_sense(),
        );
        record(unit, kind, completion, read, written, started);
        completion
    }

    fn execute_on_disk(
        &self,
        disk: &Disk,
        cmd: &Command,
        data_in: &mut dyn DataIn,
        data_out: &mut dyn DataOut,
    ) -> CommandResult<()> {
        match cmd {
            Command::ReportLuns {
                select_report,
                alloc_len,
            } => self.report_luns(*select_report, *alloc_len, data_in),
            Command::ReportSupportedOpcodes(req) => {
                let data = opcodes::report_supported_opcodes(req, disk.discard_enabled())?;
                send(data_in, &data, req.alloc_len as usize);
                Ok(())
            }
            Command::ReportSupportedTmfs { repd, alloc_len } => {
                send(
                    data_in,
                    &opcodes::report_supported_tmfs(*repd),
                    *alloc_len as usize,
                );
                Ok(())
            }
            _ => disk.execute(cmd, data_in, data_out),
        }
    }

    /// The REPORT LUNS well-known LU (SPC-4 §8.2) answers INQUIRY (standard
    /// data and its VPD pages), REPORT LUNS, REQUEST SENSE and TEST UNIT
    /// READY.
    fn execute_on_wlun(
        &self,
        cmd: &Command,
        cdb: &[u8],
        data_in: &mut dyn DataIn,
    ) -> CommandResult<()> {
        match cmd {
            Command::TestUnitReady => Ok(()),
            Command::ReportLuns {
                select_report,
                alloc_len,
            } => self.report_luns(*select_report, *alloc_len, data_in),
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
                let identity = Identity::derived("REPORT LUNS", 0xc101);
                let data = inquiry::standard(inquiry::TYPE_WELL_KNOWN_LU, &identity);
                send(data_in, &data, usize::from(*alloc_len));
                Ok(())
            }
            Command::Inquiry {
                evpd: true,
                page,
                alloc_len,
            } => {
                let data = inquiry::well_known_vpd(*page)?;
                send(data_in, &data, usize::from(*alloc_len));
                Ok(())
            }
            _ => Err(CommandError::InvalidOpcode(
                cdb.first().copied().unwrap_or(0),
            )),
        }
    }

    /// A LUN with no logical unit behind it (SPC-4 §6.6.2, §6.39, §6.33).
    fn execute_without_lu(&self, cmd: &Command, data_in: &mut dyn DataIn) -> CommandResult<()> {
        match cmd {
            Command::Inquiry {
                evpd: false,
                alloc_len,
                ..
            } => {
                // Peripheral qualifier 011b: only the header is meaningful.
                let mut data = [0u8; 36];
                data[0] = inquiry::NO_LOGICAL_UNIT;
                data[2] = 0x06; // SPC-4
                data[3] = 0x02;
                data[4] = (data.len() - 5) as u8;
                send(data_in, &data, usize::from(*alloc_len));
                Ok(())
            }
            Command::RequestSense { desc, alloc_len } => request_sense(
                SenseData::new(sense::LOGICAL_UNIT_NOT_SUPPORTED),
                *desc,
                *alloc_len,
                data_in,
            ),
            Command::ReportLuns {
                select_report,
                alloc_len,
            } => self.report_luns(*select_report, *alloc_len, data_in),
            _ => Err(CommandError::LunNotSupported),
        }
    }

    /// REPORT LUNS (SPC-4 §6.33).
    fn report_luns(
        &self,
        select_report: u8,
        alloc_len: u32,
        data_in: &mut dyn DataIn,
    ) -> CommandResult<()> {
        // SPC-4 §6.33: an allocation length below 16 is an invalid field.
        if alloc_len < 16 {
            return Err(CommandError::field(6));
        }
        let (ordinary, well_known) = match select_report {
            0x00 => (true, false),
            0x01 => (false, true),
            0x02 => (true, true),
            _ => return Err(CommandError::field(2)),
        };
        let units = self.units.load_full();
        // SPC-4 §6.33, SAM-5 §5.14: the initiator now has the inventory;
        // REPORTED LUNS DATA HAS CHANGED is cleared (on every unit: there
        // is one I_T nexus).
        for (_, unit) in present(&units) {
            unit.attention().clear(UnitAttention::ReportedLunsChanged);
        }
        let mut entries: Vec<LunAddress> = Vec::new();
        if ordinary {
            entries.extend(present(&units).map(|(n, _)| LunAddress::Lun(n)));
        }
        if well_known {
            entries.push(LunAddress::ReportLunsWlun);
        }
        let mut data = Vec::with_capacity(8 + 8 * entries.len());
        data.extend_from_slice(&((entries.len() * 8) as u32).to_be_bytes());
        data.extend_from_slice(&[0; 4]);
        for e in entries {
            data.extend_from_slice(&e.encode());
        }
        send(data_in, &data, alloc_len as usize);
        Ok(())
    }
}

/// The units of `units` with their LUNs.
fn present(units: &Units) -> impl Iterator<Item = (u16, Arc<Disk>)> + '_ {
    units
        .iter()
        .enumerate()
        .filter_map(|(lun, unit)| Some((u16::try_from(lun).ok()?, unit.clone()?)))
}

/// Activates `unit`'s image, the error naming it as LUN `lun`.
fn activate(lun: u16, unit: &Disk) -> Result<(), ActivateError> {
    let storage = unit.storage();
    storage
        .activate()
        .map(|_| ())
        .map_err(|source| ActivateError {
            lun,
            image: storage.image_path().map(|p| p.to_path_buf()),
            source,
        })
}

/// SAM-5 §5.14: a pending unit attention condition terminates the command
/// (taken off the pending ones), or is REQUEST SENSE's sense data; `None`
/// if the command runs as usual.
fn unit_attention(disk: &Disk, cdb: &[u8], data_in: &mut dyn DataIn) -> Option<Completion> {
    let opcode = *cdb.first()?;
    let condition = disk.attention().check(opcode)?;
    if !UnitAttentions::terminates(opcode) {
        // REQUEST SENSE: GOOD status, the condition as its sense data.
        let (desc, alloc_len) = match Command::parse(cdb) {
            Ok(Command::RequestSense { desc, alloc_len }) => (desc, alloc_len),
            // A malformed REQUEST SENSE: the condition stays pending.
            _ => {
                disk.attention().establish(condition);
                return None;
            }
        };
        let result = request_sense(SenseData::new(condition.sense()), desc, alloc_len, data_in);
        return Some(Completion::from_result(result, disk.descriptor_sense()));
    }
    Some(Completion::from_result(
        Err(CommandError::UnitAttention(condition)),
        disk.descriptor_sense(),
    ))
}

/// Counts a command to `disk` that began at `started` and ended with
/// `completion`, having moved `read` bytes to the initiator and `written`
/// bytes to the medium.
fn record(
    disk: &Disk,
    kind: CommandKind,
    completion: Completion,
    read: u64,
    written: u64,
    started: Instant,
) {
    let sense_key = match completion {
        Completion::CheckCondition(sense) => Some(sense.sense.key as u8),
        Completion::Forwarded(outcome) => passthrough::sense_key(&outcome),
        Completion::Good | Completion::BufferTooSmall => None,
    };
    disk.stats().completed(&CommandOutcome {
        kind,
        bytes_read: read,
        bytes_written: written,
        sense_key,
        latency: started.elapsed(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::buffer::{SliceDataOut, VecDataIn};
    use crate::scsi::DiskConfig;
    use crate::storage::MemImage;

    fn target() -> Target {
        let disk = Disk::new(
            Box::new(MemImage::new(vec![0x5a; 64 * 512], false)),
            DiskConfig {
                block_size: 512,
                identity: Identity::derived("/ua-test.raw", 0),
                solid_state: true,
                discard: false,
            },
        )
        .unwrap();
        Target::new(vec![disk])
    }

    /// A read-write disk on the image at `path`, opened inactive.
    fn file_disk(path: &std::path::Path, lun: u16) -> Disk {
        let image = crate::storage::FileImage::open(path, false).unwrap();
        Disk::new(
            Box::new(image),
            DiskConfig {
                block_size: 512,
                identity: Identity::derived(&path.to_string_lossy(), lun),
                solid_state: false,
                discard: false,
            },
        )
        .unwrap()
    }

    fn temp_image() -> tempfile::NamedTempFile {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(4096).unwrap();
        tmp
    }

    fn locked_bytes(tmp: &tempfile::NamedTempFile) -> Vec<i64> {
        crate::storage::lock::locked_bytes(&std::fs::File::open(tmp.path()).unwrap())
    }

    const NONE: [i64; 0] = [];
    const WRITER: [i64; 3] = [100, 101, 201];

    /// An inactive target activates every image; when one cannot (a
    /// writer holds it), the images this call locked are released, the
    /// target stays inactive, and the error names the image, its LUN and
    /// the holder. Once the holder is gone, activation succeeds.
    #[test]
    fn activation_rolls_back_on_failure() {
        let (a, b, c) = (temp_image(), temp_image(), temp_image());
        let t = Target::new_inactive(vec![
            file_disk(a.path(), 0),
            file_disk(b.path(), 1),
            file_disk(c.path(), 2),
        ]);
        assert!(!t.images_active());
        assert_eq!(locked_bytes(&a), NONE);
        // Another user writes image b.
        let holder = crate::storage::FileImage::open(b.path(), false).unwrap();
        holder.activate().unwrap();
        let err = t.activate_images().unwrap_err();
        assert_eq!(err.lun, 1);
        assert_eq!(
            err.to_string(),
            format!(
                "image {} (LUN 1): locked by another LUN of this daemon (it is being written): \
                 lock byte 101 (QEMU's \"write\" permission) is taken; an image has at most one writer",
                b.path().display()
            )
        );
        assert!(!t.images_active());
        assert_eq!(locked_bytes(&a), NONE, "LUN 0's locks released");
        assert_eq!(locked_bytes(&c), NONE, "LUN 2 never locked");
        drop(holder);
        t.activate_images().unwrap();
        assert!(t.images_active());
        for image in [&a, &b, &c] {
            assert_eq!(locked_bytes(image), WRITER);
        }
        t.activate_images().unwrap();
        t.deactivate_images().unwrap();
        assert!(!t.images_active());
        for image in [&a, &b, &c] {
            assert_eq!(locked_bytes(image), NONE);
        }
        t.deactivate_images().unwrap();
        assert!(!t.images_active());
    }

    /// A unit inserted takes the target's state, whatever it was opened
    /// as: inactive into an inactive target (and activated with the
    /// rest), active into an active one, where a conflict refuses it.
    #[test]
    fn inserted_units_follow_the_target() {
        let (a, b, c) = (temp_image(), temp_image(), temp_image());
        let t = Target::new_inactive(vec![file_disk(a.path(), 0)]);
        let opened_active = file_disk(b.path(), 1);
        opened_active.storage().activate().unwrap();
        t.insert(1, opened_active).unwrap();
        assert_eq!(locked_bytes(&b), NONE, "inactive like the target");
        t.activate_images().unwrap();
        assert_eq!(locked_bytes(&a), WRITER);
        assert_eq!(locked_bytes(&b), WRITER);
        t.insert(2, file_disk(c.path(), 2)).unwrap();
        assert_eq!(locked_bytes(&c), WRITER, "active like the target");
        // Image a a second time, read-write: refused, and not added.
        let err = t.insert(3, file_disk(a.path(), 3)).unwrap_err();
        assert!(
            err.to_string()
                .contains("(LUN 3): locked by another LUN of this daemon"),
            "{err}"
        );
        assert!(!t.has_unit(3));
        // Removing an inactive unit closes its image, which had no locks.
        t.deactivate_images().unwrap();
        drop(t.remove(2));
        assert_eq!(locked_bytes(&c), NONE);
    }

    /// READ(10) of one block at LBA 0 (SBC-3 §5.11).
    const READ_10: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    /// SAM-5 §5.14: with a unit attention pending, a READ is not planned
    /// for the storage but left to `execute`, which terminates it with the
    /// condition (BUS DEVICE RESET FUNCTION OCCURRED, 06h/29h/03h); the
    /// next READ is planned again.
    #[test]
    fn a_read_with_a_pending_condition_is_left_to_execute_which_reports_it() {
        let t = target();
        let lun = LunAddress::Lun(0);
        assert!(matches!(
            t.prepare(lun, &READ_10, 1, 512, 0),
            Prepared::HandOver { .. }
        ));
        assert!(t.reset_unit(0));
        assert!(matches!(
            t.prepare(lun, &READ_10, 1, 512, 0),
            Prepared::Execute
        ));
        let mut data_in = VecDataIn::with_capacity(512);
        let completion = t.execute(lun, &READ_10, &mut data_in, &mut SliceDataOut::new(&[]));
        let Completion::CheckCondition(sense) = completion else {
            panic!("CHECK CONDITION expected: {completion:?}");
        };
        let fixed = sense.to_fixed();
        assert_eq!((fixed[2] & 0x0f, fixed[12], fixed[13]), (0x06, 0x29, 0x03));
        assert!(data_in.data.is_empty(), "no data with the condition");
        assert!(matches!(
            t.prepare(lun, &READ_10, 1, 512, 0),
            Prepared::HandOver { .. }
        ));
    }
}
