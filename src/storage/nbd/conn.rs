//! A socket to the server (TCP or Unix) and connecting: the connect
//! timeout covers the connection and the handshake.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::handshake::{handshake, HandshakeError, Negotiated};
use super::uri::{NbdAddress, NbdUri};

/// A connected socket.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Ends both directions: a thread blocked reading returns.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Bounds each later write (a peer that stopped reading).
    pub fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
            Stream::Unix(s) => s.set_write_timeout(Some(t)),
        }
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(b),
            Stream::Unix(s) => (&*s).write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The stream during the handshake: each read or write may take only the
/// time left before `until` (a server trickling its bytes cannot stretch
/// the negotiation past the connect timeout).
struct Deadlined<'a> {
    stream: &'a mut Stream,
    until: Instant,
}

impl Deadlined<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_timeouts(Some(left), Some(left))?;
        self.stream.read(b)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_timeouts(Some(left), Some(left))?;
        Write::write(self.stream, b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to a Unix socket by `until`: a server whose listen backlog is
/// full (hung, not accepting) makes a blocking connect() wait for ever,
/// so the connect is non-blocking and retried while it says EAGAIN.
fn connect_unix(path: &std::path::Path, until: Instant) -> io::Result<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(rustix::io::Errno::AGAIN) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(rustix::io::Errno::AGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the server accepts no connection",
                ))
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A host name's addresses as last resolved, and whether a lookup of it
/// is running.
#[derive(Default)]
struct Resolved {
    addrs: Vec<SocketAddr>,
    pending: bool,
    /// Their use was warned of (once until a lookup succeeds again).
    warned: bool,
}

static RESOLVED: LazyLock<Mutex<HashMap<(String, u16), Resolved>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The addresses of `host` (resolved at each connection: a name may
/// move). A lookup runs on a helper thread and is given until `until`;
/// if it fails or takes longer (a dead DNS server: tens of seconds; the
/// resolver's files replaced by rename, which the daemon's Landlock rules
/// then no longer let it read), the addresses the name last resolved to
/// are used, with a warning (once until a lookup succeeds). One lookup per name at a time: while one is
/// still running, the last addresses are used at once.
fn resolve(host: &str, port: u16, until: Instant) -> io::Result<Vec<SocketAddr>> {
    resolve_with(host, port, until, |host: &str, port| {
        (host, port).to_socket_addrs().map(Iterator::collect)
    })
}

fn resolve_with(
    host: &str,
    port: u16,
    until: Instant,
    lookup: impl FnOnce(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + 'static,
) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let key = (host.to_string(), port);
    let cache = || RESOLVED.lock().unwrap_or_else(PoisonError::into_inner);
    let start = {
        let mut c = cache();
        let entry = c.entry(key.clone()).or_default();
        !std::mem::replace(&mut entry.pending, true)
    };
    let result = if start {
        let (tx, rx) = mpsc::channel();
        let k = key.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-resolve".into())
            .spawn(move || {
                let r = lookup(&k.0, k.1);
                let mut c = cache();
                let entry = c.entry(k).or_default();
                entry.pending = false;
                if let Ok(addrs) = &r {
                    if !addrs.is_empty() {
                        entry.addrs.clone_from(addrs);
                        entry.warned = false;
                    }
                }
                drop(c);
                let _ = tx.send(r);
            });
        match spawned {
            Ok(_) => {
                let left = until.saturating_duration_since(Instant::now());
                rx.recv_timeout(left).unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer from the resolver in time",
                    ))
                })
            }
            Err(e) => {
                cache().entry(key.clone()).or_default().pending = false;
                Err(e)
            }
        }
    } else {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "an earlier lookup is still running",
        ))
    };
    let error = match result {
        Ok(addrs) if !addrs.is_empty() => return Ok(addrs),
        Ok(_) => io::Error::new(io::ErrorKind::NotFound, "no address for the host"),
        Err(e) => e,
    };
    let (last, warned) = match cache().get_mut(&key) {
        Some(r) if !r.addrs.is_empty() => (r.addrs.clone(), std::mem::replace(&mut r.warned, true)),
        _ => return Err(error),
    };
    let level = if warned {
        log::Level::Debug
    } else {
        log::Level::Warn
    };
    log::log!(
        level,
        "{host}: cannot resolve ({}); using the addresses it last resolved to ({})",
        super::io_message(&error),
        last.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(last)
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect: {}", super::io_message(.0))]
    Connect(io::Error),
    #[error("handshake failed: {0}")]
    Handshake(HandshakeError),
}

/// Connects to `uri` and negotiates its export, within `timeout` for the
/// whole (the connection, then the handshake in the time left); the
/// socket's writes then time out after `write_timeout` (a server that
/// stops reading cannot block a sender for longer), its reads never.
pub fn connect(
    uri: &NbdUri,
    timeout: Duration,
    write_timeout: Duration,
) -> Result<(Stream, Negotiated), ConnectError> {
    let until = Instant::now() + timeout;
    let stream = match &uri.address {
        NbdAddress::Unix(path) => {
            Stream::Unix(connect_unix(path, until).map_err(ConnectError::Connect)?)
        }
        NbdAddress::Tcp { host, port } => {
            // At most half the connect timeout for the name: the rest is
            // left for connecting (to the last addresses, if it failed).
            let lookup_until = Instant::now() + timeout / 2;
            let addrs = resolve(host, *port, lookup_until).map_err(ConnectError::Connect)?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for the host");
            let mut found = None;
            for addr in addrs {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    last = io::Error::new(io::ErrorKind::TimedOut, "connect timeout");
                    break;
                }
                match TcpStream::connect_timeout(&addr, left) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or(ConnectError::Connect(last))?;
            s.set_nodelay(true).map_err(ConnectError::Connect)?;
            Stream::Tcp(s)
        }
    };
    let mut s = stream;
    let mut deadlined = Deadlined {
        stream: &mut s,
        until,
    };
    let negotiated = handshake(&mut deadlined, &uri.export).map_err(|e| match e {
        HandshakeError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            ConnectError::Handshake(HandshakeError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )))
        }
        e => ConnectError::Handshake(e),
    })?;
    s.set_timeouts(None, Some(write_timeout))
        .map_err(ConnectError::Connect)?;
    Ok((s, negotiated))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_host_that_no_longer_resolves_gets_the_addresses_it_last_resolved_to() {
        let host = "fallback.nbd-test.invalid";
        let soon = || Instant::now() + Duration::from_secs(5);
        let fail = |_: &str, _: u16| Err(io::Error::other("resolver files unreadable"));
        // Never resolved: the error.
        assert!(resolve_with(host, 10809, soon(), fail).is_err());
        let ok = |_: &str, _: u16| Ok(vec![addr("192.0.2.7:10809")]);
        assert_eq!(
            resolve_with(host, 10809, soon(), ok).unwrap(),
            [addr("192.0.2.7:10809")]
        );
        assert_eq!(
            resolve_with(host, 10809, soon(), fail).unwrap(),
            [addr("192.0.2.7:10809")]
        );
        // An empty answer is a failure too.
        let empty = |_: &str, _: u16| Ok(vec![]);
        assert_eq!(
            resolve_with(host, 10809, soon(), empty).unwrap(),
            [addr("192.0.2.7:10809")]
        );
        // Another port is another entry.
        assert!(resolve_with(host, 10810, soon(), fail).is_err());
    }

    #[test]
    fn a_hung_lookup_is_given_up_at_the_deadline_and_not_started_again_while_running() {
        let host = "hung.nbd-test.invalid";
        let ok = |_: &str, _: u16| Ok(vec![addr("192.0.2.8:10809")]);
        let far = Instant::now() + Duration::from_secs(5);
        resolve_with(host, 10809, far, ok).unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        let hung = move |_: &str, _: u16| {
            let _ = rx.recv();
            Ok(vec![addr("192.0.2.9:10809")])
        };
        let start = Instant::now();
        let got = resolve_with(host, 10809, start + Duration::from_millis(100), hung).unwrap();
        assert_eq!(got, [addr("192.0.2.8:10809")]);
        assert!(start.elapsed() < Duration::from_secs(1));
        // Still running: the last addresses at once, no second lookup.
        let start = Instant::now();
        let never = |_: &str, _: u16| -> io::Result<Vec<SocketAddr>> { panic!("second lookup") };
        let got = resolve_with(host, 10809, start + Duration::from_secs(5), never).unwrap();
        assert_eq!(got, [addr("192.0.2.8:10809")]);
        assert!(start.elapsed() < Duration::from_millis(100));
        // When it answers at last, its addresses are kept.
        tx.send(()).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while RESOLVED.lock().unwrap()[&(host.to_string(), 10809)].pending {
            assert!(Instant::now() < until);
            std::thread::sleep(Duration::from_millis(5));
        }
        let fail = |_: &str, _: u16| Err(io::Error::other("down"));
        let got = resolve_with(host, 10809, Instant::now() + Duration::from_secs(5), fail).unwrap();
        assert_eq!(got, [addr("192.0.2.9:10809")]);
    }

    #[test]
    fn an_address_literal_is_not_looked_up() {
        let never = |_: &str, _: u16| -> io::Result<Vec<SocketAddr>> { panic!("looked up") };
        let soon = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            resolve_with("::1", 10809, soon, never).unwrap(),
            [addr("[::1]:10809")]
        );
        let never = |_: &str, _: u16| -> io::Result<Vec<SocketAddr>> { panic!("looked up") };
        assert_eq!(
            resolve_with("127.0.0.1", 10809, soon, never).unwrap(),
            [addr("127.0.0.1:10809")]
        );
    }
}
