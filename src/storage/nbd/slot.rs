//! One connection slot: its request queue, its commands in flight (by
//! cookie), and three threads. The driver thread connects (again, with
//! exponential backoff, after a loss) and sends queued commands (write
//! payloads copied from the job's memory a piece at a time, the job's
//! lock never held across a write()); the receiver thread reads replies
//! and completes commands; the expiry thread, which never touches the
//! network, fails jobs at their deadline whatever the other two are doing
//! (and shuts the socket down when a connection has to go: silent, a
//! command long past its deadline, or a write's job ended mid-payload).
//! Submitters only queue and signal: no caller ever waits on the network
//! here.
//!
//! A lost connection's commands in flight are queued again, in cookie
//! order, and sent on the next connection: reads and writes are
//! idempotent at their offset, and a FLUSH or FUA write completes only
//! when the new connection confirms it ([`super::durability`] says what a
//! loss means for writes acknowledged before it).

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::conn::{connect, Stream};
use super::handshake::Negotiated;
use super::job::{JobKind, Output, Sub};
use super::wire::{self, Asked, ChunkPlan, Violation};
use super::Shared;
use crate::storage::Extent;

/// First and longest wait between connection attempts.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The expiry thread's wait with nothing queued or in flight.
const EXPIRY_IDLE: Duration = Duration::from_secs(1);

/// A connection that lived this long had served (its loss resets the
/// backoff) even if it answered nothing.
const HEALTHY: Duration = Duration::from_secs(10);

/// Bytes moved between the socket and a job's memory at a time.
const BOUNCE: usize = 256 << 10;

struct InFlight {
    sub: Sub,
    cmd: u16,
    flags: u16,
    /// For a FLUSH: the writes it covers (`Durability::flush_sent`).
    covers: u64,
}

impl InFlight {
    fn asked(&self) -> Asked {
        Asked {
            cmd: self.cmd,
            offset: self.sub.offset,
            len: self.sub.len,
        }
    }
    fn copy(&self) -> InFlight {
        InFlight {
            sub: self.sub.clone(),
            ..*self
        }
    }
}

/// Why a connection ended.
struct End {
    why: String,
    /// The server may have lost writes it acknowledged: it closed or broke
    /// the connection, or fell silent (it may have restarted). A drop the
    /// client chose while the server was answering is not such a loss
    /// where the server shares one cache among its connections
    /// (NBD_FLAG_CAN_MULTI_CONN); see [`Slot::run`].
    loss: bool,
}

impl End {
    fn loss(why: impl Into<String>) -> End {
        End {
            why: why.into(),
            loss: true,
        }
    }
    fn deliberate(why: impl Into<String>) -> End {
        End {
            why: why.into(),
            loss: false,
        }
    }
}

/// What the chunks of one structured reply said so far.
#[derive(Default)]
struct Progress {
    /// Data and hole bytes.
    covered: u64,
    /// The first error chunk's.
    error: Option<u32>,
    /// The block status.
    extent: Option<(bool, u64)>,
}

#[derive(Default)]
struct SlotState {
    queue: VecDeque<Sub>,
    in_flight: HashMap<u64, InFlight>,
    next_cookie: u64,
    connected: bool,
    /// Why the connection has to end (the receiver found it broken, or
    /// the expiry thread or the sender dropped it).
    dead: Option<End>,
    closing: bool,
    /// Reconnect once nothing is in flight (the export's size changed).
    cycle: bool,
    /// Connections made so far.
    generation: u64,
    /// Connections ended with a possible loss of acknowledged writes (a
    /// durable write's trailing FLUSH after one does not cover it).
    losses: u64,
    /// The driver is between taking a command and having written it: a
    /// close shuts the socket down (a write to a server that stopped
    /// reading would block until the write timeout).
    writing: bool,
    /// The last reply completed, or when the first command in flight was
    /// sent after none was.
    last_heard: Option<Instant>,
    /// The connection's socket, for the expiry thread to shut down.
    sock: Option<Stream>,
    /// The WRITE whose payload is being sent (by cookie).
    sending: Option<u64>,
    /// The connection answered a command.
    served: bool,
    /// The expiry thread waits for work (an enqueue wakes it).
    expiry_idle: bool,
}

pub struct Slot {
    pub index: usize,
    shared: Arc<Shared>,
    state: Mutex<SlotState>,
    wake: Condvar,
    /// Wakes the expiry thread.
    expiry_wake: Condvar,
}

/// What ended a receiver.
enum RecvEnd {
    Io(io::Error),
    Violation(Violation),
}

impl From<io::Error> for RecvEnd {
    fn from(e: io::Error) -> Self {
        RecvEnd::Io(e)
    }
}
impl From<Violation> for RecvEnd {
    fn from(v: Violation) -> Self {
        RecvEnd::Violation(v)
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

impl Slot {
    pub fn new(index: usize, shared: Arc<Shared>) -> Arc<Slot> {
        Arc::new(Slot {
            index,
            shared,
            state: Mutex::new(SlotState {
                next_cookie: 1,
                ..SlotState::default()
            }),
            wake: Condvar::new(),
            expiry_wake: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues commands for the driver thread.
    pub fn enqueue(&self, subs: Vec<Sub>) {
        let mut st = self.lock();
        if st.closing {
            drop(st);
            for s in subs {
                s.job.fail(not_connected("the image is closed"));
            }
            return;
        }
        st.queue.extend(subs);
        let idle = std::mem::take(&mut st.expiry_idle);
        drop(st);
        self.wake.notify_all();
        if idle {
            self.expiry_wake.notify_all();
        }
    }

    /// Asks the driver thread to disconnect and end; a write in progress
    /// is cut short (the socket shut down), so the threads end at once.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closing = true;
        if st.writing {
            if let Some(sock) = &st.sock {
                sock.shutdown();
            }
        }
        drop(st);
        self.wake.notify_all();
        self.expiry_wake.notify_all();
    }

    /// Whether the slot has a connection now.
    pub fn connected(&self) -> bool {
        self.lock().connected
    }

    /// The driver thread: serves `conn` (the connection made at open),
    /// then reconnects after each loss until closed.
    pub fn run(self: Arc<Self>, mut conn: Option<(Stream, Negotiated)>) {
        let uri = self.shared.uri.clone();
        let mut backoff = BACKOFF_MIN;
        let mut first = true;
        loop {
            if let Some((stream, negotiated)) = conn.take() {
                if !first {
                    log::info!("{uri}: connection {} re-established", self.index);
                }
                first = false;
                *self
                    .shared
                    .latest
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = negotiated;
                let started = Instant::now();
                let multi_conn = negotiated.info.flags & wire::TF_CAN_MULTI_CONN != 0;
                let why = self.serve(stream, negotiated);
                // Only a connection that served resets the backoff: a
                // server that completes the handshake and closes is not
                // reconnected to in a tight loop.
                if self.lock().served || started.elapsed() >= HEALTHY {
                    backoff = BACKOFF_MIN;
                }
                let Some(why) = why else {
                    // Disconnected on purpose with nothing in flight: the
                    // server kept every write it acknowledged.
                    if self.requeue_in_flight() {
                        return;
                    }
                    log::info!(
                        "{uri}: connection {} reconnecting for the new size",
                        self.index
                    );
                    continue;
                };
                // A drop the client chose while the server was answering
                // (a command cut short at its deadline, or one left
                // unanswered while others were answered) loses nothing
                // where the server's cache is shared by its connections
                // (NBD_FLAG_CAN_MULTI_CONN: a FLUSH on the next one covers
                // what this one acknowledged). Without that flag the NBD
                // protocol does not promise it, so it counts as a loss.
                let possible_loss = why.loss || !multi_conn;
                let unflushed = possible_loss && {
                    self.lock().losses += 1;
                    self.shared.durability.connection_lost()
                };
                if self.requeue_in_flight() {
                    return;
                }
                let why = why.why;
                log::warn!(
                    "{uri}: connection {} {} ({why}){}; reconnecting in {backoff:?}",
                    self.index,
                    if possible_loss { "lost" } else { "dropped" },
                    if unflushed {
                        "; writes since the last flush may be lost: the next flush fails"
                    } else {
                        ""
                    }
                );
                self.wait_down(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            if self.lock().closing {
                self.fail_all();
                return;
            }
            let options = &self.shared.options;
            match connect(&uri, options.connect_timeout, options.timeout) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    log::debug!("{uri}: connection {}: {e}", self.index);
                    self.wait_down(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// While disconnected: waits `backoff` (the expiry thread fails jobs
    /// meanwhile); returns early when closing.
    fn wait_down(&self, backoff: Duration) {
        let until = Instant::now() + backoff;
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            if st.closing || now >= until {
                return;
            }
            st = self
                .wake
                .wait_timeout(st, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The expiry thread: fails jobs at their deadline, and drops a
    /// connection that has to go. It never waits on the network, so a
    /// driver stuck connecting or sending, or a receiver stuck reading,
    /// delays no result.
    pub fn expire_loop(self: Arc<Self>) {
        let mut st = self.lock();
        loop {
            // Closing: the driver fails what is left (and wakes this).
            if st.closing && st.queue.is_empty() && st.in_flight.is_empty() {
                return;
            }
            let now = Instant::now();
            let next = self.expire_locked(&mut st, now);
            let wait = match next {
                Some(t) => t
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None => {
                    st.expiry_idle = true;
                    EXPIRY_IDLE
                }
            };
            st = self
                .expiry_wake
                .wait_timeout(st, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            st.expiry_idle = false;
        }
    }

    /// Ends the current connection: says why (unless the receiver already
    /// did) and shuts its socket down (a thread blocked on it returns).
    fn kill_locked(&self, st: &mut SlotState, end: End) {
        if st.dead.is_none() {
            st.dead = Some(end);
        }
        if let Some(sock) = &st.sock {
            sock.shutdown();
        }
        self.wake.notify_all();
    }

    /// Fails the jobs past their deadline (their commands in flight stay,
    /// for their replies to be read and dropped), and drops a connection
    /// that has to go; returns when to look again (`None`: nothing to
    /// watch).
    fn expire_locked(&self, st: &mut SlotState, now: Instant) -> Option<Instant> {
        let down = !st.connected;
        let timeout = self.shared.options.timeout;
        // A command this long past its job's deadline is taken as never
        // to be answered: its connection is made again (else its entry
        // would stay as long as the server answers others).
        let stale = timeout.max(Duration::from_secs(1));
        let error = || {
            if down {
                not_connected(&format!("no connection to the server within {timeout:?}"))
            } else {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no reply within {timeout:?}"),
                )
            }
        };
        let mut earliest: Option<Instant> = None;
        let mut at = |t: Instant| earliest = Some(earliest.map_or(t, |e: Instant| e.min(t)));
        st.queue.retain(|s| {
            if s.job.deadline <= now {
                s.job.fail(error());
                false
            } else {
                at(s.job.deadline);
                true
            }
        });
        let mut mid_payload = false;
        let mut overdue = None;
        for (cookie, f) in &st.in_flight {
            if f.sub.job.deadline <= now {
                if !f.sub.job.finished() {
                    f.sub.job.fail_now(error());
                    // Its payload cannot be finished without its memory:
                    // the stream is unusable (`sending` is set once the
                    // payload's first bytes are committed).
                    mid_payload |= st.sending == Some(*cookie);
                }
                if f.sub.job.deadline + stale <= now {
                    overdue = Some(*cookie);
                } else {
                    at(f.sub.job.deadline + stale);
                }
            } else {
                at(f.sub.job.deadline);
            }
        }
        if mid_payload {
            let why = "a write timed out while its payload was sent";
            let end = if silent(st, now, timeout) {
                End::loss(why)
            } else {
                End::deliberate(why)
            };
            self.kill_locked(st, end);
        } else if !down && st.dead.is_none() {
            // A server that answered nothing for a whole timeout with
            // commands waiting is taken for gone (a silent peer: TCP would
            // notice only after many minutes); the connection is made
            // again.
            let heard = st.last_heard.filter(|_| !st.in_flight.is_empty());
            if silent(st, now, timeout) {
                self.kill_locked(st, End::loss(format!("no reply for {timeout:?}")));
            } else if let Some(cookie) = overdue {
                self.kill_locked(
                    st,
                    End::deliberate(format!(
                        "no reply to cookie {cookie} within {:?}",
                        timeout + stale
                    )),
                );
            } else if let Some(t) = heard {
                at(t + timeout);
            }
        }
        earliest
    }

    /// After a connection ended: its commands in flight go back to the
    /// head of the queue, oldest first. True if the slot is closing (every
    /// job then failed).
    fn requeue_in_flight(&self) -> bool {
        let mut st = self.lock();
        st.connected = false;
        st.dead = None;
        let mut entries: Vec<(u64, InFlight)> = st.in_flight.drain().collect();
        entries.sort_by_key(|(cookie, _)| *cookie);
        for (_, f) in entries.into_iter().rev() {
            if !f.sub.job.failing() {
                st.queue.push_front(f.sub);
            }
        }
        let closing = st.closing;
        drop(st);
        if closing {
            self.fail_all();
        }
        closing
    }

    fn fail_all(&self) {
        let mut st = self.lock();
        let queue = std::mem::take(&mut st.queue);
        let in_flight = std::mem::take(&mut st.in_flight);
        st.connected = false;
        drop(st);
        self.expiry_wake.notify_all();
        for s in queue {
            s.job.fail(not_connected("the image is closed"));
        }
        for f in in_flight.into_values() {
            f.sub.job.fail(not_connected("the image is closed"));
        }
    }

    /// Asks for a new connection once the commands in flight are
    /// answered (a disconnection, not a loss); returns the connection
    /// count to wait past with [`Slot::wait_connected_after`].
    pub fn cycle(&self) -> u64 {
        let mut st = self.lock();
        st.cycle = true;
        let generation = st.generation;
        drop(st);
        self.wake.notify_all();
        generation
    }

    /// Waits until a connection after the `generation`th is up; false at
    /// `deadline`.
    pub fn wait_connected_after(&self, generation: u64, deadline: Instant) -> bool {
        let mut st = self.lock();
        loop {
            if st.connected && st.generation > generation {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || st.closing {
                return false;
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Serves one connection until it breaks or the slot closes; returns
    /// why it ended, `None` for a disconnection asked by [`Slot::cycle`].
    fn serve(self: &Arc<Self>, stream: Stream, negotiated: Negotiated) -> Option<End> {
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => return Some(End::loss(super::io_message(&e))),
        };
        let epoch = {
            let mut st = self.lock();
            st.connected = true;
            st.dead = None;
            st.last_heard = None;
            st.served = false;
            st.writing = false;
            st.sock = stream.try_clone().ok();
            st.generation += 1;
            st.losses
        };
        self.wake.notify_all();
        self.expiry_wake.notify_all();
        let slot = self.clone();
        let receiver = std::thread::Builder::new()
            .name(format!("nbd-recv-{}", self.index))
            .spawn(move || slot.receive(reader, negotiated));
        let receiver = match receiver {
            Ok(r) => r,
            Err(e) => return Some(End::loss(format!("cannot start a thread: {e}"))),
        };
        let why = self.send_loop(&stream, &negotiated, epoch);
        if why.is_none() || self.lock().closing {
            // Best effort: the server may be gone, or have stopped
            // reading (the close is not held up for long).
            let _ = stream.set_write_timeout(Duration::from_millis(100));
            let _ = (&stream).write_all(&wire::request(0, wire::CMD_DISC, 0, 0, 0));
        }
        stream.shutdown();
        let _ = receiver.join();
        self.lock().sock = None;
        why
    }

    /// Sends queued commands until the connection breaks or the slot
    /// closes (`None`: a cycle asked for, nothing in flight).
    fn send_loop(&self, stream: &Stream, negotiated: &Negotiated, epoch: u64) -> Option<End> {
        let flags = negotiated.info.flags;
        let mut out = Vec::with_capacity(28 + BOUNCE);
        loop {
            // The next command to send.
            let sub = {
                let mut st = self.lock();
                st.writing = false;
                loop {
                    if st.closing {
                        return Some(End::deliberate("closing"));
                    }
                    if let Some(end) = st.dead.take() {
                        return Some(end);
                    }
                    if st.cycle && st.in_flight.is_empty() {
                        st.cycle = false;
                        return None;
                    }
                    if let Some(sub) = (!st.cycle).then(|| st.queue.pop_front()).flatten() {
                        if !sub.job.failing() {
                            st.writing = true;
                            break sub;
                        }
                        continue;
                    }
                    st = self
                        .wake
                        .wait_timeout(st, Duration::from_secs(1))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            };
            // What it becomes on this server.
            let (cmd, cmd_flags) = match sub.kind {
                JobKind::Read => (wire::CMD_READ, 0),
                JobKind::Write { fua } => {
                    if fua && flags & wire::TF_SEND_FUA == 0 && flags & wire::TF_SEND_FLUSH != 0 {
                        sub.job.needs_flush_after();
                    }
                    let fua = fua && flags & wire::TF_SEND_FUA != 0;
                    (wire::CMD_WRITE, if fua { wire::CMD_FLAG_FUA } else { 0 })
                }
                // A server without a volatile cache has nothing to flush;
                // TRIM is advisory.
                JobKind::Flush if flags & wire::TF_SEND_FLUSH == 0 => {
                    self.succeeded(&sub, Output::Nothing, epoch);
                    continue;
                }
                JobKind::Flush => (wire::CMD_FLUSH, 0),
                JobKind::Trim if flags & wire::TF_SEND_TRIM == 0 => {
                    self.succeeded(&sub, Output::Nothing, epoch);
                    continue;
                }
                JobKind::Trim => (wire::CMD_TRIM, 0),
                JobKind::Zero { .. } if flags & wire::TF_SEND_WRITE_ZEROES == 0 => {
                    sub.job.fail(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
                    continue;
                }
                JobKind::Zero { no_hole } => (
                    wire::CMD_WRITE_ZEROES,
                    if no_hole { wire::CMD_FLAG_NO_HOLE } else { 0 },
                ),
                JobKind::BlockStatus if negotiated.allocation_context.is_none() => {
                    let extent = Extent {
                        allocated: true,
                        len: u64::from(sub.len),
                    };
                    self.succeeded(&sub, Output::Extent(extent), epoch);
                    continue;
                }
                JobKind::BlockStatus => (wire::CMD_BLOCK_STATUS, 0),
            };
            let covers = if cmd == wire::CMD_FLUSH {
                self.shared.durability.flush_sent()
            } else {
                0
            };
            let cookie = {
                let mut st = self.lock();
                let cookie = st.next_cookie;
                st.next_cookie += 1;
                if st.in_flight.is_empty() {
                    st.last_heard = Some(Instant::now());
                }
                st.in_flight.insert(
                    cookie,
                    InFlight {
                        sub: sub.clone(),
                        cmd,
                        flags: cmd_flags,
                        covers,
                    },
                );
                cookie
            };
            let header = wire::request(cmd_flags, cmd, cookie, sub.offset, sub.len);
            let sent = if cmd == wire::CMD_WRITE {
                // The payload is copied from the job's memory a piece at a
                // time, the job's lock not held across a write(): its
                // deadline can hand the memory back at any point (the
                // expiry thread then shuts the socket down); an error
                // reply to another of its commands waits for the payload.
                let r = if sub.job.begin_send() {
                    let r = write_payload(stream, &header, &sub, &mut out, || {
                        self.lock().sending = Some(cookie);
                    });
                    self.lock().sending = None;
                    sub.job.end_send();
                    r
                } else {
                    Ok(Payload::NotSent)
                };
                match r {
                    Ok(Payload::Sent) => Ok(()),
                    Ok(Payload::NotSent) => {
                        // Finished (timed out, or failed) before it was
                        // sent.
                        self.lock().in_flight.remove(&cookie);
                        continue;
                    }
                    Ok(Payload::Cut) => {
                        // Its deadline came mid-payload: the command is
                        // half sent, the stream unusable.
                        let mut st = self.lock();
                        let why = "a write timed out while its payload was sent";
                        let end = if silent(&st, Instant::now(), self.shared.options.timeout) {
                            End::loss(why)
                        } else {
                            End::deliberate(why)
                        };
                        self.kill_locked(&mut st, end);
                        return st.dead.take();
                    }
                    Err(e) => Err(e),
                }
            } else {
                let mut s: &Stream = stream;
                s.write_all(&header)
            };
            if let Err(e) = sent {
                // The expiry thread or a close may have cut it: their
                // reason, else the server's.
                let mut st = self.lock();
                if st.closing {
                    return Some(End::deliberate("closing"));
                }
                return Some(
                    st.dead.take().unwrap_or_else(|| {
                        End::loss(format!("sending: {}", super::io_message(&e)))
                    }),
                );
            }
        }
    }

    /// A command answered (by the server at loss epoch `epoch`, or
    /// without it).
    fn succeeded(&self, sub: &Sub, output: Output, epoch: u64) {
        if let Some(flush) = sub.job.sub_done(output, &self.shared.durability, epoch) {
            self.enqueue(vec![flush]);
        }
    }

    /// The receiver thread: reads replies until the connection breaks or
    /// the server breaks the protocol, then says why.
    fn receive(self: Arc<Self>, stream: Stream, negotiated: Negotiated) {
        let why = match self.receive_loop(stream, &negotiated) {
            RecvEnd::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                "closed by the server".into()
            }
            RecvEnd::Io(e) => super::io_message(&e),
            RecvEnd::Violation(v) => v.to_string(),
        };
        self.lock().dead.get_or_insert(End::loss(why));
        self.wake.notify_all();
    }

    fn lookup(&self, cookie: u64) -> Result<InFlight, Violation> {
        match self.lock().in_flight.get(&cookie) {
            Some(f) => Ok(f.copy()),
            None => Err(Violation(format!("reply to unknown cookie {cookie}"))),
        }
    }

    fn receive_loop(&self, stream: Stream, negotiated: &Negotiated) -> RecvEnd {
        let mut r = BufReader::with_capacity(64 << 10, stream);
        let mut bounce = vec![0u8; BOUNCE];
        let mut progress: HashMap<u64, Progress> = HashMap::new();
        loop {
            let step = (|| -> Result<(), RecvEnd> {
                let magic = u32::from_be_bytes(read_array::<4>(&mut r)?);
                if wire::reply_header_rest(magic, negotiated.structured)? == 12 {
                    let (error, cookie) = wire::parse_simple(&read_array::<12>(&mut r)?);
                    let f = self.lookup(cookie)?;
                    if progress.contains_key(&cookie) {
                        return Err(Violation(format!(
                            "simple reply to cookie {cookie} after chunks"
                        ))
                        .into());
                    }
                    if error == 0 && f.cmd == wire::CMD_READ {
                        read_into(&mut r, &f.sub, 0, f.sub.len as usize, &mut bounce)?;
                    }
                    let result = if error == 0 {
                        Ok(Output::Nothing)
                    } else {
                        Err(error)
                    };
                    self.reply_done(cookie, &f, result);
                    return Ok(());
                }
                let h = wire::parse_chunk_header(&read_array::<16>(&mut r)?);
                let f = self.lookup(h.cookie)?;
                let asked = f.asked();
                let p = progress.entry(h.cookie).or_default();
                match wire::plan_chunk(&h, &asked)? {
                    ChunkPlan::None => {}
                    ChunkPlan::Data { data_len } => {
                        let at = wire::data_at(read_array::<8>(&mut r)?, data_len, &asked)?;
                        p.covered += u64::from(data_len);
                        if p.covered > u64::from(asked.len) {
                            return Err(Violation(format!(
                                "overlapping chunks for cookie {}",
                                h.cookie
                            ))
                            .into());
                        }
                        read_into(&mut r, &f.sub, at, data_len as usize, &mut bounce)?;
                    }
                    ChunkPlan::Hole => {
                        let (at, len) = wire::parse_hole(&read_array::<12>(&mut r)?, &asked)?;
                        p.covered += u64::from(len);
                        if p.covered > u64::from(asked.len) {
                            return Err(Violation(format!(
                                "overlapping chunks for cookie {}",
                                h.cookie
                            ))
                            .into());
                        }
                        zero_into(&f.sub, at, len as usize);
                    }
                    ChunkPlan::Whole => {
                        // Bounded by plan_chunk (MAX_META_CHUNK).
                        let mut payload = vec![0u8; h.len as usize];
                        r.read_exact(&mut payload)?;
                        if h.kind & wire::CHUNK_ERROR_BIT != 0 {
                            let e = wire::parse_error_chunk(h.kind, &payload, &asked)?;
                            p.error.get_or_insert(e);
                        } else {
                            let ctx = negotiated.allocation_context.unwrap_or(u32::MAX);
                            let extent = wire::parse_block_status(&payload, ctx, &asked)?;
                            p.extent.get_or_insert(extent);
                        }
                    }
                }
                if h.flags & wire::REPLY_FLAG_DONE != 0 {
                    let Progress {
                        covered,
                        error,
                        extent,
                    } = progress.remove(&h.cookie).unwrap_or_default();
                    let result = match error {
                        Some(e) => Err(e),
                        None if f.cmd == wire::CMD_READ && covered != u64::from(asked.len) => {
                            return Err(Violation(format!(
                                "read of {} answered with {covered} bytes",
                                asked.len
                            ))
                            .into())
                        }
                        None if f.cmd == wire::CMD_BLOCK_STATUS => {
                            // No descriptor for our context: proto.md
                            // requires one; read as allocated.
                            let (allocated, len) = extent.unwrap_or((true, u64::from(asked.len)));
                            Ok(Output::Extent(Extent { allocated, len }))
                        }
                        None => Ok(Output::Nothing),
                    };
                    self.reply_done(h.cookie, &f, result);
                }
                Ok(())
            })();
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// A command's last reply arrived.
    fn reply_done(&self, cookie: u64, f: &InFlight, result: Result<Output, u32>) {
        let epoch = {
            let mut st = self.lock();
            st.in_flight.remove(&cookie);
            st.last_heard = Some(Instant::now());
            st.served = true;
            st.losses
        };
        match result {
            Ok(output) => {
                let durability = &self.shared.durability;
                match f.cmd {
                    wire::CMD_WRITE if f.flags & wire::CMD_FLAG_FUA != 0 => {}
                    wire::CMD_WRITE | wire::CMD_TRIM | wire::CMD_WRITE_ZEROES => {
                        durability.write_acked()
                    }
                    wire::CMD_FLUSH => durability.flush_done(f.covers),
                    _ => {}
                }
                self.succeeded(&f.sub, output, epoch);
            }
            Err(e) => f.sub.job.fail(io::Error::from_raw_os_error(wire::errno(e))),
        }
    }
}

fn not_connected(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, what.to_string())
}

/// Whether a server that has answered nothing for `timeout` with
/// commands waiting is to be taken for gone.
fn silent(st: &SlotState, now: Instant, timeout: Duration) -> bool {
    st.last_heard
        .filter(|_| !st.in_flight.is_empty())
        .is_some_and(|t| now.saturating_duration_since(t) >= timeout)
}

/// How far a WRITE went.
enum Payload {
    Sent,
    /// The job finished before anything was sent.
    NotSent,
    /// The job finished mid-payload (its deadline): a command half sent
    /// leaves the stream unusable; the caller drops the connection.
    Cut,
}

/// Writes a WRITE's header and payload; the payload is copied from the
/// job's memory in bounded pieces, the job's lock held only while
/// copying. `committed` is called once the first piece is copied, before
/// anything is written.
fn write_payload(
    stream: &Stream,
    header: &[u8; 28],
    sub: &Sub,
    out: &mut Vec<u8>,
    committed: impl FnOnce(),
) -> io::Result<Payload> {
    let mut committed = Some(committed);
    let mut s: &Stream = stream;
    let total = sub.len as usize;
    let mut done = 0;
    out.clear();
    out.extend_from_slice(header);
    loop {
        let n = (total - done).min(BOUNCE);
        let start = out.len();
        out.resize(start + n, 0);
        match sub
            .job
            .with_bufs(|bufs| bufs.gather_at(sub.buf_at + done, &mut out[start..]))
        {
            Some(true) => {
                if let Some(f) = committed.take() {
                    f();
                }
            }
            Some(false) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "write memory shorter than the write",
                ))
            }
            None if done == 0 => return Ok(Payload::NotSent),
            None => return Ok(Payload::Cut),
        }
        s.write_all(out)?;
        out.clear();
        done += n;
        if done >= total {
            return Ok(Payload::Sent);
        }
    }
}

/// Reads `len` bytes of data from the socket into the command's place in
/// its job's memory (dropped if the job has finished).
fn read_into(
    r: &mut impl Read,
    sub: &Sub,
    at: usize,
    len: usize,
    bounce: &mut [u8],
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(bounce.len());
        r.read_exact(&mut bounce[..n])?;
        sub.job
            .with_bufs(|b| b.fill_at(sub.buf_at + at + done, &bounce[..n]));
        done += n;
    }
    Ok(())
}

fn zero_into(sub: &Sub, at: usize, len: usize) {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROES.len());
        sub.job
            .with_bufs(|b| b.fill_at(sub.buf_at + at + done, &ZEROES[..n]));
        done += n;
    }
}
