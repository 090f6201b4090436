//! Per-LUN statistics: what the management API's `stats` method reports
//! for a logical unit.
//!
//! # What is counted, and when
//!
//! Each logical unit has one [`LunStats`], shared by every worker thread.
//! The request path tells it two things about every command addressed to
//! the unit:
//!
//! - [`LunStats::started`] when the command begins: `in_flight` goes up.
//! - [`LunStats::completed`] when its status is known, with a
//!   [`CommandOutcome`]: `in_flight` goes down (saturating at zero, so a
//!   completion without a start never wraps), and everything else is
//!   counted then. **A command counts when it completes**; one in flight
//!   appears only in `in_flight`.
//!
//! What a [`StatsSnapshot`] holds, all counted since the unit was created:
//!
//! - `commands`: completed commands by [`CommandKind`], classified from the
//!   CDB's operation code ([`CommandKind::of`]), whatever their status.
//! - `bytes_read`, `bytes_written`: bytes actually transferred (data-in
//!   of reads, data-out of writes), as the caller reports them; a failed
//!   command reports 0.
//! - `flushes`: SYNCHRONIZE CACHE commands, the same number as
//!   `commands.flush` (the management API names it on its own).
//! - `unmaps`: UNMAP commands, the same number as `commands.unmap`. A
//!   WRITE SAME with its UNMAP bit set also deallocates, but it counts
//!   under `commands.write_same` only: the statistics look at the
//!   operation code, never at the rest of the CDB.
//! - `errors`: commands that completed with sense data (CHECK CONDITION),
//!   by sense key, named as in SPC-4 §4.5.6 (table 49) in snake_case;
//!   only keys seen at least once appear. RECOVERED ERROR and COMPLETED,
//!   which are not failures, are counted here too: this is a count of
//!   sense keys returned. The sense key is the low four bits of the
//!   value passed (byte 2 of fixed-format sense data may be given as it
//!   is); 0Ch, obsolete in SPC-4, is named `obsolete`.
//! - `in_flight`: commands started and not yet completed, now.
//! - `latency_us`: the latency the caller measured (typically from the
//!   command's start to its completion), in **microseconds**, see
//!   [`LatencySummary`].
//!
//! # Latency histogram
//!
//! A latency is counted in whole microseconds, rounded up (0.4 µs counts
//! as 1 µs), in one of 200 fixed buckets: log-linear, exact below 16 µs,
//! then every power of two split into 8 equal sub-buckets, up to
//! 2^27 µs (about 134 s); anything longer lands in the last bucket. A
//! bucket's width is at most 1/8 of its lower bound, so a percentile,
//! reported as the upper bound of the bucket holding it, is never below
//! the true value (in whole microseconds) and less than 12.5 % above it.
//! It is further capped at the exact maximum, so a single sample, or the
//! open-ended last bucket, reports the maximum itself. `mean` and `max`
//! are exact (at the microsecond resolution). The sum of latencies wraps
//! after 2^64 µs, over half a million years of summed latency.
//!
//! # Cost on the I/O path
//!
//! No lock, no system call, and no allocation but one, the latency
//! histogram's (about 1.6 KiB), at the unit's first completion, so a LUN
//! never used costs only its counters: `started` is one atomic add;
//! `completed` is one compare-and-swap (the saturating `in_flight`), the
//! command kind's counter, the byte counter the command moved (none for a
//! command without data), the latency bucket and sum, a load of the
//! maximum (an atomic max only when it grows) and, on error only, the
//! sense key's counter: six or seven uncontended atomic read-modify-writes
//! on cache lines the unit's other commands share. All use `Relaxed`
//! ordering: the counters order nothing. A [`LunStats`] is 232 bytes (in
//! the unit, next to its other per-command state: commands to one unit
//! share those lines anyway); the histogram it points to is 1616 bytes.
//!
//! [`LunStats::snapshot`] reads every counter once, one after the other:
//! taken while commands complete, it is not an instant (a command may
//! show in `commands` and not yet in `latency_us`), but each counter is
//! exact.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a command does, from its operation code (SBC-3, SPC-4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// READ (6), (10), (12), (16).
    Read,
    /// WRITE (6), (10), (12), (16); WRITE AND VERIFY (10), (12), (16).
    Write,
    /// SYNCHRONIZE CACHE (10), (16).
    Flush,
    /// UNMAP.
    Unmap,
    /// WRITE SAME (10), (16).
    WriteSame,
    /// COMPARE AND WRITE.
    CompareAndWrite,
    /// VERIFY (10), (12), (16).
    Verify,
    /// Everything else: INQUIRY, TEST UNIT READY, MODE SENSE, REPORT LUNS,
    /// READ CAPACITY, ..., and the 32-byte variable-length CDBs (7Fh),
    /// which this target does not implement.
    Other,
}

/// How many kinds there are: the length of the per-kind counters.
const KINDS: usize = 8;

impl CommandKind {
    /// The kind of the command whose CDB starts with `opcode`.
    pub fn of(opcode: u8) -> CommandKind {
        match opcode {
            0x08 // READ (6)
            | 0x28 // READ (10)
            | 0xa8 // READ (12)
            | 0x88 // READ (16)
            => CommandKind::Read,
            0x0a // WRITE (6)
            | 0x2a // WRITE (10)
            | 0xaa // WRITE (12)
            | 0x8a // WRITE (16)
            | 0x2e // WRITE AND VERIFY (10)
            | 0xae // WRITE AND VERIFY (12)
            | 0x8e // WRITE AND VERIFY (16)
            => CommandKind::Write,
            0x35 // SYNCHRONIZE CACHE (10)
            | 0x91 // SYNCHRONIZE CACHE (16)
            => CommandKind::Flush,
            0x42 // UNMAP
            => CommandKind::Unmap,
            0x41 // WRITE SAME (10)
            | 0x93 // WRITE SAME (16)
            => CommandKind::WriteSame,
            0x89 // COMPARE AND WRITE
            => CommandKind::CompareAndWrite,
            0x2f // VERIFY (10)
            | 0xaf // VERIFY (12)
            | 0x8f // VERIFY (16)
            => CommandKind::Verify,
            _ => CommandKind::Other,
        }
    }

    /// The index of this kind's counter.
    fn index(self) -> usize {
        match self {
            CommandKind::Read => 0,
            CommandKind::Write => 1,
            CommandKind::Flush => 2,
            CommandKind::Unmap => 3,
            CommandKind::WriteSame => 4,
            CommandKind::CompareAndWrite => 5,
            CommandKind::Verify => 6,
            CommandKind::Other => 7,
        }
    }
}

/// How a command ended, as [`LunStats::completed`] counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandOutcome {
    /// From the CDB's operation code: [`CommandKind::of`].
    pub kind: CommandKind,
    /// Bytes transferred to the initiator (data-in); 0 if the command
    /// failed or moved none.
    pub bytes_read: u64,
    /// Bytes transferred from the initiator and written (data-out); 0 if
    /// the command failed or moved none.
    pub bytes_written: u64,
    /// The sense key of the sense data returned (its low four bits are
    /// used), or `None` for GOOD status.
    pub sense_key: Option<u8>,
    /// How long the command took.
    pub latency: Duration,
}

/// Sense key names (SPC-4 §4.5.6, table 49), indexed by sense key, in
/// snake_case; 0Ch is obsolete in SPC-4 (EQUAL in SCSI-2).
const SENSE_KEY_NAMES: [&str; 16] = [
    "no_sense",
    "recovered_error",
    "not_ready",
    "medium_error",
    "hardware_error",
    "illegal_request",
    "unit_attention",
    "data_protect",
    "blank_check",
    "vendor_specific",
    "copy_aborted",
    "aborted_command",
    "obsolete",
    "volume_overflow",
    "miscompare",
    "completed",
];

/// One logical unit's statistics: lock-free, updated through `&self` by
/// every worker thread. What it counts, and what that costs: the module
/// documentation of `src/scsi/stats.rs`.
#[derive(Debug)]
#[repr(C)]
pub struct LunStats {
    // The counters every command touches come first, on the first two
    // cache lines (with the pointer to the histogram).
    in_flight: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Completed commands, indexed by [`CommandKind::index`].
    commands: [AtomicU64; KINDS],
    /// Allocated at the unit's first completion: a unit never used costs
    /// no histogram (16384 idle LUNs would otherwise cost 26 MiB).
    latency: OnceLock<Box<Histogram>>,
    /// Completions with sense data, indexed by sense key.
    errors: [AtomicU64; 16],
}

impl Default for LunStats {
    fn default() -> Self {
        Self::new()
    }
}

impl LunStats {
    /// All counters at zero.
    pub const fn new() -> LunStats {
        LunStats {
            in_flight: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            commands: [const { AtomicU64::new(0) }; KINDS],
            latency: OnceLock::new(),
            errors: [const { AtomicU64::new(0) }; 16],
        }
    }

    /// A command to this unit began.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// A command to this unit ended, as `c` says.
    pub fn completed(&self, c: &CommandOutcome) {
        // Saturating: a completion without a start leaves 0, never wraps.
        let _ = self
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        self.commands[c.kind.index()].fetch_add(1, Relaxed);
        if c.bytes_read != 0 {
            self.bytes_read.fetch_add(c.bytes_read, Relaxed);
        }
        if c.bytes_written != 0 {
            self.bytes_written.fetch_add(c.bytes_written, Relaxed);
        }
        if let Some(key) = c.sense_key {
            self.errors[usize::from(key & 0x0f)].fetch_add(1, Relaxed);
        }
        self.latency
            .get_or_init(|| Box::new(Histogram::new()))
            .record(c.latency);
    }

    /// The counters now (read one after the other, not as one instant).
    pub fn snapshot(&self) -> StatsSnapshot {
        let count = |kind: CommandKind| self.commands[kind.index()].load(Relaxed);
        let commands = CommandCounts {
            read: count(CommandKind::Read),
            write: count(CommandKind::Write),
            flush: count(CommandKind::Flush),
            unmap: count(CommandKind::Unmap),
            write_same: count(CommandKind::WriteSame),
            compare_and_write: count(CommandKind::CompareAndWrite),
            verify: count(CommandKind::Verify),
            other: count(CommandKind::Other),
        };
        let errors = self
            .errors
            .iter()
            .zip(SENSE_KEY_NAMES)
            .map(|(n, name)| (name, n.load(Relaxed)))
            .filter(|&(_, n)| n != 0)
            .map(|(name, n)| (name.to_owned(), n))
            .collect();
        StatsSnapshot {
            flushes: commands.flush,
            unmaps: commands.unmap,
            commands,
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            errors,
            in_flight: self.in_flight.load(Relaxed),
            latency_us: self
                .latency
                .get()
                .map_or_else(LatencySummary::none, |h| h.summary()),
        }
    }
}

/// A unit's statistics at one time, as the management API reports them.
/// What each field counts: the module documentation of `src/scsi/stats.rs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Completed commands by kind.
    pub commands: CommandCounts,
    /// Bytes transferred to the initiator.
    pub bytes_read: u64,
    /// Bytes transferred from the initiator and written.
    pub bytes_written: u64,
    /// SYNCHRONIZE CACHE commands (= `commands.flush`).
    pub flushes: u64,
    /// UNMAP commands (= `commands.unmap`; WRITE SAME with UNMAP is not
    /// counted here).
    pub unmaps: u64,
    /// Completions with sense data, by sense key name; only keys with a
    /// non-zero count.
    pub errors: BTreeMap<String, u64>,
    /// Commands started and not completed.
    pub in_flight: u64,
    /// Latency of completed commands, in microseconds.
    pub latency_us: LatencySummary,
}

/// Completed commands by [`CommandKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandCounts {
    pub read: u64,
    pub write: u64,
    pub flush: u64,
    pub unmap: u64,
    pub write_same: u64,
    pub compare_and_write: u64,
    pub verify: u64,
    pub other: u64,
}

/// Latency of completed commands, in whole microseconds (each latency
/// rounded up). With no command completed, every field is 0.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Commands whose latency was counted.
    pub count: u64,
    /// The mean, exact (of the rounded-up latencies).
    pub mean: f64,
    /// Percentiles (nearest rank): the upper bound of the histogram bucket
    /// holding the value, capped at `max`; never below the true value,
    /// less than 12.5 % above it.
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    /// The largest latency, exact.
    pub max: u64,
}

impl LatencySummary {
    /// No samples: every field 0.
    fn none() -> LatencySummary {
        LatencySummary {
            count: 0,
            mean: 0.0,
            p50: 0,
            p90: 0,
            p99: 0,
            p999: 0,
            max: 0,
        }
    }
}

/// Sub-buckets per power of two: 2^3 = 8, a relative error below 1/8.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// The highest power of two with buckets of its own: [2^26, 2^27) µs,
/// 67 s to 134 s; longer latencies land in its last bucket.
const TOP_EXP: u32 = 26;
/// Exact buckets 0..8, then 8 per power of two from 2^3 to 2^TOP_EXP.
const BUCKETS: usize = ((TOP_EXP - SUB_BITS + 2) as usize) * (SUB as usize);

/// A fixed log-linear latency histogram in microseconds, lock-free.
#[derive(Debug)]
#[repr(C)]
struct Histogram {
    /// Sum of the latencies (wrapping).
    sum: AtomicU64,
    max: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// The bucket counting `us` microseconds.
fn bucket_of(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let exp = u64::BITS - 1 - us.leading_zeros();
    let sub = (us >> (exp - SUB_BITS)) & (SUB - 1);
    let index = (exp - SUB_BITS + 1) as usize * SUB as usize + sub as usize;
    index.min(BUCKETS - 1)
}

/// The smallest and largest value bucket `index` counts; the last bucket is
/// open-ended (its upper bound is `u64::MAX`).
fn bucket_bounds(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < SUB {
        return (index, index);
    }
    let group = index / SUB;
    let exp = group as u32 - 1 + SUB_BITS;
    let width = 1u64 << (exp - SUB_BITS);
    let lower = (1u64 << exp) + (index % SUB) * width;
    if index as usize == BUCKETS - 1 {
        (lower, u64::MAX)
    } else {
        (lower, lower + width - 1)
    }
}

/// A latency in whole microseconds, rounded up, saturating.
fn micros_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1000)).unwrap_or(u64::MAX)
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
        }
    }

    fn record(&self, latency: Duration) {
        let us = micros_ceil(latency);
        self.buckets[bucket_of(us)].fetch_add(1, Relaxed);
        self.sum.fetch_add(us, Relaxed);
        // A plain load first: the maximum rarely grows, and a load does
        // not take the cache line exclusively as fetch_max would.
        if us > self.max.load(Relaxed) {
            self.max.fetch_max(us, Relaxed);
        }
    }

    fn summary(&self) -> LatencySummary {
        let counts: [u64; BUCKETS] = std::array::from_fn(|i| self.buckets[i].load(Relaxed));
        let sum = self.sum.load(Relaxed);
        let max = self.max.load(Relaxed);
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::none();
        }
        // Nearest rank: the value of the ceil(count × per_mille / 1000)-th
        // smallest sample.
        let percentile = |per_mille: u64| -> u64 {
            let rank = (u128::from(count) * u128::from(per_mille)).div_ceil(1000);
            let rank = u64::try_from(rank).unwrap_or(u64::MAX).max(1);
            let mut seen = 0u64;
            for (index, &n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    let (lower, upper) = bucket_bounds(index);
                    // Capped at the maximum, unless a sample counted in the
                    // bucket has not reached the maximum yet (a snapshot
                    // racing a completion): never below the bucket.
                    return upper.min(max.max(lower));
                }
            }
            max
        };
        LatencySummary {
            count,
            mean: sum as f64 / count as f64,
            p50: percentile(500),
            p90: percentile(900),
            p99: percentile(990),
            p999: percentile(999),
            max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Barrier;

    fn outcome(kind: CommandKind) -> CommandOutcome {
        CommandOutcome {
            kind,
            bytes_read: 0,
            bytes_written: 0,
            sense_key: None,
            latency: Duration::from_micros(1),
        }
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn classifies_opcodes() {
        use CommandKind::*;
        let table: &[(u8, CommandKind)] = &[
            (0x08, Read),            // READ (6)
            (0x28, Read),            // READ (10)
            (0xa8, Read),            // READ (12)
            (0x88, Read),            // READ (16)
            (0x0a, Write),           // WRITE (6)
            (0x2a, Write),           // WRITE (10)
            (0xaa, Write),           // WRITE (12)
            (0x8a, Write),           // WRITE (16)
            (0x2e, Write),           // WRITE AND VERIFY (10)
            (0xae, Write),           // WRITE AND VERIFY (12)
            (0x8e, Write),           // WRITE AND VERIFY (16)
            (0x35, Flush),           // SYNCHRONIZE CACHE (10)
            (0x91, Flush),           // SYNCHRONIZE CACHE (16)
            (0x42, Unmap),           // UNMAP
            (0x41, WriteSame),       // WRITE SAME (10)
            (0x93, WriteSame),       // WRITE SAME (16)
            (0x89, CompareAndWrite), // COMPARE AND WRITE
            (0x2f, Verify),          // VERIFY (10)
            (0xaf, Verify),          // VERIFY (12)
            (0x8f, Verify),          // VERIFY (16)
            (0x12, Other),           // INQUIRY
            (0x00, Other),           // TEST UNIT READY
            (0x1a, Other),           // MODE SENSE (6)
            (0x5a, Other),           // MODE SENSE (10)
            (0xa0, Other),           // REPORT LUNS
            (0x25, Other),           // READ CAPACITY (10)
            (0x9e, Other),           // SERVICE ACTION IN (16)
            (0x7f, Other),           // variable-length CDB
            (0xff, Other),
        ];
        for &(opcode, kind) in table {
            assert_eq!(CommandKind::of(opcode), kind, "opcode {opcode:#04x}");
        }
        // The 20 opcodes above that are not Other are the only ones.
        let not_other = (0..=255u8)
            .filter(|&op| CommandKind::of(op) != Other)
            .count();
        assert_eq!(not_other, 20);
    }

    #[test]
    fn counts_commands_and_bytes() {
        let stats = LunStats::new();
        let done = |kind, bytes_read, bytes_written| {
            stats.started();
            stats.completed(&CommandOutcome {
                bytes_read,
                bytes_written,
                ..outcome(kind)
            });
        };
        done(CommandKind::Read, 4096, 0);
        done(CommandKind::Read, 512, 0);
        done(CommandKind::Write, 0, 8192);
        done(CommandKind::CompareAndWrite, 512, 512);
        done(CommandKind::Flush, 0, 0);
        done(CommandKind::Flush, 0, 0);
        done(CommandKind::Unmap, 0, 0);
        done(CommandKind::WriteSame, 0, 0);
        done(CommandKind::Verify, 0, 0);
        done(CommandKind::Other, 36, 0);
        let s = stats.snapshot();
        assert_eq!(
            s.commands,
            CommandCounts {
                read: 2,
                write: 1,
                flush: 2,
                unmap: 1,
                write_same: 1,
                compare_and_write: 1,
                verify: 1,
                other: 1,
            }
        );
        assert_eq!(s.bytes_read, 4096 + 512 + 512 + 36);
        assert_eq!(s.bytes_written, 8192 + 512);
        assert_eq!(s.flushes, 2);
        assert_eq!(s.unmaps, 1);
        assert_eq!(s.in_flight, 0);
        assert!(s.errors.is_empty());
        assert_eq!(s.latency_us.count, 10);
    }

    #[test]
    fn counts_errors_by_sense_key() {
        let stats = LunStats::new();
        let fail = |key: u8| {
            stats.completed(&CommandOutcome {
                sense_key: Some(key),
                ..outcome(CommandKind::Read)
            })
        };
        fail(0x05); // ILLEGAL REQUEST
        fail(0x05);
        fail(0x03); // MEDIUM ERROR
        fail(0x0e); // MISCOMPARE
        fail(0x07); // DATA PROTECT
        fail(0x06); // UNIT ATTENTION
        fail(0x01); // RECOVERED ERROR
        fail(0x0b); // ABORTED COMMAND
        fail(0x0f); // COMPLETED
        fail(0x25); // byte 2 of fixed sense with ILI set: ILLEGAL REQUEST
        stats.completed(&outcome(CommandKind::Read)); // GOOD
        let s = stats.snapshot();
        let expected: BTreeMap<String, u64> = [
            ("illegal_request", 3),
            ("medium_error", 1),
            ("miscompare", 1),
            ("data_protect", 1),
            ("unit_attention", 1),
            ("recovered_error", 1),
            ("aborted_command", 1),
            ("completed", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(s.errors, expected);
        assert_eq!(s.commands.read, 11);
    }

    #[test]
    fn names_every_sense_key() {
        let stats = LunStats::new();
        // Key k completes k + 1 times, so no two names share a count.
        for key in 0..16u8 {
            for _ in 0..=key {
                stats.completed(&CommandOutcome {
                    sense_key: Some(key),
                    ..outcome(CommandKind::Other)
                });
            }
        }
        // 0h to Fh in order.
        let names = [
            "no_sense",
            "recovered_error",
            "not_ready",
            "medium_error",
            "hardware_error",
            "illegal_request",
            "unit_attention",
            "data_protect",
            "blank_check",
            "vendor_specific",
            "copy_aborted",
            "aborted_command",
            "obsolete",
            "volume_overflow",
            "miscompare",
            "completed",
        ];
        let expected: BTreeMap<String, u64> = names
            .into_iter()
            .zip(1..)
            .map(|(k, n)| (k.to_owned(), n))
            .collect();
        assert_eq!(stats.snapshot().errors, expected);
    }

    #[test]
    fn in_flight_saturates_at_zero() {
        let stats = LunStats::new();
        stats.completed(&outcome(CommandKind::Other));
        assert_eq!(stats.snapshot().in_flight, 0);
        stats.started();
        stats.started();
        assert_eq!(stats.snapshot().in_flight, 2);
        stats.completed(&outcome(CommandKind::Other));
        assert_eq!(stats.snapshot().in_flight, 1);
        assert_eq!(stats.snapshot().commands.other, 2);
    }

    #[test]
    fn concurrent_threads_count_exactly() {
        const THREADS: u64 = 4;
        const PER_THREAD: u64 = 10_000;
        let stats = LunStats::new();
        let barrier = Barrier::new(THREADS as usize + 1);
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    for _ in 0..PER_THREAD {
                        stats.started();
                    }
                    barrier.wait(); // all started
                    barrier.wait(); // checked
                    for _ in 0..PER_THREAD {
                        stats.completed(&CommandOutcome {
                            bytes_written: 512,
                            ..outcome(CommandKind::Write)
                        });
                    }
                });
            }
            barrier.wait();
            assert_eq!(stats.snapshot().in_flight, 40_000);
            barrier.wait();
        });
        let s = stats.snapshot();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.commands.write, 40_000);
        assert_eq!(s.bytes_written, 40_000 * 512);
        assert_eq!(s.latency_us.count, 40_000);
        assert_eq!(s.latency_us.max, 1);
    }

    #[test]
    fn buckets_tile_the_range() {
        // Every value up to past the top falls in the bucket whose bounds
        // hold it, and consecutive buckets leave no gap.
        assert_eq!(BUCKETS, 200);
        for v in (0..100_000).chain([(1 << 27) - 1, 1 << 27, u64::MAX]) {
            let (lower, upper) = bucket_bounds(bucket_of(v));
            assert!(lower <= v && v <= upper, "{v} in {lower}..={upper}");
        }
        for i in 1..BUCKETS {
            assert_eq!(bucket_bounds(i).0, bucket_bounds(i - 1).1 + 1, "bucket {i}");
        }
        // Exact below 16 µs; then widths of 2, 4, ...: [16, 17], [480, 511].
        assert_eq!(bucket_bounds(bucket_of(15)), (15, 15));
        assert_eq!(bucket_bounds(bucket_of(16)), (16, 17));
        assert_eq!(bucket_bounds(bucket_of(500)), (480, 511));
        // The last: from 15 × 2^23 = 125829120 µs, open-ended.
        assert_eq!(bucket_bounds(BUCKETS - 1), (125_829_120, u64::MAX));
    }

    #[test]
    fn bucket_error_is_below_one_eighth() {
        for v in 1..(1 << 20) {
            let (_, upper) = bucket_bounds(bucket_of(v));
            assert!(upper >= v && (upper - v) * 8 < v, "{v}: {upper}");
        }
    }

    #[test]
    fn latency_of_a_uniform_distribution() {
        let stats = LunStats::new();
        for n in 1..=1000 {
            stats.completed(&CommandOutcome {
                latency: us(n),
                ..outcome(CommandKind::Read)
            });
        }
        let l = stats.snapshot().latency_us;
        assert_eq!(l.count, 1000);
        assert_eq!(l.mean, 500.5); // 500500 / 1000
        assert_eq!(l.max, 1000);
        // Nearest rank: p50 is the 500th value, 500 µs, in [480, 511].
        assert_eq!(l.p50, 511);
        assert!((500..562).contains(&l.p50));
        // p90: 900 µs, in [896, 959].
        assert_eq!(l.p90, 959);
        assert!((900..1012).contains(&l.p90));
        // p99: 990 µs, in [960, 1023], capped at the maximum, 1000.
        assert_eq!(l.p99, 1000);
        assert!((990..1113).contains(&l.p99));
        // p99.9: 999 µs, same bucket, same cap.
        assert_eq!(l.p999, 1000);
    }

    #[test]
    fn latency_of_one_sample() {
        let stats = LunStats::new();
        stats.completed(&CommandOutcome {
            latency: us(777),
            ..outcome(CommandKind::Read)
        });
        let l = stats.snapshot().latency_us;
        let expected = LatencySummary {
            count: 1,
            mean: 777.0,
            p50: 777,
            p90: 777,
            p99: 777,
            p999: 777,
            max: 777,
        };
        assert_eq!(l, expected);
    }

    #[test]
    fn latency_of_no_samples_is_zero() {
        let l = LunStats::new().snapshot().latency_us;
        let expected = LatencySummary {
            count: 0,
            mean: 0.0,
            p50: 0,
            p90: 0,
            p99: 0,
            p999: 0,
            max: 0,
        };
        assert_eq!(l, expected);
    }

    #[test]
    fn latency_rounds_up_to_microseconds() {
        let stats = LunStats::new();
        for ns in [400, 1000, 1001] {
            stats.completed(&CommandOutcome {
                latency: Duration::from_nanos(ns),
                ..outcome(CommandKind::Other)
            });
        }
        let l = stats.snapshot().latency_us;
        // 1 µs, 1 µs, 2 µs.
        assert_eq!((l.count, l.max, l.p50), (3, 2, 1));
        assert_eq!(l.mean, 4.0 / 3.0);
    }

    #[test]
    fn latency_beyond_the_top_bucket() {
        let stats = LunStats::new();
        stats.completed(&CommandOutcome {
            latency: us(10),
            ..outcome(CommandKind::Flush)
        });
        // 500 s: past the last bucket's lower bound (~126 s).
        stats.completed(&CommandOutcome {
            latency: Duration::from_secs(500),
            ..outcome(CommandKind::Flush)
        });
        let l = stats.snapshot().latency_us;
        assert_eq!(l.count, 2);
        assert_eq!(l.max, 500_000_000);
        assert_eq!(l.p50, 10);
        assert_eq!(l.p99, 500_000_000);
        assert_eq!(l.mean, 250_000_005.0);
        // A latency too long for u64 microseconds saturates.
        stats.completed(&CommandOutcome {
            latency: Duration::MAX,
            ..outcome(CommandKind::Flush)
        });
        assert_eq!(stats.snapshot().latency_us.max, u64::MAX);
    }

    #[test]
    fn serializes_with_the_documented_names() {
        let stats = LunStats::new();
        stats.started();
        stats.started();
        stats.completed(&CommandOutcome {
            bytes_read: 4096,
            latency: us(100),
            ..outcome(CommandKind::Read)
        });
        stats.started();
        stats.completed(&CommandOutcome {
            sense_key: Some(0x03),
            latency: us(300),
            ..outcome(CommandKind::Write)
        });
        stats.started();
        stats.completed(&CommandOutcome {
            latency: us(20),
            ..outcome(CommandKind::Unmap)
        });
        let value = serde_json::to_value(stats.snapshot()).unwrap();
        // 20 µs is in [20, 21]; 100 in [96, 103]; 300 in [288, 319]; all
        // capped at the maximum, 300. Ranks: p50 → 2nd, others → 3rd.
        let expected = json!({
            "commands": {
                "read": 1,
                "write": 1,
                "flush": 0,
                "unmap": 1,
                "write_same": 0,
                "compare_and_write": 0,
                "verify": 0,
                "other": 0,
            },
            "bytes_read": 4096,
            "bytes_written": 0,
            "flushes": 0,
            "unmaps": 1,
            "errors": { "medium_error": 1 },
            "in_flight": 1,
            "latency_us": {
                "count": 3,
                "mean": 140.0,
                "p50": 103,
                "p90": 300,
                "p99": 300,
                "p999": 300,
                "max": 300,
            },
        });
        assert_eq!(value, expected);
        // And the kinds' own names.
        assert_eq!(
            serde_json::to_value(CommandKind::CompareAndWrite).unwrap(),
            json!("compare_and_write")
        );
        assert_eq!(
            serde_json::to_value(CommandKind::WriteSame).unwrap(),
            json!("write_same")
        );
    }

    #[test]
    fn layout_is_as_documented() {
        // in_flight, bytes read and written, 8 command kinds, the
        // histogram's OnceLock (a state word and a pointer), 16 sense keys.
        assert_eq!(std::mem::size_of::<LunStats>(), 29 * 8);
        // Sum, maximum and 200 buckets of 8 bytes.
        assert_eq!(std::mem::size_of::<Histogram>(), 202 * 8);
    }

    #[test]
    fn a_unit_never_used_costs_its_counters_only() {
        let stats = LunStats::new();
        assert!(stats.latency.get().is_none());
        assert_eq!(stats.snapshot().latency_us.count, 0);
    }
}
