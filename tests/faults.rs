//! Faults around the daemon, on the daemon process over a real vhost-user
//! connection: a guest flooding the log, the image's file system filling
//! up, the image shrinking underneath, the daemon killed and restarted.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read10, write10, ScsiDriver, BIN, SYNCHRONIZE_CACHE_10};
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

/// Whether a test that needs root (mounting) can run: `Ok(false)` means
/// skip (printed), and with `CI=true` not being able to is a failure.
fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let why = format!("{test}: needs root to mount a tmpfs");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{why} (CI=true)"
    );
    eprintln!("skipped: {why}");
    false
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs: {status}");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// CHECK CONDITION with (sense key, ASC, ASCQ), fixed-format sense.
fn sense_of(r: &common::Reply) -> (u8, u8, u8) {
    assert_eq!(
        (r.response, r.status),
        (0, 2),
        "CHECK CONDITION expected: {r:?}"
    );
    (r.sense[2] & 0x0f, r.sense[12], r.sense[13])
}

fn good(r: &common::Reply, what: &str) {
    assert_eq!((r.response, r.status), (0, 0), "{what}: {r:?}");
}

/// The image's file system fills up: writes fail with DATA PROTECT / SPACE
/// ALLOCATION FAILED WRITE PROTECT (SBC-3 §4.7.3.6), what was written reads
/// back, the daemon keeps serving, and writes work again once space is
/// freed.
#[test]
fn a_full_file_system_is_space_allocation_failed_and_serving_goes_on() {
    if !root_or_skip("a_full_file_system_is_space_allocation_failed_and_serving_goes_on") {
        return;
    }
    const CHUNK_BLOCKS: u16 = 1024; // 512 KiB
    const CHUNK: usize = CHUNK_BLOCKS as usize * 512;
    let fs = Tmpfs::mount("4m");
    // Ballast to free later, and a sparse image four times the file system.
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 1 << 20]).unwrap();
    let img = fs.path().join("disk.raw");
    File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let sockdir = tempfile::tempdir().unwrap();
    let sock = sockdir.path().join("vus.sock");
    let log = sockdir.path().join("daemon.log");
    let mut daemon = start_logged(&sock, &[img.to_str().unwrap()], &log, Some("warn"));
    let mut drv = ScsiDriver::connect(&sock);

    let mut written = Vec::new();
    let full = loop {
        let n = written.len();
        assert!(n < 32, "16 MiB written to a 4 MiB file system");
        let lba = (n * CHUNK_BLOCKS as usize) as u32;
        let data = pattern(n as u8, CHUNK);
        let r = drv.command(0, &write10(lba, CHUNK_BLOCKS, false), &data, 0);
        if r.status != 0 {
            break (lba, r);
        }
        good(&r, "write");
        written.push((lba, data));
    };
    let (full_lba, r) = full;
    assert!(!written.is_empty(), "not even one write fitted");
    assert_eq!(
        sense_of(&r),
        (0x07, 0x27, 0x07),
        "DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT"
    );
    // The daemon goes on: earlier data reads back, a flush succeeds.
    for (lba, data) in &written {
        let r = drv.command(0, &read10(*lba, CHUNK_BLOCKS), &[], CHUNK as u32);
        good(&r, "read after ENOSPC");
        assert_eq!(&r.data_in, data, "data at LBA {lba}");
    }
    good(
        &drv.command(0, &SYNCHRONIZE_CACHE_10, &[], 0),
        "flush after ENOSPC",
    );
    // Space again: the write that failed succeeds.
    std::fs::remove_file(&ballast).unwrap();
    let data = pattern(0xa5, CHUNK);
    let r = drv.command(0, &write10(full_lba, CHUNK_BLOCKS, true), &data, 0);
    good(&r, "FUA write after freeing space");
    let r = drv.command(0, &read10(full_lba, CHUNK_BLOCKS), &[], CHUNK as u32);
    good(&r, "read back");
    assert_eq!(r.data_in, data);
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
    daemon.kill();
    eprintln!(
        "{} chunks of 512 KiB fitted before ENOSPC; log:\n{}",
        written.len(),
        std::fs::read_to_string(&log).unwrap()
    );
}

/// The image file shrinks underneath the daemon (as a failing or
/// misconfigured backing store would): reads past the new end are MEDIUM
/// ERROR / UNRECOVERED READ ERROR, reads before it return the data, and
/// the daemon keeps serving.
#[test]
fn an_image_truncated_underneath_gives_medium_errors_past_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = pattern(9, 1 << 20);
    std::fs::write(&img, &data).unwrap();
    let sock = dir.path().join("vus.sock");
    let log = dir.path().join("daemon.log");
    let mut daemon = start_logged(&sock, &[img.to_str().unwrap()], &log, Some("warn"));
    let mut drv = ScsiDriver::connect(&sock);
    good(
        &drv.command(0, &read10(2040, 8), &[], 4096),
        "read before truncation",
    );

    // Half the image goes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(512 << 10)
        .unwrap();
    const MEDIUM_ERROR: (u8, u8, u8) = (0x03, 0x11, 0x00);
    for (lba, blocks, what) in [
        (1024, 1, "first block past the end"),
        (2040, 8, "last blocks"),
        (1020, 8, "blocks across the new end"),
    ] {
        let r = drv.command(0, &read10(lba, blocks), &[], u32::from(blocks) * 512);
        assert_eq!(sense_of(&r), MEDIUM_ERROR, "{what}");
    }
    // Before the new end: the data, unchanged.
    let r = drv.command(0, &read10(0, 1024), &[], 512 << 10);
    good(&r, "read before the new end");
    assert_eq!(r.data_in, data[..512 << 10]);
    // VERIFY reads the medium too.
    let verify = [0x2f, 0, 0, 0, 0x07, 0xf8, 0, 0, 8, 0];
    assert_eq!(
        sense_of(&drv.command(0, &verify, &[], 0)),
        MEDIUM_ERROR,
        "VERIFY"
    );
    // Writing past the end is a write; it extends the file, and reads back.
    let fresh = pattern(0x3c, 4096);
    good(
        &drv.command(0, &write10(2040, 8, true), &fresh, 0),
        "write past the end",
    );
    let r = drv.command(0, &read10(2040, 8), &[], 4096);
    good(&r, "read what was written past the end");
    assert_eq!(r.data_in, fresh);
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
    daemon.kill();
}
