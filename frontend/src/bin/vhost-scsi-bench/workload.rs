//! The I/O pattern and the two ways of running it: through the daemon
//! (virtio-scsi requests over vhost-user, one submitting thread per request
//! queue) and on the host (pread/pwrite on the image, one thread per queue,
//! one synchronous I/O at a time).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vhost_scsi_frontend::cdb::read_write;
use vhost_scsi_frontend::{Command, Data, FrontendError, LatencyHistogram, RequestQueue};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    RandRead,
    RandWrite,
    Read,
    Write,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
        }
    }

    pub fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::Write)
    }

    pub fn is_random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

/// When a phase ends: after a time, or after a number of I/Os per thread.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    Time(Duration),
    Ios(u64),
}

/// What one thread does.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub pattern: Pattern,
    /// Bytes per I/O.
    pub bs: u64,
    /// I/O positions in the image: image size / bs.
    pub positions: u64,
    pub threads: usize,
    pub seed: u64,
    /// How long to busy-poll the used ring before sleeping (zero: never).
    pub poll: std::time::Duration,
}

/// The offsets one thread visits, in units of `bs`: uniformly random over
/// the whole image, or sequential over the thread's own 1/threads of it.
pub struct Offsets {
    random: bool,
    rng: u64,
    start: u64,
    len: u64,
    next: u64,
}

impl Offsets {
    pub fn new(job: &Job, thread: usize) -> Offsets {
        let threads = job.threads.max(1) as u64;
        let t = thread as u64;
        let (start, end) = if job.pattern.is_random() {
            (0, job.positions)
        } else {
            (
                job.positions * t / threads,
                job.positions * (t + 1) / threads,
            )
        };
        Offsets {
            random: job.pattern.is_random(),
            // Never zero: xorshift would stay at zero.
            rng: (job.seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
            start,
            len: (end - start).max(1),
            next: 0,
        }
    }

    /// The next position (multiply by bs for the byte offset).
    pub fn next_position(&mut self) -> u64 {
        if self.random {
            // xorshift64*, then Lemire's multiply-shift into [0, len).
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
            self.start + ((u128::from(r) * u128::from(self.len)) >> 64) as u64
        } else {
            let p = self.start + self.next;
            self.next = (self.next + 1) % self.len;
            p
        }
    }
}

/// What one thread measured.
#[derive(Clone, Debug, Default)]
pub struct ThreadStats {
    pub ios: u64,
    pub bytes: u64,
    pub hist: LatencyHistogram,
    /// Kicks sent (EVENT_IDX suppresses most of them under load).
    pub kicks: u64,
    /// Times the thread slept on the call eventfd.
    pub waits: u64,
    /// Requests that ended with a unit attention (not counted in `ios`).
    pub unit_attentions: u64,
}

impl ThreadStats {
    pub fn merge(&mut self, other: &ThreadStats) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        self.hist.merge(&other.hist);
        self.kicks += other.kicks;
        self.waits += other.waits;
        self.unit_attentions += other.unit_attentions;
    }
}

/// Non-zero bytes, different in every 512-byte block of a 1 MiB chunk, for
/// images and write buffers.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (i as u64 / 512).wrapping_mul(131) ^ (i as u64).wrapping_mul(7) ^ seed;
        *b = (x as u8) | 1;
    }
}

/// Drives one request queue: keeps `queue.depth()` requests in flight until
/// the limit, then drains. `lun_block` is the LUN's logical block size.
pub fn drive_queue(
    queue: &mut RequestQueue,
    job: &Job,
    thread: usize,
    lun_block: u64,
    limit: Limit,
    abort: &AtomicBool,
) -> Result<ThreadStats, String> {
    let mut offsets = Offsets::new(job, thread);
    let mut stats = ThreadStats::default();
    let blocks = u32::try_from(job.bs / lun_block)
        .map_err(|_| format!("{} bytes per I/O is too large", job.bs))?;
    let data_len = job.bs as u32;
    let data = if job.pattern.is_write() {
        Data::Out(data_len)
    } else {
        Data::In(data_len)
    };
    let qerr = |e: FrontendError| e.to_string();
    let start = Instant::now();
    let mut issued = 0u64;
    // Requests that did not end GOOD, this reap: (slot, CHECK CONDITION,
    // what).
    let mut failures: Vec<(usize, bool, String)> = Vec::new();
    loop {
        let may_issue = |issued: u64| {
            !abort.load(Ordering::Relaxed)
                && match limit {
                    Limit::Ios(n) => issued < n,
                    Limit::Time(t) => start.elapsed() < t,
                }
        };
        while queue.in_flight() < queue.depth() && may_issue(issued) {
            let lba = offsets.next_position() * (job.bs / lun_block);
            let cdb = read_write(job.pattern.is_write(), lba, blocks);
            queue
                .submit(&Command {
                    lun: 0,
                    cdb: cdb.as_slice(),
                    data,
                })
                .map_err(qerr)?;
            issued += 1;
        }
        if queue.notify().map_err(qerr)? {
            stats.kicks += 1;
        }
        if queue.in_flight() == 0 {
            break;
        }
        let reaped = queue
            .reap(|c| {
                let now = Instant::now();
                match c.response {
                    Some(r) if r.is_good() && c.used_len >= 12 => {
                        stats.ios += 1;
                        stats.bytes += job.bs;
                        stats.hist.record(now - c.submitted);
                    }
                    other => failures.push((
                        c.slot,
                        other.is_some_and(|r| r.response == 0 && r.status == 0x02),
                        match other {
                            Some(r) => format!(
                                "response {} status {:#04x} sense_len {}",
                                r.response, r.status, r.sense_len
                            ),
                            None => format!("used length {} (no response)", c.used_len),
                        },
                    )),
                }
            })
            .map_err(qerr)?;
        // A unit attention (the LUN set changed, a reset) is reported once
        // to the next command, which an initiator retries (SAM-5 §5.14):
        // counted, not a failure; the load goes on with the next request.
        let mut failure = None;
        for (slot, check_condition, what) in failures.drain(..) {
            if check_condition
                && queue
                    .read_sense(slot, 18)
                    .is_ok_and(|s| is_unit_attention(&s))
            {
                stats.unit_attentions += 1;
            } else if failure.is_none() {
                failure = Some((slot, what));
            }
        }
        if let Some((slot, what)) = failure {
            abort.store(true, Ordering::Relaxed);
            let sense = queue
                .read_sense(slot, 18)
                .map(|s| format!(", sense {s:02x?}"))
                .unwrap_or_default();
            return Err(format!(
                "queue {}: a {} request failed: {what}{sense}",
                queue.index(),
                job.pattern.name()
            ));
        }
        if reaped == 0 {
            if !job.poll.is_zero() && queue.poll_used(job.poll).map_err(qerr)? {
                continue;
            }
            queue.wait().map_err(qerr)?;
            stats.waits += 1;
        }
    }
    Ok(stats)
}

/// Whether `sense` (fixed or descriptor format, SPC-4 §4.5) has the sense
/// key UNIT ATTENTION (6h).
fn is_unit_attention(sense: &[u8]) -> bool {
    let key = match sense.first().map(|b| b & 0x7f) {
        Some(0x72 | 0x73) => sense.get(1),
        Some(0x70 | 0x71) => sense.get(2),
        _ => None,
    };
    key.is_some_and(|k| k & 0x0f == 0x06)
}

/// A buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Result<AlignedBuf, String> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096)
            .map_err(|e| format!("buffer of {len} bytes: {e}"))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("cannot allocate {len} bytes"));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live, zero-initialised allocation of layout.size()
        // bytes, uniquely borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

pub fn open_image(path: &Path, write: bool, direct: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(|e| {
            format!(
                "{}: cannot open{}: {e}",
                path.display(),
                if direct { " with O_DIRECT" } else { "" }
            )
        })
}

/// The host's own ceiling: one synchronous pread/pwrite at a time on the
/// image, as thread `thread` of `job.threads`.
pub fn drive_host(
    path: &Path,
    direct: bool,
    job: &Job,
    thread: usize,
    limit: Limit,
    abort: &AtomicBool,
) -> Result<ThreadStats, String> {
    let file = open_image(path, job.pattern.is_write(), direct)?;
    let mut buf = AlignedBuf::new(job.bs as usize)?;
    let buf = buf.as_mut_slice();
    fill_pattern(buf, thread as u64);
    let mut offsets = Offsets::new(job, thread);
    let mut stats = ThreadStats::default();
    let start = Instant::now();
    let mut issued = 0u64;
    while !abort.load(Ordering::Relaxed)
        && match limit {
            Limit::Ios(n) => issued < n,
            Limit::Time(t) => start.elapsed() < t,
        }
    {
        let offset = offsets.next_position() * job.bs;
        let t0 = Instant::now();
        let r = if job.pattern.is_write() {
            file.write_at(buf, offset)
        } else {
            file.read_at(buf, offset)
        };
        let t1 = Instant::now();
        match r {
            Ok(n) if n as u64 == job.bs => {}
            Ok(n) => {
                abort.store(true, Ordering::Relaxed);
                return Err(format!(
                    "{}: short {} of {n} bytes at {offset}",
                    path.display(),
                    if job.pattern.is_write() {
                        "pwrite"
                    } else {
                        "pread"
                    }
                ));
            }
            Err(e) => {
                abort.store(true, Ordering::Relaxed);
                return Err(format!("{}: at {offset}: {e}", path.display()));
            }
        }
        issued += 1;
        stats.ios += 1;
        stats.bytes += job.bs;
        stats.hist.record(t1 - t0);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(pattern: Pattern, positions: u64, threads: usize) -> Job {
        Job {
            pattern,
            bs: 4096,
            positions,
            threads,
            seed: 1,
            poll: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn random_offsets_stay_in_range_and_spread() {
        let j = job(Pattern::RandRead, 1000, 2);
        let mut o = Offsets::new(&j, 1);
        let mut seen = vec![false; 1000];
        for _ in 0..20_000 {
            let p = o.next_position();
            assert!(p < 1000);
            seen[p as usize] = true;
        }
        assert!(seen.iter().filter(|&&s| s).count() > 990);
    }

    #[test]
    fn sequential_offsets_split_the_image_and_wrap() {
        let j = job(Pattern::Read, 10, 2);
        let mut a = Offsets::new(&j, 0);
        let mut b = Offsets::new(&j, 1);
        let first: Vec<u64> = (0..6).map(|_| a.next_position()).collect();
        assert_eq!(first, [0, 1, 2, 3, 4, 0]);
        assert_eq!(b.next_position(), 5);
    }

    #[test]
    fn pattern_is_never_zero() {
        let mut buf = vec![0u8; 4096];
        fill_pattern(&mut buf, 0);
        assert!(buf.iter().all(|&b| b != 0));
    }
}
