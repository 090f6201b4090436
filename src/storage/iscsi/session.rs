//! The session thread: one per remote logical unit, the only thread that
//! calls libiscsi for it (a context is not thread-safe). It owns the
//! `iscsi_context`, logs in (and in again after a drop, with a backoff),
//! and runs a poll loop on the context's socket and an eventfd that
//! [`Session::submit`] writes after queueing a command under a mutex.
//!
//! Every command completes exactly once, and only when libiscsi holds no
//! reference to its memory any more:
//! - from its own callback (a response: GOOD, CHECK CONDITION, ...). The
//!   callback does not mean libiscsi is done with the task: 1.19 frees
//!   only the command PDU at a response (`iscsi_process_pdu`, lib/pdu.c),
//!   not the DATA-OUT PDUs it queued for the task (at an R2T, or
//!   unsolicited), which point at the task and read its `iovector_out`
//!   when written (`iscsi_write_to_socket`, lib/socket.c). A target may
//!   answer before it has all the data (an R2T and at once a CHECK
//!   CONDITION). So a write task is freed at its response only if
//!   libiscsi's output side is idle then (nothing queued, nothing half
//!   sent: the common case); otherwise it is retired: its `iovector_out`
//!   is pointed at zeros of the same length, the command completes at
//!   once (the guest's memory and the iovec list dropped), and the task
//!   is freed once the output side is idle, or a command issued after it
//!   was retired has been answered (libiscsi writes its output queue in
//!   order, and keeps it sorted by CmdSN: a later command's PDU goes
//!   behind the retired task's DATA-OUT, which has its command's CmdSN —
//!   `iscsi_add_to_outqueue`, lib/socket.c — so the target cannot have
//!   seen the later command before that DATA-OUT was all written; under
//!   sustained load the queue may never be idle), or the context is
//!   destroyed.
//!   Whatever of it is still sent goes to a command the target has
//!   finished; a read task's memory is looked up through its command PDU
//!   for each DATA-IN (`iscsi_get_scsi_task_iovector_in`), so nothing
//!   refers to it after the response;
//! - a command that libiscsi cancelled (callback `SCSI_STATUS_CANCELLED`:
//!   a task management function, or the session dropping) is kept until
//!   libiscsi's output queue is empty — a DATA-OUT PDU of the task still
//!   queued reads its memory when sent — or the context is destroyed;
//! - when the context is destroyed (the session dropped, a command timed
//!   out, the unit closed): `iscsi_destroy_context` frees every PDU, after
//!   which nothing refers to any command's memory.
//!
//! A dropped session is not resumed by libiscsi (`iscsi_set_noautoreconnect`):
//! 1.19's automatic reconnect (`iscsi_reconnect`, lib/connect.c) re-sends
//! the old session's command PDUs on the new one, but keeps them in a copy
//! of the old context meanwhile, where `iscsi_scsi_cancel_task` and
//! timeouts cannot reach them; a command could then not be timed out
//! during an outage. So the commands in flight at a drop complete with
//! `ConnectionReset` (retryable), commands not yet sent wait for the new
//! session up to their deadline, and the thread logs in again itself.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_void, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ffi::{self, IscsiContext, Libiscsi, ScsiTask};
use crate::storage::remote::{
    CdbBytes, DataDirection, RemoteCompletion, RemoteResult, ScsiOutcome, TaskManagement,
    TaskManagementResponse,
};
use crate::storage::PinnedBufs;

/// What the session needs to log in.
pub(super) struct SessionConfig {
    /// The redacted URI, for log lines.
    pub label: String,
    /// Numeric `ADDRESS:PORT` (`[V6]:PORT`): resolved once at open.
    pub portal: CString,
    pub target: CString,
    pub lun: u16,
    pub initiator: CString,
    pub chap: Option<(CString, CString)>,
    pub header_digest: c_int,
    pub timeout: Duration,
    /// The ISID's random part (24 bits) and qualifier (16 bits), the same
    /// for every login of the unit: a login after a drop then reinstates
    /// the session (RFC 7143 §6.3.5), so the target ends what the old
    /// session left running instead of keeping it beside the new one.
    pub isid: (u32, u32),
}

/// A command's data buffer.
pub(super) enum Data {
    /// The guest's pinned memory.
    Pinned(PinnedBufs),
    /// The backend's own (READ CAPACITY at open).
    Owned(Vec<u8>),
}

impl Data {
    fn iovecs(&mut self, len: usize) -> Vec<libc::iovec> {
        let mut out = Vec::new();
        let mut left = len;
        let mut push = |base: *mut c_void, n: usize| {
            if left > 0 && n > 0 {
                let n = n.min(left);
                out.push(libc::iovec {
                    iov_base: base,
                    iov_len: n,
                });
                left -= n;
            }
        };
        match self {
            Data::Pinned(bufs) => {
                for v in bufs.iovecs() {
                    push(v.iov_base, v.iov_len);
                }
            }
            Data::Owned(v) => push(v.as_mut_ptr().cast(), v.len()),
        }
        out
    }
}

pub(super) type SyncResult = (io::Result<ScsiOutcome>, Vec<u8>);

/// Who learns the result.
pub(super) enum Done {
    Remote(RemoteCompletion),
    Sync(mpsc::Sender<SyncResult>),
}

/// A command to forward.
pub(super) struct Command {
    pub cdb: CdbBytes,
    pub direction: DataDirection,
    pub len: usize,
    pub tag: Option<u64>,
    pub data: Data,
    pub deadline: Instant,
    pub done: Done,
}

impl Command {
    /// Hands the result over, the memory dropped (or returned) first.
    fn finish(self, result: io::Result<ScsiOutcome>) {
        let Command { data, done, .. } = self;
        match done {
            Done::Remote(completion) => {
                drop(data);
                completion.complete(RemoteResult::Scsi(result));
            }
            Done::Sync(tx) => {
                let buf = match data {
                    Data::Owned(v) => v,
                    Data::Pinned(_) => Vec::new(),
                };
                let _ = tx.send((result, buf));
            }
        }
    }
}

/// The status a command aborted by a task management function ends with
/// (SAM-5 TASK ABORTED).
pub const TASK_ABORTED: u8 = 0x40;

fn aborted() -> io::Result<ScsiOutcome> {
    Ok(ScsiOutcome::new(TASK_ABORTED, &[], 0))
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the iSCSI target did not answer in time",
    )
}

fn reset(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, why.to_string())
}

struct TmfRequest {
    tmf: TaskManagement,
    deadline: Instant,
    reply: mpsc::Sender<TaskManagementResponse>,
}

#[derive(Default)]
struct Inbox {
    commands: VecDeque<Command>,
    tmfs: VecDeque<TmfRequest>,
    stop: bool,
}

struct Shared {
    inbox: Mutex<Inbox>,
    wake: EventFd,
    /// False once the session thread has ended.
    alive: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle the logical unit keeps; dropping it ends the thread (every
/// command still queued or in flight completes first).
pub(super) struct Session {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Session {
    /// Starts the thread and waits for the first login (the thread gives
    /// up after the configured timeout). Errors are one line.
    pub fn start(lib: &'static Libiscsi, config: SessionConfig) -> Result<Session, String> {
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            wake: EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?,
            alive: AtomicBool::new(true),
        });
        let (tx, rx) = mpsc::channel();
        let timeout = config.timeout;
        let worker = Worker::new(lib, config, shared.clone());
        let thread = std::thread::Builder::new()
            .name("iscsi-session".into())
            .spawn(move || worker.run(tx))
            .map_err(|e| format!("cannot start the session thread: {e}"))?;
        let session = Session {
            shared,
            thread: Some(thread),
        };
        match rx.recv_timeout(timeout + Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(session),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("login timed out".to_string()),
        }
    }

    /// Queues `command` for the thread (or completes it at once if the
    /// thread is gone).
    pub fn submit(&self, command: Command) {
        let mut inbox = self.shared.lock();
        if !self.shared.alive.load(Ordering::Acquire) || inbox.stop {
            drop(inbox);
            command.finish(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the iSCSI session has ended",
            )));
            return;
        }
        inbox.commands.push_back(command);
        drop(inbox);
        let _ = self.shared.wake.write(1);
    }

    /// Runs `cdb` with a buffer of the backend's own and waits for it.
    pub fn command_sync(
        &self,
        cdb: &[u8],
        direction: DataDirection,
        buf: Vec<u8>,
        timeout: Duration,
    ) -> SyncResult {
        let (tx, rx) = mpsc::channel();
        let cdb = CdbBytes::new(cdb).expect("a CDB of the backend's own");
        self.submit(Command {
            cdb,
            direction,
            len: buf.len(),
            tag: None,
            data: Data::Owned(buf),
            deadline: Instant::now() + timeout,
            done: Done::Sync(tx),
        });
        rx.recv().unwrap_or_else(|_| {
            (
                Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the session thread ended",
                )),
                Vec::new(),
            )
        })
    }

    pub fn task_management(
        &self,
        tmf: TaskManagement,
        timeout: Duration,
    ) -> TaskManagementResponse {
        let (tx, rx) = mpsc::channel();
        {
            let mut inbox = self.shared.lock();
            if !self.shared.alive.load(Ordering::Acquire) || inbox.stop {
                return TaskManagementResponse::Failed;
            }
            inbox.tmfs.push_back(TmfRequest {
                tmf,
                deadline: Instant::now() + timeout,
                reply: tx,
            });
        }
        let _ = self.shared.wake.write(1);
        rx.recv_timeout(timeout)
            .unwrap_or(TaskManagementResponse::Failed)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        let _ = self.shared.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a libiscsi callback reports; callbacks only record (they run
/// inside `iscsi_service` or another libiscsi call on the session thread),
/// the loop acts after the call returned.
enum Event {
    Command {
        id: u64,
        status: c_int,
    },
    Tmf {
        id: u64,
        status: c_int,
        response: u32,
    },
    /// `error`: the context's error message when the callback ran (a
    /// failed connection's cause; libiscsi overwrites it afterwards).
    Connect {
        status: c_int,
        error: String,
    },
}

thread_local! {
    static EVENTS: RefCell<Vec<Event>> = const { RefCell::new(Vec::new()) };
}

fn push_event(event: Event) {
    EVENTS.with(|e| e.borrow_mut().push(event));
}

unsafe extern "C" fn command_cb(
    _ctx: *mut IscsiContext,
    status: c_int,
    _data: *mut c_void,
    private: *mut c_void,
) {
    push_event(Event::Command {
        id: private as usize as u64,
        status,
    });
}

unsafe extern "C" fn tmf_cb(
    _ctx: *mut IscsiContext,
    status: c_int,
    data: *mut c_void,
    private: *mut c_void,
) {
    let response = if status == ffi::SCSI_STATUS_GOOD && !data.is_null() {
        // SAFETY: for SCSI_STATUS_GOOD, command_data "is a pointer to
        // uint32_t containing the response code" (iscsi.h).
        unsafe { *data.cast::<u32>() }
    } else {
        u32::MAX
    };
    push_event(Event::Tmf {
        id: private as usize as u64,
        status,
        response,
    });
}

unsafe extern "C" fn connect_cb(
    ctx: *mut IscsiContext,
    status: c_int,
    _data: *mut c_void,
    _private: *mut c_void,
) {
    let error = match ffi::Libiscsi::get() {
        // SAFETY: the live context the callback is called for.
        Ok(lib) if status != ffi::SCSI_STATUS_GOOD => unsafe { lib.error(ctx) },
        _ => String::new(),
    };
    push_event(Event::Connect { status, error });
}

/// Why a cancelled command ends as it does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    /// Its session dropped: ConnectionReset.
    Reset,
    /// Aborted by a task management function: TASK ABORTED.
    Aborted,
    /// Past its deadline: TimedOut.
    TimedOut,
}

/// A finished write task that a DATA-OUT PDU still queued in libiscsi may
/// refer to: its `iovector_out` names `_zeros`.
struct Retired {
    task: *mut ScsiTask,
    /// The id the next command issued got when this was retired: an
    /// answer to a command of this id or later frees it.
    barrier: u64,
    /// Entries of [`ZEROS`]; libiscsi adjusts entries in place while it
    /// writes (and restores them), so the list is the worker's own.
    _zeros: Vec<libc::iovec>,
}

/// What a retired task's DATA-OUT PDUs send (read only, never written).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Iovecs naming `len` bytes of [`ZEROS`].
fn zero_iovecs(len: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(len.div_ceil(ZEROS.len()));
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len());
        out.push(libc::iovec {
            iov_base: ZEROS.as_ptr() as *mut c_void,
            iov_len: n,
        });
        left -= n;
    }
    out
}

struct InFlight {
    task: *mut ScsiTask,
    /// The iovec list libiscsi reads (`scsi_task_set_iov_*` keeps the
    /// pointer): its heap buffer does not move while this lives.
    _iov: Vec<libc::iovec>,
    command: Command,
    /// Set when libiscsi cancelled it (the callback came).
    cancelled: bool,
    /// How it ends if cancelled or destroyed with the context.
    fate: Fate,
}

enum State {
    /// No context; the next login attempt at `next`.
    Down {
        next: Instant,
        failures: u32,
    },
    /// `iscsi_full_connect_async` under way, until `deadline`.
    Connecting {
        deadline: Instant,
    },
    Up,
}

struct PendingTmf {
    deadline: Instant,
    reply: mpsc::Sender<TaskManagementResponse>,
    /// For ABORT TASK: the command to cancel locally once the target says
    /// it is aborted.
    abort: Option<u64>,
}

struct Worker {
    lib: &'static Libiscsi,
    config: SessionConfig,
    shared: Arc<Shared>,
    ctx: *mut IscsiContext,
    state: State,
    /// Taken from the inbox, not yet handed to libiscsi.
    waiting: VecDeque<Command>,
    in_flight: HashMap<u64, InFlight>,
    /// Completed write tasks libiscsi may still refer to.
    retired: Vec<Retired>,
    by_tag: HashMap<u64, u64>,
    tmfs: HashMap<u64, PendingTmf>,
    next_id: u64,
    /// Logged in at least once (the open succeeded).
    opened: bool,
    /// The message of the last failed login (for the open's error).
    last_error: String,
}

// SAFETY: the raw pointers (context, tasks) are only used on the thread
// the worker is moved to; it is moved once, before any is created.
unsafe impl Send for Worker {}

impl Worker {
    fn new(lib: &'static Libiscsi, config: SessionConfig, shared: Arc<Shared>) -> Worker {
        Worker {
            lib,
            config,
            shared,
            ctx: std::ptr::null_mut(),
            state: State::Down {
                next: Instant::now(),
                failures: 0,
            },
            waiting: VecDeque::new(),
            in_flight: HashMap::new(),
            retired: Vec::new(),
            by_tag: HashMap::new(),
            tmfs: HashMap::new(),
            next_id: 1,
            opened: false,
            last_error: String::new(),
        }
    }

    fn run(mut self, opened: mpsc::Sender<Result<(), String>>) {
        let mut opened = Some(opened);
        loop {
            let stop = self.take_inbox();
            if stop {
                break;
            }
            if let State::Down { next, failures } = self.state {
                if Instant::now() >= next {
                    if !self.opened && failures > 0 {
                        // The open's single attempt failed.
                        if let Some(tx) = opened.take() {
                            let _ = tx.send(Err(self.last_error.clone()));
                        }
                        break;
                    }
                    self.start_login();
                }
            }
            if matches!(self.state, State::Up) {
                if let Some(tx) = opened.take() {
                    let _ = tx.send(Ok(()));
                }
                self.issue_waiting();
            }
            self.poll_once();
            self.check_deadlines();
            self.settle_cancelled();
            self.settle_retired();
        }
        self.shutdown();
    }

    /// Moves the inbox's commands to `waiting`, starts its TMFs; true if
    /// asked to stop.
    fn take_inbox(&mut self) -> bool {
        let (commands, tmfs, stop) = {
            let mut inbox = self.shared.lock();
            (
                std::mem::take(&mut inbox.commands),
                std::mem::take(&mut inbox.tmfs),
                inbox.stop,
            )
        };
        self.waiting.extend(commands);
        for tmf in tmfs {
            self.start_tmf(tmf);
        }
        stop
    }

    fn start_login(&mut self) {
        let lib = self.lib;
        let c = &self.config;
        // SAFETY: a NUL-terminated initiator name.
        let ctx = unsafe { (lib.iscsi_create_context)(c.initiator.as_ptr()) };
        if ctx.is_null() {
            self.login_failed("iscsi_create_context failed".to_string());
            return;
        }
        // SAFETY: `ctx` is the live context just created, the strings are
        // NUL-terminated and copied by libiscsi, the callback matches
        // iscsi_command_cb.
        let rc = unsafe {
            (lib.iscsi_set_targetname)(ctx, c.target.as_ptr());
            (lib.iscsi_set_session_type)(ctx, ffi::ISCSI_SESSION_NORMAL);
            (lib.iscsi_set_header_digest)(ctx, c.header_digest);
            if let Some((user, password)) = &c.chap {
                (lib.iscsi_set_initiator_username_pwd)(ctx, user.as_ptr(), password.as_ptr());
            }
            (lib.iscsi_set_noautoreconnect)(ctx, 1);
            (lib.iscsi_set_isid_random)(ctx, c.isid.0, c.isid.1);
            // The login's PDUs time out in libiscsi; PDUs created after
            // the login do not (set back to 0 then): commands have their
            // own deadlines here.
            (lib.iscsi_set_timeout)(ctx, c.timeout.as_secs().max(1) as c_int);
            (lib.iscsi_full_connect_async)(
                ctx,
                c.portal.as_ptr(),
                c_int::from(c.lun),
                connect_cb,
                std::ptr::null_mut(),
            )
        };
        self.ctx = ctx;
        if rc != 0 {
            // SAFETY: the live context.
            let msg = unsafe { lib.error(ctx) };
            self.destroy_context();
            self.login_failed(msg);
            return;
        }
        self.state = State::Connecting {
            deadline: Instant::now() + self.config.timeout,
        };
    }

    fn login_failed(&mut self, msg: String) {
        let failures = match self.state {
            State::Down { failures, .. } => failures,
            _ => 0,
        } + 1;
        let msg = msg.replace('\n', " ");
        log::debug!("{}: login failed: {msg}", self.config.label);
        self.last_error = msg;
        // 100 ms doubling to 5 s.
        let backoff = Duration::from_millis(100u64 << failures.min(6).saturating_sub(1))
            .min(Duration::from_secs(5));
        self.state = State::Down {
            next: Instant::now() + backoff,
            failures,
        };
    }

    fn logged_in(&mut self) {
        // SAFETY: the live context.
        unsafe { (self.lib.iscsi_set_timeout)(self.ctx, 0) };
        if self.opened {
            log::warn!("{}: iSCSI session re-established", self.config.label);
        }
        self.opened = true;
        self.state = State::Up;
    }

    /// Hands the waiting commands to libiscsi.
    fn issue_waiting(&mut self) {
        while let Some(mut command) = self.waiting.pop_front() {
            let id = self.next_id;
            self.next_id += 1;
            let mut cdb = [0u8; ffi::SCSI_CDB_MAX_SIZE];
            let cdb_len = command.cdb.as_slice().len();
            cdb[..cdb_len].copy_from_slice(command.cdb.as_slice());
            let (dir, len) = match command.direction {
                DataDirection::None => (ffi::SCSI_XFER_NONE, 0),
                DataDirection::FromDevice => (ffi::SCSI_XFER_READ, command.len),
                DataDirection::ToDevice => (ffi::SCSI_XFER_WRITE, command.len),
            };
            let mut iov = command.data.iovecs(len);
            let lib = self.lib;
            // SAFETY: a CDB of at most SCSI_CDB_MAX_SIZE bytes (submit
            // checked); libiscsi copies it.
            let task = unsafe {
                (lib.scsi_create_task)(cdb_len as c_int, cdb.as_mut_ptr(), dir, len as c_int)
            };
            if task.is_null() {
                command.finish(Err(io::Error::from(io::ErrorKind::OutOfMemory)));
                continue;
            }
            // SAFETY: `task` is ours; `iov` stays alive and unchanged in
            // the InFlight entry until the task is freed; the memory it
            // names stays pinned by `command.data` as long.
            let rc = unsafe {
                match dir {
                    ffi::SCSI_XFER_READ if !iov.is_empty() => {
                        (lib.scsi_task_set_iov_in)(task, iov.as_mut_ptr(), iov.len() as c_int)
                    }
                    ffi::SCSI_XFER_WRITE if !iov.is_empty() => {
                        (lib.scsi_task_set_iov_out)(task, iov.as_mut_ptr(), iov.len() as c_int)
                    }
                    _ => {}
                }
                (lib.iscsi_scsi_command_async)(
                    self.ctx,
                    c_int::from(self.config.lun),
                    task,
                    command_cb,
                    std::ptr::null_mut(),
                    id as usize as *mut c_void,
                )
            };
            if rc != 0 {
                // Not queued: libiscsi holds nothing of it.
                // SAFETY: our task, not queued.
                unsafe { (lib.scsi_free_scsi_task)(task) };
                // SAFETY: the live context.
                let msg = unsafe { lib.error(self.ctx) };
                self.waiting.push_front(command);
                self.drop_session(&format!("cannot queue a command: {msg}"));
                return;
            }
            if let Some(tag) = command.tag {
                self.by_tag.insert(tag, id);
            }
            self.in_flight.insert(
                id,
                InFlight {
                    task,
                    _iov: iov,
                    command,
                    cancelled: false,
                    fate: Fate::Reset,
                },
            );
        }
    }

    fn poll_once(&mut self) {
        let mut fds = [
            libc::pollfd {
                fd: self.shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            },
        ];
        let mut timeout = Duration::from_millis(1000);
        if !self.ctx.is_null() {
            // SAFETY: the live context.
            let (fd, events) = unsafe {
                (
                    (self.lib.iscsi_get_fd)(self.ctx),
                    (self.lib.iscsi_which_events)(self.ctx),
                )
            };
            if events == 0 {
                // iscsi.h: wait >= 100 ms and ask again.
                timeout = Duration::from_millis(100);
            } else {
                fds[1].fd = fd;
                fds[1].events = events as i16 | libc::POLLRDHUP;
            }
        }
        let now = Instant::now();
        if let Some(d) = self.next_deadline() {
            timeout = timeout.min(d.saturating_duration_since(now) + Duration::from_millis(1));
        }
        if self.in_flight.values().any(|f| f.cancelled) {
            timeout = timeout.min(Duration::from_millis(10));
        }
        // SAFETY: two valid pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as c_int) };
        if n < 0 {
            return; // EINTR
        }
        if fds[0].revents != 0 {
            let _ = self.shared.wake.read();
        }
        if self.ctx.is_null() {
            return;
        }
        let revents = fds[1].revents;
        // SAFETY: the live context; revents from poll (0: timeouts only).
        let rc = unsafe { (self.lib.iscsi_service)(self.ctx, c_int::from(revents)) };
        self.process_events();
        if self.ctx.is_null() {
            return;
        }
        // libiscsi, told not to reconnect, cancels every command when the
        // connection fails; commands this thread did not cancel itself
        // coming back cancelled mean the same.
        let broken = revents & (libc::POLLERR | libc::POLLHUP | libc::POLLRDHUP) != 0
            || self
                .in_flight
                .values()
                .any(|f| f.cancelled && f.fate == Fate::Reset);
        match self.state {
            State::Connecting { .. } if rc < 0 || broken => {
                // SAFETY: the live context.
                let msg = unsafe { self.lib.error(self.ctx) };
                self.destroy_context();
                self.login_failed(msg);
            }
            State::Up if rc < 0 || broken => {
                // SAFETY: the live context.
                let msg = unsafe { self.lib.error(self.ctx) };
                // A connection closed by the peer (end of file) sets no
                // message of its own; what is there then is stale (the
                // login's last sense, say) or libiscsi's refusal to
                // reconnect. A socket error sets one.
                let socket_error = revents & (libc::POLLERR | libc::POLLHUP) != 0 || rc < 0;
                let msg = if !socket_error || msg.is_empty() || msg.contains("reconnect") {
                    "connection closed by the target".to_string()
                } else {
                    msg
                };
                self.drop_session(&msg);
            }
            _ => {}
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let commands = self
            .waiting
            .iter()
            .map(|c| c.deadline)
            .chain(self.in_flight.values().map(|f| f.command.deadline));
        let tmfs = self.tmfs.values().map(|t| t.deadline);
        let state = match self.state {
            State::Down { next, .. } => Some(next),
            State::Connecting { deadline } => Some(deadline),
            State::Up => None,
        };
        commands.chain(tmfs).chain(state).min()
    }

    /// Acts on what the callbacks recorded.
    fn process_events(&mut self) {
        let events = EVENTS.with(|e| std::mem::take(&mut *e.borrow_mut()));
        for event in events {
            match event {
                Event::Command { id, status } => self.command_done(id, status),
                Event::Tmf {
                    id,
                    status,
                    response,
                } => self.tmf_done(id, status, response),
                Event::Connect { status, error } => {
                    if !matches!(self.state, State::Connecting { .. }) {
                        continue;
                    }
                    if status == ffi::SCSI_STATUS_GOOD {
                        self.logged_in();
                    } else {
                        self.destroy_context();
                        self.login_failed(error);
                    }
                }
            }
        }
    }

    fn command_done(&mut self, id: u64, status: c_int) {
        if status == ffi::SCSI_STATUS_CANCELLED {
            if let Some(f) = self.in_flight.get_mut(&id) {
                f.cancelled = true;
            }
            return;
        }
        let Some(f) = self.in_flight.remove(&id) else {
            return;
        };
        if f.command.tag.and_then(|t| self.by_tag.get(&t)) == Some(&id) {
            self.by_tag.remove(&f.command.tag.unwrap_or_default());
        }
        let result = match status {
            ffi::SCSI_STATUS_ERROR => {
                // SAFETY: the live context.
                let msg = unsafe { self.lib.error(self.ctx) };
                self.release_task(f.task, &f.command);
                f.command.finish(Err(reset(&format!("iSCSI error: {msg}"))));
                // The session's state is unknown after a protocol error.
                self.drop_session(&format!("protocol error: {msg}"));
                return;
            }
            ffi::SCSI_STATUS_TIMEOUT => Err(timed_out()),
            status => {
                // SAFETY: `f.task` is the task of the callback, alive until
                // we free it; 1.19's layout (ffi::ScsiTask).
                let task = unsafe { &*f.task };
                let sense = if status == ffi::SCSI_STATUS_CHECK_CONDITION
                    && task.datain.size >= 2
                    && !task.datain.data.is_null()
                {
                    // SAFETY: datain holds `size` bytes (the response's
                    // data segment: sense length, then sense).
                    let seg = unsafe {
                        std::slice::from_raw_parts(task.datain.data, task.datain.size as usize)
                    };
                    let n = usize::from(u16::from_be_bytes([seg[0], seg[1]])).min(seg.len() - 2);
                    seg[2..2 + n].to_vec()
                } else {
                    Vec::new()
                };
                let len = match f.command.direction {
                    DataDirection::None => 0,
                    _ => f.command.len,
                };
                let transferred = if task.residual_status == ffi::SCSI_RESIDUAL_UNDERFLOW {
                    len.saturating_sub(task.residual)
                } else {
                    len
                };
                // The target answered command `id`: it has read all
                // that libiscsi queued before it.
                self.settle_retired_before(id);
                Ok(ScsiOutcome::new(status as u8, &sense, transferred))
            }
        };
        self.release_task(f.task, &f.command);
        f.command.finish(result);
    }

    /// Frees the retired tasks that were retired before command `id` was
    /// issued: their DATA-OUT PDUs were ahead of its command PDU.
    fn settle_retired_before(&mut self, id: u64) {
        let lib = self.lib;
        let before = self.retired.len();
        self.retired.retain(|r| {
            if r.barrier > id {
                return true;
            }
            // SAFETY: our task, which no PDU refers to any more.
            unsafe { (lib.scsi_free_scsi_task)(r.task) };
            false
        });
        if self.retired.len() < before {
            log::trace!(
                "{}: {} retired task(s) freed at the answer to a later command",
                self.config.label,
                before - self.retired.len()
            );
        }
    }

    /// Lets go of the task of `command`, which has had its callback: frees
    /// it, or retires it if a DATA-OUT PDU of it may still be queued.
    fn release_task(&mut self, task: *mut ScsiTask, command: &Command) {
        if command.direction != DataDirection::ToDevice || command.len == 0 || self.out_idle() {
            self.free_task(task);
            return;
        }
        let mut zeros = zero_iovecs(command.len);
        // SAFETY: our live task; the session thread is the only one in
        // libiscsi, which is not inside a call now. A DATA-OUT PDU reads
        // bytes `payload_offset..+payload_len` (within the task's
        // `expxferlen`, `command.len`) through this list from now on,
        // the same positions in zeros; the cursor starts again at 0 (a
        // later position is found by walking from there). The list's heap
        // buffer stays put in `self.retired` until the task is freed.
        unsafe {
            (*task).iovector_out = ffi::ScsiIovector {
                iov: zeros.as_mut_ptr(),
                niov: zeros.len() as c_int,
                nalloc: 0,
                offset: 0,
                consumed: 0,
            };
        }
        log::trace!(
            "{}: a write's response came with libiscsi's output queue busy; its task is retired",
            self.config.label
        );
        self.retired.push(Retired {
            task,
            barrier: self.next_id,
            _zeros: zeros,
        });
    }

    /// Whether nothing can be waiting in libiscsi to be written: no PDU
    /// queued (`outqueue`) and none half sent (`outqueue_current`, which
    /// `iscsi_out_queue_length` does not count but `iscsi_which_events`
    /// asks POLLOUT for: lib/socket.c). Also when there is no context.
    fn out_idle(&self) -> bool {
        if self.ctx.is_null() {
            return true;
        }
        // SAFETY: the live context.
        unsafe {
            (self.lib.iscsi_out_queue_length)(self.ctx) == 0
                && (self.lib.iscsi_which_events)(self.ctx) & c_int::from(libc::POLLOUT) == 0
        }
    }

    /// Frees the retired tasks once nothing queued can refer to them.
    fn settle_retired(&mut self) {
        if self.retired.is_empty() || !self.out_idle() {
            return;
        }
        for r in std::mem::take(&mut self.retired) {
            self.free_task(r.task);
        }
    }

    fn free_task(&self, task: *mut ScsiTask) {
        // SAFETY: our task, which libiscsi no longer refers to (its PDU
        // completed, or the context was destroyed).
        unsafe { (self.lib.scsi_free_scsi_task)(task) };
    }

    /// Completes cancelled commands once nothing in libiscsi's output
    /// queue can refer to their memory.
    fn settle_cancelled(&mut self) {
        if !self.in_flight.values().any(|f| f.cancelled) {
            return;
        }
        if !self.out_idle() {
            return;
        }
        let ids: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.cancelled)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.finish_in_flight(id);
        }
    }

    /// Completes in-flight command `id` by its fate (libiscsi must hold
    /// nothing of it).
    fn finish_in_flight(&mut self, id: u64) {
        let Some(f) = self.in_flight.remove(&id) else {
            return;
        };
        if let Some(tag) = f.command.tag {
            if self.by_tag.get(&tag) == Some(&id) {
                self.by_tag.remove(&tag);
            }
        }
        self.free_task(f.task);
        f.command.finish(match f.fate {
            Fate::Reset => Err(reset("the iSCSI session was lost")),
            Fate::Aborted => aborted(),
            Fate::TimedOut => Err(timed_out()),
        });
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        // Not sent yet: nothing of libiscsi refers to them.
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].deadline <= now {
                let command = self.waiting.remove(i).expect("index in range");
                command.finish(Err(timed_out()));
            } else {
                i += 1;
            }
        }
        // Past the deadline: unanswered, or cancelled (by a task
        // management function) and still not settled.
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.command.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if !expired.is_empty() {
            for id in &expired {
                if let Some(f) = self.in_flight.get_mut(id) {
                    if !f.cancelled {
                        f.fate = Fate::TimedOut;
                    }
                }
            }
            // Only destroying the context guarantees libiscsi lets go of
            // a command's memory (a DATA-OUT PDU may still be queued).
            self.drop_session(&format!(
                "{} command(s) not answered in {} s",
                expired.len(),
                self.config.timeout.as_secs()
            ));
        }
        self.tmfs.retain(|_, t| {
            if t.deadline <= now {
                let _ = t.reply.send(TaskManagementResponse::Failed);
                false
            } else {
                true
            }
        });
        if let State::Connecting { deadline } = self.state {
            if deadline <= now {
                self.destroy_context();
                self.login_failed("login timed out".to_string());
            }
        }
    }

    /// Destroys the context (every PDU freed; CANCELLED callbacks) and
    /// completes everything that was in flight by its fate.
    fn destroy_context(&mut self) {
        if self.ctx.is_null() {
            return;
        }
        // SAFETY: the live context, never used again.
        unsafe { (self.lib.iscsi_destroy_context)(self.ctx) };
        self.ctx = std::ptr::null_mut();
        // Every PDU is freed: the retired tasks are nobody's now.
        self.settle_retired();
        // Cancellations are all there is to learn now.
        EVENTS.with(|e| e.borrow_mut().clear());
        let ids: Vec<u64> = self.in_flight.keys().copied().collect();
        for id in ids {
            self.finish_in_flight(id);
        }
        for (_, t) in self.tmfs.drain() {
            let _ = t.reply.send(TaskManagementResponse::Failed);
        }
    }

    fn drop_session(&mut self, why: &str) {
        let was_up = matches!(self.state, State::Up);
        self.destroy_context();
        if was_up {
            log::warn!(
                "{}: iSCSI session lost ({}); reconnecting",
                self.config.label,
                why.replace('\n', " ")
            );
        }
        self.state = State::Down {
            next: Instant::now(),
            failures: 0,
        };
    }

    fn start_tmf(&mut self, request: TmfRequest) {
        if !matches!(self.state, State::Up) {
            let _ = request.reply.send(TaskManagementResponse::Failed);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let lun = u32::from(self.config.lun);
        let lib = self.lib;
        let private = id as usize as *mut c_void;
        let mut abort = None;
        let rc = match request.tmf {
            TaskManagement::AbortTask { tag } => {
                // Not sent yet: aborted here.
                if let Some(i) = self.waiting.iter().position(|c| c.tag == Some(tag)) {
                    let command = self.waiting.remove(i).expect("index in range");
                    command.finish(aborted());
                    let _ = request.reply.send(TaskManagementResponse::Complete);
                    return;
                }
                let task = self
                    .by_tag
                    .get(&tag)
                    .and_then(|id| self.in_flight.get(id).map(|f| (*id, f)))
                    .filter(|(_, f)| !f.cancelled)
                    .map(|(id, f)| (id, f.task));
                let Some((cmd_id, task)) = task else {
                    // Not found (done already): the abort completes.
                    log::debug!(
                        "{}: ABORT TASK of tag {tag}: not in flight",
                        self.config.label
                    );
                    let _ = request.reply.send(TaskManagementResponse::Complete);
                    return;
                };
                log::debug!("{}: ABORT TASK of tag {tag}: in flight", self.config.label);
                abort = Some(cmd_id);
                // SAFETY: the live context; `task` is in flight on it.
                unsafe { (lib.iscsi_task_mgmt_abort_task_async)(self.ctx, task, tmf_cb, private) }
            }
            TaskManagement::AbortTaskSet | TaskManagement::LogicalUnitReset => {
                // libiscsi cancels every task first (task_mgmt.c); they
                // end as aborted. So do those not sent yet.
                for f in self.in_flight.values_mut() {
                    f.fate = Fate::Aborted;
                }
                for command in self.waiting.drain(..) {
                    command.finish(aborted());
                }
                // SAFETY: the live context.
                unsafe {
                    if request.tmf == TaskManagement::AbortTaskSet {
                        (lib.iscsi_task_mgmt_abort_task_set_async)(self.ctx, lun, tmf_cb, private)
                    } else {
                        (lib.iscsi_task_mgmt_lun_reset_async)(self.ctx, lun, tmf_cb, private)
                    }
                }
            }
        };
        if rc != 0 {
            let _ = request.reply.send(TaskManagementResponse::Failed);
            return;
        }
        self.tmfs.insert(
            id,
            PendingTmf {
                deadline: request.deadline,
                reply: request.reply,
                abort,
            },
        );
    }

    fn tmf_done(&mut self, id: u64, status: c_int, response: u32) {
        let Some(tmf) = self.tmfs.remove(&id) else {
            return;
        };
        let answer = if status != ffi::SCSI_STATUS_GOOD {
            TaskManagementResponse::Failed
        } else if response == ffi::ISCSI_TMR_FUNC_COMPLETE
            || response == ffi::ISCSI_TMR_TASK_DOES_NOT_EXIST
        {
            TaskManagementResponse::Complete
        } else {
            TaskManagementResponse::Rejected
        };
        if answer == TaskManagementResponse::Complete {
            if let Some(cmd) = tmf.abort {
                // The target has let go of the task; libiscsi still waits
                // for its response. Cancel it there (its callback comes at
                // once; settled when the output queue is empty).
                if let Some(f) = self.in_flight.get_mut(&cmd) {
                    if !f.cancelled {
                        f.fate = Fate::Aborted;
                        let task = f.task;
                        // SAFETY: the live context, a task in flight on it.
                        let rc = unsafe { (self.lib.iscsi_scsi_cancel_task)(self.ctx, task) };
                        log::debug!(
                            "{}: ABORT TASK complete; local cancel: {rc}",
                            self.config.label
                        );
                        self.process_events();
                    }
                }
            }
        }
        let _ = tmf.reply.send(answer);
    }

    fn shutdown(&mut self) {
        self.destroy_context();
        for command in self.waiting.drain(..) {
            command.finish(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the iSCSI logical unit was closed",
            )));
        }
        let mut inbox = self.shared.lock();
        self.shared.alive.store(false, Ordering::Release);
        let left: Vec<Command> = inbox.commands.drain(..).collect();
        let tmfs: Vec<TmfRequest> = inbox.tmfs.drain(..).collect();
        drop(inbox);
        for command in left {
            command.finish(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the iSCSI logical unit was closed",
            )));
        }
        for t in tmfs {
            let _ = t.reply.send(TaskManagementResponse::Failed);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Also on a panic of the thread: later submissions fail at once,
        // and those queued meanwhile are not left waiting for the unit's
        // removal. (The commands the worker held complete as their
        // completions drop; libiscsi is not called again, so nothing
        // touches their memory.)
        let mut inbox = self.shared.lock();
        self.shared.alive.store(false, Ordering::Release);
        let left: Vec<Command> = inbox.commands.drain(..).collect();
        inbox.tmfs.clear();
        drop(inbox);
        for command in left {
            command.finish(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the iSCSI session thread ended",
            )));
        }
    }
}
