//! Running under a service manager (issue 18): readiness and status
//! notifications to `$NOTIFY_SOCKET` (sd_notify(3)), systemd socket
//! activation (`LISTEN_FDS`, through `systemd-socket-activate`) and
//! `--socket-fd`, against the daemon binary.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::BIN;

const WAIT: Duration = Duration::from_secs(10);

fn image(dir: &Path) -> String {
    let path = dir.join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    path.to_str().unwrap().to_string()
}

/// A VMM's negotiation up to SET_FEATURES, then a disconnect.
fn handshake(sock: &Path) {
    crate::daemon::handshake(sock);
}

/// The next notification, as its `KEY=VALUE` lines.
fn next(notify: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("a notification within 10 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "the daemon stopped with {status}");
}

/// READY=1 comes once the socket accepts (a connect made the moment it
/// arrives succeeds), then a STATUS line for each VMM connecting and
/// disconnecting, and STOPPING=1 at SIGTERM.
#[test]
fn readiness_and_status_reach_the_service_manager() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .arg(image(dir.path()))
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = next(&notify);
    // At once: the socket already accepts.
    let connected = UnixStream::connect(&sock);
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "the first notification is not READY=1: {ready:?}"
    );
    assert!(
        ready.contains(&format!("STATUS=listening on {}", sock.display())),
        "{ready:?}"
    );
    let connected = connected.expect("a connect the moment READY=1 arrived");
    drop(connected);
    // That connection counts as a VMM coming and going.
    assert_eq!(next(&notify), "STATUS=VMM connected");
    assert!(next(&notify).starts_with("STATUS=VMM disconnected"));
    handshake(&sock);
    assert_eq!(next(&notify), "STATUS=VMM connected");
    assert!(next(&notify).starts_with("STATUS=VMM disconnected"));
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = next(&notify);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(child.wait().unwrap().success());
}

/// Under `systemd-socket-activate` (LISTEN_FDS, the daemon started at the
/// first connection), the daemon serves the socket it was given: two VMM
/// connections in a row, and the socket is still there after the daemon
/// stopped (it belongs to the service manager, and the next daemon serves
/// it).
#[test]
fn socket_activation_serves_the_inherited_socket() {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        crate::common::skipped("systemd-socket-activate is not installed (Debian's systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let log = dir.path().join("daemon.log");
    let mut activator = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .arg(image(dir.path()))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    handshake(&sock);
    handshake(&sock);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("serving the socket handed over at descriptor 3"),
        "{text}"
    );
    assert_eq!(text.matches("VMM connected").count(), 2, "{text}");
    terminate(&mut activator);
    assert!(sock.exists(), "the inherited socket was unlinked");
}

/// `--socket-fd N` serves the listening socket at descriptor N (two
/// connections in a row) and leaves it in place at exit; a descriptor that
/// is not open, or not a listening socket, is one line naming the flag.
#[test]
fn socket_fd_serves_a_socket_from_another_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vus.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let img = image(dir.path());
    let mut command = Command::new(BIN);
    command
        .args(["--socket-fd", "10", "--socket-path"])
        .arg(&sock)
        .arg(&img)
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; the child gets the listener at
    // descriptor 10 (without close-on-exec).
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(fd, 10) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    drop(listener);
    handshake(&sock);
    handshake(&sock);
    terminate(&mut child);
    assert!(sock.exists(), "the socket handed over was unlinked");

    for (fd, what) in [
        ("99", "is not open"),
        ("0", "is not a listening Unix stream socket"),
    ] {
        let out = Command::new(BIN)
            .args(["--socket-fd", fd, "--socket-path"])
            .arg(dir.path().join("other.sock"))
            .arg(&img)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.trim(),
            format!("vhost-device-scsi: error: --socket-fd: descriptor {fd} {what}")
        );
    }
}
