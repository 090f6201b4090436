//! vhost-scsi-bench: a load generator that drives vhost-device-scsi exactly
//! as QEMU plus a guest do (a vhost-user frontend with shared memfd memory,
//! split virtqueues, kick and call eventfds, EVENT_IDX), keeping N READ or
//! WRITE requests in flight on each of M request queues, and compares the
//! result with a second daemon binary and with the host's own pread/pwrite.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod report;
mod workload;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use vhost_scsi_frontend::{DaemonProcess, DriverConfig, ScsiFrontend};

use report::{Report, RunResult, Side};
use workload::{
    drive_host, drive_queue, fill_pattern, open_image, Job, Limit, Pattern, ThreadStats,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
}

/// Load generator for vhost-device-scsi: a real vhost-user frontend keeping
/// N virtio-scsi READ/WRITE requests in flight on each of M request queues.
#[derive(Debug, Parser)]
#[command(name = "vhost-scsi-bench", version)]
struct Args {
    /// Daemon binary to run [default: vhost-device-scsi next to this binary]
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,

    /// A second daemon binary (B), run on the same image in alternating
    /// rounds with the first (A); ratios B/A are printed.
    #[arg(long, value_name = "PATH2")]
    compare: Option<PathBuf>,

    /// Raw image to serve; created (filled with non-zero data) if missing.
    #[arg(long, value_name = "PATH")]
    image: PathBuf,

    /// Size of the image when it has to be created (K, M, G, T suffixes).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    size: u64,

    /// I/O pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,

    /// Bytes per I/O (K, M suffixes); a multiple of the LUN's block size.
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = parse_size)]
    bs: u64,

    /// Requests in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=341))]
    iodepth: u16,

    /// Request queues, each with its own submitting thread.
    #[arg(long, value_name = "M", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=254))]
    queues: u16,

    /// Seconds per run [default: 5, unless --ios is given].
    #[arg(long, value_name = "SECS", conflicts_with = "ios")]
    runtime: Option<f64>,

    /// I/Os per run (split over the queues), instead of --runtime.
    #[arg(long, value_name = "COUNT")]
    ios: Option<u64>,

    /// Seconds of unmeasured load on each connection before the run.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    warmup: f64,

    /// Runs per side; with --compare the sides alternate A, B, A, B ...
    #[arg(long, value_name = "R", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,

    /// Bypass the host page cache: passes --direct to the daemon (which must
    /// support it) and opens the image O_DIRECT for the host line.
    #[arg(long)]
    direct: bool,

    /// Extra argument for the daemon (A and B); repeatable, e.g.
    /// --daemon-arg=--threads=2.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    daemon_arg: Vec<OsString>,

    /// Extra argument for daemon A only, after the --daemon-arg ones;
    /// repeatable.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    a_arg: Vec<OsString>,

    /// Extra argument for daemon B only, after the --daemon-arg ones;
    /// repeatable.
    #[arg(
        long,
        visible_alias = "compare-arg",
        value_name = "ARG",
        allow_hyphen_values = true
    )]
    b_arg: Vec<OsString>,

    /// The IMAGE argument daemon B serves instead of --image: the same
    /// image reached another way, e.g. `nbd+unix:///x?socket=S` with
    /// qemu-nbd serving --image, so that B/A is the cost of the way.
    #[arg(long, value_name = "IMAGE-ARG")]
    b_lun: Option<OsString>,

    /// Skip the host's pread/pwrite ceiling ("no virtualization" line).
    #[arg(long)]
    no_host: bool,

    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX (interrupt and kick on
    /// every request).
    #[arg(long)]
    no_event_idx: bool,

    /// Negotiate in-flight tracking (INFLIGHT_SHMFD) as QEMU does, so the
    /// daemon records every request in the shared region (its cost).
    #[arg(long)]
    inflight: bool,

    /// Before sleeping on a queue's call eventfd, busy-poll its used ring
    /// for up to US microseconds (as a guest with polled completions
    /// would): takes the driver's own wake-up out of the latency. Pair with
    /// --daemon-arg=--poll-us=US to take the daemon's out too.
    #[arg(long = "poll-us", value_name = "US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    poll_us: u64,

    /// Seed of the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(format!("{s:?}: unknown suffix (K, M, G, T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: not a size (e.g. 4k, 1M, 2G)"))?;
    n.checked_mul(1 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?}: out of range"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-scsi-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A temporary directory for sockets and daemon logs, removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn default_daemon() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    Ok(exe.with_file_name("vhost-device-scsi"))
}

/// Whether `bin --help` lists `flag`.
fn daemon_has_flag(bin: &Path, flag: &str) -> Result<bool, String> {
    let out = Command::new(bin)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} --help: {e}", bin.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
        .any(|w| w == flag))
}

/// Creates the image (non-zero data) if it does not exist; returns its size.
fn prepare_image(path: &Path, size: u64, direct: bool) -> Result<u64, String> {
    if !path.exists() {
        if size % 4096 != 0 {
            return Err(format!("--size {size}: not a multiple of 4096"));
        }
        let mut f = std::fs::File::create(path)
            .map_err(|e| format!("{}: cannot create: {e}", path.display()))?;
        let mut chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        while written < size {
            let n = (size - written).min(chunk.len() as u64) as usize;
            fill_pattern(&mut chunk[..n], written >> 20);
            f.write_all(&chunk[..n])
                .map_err(|e| format!("{}: {e}", path.display()))?;
            written += n as u64;
        }
        f.sync_all()
            .map_err(|e| format!("{}: {e}", path.display()))?;
    } else if !direct {
        // Page-cached runs read from memory from the first I/O on.
        let f = open_image(path, false, false)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        loop {
            let n = std::os::unix::fs::FileExt::read_at(&f, &mut buf, off)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            off += n as u64;
        }
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(meta.len())
}

/// Resource usage of this process (all threads), user + system.
fn own_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

struct Plan<'a> {
    args: &'a Args,
    pattern: Pattern,
    limit: Limit,
    image_size: u64,
    work: &'a Path,
}

impl Plan<'_> {
    fn per_thread_limit(&self, thread: usize) -> Limit {
        match self.limit {
            Limit::Time(t) => Limit::Time(t),
            Limit::Ios(n) => {
                let m = u64::from(self.args.queues);
                Limit::Ios(n / m + u64::from((thread as u64) < n % m))
            }
        }
    }

    /// The job over the whole image.
    fn job(&self) -> Job {
        Job {
            pattern: self.pattern,
            bs: self.args.bs,
            positions: self.image_size / self.args.bs,
            threads: usize::from(self.args.queues),
            seed: self.args.seed,
            poll: std::time::Duration::from_micros(self.args.poll_us),
        }
    }
}

/// One run of a daemon binary: start it, connect, load, stop it.
fn run_daemon(
    plan: &Plan,
    bin: &Path,
    extra: &[OsString],
    lun: Option<&OsString>,
    run_id: usize,
) -> Result<RunResult, String> {
    let args = plan.args;
    let socket = plan.work.join(format!("run{run_id}.sock"));
    let log_path = plan.work.join(format!("run{run_id}.log"));
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut image_arg = OsString::from(&args.image);
    // A comma in the path is written ",," in the daemon's IMAGE syntax.
    if args.image.to_string_lossy().contains(',') {
        image_arg = OsString::from(args.image.to_string_lossy().replace(',', ",,"));
    }
    if let Some(lun) = lun {
        image_arg = lun.clone();
    }
    let mut command = Command::new(bin);
    command
        .arg("-s")
        .arg(&socket)
        .args(extra)
        .args(args.direct.then_some("--direct"))
        .arg(&image_arg)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let with_log = |e: String| {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        if tail.is_empty() {
            e
        } else {
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("{e}\ndaemon log ({}):\n{}", bin.display(), tail.join("\n"))
        }
    };
    let mut daemon = DaemonProcess::spawn(command, &socket, Duration::from_secs(30))
        .map_err(|e| with_log(format!("{}: {e}", bin.display())))?;
    let config = DriverConfig {
        request_queues: usize::from(args.queues),
        queue_depth: usize::from(args.iodepth),
        data_size: u32::try_from(args.bs).map_err(|_| format!("--bs {}: too large", args.bs))?,
        event_idx: !args.no_event_idx,
        inflight: args.inflight,
        timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
        ..DriverConfig::default()
    };
    let mut frontend =
        ScsiFrontend::connect(&socket, &config).map_err(|e| with_log(e.to_string()))?;
    let event_idx = frontend.event_idx();

    // READ CAPACITY(16): the LUN's block size.
    let q0 = frontend.queue(0).ok_or("no request queue")?;
    let rc16 = [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    let reply = q0
        .command(0, &rc16, &[], 32)
        .map_err(|e| with_log(e.to_string()))?;
    if reply.response != 0 || reply.status != 0 {
        return Err(format!(
            "READ CAPACITY(16): response {} status {:#04x}",
            reply.response, reply.status
        ));
    }
    let d = &reply.data_in;
    let last_lba = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    let lun_block = u64::from(u32::from_be_bytes([d[8], d[9], d[10], d[11]]));
    if lun_block == 0 || args.bs % lun_block != 0 {
        return Err(format!(
            "--bs {}: not a multiple of the LUN's {lun_block}-byte blocks",
            args.bs
        ));
    }
    let capacity = (last_lba + 1) * lun_block;
    let job = Job {
        positions: capacity / args.bs,
        ..plan.job()
    };
    if job.positions == 0 {
        return Err(format!(
            "the image is smaller than one {}-byte I/O",
            args.bs
        ));
    }
    if plan.pattern.is_write() {
        let mut pattern = vec![0u8; args.bs as usize];
        for q in frontend.queues_mut() {
            for slot in 0..q.depth() {
                fill_pattern(&mut pattern, (q.index() * 1000 + slot) as u64);
                q.write_data(slot, 0, &pattern).map_err(|e| e.to_string())?;
            }
        }
    }

    let phase = |frontend: &mut ScsiFrontend, limit_of: &dyn Fn(usize) -> Limit| {
        let abort = AtomicBool::new(false);
        let results: Vec<Result<ThreadStats, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = frontend
                .queues_mut()
                .iter_mut()
                .enumerate()
                .map(|(t, q)| {
                    let abort = &abort;
                    let job = &job;
                    let limit = limit_of(t);
                    s.spawn(move || drive_queue(q, job, t, lun_block, limit, abort))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("a queue thread panicked".into()))
                })
                .collect()
        });
        let mut total = ThreadStats::default();
        for r in results {
            total.merge(&r?);
        }
        Ok::<ThreadStats, String>(total)
    };

    if plan.args.warmup > 0.0 {
        let w = Duration::from_secs_f64(plan.args.warmup);
        phase(&mut frontend, &|_| Limit::Time(w)).map_err(&with_log)?;
    }
    let cpu0 = daemon
        .cpu_time()
        .map_err(|e| format!("daemon CPU time: {e}"))?;
    let own0 = own_cpu_time();
    let t0 = Instant::now();
    let stats = phase(&mut frontend, &|t| plan.per_thread_limit(t)).map_err(&with_log)?;
    let elapsed = t0.elapsed();
    let own = own_cpu_time().saturating_sub(own0);
    let cpu = daemon
        .cpu_time()
        .map_err(|e| format!("daemon CPU time: {e}"))?
        .saturating_sub(cpu0);
    drop(frontend);
    let _ = daemon.terminate(Duration::from_secs(2));
    Ok(RunResult {
        stats,
        elapsed,
        server_cpu: cpu,
        driver_cpu: own,
        event_idx,
    })
}

/// One run of the host's own pread/pwrite, M threads at queue depth 1.
fn run_host(plan: &Plan) -> Result<RunResult, String> {
    let args = plan.args;
    let job = plan.job();
    let abort = AtomicBool::new(false);
    let own0 = own_cpu_time();
    let t0 = Instant::now();
    let results: Vec<Result<ThreadStats, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..usize::from(args.queues))
            .map(|t| {
                let (abort, job) = (&abort, &job);
                let limit = plan.per_thread_limit(t);
                s.spawn(move || drive_host(&args.image, args.direct, job, t, limit, abort))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a host thread panicked".into()))
            })
            .collect()
    });
    let elapsed = t0.elapsed();
    let own = own_cpu_time().saturating_sub(own0);
    let mut stats = ThreadStats::default();
    for r in results {
        stats.merge(&r?);
    }
    Ok(RunResult {
        stats,
        elapsed,
        // The host line's I/O cost is the syscalls on this process's threads.
        server_cpu: own,
        driver_cpu: own,
        event_idx: false,
    })
}

fn run(args: &Args) -> Result<(), String> {
    let daemon_a = match &args.daemon {
        Some(p) => p.clone(),
        None => default_daemon()?,
    };
    let with = |own: &[OsString]| -> Vec<OsString> {
        args.daemon_arg.iter().chain(own).cloned().collect()
    };
    let mut sides = vec![(daemon_a, with(&args.a_arg))];
    if let Some(b) = &args.compare {
        sides.push((b.clone(), with(&args.b_arg)));
    } else if !args.b_arg.is_empty() {
        return Err("--b-arg without --compare".into());
    } else if args.b_lun.is_some() {
        return Err("--b-lun without --compare".into());
    }
    for (bin, _) in &sides {
        if !bin.is_file() {
            return Err(format!("daemon binary {}: not found", bin.display()));
        }
        if args.direct && !daemon_has_flag(bin, "--direct")? {
            return Err(format!(
                "{} has no --direct flag: O_DIRECT is not supported by this daemon yet",
                bin.display()
            ));
        }
    }
    let pattern = match args.rw {
        Rw::Randread => Pattern::RandRead,
        Rw::Randwrite => Pattern::RandWrite,
        Rw::Read => Pattern::Read,
        Rw::Write => Pattern::Write,
    };
    let limit = match (args.runtime, args.ios) {
        (_, Some(0)) => return Err("--ios must be at least 1".into()),
        (_, Some(n)) => Limit::Ios(n),
        (Some(t), None) if t > 0.0 && t.is_finite() => Limit::Time(Duration::from_secs_f64(t)),
        (Some(t), None) => return Err(format!("--runtime {t}: must be positive")),
        (None, None) => Limit::Time(Duration::from_secs(5)),
    };
    if !args.warmup.is_finite() || args.warmup < 0.0 {
        return Err(format!("--warmup {}: must be 0 or more", args.warmup));
    }
    let image_size = prepare_image(&args.image, args.size, args.direct)?;
    if image_size < args.bs {
        return Err(format!(
            "{}: {image_size} bytes, smaller than one {}-byte I/O",
            args.image.display(),
            args.bs
        ));
    }

    let work =
        WorkDir(std::env::temp_dir().join(format!("vhost-scsi-bench.{}", std::process::id())));
    std::fs::create_dir_all(&work.0).map_err(|e| format!("{}: {e}", work.0.display()))?;
    let plan = Plan {
        args,
        pattern,
        limit,
        image_size,
        work: &work.0,
    };

    let mut report = Report::new(
        args,
        pattern,
        limit,
        image_size,
        sides
            .iter()
            .enumerate()
            .map(|(i, (bin, extra))| {
                // B's LUN shown after its arguments, as the daemon gets it.
                let mut shown = extra.clone();
                if i == 1 {
                    shown.extend(args.b_lun.iter().cloned());
                }
                Side::new(if i == 0 { "A" } else { "B" }, bin, &shown)
            })
            .collect(),
    );
    let mut run_id = 0;
    for round in 0..args.rounds {
        for (i, (bin, extra)) in sides.iter().enumerate() {
            run_id += 1;
            let lun = if i == 1 { args.b_lun.as_ref() } else { None };
            let r = run_daemon(&plan, bin, extra, lun, run_id)?;
            if !args.json {
                eprintln!(
                    "round {} {}: {:.0} IOPS",
                    round + 1,
                    report.sides[i].label,
                    r.iops()
                );
            }
            report.sides[i].runs.push(r);
        }
        if !args.no_host {
            let r = run_host(&plan)?;
            if !args.json {
                eprintln!("round {} host: {:.0} IOPS", round + 1, r.iops());
            }
            report.host.push(r);
        }
    }
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        report.json()
    } else {
        report.table()
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("0").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("k").is_err());
    }
}
