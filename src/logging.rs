//! The daemon's logger: `env_logger`'s output, with warnings and errors
//! rate-limited per call site so that a guest cannot flood the host's
//! journal.
//!
//! A guest triggers log records at will: the daemon's own warnings about
//! malformed requests, but also the rust-vmm crates', which log on their own
//! (virtio-queue logs `Iterator error` on every pop from a ring whose
//! available index ran too far ahead; vhost-user-backend logs per event).
//! Every warning and error therefore passes a token bucket of its call site
//! (the source file and line, or the target where the record has no
//! location): `BURST` (10) records at once, then at most one per
//! `INTERVAL` (a second). The records in between are counted, not printed; the next
//! record that passes says how many of its kind were dropped
//! ("… [N similar messages suppressed]").
//!
//! Info, debug and trace records pass untouched: no guest action produces
//! an info record (they are startup and connection lines, e.g. one per LUN,
//! 16384 of them from one call site at a large startup), and debug or trace
//! output is what an operator asked for with `RUST_LOG`.
//!
//! Memory is bounded whatever the guest does: call sites live in a table of
//! `CALL_SITES` (128) fixed entries, allocated once; a call site arriving when
//! the table is full shares one overflow bucket with every other latecomer
//! (a program has a fixed number of call sites, so in practice the table
//! never fills). Nothing is keyed on a message's text, which a guest may
//! influence.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Records a call site may log at once before the limit applies.
pub(crate) const BURST: u32 = 10;
/// After the burst, at most one record per call site per interval.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);
/// Call sites tracked separately; later ones share one overflow bucket.
pub(crate) const CALL_SITES: usize = 128;

/// A source of monotonic time, injected so tests need no sleeps.
pub(crate) trait Clock: Send + Sync {
    /// Time since an arbitrary fixed origin; never decreases.
    fn now(&self) -> Duration;
}

/// The real monotonic clock.
pub(crate) struct MonotonicClock(Instant);

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// What the limiter decided about one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Print it; `suppressed` records of the same call site were dropped
    /// since the last one printed.
    Pass { suppressed: u64 },
    /// Drop it (counted).
    Drop,
}

/// One call site's token bucket.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// The call site's key; 0 = free entry.
    key: u64,
    /// Credit in nanoseconds: one record costs one interval's worth.
    credit_ns: u64,
    /// When `credit_ns` was last topped up.
    refilled_ns: u64,
    /// Records dropped since the last one that passed.
    suppressed: u64,
}

impl Bucket {
    fn admit(&mut self, now_ns: u64, interval_ns: u64, burst: u32) -> Decision {
        let capacity = interval_ns.saturating_mul(u64::from(burst));
        let elapsed = now_ns.saturating_sub(self.refilled_ns);
        self.credit_ns = self.credit_ns.saturating_add(elapsed).min(capacity);
        self.refilled_ns = now_ns.max(self.refilled_ns);
        if self.credit_ns >= interval_ns {
            self.credit_ns -= interval_ns;
            let suppressed = std::mem::take(&mut self.suppressed);
            Decision::Pass { suppressed }
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            Decision::Drop
        }
    }
}

/// Token buckets for a fixed number of call sites (plus the overflow
/// bucket), with no allocation after construction.
pub(crate) struct RateLimiter {
    buckets: Box<[Bucket]>,
    overflow: Bucket,
    interval_ns: u64,
    burst: u32,
}

impl RateLimiter {
    /// `sites` separately tracked call sites, each allowed `burst` records
    /// at once and one per `interval` after that.
    pub fn new(sites: usize, burst: u32, interval: Duration) -> Self {
        RateLimiter {
            buckets: vec![Bucket::default(); sites].into_boxed_slice(),
            overflow: Bucket::default(),
            interval_ns: u64::try_from(interval.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            burst: burst.max(1),
        }
    }

    /// Decides about a record of call site `key` at time `now` (a key of 0
    /// is treated as 1: 0 marks a free entry).
    pub(crate) fn admit(&mut self, key: u64, now: Duration) -> Decision {
        let key = key.max(1);
        let now_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let (interval_ns, burst) = (self.interval_ns, self.burst);
        let bucket = self.bucket(key, now_ns, interval_ns, burst);
        bucket.admit(now_ns, interval_ns, burst)
    }

    /// The call site's bucket: found by open addressing from the key's
    /// hash, taken (full of credit) if the site is new, the overflow bucket
    /// if the table is full.
    fn bucket(&mut self, key: u64, now_ns: u64, interval_ns: u64, burst: u32) -> &mut Bucket {
        let len = self.buckets.len();
        let start = (key % len.max(1) as u64) as usize;
        let mut found = None;
        for probe in 0..len {
            let i = (start + probe) % len;
            let b = &self.buckets[i];
            if b.key == key || b.key == 0 {
                found = Some(i);
                break;
            }
        }
        match found {
            Some(i) => {
                let b = &mut self.buckets[i];
                if b.key == 0 {
                    *b = Bucket {
                        key,
                        credit_ns: interval_ns.saturating_mul(u64::from(burst)),
                        refilled_ns: now_ns,
                        suppressed: 0,
                    };
                }
                b
            }
            None => {
                if self.overflow.key == 0 {
                    self.overflow = Bucket {
                        key: 1,
                        credit_ns: interval_ns.saturating_mul(u64::from(burst)),
                        refilled_ns: now_ns,
                        suppressed: 0,
                    };
                }
                &mut self.overflow
            }
        }
    }
}

/// FNV-1a over the parts that name a call site.
fn call_site_key(record: &Record<'_>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    };
    eat(record.target().as_bytes());
    if let Some(file) = record.file() {
        eat(file.as_bytes());
    }
    if let Some(line) = record.line() {
        eat(&line.to_le_bytes());
    }
    hash
}

/// A logger that rate-limits warnings and errors per call site before
/// handing records to `inner`.
pub(crate) struct RateLimitedLogger<L, C> {
    inner: L,
    clock: C,
    limiter: Mutex<RateLimiter>,
}

impl<L: Log, C: Clock> RateLimitedLogger<L, C> {
    pub fn new(inner: L, clock: C, limiter: RateLimiter) -> Self {
        RateLimitedLogger {
            inner,
            clock,
            limiter: Mutex::new(limiter),
        }
    }

    /// The wrapped logger (for the unit tests).
    #[cfg(test)]
    pub fn inner(&self) -> &L {
        &self.inner
    }
}

impl<L: Log, C: Clock> Log for RateLimitedLogger<L, C> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        // Only what the inner logger would print costs credit.
        if record.level() > Level::Warn || !self.inner.enabled(record.metadata()) {
            self.inner.log(record);
            return;
        }
        let decision = self
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(call_site_key(record), self.clock.now());
        match decision {
            Decision::Drop => {}
            Decision::Pass { suppressed: 0 } => self.inner.log(record),
            Decision::Pass { suppressed } => self.inner.log(
                &Record::builder()
                    .args(format_args!(
                        "{} [{suppressed} similar messages suppressed]",
                        record.args()
                    ))
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs the daemon's logger: `env_logger` configured from `RUST_LOG`
/// (default `info`), behind the per-call-site rate limit.
pub fn init() -> Result<(), log::SetLoggerError> {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max: LevelFilter = inner.filter();
    log::set_boxed_logger(Box::new(RateLimitedLogger::new(
        inner,
        MonotonicClock::new(),
        RateLimiter::new(CALL_SITES, BURST, INTERVAL),
    )))?;
    log::set_max_level(max);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn burst_then_one_per_interval() {
        let mut l = RateLimiter::new(8, 10, SECOND);
        let t0 = Duration::from_secs(100);
        for i in 0..10 {
            assert_eq!(
                l.admit(7, t0),
                Decision::Pass { suppressed: 0 },
                "record {i}"
            );
        }
        for _ in 0..1000 {
            assert_eq!(l.admit(7, t0), Decision::Drop);
        }
        // Just short of an interval: still nothing.
        assert_eq!(
            l.admit(7, t0 + SECOND - Duration::from_nanos(1)),
            Decision::Drop
        );
        // One interval on: one passes and reports the 1001 dropped.
        assert_eq!(l.admit(7, t0 + SECOND), Decision::Pass { suppressed: 1001 });
        assert_eq!(l.admit(7, t0 + SECOND), Decision::Drop);
        // Two more intervals: two pass, the count restarted.
        let t = t0 + 3 * SECOND;
        assert_eq!(l.admit(7, t), Decision::Pass { suppressed: 1 });
        assert_eq!(l.admit(7, t), Decision::Pass { suppressed: 0 });
        assert_eq!(l.admit(7, t), Decision::Drop);
    }

    #[test]
    fn credit_is_capped_at_the_burst() {
        let mut l = RateLimiter::new(8, 10, SECOND);
        assert_eq!(l.admit(3, Duration::ZERO), Decision::Pass { suppressed: 0 });
        // An hour of silence buys a burst, not 3600 records.
        let t = Duration::from_secs(3600);
        let passed = (0..100)
            .filter(|_| matches!(l.admit(3, t), Decision::Pass { .. }))
            .count();
        assert_eq!(passed, 10);
    }

    #[test]
    fn call_sites_are_limited_separately() {
        let mut l = RateLimiter::new(8, 2, SECOND);
        let t = Duration::from_secs(5);
        assert!(matches!(l.admit(1, t), Decision::Pass { .. }));
        assert!(matches!(l.admit(1, t), Decision::Pass { .. }));
        assert_eq!(l.admit(1, t), Decision::Drop);
        // Another site (even one hashing to the same slot) is unaffected.
        assert!(matches!(l.admit(9, t), Decision::Pass { .. }));
        assert!(matches!(l.admit(17, t), Decision::Pass { .. }));
        assert_eq!(l.admit(1, t), Decision::Drop);
    }

    #[test]
    fn a_full_table_shares_the_overflow_bucket() {
        let mut l = RateLimiter::new(4, 1, SECOND);
        let t = Duration::from_secs(1);
        for key in 1..=4 {
            assert!(matches!(l.admit(key, t), Decision::Pass { .. }));
        }
        // Sites 5 and 6 find no free entry: one bucket for both.
        assert!(matches!(l.admit(5, t), Decision::Pass { .. }));
        assert_eq!(l.admit(6, t), Decision::Drop);
        assert_eq!(l.admit(5, t), Decision::Drop);
        // The table did not grow: tracked sites still have their own.
        assert_eq!(l.buckets.len(), 4);
        assert!(matches!(l.admit(4, t + SECOND), Decision::Pass { .. }));
    }

    #[test]
    fn a_clock_going_backwards_grants_nothing() {
        let mut l = RateLimiter::new(8, 1, SECOND);
        let t = Duration::from_secs(10);
        assert!(matches!(l.admit(2, t), Decision::Pass { .. }));
        assert_eq!(l.admit(2, Duration::ZERO), Decision::Drop);
        assert_eq!(l.admit(2, t), Decision::Drop);
        assert_eq!(l.admit(2, t + SECOND), Decision::Pass { suppressed: 2 });
    }

    /// A clock the test moves.
    #[derive(Clone, Default)]
    struct TestClock(Arc<AtomicU64>);

    impl TestClock {
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    /// Collects what reaches it.
    #[derive(Default)]
    struct Collect(Mutex<Vec<(Level, String)>>);

    impl Log for Collect {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.level() <= Level::Debug
        }
        fn log(&self, record: &Record<'_>) {
            if !self.enabled(record.metadata()) {
                return;
            }
            self.0
                .lock()
                .unwrap()
                .push((record.level(), record.args().to_string()));
        }
        fn flush(&self) {}
    }

    fn record_at<'a>(
        level: Level,
        line: u32,
        args: std::fmt::Arguments<'a>,
        f: impl FnOnce(&Record<'_>),
    ) {
        f(&Record::builder()
            .level(level)
            .target("test")
            .file(Some("src/x.rs"))
            .line(Some(line))
            .args(args)
            .build());
    }

    #[test]
    fn logger_limits_warnings_per_line_and_reports_suppressed() {
        let clock = TestClock::default();
        let logger = RateLimitedLogger::new(
            Collect::default(),
            clock.clone(),
            RateLimiter::new(16, 3, SECOND),
        );
        for i in 0..50 {
            // Each message differs (guest-chosen text): still one call site.
            record_at(Level::Error, 10, format_args!("bad ring {i}"), |r| {
                logger.log(r)
            });
            record_at(Level::Warn, 20, format_args!("other {i}"), |r| {
                logger.log(r)
            });
        }
        clock.advance(SECOND);
        record_at(Level::Error, 10, format_args!("bad ring again"), |r| {
            logger.log(r)
        });
        let got = logger.inner().0.lock().unwrap().clone();
        let lines: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(
            lines,
            [
                "bad ring 0",
                "other 0",
                "bad ring 1",
                "other 1",
                "bad ring 2",
                "other 2",
                "bad ring again [47 similar messages suppressed]",
            ]
        );
        assert_eq!(got[6].0, Level::Error);
    }

    #[test]
    fn logger_passes_info_and_debug_unlimited() {
        let clock = TestClock::default();
        let logger =
            RateLimitedLogger::new(Collect::default(), clock, RateLimiter::new(16, 1, SECOND));
        for i in 0..20 {
            record_at(Level::Info, 30, format_args!("lun {i}"), |r| logger.log(r));
            record_at(Level::Debug, 31, format_args!("d {i}"), |r| logger.log(r));
            // Filtered out by the inner logger.
            record_at(Level::Trace, 32, format_args!("t {i}"), |r| logger.log(r));
        }
        assert_eq!(logger.inner().0.lock().unwrap().len(), 40);
    }
}
