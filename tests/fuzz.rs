//! The fuzz targets of `fuzz/targets/` on the stable toolchain, where
//! cargo-fuzz (nightly) is not available: each target runs every file of its
//! seed corpus (`fuzz/corpus/<target>/`), then inputs from a seeded
//! xorshift generator — corpus entries mutated byte-wise, inputs generated
//! from scratch by the target's structured generator, and raw random bytes
//! — until its time budget runs out.
//!
//! Environment:
//! - `FUZZ_SECONDS`: budget per target (default 10; 0 runs the corpus only).
//! - `FUZZ_SEED`: the generator's seed (decimal or 0x-hex; default from the
//!   clock). It is printed at the start and on failure.
//! - `FUZZ_INPUT`: run only this file through the target(s) selected.
//! - `FUZZ_EXECUTION`: with `FUZZ_SEED`, run only that execution's input
//!   (the inputs depend on the seed and the corpus alone, so a failure in
//!   CI replays from its log).
//! - `FUZZ_HANG_SECONDS`: an input that runs longer aborts the process as a
//!   hang (default 30).
//!
//! A failing input is saved under `target/fuzz-failures/` and the message
//! says how to replay it. For a long run:
//! `FUZZ_SECONDS=600 cargo test --release --test fuzz -- --nocapture`.
//!
//! A test binary of its own, apart from `tests/it/`: its two targets spend
//! a wall-clock budget side by side (other tests in the same process would
//! take their CPU, and theirs would be taken), and its watchdog aborts the
//! whole process on a hang.

#[path = "../fuzz/targets/mod.rs"]
mod targets;

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use targets::Rng;

struct Fuzzer {
    name: &'static str,
    run: fn(&[u8]),
    generate: fn(&mut Rng) -> Vec<u8>,
    stats: &'static [&'static str],
}

const CDB: Fuzzer = Fuzzer {
    name: "cdb",
    run: targets::cdb::run,
    generate: targets::cdb::generate,
    stats: &targets::cdb::STATS,
};

const REQUEST: Fuzzer = Fuzzer {
    name: "request",
    run: targets::request::run,
    generate: targets::request::generate,
    stats: &targets::request::STATS,
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = root().join("fuzz/corpus").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

fn budget() -> Duration {
    match std::env::var("FUZZ_SECONDS") {
        Ok(v) => Duration::from_secs_f64(
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("FUZZ_SECONDS={v}: not a number")),
        ),
        Err(_) => Duration::from_secs(10),
    }
}

/// Watches the executions of one target from another thread: an input that
/// does not finish within the hang limit is saved and the process aborted
/// (a thread stuck in a loop cannot be unwound).
struct Watchdog {
    executions: AtomicU64,
    current: Mutex<Vec<u8>>,
    done: AtomicBool,
}

/// Stops the watchdog when the test ends, also by a panic (another
/// target may still be running in the same process).
struct StopOnDrop(Arc<Watchdog>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::Relaxed);
    }
}

impl Watchdog {
    fn start(name: &'static str, seed: u64) -> Arc<Watchdog> {
        let dog = Arc::new(Watchdog {
            executions: AtomicU64::new(0),
            current: Mutex::new(Vec::new()),
            done: AtomicBool::new(false),
        });
        let limit = Duration::from_secs(env_number("FUZZ_HANG_SECONDS").unwrap_or(30));
        let watched = dog.clone();
        std::thread::spawn(move || {
            let mut seen = u64::MAX;
            let mut since = Instant::now();
            while !watched.done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let n = watched.executions.load(Ordering::Relaxed);
                if n != seen {
                    seen = n;
                    since = Instant::now();
                } else if since.elapsed() > limit {
                    let input = watched
                        .current
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    let path = save(name, seed, n, "hang", &input);
                    eprintln!(
                        "fuzz {name}: execution {n} has run for {limit:?}: a hang (seed {seed:#x}); \
                         input saved to {}; replay with FUZZ_INPUT={} cargo test --test fuzz {name}",
                        path.display(),
                        path.display()
                    );
                    std::process::abort();
                }
            }
        });
        dog
    }
}

fn save(name: &str, seed: u64, n: u64, kind: &str, data: &[u8]) -> PathBuf {
    let dir = root().join("target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}-{kind}-{seed:016x}-{n}"));
    let _ = std::fs::write(&path, data);
    path
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs one input; on a panic saves it and fails with how to replay it.
fn execute(
    f: &Fuzzer,
    dog: &Watchdog,
    seed: u64,
    n: u64,
    data: &[u8],
    origin: &dyn Fn() -> String,
) {
    dog.current
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone_from(&data.to_vec());
    let result = panic::catch_unwind(AssertUnwindSafe(|| (f.run)(data)));
    dog.executions.fetch_add(1, Ordering::Relaxed);
    if result.is_err() {
        let path = save(f.name, seed, n, "crash", data);
        let shown = if data.len() <= 4096 {
            format!("input {}", hex(data))
        } else {
            format!("{}-byte input", data.len())
        };
        panic!(
            "fuzz target {} failed on {} (execution {n}, seed {seed:#x}); {shown}; saved to {}; \
             replay with FUZZ_INPUT={} cargo test --test fuzz {}, \
             or FUZZ_SEED={seed:#x} FUZZ_EXECUTION={n} cargo test --test fuzz {}",
            f.name,
            origin(),
            path.display(),
            path.display(),
            f.name,
            f.name
        );
    }
}

/// Byte-level mutations, as libFuzzer's: bit flips, interesting values,
/// insertions, deletions, copies and splices with another input.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, pool: &[(PathBuf, Vec<u8>)]) {
    const INTERESTING: [u32; 12] = [
        0,
        1,
        2,
        0x7f,
        0x80,
        0xff,
        0x100,
        0x7fff,
        0xffff,
        0x1_0000,
        0x7fff_ffff,
        0xffff_ffff,
    ];
    for _ in 0..1 + rng.below(4) {
        let len = data.len() as u64;
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len) as usize;
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len) as usize;
                data[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len) as usize;
                data[i] = rng.pick(&INTERESTING) as u8;
            }
            3 if len > 0 => {
                let width = rng.pick(&[2usize, 4]);
                let i = rng.below(len) as usize;
                let v = rng.pick(&INTERESTING).to_le_bytes();
                for (j, b) in v[..width].iter().enumerate() {
                    if let Some(d) = data.get_mut(i + j) {
                        *d = *b;
                    }
                }
            }
            4 => {
                let i = rng.below(len + 1) as usize;
                let n = 1 + rng.below(16) as usize;
                let bytes = rng.bytes(n);
                data.splice(i..i, bytes);
            }
            5 if len > 0 => {
                let i = rng.below(len) as usize;
                let n = 1 + rng.below(len - i as u64) as usize;
                data.drain(i..i + n.min(32));
            }
            6 if len > 0 => {
                let from = rng.below(len) as usize;
                let n = (1 + rng.below(32) as usize).min(data.len() - from);
                let piece = data[from..from + n].to_vec();
                let to = rng.below(len + 1) as usize;
                data.splice(to..to, piece);
            }
            7 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len() as u64) as usize].1;
                let cut = rng.below(len + 1) as usize;
                let from = rng.below(other.len() as u64 + 1) as usize;
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            _ => {
                let n = rng.below(len + 1) as usize;
                data.truncate(n);
            }
        }
    }
}

/// The next random input: generated from scratch, a mutated corpus entry
/// or generated input, or raw bytes (counted in `kinds` in that order).
fn random_input(
    f: &Fuzzer,
    rng: &mut Rng,
    corpus: &[(PathBuf, Vec<u8>)],
    kinds: &mut [u64; 3],
) -> Vec<u8> {
    match rng.below(10) {
        0..=3 => {
            kinds[0] += 1;
            (f.generate)(rng)
        }
        4..=8 => {
            kinds[1] += 1;
            let mut data = if rng.one_in(2) {
                corpus[rng.below(corpus.len() as u64) as usize].1.clone()
            } else {
                (f.generate)(rng)
            };
            mutate(rng, &mut data, corpus);
            data
        }
        _ => {
            kinds[2] += 1;
            let len = rng.below(512) as usize;
            rng.bytes(len)
        }
    }
}

fn drive(f: &Fuzzer) {
    let seed = env_number("FUZZ_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let dog = Watchdog::start(f.name, seed);
    let _stop = StopOnDrop(dog.clone());
    if let Ok(path) = std::env::var("FUZZ_INPUT") {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        execute(f, &dog, seed, 0, &data, &|| format!("FUZZ_INPUT={path}"));
        println!("fuzz {}: {path} passes", f.name);
        return;
    }
    let corpus = corpus(f.name);
    assert!(!corpus.is_empty(), "no seed corpus for {}", f.name);
    let start = Instant::now();
    for (i, (path, data)) in corpus.iter().enumerate() {
        execute(f, &dog, seed, i as u64, data, &|| {
            format!("corpus file {}", path.display())
        });
    }
    let budget = budget();
    println!(
        "fuzz {}: {} corpus files pass; random inputs for {budget:?}, seed {seed:#x}",
        f.name,
        corpus.len()
    );
    let mut rng = Rng::new(seed);
    let mut n = corpus.len() as u64;
    let replay = env_number("FUZZ_EXECUTION");
    if let Some(r) = replay {
        assert!(
            r >= n,
            "execution {r} is corpus file {}",
            corpus[r as usize].0.display()
        );
    }
    let random_start = Instant::now();
    let mut kinds = [0u64; 3];
    while random_start.elapsed() < budget || replay.is_some() {
        // Check the clock every few inputs only.
        for _ in 0..16 {
            let data = random_input(f, &mut rng, &corpus, &mut kinds);
            match replay {
                Some(r) if r == n => {
                    execute(f, &dog, seed, n, &data, &|| {
                        "the replayed input".to_string()
                    });
                    println!("fuzz {}: execution {n} of seed {seed:#x} passes", f.name);
                    return;
                }
                Some(_) => {}
                None => execute(f, &dog, seed, n, &data, &|| "a random input".to_string()),
            }
            n += 1;
        }
    }
    let [generated, mutated, raw] = kinds;
    let random = n - corpus.len() as u64;
    let secs = random_start.elapsed().as_secs_f64();
    println!(
        "fuzz {}: {n} executions in {:.1} s: {random} random ({generated} generated, {mutated} mutated, {raw} raw bytes) in {secs:.1} s = {:.0}/s; seed {seed:#x}",
        f.name,
        start.elapsed().as_secs_f64(),
        random as f64 / secs.max(1e-9),
    );
    println!("fuzz {}: {}", f.name, targets::stats(f.stats));
}

#[test]
fn cdb() {
    drive(&CDB);
}

#[test]
fn request() {
    drive(&REQUEST);
}

/// Rewrites the generated seed files of `fuzz/corpus/` (other files there,
/// such as inputs a fuzzer found, are left alone):
/// `cargo test --test fuzz write_seed_corpus -- --ignored`.
#[test]
#[ignore]
fn write_seed_corpus() {
    for (name, seeds) in [
        ("cdb", targets::cdb::seeds()),
        ("request", targets::request::seeds()),
    ] {
        let dir = root().join("fuzz/corpus").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, data) in seeds {
            std::fs::write(dir.join(file), data).unwrap();
        }
    }
}
