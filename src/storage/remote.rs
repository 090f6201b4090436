//! Remote storage: backends whose I/O is a network round trip (NBD
//! exports, iSCSI logical units). A worker thread never waits for one: it
//! hands a [`RemoteOp`] with the request's pinned memory to
//! [`RemoteStorage::submit`], which queues it for the backend's own
//! threads and returns at once; the backend later hands the result to the
//! request's [`RemoteCompletion`], which posts it to the queue's
//! [`CompletionSink`] and signals the worker's completion eventfd (the
//! same one an io_uring engine signals). The worker answers the request
//! when it reaps the sink.
//!
//! Two kinds of work: block transfers and flushes (an emulated disk over
//! NBD; the daemon's own SBC emulation plans them), and whole SCSI
//! commands forwarded as they are (passthrough to an iSCSI logical unit:
//! the CDB goes out as opaque bytes, status and sense bytes come back; the
//! SCSI layer decides what may be forwarded and interprets the result).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::PinnedBufs;

/// Longest CDB forwarded (virtio-scsi's default `cdb_size` is 32; SPC-4
/// variable-length CDBs the daemon forwards are at most 32 bytes).
pub const MAX_FORWARDED_CDB: usize = 32;

/// Most sense bytes kept from a forwarded command (SPC-4 §4.5.1: sense
/// data is at most 252 bytes).
pub const MAX_FORWARDED_SENSE: usize = 252;

/// A CDB to forward: its bytes, at most [`MAX_FORWARDED_CDB`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CdbBytes {
    bytes: [u8; MAX_FORWARDED_CDB],
    len: u8,
}

impl CdbBytes {
    /// `None` if `cdb` is empty or longer than [`MAX_FORWARDED_CDB`].
    pub fn new(cdb: &[u8]) -> Option<CdbBytes> {
        if cdb.is_empty() || cdb.len() > MAX_FORWARDED_CDB {
            return None;
        }
        let mut bytes = [0u8; MAX_FORWARDED_CDB];
        bytes[..cdb.len()].copy_from_slice(cdb);
        Some(CdbBytes {
            bytes,
            len: cdb.len() as u8,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for CdbBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CdbBytes({:02x?})", self.as_slice())
    }
}

/// Which way a forwarded command's data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDirection {
    None,
    /// Device to guest (data-in).
    FromDevice,
    /// Guest to device (data-out).
    ToDevice,
}

/// What a remote backend is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteOp {
    /// Fill the pinned memory with `len` bytes from byte `offset`.
    Read { offset: u64, len: usize },
    /// Write `len` bytes of the pinned memory at byte `offset`; with
    /// `durable`, complete only once the server says they are on stable
    /// storage (NBD's FUA).
    Write {
        offset: u64,
        len: usize,
        durable: bool,
    },
    /// Complete only once every write completed before it is on stable
    /// storage at the server.
    Flush,
    /// Forward a SCSI command as it is. `len`: bytes of the pinned memory
    /// the command may move (its data buffer); `tag`: the guest's tag for
    /// the command (virtio-scsi's `tag`), which ABORT TASK names.
    Scsi {
        cdb: CdbBytes,
        direction: DataDirection,
        len: usize,
        tag: u64,
    },
}

/// How a forwarded SCSI command ended at the remote logical unit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ScsiOutcome {
    /// SAM-5 status byte (GOOD, CHECK CONDITION, BUSY, ...).
    pub status: u8,
    sense: [u8; MAX_FORWARDED_SENSE],
    sense_len: u8,
    /// Bytes actually moved (data-in written to the pinned memory, or
    /// data-out taken from it).
    pub transferred: usize,
}

impl ScsiOutcome {
    /// `sense` beyond [`MAX_FORWARDED_SENSE`] bytes is cut.
    pub fn new(status: u8, sense: &[u8], transferred: usize) -> ScsiOutcome {
        let n = sense.len().min(MAX_FORWARDED_SENSE);
        let mut bytes = [0u8; MAX_FORWARDED_SENSE];
        bytes[..n].copy_from_slice(&sense[..n]);
        ScsiOutcome {
            status,
            sense: bytes,
            sense_len: n as u8,
            transferred,
        }
    }

    pub fn sense(&self) -> &[u8] {
        &self.sense[..usize::from(self.sense_len)]
    }
}

impl std::fmt::Debug for ScsiOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiOutcome")
            .field("status", &self.status)
            .field("sense", &self.sense())
            .field("transferred", &self.transferred)
            .finish()
    }
}

/// The result of a [`RemoteOp`].
// Not boxed: results move once, into the sink's queue, and a box would be
// an allocation per forwarded command.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RemoteResult {
    /// Of `Read`, `Write` and `Flush`: all bytes moved and confirmed, or
    /// an error. Errors use the `io::ErrorKind` the SCSI layer maps to
    /// sense data: `TimedOut`, `NotConnected`/`ConnectionReset`/
    /// `BrokenPipe` (the server is gone: NOT READY, retryable), `Other`
    /// with the server's errno (`io::Error::from_raw_os_error`: EIO is a
    /// MEDIUM ERROR, ENOSPC a SPACE ALLOCATION FAILED, ...).
    Io(io::Result<()>),
    /// Of `Scsi`: how the command ended at the remote unit, or why it
    /// could not be carried there (the same kinds as above).
    Scsi(io::Result<ScsiOutcome>),
}

/// Which task management function to carry out at the remote unit
/// (SAM-5 §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskManagement {
    /// Abort the command the guest tagged `tag`.
    AbortTask {
        tag: u64,
    },
    /// Abort every command of this initiator on the unit.
    AbortTaskSet,
    LogicalUnitReset,
}

/// A task management function's outcome (SAM-5 §7.1, service responses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskManagementResponse {
    /// FUNCTION COMPLETE (an abort of a task not found completes too).
    Complete,
    /// FUNCTION REJECTED / not supported by the remote.
    Rejected,
    /// The remote did not answer (session down, timeout).
    Failed,
}

/// A storage backend reached over the network.
pub trait RemoteStorage: Send + Sync {
    /// Starts `op` on the memory `bufs` (data to send, or room for data
    /// received: `bufs` holds at least the op's `len` bytes) and returns
    /// without waiting for the network. Exactly one result reaches
    /// `completion`, from whichever thread the backend chooses, once the
    /// backend no longer touches `bufs` (it drops or hands them back
    /// then). Dropping `completion` without completing it completes it
    /// with an error: a request is never lost.
    fn submit(&self, op: RemoteOp, bufs: PinnedBufs, completion: RemoteCompletion);

    /// Carries out a task management function, waiting at most `timeout`
    /// (not on an I/O path: the control queue's thread calls it). Backends
    /// without the notion (NBD) complete at once: their requests are
    /// completed or timed out by the backend itself.
    fn task_management(&self, tmf: TaskManagement, timeout: Duration) -> TaskManagementResponse {
        let _ = (tmf, timeout);
        TaskManagementResponse::Complete
    }
}

/// Where the results of a request queue's remote requests are posted, and
/// how the queue's worker learns of them: the worker thread's completion
/// eventfd (shared with its io_uring engines).
pub struct CompletionSink {
    results: Mutex<VecDeque<(u64, RemoteResult)>>,
    /// Signalled (with `results` locked) when a result arrives.
    arrived: Condvar,
    /// Requests submitted and not yet completed.
    in_flight: AtomicUsize,
    eventfd: Option<EventFd>,
}

impl CompletionSink {
    /// A sink signalling `eventfd` (a duplicate the sink owns) at each
    /// result; without one, results wait for [`CompletionSink::take`] or
    /// [`CompletionSink::wait`].
    pub fn new(eventfd: Option<EventFd>) -> Arc<CompletionSink> {
        Arc::new(CompletionSink {
            results: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            in_flight: AtomicUsize::new(0),
            eventfd,
        })
    }

    /// The completion for a request with `token`, counted in flight until
    /// it completes.
    pub fn completion(self: &Arc<CompletionSink>, token: u64) -> RemoteCompletion {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RemoteCompletion {
            sink: Some(self.clone()),
            token,
        }
    }

    /// Requests submitted whose results have not been taken.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether results are waiting.
    pub fn has_results(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Passes every result waiting to `each`; returns how many.
    pub fn take(&self, each: &mut dyn FnMut(u64, RemoteResult)) -> usize {
        let taken = std::mem::take(&mut *self.lock());
        let n = taken.len();
        self.in_flight.fetch_sub(n, Ordering::AcqRel);
        for (token, result) in taken {
            each(token, result);
        }
        n
    }

    /// Waits until a result is waiting or `timeout` has passed; true if
    /// one is.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut results = self.lock();
        while results.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            results = self
                .arrived
                .wait_timeout(results, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn post(&self, token: u64, result: RemoteResult) {
        self.lock().push_back((token, result));
        self.arrived.notify_all();
        if let Some(eventfd) = &self.eventfd {
            // A full counter (never, at one per result) or a closed
            // descriptor: the worker still finds the result at its next
            // reap.
            let _ = eventfd.write(1);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, RemoteResult)>> {
        self.results.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The one result a remote request delivers (see
/// [`RemoteStorage::submit`]).
pub struct RemoteCompletion {
    sink: Option<Arc<CompletionSink>>,
    token: u64,
}

impl RemoteCompletion {
    /// Posts the request's result.
    pub fn complete(mut self, result: RemoteResult) {
        if let Some(sink) = self.sink.take() {
            sink.post(self.token, result);
        }
    }

    /// The error a request dropped by its backend completes with.
    fn dropped() -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the remote backend dropped the request",
        )
    }
}

impl Drop for RemoteCompletion {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            // The backend cannot tell which kind of op this was; the
            // worker reads an `Io` error for a `Scsi` op as the same
            // failure.
            sink.post(
                self.token,
                RemoteResult::Io(Err(RemoteCompletion::dropped())),
            );
        }
    }
}

impl std::fmt::Debug for RemoteCompletion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteCompletion({})", self.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_completion_posts_an_error() {
        let sink = CompletionSink::new(None);
        let completion = sink.completion(7);
        assert_eq!(sink.in_flight(), 1);
        drop(completion);
        let mut got = Vec::new();
        assert_eq!(sink.take(&mut |t, r| got.push((t, r))), 1);
        assert_eq!(sink.in_flight(), 0);
        assert!(
            matches!(&got[..], [(7, RemoteResult::Io(Err(e)))] if e.kind() == io::ErrorKind::BrokenPipe)
        );
    }

    #[test]
    fn a_result_signals_the_eventfd_and_wakes_a_waiter() {
        let eventfd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let sink = CompletionSink::new(Some(eventfd.try_clone().unwrap()));
        let completion = sink.completion(3);
        let waiter = {
            let sink = sink.clone();
            std::thread::spawn(move || sink.wait(Duration::from_secs(10)))
        };
        completion.complete(RemoteResult::Io(Ok(())));
        assert!(waiter.join().unwrap());
        assert_eq!(eventfd.read().unwrap(), 1);
        assert!(sink.has_results());
        let mut tokens = Vec::new();
        sink.take(&mut |t, r| {
            assert!(matches!(r, RemoteResult::Io(Ok(()))));
            tokens.push(t)
        });
        assert_eq!(tokens, [3]);
        assert!(!sink.wait(Duration::from_millis(1)));
    }

    #[test]
    fn cdb_bytes_are_bounded() {
        assert!(CdbBytes::new(&[]).is_none());
        assert!(CdbBytes::new(&[0; 33]).is_none());
        assert_eq!(
            CdbBytes::new(&[0x12, 0, 0, 0, 36, 0]).unwrap().as_slice(),
            [0x12, 0, 0, 0, 36, 0]
        );
        let outcome = ScsiOutcome::new(2, &[0x70; 300], 5);
        assert_eq!(outcome.sense().len(), MAX_FORWARDED_SENSE);
    }
}
