//! An NBD client backend: a disk whose blocks an NBD server exports
//! (`qemu-nbd`, `qemu-storage-daemon`, `nbdkit`, `nbd-server`), reached
//! over TCP or a Unix socket.
//!
//! Written here rather than taken from crates.io: the crates there are
//! servers, or a minimal synchronous client (`nbd`) without structured
//! replies, block status, block size constraints or pipelining; libnbd's
//! bindings need the C library.
//!
//! Modules, each owning one thing: [`uri`] (the URI syntax), [`wire`]
//! (bytes and their checks), `handshake` (the fixed newstyle
//! negotiation), `conn` (sockets, connecting), `job` (an operation split
//! into commands, its memory and its one result), `slot` (a connection:
//! queue, commands in flight, driver and receiver threads, reconnection),
//! `durability` (what a lost connection means for acknowledged writes).
//!
//! [`NbdImage`] implements [`Storage`] (its synchronous methods submit
//! through the same machinery and wait, bounded by the request timeout)
//! and [`RemoteStorage`] (READ, WRITE and SYNCHRONIZE CACHE are handed to
//! the connections without waiting).

mod conn;
mod durability;
mod handshake;
mod job;
mod slot;
pub mod uri;
pub mod wire;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::conn::{connect, ConnectError};
use self::durability::Durability;
use self::handshake::Negotiated;
use self::job::{Bufs, Completer, Job, JobKind, Output, SyncWait};
use self::slot::Slot;
pub use self::uri::{NbdAddress, NbdUri};
use super::remote::{RemoteCompletion, RemoteOp, RemoteResult, RemoteStorage};
use super::{Extent, IoBufs, IoBufsMut, PinnedBufs, Storage};

/// Most connections to one export.
pub const MAX_CONNECTIONS: usize = 8;

/// Largest TRIM or WRITE_ZEROES command sent (longer ones are split).
const MAX_ZERO_COMMAND: u32 = 1 << 30;

/// Largest range one BLOCK_STATUS asks about.
const MAX_STATUS_COMMAND: u32 = 1 << 30;

/// Zeroes written at a time where the server has no WRITE_ZEROES.
const ZERO_FALLBACK_CHUNK: usize = 1 << 20;

/// How an export is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// Refuse writes (the export is read-only too if the server says so).
    pub read_only: bool,
    /// Connections to open (1 to [`MAX_CONNECTIONS`]); more than one only
    /// if the server advertises NBD_FLAG_CAN_MULTI_CONN, otherwise one is
    /// used (with a warning).
    pub connections: usize,
    /// A request not answered within this completes with `TimedOut`
    /// (`NotConnected` while the server is unreachable).
    pub timeout: Duration,
    /// Each connection attempt, handshake included.
    pub connect_timeout: Duration,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            read_only: false,
            connections: 1,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why an export could not be opened: one line naming the URI.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("{uri}: {reason}")]
    Uri { uri: String, reason: String },
    #[error("{uri}: {source}")]
    Connect { uri: String, source: ConnectError },
    #[error("{uri}: {reason}")]
    Options { uri: String, reason: String },
}

/// An I/O error as a message, without Rust's " (os error N)" suffix.
pub(crate) fn io_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What the connections share.
pub(crate) struct Shared {
    uri: NbdUri,
    options: NbdOptions,
    durability: Durability,
    /// What the latest handshake said.
    latest: Mutex<Negotiated>,
}

/// An NBD export as storage.
pub struct NbdImage {
    shared: Arc<Shared>,
    slots: Vec<Arc<Slot>>,
    threads: Vec<JoinHandle<()>>,
    size: AtomicU64,
    read_only: bool,
    /// What the first connection negotiated: the rules requests follow.
    negotiated: Negotiated,
    next_slot: AtomicUsize,
}

impl std::fmt::Debug for NbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdImage")
            .field("uri", &self.shared.uri.to_string())
            .field("size", &self.size())
            .field("connections", &self.slots.len())
            .finish()
    }
}

impl NbdImage {
    /// Connects to `uri` (each connection within the connect timeout) and
    /// negotiates its export.
    pub fn open(uri: &str, options: NbdOptions) -> Result<NbdImage, NbdError> {
        let parsed = NbdUri::parse(uri).map_err(|reason| NbdError::Uri {
            uri: uri.to_string(),
            reason,
        })?;
        if options.connections == 0 || options.connections > MAX_CONNECTIONS {
            return Err(NbdError::Options {
                uri: uri.to_string(),
                reason: format!("connections must be 1 to {MAX_CONNECTIONS}"),
            });
        }
        if options.timeout.is_zero() || options.connect_timeout.is_zero() {
            return Err(NbdError::Options {
                uri: uri.to_string(),
                reason: "timeouts must not be zero".into(),
            });
        }
        let fail = |source| NbdError::Connect {
            uri: uri.to_string(),
            source,
        };
        let first = connect(&parsed, options.connect_timeout, options.timeout).map_err(fail)?;
        let negotiated = first.1;
        let flags = negotiated.info.flags;
        let mut count = options.connections;
        if count > 1 && flags & wire::TF_CAN_MULTI_CONN == 0 {
            log::warn!("{uri}: the server does not allow several connections (no NBD_FLAG_CAN_MULTI_CONN); using one");
            count = 1;
        }
        let mut conns = vec![first];
        for _ in 1..count {
            conns.push(connect(&parsed, options.connect_timeout, options.timeout).map_err(fail)?);
        }
        let shared = Arc::new(Shared {
            uri: parsed,
            options,
            durability: Durability::default(),
            latest: Mutex::new(negotiated),
        });
        let mut slots = Vec::new();
        let mut threads = Vec::new();
        for (i, c) in conns.into_iter().enumerate() {
            let slot = Slot::new(i, shared.clone());
            let driver = slot.clone();
            let thread = std::thread::Builder::new()
                .name(format!("nbd-conn-{i}"))
                .spawn(move || driver.run(Some(c)))
                .map_err(|e| NbdError::Options {
                    uri: uri.to_string(),
                    reason: format!("cannot start a thread: {e}"),
                })?;
            threads.push(thread);
            let expirer = slot.clone();
            let thread = std::thread::Builder::new()
                .name(format!("nbd-expiry-{i}"))
                .spawn(move || expirer.expire_loop())
                .map_err(|e| NbdError::Options {
                    uri: uri.to_string(),
                    reason: format!("cannot start a thread: {e}"),
                })?;
            slots.push(slot);
            threads.push(thread);
        }
        Ok(NbdImage {
            shared,
            slots,
            threads,
            size: AtomicU64::new(negotiated.info.size),
            read_only: options.read_only || flags & wire::TF_READ_ONLY != 0,
            negotiated,
            next_slot: AtomicUsize::new(0),
        })
    }

    /// Connections in use.
    pub fn connections(&self) -> usize {
        self.slots.len()
    }

    /// How many connections are up now.
    pub fn connected(&self) -> usize {
        self.slots.iter().filter(|s| s.connected()).count()
    }

    /// The server's transmission flags (first connection).
    pub fn transmission_flags(&self) -> u16 {
        self.negotiated.info.flags
    }

    /// Whether extents come from the server (`base:allocation`).
    pub fn has_block_status(&self) -> bool {
        self.negotiated.allocation_context.is_some()
    }

    fn flags(&self) -> u16 {
        self.negotiated.info.flags
    }

    /// Starts a job: splits it and queues its commands on one connection.
    fn start(
        &self,
        kind: JobKind,
        offset: u64,
        len: u64,
        bufs: Bufs,
        completer: Completer,
    ) -> Instant {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let deadline = Instant::now() + self.shared.options.timeout;
        let job = Job::new(kind, offset, len, deadline, bufs, completer);
        let chunk = match kind {
            JobKind::Read | JobKind::Write { .. } => self.negotiated.info.block.max_payload(),
            JobKind::Trim | JobKind::Zero { .. } => {
                let min = self.negotiated.info.block.minimum.max(1);
                (MAX_ZERO_COMMAND / min) * min
            }
            JobKind::Flush | JobKind::BlockStatus => u32::MAX,
        };
        if let Some(subs) = job.split(chunk) {
            self.slots[slot].enqueue(subs);
        }
        deadline
    }

    /// Checks a transfer's range (and, for a write, that writes are
    /// allowed).
    fn check(&self, offset: u64, len: u64, write: bool) -> io::Result<()> {
        if write && self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{offset}+{len} beyond the export's {} bytes", self.size()),
            )),
        }
    }

    /// Runs a job and waits for it (bounded by the request timeout).
    fn run(&self, kind: JobKind, offset: u64, len: u64, bufs: Bufs) -> io::Result<(Output, Bufs)> {
        let wait = Arc::new(SyncWait::default());
        let deadline = self.start(kind, offset, len, bufs, Completer::Sync(wait.clone()));
        // The expiry thread fails the job at its deadline; the margin
        // is a safety net only.
        let margin = self.shared.options.connect_timeout + Duration::from_secs(1);
        match wait.wait(deadline + margin) {
            Some((result, bufs)) => result.map(|o| (o, bufs)),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no reply from the NBD server",
            )),
        }
    }

    /// NBD_CMD_TRIM: the server may deallocate the range, which then
    /// reads as anything (advisory; a no-op for a server without TRIM).
    /// Not part of [`Storage`], whose `write_zeroes` promises zeroes.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        self.run(JobKind::Trim, offset, len, Bufs::None).map(|_| ())
    }

    fn write_owned(&self, data: Vec<u8>, offset: u64, durable: bool) -> io::Result<()> {
        let len = data.len() as u64;
        self.run(
            JobKind::Write { fua: durable },
            offset,
            len,
            Bufs::Owned(data),
        )
        .map(|_| ())
    }
}

impl Drop for NbdImage {
    /// Disconnects (NBD_CMD_DISC) and ends the threads.
    fn drop(&mut self) {
        for s in &self.slots {
            s.close();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Storage for NbdImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    /// The size the server reports now: the handshake of a new connection
    /// (disconnected at once), given at most 3 s. NBD has no way to ask
    /// during transmission. If no connection can be made (a server taking
    /// one client only, such as qemu-nbd without `-e`, or a server down),
    /// the size the latest (re)connection reported, with a warning. A new
    /// size makes every connection reconnect once its commands in flight
    /// are answered (not a loss: nothing fails a flush), and this returns
    /// when they have (or `TimedOut` after the request timeout). Some
    /// servers (qemu-nbd, qemu-storage-daemon) fix the size when the
    /// export starts; nbdkit's file plugin reads it per connection.
    fn refresh_size(&self) -> io::Result<u64> {
        let options = &self.shared.options;
        let probe = options.connect_timeout.min(Duration::from_secs(3));
        let size = match connect(&self.shared.uri, probe, options.timeout) {
            Ok((mut stream, negotiated)) => {
                let _ =
                    io::Write::write_all(&mut stream, &wire::request(0, wire::CMD_DISC, 0, 0, 0));
                stream.shutdown();
                let size = negotiated.info.size;
                if size != self.size() {
                    // The connections keep the size of their handshake
                    // (servers check requests against it): each
                    // reconnects once its commands in flight are answered.
                    let deadline = Instant::now() + options.timeout;
                    let generations: Vec<u64> = self.slots.iter().map(|s| s.cycle()).collect();
                    for (slot, generation) in self.slots.iter().zip(generations) {
                        if !slot.wait_connected_after(generation, deadline) {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "no new connection for the new size",
                            ));
                        }
                    }
                }
                size
            }
            Err(e) => {
                log::warn!("{}: size from the last connection ({e})", self.shared.uri);
                self.shared
                    .latest
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .info
                    .size
            }
        };
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        let len = bufs.len();
        self.check(offset, len as u64, false)?;
        if len == 0 {
            return Ok(());
        }
        let (_, got) = self.run(JobKind::Read, offset, len as u64, Bufs::Owned(vec![0; len]))?;
        if let Bufs::Owned(data) = got {
            bufs.fill_from(&data);
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64, durable: bool) -> io::Result<()> {
        let len = bufs.len();
        self.check(offset, len as u64, true)?;
        if len == 0 {
            return if durable { self.flush() } else { Ok(()) };
        }
        let mut data = vec![0; len];
        bufs.gather_into(&mut data);
        self.write_owned(data, offset, durable)
    }

    fn transfer_granule(&self) -> usize {
        self.negotiated.info.block.minimum.max(1) as usize
    }

    fn flush(&self) -> io::Result<()> {
        self.run(JobKind::Flush, 0, 0, Bufs::None).map(|_| ())
    }

    /// WRITE_ZEROES (NO_HOLE unless deallocating); a server without it
    /// gets zeroes written, a MiB at a time.
    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        self.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        if self.flags() & wire::TF_SEND_WRITE_ZEROES != 0 {
            let kind = JobKind::Zero {
                no_hole: !deallocate,
            };
            return self.run(kind, offset, len, Bufs::None).map(|_| ());
        }
        let mut at = 0;
        while at < len {
            let n = (len - at).min(ZERO_FALLBACK_CHUNK as u64);
            self.write_owned(vec![0; n as usize], offset + at, false)?;
            at += n;
        }
        Ok(())
    }

    /// From `base:allocation` (a hole is deallocated); without it, all
    /// allocated.
    fn extent(&self, offset: u64) -> io::Result<Extent> {
        let size = self.size();
        if offset >= size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "extent past the end",
            ));
        }
        let len = (size - offset).min(u64::from(MAX_STATUS_COMMAND));
        if self.negotiated.allocation_context.is_none() {
            return Ok(Extent {
                allocated: true,
                len: size - offset,
            });
        }
        match self.run(JobKind::BlockStatus, offset, len, Bufs::None)? {
            (Output::Extent(e), _) if e.len > 0 => Ok(e),
            _ => Ok(Extent {
                allocated: true,
                len,
            }),
        }
    }

    fn remote(&self) -> Option<&dyn RemoteStorage> {
        Some(self)
    }
}

impl RemoteStorage for NbdImage {
    fn submit(&self, op: RemoteOp, bufs: PinnedBufs, completion: RemoteCompletion) {
        let (kind, offset, len) = match op {
            RemoteOp::Read { offset, len } => (JobKind::Read, offset, len),
            RemoteOp::Write {
                offset,
                len,
                durable,
            } => (JobKind::Write { fua: durable }, offset, len),
            RemoteOp::Flush => (JobKind::Flush, 0, 0),
            RemoteOp::Scsi { .. } => {
                drop(bufs);
                completion.complete(RemoteResult::Scsi(Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "an NBD export takes no SCSI commands",
                ))));
                return;
            }
        };
        let write = matches!(kind, JobKind::Write { .. });
        if kind != JobKind::Flush {
            if let Err(e) = self.check(offset, len as u64, write) {
                drop(bufs);
                completion.complete(RemoteResult::Io(Err(e)));
                return;
            }
            if len == 0 {
                drop(bufs);
                completion.complete(RemoteResult::Io(Ok(())));
                return;
            }
        }
        self.start(
            kind,
            offset,
            len as u64,
            Bufs::Pinned(bufs),
            Completer::Remote(completion),
        );
    }
}

#[cfg(test)]
mod review2_tests;
#[cfg(test)]
mod review_tests;
#[cfg(test)]
mod tests;
