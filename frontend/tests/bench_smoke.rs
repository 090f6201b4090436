//! The load generator works: short runs of `vhost-scsi-bench` against the
//! daemon binary, checking that its JSON report holds sane, non-zero
//! numbers. No timing thresholds: this machine's speed is not under test.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

const BENCH: &str = env!("CARGO_BIN_EXE_vhost-scsi-bench");

/// The daemon binary: `vhost-device-scsi` next to the load generator, in
/// the workspace's target directory. Cargo gives a test the paths of its
/// own package's binaries only; `cargo test` at the repository root builds
/// the daemon's too (its package is a default member) before any test runs.
fn daemon() -> &'static str {
    static DAEMON: OnceLock<String> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let path = Path::new(BENCH).with_file_name("vhost-device-scsi");
        assert!(
            path.is_file(),
            "{} is missing: run `cargo test` at the repository root, \
             or `cargo build -p vhost-device-scsi` first",
            path.display()
        );
        path.to_str().expect("a UTF-8 target directory").to_owned()
    })
}

/// Just enough JSON to read the report.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) {
        self.ws();
        assert_eq!(self.s.get(self.i), Some(&c), "at byte {}", self.i);
        self.i += 1;
    }

    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut out = String::new();
        loop {
            let c = self.s[self.i];
            self.i += 1;
            match c {
                b'"' => return out,
                b'\\' => {
                    let e = self.s[self.i];
                    self.i += 1;
                    match e {
                        b'n' => out.push('\n'),
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                            out.push(
                                char::from_u32(u32::from_str_radix(hex, 16).unwrap()).unwrap(),
                            );
                            self.i += 4;
                        }
                        other => out.push(other as char),
                    }
                }
                _ => {
                    // Copy the whole UTF-8 sequence.
                    let start = self.i - 1;
                    while self.i < self.s.len() && (self.s[self.i] & 0xc0) == 0x80 {
                        self.i += 1;
                    }
                    out.push_str(std::str::from_utf8(&self.s[start..self.i]).unwrap());
                }
            }
        }
    }

    fn value(&mut self) -> Json {
        self.ws();
        match self.s[self.i] {
            b'{' => {
                self.i += 1;
                let mut m = BTreeMap::new();
                self.ws();
                if self.s[self.i] == b'}' {
                    self.i += 1;
                    return Json::Obj(m);
                }
                loop {
                    let k = self.string();
                    self.eat(b':');
                    m.insert(k, self.value());
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b'}' => return Json::Obj(m),
                        c => panic!("unexpected {:?} at {}", c as char, self.i),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.s[self.i] == b']' {
                    self.i += 1;
                    return Json::Arr(v);
                }
                loop {
                    v.push(self.value());
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b']' => return Json::Arr(v),
                        c => panic!("unexpected {:?} at {}", c as char, self.i),
                    }
                }
            }
            b'"' => Json::Str(self.string()),
            b'n' => {
                self.i += 4;
                Json::Null
            }
            b't' => {
                self.i += 4;
                Json::Bool(true)
            }
            b'f' => {
                self.i += 5;
                Json::Bool(false)
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len() && b"+-.eE0123456789".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                Json::Num(text.parse().unwrap_or_else(|_| panic!("number {text:?}")))
            }
        }
    }
}

fn parse(text: &str) -> Json {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value();
    p.ws();
    assert_eq!(p.i, text.len(), "trailing text after the JSON document");
    v
}

impl Json {
    fn get(&self, path: &str) -> &Json {
        path.split('.').fold(self, |v, k| match v {
            Json::Obj(m) => m.get(k).unwrap_or_else(|| panic!("no {k:?} in {path:?}")),
            _ => panic!("{path:?}: {k:?} is not in an object"),
        })
    }

    fn num(&self, path: &str) -> f64 {
        match self.get(path) {
            Json::Num(n) => *n,
            other => panic!("{path}: {other:?} is not a number"),
        }
    }
}

fn bench(dir: &Path, args: &[&str]) -> Json {
    let image = dir.join("bench.img");
    let out = Command::new(BENCH)
        .args(["--daemon", daemon(), "--image"])
        .arg(&image)
        .args(["--size", "16M", "--json"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vhost-scsi-bench {args:?}: {stderr}");
    parse(&String::from_utf8(out.stdout).unwrap())
}

/// Numbers every side must have: I/Os done, positive throughput, ordered
/// percentiles, CPU time measured.
fn check_side(report: &Json, side: &str, bs: f64) {
    let ios = report.num(&format!("{side}.ios"));
    assert!(ios > 0.0, "{side}: no I/O");
    assert_eq!(
        report.num(&format!("{side}.bytes")),
        ios * bs,
        "{side}: bytes"
    );
    for key in ["iops", "mb_s", "seconds"] {
        assert!(report.num(&format!("{side}.{key}")) > 0.0, "{side}.{key}");
    }
    let p50 = report.num(&format!("{side}.lat_us.p50"));
    let p99 = report.num(&format!("{side}.lat_us.p99"));
    let p999 = report.num(&format!("{side}.lat_us.p99_9"));
    assert!(
        0.0 < p50 && p50 <= p99 && p99 <= p999,
        "{side}: {p50} {p99} {p999}"
    );
    assert!(report.num(&format!("{side}.cpu_s_per_mio")) >= 0.0);
}

#[test]
fn bench_reports_daemon_compare_and_host() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "--rw",
            "randread",
            "--runtime",
            "0.5",
            "--iodepth",
            "4",
            "--queues",
            "2",
            "--compare",
            daemon(),
        ],
    );
    assert_eq!(r.get("config.rw"), &Json::Str("randread".into()));
    assert_eq!(r.num("config.queues"), 2.0);
    assert_eq!(r.get("config.event_idx"), &Json::Bool(true));
    assert!(r.num("machine.cpus") >= 1.0);
    for side in ["a", "b", "host"] {
        check_side(&r, side, 4096.0);
    }
    // Half a second of load costs the daemon some CPU time.
    assert!(r.num("a.cpu_s") > 0.0, "daemon CPU time not measured");
    for ratio in ["b_over_a", "a_over_host", "b_over_host"] {
        assert!(r.num(&format!("ratios.{ratio}.iops")) > 0.0, "{ratio}");
    }
}

#[test]
fn bench_counts_writes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "--rw",
            "randwrite",
            "--bs",
            "8k",
            "--ios",
            "3000",
            "--iodepth",
            "8",
            "--no-host",
        ],
    );
    check_side(&r, "a", 8192.0);
    assert_eq!(r.num("a.ios"), 3000.0);
    assert_eq!(r.get("b"), &Json::Null);
    assert_eq!(r.get("host"), &Json::Null);
    // The image the benchmark created holds non-zero data.
    let image = std::fs::read(dir.path().join("bench.img")).unwrap();
    assert_eq!(image.len(), 16 << 20);
    assert!(image.iter().all(|&b| b != 0));
}

#[test]
fn bench_compares_io_engines_of_one_binary_with_direct_io() {
    // O_DIRECT needs a file system that takes it: the target directory,
    // not a tmpfs /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let r = bench(
        dir.path(),
        &[
            "--rw",
            "randwrite",
            "--ios",
            "2000",
            "--iodepth",
            "16",
            "--direct",
            "--no-host",
            "--compare",
            daemon(),
            "--a-arg=--io-engine=sync",
            "--b-arg=--io-engine=io-uring",
        ],
    );
    assert_eq!(r.get("config.direct"), &Json::Bool(true));
    for (side, engine) in [("a", "--io-engine=sync"), ("b", "--io-engine=io-uring")] {
        check_side(&r, side, 4096.0);
        assert_eq!(
            r.num(&format!("{side}.ios")),
            2000.0,
            "{side}: every write done"
        );
        assert_eq!(
            r.get(&format!("{side}.args")),
            &Json::Arr(vec![Json::Str(engine.into())]),
            "{side}"
        );
    }
}

#[test]
fn bench_polls_the_used_ring_instead_of_sleeping() {
    let dir = tempfile::tempdir().unwrap();
    // A poll window (1 s) far longer than any request takes: the driver
    // never sleeps on the call eventfd.
    let r = bench(
        dir.path(),
        &[
            "--ios",
            "2000",
            "--iodepth",
            "1",
            "--no-host",
            "--poll-us",
            "1000000",
            "--daemon-arg=--poll-us=1000",
        ],
    );
    check_side(&r, "a", 4096.0);
    assert_eq!(r.num("a.ios"), 2000.0);
    assert_eq!(r.num("a.waits_per_io"), 0.0);
}
