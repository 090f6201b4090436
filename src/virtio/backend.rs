//! The vhost-user device: features, configuration space, and the queue
//! handler that hands each request to the SCSI target.

use std::io;
use std::os::unix::io::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, TryLockError};
use std::time::{Duration, Instant};

use log::{debug, warn};
use smallvec::SmallVec;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::{VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::answer::Answered;
use super::chain::{split_chain, GuestMem, WrittenRanges};
use super::config::ScsiConfig;
use super::control::handle_control;
use super::desc_walk::walk_chain;
use super::dirty_log::{DirtyLog, LogSwitch};
use super::events::EventHub;
use super::inflight::QueueIo;
use super::memory::check_memory_table;
use super::request::Sizes;
use super::request::{start_command, PendingCommand, RequestError, Started, SyncBarrier};
use super::tracking::Tracking;
use crate::scsi::lun::MAX_LUN;
use crate::scsi::Target;
use crate::storage::remote::{CompletionSink, RemoteResult};
use crate::storage::uring::{UringEngine, RING_ENTRIES};
use crate::storage::{IoEngine, SyncEngine};

/// Queue indexes (virtio 1.2 §5.6.2).
pub const CONTROL_QUEUE: usize = 0;
pub const EVENT_QUEUE: usize = 1;
pub const FIRST_REQUEST_QUEUE: usize = 2;

/// Request queues offered by default. QEMU's vhost-user-scsi-pci asks for
/// one per vCPU unless told otherwise, so offer enough for typical VMs; all
/// are served.
pub const DEFAULT_REQUEST_QUEUES: usize = 16;
/// Most request queues: vhost-user-backend maps queues to worker threads
/// with 64-bit masks, and two queues are control and event.
pub const MAX_REQUEST_QUEUES: usize = 62;
/// Most queues of any connection (control, event and request queues), e.g.
/// for sizing file descriptor needs: each has a kick and a call eventfd.
pub const NUM_QUEUES: usize = FIRST_REQUEST_QUEUE + MAX_REQUEST_QUEUES;

/// Chains returned to the used ring between two signals while a queue is
/// being served. Signalling once per available ring would leave a driver
/// that waits for the signal idle until the whole ring is served, and the
/// device idle while the driver then refills it: signalling every few
/// completions (when the driver asked for it) lets the two overlap. With 8,
/// 4k reads at queue depth 32 through the page cache run twice as fast as
/// with one signal per ring (docs/benchmarks.md); 4 and 16 did as well.
pub const SIGNAL_BATCH: usize = 8;

/// Most time one pass over a queue spends taking new requests before it
/// lets the worker thread go round its event loop (see `serve_queue`). A
/// request that has started runs to its end, so a queue is stopped at most
/// this long plus one request after the VMM asks.
pub const PASS_BUDGET: Duration = Duration::from_millis(10);

/// Largest virtqueue the driver may set up (virtio split ring maximum).
pub const MAX_QUEUE_SIZE: usize = 1024;

/// How the request queues are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOptions {
    /// Request queues offered (1..=MAX_REQUEST_QUEUES).
    pub request_queues: usize,
    /// Worker threads (1..=request_queues). Request queue i is served by
    /// thread i % threads; the control and event queues by thread 0.
    pub threads: usize,
    /// After a queue runs dry, keep polling it this long before sleeping
    /// on its eventfd (zero: never poll).
    pub poll: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            request_queues: DEFAULT_REQUEST_QUEUES,
            threads: 1,
            poll: Duration::ZERO,
        }
    }
}

impl QueueOptions {
    /// The queues each worker thread serves, by global queue index.
    fn thread_queues(&self) -> Vec<Vec<usize>> {
        let threads = self.threads.clamp(1, self.request_queues.max(1));
        let mut map = vec![Vec::new(); threads];
        map[0].extend([CONTROL_QUEUE, EVENT_QUEUE]);
        for i in 0..self.request_queues {
            map[i % threads].push(FIRST_REQUEST_QUEUE + i);
        }
        for queues in &mut map {
            queues.sort_unstable();
        }
        map
    }
}

pub struct ScsiBackend {
    target: Arc<Target>,
    options: QueueOptions,
    /// Global queue indexes served by each worker thread, ascending (the
    /// order in which vhost-user-backend hands a thread its vrings).
    thread_queues: Vec<Vec<usize>>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMem>>>,
    config: Mutex<ScsiConfig>,
    /// CDB and sense sizes, read per batch of requests without a lock.
    cdb_size: AtomicUsize,
    sense_size: AtomicUsize,
    /// One warning per connection for malformed requests; the rest go to
    /// debug so a guest cannot flood the host's log.
    warned_malformed: AtomicBool,
    engine: IoEngine,
    /// Per worker thread: the I/O of the request queues it serves.
    workers: Vec<Mutex<Worker>>,
    /// For each global queue index: the worker thread serving it and the
    /// queue's position among that thread's queues.
    queue_owner: Vec<(usize, usize)>,
    /// How long one pass over a queue takes new requests.
    pass_budget: Duration,
    /// Test hook: see [`ScsiBackend::set_before_enable_notification`].
    before_enable: Option<BeforeEnableHook>,
    /// Where events for the event queue are posted, if anywhere.
    events: Option<Arc<EventHub>>,
    /// The features the driver acknowledged (SET_FEATURES).
    acked_features: AtomicU64,
    /// The daemon is stopping ([`ScsiBackend::quiesce_then`]): passes end
    /// after the request they are on.
    stopping: AtomicBool,
    /// Per worker thread: the eventfd [`ScsiBackend::nudge_queues`] writes
    /// to have it look at its queues once they are live.
    nudges: Vec<Option<EventFd>>,
    /// Per queue: served and signalled once since the connection began.
    started: Vec<AtomicBool>,
    /// Per queue: its in-flight tracking (INFLIGHT_SHMFD), set by the
    /// handler when the VMM hands a region over.
    tracking: Vec<Arc<Tracking>>,
    /// The dirty log while the VMM migrates the guest
    /// ([`ScsiBackend::set_dirty_log`]).
    dirty_log: Arc<LogSwitch>,
}

/// What [`ScsiBackend::set_before_enable_notification`] installs.
type BeforeEnableHook = Box<dyn Fn(usize) + Send + Sync>;

/// A worker thread's I/O: per request queue it serves, its engine and
/// requests in flight (set up at the queue's first transfer), and the
/// eventfd the io_uring engines signal, which the thread's epoll loop
/// watches.
struct Worker {
    eventfd: Option<EventFd>,
    /// Indexed like the thread's queues.
    queues: Vec<Option<QueueIo>>,
    /// io_uring setup failed once: the thread's queues use the sync engine.
    ring_failed: bool,
}

impl Worker {
    /// Completes every transfer in flight on this thread's queues (before
    /// anything runs synchronously, and before a TMF is answered).
    fn drain(&mut self) {
        for io in self.queues.iter_mut().flatten() {
            if io.in_flight() > 0 {
                io.drain();
            }
        }
    }

    /// As [`Worker::drain`], for the engines' transfers only: requests on
    /// remote storage go on (a worker never waits for a network round
    /// trip before a command it runs synchronously).
    fn drain_local(&mut self) {
        for io in self.queues.iter_mut().flatten() {
            if io.in_flight() > 0 {
                io.drain_local();
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.queues.iter().flatten().map(QueueIo::in_flight).sum()
    }
}

/// What one pass over a queue works with.
struct Pass<'v> {
    queue: usize,
    vring: &'v VringRwLock,
    /// The guest memory the pass started in, mapped while it lasts.
    mem: Arc<GuestMem>,
    sizes: Sizes,
    /// When the pass stops taking requests (see [`PASS_BUDGET`]).
    deadline: Instant,
}

/// What a round of taking requests came to.
struct Round {
    end: RoundEnd,
    /// Chains taken from the available ring.
    popped: usize,
    /// Chains returned since the guest was last signalled.
    unsignalled: usize,
}

/// Whether a pass goes on after a round.
enum NextStep {
    /// Another round; `expecting_work`: something said requests are
    /// available (so a round that takes none means they cannot be read).
    Again {
        expecting_work: bool,
    },
    Stop,
}

/// Why a round of taking requests from a queue ended.
enum RoundEnd {
    /// The available ring is empty, or no more can be taken from it.
    Empty,
    /// The queue's engine cannot take another transfer.
    EngineFull,
    /// The pass used up its time budget.
    OutOfTime,
    /// The queue was stopped or disabled.
    Stopped,
}

impl ScsiBackend {
    pub fn new(target: Arc<Target>) -> ScsiBackend {
        ScsiBackend::with_options(target, QueueOptions::default())
    }

    pub fn with_options(target: Arc<Target>, options: QueueOptions) -> ScsiBackend {
        ScsiBackend::with_engine(target, options, IoEngine::Sync)
    }

    /// A backend whose READ and WRITE transfers use `engine` (the caller
    /// checked that it works here, see `storage::uring::probe`).
    pub fn with_engine(
        target: Arc<Target>,
        options: QueueOptions,
        engine: IoEngine,
    ) -> ScsiBackend {
        let options = QueueOptions {
            request_queues: options.request_queues.clamp(1, MAX_REQUEST_QUEUES),
            threads: options
                .threads
                .clamp(1, options.request_queues.clamp(1, MAX_REQUEST_QUEUES)),
            poll: options.poll,
        };
        let sizes = Sizes::default();
        let config = ScsiConfig {
            num_request_queues: options.request_queues as u32,
            // Linux uses seg_max as its scatter-gather table size.
            seg_max: 254,
            max_sectors: 0xffff,
            cmd_per_lun: 128,
            sizes,
            max_target: 0,
            max_lun: u32::from(MAX_LUN),
        };
        let thread_queues = options.thread_queues();
        let mut queue_owner = vec![(0, 0); FIRST_REQUEST_QUEUE + options.request_queues];
        for (thread, queues) in thread_queues.iter().enumerate() {
            for (pos, &queue) in queues.iter().enumerate() {
                queue_owner[queue] = (thread, pos);
            }
        }
        let workers = thread_queues
            .iter()
            .map(|queues| {
                // Signalled by the io_uring engines and by remote storage.
                let eventfd = match EventFd::new(EFD_NONBLOCK) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        warn!("cannot create a completion eventfd ({e}): using the sync engine, remote storage answered at the next kick");
                        None
                    }
                };
                Mutex::new(Worker {
                    eventfd,
                    queues: queues.iter().map(|_| None).collect(),
                    ring_failed: false,
                })
            })
            .collect();
        ScsiBackend {
            target,
            options,
            thread_queues,
            engine,
            workers,
            queue_owner,
            mem: RwLock::new(None),
            config: Mutex::new(config),
            cdb_size: AtomicUsize::new(sizes.cdb),
            sense_size: AtomicUsize::new(sizes.sense),
            warned_malformed: AtomicBool::new(false),
            pass_budget: PASS_BUDGET,
            before_enable: None,
            events: None,
            acked_features: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            nudges: (0..options.threads)
                .map(|_| match EventFd::new(EFD_NONBLOCK) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        warn!("cannot create a worker's start eventfd ({e}): its queues wait for a kick");
                        None
                    }
                })
                .collect(),
            started: (0..FIRST_REQUEST_QUEUE + options.request_queues)
                .map(|_| AtomicBool::new(false))
                .collect(),
            tracking: (0..FIRST_REQUEST_QUEUE + options.request_queues)
                .map(|_| Arc::default())
                .collect(),
            dirty_log: Arc::default(),
        }
    }

    /// The SCSI target the queues serve.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Queue `queue`'s in-flight tracking.
    pub fn tracking(&self, queue: usize) -> Option<&Arc<Tracking>> {
        self.tracking.get(queue)
    }

    /// The global queue indexes each worker thread serves, ascending.
    pub fn thread_queues(&self) -> &[Vec<usize>] {
        &self.thread_queues
    }

    /// The worker thread serving queue `queue`, and the queue's position
    /// among that thread's queues.
    pub fn queue_owner(&self, queue: usize) -> Option<(usize, usize)> {
        self.queue_owner.get(queue).copied()
    }

    /// Logs every guest page the daemon writes into `log` from now on
    /// (`Some`), or stops logging (`None`). For the vhost-user handler:
    /// `Some` once the VMM has sent SET_LOG_BASE and acknowledged
    /// VHOST_F_LOG_ALL, `None` when it drops LOG_ALL (or the connection
    /// ends). Takes effect at the next write of every worker thread;
    /// requests in flight are marked when they complete.
    /// Returns the log it replaces, if any (see
    /// [`super::dirty_log::wait_until_unused`]).
    pub fn set_dirty_log(&self, log: Option<Arc<DirtyLog>>) -> Option<Arc<DirtyLog>> {
        self.dirty_log.set(log)
    }

    /// The dirty log in force, if any.
    pub fn dirty_log(&self) -> Option<Arc<DirtyLog>> {
        self.dirty_log.get()
    }

    /// The eventfd and event id worker thread `thread`'s epoll loop watches
    /// for [`ScsiBackend::nudge_queues`].
    pub fn nudge_listener(&self, thread: usize) -> Option<(RawFd, u64)> {
        let fd = self.nudges.get(thread)?.as_ref()?.as_raw_fd();
        Some((fd, self.nudge_event()))
    }

    fn nudge_event(&self) -> u64 {
        self.num_queues() as u64 + 3
    }

    /// Has every worker thread look at its queues: each queue live now and
    /// not yet started in this connection is served once — requests the
    /// driver made available before this daemon took over (a restart) wait
    /// for no kick — and its guest signalled once, as libvhost-user does
    /// after a reconnect (a used entry whose interrupt the daemon before
    /// did not send is seen). Called a few times after the VMM connects,
    /// since the queues are set up after the connection.
    pub fn nudge_queues(&self) {
        for fd in self.nudges.iter().flatten() {
            if let Err(e) = fd.write(1) {
                debug!("cannot nudge a worker thread: {e}");
            }
        }
    }

    /// The nudge of thread `thread`: serves and signals, once per
    /// connection, each of its queues that is live.
    fn start_queues(&self, vrings: &[VringRwLock], thread: usize) {
        if let Some(Some(fd)) = self.nudges.get(thread) {
            let _ = fd.read();
        }
        let Some(queues) = self.thread_queues.get(thread) else {
            return;
        };
        for (local, (vring, &queue)) in vrings.iter().zip(queues).enumerate() {
            if !Self::is_live(vring) || self.started[queue].load(Ordering::Acquire) {
                continue;
            }
            // Only a queue the daemon can use (a refused one is told
            // nothing, as when it is kicked; the next nudge looks again).
            if self.usable_memory(queue, vring).is_none() {
                continue;
            }
            self.started[queue].store(true, Ordering::Release);
            if let Err(e) = vring.signal_used_queue() {
                debug!("cannot signal queue {queue}: {e}");
            }
            // Served as a kick would have it.
            let Ok(local) = u16::try_from(local) else {
                continue;
            };
            if let Err(e) = self.dispatch_event(local, EventSet::IN, vrings, thread) {
                debug!("queue {queue}: {e}");
            }
        }
    }

    /// For a daemon about to exit (SIGTERM, an upgrade): waits, up to
    /// `timeout`, until every worker thread is between passes and holds it
    /// there; completes every transfer in flight (waiting for the storage
    /// as long as it takes: the caller bounds the whole), its chain
    /// returned to the used ring and the guest signalled; then calls `then`
    /// with every worker still held (`true`) — the process exits meanwhile. The used
    /// index the VMM reads back after the disconnect then counts every
    /// request the daemon took, so the next daemon, resuming from it,
    /// neither repeats nor loses one. A worker not free in time (storage
    /// that hangs) is left as it is: `then` is called with `false`.
    pub fn quiesce_then(&self, timeout: Duration, then: impl FnOnce(bool)) {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        let mut held = Vec::with_capacity(self.workers.len());
        let mut all = true;
        for worker in &self.workers {
            let guard = loop {
                match worker.try_lock() {
                    Ok(guard) => break Some(guard),
                    Err(TryLockError::Poisoned(e)) => break Some(e.into_inner()),
                    Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                        // A pass ends within its budget (10 ms) once it sees
                        // `stopping`: a short sleep, not a spin.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(TryLockError::WouldBlock) => break None,
                }
            };
            match guard {
                Some(mut guard) => {
                    for io in guard.queues.iter_mut().flatten() {
                        // False: the engine failed, its requests unanswered.
                        all &= io.drain();
                    }
                    held.push(guard);
                }
                None => all = false,
            }
        }
        // Events are written whole under the hub's lock; none is half
        // written while it is held.
        let _events = self.events.as_ref().map(|hub| hub.hold());
        then(all);
    }

    /// Delivers the events posted to `hub` on the event queue (the
    /// caller registers [`ScsiBackend::event_listener`] with thread 0).
    pub fn set_event_hub(&mut self, hub: Arc<EventHub>) {
        self.events = Some(hub);
    }

    /// The descriptor and event id worker thread 0 (the event queue's)
    /// watches for posted events, if a hub is set.
    pub fn event_listener(&self) -> Option<(RawFd, u64)> {
        Some((self.events.as_ref()?.wake_fd(), self.event_hub_event()))
    }

    fn event_hub_event(&self) -> u64 {
        self.num_queues() as u64 + 2
    }

    /// Writes the events waiting in the hub into the event queue's
    /// buffers, if this thread (`thread`, with `vrings`) serves it.
    fn deliver_events(&self, vrings: &[VringRwLock], thread: usize) {
        let Some(hub) = &self.events else {
            return;
        };
        let (owner, pos) = self.queue_owner[EVENT_QUEUE];
        let Some(vring) = vrings.get(pos).filter(|_| owner == thread) else {
            return;
        };
        let Some(mem) = self.usable_memory(EVENT_QUEUE, vring) else {
            return;
        };
        let delivery = hub.deliver(
            vring,
            &mem,
            self.acked_features.load(Ordering::Acquire),
            &self.dirty_log,
        );
        if delivery.written > 0 {
            debug!("{} event(s) written to the event queue", delivery.written);
        }
        if delivery.unfinished {
            // The rest after the thread's other events, as a request queue
            // whose pass ran out of time.
            Self::kick_again(vring);
        }
    }

    /// Bounds passes over a queue by `budget` instead of [`PASS_BUDGET`]
    /// (for tests of the bound).
    pub fn set_pass_budget(&mut self, budget: Duration) {
        self.pass_budget = budget;
    }

    /// For tests of the re-check after notifications are re-enabled:
    /// `hook(queue)` runs each time a round of `queue` found nothing more
    /// to take and notifications are about to be re-enabled — the moment
    /// where a request the driver makes available is seen neither by the
    /// pop loop nor as a kick (notifications are still off, so the driver
    /// need not kick), and only the re-check after `enable_notification`
    /// serves it (virtio 1.2 §2.7.10). A test's hook makes a request
    /// available there. Not used by the daemon.
    pub fn set_before_enable_notification(&mut self, hook: impl Fn(usize) + Send + Sync + 'static) {
        self.before_enable = Some(Box::new(hook));
    }

    pub fn options(&self) -> QueueOptions {
        self.options
    }

    /// `size` bytes of the virtio-scsi configuration space at `offset`
    /// (virtio 1.2 §5.6.4); empty if out of range. Not reachable over
    /// vhost-user (see `get_config`): QEMU answers the guest from its own.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(offset, size)
    }

    /// Writes the driver-writable fields of the configuration space
    /// (cdb_size, sense_size), which then size requests and responses.
    pub fn write_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let mut config = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        config.write(offset, buf).map_err(|e| {
            debug!("refused config write: {e}");
            io::Error::new(io::ErrorKind::InvalidInput, e)
        })?;
        self.cdb_size.store(config.sizes.cdb, Ordering::Relaxed);
        self.sense_size.store(config.sizes.sense, Ordering::Relaxed);
        Ok(())
    }

    fn sizes(&self) -> Sizes {
        Sizes {
            cdb: self.cdb_size.load(Ordering::Relaxed),
            sense: self.sense_size.load(Ordering::Relaxed),
        }
    }

    fn malformed(&self, queue: usize, what: &dyn std::fmt::Display) {
        if !self.warned_malformed.swap(true, Ordering::Relaxed) {
            warn!("queue {queue}: malformed request from the guest: {what} (further ones logged at debug level)");
        } else {
            debug!("queue {queue}: malformed request: {what}");
        }
    }

    /// Serves every available request on `vring`. A queue whose rings the
    /// guest broke (e.g. a used ring outside guest memory) is left alone
    /// until the next kick: returning the error would end the worker
    /// thread, and with it every queue it serves (virtio 1.2 §2.1.2 lets a
    /// device give up on such a queue; it never takes the daemon down).
    pub fn process_queue(&self, queue_index: usize, vring: &VringRwLock) {
        let result = self.serve_queue(queue_index, vring);
        // The pass enabled and disabled notifications: used ring flags or
        // avail_event written.
        self.dirty_log.with(|log| {
            let state = vring.get_ref();
            let queue = state.get_queue();
            log.mark_used_notification(queue.used_ring(), queue.size(), queue.event_idx_enabled());
        });
        if let Err(e) = result {
            self.malformed(queue_index, &format_args!("queue unusable: {e}"));
            // Transfers queued before the error still go to the kernel.
            let mut worker = self.worker_of(queue_index);
            if let Some(io) = self.io_of(&mut worker, queue_index) {
                io.push();
            }
        }
    }

    /// Serves the requests available on `vring`, re-checking after
    /// notifications are re-enabled so that no kick is lost (virtio 1.2
    /// §2.7.10 with VIRTIO_F_EVENT_IDX). With io_uring, READ and WRITE
    /// transfers are submitted and completed later (see `reap`); when the
    /// queue's ring is full, popping stops until completions free slots.
    ///
    /// A pass is bounded, whatever the guest queued: it ends when the queue
    /// is stopped (GET_VRING_BASE, SET_VRING_ENABLE 0) or cannot be read,
    /// and after [`ScsiBackend::pass_budget`] it stops taking requests and
    /// kicks the queue itself, so that the worker's lock comes free (the
    /// vhost-user thread needs it to stop a queue) and the thread's other
    /// queues and events are served before this one goes on.
    fn serve_queue(&self, queue_index: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.usable_memory(queue_index, vring) else {
            return Ok(());
        };
        let mut worker = self.worker_of(queue_index);
        if queue_index >= FIRST_REQUEST_QUEUE {
            self.set_up_io(&mut worker, queue_index, vring);
        }
        let pass = Pass {
            queue: queue_index,
            vring,
            mem,
            sizes: self.sizes(),
            deadline: Instant::now() + self.pass_budget,
        };
        // Whether the last round ended on word that requests were available
        // (enable_notification or polling said so).
        let mut expect_work = false;
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            let round = self.take_requests(&pass, &mut worker)?;
            let slots_freed = match self.io_of(&mut worker, queue_index) {
                Some(io) => {
                    io.push();
                    io.reap_inline() > 0
                }
                None => false,
            };
            if round.unsignalled > 0 {
                Self::signal_if_needed(vring, &pass.mem)?;
            }
            match self.next_step(&pass, &round, slots_freed, expect_work)? {
                NextStep::Stop => return Ok(()),
                NextStep::Again { expecting_work } => expect_work = expecting_work,
            }
        }
    }

    /// One round of a pass: pops available chains and answers each (or
    /// hands its transfer to the queue's ring) until the ring is full, the
    /// queue stops, the available ring is empty, or the pass's time is up.
    /// Returned chains go to the used ring, the guest signalled every
    /// [`SIGNAL_BATCH`] of them.
    fn take_requests(&self, pass: &Pass<'_>, worker: &mut Worker) -> io::Result<Round> {
        let (queue_index, vring, mem) = (pass.queue, pass.vring, &pass.mem);
        let mut round = Round {
            end: RoundEnd::Empty,
            popped: 0,
            unsignalled: 0,
        };
        round.end = loop {
            if let Some(io) = self.io_of(worker, queue_index) {
                io.stalled = io.is_full();
                if io.stalled {
                    break RoundEnd::EngineFull;
                }
            }
            if round.popped > 0 && Instant::now() >= pass.deadline {
                break RoundEnd::OutOfTime;
            }
            if self.stopping.load(Ordering::Relaxed) {
                break RoundEnd::Stopped;
            }
            let mut state = vring.get_mut();
            if !Self::state_is_live(&state) {
                break RoundEnd::Stopped;
            }
            let tracking = &self.tracking[queue_index];
            let size = state.get_queue().size();
            // A request a daemon before this one took and never completed
            // (the in-flight region says so) comes before anything new.
            if let Some(head) = tracking.next_resubmit() {
                let table = GuestAddress(state.get_queue().desc_table());
                drop(state);
                round.popped += 1;
                let chain = walk_chain(&**mem, table, size, head);
                let Some(used_len) =
                    self.run_chain(queue_index, head, chain, mem, pass.sizes, worker)
                else {
                    continue;
                };
                self.return_chain(pass, &mut round, head, used_len)?;
                continue;
            }
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&**mem) else {
                break RoundEnd::Empty;
            };
            round.popped += 1;
            let head = chain.head_index();
            // Unlocked while the request runs: draining transfers in
            // flight may return other chains of this queue.
            drop(state);
            if head >= size {
                // virtio 1.2 §2.7.6: an available ring entry is the head
                // of a chain, an index into the descriptor table. One past
                // the table names no chain and cannot be returned (§2.7.8:
                // a used element's id is the chain's head), so the entry is
                // dropped. Failing instead would end the worker thread, and
                // with it every queue it serves.
                self.malformed(
                    queue_index,
                    &format_args!("available ring names descriptor {head}, past the table"),
                );
                continue;
            }
            tracking.taken(queue_index, head);
            let Some(used_len) = self.run_chain(queue_index, head, chain, mem, pass.sizes, worker)
            else {
                // In flight: returned when its transfer completes.
                continue;
            };
            self.return_chain(pass, &mut round, head, used_len)?;
        };
        Ok(round)
    }

    /// Puts a chain answered during a round on the used ring, signalling
    /// the guest every [`SIGNAL_BATCH`] chains.
    fn return_chain(
        &self,
        pass: &Pass<'_>,
        round: &mut Round,
        head: u16,
        used_len: u32,
    ) -> io::Result<()> {
        {
            let mut state = pass.vring.get_mut();
            self.tracking[pass.queue]
                .add_used(&mut state, head, used_len)
                .map_err(io::Error::other)?;
            let queue = state.get_queue();
            self.dirty_log.with(|log| {
                log.mark_used(queue.used_ring(), queue.size(), queue.next_used());
            });
        }
        round.unsignalled += 1;
        if round.unsignalled == SIGNAL_BATCH {
            round.unsignalled = 0;
            Self::signal_if_needed(pass.vring, &pass.mem)?;
        }
        Ok(())
    }

    /// After a round (its chains returned and signalled): whether the pass
    /// goes on, re-checking for requests made available meanwhile with
    /// notifications re-enabled (virtio 1.2 §2.7.10), or ends.
    fn next_step(
        &self,
        pass: &Pass<'_>,
        round: &Round,
        slots_freed: bool,
        expect_work: bool,
    ) -> io::Result<NextStep> {
        let (queue_index, vring, mem) = (pass.queue, pass.vring, &*pass.mem);
        let enable = || vring.enable_notification().map_err(io::Error::other);
        match round.end {
            // Notifications stay off: reaping completions serves the queue
            // again.
            RoundEnd::EngineFull if slots_freed => {
                return Ok(NextStep::Again {
                    expecting_work: false,
                })
            }
            RoundEnd::EngineFull | RoundEnd::Stopped => return Ok(NextStep::Stop),
            RoundEnd::OutOfTime => {
                // With requests left (new ones, or ones to serve again),
                // notifications stay off and the kick brings the worker back
                // once its other events are handled.
                if self.tracking[queue_index].has_resubmits()
                    || Self::has_available(vring, mem)
                    || enable()?
                {
                    Self::kick_again(vring);
                }
                return Ok(NextStep::Stop);
            }
            RoundEnd::Empty if expect_work && round.popped == 0 => {
                // Requests are available, yet none can be taken: the
                // available ring is not readable (virtio-queue does not read
                // one at guest address 0, say). Another pass comes with the
                // next kick; spinning here would pin a host core and keep
                // the queue from ever being stopped.
                self.malformed(queue_index, &"available requests cannot be read");
                enable()?;
                return Ok(NextStep::Stop);
            }
            RoundEnd::Empty => {}
        }
        if Self::avail_index_broken(vring, mem) {
            // virtio 1.2 §2.7.6: the available ring holds queue-size
            // entries, so its index runs at most that far ahead of the
            // device. virtio-queue pops nothing from a ring whose index is
            // further ahead, yet the index keeps looking like new work: stop
            // until the driver puts it right (or resets the queue) instead
            // of spinning on it.
            self.malformed(
                queue_index,
                &"available index more than the queue size ahead",
            );
            enable()?;
            return Ok(NextStep::Stop);
        }
        // Optional busy polling, notifications still off: a guest that
        // submits again within the window is served without the
        // kick/eventfd round trip.
        if !self.options.poll.is_zero() && self.poll_for_work(vring, mem) {
            return Ok(NextStep::Again {
                expecting_work: true,
            });
        }
        if let Some(hook) = &self.before_enable {
            hook(queue_index);
        }
        Ok(if enable()? {
            NextStep::Again {
                expecting_work: true,
            }
        } else {
            NextStep::Stop
        })
    }

    /// The guest memory `queue_index` is served in, if the queue is ready
    /// and usable there. A queue whose descriptor table or rings are not
    /// all inside guest memory is not served at all: a request taken from
    /// it could be executed (a WRITE, say) but never returned, since its
    /// used ring cannot be written (virtio 1.2 §2.7: the driver places all
    /// three areas in memory it shares; §2.1.2 lets the device give up on a
    /// queue it cannot use). Nor is one whose available ring is at guest
    /// address 0, which virtio-queue refuses to read although virtio allows
    /// it (no Linux driver places a ring there).
    fn usable_memory(&self, queue_index: usize, vring: &VringRwLock) -> Option<Arc<GuestMem>> {
        let atomic_mem = self
            .mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let mem: Arc<GuestMem> = atomic_mem.memory().into_inner();
        let state = vring.get_ref();
        let queue = state.get_queue();
        if !Self::state_is_live(&state) {
            return None;
        }
        let problem = if !queue.is_valid(&*mem) {
            "descriptor table or rings outside guest memory"
        } else if queue.avail_ring() == 0 {
            "available ring at guest address 0, which is not served"
        } else {
            return Some(mem);
        };
        drop(state);
        self.malformed(queue_index, &problem);
        None
    }

    /// Executes one request chain (control or command); its used length,
    /// or None when its transfer is in flight and returns it on completion.
    /// An answered chain's writable ranges are marked in the dirty log
    /// (after they are written, before the caller puts the chain on the
    /// used ring); one in flight is marked when it completes.
    fn run_chain(
        &self,
        queue_index: usize,
        head: u16,
        chain: impl IntoIterator<Item = Descriptor>,
        mem: &Arc<GuestMem>,
        sizes: Sizes,
        worker: &mut Worker,
    ) -> Option<u32> {
        let mut split = match split_chain(mem, chain) {
            Ok(split) => split,
            Err(e) => {
                self.malformed(queue_index, &e);
                return Some(0);
            }
        };
        let written = std::mem::take(&mut split.written);
        if queue_index == CONTROL_QUEUE {
            worker.drain();
            let answered = handle_control(split, &self.target);
            self.dirty_log.with(|log| log.mark_ranges(&written));
            if let Some(e) = &answered.malformed {
                self.malformed(queue_index, e);
            }
            return Some(answered.used_len);
        }
        let started = start_command(split, &self.target, sizes, &mut |barrier| {
            // Anything run synchronously comes after every transfer this
            // thread has in flight: SYNCHRONIZE CACHE then covers them, and
            // no transfer of this thread is left holding up a COMPARE AND
            // WRITE. Requests on remote storage go on (SCSI's SIMPLE task
            // attribute lets them), except before COMPARE AND WRITE, which
            // waits for every request on its unit.
            if barrier == SyncBarrier::OwnThread {
                worker.drain_local();
            } else {
                worker.drain();
                // Nor one of a thread that is not serving now: its event
                // loop may have ended (a VMM can end it) with transfers in
                // flight that nobody would reap.
                self.drain_idle_workers();
            }
        });
        let answered = match started {
            Started::Done(answered) => answered,
            Started::Transfer(pending) => {
                self.start_transfer(queue_index, pending, head, &written, worker)?
            }
        };
        self.dirty_log.with(|log| log.mark_ranges(&written));
        if let Some(e) = &answered.malformed {
            self.malformed(queue_index, e);
        }
        Some(answered.used_len)
    }

    /// Makes the worker thread's epoll loop serve `vring` again, as a
    /// guest's kick would (an eventfd counter write).
    fn kick_again(vring: &VringRwLock) {
        let state = vring.get_ref();
        if let Some(kick) = state.get_kick() {
            // vmm-sys-util's EventConsumer offers no AsFd, only a raw
            // descriptor; it is borrowed, not owned (an EventFd made from it
            // would close the vring's kick fd when dropped).
            // SAFETY: the descriptor is the vring's kick eventfd, kept open
            // while `state` borrows the vring, and `fd` does not outlive
            // `state`.
            let fd = unsafe { BorrowedFd::borrow_raw(kick.as_raw_fd()) };
            // An eventfd write adds an 8-byte value to the counter, whole or
            // not at all (eventfd(2)).
            if let Err(e) = rustix::io::write(fd, &1u64.to_ne_bytes()) {
                debug!("cannot kick a queue again: {}", io::Error::from(e));
            }
        }
    }

    /// Hands a READ or WRITE over to the queue's engine: its answer if it
    /// was carried out at once, `None` if it is in flight. The transfer
    /// holds access to its unit until its result is in; only while COMPARE
    /// AND WRITE holds the unit does the thread complete its own transfers
    /// in flight first and wait (a thread blocked with transfers in flight
    /// would hold the COMPARE AND WRITE up for good).
    #[inline]
    fn start_transfer(
        &self,
        queue_index: usize,
        mut pending: PendingCommand<'_>,
        head: u16,
        written: &WrittenRanges,
        worker: &mut Worker,
    ) -> Option<Answered<RequestError>> {
        let access = match pending.unit.try_transfer_access() {
            Some(access) => access,
            None => {
                worker.drain();
                pending.unit.wait_transfer_access()
            }
        };
        match self.io_of(worker, queue_index) {
            Some(io) => io.start(pending, access, head, written),
            None => {
                // Not a request queue of this thread (cannot happen: the
                // pass set its I/O up); answered synchronously all the same.
                let (storage, request) = pending.request();
                let result = match request {
                    Some(request) => crate::storage::engine::run_sync(&**storage, request),
                    None => Err(io::Error::other("no I/O set up for the queue")),
                };
                drop(access);
                Some(pending.answer(RemoteResult::Io(result)))
            }
        }
    }

    /// Completes the transfers in flight of every worker thread not busy
    /// serving (its lock free); a busy one completes its own.
    fn drain_idle_workers(&self) {
        for worker in &self.workers {
            let guard = match worker.try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut worker) = guard {
                worker.drain();
            }
        }
    }

    /// The io_uring state of the worker thread serving `queue`.
    fn worker_of(&self, queue: usize) -> MutexGuard<'_, Worker> {
        let thread = self.queue_owner.get(queue).map_or(0, |&(t, _)| t);
        self.workers[thread.min(self.workers.len() - 1)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn io_of<'w>(&self, worker: &'w mut Worker, queue: usize) -> Option<&'w mut QueueIo> {
        let &(_, pos) = self.queue_owner.get(queue)?;
        worker.queues.get_mut(pos)?.as_mut()
    }

    /// Sets up the I/O of request queue `queue` at its first pass: the
    /// io_uring engine if the backend uses it and a ring can be set up
    /// here, else the sync engine.
    fn set_up_io(&self, worker: &mut Worker, queue: usize, vring: &VringRwLock) {
        let Some(&(_, pos)) = self.queue_owner.get(queue) else {
            return;
        };
        let eventfd = worker.eventfd.as_ref().map(AsRawFd::as_raw_fd);
        let completion_fd = worker.eventfd.as_ref();
        let ring_failed = &mut worker.ring_failed;
        let Some(entry) = worker.queues.get_mut(pos) else {
            return;
        };
        if entry.is_some() {
            return;
        }
        // Remote backends signal the same eventfd, through a duplicate
        // their sink owns.
        let remote = CompletionSink::new(completion_fd.and_then(|fd| {
            fd.try_clone()
                .map_err(|e| warn!("queue {queue}: cannot duplicate the completion eventfd ({e}): remote storage answers at the next kick"))
                .ok()
        }));
        let uring = match eventfd {
            Some(eventfd) if self.engine == IoEngine::IoUring && !*ring_failed => {
                match UringEngine::new(eventfd) {
                    Ok(engine) => Some(engine),
                    Err(e) => {
                        warn!("queue {queue}: cannot set up an io_uring ({e}); this thread's queues use the sync engine");
                        *ring_failed = true;
                        None
                    }
                }
            }
            _ => None,
        };
        *entry = Some(match uring {
            Some(engine) => QueueIo::new(
                Box::new(engine),
                remote,
                RING_ENTRIES as u16,
                vring.clone(),
                self.tracking[queue].clone(),
                self.dirty_log.clone(),
            ),
            // The sync engine answers in the call; the slots are for
            // requests on remote storage.
            None => QueueIo::new(
                Box::new(SyncEngine),
                remote,
                RING_ENTRIES as u16,
                vring.clone(),
                self.tracking[queue].clone(),
                self.dirty_log.clone(),
            ),
        });
    }

    /// The eventfd worker thread `thread`'s rings signal, and the event
    /// id to register it under with the thread's epoll loop (past the
    /// queue and exit-event ids vhost-user-backend reserves).
    pub fn completion_listener(&self, thread: usize) -> Option<(RawFd, u64)> {
        let worker = self
            .workers
            .get(thread)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let fd = worker.eventfd.as_ref()?.as_raw_fd();
        Some((fd, self.completion_event()))
    }

    fn completion_event(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    /// Completes what has arrived on the rings of thread `thread`, then
    /// serves their queues again (popping stops while a ring is full).
    /// While completions keep arriving meanwhile, goes round again (a few
    /// times at most, so other events are not starved): each round saves
    /// an epoll wake-up.
    fn reap(&self, vrings: &[VringRwLock], thread: usize) {
        const ROUNDS: usize = 8;
        let Some(worker) = self.workers.get(thread) else {
            return;
        };
        let queues = self
            .thread_queues
            .get(thread)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for _ in 0..ROUNDS {
            let mut guard = worker.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(eventfd) = &guard.eventfd {
                // Consumed before reaping: a completion posted later
                // signals again.
                let _ = eventfd.read();
            }
            let mut again: u64 = 0;
            for (pos, io) in guard.queues.iter_mut().enumerate() {
                if let Some(io) = io {
                    // A stalled queue is served again even if its slots
                    // were freed by a drain elsewhere on this thread.
                    if io.reap() > 0 || (io.stalled && !io.is_full()) {
                        again |= 1 << pos;
                    }
                }
            }
            drop(guard);
            if again == 0 {
                return;
            }
            for (pos, (vring, &queue)) in vrings.iter().zip(queues).enumerate() {
                if again & (1 << pos) != 0 && Self::is_live(vring) {
                    self.process_queue(queue, vring);
                }
            }
            let mut guard = worker.lock().unwrap_or_else(PoisonError::into_inner);
            if !guard
                .queues
                .iter_mut()
                .flatten()
                .any(QueueIo::has_completions)
            {
                return;
            }
        }
    }

    /// Serves every request available on thread `thread`'s request queues
    /// (`vrings` are the thread's vrings) when called, and waits until each
    /// has completed, transfers in flight included: what a TMF does before
    /// it is answered. Requests made available later are not waited for,
    /// nor are those of a queue that is stopped or cannot be read, so this
    /// ends whatever the guest does. Public for tests that drive the
    /// backend without its epoll loop.
    pub fn complete_transfers(&self, vrings: &[VringRwLock], thread: usize) {
        let queues = self
            .thread_queues
            .get(thread)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mem = self.memory_now();
        // Per queue: how far the available index was when called (inline:
        // a thread has at most NUM_QUEUES queues).
        let targets: SmallVec<[Option<u16>; NUM_QUEUES]> = vrings
            .iter()
            .map(|vring| {
                let state = vring.get_ref();
                let mem = mem.as_deref()?;
                let avail = state.get_queue().avail_idx(mem, Ordering::Acquire).ok()?;
                Some(avail.0)
            })
            .collect();
        loop {
            // Whether a queue took requests and has more to take.
            let mut more = false;
            for ((vring, &queue), target) in vrings.iter().zip(queues).zip(&targets) {
                if queue < FIRST_REQUEST_QUEUE || !Self::is_live(vring) {
                    continue;
                }
                let before = vring.get_ref().get_queue().next_avail();
                self.process_queue(queue, vring);
                let state = vring.get_ref();
                let queue = state.get_queue();
                let after = queue.next_avail();
                // Taken up to the target, or an index that moved backwards
                // or too far (a broken ring): nothing more to wait for.
                let left = target.map_or(1, |t| t.wrapping_sub(after));
                more |= after != before && left != 0 && left <= queue.size();
            }
            let Some(worker) = self.workers.get(thread) else {
                return;
            };
            let mut worker = worker.lock().unwrap_or_else(PoisonError::into_inner);
            if worker.in_flight() == 0 && !more {
                return;
            }
            // A full ring stopped popping: serve the queues again once
            // the transfers are done.
            worker.drain();
        }
    }

    /// Transfers in flight on thread `thread`'s queues.
    pub fn transfers_in_flight(&self, thread: usize) -> usize {
        self.workers.get(thread).map_or(0, |w| {
            w.lock().unwrap_or_else(PoisonError::into_inner).in_flight()
        })
    }

    /// The most transfers any one queue has had in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.workers
            .iter()
            .flat_map(|w| {
                let w = w.lock().unwrap_or_else(PoisonError::into_inner);
                w.queues.iter().flatten().map(QueueIo::peak).max()
            })
            .max()
            .unwrap_or(0)
    }

    /// The engine READ and WRITE transfers use.
    pub fn engine(&self) -> IoEngine {
        self.engine
    }

    /// Signals the guest that chains were returned, if it asked to hear
    /// about them at this point of the used ring (virtio 1.2 §2.7.10 with
    /// VIRTIO_F_EVENT_IDX; §2.7.7 without).
    fn signal_if_needed(vring: &VringRwLock, mem: &GuestMem) -> io::Result<()> {
        let needs = vring
            .get_mut()
            .get_queue_mut()
            .needs_notification(mem)
            .map_err(io::Error::other)?;
        if needs {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Whether the driver's available index is more than a queue size
    /// ahead of the device's (an unreadable index is left to the calls that
    /// report it).
    fn avail_index_broken(vring: &VringRwLock, mem: &GuestMem) -> bool {
        let state = vring.get_ref();
        let queue = state.get_queue();
        queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|avail| avail.0.wrapping_sub(queue.next_avail()) > queue.size())
    }

    /// Whether the driver has made requests available on `vring`, in the
    /// guest memory of the moment (none without a memory table).
    fn has_requests(&self, vring: &VringRwLock) -> bool {
        self.memory_now()
            .is_some_and(|mem| Self::has_available(vring, &mem))
    }

    /// The guest memory of the moment, if the VMM sent a memory table.
    fn memory_now(&self) -> Option<Arc<GuestMem>> {
        self.mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|m| m.memory().into_inner())
    }

    /// Whether the driver has made requests available that the device has
    /// not taken (an unreadable index counts as none).
    fn has_available(vring: &VringRwLock, mem: &GuestMem) -> bool {
        let state = vring.get_ref();
        let queue = state.get_queue();
        queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|avail| avail.0 != queue.next_avail())
    }

    /// Spins until the driver makes a new request available or the polling
    /// window ends; true if there is work.
    fn poll_for_work(&self, vring: &VringRwLock, mem: &GuestMem) -> bool {
        let deadline = Instant::now() + self.options.poll;
        loop {
            if Self::has_available(vring, mem) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}

impl VhostUserBackend for ScsiBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        FIRST_REQUEST_QUEUE + self.options.request_queues
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.thread_queues
            .iter()
            .map(|queues| queues.iter().fold(0u64, |mask, &q| mask | (1 << q)))
            .collect()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // VIRTIO_SCSI_F_HOTPLUG and _CHANGE: LUNs added and removed, and
        // capacity changes, are reported on the event queue (events.rs).
        // QEMU offers them to the guest whatever the backend says unless
        // the device has hotplug=off / param_change=off.
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_SCSI_F_HOTPLUG)
            | (1 << VIRTIO_SCSI_F_CHANGE)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Live migration: writes into guest memory are logged while the
            // VMM asks (handler.rs, dirty_log.rs).
            | (1 << super::handler::VHOST_F_LOG_ALL)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: QEMU's vhost-user-scsi-pci builds the configuration
        // space itself and warns at every start when a backend offers it.
        //
        // The vhost crate records whatever SET_PROTOCOL_FEATURES acks, so a
        // VMM can reach the handlers of features never offered. What they
        // could do here is refused: GET_CONFIG and SET_CONFIG below, and a
        // memory table of more regions than SET_MEM_TABLE carries (ADD_MEM_REG,
        // `check_memory_table`); the handler (handler.rs) refuses device
        // state transfers, postcopy and back-end requests. RESET_DEVICE
        // only does what SET_VRING_ENABLE and RESET_OWNER, always allowed,
        // do. INFLIGHT_SHMFD (restart without losing requests) and
        // LOG_SHMFD (live migration) are handled by handler.rs.
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves; process_queue uses the
        // same code path either way.
    }

    /// GET_CONFIG needs VHOST_USER_PROTOCOL_F_CONFIG, never offered: an
    /// empty answer, which the vhost crate sends as a failure (a payload of
    /// size 0).
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        debug!("refused GET_CONFIG of {size} bytes at {offset}: CONFIG was not offered");
        Vec::new()
    }

    /// SET_CONFIG needs VHOST_USER_PROTOCOL_F_CONFIG, never offered.
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        debug!(
            "refused SET_CONFIG of {} bytes at {offset}: CONFIG was not offered",
            buf.len()
        );
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "VHOST_USER_PROTOCOL_F_CONFIG was not offered",
        ))
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // vhost-user GET_VRING_BASE: the queue stops, and the index returned
        // must account for every request taken from it. Transfers in flight
        // are completed first (to the used ring, as the guest expects).
        let queue = queue_index as usize;
        let mut worker = self.worker_of(queue);
        if queue >= FIRST_REQUEST_QUEUE {
            if let Some(io) = self.io_of(&mut worker, queue) {
                io.drain();
            }
        }
        // The control queue is served under its worker's lock, now taken:
        // a control request being answered is on the used ring. Events
        // are written under the hub's lock: one being delivered is too.
        // The queue is stopped (not ready) already, so neither takes
        // another chain.
        drop(worker);
        if queue == EVENT_QUEUE {
            drop(self.events.as_ref().map(|hub| hub.hold()));
        }
        Ok(())
    }

    fn reset_device(&self) {
        for worker in &self.workers {
            worker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain();
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // A region past the end of its file would raise SIGBUS at the first
        // access beyond it: unmap the table before a queue uses it and fail
        // the request (vhost-user-backend then ends the connection).
        if let Err(e) = check_memory_table(&mem.memory()) {
            mem.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .replace(GuestMem::new());
            *self.mem.write().unwrap_or_else(PoisonError::into_inner) = None;
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
        }
        // Transfers in flight keep the memory they were started in mapped
        // (each holds an Arc of it), so a new memory table needs no wait.
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the worker thread could never be stopped
        // when the connection ends.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create the worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let result = self.dispatch_event(device_event, evset, vrings, thread_id);
        if result.is_err() {
            // vhost-user-backend ends this thread's event loop: nobody would
            // reap its transfers in flight, and a COMPARE AND WRITE on
            // another thread would wait for them for ever.
            if let Some(worker) = self.workers.get(thread_id) {
                worker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .drain();
            }
        }
        result
    }
}

impl ScsiBackend {
    /// Handles one event of worker thread `thread_id`'s epoll loop.
    fn dispatch_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        if u64::from(device_event) == self.completion_event() {
            self.reap(vrings, thread_id);
            return Ok(());
        }
        if u64::from(device_event) == self.nudge_event() {
            self.start_queues(vrings, thread_id);
            return Ok(());
        }
        if u64::from(device_event) == self.event_hub_event() {
            if let Some(hub) = &self.events {
                hub.consume_wake();
            }
            self.deliver_events(vrings, thread_id);
            return Ok(());
        }
        // `device_event` indexes this thread's vrings; map it to the
        // queue's global index.
        let local = usize::from(device_event);
        let (Some(vring), Some(&index)) = (
            vrings.get(local),
            self.thread_queues
                .get(thread_id)
                .and_then(|queues| queues.get(local)),
        ) else {
            return Err(io::Error::other(format!(
                "event {local} for unknown queue of thread {thread_id}"
            )));
        };
        match index {
            // The driver posted event buffers (virtio 1.2 §5.6.6.3):
            // events waiting for one go out now.
            EVENT_QUEUE => {
                self.deliver_events(vrings, thread_id);
                Ok(())
            }
            CONTROL_QUEUE => {
                // Before answering a task management function, complete
                // every request this thread's queues hold: a command the
                // driver submitted before its TMF is then never left in the
                // task set, so "FUNCTION COMPLETE" is true (see control.rs).
                // With io_uring, "complete" includes the transfers (and
                // flushes) in flight: they are waited for. Only when a
                // control request is there: a kick with none (a driver
                // setting the queue up, say) waits for nothing. One made
                // available after this check comes with a kick of its own
                // (virtio 1.2 §2.7.13: the driver notifies after it
                // updates the available index).
                if self.has_requests(vring) {
                    self.complete_transfers(vrings, thread_id);
                    self.process_queue(CONTROL_QUEUE, vring);
                }
                Ok(())
            }
            _ => {
                self.process_queue(index, vring);
                Ok(())
            }
        }
    }
}

impl ScsiBackend {
    /// Whether the driver has set the queue up and enabled it.
    fn is_live(vring: &VringRwLock) -> bool {
        Self::state_is_live(&vring.get_ref())
    }

    /// As [`ScsiBackend::is_live`], for a vring whose state is held.
    fn state_is_live(state: &VringState) -> bool {
        state.get_queue().ready() && state.is_enabled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(request_queues: usize, threads: usize) -> ScsiBackend {
        ScsiBackend::with_options(
            Arc::new(Target::default()),
            QueueOptions {
                request_queues,
                threads,
                poll: Duration::ZERO,
            },
        )
    }

    #[test]
    fn queues_are_spread_over_threads() {
        let b = backend(5, 2);
        assert_eq!(b.num_queues(), 7);
        assert_eq!(b.thread_queues, vec![vec![0, 1, 2, 4, 6], vec![3, 5]]);
        assert_eq!(b.queues_per_thread(), vec![0b101_0111, 0b010_1000]);
        // Every queue is served by exactly one thread.
        let all = b.queues_per_thread().iter().fold(0u64, |acc, m| {
            assert_eq!(acc & m, 0);
            acc | m
        });
        assert_eq!(all, (1 << 7) - 1);
    }

    #[test]
    fn options_are_clamped() {
        let b = backend(100, 100);
        assert_eq!(b.options().request_queues, MAX_REQUEST_QUEUES);
        assert_eq!(b.options().threads, MAX_REQUEST_QUEUES);
        assert_eq!(b.queues_per_thread().len(), MAX_REQUEST_QUEUES);
        let b = backend(0, 0);
        assert_eq!((b.options().request_queues, b.options().threads), (1, 1));
        assert_eq!(b.queues_per_thread(), vec![0b111]);
    }

    #[test]
    fn default_is_one_thread_for_sixteen_queues() {
        let b = ScsiBackend::new(Arc::new(Target::default()));
        assert_eq!(b.num_queues(), 18);
        assert_eq!(b.queues_per_thread(), vec![(1 << 18) - 1]);
    }
}
