//! The io_uring I/O engine: per request queue, a ring that keeps many READ
//! and WRITE transfers in flight, so a guest's queue depth reaches the
//! storage instead of being served one synchronous call at a time.
//!
//! A queue's ring is only used by the worker thread serving the queue
//! (and, with that thread's lock held, by the vhost-user handler thread when
//! the VMM stops the queue). Each in-flight transfer has a slot holding
//! everything its completion needs: the chain's head, the response area and
//! the data iovecs (at a stable address until the completion arrives), and
//! an `Arc` of the guest memory snapshot they point into, which keeps that
//! memory mapped while the kernel may still access it. A ring is drained —
//! every transfer completed — before it is dropped.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use log::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::GuestMem;
use super::request::{finish_transfer, PendingCommand, TransferReply};
use super::sglist::skip_iovecs;
use crate::scsi::{Direction, Target};
use crate::storage::IoVec;

/// How READ and WRITE transfers are carried out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// One synchronous `preadv`/`pwritev` at a time per worker thread.
    #[default]
    Sync,
    /// Up to [`RING_ENTRIES`] transfers in flight per request queue.
    IoUring,
}

impl std::fmt::Display for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoEngine::Sync => "sync",
            IoEngine::IoUring => "io-uring",
        })
    }
}

/// Transfers one request queue keeps in flight at most (the ring's
/// submission queue size; the completion queue is twice that, so it cannot
/// overflow). Linux's virtio-scsi driver queues up to cmd_per_lun (128)
/// commands per LUN.
pub const RING_ENTRIES: u32 = 128;

/// Entries handed to the kernel at once while a queue is being served: the
/// kernel holds back a batch's requests until the whole batch is issued
/// (block plugging), so smaller batches get the device started sooner.
const SUBMIT_BATCH: usize = 8;

/// Most iovecs one transfer may take on the ring. Linux guests send at
/// most seg_max (254) segments, which a guest memory region boundary may
/// split once more; a chain cut into more pieces goes through the
/// synchronous path, which splits it into batches. This also caps what a
/// guest can make a slot's iovec vectors grow to.
const MAX_IOVECS: usize = 256;
/// Most pieces of a response area (12 + at most 256 sense bytes) taken.
const MAX_RESPONSE_IOVECS: usize = 16;

/// Checks that io_uring works here with the operations the engine uses:
/// a ring can be set up (not disabled by sysctl or seccomp), it runs a
/// no-op, takes an eventfd, and knows READV and WRITEV.
pub fn probe() -> io::Result<()> {
    let mut ring = IoUring::new(4)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
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

/// One in-flight transfer.
struct Slot {
    /// Bumped at each use; user_data carries it, so a stale completion
    /// can never complete a later request.
    generation: u16,
    head: u16,
    /// Set while the slot is in flight.
    reply: Option<TransferReply>,
    /// The data buffer, as handed to the kernel: must not move or change
    /// until the completion arrives.
    iov: Vec<IoVec>,
    /// The response area.
    resp: Vec<IoVec>,
    /// The guest memory `iov` and `resp` point into.
    mem: Option<Arc<GuestMem>>,
}

/// A request queue's ring and its in-flight transfers.
pub struct QueueRing {
    ring: IoUring,
    target: Arc<Target>,
    /// The queue completions are returned to.
    vring: VringRwLock,
    slots: Vec<Slot>,
    /// Slots not in flight.
    free: Vec<u16>,
    /// Most transfers in flight at once so far (for tests and logs).
    peak: usize,
    /// Entries pushed but not yet submitted.
    unsubmitted: usize,
    /// Reads through the page cache submitted since the last check: they
    /// may have completed during the submission already.
    buffered_reads: bool,
    /// The queue stopped popping because every slot was in flight (its
    /// notifications stay off): it must be served again once slots free
    /// up, whoever reaps them.
    pub stalled: bool,
}

// SAFETY: the raw pointers in the slots name guest memory that the slot's
// `Arc<GuestMem>` keeps mapped; they are valid from any thread. The ring is
// only used by one thread at a time (the owner holds it under a mutex).
unsafe impl Send for QueueRing {}

impl QueueRing {
    /// Sets up a ring for the queue `vring`, signalling `eventfd` whenever
    /// a completion is posted.
    pub fn new(target: Arc<Target>, vring: VringRwLock, eventfd: RawFd) -> io::Result<QueueRing> {
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
        let slots = (0..RING_ENTRIES)
            .map(|_| Slot {
                generation: 0,
                head: 0,
                reply: None,
                iov: Vec::new(),
                resp: Vec::new(),
                mem: None,
            })
            .collect();
        Ok(QueueRing {
            ring,
            target,
            vring,
            slots,
            free: (0..RING_ENTRIES as u16).rev().collect(),
            peak: 0,
            unsubmitted: 0,
            buffered_reads: false,
            stalled: false,
        })
    }

    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn peak(&self) -> usize {
        self.peak
    }

    /// Queues the transfer of `pending` (the chain with head `head`, in
    /// guest memory `mem`) for submission. Gives it back when this engine
    /// cannot take it or would do worse than the synchronous path: no free
    /// slot, storage without a file, a write through the page cache, a
    /// buffer O_DIRECT cannot take as it is, a durable write without
    /// RWF_DSYNC, or the unit held by COMPARE AND WRITE; the caller then
    /// runs it synchronously.
    // The command is handed back by value rather than boxed: the request
    // path allocates nothing.
    #[allow(clippy::result_large_err)]
    pub fn start<'a>(
        &mut self,
        pending: PendingCommand<'a>,
        head: u16,
        mem: &Arc<GuestMem>,
    ) -> Result<(), PendingCommand<'a>> {
        let Some(disk) = self.target.luns().get(pending.lun) else {
            return Err(pending);
        };
        let Some(file) = disk.async_file() else {
            return Err(pending);
        };
        let transfer = pending.transfer;
        match transfer.direction {
            // Writes through the page cache stay synchronous: io_uring
            // hands buffered writes to one file to a single worker thread
            // in turn (they are hashed by inode), which is slower than
            // writing them inline.
            Direction::Write { .. } if file.direct.is_none() => return Err(pending),
            Direction::Write { durable: true } if !file.dsync => return Err(pending),
            _ => {}
        }
        let Some(&index) = self.free.last() else {
            return Err(pending);
        };
        let slot = &mut self.slots[usize::from(index)];
        slot.iov.clear();
        slot.resp.clear();
        if !pending.data_iovecs(MAX_IOVECS, &mut slot.iov)
            || !file.accepts(&slot.iov)
            || !pending.response_iovecs(MAX_RESPONSE_IOVECS, &mut slot.resp)
        {
            return Err(pending);
        }
        if !disk.begin_async() {
            return Err(pending);
        }
        let generation = slot.generation.wrapping_add(1);
        let user_data = (u64::from(generation) << 16) | u64::from(index);
        // The iovec count is at most MAX_IOVECS.
        let count = slot.iov.len() as u32;
        let fd = types::Fd(file.fd);
        let entry: squeue::Entry = match transfer.direction {
            Direction::Read => opcode::Readv::new(fd, slot.iov.as_ptr(), count)
                .offset(transfer.offset)
                .build(),
            Direction::Write { durable } => opcode::Writev::new(fd, slot.iov.as_ptr(), count)
                .offset(transfer.offset)
                // Durable at completion, as pwritev2(RWF_DSYNC) in the
                // synchronous engine (FUA, or write cache off).
                .rw_flags(if durable { libc::RWF_DSYNC } else { 0 })
                .build(),
        }
        .user_data(user_data);
        // SAFETY: the entry names `slot.iov`, whose buffer is neither moved
        // nor changed until the completion for `user_data` is reaped (the
        // slot is in flight until then, and a ring is drained before it is
        // dropped); the iovecs point into guest memory that `slot.mem`
        // keeps mapped until then; the fd belongs to the disk, which
        // `self.target` keeps open.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            disk.end_async();
            return Err(pending);
        }
        self.free.pop();
        if file.direct.is_none() {
            self.buffered_reads = true;
        }
        slot.generation = generation;
        slot.head = head;
        slot.reply = Some(pending.reply());
        slot.mem = Some(mem.clone());
        self.peak = self.peak.max(self.in_flight());
        self.unsubmitted += 1;
        if self.unsubmitted >= SUBMIT_BATCH {
            self.submit();
            // Reads the page cache answered during the submission are
            // returned now, not after the whole available ring: the guest
            // (if it asked for an interrupt) refills the queue while the
            // rest is served, instead of waiting for all of it.
            self.reap_inline();
        }
        Ok(())
    }

    /// Hands queued entries to the kernel.
    pub fn submit(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            // Left queued: the next submit or drain retries.
            Err(e) => debug!("io_uring submit: {e}"),
        }
    }

    /// Whether completions are waiting to be reaped.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Completes the reads the page cache answered during their
    /// submission, if any were submitted since the last call: answering
    /// them now saves an epoll round trip. (An O_DIRECT transfer's
    /// completion always comes later, through the eventfd.)
    pub fn reap_inline(&mut self) -> usize {
        if !std::mem::take(&mut self.buffered_reads) || !self.has_completions() {
            return 0;
        }
        self.reap()
    }

    /// Completes every transfer whose completion has arrived: writes its
    /// response, returns the chain to the used ring, and signals the guest
    /// once if EVENT_IDX asks for it. Returns the number completed.
    pub fn reap(&mut self) -> usize {
        let mut completed = 0;
        // Chains actually put on the used ring: a used ring the guest
        // placed outside its memory takes none, and then there is nothing
        // to signal (virtio 1.2 §2.7.10).
        let mut returned = 0;
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
                if let Some(on_used_ring) = self.complete(user_data, result) {
                    completed += 1;
                    returned += usize::from(on_used_ring);
                }
            }
        }
        if returned > 0 {
            // virtio 1.2 §2.7.10: with EVENT_IDX, only when the driver asked
            // for an interrupt at this point of the used ring.
            if self.vring.needs_notification().unwrap_or(true) {
                if let Err(e) = self.vring.signal_used_queue() {
                    debug!("cannot signal the used queue: {e}");
                }
            }
        }
        completed
    }

    /// Completes the slot `user_data` names with the kernel's `result`:
    /// `None` if it names no transfer in flight, else whether the chain
    /// went onto the used ring.
    fn complete(&mut self, user_data: u64, result: i32) -> Option<bool> {
        let index = (user_data & 0xffff) as usize;
        let generation = (user_data >> 16) as u16;
        let slot = self.slots.get_mut(index)?;
        let reply = slot.reply?;
        if slot.generation != generation {
            return None;
        }
        let disk = self.target.luns().get(reply.lun)?;
        let transfer = reply.transfer;
        let outcome = if result >= 0 {
            let done = result as usize;
            if done >= transfer.len {
                Ok(())
            } else {
                // A short transfer (e.g. a read at the end of a file
                // truncated underneath): the storage's synchronous call
                // does the rest, and reports a read past the end as the
                // sync engine does.
                skip_iovecs(&mut slot.iov, done);
                disk.transfer_registered(&transfer, &slot.iov, done as u64)
            }
        } else {
            match -result {
                // Cases the synchronous path knows how to handle: a
                // stricter O_DIRECT alignment than statx reported (it
                // bounces), no RWF_DSYNC on this file system (it writes
                // and fdatasyncs), or an interrupted transfer.
                libc::EINVAL | libc::EOPNOTSUPP | libc::EAGAIN | libc::EINTR | libc::ECANCELED => {
                    disk.transfer_registered(&transfer, &slot.iov, 0)
                }
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        };
        // The rest, if any, ran still registered as in flight: never waiting
        // for the unit's lock, which a COMPARE AND WRITE waiting for this
        // transfer may hold.
        disk.end_async();
        // SAFETY: `slot.resp` names the response area in guest memory that
        // `slot.mem` keeps mapped; the chain is not yet returned to the
        // guest, so the device still owns that area.
        let used = unsafe { finish_transfer(&self.target, &reply, outcome, &slot.resp) };
        let head = slot.head;
        slot.reply = None;
        slot.mem = None;
        self.free.push(index as u16);
        match self.vring.add_used(head, used) {
            Ok(()) => Some(true),
            Err(e) => {
                debug!("cannot return chain {head} to the used ring: {e}");
                Some(false)
            }
        }
    }

    /// Waits for and completes every transfer in flight. False if the ring
    /// failed, leaving transfers in flight.
    pub fn drain(&mut self) -> bool {
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
            self.reap();
        }
        true
    }
}

impl Drop for QueueRing {
    fn drop(&mut self) {
        if !self.drain() {
            // The kernel may still access the memory of the transfers in
            // flight: keep it mapped for good rather than risk it being
            // reused under a transfer.
            for slot in &mut self.slots {
                if slot.reply.is_some() {
                    std::mem::forget(slot.mem.take());
                    std::mem::forget(std::mem::take(&mut slot.iov));
                }
            }
        }
    }
}
