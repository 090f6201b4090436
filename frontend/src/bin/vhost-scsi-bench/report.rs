//! Results: per-run numbers, their sum per side, ratios, and the two
//! outputs (a table for people, JSON for scripts).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::workload::{Limit, Pattern, ThreadStats};
use crate::Args;

/// One run of one side.
pub struct RunResult {
    pub stats: ThreadStats,
    pub elapsed: Duration,
    /// The daemon's CPU time over the run (for the host line: the
    /// benchmark's own, which is the syscalls' cost).
    pub server_cpu: Duration,
    /// The benchmark process's CPU time over the run.
    pub driver_cpu: Duration,
    pub event_idx: bool,
}

impl RunResult {
    pub fn iops(&self) -> f64 {
        self.stats.ios as f64 / self.elapsed.as_secs_f64()
    }
}

/// A daemon binary and its runs.
pub struct Side {
    pub label: &'static str,
    pub binary: PathBuf,
    pub extra: Vec<OsString>,
    pub runs: Vec<RunResult>,
}

impl Side {
    pub fn new(label: &'static str, binary: &Path, extra: &[OsString]) -> Side {
        Side {
            label,
            binary: binary.to_path_buf(),
            extra: extra.to_vec(),
            runs: Vec::new(),
        }
    }

    fn description(&self) -> String {
        let mut d = self.binary.display().to_string();
        for a in &self.extra {
            d.push(' ');
            d.push_str(&a.to_string_lossy());
        }
        d
    }
}

/// The runs of a side added up: I/Os and time summed, histograms merged.
pub struct Summary {
    pub ios: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub cpu_s: f64,
    pub driver_cpu_s: f64,
    pub kicks: u64,
    pub waits: u64,
    /// Requests answered with a unit attention (retried, not in `ios`).
    pub unit_attentions: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
    pub round_iops: Vec<f64>,
}

impl Summary {
    fn of(runs: &[RunResult]) -> Option<Summary> {
        if runs.is_empty() {
            return None;
        }
        let mut stats = ThreadStats::default();
        let (mut seconds, mut cpu, mut driver) = (0.0, 0.0, 0.0);
        for r in runs {
            stats.merge(&r.stats);
            seconds += r.elapsed.as_secs_f64();
            cpu += r.server_cpu.as_secs_f64();
            driver += r.driver_cpu.as_secs_f64();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Summary {
            ios: stats.ios,
            bytes: stats.bytes,
            seconds,
            cpu_s: cpu,
            driver_cpu_s: driver,
            kicks: stats.kicks,
            waits: stats.waits,
            unit_attentions: stats.unit_attentions,
            p50_us: us(stats.hist.quantile_ns(0.50)),
            p99_us: us(stats.hist.quantile_ns(0.99)),
            p999_us: us(stats.hist.quantile_ns(0.999)),
            mean_us: us(stats.hist.mean_ns()),
            max_us: us(stats.hist.max_ns()),
            round_iops: runs.iter().map(RunResult::iops).collect(),
        })
    }

    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.seconds
    }

    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e6
    }

    pub fn cpu_s_per_mio(&self) -> f64 {
        self.cpu_s / self.ios as f64 * 1e6
    }

    fn per_io(&self, n: u64) -> f64 {
        n as f64 / self.ios as f64
    }
}

/// The machine, as /proc tells it.
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn this() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel,
        }
    }
}

pub struct Report {
    pub pattern: Pattern,
    pub bs: u64,
    pub iodepth: u16,
    pub queues: u16,
    pub limit: Limit,
    pub warmup: f64,
    pub rounds: u32,
    pub direct: bool,
    pub image: PathBuf,
    pub image_size: u64,
    pub machine: Machine,
    pub sides: Vec<Side>,
    pub host: Vec<RunResult>,
}

impl Report {
    pub fn new(
        args: &Args,
        pattern: Pattern,
        limit: Limit,
        image_size: u64,
        sides: Vec<Side>,
    ) -> Report {
        Report {
            pattern,
            bs: args.bs,
            iodepth: args.iodepth,
            queues: args.queues,
            limit,
            warmup: args.warmup,
            rounds: args.rounds,
            direct: args.direct,
            image: args.image.clone(),
            image_size,
            machine: Machine::this(),
            sides,
            host: Vec::new(),
        }
    }

    fn event_idx(&self) -> bool {
        self.sides
            .iter()
            .flat_map(|s| s.runs.iter())
            .all(|r| r.event_idx)
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let limit = match self.limit {
            Limit::Time(d) => format!("{} s per run", d.as_secs_f64()),
            Limit::Ios(n) => format!("{n} I/Os per run"),
        };
        let _ = writeln!(
            t,
            "{} {}, iodepth {} x {} queue(s), {limit}, {} round(s), {}, EVENT_IDX {}",
            self.pattern.name(),
            size(self.bs),
            self.iodepth,
            self.queues,
            self.rounds,
            if self.direct {
                "O_DIRECT"
            } else {
                "page cache"
            },
            if self.event_idx() { "on" } else { "off" },
        );
        let _ = writeln!(
            t,
            "image {} ({}); machine: {} CPUs, {}, Linux {}",
            self.image.display(),
            size(self.image_size),
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.kernel
        );
        for s in &self.sides {
            let _ = writeln!(t, "{}: {}", s.label, s.description());
        }
        if !self.host.is_empty() {
            let _ = writeln!(
                t,
                "host: {} on the image from {} thread(s), one at a time (no virtualization)",
                if self.pattern.is_write() {
                    "pwrite"
                } else {
                    "pread"
                },
                self.queues
            );
        }
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "{:<8} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
            "", "IOPS", "MB/s", "p50 µs", "p99 µs", "p99.9 µs", "CPU s/MIO", "kicks/IO", "waits/IO"
        );
        let summaries: Vec<(&str, Summary)> = self
            .sides
            .iter()
            .filter_map(|s| Summary::of(&s.runs).map(|m| (s.label, m)))
            .collect();
        let host = Summary::of(&self.host);
        for (label, m) in &summaries {
            let _ = writeln!(
                t,
                "{:<8} {:>11.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2} {:>9.3} {:>9.3}",
                label,
                m.iops(),
                m.mb_s(),
                m.p50_us,
                m.p99_us,
                m.p999_us,
                m.cpu_s_per_mio(),
                m.per_io(m.kicks),
                m.per_io(m.waits)
            );
        }
        if let Some(h) = &host {
            let _ = writeln!(
                t,
                "{:<8} {:>11.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2} {:>9} {:>9}",
                "host",
                h.iops(),
                h.mb_s(),
                h.p50_us,
                h.p99_us,
                h.p999_us,
                h.cpu_s_per_mio(),
                "-",
                "-"
            );
        }
        let ratio_row = |t: &mut String, label: &str, b: &Summary, a: &Summary| {
            let _ = writeln!(
                t,
                "{:<8} {:>10.2}x {:>8.2}x {:>8.2}x {:>8.2}x {:>8.2}x {:>9.2}x",
                label,
                b.iops() / a.iops(),
                b.mb_s() / a.mb_s(),
                b.p50_us / a.p50_us,
                b.p99_us / a.p99_us,
                b.p999_us / a.p999_us,
                b.cpu_s_per_mio() / a.cpu_s_per_mio(),
            );
        };
        if let [(_, a), (_, b)] = summaries.as_slice() {
            ratio_row(&mut t, "B/A", b, a);
        }
        if let Some(h) = &host {
            for (label, m) in &summaries {
                ratio_row(&mut t, &format!("{label}/host"), m, h);
            }
            for (label, m) in &summaries {
                let _ = writeln!(
                    t,
                    "{label}: p50 latency added over the host's: {:.1} µs",
                    m.p50_us - h.p50_us
                );
            }
        }
        if self.rounds > 1 {
            for (label, m) in &summaries {
                let r: Vec<String> = m.round_iops.iter().map(|v| format!("{v:.0}")).collect();
                let _ = writeln!(t, "{label} IOPS per round: {}", r.join(", "));
            }
            if let Some(h) = &host {
                let r: Vec<String> = h.round_iops.iter().map(|v| format!("{v:.0}")).collect();
                let _ = writeln!(t, "host IOPS per round: {}", r.join(", "));
            }
        }
        t
    }

    pub fn json(&self) -> String {
        let side_json = |label: Option<&Side>, runs: &[RunResult]| -> Json {
            let Some(m) = Summary::of(runs) else {
                return Json::Null;
            };
            let mut fields = Vec::new();
            if let Some(s) = label {
                fields.push(("binary", Json::Str(s.binary.display().to_string())));
                fields.push((
                    "args",
                    Json::Arr(
                        s.extra
                            .iter()
                            .map(|a| Json::Str(a.to_string_lossy().into_owned()))
                            .collect(),
                    ),
                ));
            }
            fields.extend([
                ("ios", Json::Int(m.ios)),
                ("bytes", Json::Int(m.bytes)),
                ("seconds", Json::Num(m.seconds)),
                ("iops", Json::Num(m.iops())),
                ("mb_s", Json::Num(m.mb_s())),
                (
                    "lat_us",
                    Json::Obj(vec![
                        ("p50", Json::Num(m.p50_us)),
                        ("p99", Json::Num(m.p99_us)),
                        ("p99_9", Json::Num(m.p999_us)),
                        ("mean", Json::Num(m.mean_us)),
                        ("max", Json::Num(m.max_us)),
                    ]),
                ),
                ("cpu_s", Json::Num(m.cpu_s)),
                ("cpu_s_per_mio", Json::Num(m.cpu_s_per_mio())),
                ("driver_cpu_s", Json::Num(m.driver_cpu_s)),
            ]);
            if label.is_some() {
                fields.push(("kicks_per_io", Json::Num(m.per_io(m.kicks))));
                fields.push(("waits_per_io", Json::Num(m.per_io(m.waits))));
            }
            fields.push(("unit_attentions", Json::Num(m.unit_attentions as f64)));
            fields.push((
                "round_iops",
                Json::Arr(m.round_iops.iter().map(|&v| Json::Num(v)).collect()),
            ));
            Json::Obj(fields)
        };
        let ratio = |b: &[RunResult], a: &[RunResult]| -> Json {
            match (Summary::of(b), Summary::of(a)) {
                (Some(b), Some(a)) => Json::Obj(vec![
                    ("iops", Json::Num(b.iops() / a.iops())),
                    ("mb_s", Json::Num(b.mb_s() / a.mb_s())),
                    ("p50", Json::Num(b.p50_us / a.p50_us)),
                    ("p99", Json::Num(b.p99_us / a.p99_us)),
                    ("p99_9", Json::Num(b.p999_us / a.p999_us)),
                    (
                        "cpu_s_per_mio",
                        Json::Num(b.cpu_s_per_mio() / a.cpu_s_per_mio()),
                    ),
                    ("p50_added_us", Json::Num(b.p50_us - a.p50_us)),
                ]),
                _ => Json::Null,
            }
        };
        let a = self.sides.first();
        let b = self.sides.get(1);
        let (limit_s, limit_ios) = match self.limit {
            Limit::Time(d) => (Json::Num(d.as_secs_f64()), Json::Null),
            Limit::Ios(n) => (Json::Null, Json::Int(n)),
        };
        let doc = Json::Obj(vec![
            (
                "machine",
                Json::Obj(vec![
                    ("cpus", Json::Int(self.machine.cpus as u64)),
                    ("cpu_model", Json::Str(self.machine.cpu_model.clone())),
                    ("kernel", Json::Str(self.machine.kernel.clone())),
                ]),
            ),
            (
                "config",
                Json::Obj(vec![
                    ("rw", Json::Str(self.pattern.name().into())),
                    ("bs", Json::Int(self.bs)),
                    ("iodepth", Json::Int(u64::from(self.iodepth))),
                    ("queues", Json::Int(u64::from(self.queues))),
                    ("runtime_s", limit_s),
                    ("ios", limit_ios),
                    ("warmup_s", Json::Num(self.warmup)),
                    ("rounds", Json::Int(u64::from(self.rounds))),
                    ("direct", Json::Bool(self.direct)),
                    ("event_idx", Json::Bool(self.event_idx())),
                    ("image", Json::Str(self.image.display().to_string())),
                    ("image_size", Json::Int(self.image_size)),
                ]),
            ),
            ("a", side_json(a, runs(a))),
            ("b", side_json(b, runs(b))),
            ("host", side_json(None, &self.host)),
            (
                "ratios",
                Json::Obj(vec![
                    ("b_over_a", ratio(runs(b), runs(a))),
                    ("a_over_host", ratio(runs(a), &self.host)),
                    ("b_over_host", ratio(runs(b), &self.host)),
                ]),
            ),
        ]);
        let mut out = String::new();
        doc.write(&mut out, 0);
        out.push('\n');
        out
    }
}

fn runs(s: Option<&Side>) -> &[RunResult] {
    s.map_or(&[], |s| &s.runs)
}

/// "4 KiB", "1 MiB", "1.00 GiB".
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Just enough JSON to print the report.
enum Json {
    Null,
    Bool(bool),
    Int(u64),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

fn escape(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl Json {
    fn write(&self, out: &mut String, indent: usize) {
        let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat_n(' ', n));
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(n) => {
                let _ = write!(out, "{n}");
            }
            // JSON has no NaN or infinity (a ratio over a zero).
            Json::Num(x) if !x.is_finite() => out.push_str("null"),
            Json::Num(x) => {
                let _ = write!(out, "{}", (x * 1000.0).round() / 1000.0);
            }
            Json::Str(s) => escape(out, s),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, indent);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push_str("{\n");
                for (i, (k, v)) in fields.iter().enumerate() {
                    pad(out, indent + 2);
                    escape(out, k);
                    out.push_str(": ");
                    v.write(out, indent + 2);
                    if i + 1 < fields.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                pad(out, indent);
                out.push('}');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_well_formed() {
        let mut s = String::new();
        Json::Obj(vec![
            ("a", Json::Num(1.23456)),
            ("b", Json::Num(f64::NAN)),
            ("c", Json::Arr(vec![Json::Int(1), Json::Str("x\"y".into())])),
            ("d", Json::Obj(vec![])),
        ])
        .write(&mut s, 0);
        assert_eq!(
            s,
            "{\n  \"a\": 1.235,\n  \"b\": null,\n  \"c\": [1, \"x\\\"y\"],\n  \"d\": {\n  }\n}"
        );
        assert_eq!(size(4096), "4 KiB");
        assert_eq!(size(3 << 29), "1.50 GiB");
    }
}
