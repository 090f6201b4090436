//! Faults around the daemon, on the daemon process over a real vhost-user
//! connection: a guest flooding the log, the image's file system filling
//! up, the image shrinking underneath, the daemon killed and restarted.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read10, BIN};
use vhost_device_scsi::frontend::{DaemonProcess, DriverConfig, ScsiFrontend};

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed ^ (i >> 9) as u8)
        })
        .collect()
}

/// Starts the daemon with its stderr going to `log`.
fn start_logged(socket: &Path, args: &[&str], log: &Path, rust_log: Option<&str>) -> DaemonProcess {
    let mut command = Command::new(BIN);
    command
        .arg("-s")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stderr(File::create(log).unwrap());
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    DaemonProcess::spawn(command, socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("daemon: {e}"))
}

/// A guest whose available index sits more than a queue size ahead makes
/// virtio-queue log an error on every kick; thousands of kicks leave a
/// short log, and the daemon keeps serving.
#[test]
fn a_guest_cannot_flood_the_log() {
    const KICKS: usize = 5000;
    const MARK: u16 = 0x8000;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, pattern(3, 64 * 1024)).unwrap();
    let sock = dir.path().join("vus.sock");
    let log = dir.path().join("daemon.log");
    // The default filter (info), as the daemon runs in production.
    let mut daemon = start_logged(&sock, &[img.to_str().unwrap()], &log, None);
    let mut frontend = ScsiFrontend::connect(&sock, &DriverConfig::default()).unwrap();
    let q = frontend.queue(0).unwrap();
    let r = q.command(0, &read10(0, 1), &[], 512).unwrap();
    assert_eq!(r.status, 0);
    let size = q.ring_size();
    // One request published so far: put the index a queue size and one
    // further (virtio 1.2 §2.7.6 allows at most a queue size).
    q.store_raw_avail_index(Some(1 + size + 1)).unwrap();
    let started = Instant::now();
    for kick in 0..KICKS {
        // The device writes avail_event when it re-enables notifications
        // after giving up on the ring (EVENT_IDX): a marker there shows
        // that this kick was served, so each one made the device log.
        q.set_avail_event(MARK).unwrap();
        q.kick().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while q.avail_event().unwrap() == MARK {
            assert!(Instant::now() < deadline, "kick {kick} never served");
            std::thread::yield_now();
        }
    }
    let elapsed = started.elapsed();
    // The driver repairs its ring; the device serves again.
    q.store_raw_avail_index(None).unwrap();
    let r = q.command(0, &read10(8, 2), &[], 1024).unwrap();
    assert_eq!((r.response, r.status), (0, 0), "{r:?}");
    assert_eq!(r.data_in, pattern(3, 64 * 1024)[8 * 512..10 * 512]);
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
    daemon.kill();

    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().count();
    let flood = text
        .lines()
        .filter(|l| l.contains("Iterator error"))
        .count();
    assert!(
        flood >= 1,
        "the broken ring was never logged (so the test tests nothing):\n{text}"
    );
    assert!(
        lines < 100,
        "{KICKS} kicks in {elapsed:?} logged {lines} lines ({flood} of the flood):\n{text}"
    );
    eprintln!("{KICKS} kicks in {elapsed:?}: {lines} log lines, {flood} of the flood");
}
