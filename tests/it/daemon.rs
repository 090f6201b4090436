//! The daemon as an operator runs it: command-line errors, the socket, one
//! VMM connection after another over a real vhost-user frontend, signals.

use std::ffi::OsStr;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vhost_scsi_frontend::testkit::filled_image;

use crate::common::BIN;

fn image(dir: &Path, name: &str, size: usize) -> PathBuf {
    let path = dir.join(name);
    filled_image(&path, size, 0x5a).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

/// Asserts a failed start: exit code `code`, exactly one line on stderr,
/// containing every one of `needles`, and no panic.
fn assert_one_line_error(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr:?}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in {stderr:?}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn operator_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let good = image(dir.path(), "good.raw", 4096);
    let good = good.to_str().unwrap();
    let odd = image(dir.path(), "odd.raw", 1000);
    let empty = image(dir.path(), "empty.raw", 0);
    let missing = dir.path().join("missing.raw");
    let d = dir.path().to_str().unwrap();

    assert_one_line_error(
        &run(&["-s", sock, missing.to_str().unwrap()]),
        1,
        &["missing.raw", "no such file"],
    );
    assert_one_line_error(&run(&["-s", sock, d]), 1, &[d, "directory"]);
    assert_one_line_error(
        &run(&["-s", sock, odd.to_str().unwrap()]),
        1,
        &["odd.raw", "not a multiple of"],
    );
    assert_one_line_error(
        &run(&["-s", sock, empty.to_str().unwrap()]),
        1,
        &["empty.raw", "empty"],
    );
    assert_one_line_error(
        &run(&["-s", sock, "/dev/null"]),
        1,
        &["/dev/null", "neither a regular file nor a block device"],
    );
    let many: Vec<&str> = std::iter::repeat_n(good, 16385).collect();
    let mut args = vec!["-s", sock];
    args.extend(many);
    assert_one_line_error(
        &run(&args),
        1,
        &["too many images: 16385 given, at most 16384 (LUNs 0-16383)"],
    );
    assert_one_line_error(
        &run(&["-s", "/nonexistent-dir/s.sock", good]),
        1,
        &["/nonexistent-dir/s.sock"],
    );
    let regular = image(dir.path(), "regular", 10);
    assert_one_line_error(
        &run(&["-s", regular.to_str().unwrap(), good]),
        1,
        &["regular", "not a socket"],
    );
    assert!(
        regular.exists(),
        "a regular file at the socket path is never removed"
    );
    assert_one_line_error(&run(&[good]), 2, &["--socket-path"]);
    assert_one_line_error(&run(&["-s", sock, "--bogus"]), 2, &["--bogus"]);
}

#[test]
fn help_and_version() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--socket-path",
        "--read-only",
        "--solid-state",
        "--no-discard",
        "--socket-mode",
        "--socket-group",
        "--incoming",
        "--socket-fd",
        "--version",
        "IMAGE",
        "IMAGE[,ro][,block-size=512|4096][,serial=SERIAL][,wwn=0xHEX]",
        "\",,\"",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let out = run(&["-V"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// A running daemon, killed when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Serves `images` read-only (`-r`).
    fn start(sock: &Path, images: &[&Path]) -> Daemon {
        let mut args: Vec<&OsStr> = vec![OsStr::new("-r")];
        args.extend(images.iter().map(|p| p.as_os_str()));
        Daemon::start_with(sock, &args)
    }

    /// Runs the daemon with `args` after `-s sock`; its log (info level)
    /// goes to `sock` with the extension `.log`.
    fn start_with<S: AsRef<OsStr>>(sock: &Path, args: &[S]) -> Daemon {
        Daemon::launch(sock, Command::new(BIN).args(args))
    }

    /// As `start_with`, under an open-file limit (`RLIMIT_NOFILE`) of
    /// `soft` and `hard`.
    fn start_with_nofile<S: AsRef<OsStr>>(
        sock: &Path,
        args: &[S],
        (soft, hard): (u64, u64),
    ) -> Daemon {
        Daemon::launch(sock, with_nofile(Command::new(BIN).args(args), soft, hard))
    }

    fn launch(sock: &Path, command: &mut Command) -> Daemon {
        let log = std::fs::File::create(sock.with_extension("log")).unwrap();
        let child = command
            .arg("-s")
            .arg(sock)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            log: sock.with_extension("log"),
        };
        d.wait_for_socket(sock);
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Waits until this daemon listens: its own log says so. A connect
    /// alone proves nothing, since a stale or another process's listener
    /// may hold the path until the daemon replaces it.
    fn wait_for_socket(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listening = format!("listening on {}", sock.display());
        while Instant::now() < deadline {
            if self.log().contains(&listening) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited early: {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "daemon did not listen on {}: {}",
            sock.display(),
            self.log()
        );
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects as a VMM and negotiates like QEMU's first messages do.
pub(crate) fn handshake(sock: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut frontend = loop {
        match Frontend::connect(sock, 18) {
            Ok(f) => break f,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let protocol = frontend.get_protocol_features().unwrap();
    frontend.set_protocol_features(protocol).unwrap();
    assert!(frontend.get_queue_num().unwrap() >= 3);
    // The guest's acknowledgement of VIRTIO_SCSI_F_CHANGE/HOTPLUG, as QEMU
    // forwards it, is accepted.
    frontend.set_features(features).unwrap();
    features
}

#[test]
fn serves_one_connection_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let img = image(dir.path(), "d.raw", 1 << 20);
    let mut daemon = Daemon::start(&sock, &[&img]);
    for _ in 0..3 {
        let features = handshake(&sock);
        assert_ne!(features & (1 << 2), 0, "VIRTIO_SCSI_F_CHANGE offered");
        // Dropping the frontend closes the connection, like a killed QEMU.
    }
    assert!(daemon.child.try_wait().unwrap().is_none(), "still running");
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "socket removed on SIGTERM");
}

#[test]
fn sigint_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let img = image(dir.path(), "d.raw", 4096);
    let mut daemon = Daemon::start(&sock, &[&img]);
    daemon.signal(libc::SIGINT);
    assert_eq!(daemon.wait_exit().code(), Some(0));
    assert!(!sock.exists());
}

#[test]
fn stale_socket_is_replaced_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let img = image(dir.path(), "d.raw", 4096);

    // A live listener holds the path: refused, and the path is left alone.
    // The listener is another daemon, so that it lives in a process of its
    // own: a listener of this test process would be copied into every child
    // another test thread forks, and live on there after it is dropped here.
    let mut live = Daemon::start(&sock, &[&img]);
    let out = run(&["-r", "-s", sock.to_str().unwrap(), img.to_str().unwrap()]);
    assert_one_line_error(&out, 1, &["vus.sock", "in use"]);
    assert!(sock.exists());

    // SIGKILL leaves its socket file behind with nobody listening: stale.
    live.signal(libc::SIGKILL);
    live.wait_exit();
    assert!(sock.exists());
    let refused = std::os::unix::net::UnixStream::connect(&sock).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    // Replaced: the new daemon serves on the same path.
    let daemon = Daemon::start(&sock, &[&img]);
    let replaced = format!("replacing stale socket {}", sock.display());
    assert!(daemon.log().contains(&replaced), "{}", daemon.log());
    handshake(&sock);
}

#[test]
fn lun_option_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let a = image(dir.path(), "a.raw", 4096);
    let a = a.to_str().unwrap();
    let b = image(dir.path(), "b.raw", 4096);
    let b = b.to_str().unwrap();
    let odd = image(dir.path(), "odd.raw", 1536);
    let odd = odd.to_str().unwrap();
    let cases: &[(String, &[&str])] = &[
        (
            format!("{b},block-size=1000"),
            &["LUN 1 (", "b.raw): block-size=1000: must be 512 or 4096"],
        ),
        (
            format!("{b},block-size"),
            &["LUN 1", "b.raw", "block-size", "needs a value"],
        ),
        (
            format!("{b},bogus=1"),
            &["LUN 1", "b.raw", "bogus=1", "unknown option"],
        ),
        (
            format!("{b},ro=yes"),
            &["LUN 1", "b.raw", "ro=yes", "takes no value"],
        ),
        (format!("{b},ro,ro"), &["LUN 1", "b.raw", "ro: given twice"]),
        (
            format!("{b},serial="),
            &["LUN 1", "b.raw", "serial=", "needs a value"],
        ),
        (
            format!("{b},serial=a b"),
            &["LUN 1", "b.raw", "serial=a b", "printable ASCII"],
        ),
        (
            format!("{b},serial=123456789012345678901"),
            &["LUN 1", "serial=", "at most 20"],
        ),
        (
            format!("{b},wwn=0x5000c500"),
            &["LUN 1", "b.raw", "wwn=0x5000c500", "16 hex digits"],
        ),
        (
            format!("{b},wwn=0x6000c50012345678"),
            &["LUN 1", "wwn=0x6000c50012345678", "NAA type"],
        ),
        (format!("{b},"), &["LUN 1", "b.raw", "empty option", ",,"]),
        (",ro".to_string(), &["LUN 1 (,ro)", "no image path"]),
    ];
    for (arg, needles) in cases {
        let out = run(&["-s", sock, a, arg]);
        assert_one_line_error(&out, 1, needles);
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("vhost-device-scsi: error: LUN 1 ("),
            "{arg}"
        );
    }
    // Same WWN or serial as another LUN: blamed on the LUN whose option
    // made it.
    let wwn = "wwn=0x5000c50012345678";
    assert_one_line_error(
        &run(&["-s", sock, &format!("{a},{wwn}"), &format!("{b},{wwn}")]),
        1,
        &[
            "LUN 1 (",
            "b.raw): wwn=0x5000c50012345678: LUN 0 has the same WWN",
        ],
    );
    assert_one_line_error(
        &run(&[
            "-s",
            sock,
            &format!("{a},serial=S1"),
            b,
            &format!("{odd},serial=S1"),
        ]),
        1,
        &[
            "LUN 2 (",
            "odd.raw): serial=S1: LUN 0 has the same serial number",
        ],
    );
    // Options are checked before any image is opened.
    assert_one_line_error(
        &run(&["-s", sock, "/nonexistent.raw", &format!("{b},ro,bogus")]),
        1,
        &["LUN 1", "bogus", "unknown option"],
    );
    // A size that is not a multiple of the block size is the image's fault.
    assert_one_line_error(
        &run(&["-s", sock, &format!("{odd},block-size=4096")]),
        1,
        &["odd.raw", "not a multiple of the 4096-byte block size"],
    );
}

/// Makes `command` run under an open-file limit of `soft` and `hard`, set
/// in the child before exec.
fn with_nofile(command: &mut Command, soft: u64, hard: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe,
    // on a value it owns; nothing is allocated between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    }
}

/// The soft and hard open-file limits of `pid`, from /proc.
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    (values[0], values[1])
}

#[test]
fn open_file_limit_too_low_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    // 300 images that do not exist: the limit is checked before any image
    // is opened. About 300 + 64 + 9 per queue (18 queues by default)
    // descriptors are needed; the hard limit is 256.
    let missing = dir.path().join("missing.raw");
    let mut args = vec![OsStr::new("-s"), sock.as_os_str()];
    args.extend(std::iter::repeat_n(missing.as_os_str(), 300));
    let out = with_nofile(Command::new(BIN).args(&args), 256, 256)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        1,
        &[
            "vhost-device-scsi: error: 300 images need about 526 open files, \
           but the limit is 256 (raise it with ulimit -n or LimitNOFILE= in the systemd unit)\n",
        ],
    );
    assert!(!sock.exists());
    // Fewer queues need fewer descriptors: 300 + 64 + 9 * 3.
    args.extend([OsStr::new("--num-queues"), OsStr::new("1")]);
    let out = with_nofile(Command::new(BIN).args(&args), 256, 256)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, &["300 images need about 391 open files"]);
}

#[test]
fn open_file_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let img = image(dir.path(), "d.raw", 4096);
    // 600 read-only LUNs of one image: 600 descriptors, more than the soft
    // limit of 256 allows, fewer than the hard limit of 1024.
    let mut args = vec![OsStr::new("-r")];
    args.extend(std::iter::repeat_n(img.as_os_str(), 600));
    let daemon = Daemon::start_with_nofile(&sock, &args, (256, 1024));
    assert_eq!(nofile_of(daemon.child.id()), (1024, 1024));
    assert!(
        daemon
            .log()
            .contains("raised the open-file limit from 256 to 1024 for 600 images"),
        "{}",
        daemon.log()
    );
    assert!(daemon.log().contains("LUN 599: "));
    handshake(&sock);
    drop(daemon);
    // A limit that is high enough is left alone.
    let daemon = Daemon::start_with_nofile(&sock, &args, (900, 1024));
    assert_eq!(nofile_of(daemon.child.id()), (900, 1024));
    assert!(!daemon.log().contains("open-file limit"));
}

/// The lowest descriptor number `pid` has not open: with its soft
/// open-file limit there, it cannot open another descriptor.
fn lowest_free_fd(pid: u32) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap()
}

/// Sets the open-file limits of the running process `pid`.
fn set_nofile_of(pid: u32, (soft, hard): (u64, u64)) {
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: prlimit reads the struct we pass and writes nothing.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// A connection the daemon cannot take — accept fails with EMFILE, its
/// descriptors used up — is logged and retried, and the daemon keeps
/// listening: once descriptors are free again a VMM connects and is
/// served.
#[test]
fn running_out_of_descriptors_does_not_end_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let img = image(dir.path(), "d.raw", 1 << 20);
    let mut daemon = Daemon::start(&sock, &[&img]);
    let pid = daemon.child.id();
    let limits = nofile_of(pid);
    // The daemon waits in accept: no descriptor number is left below its
    // soft limit.
    set_nofile_of(pid, (lowest_free_fd(pid), limits.1));
    // The accept the daemon is blocked in reserved its descriptor number
    // before the limit came down (accept4 takes it before it waits), so
    // that connection is taken and, once closed, sends the daemon back
    // to accept: the next one fails with EMFILE.
    drop(std::os::unix::net::UnixStream::connect(&sock).unwrap());
    let stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = format!("cannot accept a connection on {}", sock.display());
    while !daemon.log().contains(&failed) {
        assert!(
            Instant::now() < deadline,
            "accept did not fail: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still failing after several rounds of retries.
    std::thread::sleep(Duration::from_millis(300));
    let log = daemon.log();
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited: {log}"
    );
    assert!(
        log.contains("Too many open files") && log.contains("trying again in"),
        "{log}"
    );
    drop(stream);
    set_nofile_of(pid, limits);
    handshake(&sock);
    assert!(daemon.child.try_wait().unwrap().is_none(), "still running");
    // A later connection goes on as ever.
    handshake(&sock);
}

/// The access mode (O_RDONLY, O_RDWR) of `pid`'s open file `path`.
fn open_mode(pid: u32, path: &Path) -> i32 {
    let path = std::fs::canonicalize(path).unwrap();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        if std::fs::read_link(entry.path()).ok().as_deref() == Some(path.as_path()) {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_str().unwrap()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .unwrap()
                .trim();
            return i32::from_str_radix(flags, 8).unwrap() & libc::O_ACCMODE;
        }
    }
    panic!("{} is not open in {pid}", path.display());
}

#[test]
fn per_lun_options_and_read_write_opens() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let a = image(dir.path(), "a.raw", 1 << 20);
    let b = image(dir.path(), "b.raw", 1 << 20);
    let c = image(dir.path(), "c,d.raw", 1 << 20);
    let c_arg = format!(
        "{},block-size=4096,serial=SER-1,wwn=0x5000C50012345678",
        dir.path().join("c,,d.raw").display()
    );
    let b_arg = format!("{},ro", b.display());
    let daemon = Daemon::start_with(&sock, &[a.to_str().unwrap(), &b_arg, &c_arg]);
    let pid = daemon.child.id();
    assert_eq!(open_mode(pid, &a), libc::O_RDWR);
    assert_eq!(open_mode(pid, &b), libc::O_RDONLY);
    assert_eq!(open_mode(pid, &c), libc::O_RDWR);
    let log = daemon.log();
    let line = |lun: &str| {
        log.lines()
            .find(|l| l.contains(lun))
            .unwrap_or_else(|| panic!("no {lun} line in {log}"))
            .to_string()
    };
    assert!(line("LUN 0:").contains("2048 blocks of 512 bytes, read-write, regular file, locked"));
    assert!(line("LUN 1:").contains("read-only"));
    let lun2 = line("LUN 2:");
    assert!(
        lun2.contains("c,d.raw (1048576 bytes, 256 blocks of 4096 bytes, read-write"),
        "{lun2}"
    );
    assert!(
        lun2.contains("serial SER-1, NAA 0x5000c50012345678"),
        "{lun2}"
    );
    assert!(!log.contains("not implemented"), "{log}");
    handshake(&sock);
}

#[test]
fn read_only_flag_covers_every_lun() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let a = image(dir.path(), "a.raw", 4096);
    let b = image(dir.path(), "b.raw", 4096);
    let daemon = Daemon::start_with(
        &sock,
        &[
            OsStr::new("-r"),
            OsStr::new("--no-discard"),
            a.as_os_str(),
            b.as_os_str(),
        ],
    );
    assert_eq!(open_mode(daemon.child.id(), &a), libc::O_RDONLY);
    assert_eq!(open_mode(daemon.child.id(), &b), libc::O_RDONLY);
}

#[test]
fn two_writers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.raw", 4096);
    let first = Daemon::start_with(&dir.path().join("1.sock"), &[&img]);
    let s2 = dir.path().join("2.sock");
    let out = run(&["-s", s2.to_str().unwrap(), img.to_str().unwrap()]);
    assert_one_line_error(
        &out,
        1,
        &[
            &format!("image {}: locked by ", img.display()),
            // The holder is found through /proc.
            &format!(
                ", pid {} (it is being written): lock byte 101",
                first.child.id()
            ),
        ],
    );
    assert!(!s2.exists(), "the refused daemon never listened");
    drop(first);
    // With the first daemon gone, its locks are gone.
    let _second = Daemon::start_with(&s2, &[&img]);
}

/// Live migration on shared storage: the destination's daemon
/// (`--incoming`) opens an image the source's daemon has locked, holding
/// no lock itself; a daemon without `--incoming` is still refused, naming
/// the source; a second `--incoming` daemon coexists with the first; and
/// with the source gone the image is free for anyone (QEMU included).
#[test]
fn incoming_daemons_open_a_locked_image_without_locking_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.raw", 1 << 20);
    let source = Daemon::start_with(&dir.path().join("a.sock"), &[&img]);
    let incoming: [&OsStr; 2] = [OsStr::new("--incoming"), img.as_os_str()];
    let destination = Daemon::start_with(&dir.path().join("b.sock"), &incoming);
    assert!(
        destination.log().contains(&format!(
            "LUN 0: {} (1048576 bytes, 2048 blocks of 512 bytes, read-write, regular file, \
             inactive, not locked until the VMM starts the device",
            img.display()
        )),
        "{}",
        destination.log()
    );
    let c = dir.path().join("c.sock");
    assert_one_line_error(
        &run(&["-s", c.to_str().unwrap(), img.to_str().unwrap()]),
        1,
        &[
            &format!("image {}: locked by ", img.display()),
            // The source, not the destination, holds the image.
            &format!(
                ", pid {} (it is being written): lock byte 101",
                source.child.id()
            ),
        ],
    );
    assert!(!c.exists(), "the refused daemon never listened");
    let _another = Daemon::start_with(&dir.path().join("d.sock"), &incoming);
    drop(source);
    // Neither inactive daemon holds a lock: a third daemon may lock the
    // image, and once it is gone, so may QEMU.
    let third = Daemon::start_with(&dir.path().join("e.sock"), &[&img]);
    drop(third);
    if let Some(qemu_io) = qemu_tool("qemu-io") {
        let out = tool_output(
            &qemu_io,
            &[
                OsStr::new("-f"),
                OsStr::new("raw"),
                OsStr::new("-c"),
                OsStr::new("write -P 0x11 0 512"),
                img.as_os_str(),
            ],
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("wrote 512/512 bytes"),
            "qemu-io refused by an inactive daemon: {out:?}"
        );
    }
    drop(destination);
}

#[test]
fn the_same_image_twice_in_one_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let img = image(dir.path(), "d.raw", 4096);
    let i = img.to_str().unwrap();
    assert_one_line_error(
        &run(&["-s", sock.to_str().unwrap(), i, &format!("{i},ro")]),
        1,
        &["locked by another LUN of this daemon (it is being written)"],
    );
    // Read-only twice is fine.
    let _d = Daemon::start_with(&sock, &[OsStr::new("-r"), img.as_os_str(), img.as_os_str()]);
}

#[test]
fn readers_share_an_image_and_keep_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.raw", 4096);
    let ro = format!("{},ro", img.display());
    let _r1 = Daemon::start(&dir.path().join("1.sock"), &[&img]);
    let _r2 = Daemon::start_with(&dir.path().join("2.sock"), &[&ro]);
    handshake(&dir.path().join("1.sock"));
    handshake(&dir.path().join("2.sock"));
    let out = run(&[
        "-s",
        dir.path().join("3.sock").to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_one_line_error(
        &out,
        1,
        &[
            "d.raw: locked by",
            "(it refuses writers): lock byte 201",
            "-r or ,ro",
        ],
    );
}

#[test]
fn a_writer_keeps_readers_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.raw", 4096);
    let _w = Daemon::start_with(&dir.path().join("1.sock"), &[&img]);
    let out = run(&[
        "-r",
        "-s",
        dir.path().join("2.sock").to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, 1, &["d.raw: locked by", "(it is being written)"]);
}

fn qemu_tool(name: &str) -> Option<PathBuf> {
    crate::common::tool(name, "qemu-utils")
}

fn tool_output(tool: &Path, args: &[&OsStr]) -> Output {
    Command::new(tool).args(args).output().unwrap()
}

#[test]
fn qemu_sees_our_locks() {
    let (Some(qemu_io), Some(qemu_img)) = (qemu_tool("qemu-io"), qemu_tool("qemu-img")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.raw", 1 << 20);
    let i = img.as_os_str();
    let write = |tool: &Path| {
        tool_output(
            tool,
            &[
                OsStr::new("-f"),
                OsStr::new("raw"),
                OsStr::new("-c"),
                OsStr::new("write -P 0x11 0 512"),
                i,
            ],
        )
    };
    // qemu-img convert reads the source and refuses writers to it (QEMU
    // 7.2's qemu-img info, by contrast, shares everything).
    let copy = dir.path().join("copy.raw");
    let convert = |force_share: bool| {
        let mut args = vec![OsStr::new("convert"), OsStr::new("-O"), OsStr::new("raw")];
        if force_share {
            args.push(OsStr::new("-U"));
        }
        args.extend([i, copy.as_os_str()]);
        tool_output(&qemu_img, &args)
    };
    let untouched = || std::fs::read(&img).unwrap().iter().all(|&b| b == 0x5a);

    let daemon = Daemon::start_with(&dir.path().join("rw.sock"), &[&img]);
    let out = write(&qemu_io);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains("Failed to get \"write\" lock"),
        "qemu-io: {stderr}"
    );
    assert!(untouched(), "qemu-io wrote past our locks");
    let out = convert(false);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"),
        "{out:?}"
    );
    assert!(
        convert(true).status.success(),
        "-U (force share) reads anyway"
    );
    drop(daemon);

    // A read-only daemon: QEMU may read along, not write.
    let daemon = Daemon::start(&dir.path().join("ro.sock"), &[&img]);
    let out = convert(false);
    assert!(out.status.success(), "{out:?}");
    let out = write(&qemu_io);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"),
        "{out:?}"
    );
    assert!(untouched());
    drop(daemon);

    // No daemon, no locks: the same write goes through.
    let out = write(&qemu_io);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("wrote 512/512 bytes"),
        "{out:?}"
    );
    assert!(!untouched());
}

/// Waits until some process holds a lock on `byte` of `path`.
fn wait_for_lock(path: &Path, byte: i64) {
    let f = std::fs::File::open(path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: a plain C struct of integers; all zeroes is valid.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte;
        fl.l_len = 1;
        // SAFETY: F_OFD_GETLK reads and writes the one flock it is given.
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        assert_eq!(rc, 0);
        if fl.l_type != libc::F_UNLCK as libc::c_short {
            return;
        }
        assert!(Instant::now() < deadline, "nobody locked byte {byte}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn we_see_qemus_locks() {
    let Some(qemu_io) = qemu_tool("qemu-io") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.raw", 1 << 20);
    // qemu-io with the image open read-write, idle for a while.
    let mut writer = Command::new(&qemu_io)
        .args(["-f", "raw", "-c", "sleep 20000"])
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_lock(&img, 101);
    let sock = dir.path().join("s.sock");
    let holder = format!(
        "locked by qemu-io, pid {} (it is being written)",
        writer.id()
    );
    for read_only in [false, true] {
        let mut args = vec!["-s", sock.to_str().unwrap(), img.to_str().unwrap()];
        if read_only {
            args.push("-r");
        }
        assert_one_line_error(&run(&args), 1, &[&holder]);
    }
    let _ = writer.kill();
    let _ = writer.wait();
    let _d = Daemon::start_with(&sock, &[&img]);
}

/// One operator error: the arguments, and what the daemon must answer.
struct CliCase {
    name: &'static str,
    args: Vec<std::ffi::OsString>,
    /// Run as an unprivileged user (nobody) when the test runs as root, so
    /// that permissions apply.
    unprivileged: bool,
    code: i32,
    /// The whole of stderr, one line.
    stderr: String,
}

/// Runs every case, reporting each failure by name.
fn run_cli_cases(cases: &[CliCase]) {
    use std::os::unix::process::CommandExt;
    let mut failures = Vec::new();
    for case in cases {
        let mut command = Command::new(BIN);
        command.args(&case.args).env("RUST_LOG", "off");
        // SAFETY: geteuid has no preconditions.
        if case.unprivileged && unsafe { libc::geteuid() } == 0 {
            command.gid(65534).uid(65534);
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = format!("{}\n", case.stderr);
        if out.status.code() != Some(case.code) || stderr != want {
            failures.push(format!(
                "{}: exit {:?}, stderr {stderr:?}; expected exit {}, stderr {want:?}",
                case.name,
                out.status.code(),
                case.code
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn os_args(args: &[&dyn AsRef<OsStr>]) -> Vec<std::ffi::OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// Operator errors tests above do not cover, each with its exit status
/// (2 for what clap rejects, 1 for the rest) and its exact one-line
/// message.
/// A tmpfs mounted on a directory, unmounted when dropped (lazily, so that
/// a descriptor some forked child still holds cannot keep it mounted).
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn new(dir: &Path, opts: &str) -> TmpfsMount {
        TmpfsMount::remount(dir, opts);
        TmpfsMount(dir.to_path_buf())
    }

    fn remount(dir: &Path, opts: &str) {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount -o {opts} {}", dir.display());
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A loop device, detached when dropped.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn every_operator_error_has_its_exit_status_and_one_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // Traversable by the unprivileged cases.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = dir.path();
    let sock = d.join("s.sock");
    let good = image(d, "good.raw", 4096);
    let unreadable = image(d, "unreadable.raw", 4096);
    std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o000)).unwrap();
    let read_only_file = image(d, "readonly.raw", 4096);
    std::fs::set_permissions(&read_only_file, std::fs::Permissions::from_mode(0o444)).unwrap();
    let loop_link = d.join("loop.raw");
    std::os::unix::fs::symlink(&loop_link, &loop_link).unwrap();
    let fifo = d.join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; creates a FIFO in our temporary directory.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o644) }, 0);
    let closed = d.join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let long = d.join("x".repeat(110));
    // Writable by the unprivileged cases.
    let open = d.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let open_sock = open.join("s.sock");
    let api_sock = d.join("api.sock");
    let e = "vhost-device-scsi: error:";
    let clap_invalid = |flag: &str, value: &str, reason: &str| {
        format!("error: invalid value '{value}' for '{flag}': {reason}")
    };
    let mut cases = vec![
        CliCase {
            name: "no image",
            args: os_args(&[&"-s", &sock]),
            unprivileged: false,
            code: 2,
            stderr: "error: the following required arguments were not provided: <IMAGE>..."
                .to_string(),
        },
        CliCase {
            name: "--num-queues 0",
            args: os_args(&[&"-s", &sock, &"--num-queues", &"0", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--num-queues <N>", "0", "0 is not in 1..=62"),
        },
        CliCase {
            name: "--num-queues 63",
            args: os_args(&[&"-s", &sock, &"--num-queues", &"63", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--num-queues <N>", "63", "63 is not in 1..=62"),
        },
        CliCase {
            name: "--num-queues abc",
            args: os_args(&[&"-s", &sock, &"--num-queues", &"abc", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--num-queues <N>", "abc", "invalid digit found in string"),
        },
        CliCase {
            name: "--num-queues 99999999999",
            args: os_args(&[&"-s", &sock, &"--num-queues", &"99999999999", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid(
                "--num-queues <N>",
                "99999999999",
                "99999999999 is not in 1..=62",
            ),
        },
        CliCase {
            name: "--num-queues without a value",
            args: os_args(&[&"-s", &sock, &good, &"--num-queues"]),
            unprivileged: false,
            code: 2,
            stderr: "error: a value is required for '--num-queues <N>' but none was supplied"
                .into(),
        },
        CliCase {
            name: "--threads 0",
            args: os_args(&[&"-s", &sock, &"--threads", &"0", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--threads <T>", "0", "0 is not in 1..=62"),
        },
        CliCase {
            name: "--threads 63",
            args: os_args(&[&"-s", &sock, &"--threads", &"63", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--threads <T>", "63", "63 is not in 1..=62"),
        },
        CliCase {
            name: "--threads -1",
            args: os_args(&[&"-s", &sock, &"--threads", &"-1", &good]),
            unprivileged: false,
            code: 2,
            stderr: "error: unexpected argument '-1' found".into(),
        },
        CliCase {
            name: "--threads more than --num-queues",
            args: os_args(&[
                &"-s",
                &sock,
                &"--threads",
                &"4",
                &"--num-queues",
                &"2",
                &good,
            ]),
            unprivileged: false,
            code: 1,
            stderr: format!("{e} --threads 4: more threads than request queues (--num-queues 2)"),
        },
        CliCase {
            name: "--poll-us 1001",
            args: os_args(&[&"-s", &sock, &"--poll-us", &"1001", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--poll-us <US>", "1001", "1001 is not in 0..=1000"),
        },
        CliCase {
            name: "--poll-us 1.5",
            args: os_args(&[&"-s", &sock, &"--poll-us", &"1.5", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--poll-us <US>", "1.5", "invalid digit found in string"),
        },
        CliCase {
            name: "--socket-path twice",
            args: os_args(&[&"-s", &sock, &"-s", &sock, &good]),
            unprivileged: false,
            code: 2,
            stderr: "error: the argument '--socket-path <PATH>' cannot be used multiple times"
                .into(),
        },
        CliCase {
            name: "--read-only twice",
            args: os_args(&[&"-s", &sock, &"-r", &"-r", &good]),
            unprivileged: false,
            code: 2,
            stderr: "error: the argument '--read-only' cannot be used multiple times".into(),
        },
        CliCase {
            name: "empty socket path",
            args: os_args(&[&"-s", &"", &good]),
            unprivileged: false,
            code: 2,
            stderr: "error: a value is required for '--socket-path <PATH>' but none was supplied"
                .into(),
        },
        CliCase {
            name: "socket path is a directory",
            args: os_args(&[&"-s", &d, &good]),
            unprivileged: false,
            code: 1,
            stderr: format!(
                "{e} socket path {}: exists and is not a socket",
                d.display()
            ),
        },
        CliCase {
            name: "socket path too long",
            args: os_args(&[&"-s", &long, &good]),
            unprivileged: false,
            code: 1,
            stderr: format!(
                "{e} socket path {}: path must be shorter than SUN_LEN",
                long.display()
            ),
        },
        CliCase {
            name: "socket in a directory the daemon may not write",
            args: os_args(&[&"-r", &"-s", &closed.join("s.sock"), &good]),
            unprivileged: true,
            code: 1,
            stderr: format!(
                "{e} socket path {}: Permission denied (os error 13)",
                closed.join("s.sock").display()
            ),
        },
        CliCase {
            name: "--socket-mode 999",
            args: os_args(&[&"-s", &sock, &"--socket-mode", &"999", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--socket-mode <MODE>", "999", BAD_MODE),
        },
        CliCase {
            name: "--socket-mode 01777 (sticky)",
            args: os_args(&[&"-s", &sock, &"--socket-mode", &"01777", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--socket-mode <MODE>", "01777", BAD_MODE),
        },
        CliCase {
            name: "--socket-mode rw-rw----",
            args: os_args(&[&"-s", &sock, &"--socket-mode", &"rw-rw----", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--socket-mode <MODE>", "rw-rw----", BAD_MODE),
        },
        CliCase {
            name: "--socket-mode empty",
            args: os_args(&[&"-s", &sock, &"--socket-mode", &"", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--socket-mode <MODE>", "", BAD_MODE),
        },
        CliCase {
            name: "--socket-group empty",
            args: os_args(&[&"-s", &sock, &"--socket-group", &"", &good]),
            unprivileged: false,
            code: 2,
            stderr: "error: a value is required for '--socket-group <GROUP>' but none was supplied"
                .into(),
        },
        CliCase {
            name: "--socket-group of no group",
            args: os_args(&[&"-s", &sock, &"--socket-group", &"no-such-group-x", &good]),
            unprivileged: false,
            code: 1,
            stderr: format!(
                "{e} --socket-group no-such-group-x: no such group (a group name or a numeric gid)"
            ),
        },
        CliCase {
            name: "--api-socket-group of no group",
            args: os_args(&[
                &"-s",
                &sock,
                &"--api-socket",
                &api_sock,
                &"--api-socket-group",
                &"no-such-group-x",
                &good,
            ]),
            unprivileged: false,
            code: 1,
            stderr: format!(
                "{e} --api-socket-group no-such-group-x: no such group (a group name or a numeric gid)"
            ),
        },
        CliCase {
            name: "--api-socket-mode out of range",
            args: os_args(&[&"-s", &sock, &"--api-socket-mode", &"1777", &good]),
            unprivileged: false,
            code: 2,
            stderr: clap_invalid("--api-socket-mode <MODE>", "1777", BAD_MODE),
        },
        CliCase {
            name: "--socket-group gid -1",
            args: os_args(&[&"-s", &sock, &"--socket-group", &"4294967295", &good]),
            unprivileged: false,
            code: 1,
            stderr: format!(
                "{e} --socket-group 4294967295: no such group (a group name or a numeric gid)"
            ),
        },
        CliCase {
            name: "--socket-group the daemon may not give",
            args: os_args(&[&"-r", &"-s", &open_sock, &"--socket-group", &"0", &good]),
            unprivileged: true,
            code: 1,
            stderr: format!(
                "{e} --socket-group 0: cannot give socket {} to the group: \
                 Operation not permitted (os error 1)",
                open_sock.display()
            ),
        },
        CliCase {
            name: "empty image path",
            args: os_args(&[&"-s", &sock, &""]),
            unprivileged: false,
            code: 1,
            stderr: format!("{e} LUN 0 (): no image path before the options"),
        },
        CliCase {
            name: "unreadable image",
            args: os_args(&[&"-r", &"-s", &sock, &unreadable]),
            unprivileged: true,
            code: 1,
            stderr: format!("{e} image {}: permission denied", unreadable.display()),
        },
        CliCase {
            name: "read-only file served read-write",
            args: os_args(&[&"-s", &sock, &read_only_file]),
            unprivileged: true,
            code: 1,
            stderr: format!("{e} image {}: permission denied", read_only_file.display()),
        },
        CliCase {
            name: "symbolic link loop",
            args: os_args(&[&"-s", &sock, &loop_link]),
            unprivileged: false,
            code: 1,
            stderr: format!(
                "{e} image {}: cannot open: Too many levels of symbolic links (os error 40)",
                loop_link.display()
            ),
        },
        CliCase {
            name: "a FIFO",
            args: os_args(&[&"-s", &sock, &fifo]),
            unprivileged: false,
            code: 1,
            stderr: format!(
                "{e} image {}: is neither a regular file nor a block device",
                fifo.display()
            ),
        },
    ];
    // Cases that need root: a read-only file system, and a block device
    // whose direct I/O alignment (4096-byte sectors) the LUN's block size
    // misses.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let rofs = d.join("rofs");
    // Dropped last, on every path out of this test, a panic included.
    let mut _loop_device = None;
    let mut _rofs_mount = None;
    if root {
        std::fs::create_dir(&rofs).unwrap();
        _rofs_mount = Some(TmpfsMount::new(&rofs, "size=1m"));
        // The image is made by a child process: a descriptor of this
        // process, even a closed one, may live on in a child that another
        // test thread forked, and one open for writing makes the remount
        // fail with EBUSY.
        let on_rofs = rofs.join("x.raw");
        let status = Command::new("truncate")
            .args(["-s", "4096"])
            .arg(&on_rofs)
            .status()
            .unwrap();
        assert!(status.success(), "truncate {}", on_rofs.display());
        TmpfsMount::remount(&rofs, "remount,ro");
        cases.push(CliCase {
            name: "image on a read-only file system, served read-write",
            args: os_args(&[&"-s", &sock, &on_rofs]),
            unprivileged: false,
            code: 1,
            stderr: format!(
                "{e} image {}: cannot open: Read-only file system (os error 30)",
                on_rofs.display()
            ),
        });
        let backing = image(d, "loop.img", 1 << 20);
        let out = Command::new("losetup")
            .args(["-f", "--show", "--sector-size", "4096"])
            .arg(&backing)
            .output()
            .unwrap();
        if out.status.success() {
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
            cases.push(CliCase {
                name: "--direct with a block size below the device's alignment",
                args: os_args(&[&"--direct", &"-s", &sock, &dev]),
                unprivileged: false,
                code: 1,
                stderr: format!(
                    "{e} image {dev}: --direct needs a block size that is a multiple of 4096 \
                     bytes (the image's direct I/O alignment), not 512: add ,block-size=4096"
                ),
            });
            _loop_device = Some(LoopDevice(dev));
        } else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "losetup: {out:?}"
            );
            eprintln!("skipped the --direct alignment case: no loop device");
        }
    } else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root: the read-only file system and --direct cases must run"
        );
        eprintln!("skipped the cases that need root (mount, losetup)");
    }
    run_cli_cases(&cases);
    assert!(!sock.exists(), "no case got as far as listening");
    assert!(
        !open_sock.exists(),
        "a socket that could not be set up is removed"
    );
}

/// Runs the daemon with `args` (logging off), or kills it and says so if
/// it has not exited within `limit`.
fn run_within(args: &[&OsStr], limit: Duration) -> Result<Output, String> {
    let stderr = tempfile::tempfile().unwrap();
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.try_clone().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = stderr;
    let mut text = Vec::new();
    std::io::Seek::rewind(&mut stderr).unwrap();
    std::io::Read::read_to_end(&mut stderr, &mut text).unwrap();
    Ok(Output {
        status,
        stdout: Vec::new(),
        stderr: text,
    })
}

/// A FIFO nobody writes to is refused at once, read-only, read-write and
/// with --direct: the image is opened without blocking and its type read
/// from the open descriptor (opening a FIFO read-only waits for a writer).
#[test]
fn a_fifo_without_a_writer_does_not_block_startup() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let fifo = dir.path().join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; creates a FIFO in our temporary directory.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o644) }, 0);
    let want = format!(
        "vhost-device-scsi: error: image {}: is neither a regular file nor a block device\n",
        fifo.display()
    );
    for flags in [&["-r"][..], &[], &["--direct"], &["-r", "--direct"]] {
        let mut args: Vec<&OsStr> = flags.iter().map(OsStr::new).collect();
        args.extend([OsStr::new("-s"), sock.as_os_str(), fifo.as_os_str()]);
        let out = run_within(&args, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{flags:?}: the daemon blocked on the FIFO: {e}"));
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), want, "{flags:?}");
    }
    assert!(!sock.exists());
}

/// What `--socket-mode` says of a value that is not a mode.
const BAD_MODE: &str = "not an octal mode from 0000 to 0777 (e.g. 0660)";

/// The permission bits and group of the file at `path`.
fn mode_and_group(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.gid())
}

/// The daemon in `command` under umask 000.
fn with_umask_000(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        })
    }
}

/// A group that is not the test's own (when root, who may give a file to
/// any group), as (name, gid); else the test's own group.
fn another_group() -> (String, u32) {
    // SAFETY: getegid and geteuid have no preconditions.
    let (egid, root) = unsafe { (libc::getegid(), libc::geteuid() == 0) };
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    groups
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            Some((name.to_string(), gid))
        })
        .find(|(_, gid)| if root { *gid != egid } else { *gid == egid })
        .expect("a group in /etc/group")
}

/// Only the daemon's user may connect by default: the socket is 0600
/// even under umask 000 (bind(2) alone would make it srwxrwxrwx).
#[test]
fn the_socket_is_the_owners_alone_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let img = image(dir.path(), "d.raw", 1 << 20);
    let daemon = Daemon::launch(&sock, with_umask_000(Command::new(BIN).arg("-r").arg(&img)));
    // SAFETY: getegid has no preconditions.
    assert_eq!(mode_and_group(&sock), (0o600, unsafe { libc::getegid() }));
    handshake(&sock);
    drop(daemon);
}

/// --socket-mode and --socket-group, the group by name and by number, are
/// what the socket gets, whatever the umask; the daemon serves through it.
#[test]
fn socket_mode_and_group_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let img = image(dir.path(), "d.raw", 1 << 20);
    let (name, gid) = another_group();
    for (mode, group) in [
        ("0660", name.clone()),
        ("640", gid.to_string()),
        ("0o666", name.clone()),
    ] {
        let daemon = Daemon::launch(
            &sock,
            with_umask_000(Command::new(BIN).args([
                "-r",
                "--socket-mode",
                mode,
                "--socket-group",
                &group,
                img.to_str().unwrap(),
            ])),
        );
        let want = u32::from_str_radix(mode.trim_start_matches("0o"), 8).unwrap();
        assert_eq!(mode_and_group(&sock), (want, gid), "{mode} {group}");
        assert!(
            daemon
                .log()
                .contains(&format!("mode {want:04o}, group {group} ({gid})")),
            "{}",
            daemon.log()
        );
        handshake(&sock);
        drop(daemon);
    }
    // A mode alone keeps the daemon's group.
    let daemon = Daemon::launch(
        &sock,
        with_umask_000(
            Command::new(BIN)
                .args(["-r", "--socket-mode", "0606"])
                .arg(&img),
        ),
    );
    // SAFETY: getegid has no preconditions.
    assert_eq!(mode_and_group(&sock), (0o606, unsafe { libc::getegid() }));
    drop(daemon);
}

/// xorshift64*: a reproducible stream for the operator-input fuzzing below.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a [u8]]) -> &'a [u8] {
        from[self.below(from.len())]
    }
}

/// Per-LUN option syntax, fuzzed: any IMAGE argument parses or fails with
/// a one-line reason, never panics.
#[test]
fn lun_spec_parsing_never_panics() {
    use std::os::unix::ffi::OsStrExt;
    use vhost_device_scsi::cli::LunSpec;
    const PIECES: &[&[u8]] = &[
        b",",
        b",,",
        b"ro",
        b"block-size=",
        b"serial=",
        b"wwn=",
        b"0x",
        b"=",
        b"512",
        b"4096",
        b"5000c50012345678",
        b"abc",
        b" ",
        b"\xff",
        b"\x00",
        b"/",
        b"disk.raw",
        b"-1",
        b"99999999999999999999",
        b"\xe2\x82\xac",
    ];
    let mut rng = Xorshift(0x0005_eed0_fc11);
    for _ in 0..200_000 {
        let mut arg = Vec::new();
        for _ in 0..rng.below(12) {
            arg.extend_from_slice(rng.pick(PIECES));
        }
        match LunSpec::parse(OsStr::from_bytes(&arg)) {
            Ok(spec) => assert!(!spec.path.as_os_str().is_empty(), "{arg:?}"),
            Err(e) => {
                let line = e.to_string();
                assert!(
                    !line.is_empty() && !line.contains('\n'),
                    "{arg:?}: {line:?}"
                );
            }
        }
    }
}

/// The whole command line, fuzzed: random arguments (flags, values,
/// images good and bad, a socket path in a missing directory so that no
/// run gets as far as listening) always end in exit status 1 or 2 and one
/// line on stderr, never a panic.
#[test]
fn random_command_lines_fail_with_one_line() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let good = image(dir.path(), "good.raw", 4096);
    let odd = image(dir.path(), "odd.raw", 1000);
    let sock = dir.path().join("missing-dir/s.sock");
    let good = good.as_os_str().as_bytes().to_vec();
    let odd = odd.as_os_str().as_bytes().to_vec();
    let sock = sock.as_os_str().as_bytes().to_vec();
    let good_ro = [good.as_slice(), b",ro"].concat();
    let pieces: Vec<&[u8]> = vec![
        b"-s",
        b"--socket-path",
        &sock,
        &sock,
        b"-r",
        b"--read-only",
        b"--solid-state",
        b"--direct",
        b"--no-discard",
        b"--num-queues",
        b"--threads",
        b"--poll-us",
        b"0",
        b"1",
        b"2",
        b"62",
        b"63",
        b"1000",
        b"1001",
        b"-1",
        b"x",
        b"",
        &good,
        &good,
        &good_ro,
        &odd,
        b"/nonexistent.raw",
        b",ro",
        b"--bogus",
        b"-",
        b"--",
        b"\xff",
    ];
    let mut rng = Xorshift(0x00c0_ffee);
    let mut failures = Vec::new();
    let mut kinds = std::collections::BTreeMap::new();
    for run in 0..300 {
        let mut args: Vec<&OsStr> = Vec::new();
        if rng.below(4) != 0 {
            // Usually with a socket path, to get past clap more often.
            args.extend([OsStr::new("-s"), OsStr::from_bytes(&sock)]);
        }
        for _ in 0..rng.below(7) {
            args.push(OsStr::from_bytes(pieces[rng.below(pieces.len())]));
        }
        let out = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ok = matches!(out.status.code(), Some(1 | 2))
            && stderr.lines().count() == 1
            && !stderr.contains("panicked");
        if !ok {
            failures.push(format!(
                "run {run}: {args:?}: exit {:?}, stderr {stderr:?}",
                out.status.code()
            ));
        }
        // What kind of error, for the summary: the message up to its
        // first path or value.
        let kind: String = stderr.chars().take(28).collect();
        *kinds.entry(kind).or_insert(0u32) += 1;
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // The generator reaches the daemon's own checks, not only clap's.
    assert!(
        kinds
            .keys()
            .any(|k| k.starts_with("vhost-device-scsi: error:"))
            && kinds.keys().any(|k| k.starts_with("error:")),
        "{kinds:?}"
    );
    eprintln!("{kinds:#?}");
}
