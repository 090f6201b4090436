//! One connection slot: its request queue, its commands in flight (by
//! cookie), and two threads. The driver thread connects (again, with
//! exponential backoff, after a loss), sends queued commands (write
//! payloads straight from the job's memory) and times jobs out; the
//! receiver thread reads replies and completes commands. Submitters only
//! queue and signal: no caller ever waits on the network here.
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

/// How often the driver looks for jobs past their deadline.
const EXPIRY_TICK: Duration = Duration::from_millis(50);

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
    /// Why the receiver found the connection broken.
    dead: Option<String>,
    closing: bool,
    /// Reconnect once nothing is in flight (the export's size changed).
    cycle: bool,
    /// Connections made so far.
    generation: u64,
    /// The last reply completed, or when the first command in flight was
    /// sent after none was.
    last_heard: Option<Instant>,
    next_expiry: Option<Instant>,
}

pub struct Slot {
    pub index: usize,
    shared: Arc<Shared>,
    state: Mutex<SlotState>,
    wake: Condvar,
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
        drop(st);
        self.wake.notify_all();
    }

    /// Asks the driver thread to disconnect and end.
    pub fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_all();
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
                backoff = BACKOFF_MIN;
                if !first {
                    log::info!("{uri}: connection {} re-established", self.index);
                }
                first = false;
                *self
                    .shared
                    .latest
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = negotiated;
                let why = self.serve(stream, negotiated);
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
                let unflushed = self.shared.durability.connection_lost();
                if self.requeue_in_flight() {
                    return;
                }
                log::warn!(
                    "{uri}: connection {} lost ({why}){}; reconnecting",
                    self.index,
                    if unflushed {
                        "; writes since the last flush may be lost: the next flush fails"
                    } else {
                        ""
                    }
                );
            }
            if self.lock().closing {
                self.fail_all();
                return;
            }
            self.expire(Instant::now(), true);
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

    /// While disconnected: waits `backoff`, failing jobs whose deadline
    /// passes meanwhile; returns early when closing.
    fn wait_down(&self, backoff: Duration) {
        let until = Instant::now() + backoff;
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            if st.closing || now >= until {
                return;
            }
            let next = self.expire_locked(&mut st, now, true);
            let wake_at = next.map_or(until, |d| d.min(until));
            st = self
                .wake
                .wait_timeout(
                    st,
                    wake_at
                        .saturating_duration_since(now)
                        .max(Duration::from_millis(1)),
                )
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn expire(&self, now: Instant, down: bool) {
        let mut st = self.lock();
        self.expire_locked(&mut st, now, down);
    }

    /// Fails the jobs past their deadline (their commands in flight stay,
    /// for their replies to be read and dropped); returns the earliest
    /// deadline left.
    fn expire_locked(&self, st: &mut SlotState, now: Instant, down: bool) -> Option<Instant> {
        st.next_expiry = Some(now + EXPIRY_TICK);
        let timeout = self.shared.options.timeout;
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
        st.queue.retain(|s| {
            if s.job.deadline <= now {
                s.job.fail(error());
                false
            } else {
                earliest = Some(earliest.map_or(s.job.deadline, |e| e.min(s.job.deadline)));
                true
            }
        });
        for f in st.in_flight.values() {
            if f.sub.job.deadline <= now {
                f.sub.job.fail(error());
            }
        }
        // A server that answered nothing for a whole timeout with commands
        // waiting is taken for gone (a silent peer: TCP would notice only
        // after many minutes); the connection is made again.
        let silent = st
            .last_heard
            .is_some_and(|t| now.saturating_duration_since(t) >= timeout);
        if !down && !st.in_flight.is_empty() && silent && st.dead.is_none() {
            st.dead = Some(format!("no reply for {timeout:?}"));
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
            if !f.sub.job.finished() {
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
    fn serve(self: &Arc<Self>, stream: Stream, negotiated: Negotiated) -> Option<String> {
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => return Some(super::io_message(&e)),
        };
        {
            let mut st = self.lock();
            st.connected = true;
            st.dead = None;
            st.last_heard = None;
            st.generation += 1;
        }
        self.wake.notify_all();
        let slot = self.clone();
        let receiver = std::thread::Builder::new()
            .name(format!("nbd-recv-{}", self.index))
            .spawn(move || slot.receive(reader, negotiated));
        let receiver = match receiver {
            Ok(r) => r,
            Err(e) => return Some(format!("cannot start a thread: {e}")),
        };
        let why = self.send_loop(&stream, &negotiated);
        if why.is_none() || self.lock().closing {
            // Best effort: the server may be gone.
            let _ = (&stream).write_all(&wire::request(0, wire::CMD_DISC, 0, 0, 0));
        }
        stream.shutdown();
        let _ = receiver.join();
        why
    }

    /// Sends queued commands until the connection breaks or the slot
    /// closes (`None`: a cycle asked for, nothing in flight).
    fn send_loop(&self, stream: &Stream, negotiated: &Negotiated) -> Option<String> {
        let flags = negotiated.info.flags;
        let mut out = Vec::with_capacity(28 + BOUNCE);
        loop {
            // The next command to send.
            let sub = {
                let mut st = self.lock();
                loop {
                    let now = Instant::now();
                    if st.next_expiry.is_none_or(|t| now >= t) {
                        self.expire_locked(&mut st, now, false);
                    }
                    if st.closing {
                        return Some("closing".into());
                    }
                    if let Some(why) = st.dead.take() {
                        return Some(why);
                    }
                    if st.cycle && st.in_flight.is_empty() {
                        st.cycle = false;
                        return None;
                    }
                    if let Some(sub) = (!st.cycle).then(|| st.queue.pop_front()).flatten() {
                        if !sub.job.finished() {
                            break sub;
                        }
                        continue;
                    }
                    let idle = st.in_flight.is_empty();
                    let wait = if idle {
                        Duration::from_secs(1)
                    } else {
                        EXPIRY_TICK
                    };
                    st = self
                        .wake
                        .wait_timeout(st, wait)
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
                    self.succeeded(&sub, Output::Nothing);
                    continue;
                }
                JobKind::Flush => (wire::CMD_FLUSH, 0),
                JobKind::Trim if flags & wire::TF_SEND_TRIM == 0 => {
                    self.succeeded(&sub, Output::Nothing);
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
                    self.succeeded(&sub, Output::Extent(extent));
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
                // The job's memory stays with it (a deadline cannot hand
                // it back) until the payload is sent; bounded by the
                // socket's write timeout.
                match sub
                    .job
                    .with_bufs(|bufs| write_payload(stream, &header, bufs, &sub, &mut out))
                {
                    Some(r) => r,
                    None => {
                        // Finished (timed out) before it was sent.
                        self.lock().in_flight.remove(&cookie);
                        continue;
                    }
                }
            } else {
                let mut s: &Stream = stream;
                s.write_all(&header)
            };
            if let Err(e) = sent {
                return Some(format!("sending: {}", super::io_message(&e)));
            }
        }
    }

    /// A command answered without the server.
    fn succeeded(&self, sub: &Sub, output: Output) {
        if let Some(flush) = sub.job.sub_done(output, &self.shared.durability) {
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
        self.lock().dead = Some(why);
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
        {
            let mut st = self.lock();
            st.in_flight.remove(&cookie);
            st.last_heard = Some(Instant::now());
        }
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
                self.succeeded(&f.sub, output);
            }
            Err(e) => f.sub.job.fail(io::Error::from_raw_os_error(wire::errno(e))),
        }
    }
}

fn not_connected(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, what.to_string())
}

/// Writes a WRITE's header and payload; the payload comes from the job's
/// memory in bounded pieces.
fn write_payload(
    stream: &Stream,
    header: &[u8; 28],
    bufs: &mut super::job::Bufs,
    sub: &Sub,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let mut s: &Stream = stream;
    let total = sub.len as usize;
    let mut done = 0;
    out.clear();
    out.extend_from_slice(header);
    loop {
        let n = (total - done).min(BOUNCE);
        let start = out.len();
        out.resize(start + n, 0);
        if !bufs.gather_at(sub.buf_at + done, &mut out[start..]) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write memory shorter than the write",
            ));
        }
        s.write_all(out)?;
        out.clear();
        done += n;
        if done >= total {
            return Ok(());
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
