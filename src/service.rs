//! Running under a service manager: readiness and status notifications
//! (systemd's `sd_notify` datagram protocol, `$NOTIFY_SOCKET`) and a
//! listening socket passed in (systemd socket activation,
//! `$LISTEN_FDS`/`$LISTEN_PID`, or `--socket-fd` from another supervisor).
//!
//! Both are small enough to write out rather than take a crate for: a
//! notification is one datagram of `KEY=VALUE` lines to a Unix socket
//! (sd_notify(3)), and activation is three environment variables and
//! descriptors from 3 on (sd_listen_fds(3)).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::Path;

use log::{debug, warn};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Why an inherited listening socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("{from}: descriptor {fd} is not open")]
    NotOpen { from: &'static str, fd: RawFd },
    #[error("{from}: descriptor {fd} is not a listening Unix stream socket")]
    NotListening { from: &'static str, fd: RawFd },
    #[error("{from}: descriptor {fd}: {error}")]
    Io {
        from: &'static str,
        fd: RawFd,
        error: io::Error,
    },
    #[error("LISTEN_FDS={0}: not a number of descriptors")]
    BadCount(String),
}

/// The listening socket the daemon was handed, if any: `--socket-fd N`
/// (`socket_fd`), else the first socket of systemd's socket activation
/// when `$LISTEN_PID` is this process. The activation variables are
/// removed from the environment (sd_listen_fds(3) with `unset_environment`).
/// Call it before the daemon opens any descriptor of its own.
pub fn inherited_listener(socket_fd: Option<RawFd>) -> Result<Option<UnixListener>, InheritError> {
    if let Some(fd) = socket_fd {
        return claim(fd, "--socket-fd").map(Some);
    }
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Single-threaded still: nothing reads the environment meanwhile.
        std::env::remove_var(name);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        // For another process (one that exec'd this one, say).
        return Ok(None);
    }
    let count: RawFd = count
        .trim()
        .parse()
        .map_err(|_| InheritError::BadCount(count.clone()))?;
    if count < 1 {
        return Ok(None);
    }
    if count > 1 {
        warn!("LISTEN_FDS={count}: serving the first socket, descriptor {LISTEN_FDS_START}; the others are closed");
        for fd in LISTEN_FDS_START + 1..LISTEN_FDS_START.saturating_add(count) {
            if fd_is_open(fd) {
                // SAFETY: passed to this process by the service manager
                // (LISTEN_PID is ours) and not used by it otherwise: it is
                // owned here and closed.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    claim(LISTEN_FDS_START, "LISTEN_FDS").map(Some)
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD reads a descriptor's flags; no memory is involved.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Takes ownership of descriptor `fd`, handed over by `source`, after
/// checking that it is a listening Unix stream socket; made close-on-exec.
fn claim(fd: RawFd, source: &'static str) -> Result<UnixListener, InheritError> {
    if fd < 0 || !fd_is_open(fd) {
        return Err(InheritError::NotOpen { from: source, fd });
    }
    // SAFETY: the descriptor is open (checked above), was handed to this
    // process to serve (`--socket-fd`, or systemd's LISTEN_FDS for this
    // pid) and is claimed once, before the daemon opens descriptors of its
    // own: nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let io_error = |error: rustix::io::Errno| InheritError::Io {
        from: source,
        fd,
        error: error.into(),
    };
    let not_listening = InheritError::NotListening { from: source, fd };
    match rustix::net::sockopt::socket_domain(&owned) {
        Ok(domain) if domain == rustix::net::AddressFamily::UNIX => {}
        Ok(_) | Err(rustix::io::Errno::NOTSOCK) => return Err(not_listening),
        Err(e) => return Err(io_error(e)),
    }
    let stream = rustix::net::sockopt::socket_type(&owned).map_err(io_error)?
        == rustix::net::SocketType::STREAM;
    let listening = rustix::net::sockopt::socket_acceptconn(&owned).map_err(io_error)?;
    if !stream || !listening {
        return Err(not_listening);
    }
    let flags = rustix::io::fcntl_getfd(&owned).map_err(io_error)?;
    rustix::io::fcntl_setfd(&owned, flags | rustix::io::FdFlags::CLOEXEC).map_err(io_error)?;
    // Accepts block, as on a socket the daemon binds itself.
    let status = rustix::fs::fcntl_getfl(&owned).map_err(io_error)?;
    rustix::fs::fcntl_setfl(&owned, status - rustix::fs::OFlags::NONBLOCK).map_err(io_error)?;
    Ok(UnixListener::from(owned))
}

/// Where an inherited socket is bound, for the log and to check it against
/// `--socket-path`.
pub fn bound_path(listener: &UnixListener) -> Option<std::path::PathBuf> {
    listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
}

/// Sends `state` (`KEY=VALUE` lines, sd_notify(3)) to the service manager
/// if it listens (`$NOTIFY_SOCKET`: a path, or `@name` in the abstract
/// namespace); without one, nothing. A failure is logged, never fatal.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> io::Result<usize> {
        let socket = UnixDatagram::unbound()?;
        let bytes = target.as_encoded_bytes();
        let address = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(Path::new(&target))?,
        };
        socket.send_to_addr(state.as_bytes(), &address)
    })();
    match sent {
        Ok(_) => debug!("notified the service manager: {}", state.replace('\n', " ")),
        Err(e) => warn!(
            "cannot notify the service manager at {}: {e}",
            Path::new(&target).display()
        ),
    }
}

/// The descriptor number of `listener`, for the log.
pub fn fd_of(listener: &UnixListener) -> RawFd {
    listener.as_fd().as_raw_fd()
}
