//! The io_uring engine: one ring per request queue keeps many READ and
//! WRITE transfers in flight, so a guest's queue depth reaches the storage
//! instead of being served one synchronous call at a time.
//!
//! Each in-flight transfer has a slot holding everything its completion
//! needs: the caller's token, the transfer, the storage (whose file the
//! entry names, kept open by the `Arc`) and the pinned memory (its pieces
//! at a stable address, its owner keeping the memory mapped, until the
//! completion is reaped). Transfers this engine would do worse than a
//! synchronous call, or cannot do, are carried out synchronously in
//! [`Engine::submit`]. A ring is drained — every transfer completed —
//! before it is dropped.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use log::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::engine::{run_sync, Direction, Engine, Request, Submission, Submitted, Transfer};
use super::{PinnedBufs, Storage};

/// Transfers one ring keeps in flight at most (the submission queue
/// size; the completion queue is twice that, so it cannot overflow).
/// Linux's virtio-scsi driver queues up to cmd_per_lun (128) commands per
/// LUN.
pub const RING_ENTRIES: u32 = 128;

/// Entries handed to the kernel at once while a queue is being served: the
/// kernel holds back a batch's requests until the whole batch is issued
/// (block plugging), so smaller batches get the device started sooner.
const SUBMIT_BATCH: usize = 8;

/// Most pieces one transfer may take on the ring. Linux guests send at
/// most seg_max (254) segments, which a guest memory region boundary may
/// split once more; memory cut into more pieces goes through the
/// synchronous path, which splits it into batches. This also caps what a
/// caller can make a slot's piece vector grow to.
const MAX_PIECES: usize = 256;

/// Checks that io_uring works here with the operations the engine uses:
/// a ring can be set up (not disabled by sysctl or seccomp), it runs a
/// no-op, takes an eventfd, and knows READV, WRITEV and FSYNC.
pub fn probe() -> io::Result<()> {
    let mut ring = IoUring::new(4)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::other(format!(
                "the kernel does not support IORING_OP_{name}"
            )));
        }
    }
    let eventfd = EventFd::new(EFD_NONBLOCK)?;
    ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("submission queue full"))?;
    ring.submit_and_wait(1)?;
    let result = ring.completion().next().map(|cqe| cqe.result());
    match result {
        Some(res) if res >= 0 => Ok(()),
        Some(res) => Err(io::Error::from_raw_os_error(-res)),
        None => Err(io::Error::other("no completion for a no-op")),
    }
}

/// What a slot has in flight.
#[derive(Clone, Copy, Debug)]
enum InFlight {
    Transfer(Transfer),
    Flush,
}

/// One in-flight request.
#[derive(Default)]
struct Slot {
    /// Bumped at each use; user_data carries it, so a stale completion
    /// can never complete a later request.
    generation: u16,
    /// The caller's token.
    token: u64,
    /// Set while in flight.
    request: Option<InFlight>,
    /// Set while in flight: the storage the entry's fd belongs to.
    storage: Option<Arc<dyn Storage>>,
    /// The memory, as handed to the kernel: must not move or change until
    /// the completion arrives.
    bufs: PinnedBufs,
}

/// A request queue's ring and its in-flight transfers.
pub struct UringEngine {
    ring: IoUring,
    slots: Vec<Slot>,
    /// Slots not in flight.
    free: Vec<u16>,
    /// Most transfers in flight at once so far (for tests and logs).
    peak: usize,
    /// Entries pushed but not yet submitted.
    unsubmitted: usize,
    /// Reads through the page cache queued since the last push.
    buffered_reads: bool,
    /// A push since the last inline reap handed the kernel reads through
    /// the page cache: they may have completed during the submission.
    check_inline: bool,
}

impl UringEngine {
    /// Sets up a ring that signals `eventfd` whenever a completion is
    /// posted.
    pub fn new(eventfd: RawFd) -> io::Result<UringEngine> {
        // COOP_TASKRUN (Linux 5.19): completions are not forced onto the
        // thread with an interrupt while it runs; it picks them up at its
        // next system call or when it sleeps. Older kernels: without it.
        let ring = IoUring::builder()
            .setup_cqsize(2 * RING_ENTRIES)
            .setup_coop_taskrun()
            .build(RING_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(2 * RING_ENTRIES)
                    .build(RING_ENTRIES)
            })?;
        ring.submitter().register_eventfd(eventfd)?;
        Ok(UringEngine {
            ring,
            slots: (0..RING_ENTRIES).map(|_| Slot::default()).collect(),
            free: (0..RING_ENTRIES as u16).rev().collect(),
            peak: 0,
            unsubmitted: 0,
            buffered_reads: false,
            check_inline: false,
        })
    }

    /// Queues `submission` on the ring, or gives it back when this engine
    /// cannot take it or would do worse than a synchronous call: no free
    /// slot, storage without a file, a write through the page cache,
    /// memory O_DIRECT cannot take as it is or cut into too many pieces, a
    /// durable write without RWF_DSYNC.
    fn queue<'r>(&mut self, submission: Submission<'r>) -> Result<(), Submission<'r>> {
        let Some(file) = submission.storage.async_file() else {
            return Err(submission);
        };
        let Some(&index) = self.free.last() else {
            return Err(submission);
        };
        let slot = &mut self.slots[usize::from(index)];
        let generation = slot.generation.wrapping_add(1);
        let user_data = (u64::from(generation) << 16) | u64::from(index);
        let fd = types::Fd(file.fd);
        let (entry, in_flight): (squeue::Entry, InFlight) = match &submission.request {
            Request::Flush => (
                // fdatasync(2), as Storage::flush does.
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                InFlight::Flush,
            ),
            Request::Transfer { transfer, memory } => {
                match transfer.direction {
                    // Writes through the page cache stay synchronous:
                    // io_uring hands buffered writes to one file to a
                    // single worker thread in turn (they are hashed by
                    // inode), which is slower than writing them inline.
                    Direction::Write { .. } if file.direct.is_none() => return Err(submission),
                    Direction::Write { durable: true } if !file.dsync => return Err(submission),
                    // Past the image's end (shrunk since the range check):
                    // the synchronous call refuses it.
                    Direction::Write { .. }
                        if (transfer.offset)
                            .checked_add(transfer.len as u64)
                            .is_none_or(|end| end > submission.storage.size()) =>
                    {
                        return Err(submission)
                    }
                    _ => {}
                }
                if !memory.pin(transfer.len, MAX_PIECES, &mut slot.bufs)
                    || !file.accepts(&slot.bufs)
                {
                    slot.bufs.release();
                    return Err(submission);
                }
                let iov = slot.bufs.iovecs();
                // At most MAX_PIECES pieces.
                let count = iov.len() as u32;
                let entry = match transfer.direction {
                    Direction::Read => opcode::Readv::new(fd, iov.as_ptr(), count)
                        .offset(transfer.offset)
                        .build(),
                    Direction::Write { durable } => opcode::Writev::new(fd, iov.as_ptr(), count)
                        .offset(transfer.offset)
                        // Durable at completion, as pwritev2(RWF_DSYNC) in
                        // a synchronous call (FUA, or write cache off).
                        .rw_flags(if durable { libc::RWF_DSYNC } else { 0 })
                        .build(),
                };
                (entry, InFlight::Transfer(*transfer))
            }
        };
        // SAFETY: a transfer's entry names `slot.bufs`' piece vector, which
        // is neither moved nor changed until the completion for
        // `user_data` is reaped (the slot is in flight until then, and a
        // ring is drained before it is dropped); the pieces point into
        // memory that `slot.bufs` keeps valid until then. The fd belongs
        // to the storage, which `slot.storage` keeps open. A flush names
        // no memory.
        if unsafe { self.ring.submission().push(&entry.user_data(user_data)) }.is_err() {
            slot.bufs.release();
            return Err(submission);
        }
        self.free.pop();
        if matches!(in_flight, InFlight::Transfer(t) if t.direction == Direction::Read)
            && file.direct.is_none()
        {
            self.buffered_reads = true;
        }
        slot.generation = generation;
        slot.token = submission.token;
        slot.request = Some(in_flight);
        slot.storage = Some(submission.storage.clone());
        self.peak = self.peak.max(self.in_flight());
        self.unsubmitted += 1;
        Ok(())
    }

    /// The result of the slot `user_data` names, completed with the
    /// kernel's `result`: `None` if it names no transfer in flight.
    fn complete(&mut self, user_data: u64, result: i32) -> Option<(u64, io::Result<()>)> {
        let index = (user_data & 0xffff) as usize;
        let generation = (user_data >> 16) as u16;
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        let request = slot.request.take()?;
        let storage = slot.storage.take()?;
        let transfer = match request {
            InFlight::Transfer(transfer) => transfer,
            InFlight::Flush => {
                let outcome = match result {
                    0.. => Ok(()),
                    // Interrupted: a synchronous call does it.
                    _ if matches!(-result, libc::EINTR | libc::EAGAIN | libc::ECANCELED) => {
                        storage.flush()
                    }
                    _ => Err(io::Error::from_raw_os_error(-result)),
                };
                self.free.push(index as u16);
                return Some((slot.token, outcome));
            }
        };
        let outcome = if result >= 0 {
            let done = result as usize;
            if done >= transfer.len {
                Ok(())
            } else {
                // A short transfer (e.g. a read at the end of a file
                // truncated underneath): a synchronous call does the rest,
                // and reports a read past the end as the sync engine does.
                slot.bufs.advance(done);
                finish_sync(&*storage, transfer, done as u64, &mut slot.bufs)
            }
        } else {
            match -result {
                // Cases a synchronous call knows how to handle: a stricter
                // O_DIRECT alignment than statx reported (it bounces), no
                // RWF_DSYNC on this file system (it writes and fdatasyncs),
                // or an interrupted transfer.
                libc::EINVAL | libc::EOPNOTSUPP | libc::EAGAIN | libc::EINTR | libc::ECANCELED => {
                    finish_sync(&*storage, transfer, 0, &mut slot.bufs)
                }
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        };
        slot.bufs.release();
        self.free.push(index as u16);
        Some((slot.token, outcome))
    }
}

/// Carries out what is left of `transfer` from byte `done` on, through the
/// pinned memory that remains.
fn finish_sync(
    storage: &dyn Storage,
    transfer: Transfer,
    done: u64,
    bufs: &mut PinnedBufs,
) -> io::Result<()> {
    let offset = transfer.offset + done;
    let mut memory = bufs.borrow_mut();
    match transfer.direction {
        Direction::Read => storage.read_vectored_at(&mut memory, offset),
        Direction::Write { durable } => storage.write_vectored_at(&memory.into(), offset, durable),
    }
}

impl Engine for UringEngine {
    fn submit(&mut self, submission: Submission<'_>) -> Submitted {
        match self.queue(submission) {
            Ok(()) => {
                if self.unsubmitted >= SUBMIT_BATCH {
                    self.push();
                }
                Submitted::Queued
            }
            Err(submission) => Submitted::Done(run_sync(&**submission.storage, submission.request)),
        }
    }

    fn push(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(_) => {
                self.unsubmitted = 0;
                self.check_inline |= std::mem::take(&mut self.buffered_reads);
            }
            // Left queued: the next push or drain retries.
            Err(e) => debug!("io_uring submit: {e}"),
        }
    }

    /// Reads the page cache answered during their submission, if any were
    /// submitted since the last call: answering them now saves an epoll
    /// round trip. (An O_DIRECT transfer's completion always comes later,
    /// through the eventfd.)
    fn reap_inline(&mut self, completed: &mut dyn FnMut(u64, io::Result<()>)) -> usize {
        if !std::mem::take(&mut self.check_inline) || !self.has_completions() {
            return 0;
        }
        self.reap(completed)
    }

    fn reap(&mut self, completed: &mut dyn FnMut(u64, io::Result<()>)) -> usize {
        let mut count = 0;
        loop {
            let mut batch = [(0u64, 0i32); 32];
            let mut n = 0;
            for cqe in self.ring.completion().take(batch.len()) {
                batch[n] = (cqe.user_data(), cqe.result());
                n += 1;
            }
            if n == 0 {
                break;
            }
            for &(user_data, result) in &batch[..n] {
                if let Some((token, outcome)) = self.complete(user_data, result) {
                    completed(token, outcome);
                    count += 1;
                }
            }
        }
        count
    }

    fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    fn peak(&self) -> usize {
        self.peak
    }

    fn drain(&mut self, completed: &mut dyn FnMut(u64, io::Result<()>)) -> bool {
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(e) => {
                    warn!(
                        "io_uring: cannot wait for {} transfers: {e}",
                        self.in_flight()
                    );
                    return false;
                }
            }
            self.reap(completed);
        }
        true
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The owner drains before dropping, answering every transfer; what
        // is still in flight here has nobody to answer.
        if !self.drain(&mut |_, _| {}) {
            // The kernel may still access the memory of the transfers in
            // flight: keep it mapped for good rather than risk it being
            // reused under a transfer.
            for slot in &mut self.slots {
                if slot.request.is_some() {
                    std::mem::forget(std::mem::take(&mut slot.bufs));
                    std::mem::forget(slot.storage.take());
                }
            }
        }
    }
}
