//! A socket to the server (TCP or Unix) and connecting: the connect
//! timeout covers the connection and the handshake.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
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
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(ConnectError::Connect)?;
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
