//! The daemon as an operator runs it: command-line errors, the socket, one
//! VMM connection after another over a real vhost-user frontend, signals.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-scsi");

fn image(dir: &Path, name: &str, size: usize) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![0x5a; size]).unwrap();
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
    let many: Vec<&str> = std::iter::repeat_n(good, 257).collect();
    let mut args = vec!["-s", sock];
    args.extend(many);
    assert_one_line_error(&run(&args), 1, &["257", "at most 256"]);
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
        "--version",
        "IMAGE",
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
}

impl Daemon {
    fn start(sock: &Path, images: &[&Path]) -> Daemon {
        let child = Command::new(BIN)
            .arg("-r")
            .arg("-s")
            .arg(sock)
            .args(images)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut d = Daemon { child };
        d.wait_for_socket(sock);
        d
    }

    fn wait_for_socket(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(sock).is_ok() {
                // That probe was a connection too; the daemon serves it and
                // goes back to listening.
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon did not listen on {}", sock.display());
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
fn handshake(sock: &Path) -> u64 {
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
    let live = UnixListener::bind(&sock).unwrap();
    let out = run(&["-s", sock.to_str().unwrap(), img.to_str().unwrap()]);
    assert_one_line_error(&out, 1, &["vus.sock", "in use"]);
    assert!(sock.exists());
    drop(live);

    // The listener is gone but its socket file stays: replaced.
    assert!(sock.exists());
    let _daemon = Daemon::start(&sock, &[&img]);
    handshake(&sock);
}
