//! A request queue's I/O: the engine its READ and WRITE transfers go to,
//! and the requests whose transfers are in flight there.
//!
//! One path for every engine: [`QueueIo::start`] pins the request's
//! response area, submits the transfer, and either answers at once (the
//! engine carried it out during the call) or keeps what the answer needs
//! in a slot — the chain's head, the reply, the pinned response area and
//! the unit access — until [`QueueIo::reap`] brings the result. Work on
//! remote storage (NBD, iSCSI: `Storage::remote`) goes the same way to
//! the storage's backend instead of the engine, its data buffer pinned,
//! and its result comes through the queue's [`CompletionSink`], which
//! signals the same completion eventfd. Used only
//! by the worker thread serving the queue (and, with that thread's lock
//! held, by the vhost-user handler thread when the VMM stops the queue).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;

use super::answer::Answered;
use super::chain::WrittenRanges;
use super::dirty_log::LogSwitch;
use super::request::{finish_transfer, PendingCommand, RequestError, TransferReply};
use super::tracking::Tracking;
use crate::scsi::TransferAccess;
use crate::storage::engine::run_sync;
use crate::storage::remote::{CompletionSink, RemoteResult};
use crate::storage::{Engine, PinnedBufs, Submission, Submitted};

/// A request whose transfer is in flight.
#[derive(Default)]
struct Waiting {
    /// Bumped at each use; tokens carry it, so a stale result can never
    /// answer a later request.
    generation: u16,
    head: u16,
    /// Set while in flight.
    reply: Option<TransferReply>,
    /// The response area, pinned for the answer.
    resp: PinnedBufs,
    /// The unit access the transfer holds until its result is in.
    access: Option<TransferAccess>,
    /// The chain's device-writable ranges, marked in the dirty log once
    /// the response is written.
    written: WrittenRanges,
    /// The head of a forwarded command's data-in the daemon rewrites
    /// (`scsi/passthrough.rs`), pinned; empty for other requests.
    patch: PinnedBufs,
}

impl Waiting {
    /// Keeps what answering the request of `head` needs, with the
    /// `generation` its token carries, while its work is in flight.
    fn hold(
        &mut self,
        generation: u16,
        head: u16,
        pending: PendingCommand<'_>,
        access: TransferAccess,
        written: &WrittenRanges,
    ) {
        self.generation = generation;
        self.head = head;
        self.reply = Some(pending.into_reply());
        self.access = Some(access);
        // Into the slot's own list: no allocation once it has room.
        self.written.clone_from(written);
    }
}

/// A request queue's engine and its requests in flight.
pub struct QueueIo {
    engine: Box<dyn Engine>,
    /// Where remote backends post the results of this queue's requests.
    remote: Arc<CompletionSink>,
    /// The queue answers are returned to.
    vring: VringRwLock,
    /// The queue's in-flight tracking (its used-ring steps).
    tracking: Arc<Tracking>,
    /// The dirty log, if the VMM is migrating the guest.
    log: Arc<LogSwitch>,
    waiting: Vec<Waiting>,
    /// Slots not in flight.
    free: Vec<u16>,
    /// The queue stopped popping because the engine was full (its
    /// notifications stay off): it must be served again once transfers
    /// complete, whoever reaps them.
    pub stalled: bool,
}

impl QueueIo {
    /// The I/O of the queue `vring` through `engine`, with room for
    /// `capacity` requests in flight; answers are marked in the dirty log
    /// `log` holds, if any.
    /// `remote` is where remote backends post this queue's results.
    pub fn new(
        engine: Box<dyn Engine>,
        remote: Arc<CompletionSink>,
        capacity: u16,
        vring: VringRwLock,
        tracking: Arc<Tracking>,
        log: Arc<LogSwitch>,
    ) -> QueueIo {
        QueueIo {
            engine,
            remote,
            vring,
            tracking,
            log,
            waiting: (0..capacity).map(|_| Waiting::default()).collect(),
            free: (0..capacity).rev().collect(),
            stalled: false,
        }
    }

    /// Carries out or starts the work of `pending` (the chain with head
    /// `head`) on its unit's storage, with `access` to the unit: its answer if it is
    /// done, `None` if it is in flight (answered by [`QueueIo::reap`]).
    /// `written` are the chain's device-writable ranges: kept for the
    /// answer of a request in flight, marked by the caller otherwise.
    #[inline]
    pub fn start(
        &mut self,
        mut pending: PendingCommand<'_>,
        access: TransferAccess,
        head: u16,
        written: &WrittenRanges,
    ) -> Option<Answered<RequestError>> {
        if pending.unit.storage().remote().is_some() {
            return self.start_remote(pending, access, head, written);
        }
        let slot = match self.free.last() {
            Some(&index) if pending.pin_response(&mut self.waiting[usize::from(index)].resp) => {
                index
            }
            _ => {
                // No room to wait for a result, or a response area cut too
                // finely to pin: done here, synchronously.
                let (storage, request) = pending.request();
                let result = match request {
                    Some(request) => run_sync(&**storage, request),
                    None => Err(not_local()),
                };
                return Some(pending.answer(RemoteResult::Io(result)));
            }
        };
        let waiting = &mut self.waiting[usize::from(slot)];
        let generation = waiting.generation.wrapping_add(1);
        let token = (u64::from(generation) << 16) | u64::from(slot);
        let (storage, request) = pending.request();
        let Some(request) = request else {
            // A forwarded command on storage without a remote side.
            waiting.resp.release();
            return Some(pending.answer(RemoteResult::Io(Err(not_local()))));
        };
        let submitted = self.engine.submit(Submission {
            storage,
            request,
            token,
        });
        match submitted {
            Submitted::Done(result) => {
                waiting.resp.release();
                drop(access);
                Some(pending.answer(RemoteResult::Io(result)))
            }
            Submitted::Queued => {
                waiting.hold(generation, head, pending, access, written);
                self.free.pop();
                // Reads the page cache answered while a batch went to the
                // kernel are answered now, not after the whole available
                // ring: the guest (if it asked for an interrupt) refills
                // the queue while the rest is served.
                self.reap_inline();
                None
            }
        }
    }

    /// [`QueueIo::start`] for work on remote storage: handed to its
    /// backend with the data buffer pinned, never waited for here.
    fn start_remote(
        &mut self,
        pending: PendingCommand<'_>,
        access: TransferAccess,
        head: u16,
        written: &WrittenRanges,
    ) -> Option<Answered<RequestError>> {
        let unit = pending.unit.clone();
        let Some(remote) = unit.storage().remote() else {
            return Some(pending.answer(RemoteResult::Io(Err(not_local()))));
        };
        let Some(&slot) = self.free.last() else {
            // Popping stops while the queue is full (`is_full`): only a
            // request resubmitted after a restart can get here.
            return Some(pending.answer(RemoteResult::Io(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "no room for another request in flight",
            )))));
        };
        let waiting = &mut self.waiting[usize::from(slot)];
        let mut data = PinnedBufs::new();
        if !pending.pin_response(&mut waiting.resp) || !pending.pin_data(&mut data) {
            // Cut into more pieces than any driver makes: a hostile guest.
            waiting.resp.release();
            return Some(pending.answer(RemoteResult::Io(Err(io::Error::other(
                "request buffers cut into too many pieces",
            )))));
        }
        pending.pin_patch(&mut waiting.patch);
        let generation = waiting.generation.wrapping_add(1);
        let token = (u64::from(generation) << 16) | u64::from(slot);
        let op = pending.remote_op();
        waiting.hold(generation, head, pending, access, written);
        self.free.pop();
        remote.submit(op, data, self.remote.completion(token));
        None
    }

    /// Hands queued transfers to the kernel.
    pub fn push(&mut self) {
        self.engine.push();
    }

    pub fn is_full(&self) -> bool {
        self.free.is_empty() || self.engine.is_full()
    }

    pub fn in_flight(&self) -> usize {
        self.waiting.len() - self.free.len()
    }

    pub fn peak(&self) -> usize {
        self.engine.peak()
    }

    pub fn has_completions(&mut self) -> bool {
        self.engine.has_completions() || self.remote.has_results()
    }

    /// Answers the transfers whose results have arrived; returns how many.
    pub fn reap(&mut self) -> usize {
        self.answer_results(|engine, remote, answer| {
            engine.reap(&mut |token, result| answer(token, RemoteResult::Io(result)))
                + remote.take(answer)
        })
    }

    /// As [`QueueIo::reap`], for results that may have arrived during
    /// submission.
    pub fn reap_inline(&mut self) -> usize {
        self.answer_results(|engine, _, answer| {
            engine.reap_inline(&mut |token, result| answer(token, RemoteResult::Io(result)))
        })
    }

    /// Waits for and answers every transfer in flight, remote ones
    /// included (their backends complete each within its timeout). False
    /// if the engine failed, leaving transfers in flight.
    pub fn drain(&mut self) -> bool {
        let drained = self.drain_local();
        let mut waited = Duration::ZERO;
        while self.remote.in_flight() > 0 {
            const STEP: Duration = Duration::from_secs(1);
            if !self.remote.wait(STEP) {
                waited += STEP;
                if waited.as_secs() % 30 == 0 {
                    warn!(
                        "still waiting for {} requests on remote storage after {} s",
                        self.remote.in_flight(),
                        waited.as_secs()
                    );
                }
            }
            self.answer_results(|_, remote, answer| remote.take(answer));
        }
        drained
    }

    /// As [`QueueIo::drain`], for the engine's transfers only: requests on
    /// remote storage go on.
    pub fn drain_local(&mut self) -> bool {
        let mut drained = true;
        self.answer_results(|engine, _, answer| {
            drained = engine.drain(&mut |token, result| answer(token, RemoteResult::Io(result)));
            0
        });
        drained
    }

    /// Runs `collect` with a callback that answers each result: writes its
    /// response, returns the chain to the used ring; then signals the
    /// guest once if EVENT_IDX asks for it. Returns how many were
    /// answered.
    fn answer_results(
        &mut self,
        collect: impl FnOnce(
            &mut dyn Engine,
            &CompletionSink,
            &mut dyn FnMut(u64, RemoteResult),
        ) -> usize,
    ) -> usize {
        let mut answered = 0;
        // Chains actually put on the used ring: a used ring the guest
        // placed outside its memory takes none, and then there is nothing
        // to signal (virtio 1.2 §2.7.10).
        let mut returned = 0;
        let QueueIo {
            engine,
            remote,
            vring,
            tracking,
            log,
            waiting,
            free,
            ..
        } = self;
        collect(&mut **engine, remote, &mut |token, result| {
            let Some(on_used_ring) = answer(vring, tracking, log, waiting, free, token, result)
            else {
                return;
            };
            answered += 1;
            returned += usize::from(on_used_ring);
        });
        if returned > 0 {
            // virtio 1.2 §2.7.10: with EVENT_IDX, only when the driver asked
            // for an interrupt at this point of the used ring.
            if self.vring.needs_notification().unwrap_or(true) {
                if let Err(e) = self.vring.signal_used_queue() {
                    debug!("cannot signal the used queue: {e}");
                }
            }
        }
        answered
    }
}

/// Answers the request `token` names with its transfer's `result`: `None`
/// if it names no request in flight, else whether the chain went onto the
/// used ring. With a dirty log, the chain's writable ranges are marked
/// after the response is written (the data-in is in: its result was
/// reaped) and before the chain goes on the used ring, and the used ring's
/// element and index after.
fn answer(
    vring: &VringRwLock,
    tracking: &Tracking,
    log: &LogSwitch,
    waiting: &mut [Waiting],
    free: &mut Vec<u16>,
    token: u64,
    result: RemoteResult,
) -> Option<bool> {
    let index = (token & 0xffff) as usize;
    let generation = (token >> 16) as u16;
    let slot = waiting.get_mut(index)?;
    if slot.generation != generation {
        return None;
    }
    let reply = slot.reply.take()?;
    // The transfer is over: a COMPARE AND WRITE waiting for it may go on.
    slot.access = None;
    let used = finish_transfer(&reply, result, &mut slot.resp, &mut slot.patch);
    slot.resp.release();
    slot.patch.release();
    free.push(index as u16);
    log.with(|log| log.mark_ranges(&slot.written));
    // One write guard for both: a read lock taken while it is held (as a
    // temporary of the match's scrutinee it lasts the whole match) would
    // wait for it forever.
    let mut state = vring.get_mut();
    match tracking.add_used(&mut state, slot.head, used) {
        Ok(()) => {
            let queue = state.get_queue();
            log.with(|log| {
                log.mark_used(queue.used_ring(), queue.size(), queue.next_used());
            });
            Some(true)
        }
        Err(e) => {
            debug!("cannot return chain {} to the used ring: {e}", slot.head);
            Some(false)
        }
    }
}

/// The error of work only a remote backend can carry out, on storage
/// without one (never: passthrough storage has a remote side).
fn not_local() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "a forwarded command on storage without a remote side",
    )
}

impl Drop for QueueIo {
    fn drop(&mut self) {
        // Every transfer is answered before its memory and queue go away.
        self.drain();
    }
}
