//! Listening, serving one VMM connection after another, and stopping on
//! SIGINT/SIGTERM.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use log::{info, warn};
use rustix::fs::{AtFlags, Gid, Mode};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost::vhost_user::{BackendListener, Error as VhostUserError, Listener};

use crate::manage::LunManager;
use crate::scsi::Target;
use crate::storage::IoEngine;
use crate::virtio::backend::QueueOptions;
use crate::virtio::handler::Connection;
use crate::virtio::{EventHub, ScsiBackend};

/// Which listening socket an error is about: errors name it as the
/// operator knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketRole {
    /// The vhost-user socket (`--socket-path`), named "socket path".
    Vhost,
    /// The management API's JSON-RPC socket, named "--api-socket".
    Api,
}

impl std::fmt::Display for SocketRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SocketRole::Vhost => "socket path",
            SocketRole::Api => "--api-socket",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{role} {}: in use by a running process", .path.display())]
    SocketInUse { role: SocketRole, path: PathBuf },
    #[error("{role} {}: exists and is not a socket", .path.display())]
    NotASocket { role: SocketRole, path: PathBuf },
    #[error("{role} {}: {source}", .path.display())]
    Socket {
        role: SocketRole,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("cannot create the vhost-user device: {0}")]
    Device(String),
    #[error("cannot accept a connection on {}: {reason}", .path.display())]
    Accept { path: PathBuf, reason: String },
    #[error("{role} {}: replaced by another file while being set up", .path.display())]
    SocketReplaced { role: SocketRole, path: PathBuf },
    #[error("--socket-group {group}: cannot give socket {} to the group: {source}", .path.display())]
    SocketGroup {
        group: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("--socket-mode {mode:04o}: cannot set the mode of socket {}: {source}", .path.display())]
    SocketMode {
        mode: u32,
        path: PathBuf,
        source: io::Error,
    },
}

/// Who may connect to the listening socket (and so use every image).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits, at most 0o777 (`--socket-mode`, default 0o600).
    pub mode: u32,
    /// The socket's group, if not the daemon's (`--socket-group`).
    pub group: Option<SocketGroup>,
}

/// A group for the socket: as the operator named it, and its gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketGroup {
    pub name: String,
    pub gid: u32,
}

/// Binds the vhost-user socket at `path` with the permissions and group of
/// `access` ([`bind_unix`] with [`SocketRole::Vhost`]).
pub fn listen(path: &Path, access: &SocketAccess) -> Result<Listener, DaemonError> {
    bind_unix(path, access, SocketRole::Vhost).map(Listener::from)
}

/// Binds a listening Unix socket at `path` with the permissions and group
/// of `access`; errors name it by `role`. A stale socket file (nobody
/// accepts on it) is replaced; a live one, or any other kind of file, is an
/// error, so two daemons never steal each other's socket. The socket file
/// is never more open than asked, whatever the umask, and is removed again
/// if it cannot be given its group and mode.
pub fn bind_unix(
    path: &Path,
    access: &SocketAccess,
    role: SocketRole,
) -> Result<UnixListener, DaemonError> {
    let socket_error = |source| DaemonError::Socket {
        role,
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(DaemonError::SocketInUse {
                    role,
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!("replacing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(socket_error)?;
            }
            Err(e) => return Err(socket_error(e)),
        },
        Ok(_) => {
            return Err(DaemonError::NotASocket {
                role,
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    // bind(2) creates the socket file with 0777 less the umask. Under a
    // umask that leaves only the owner's bits of the mode asked for, the
    // socket is never more open than asked: it gets its group, and only
    // then the group's and others' bits. The umask is the process's; no
    // other thread creates files meanwhile (only the signal thread runs).
    let create_mode = access.mode & 0o700;
    let previous = rustix::process::umask(Mode::from_raw_mode(!create_mode & 0o777));
    let bound = UnixListener::bind(path);
    rustix::process::umask(previous);
    let listener = bound.map_err(socket_error)?;
    if let Err(e) = set_access(path, access, role) {
        drop(listener);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    info!(
        "{} {}: mode {:04o}{}",
        match role {
            SocketRole::Vhost => "socket",
            SocketRole::Api => "API socket",
        },
        path.display(),
        access.mode,
        match &access.group {
            Some(g) => format!(", group {} ({})", g.name, g.gid),
            None => String::new(),
        }
    );
    Ok(listener)
}

/// Gives the socket file just bound at `path` its group and mode, through
/// one descriptor of it (O_PATH, not following a symbolic link), so that a
/// file swapped in at `path` meanwhile is refused rather than changed.
fn set_access(path: &Path, access: &SocketAccess, role: SocketRole) -> Result<(), DaemonError> {
    let socket_error = |source| DaemonError::Socket {
        role,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .map_err(socket_error)?;
    let meta = file.metadata().map_err(socket_error)?;
    if !meta.file_type().is_socket() || meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(DaemonError::SocketReplaced {
            role,
            path: path.to_path_buf(),
        });
    }
    if let Some(group) = &access.group {
        // An empty path with AT_EMPTY_PATH names the open file itself; no
        // owner (uid -1) leaves the owner unchanged. The gid is passed as
        // is: `from_raw` would only add a debug assertion against -1.
        let gid = Gid::from_raw_unchecked(group.gid);
        rustix::fs::chownat(&file, c"", None, Some(gid), AtFlags::EMPTY_PATH).map_err(|e| {
            DaemonError::SocketGroup {
                group: group.name.clone(),
                path: path.to_path_buf(),
                source: e.into(),
            }
        })?;
    }
    // An O_PATH descriptor takes no fchmod; its /proc link does take chmod.
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::set_permissions(link, std::fs::Permissions::from_mode(access.mode)).map_err(|source| {
        DaemonError::SocketMode {
            mode: access.mode,
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The VMM connection being served, if any: what a stop signal
/// quiesces before the daemon exits, and where the guest's state then goes
/// for the next daemon (`state.rs`).
#[derive(Debug)]
pub struct Serving {
    backend: Mutex<Option<Weak<ScsiBackend>>>,
    /// A VMM is connected (between accept and disconnect).
    connected: AtomicBool,
    target: Arc<Target>,
    /// The LUNs' IMAGE arguments (saved with the state).
    manager: Arc<LunManager>,
    state_file: PathBuf,
}

impl Serving {
    /// Serving `target` (its LUNs managed by `manager`); the guest's state
    /// goes to `state_file` when a stop signal comes while a VMM is
    /// connected.
    pub fn new(target: Arc<Target>, manager: Arc<LunManager>, state_file: PathBuf) -> Serving {
        Serving {
            backend: Mutex::new(None),
            connected: AtomicBool::new(false),
            target,
            manager,
            state_file,
        }
    }

    /// Saves the guest's state for the next daemon if a VMM is connected
    /// (its guest runs on, and will reconnect); logs the outcome.
    fn save_state(&self) {
        if !self.connected.load(Ordering::SeqCst) {
            return;
        }
        match crate::state::save(&self.state_file, &self.target, &self.manager.specs_now()) {
            Ok(n) => info!(
                "the guest's state of {n} LUN(s) saved to {} for the next daemon",
                self.state_file.display()
            ),
            Err(e) => warn!(
                "state file {}: cannot save the guest's state ({e}): the next daemon starts it afresh",
                self.state_file.display()
            ),
        }
    }

    fn set(&self, backend: Option<&Arc<ScsiBackend>>) {
        *self.backend.lock().unwrap_or_else(PoisonError::into_inner) = backend.map(Arc::downgrade);
    }

    fn current(&self) -> Option<Arc<ScsiBackend>> {
        self.backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()?
            .upgrade()
    }
}

/// When, after a VMM connects, the worker threads look at their queues
/// (`ScsiBackend::nudge_queues`): the VMM sets the queues up within
/// milliseconds of connecting, and a queue is served at the first nudge
/// that finds it live.
const NUDGES: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// Nudges the connection being served at [`NUDGES`], from a thread of its
/// own that ends with them (or with the connection).
fn nudge_after_connect(serving: &Serving) {
    let Some(backend) = serving.current() else {
        return;
    };
    let backend = Arc::downgrade(&backend);
    let spawned = std::thread::Builder::new()
        .name("nudge".into())
        .spawn(move || {
            let mut slept = Duration::ZERO;
            for at in NUDGES {
                std::thread::sleep(at.saturating_sub(slept));
                slept = at;
                match backend.upgrade() {
                    Some(backend) => backend.nudge_queues(),
                    None => return,
                }
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the thread that starts the queues ({e}): they wait for a kick");
    }
}

/// How long a stop signal waits for the worker threads to finish their
/// passes and the I/O in flight before the daemon exits regardless.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a thread that waits for SIGINT and SIGTERM, then stops the
/// daemon cleanly: the connection being served (`serving`) is quiesced —
/// every request taken from the guest's queues is completed and on the
/// used ring ([`ScsiBackend::quiesce_then`]), so a daemon started next (an
/// upgrade) resumes exactly after them — the sockets at `socket_paths` are
/// removed and the process exits with status 0. The signal handler,
/// signal-hook's, only wakes that thread (a write to its self-pipe); the
/// rest runs on the thread, never in the handler.
pub fn handle_stop_signals(
    socket_paths: Vec<PathBuf>,
    serving: Arc<Serving>,
) -> Result<(), DaemonError> {
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(DaemonError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // `forever` ends only when the `Signals` is closed, which
            // nothing does.
            let Some(signal) = signals.forever().next() else {
                return;
            };
            let name = if signal == SIGINT { "SIGINT" } else { "SIGTERM" };
            crate::service::notify("STOPPING=1\nSTATUS=stopping: completing the requests in flight");
            let quiesced = quiesce(&serving, STOP_TIMEOUT, &mut signals);
            let names: Vec<String> = socket_paths
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            match quiesced {
                Quiesced::Done => info!(
                    "{name} received: requests in flight completed; removing {} and exiting",
                    names.join(" and ")
                ),
                Quiesced::TimedOut => warn!(
                    "{name} received: requests still in flight after {} s; removing {} and exiting",
                    STOP_TIMEOUT.as_secs(),
                    names.join(" and ")
                ),
                Quiesced::Interrupted => warn!(
                    "{name} received, then another signal: exiting without waiting for the requests in flight; removing {}",
                    names.join(" and ")
                ),
            }
            // Saved in any case: a write cache the guest switched off must
            // not come back on. (Without every worker held, a command still
            // running could change it after this.)
            serving.save_state();
            for path in &socket_paths {
                let _ = std::fs::remove_file(path);
            }
            std::process::exit(0);
        })
        .map_err(DaemonError::Signals)?;
    Ok(())
}

/// How a stop's quiesce ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quiesced {
    /// Every worker held, every request taken completed.
    Done,
    /// Not within the timeout (storage that hangs).
    TimedOut,
    /// A second stop signal came meanwhile.
    Interrupted,
}

/// Quiesces the connection being served on a thread of its own, which
/// keeps the workers held once it is done (the process exits meanwhile),
/// and waits for it for `timeout` at most, or until another stop signal:
/// a drain waits for the storage, which may hang.
fn quiesce(serving: &Serving, timeout: Duration, signals: &mut Signals) -> Quiesced {
    let Some(backend) = serving.current() else {
        return Quiesced::Done;
    };
    let (done, outcome) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("quiesce".into())
        .spawn(move || {
            backend.quiesce_then(timeout, |all| {
                let _ = done.send(all);
                // Hold the workers until the process exits.
                loop {
                    std::thread::park();
                }
            })
        });
    if let Err(e) = spawned {
        warn!("cannot start the thread that completes the requests in flight: {e}");
        return Quiesced::TimedOut;
    }
    let deadline = Instant::now() + timeout;
    loop {
        match outcome.recv_timeout(Duration::from_millis(50)) {
            Ok(true) => return Quiesced::Done,
            Ok(false) | Err(RecvTimeoutError::Disconnected) => return Quiesced::TimedOut,
            Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                return Quiesced::TimedOut
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if signals.pending().next().is_some() {
            return Quiesced::Interrupted;
        }
    }
}

/// The first pause after a connection could not be set up; it doubles
/// with each failure in a row, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(10);
/// The longest pause between attempts.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Serves VMM connections one after another, forever: when a VMM
/// disconnects (guest shut down, QEMU killed), the device state is dropped
/// and the daemon listens again on the same socket. A connection that
/// cannot be set up — accept failing (EMFILE, ENFILE, ENOMEM, ENOBUFS),
/// threads or eventfds that cannot be created — is logged (rate-limited,
/// like every warning) and retried after a pause that doubles from 10 ms
/// to 1 s while failures go on: such errors pass, and a daemon that exited
/// on them would leave its VMM nothing to reconnect to.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    target: Arc<Target>,
    options: QueueOptions,
    engine: IoEngine,
    events: Arc<EventHub>,
    serving: Arc<Serving>,
    mut listener: Listener,
    path: &Path,
) -> ! {
    info!("I/O engine: {engine}");
    let mut delay = RETRY_FIRST;
    loop {
        let served = serve_connection(
            &target,
            options,
            engine,
            &events,
            &serving,
            &mut listener,
            path,
        );
        serving.set(None);
        match served {
            Ok(()) => delay = RETRY_FIRST,
            Err(e) => {
                warn!("{e}; trying again in {} ms", delay.as_millis());
                std::thread::sleep(delay);
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Sets up the device for one connection, waits for a VMM to connect and
/// serves it until it disconnects. An error means no VMM was served.
fn serve_connection(
    target: &Arc<Target>,
    options: QueueOptions,
    engine: IoEngine,
    events: &Arc<EventHub>,
    serving: &Serving,
    listener: &mut Listener,
    path: &Path,
) -> Result<(), DaemonError> {
    let mut backend = ScsiBackend::with_engine(target.clone(), options, engine);
    backend.set_event_hub(events.clone());
    let backend = Arc::new(backend);
    // The connection's queues and worker threads, each thread's epoll
    // loop also watching its io_uring completions and start nudges, and
    // thread 0 the events the management API posts (handler.rs).
    let connection =
        Connection::new(backend.clone()).map_err(|e| DaemonError::Device(e.to_string()))?;
    let connection = Arc::new(Mutex::new(connection));
    serving.set(Some(&backend));
    drop(backend);
    info!("listening on {}", path.display());
    let accept_error = |reason: String| DaemonError::Accept {
        path: path.to_path_buf(),
        reason,
    };
    let mut requests = {
        let mut accepting = BackendListener::new(listener, connection.clone())
            .map_err(|e| accept_error(e.to_string()))?;
        loop {
            match accepting.accept() {
                Ok(Some(requests)) => break requests,
                Ok(None) => continue,
                Err(e) => return Err(accept_error(e.to_string())),
            }
        }
    };
    info!("VMM connected");
    crate::service::notify("STATUS=VMM connected");
    serving.connected.store(true, Ordering::SeqCst);
    nudge_after_connect(serving);
    let ended = loop {
        if let Err(e) = requests.handle_request() {
            break e;
        }
    };
    let summary = connection
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .summary();
    match ended {
        VhostUserError::Disconnected | VhostUserError::PartialMessage => {
            info!("VMM disconnected ({summary})")
        }
        e => warn!("VMM connection ended: {e} ({summary})"),
    }
    crate::service::notify(&format!(
        "STATUS=VMM disconnected; listening on {}",
        path.display()
    ));
    serving.connected.store(false, Ordering::SeqCst);
    // Dropping the connection stops and joins its worker threads.
    drop(requests);
    drop(connection);
    Ok(())
}
