//! The durability promise, tested on the daemon process over a real
//! vhost-user connection: what a completed flush or FUA write covered is in
//! the image when the daemon is SIGKILLed right after; a read-only daemon
//! changes no byte.

use crate::common;

use common::{read10, write10, Daemon, ScsiDriver, SYNCHRONIZE_CACHE_10};
use vhost_scsi_frontend::testkit::filled_image;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn image(dir: &std::path::Path, len: usize) -> std::path::PathBuf {
    let path = dir.join("disk.raw");
    filled_image(&path, len, 0).unwrap();
    path
}

fn flushed_and_fua_writes_survive_sigkill(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("vus.sock");
    let mut daemon = Daemon::start(&sock, &["--io-engine", engine, img.to_str().unwrap()]);
    let mut drv = ScsiDriver::connect(&sock);

    // A cached write, then SYNCHRONIZE CACHE.
    let a = pattern(1, 8 * 512);
    let r = drv.command(0, &write10(100, 8, false), &a, 0);
    assert_eq!((r.response, r.status), (0, 0), "write: {r:?}");
    let r = drv.command(0, &SYNCHRONIZE_CACHE_10, &[], 0);
    assert_eq!((r.response, r.status), (0, 0), "flush: {r:?}");
    // A FUA write and no flush.
    let b = pattern(2, 4 * 512);
    let r = drv.command(0, &write10(300, 4, true), &b, 0);
    assert_eq!((r.response, r.status), (0, 0), "FUA write: {r:?}");
    // Reads see both.
    let r = drv.command(0, &read10(100, 8), &[], 8 * 512);
    assert_eq!(r.data_in, a);

    daemon.kill();
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[100 * 512..108 * 512], &a[..], "flushed write lost");
    assert_eq!(&on_disk[300 * 512..304 * 512], &b[..], "FUA write lost");
}

#[test]
fn flushed_and_fua_writes_survive_sigkill_sync_engine() {
    flushed_and_fua_writes_survive_sigkill("sync");
}

#[test]
fn flushed_and_fua_writes_survive_sigkill_io_uring_engine() {
    flushed_and_fua_writes_survive_sigkill("io-uring");
}

#[test]
fn read_only_daemon_changes_no_byte() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let before = std::fs::read(&img).unwrap();
    let sock = dir.path().join("vus.sock");
    let _daemon = Daemon::start(&sock, &["-r", img.to_str().unwrap()]);
    let mut drv = ScsiDriver::connect(&sock);
    let r = drv.command(0, &write10(0, 1, true), &[0xab; 512], 0);
    assert_eq!(r.status, 2, "CHECK CONDITION");
    assert_eq!(r.sense[2] & 0x0f, 0x07, "DATA PROTECT");
    assert_eq!((r.sense[12], r.sense[13]), (0x27, 0x00));
    let r = drv.command(0, &SYNCHRONIZE_CACHE_10, &[], 0);
    assert_eq!(r.status, 0);
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

fn data_out_shorter_than_the_transfer_is_overrun(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("vus.sock");
    let _daemon = Daemon::start(&sock, &["--io-engine", engine, img.to_str().unwrap()]);
    let mut drv = ScsiDriver::connect(&sock);
    let r = drv.command(0, &write10(0, 8, false), &[0x55; 1024], 0);
    assert_eq!(r.response, 1, "VIRTIO_SCSI_S_OVERRUN");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn data_out_shorter_than_the_transfer_is_overrun_sync_engine() {
    data_out_shorter_than_the_transfer_is_overrun("sync");
}

#[test]
fn data_out_shorter_than_the_transfer_is_overrun_io_uring_engine() {
    data_out_shorter_than_the_transfer_is_overrun("io-uring");
}

fn direct_io_writes_and_reads(engine: &str) {
    // O_DIRECT needs a file system that supports it: the target directory,
    // not a tmpfs /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("vus.sock");
    let mut daemon = Daemon::start(
        &sock,
        &["--io-engine", engine, "--direct", img.to_str().unwrap()],
    );
    let mut drv = ScsiDriver::connect(&sock);
    let a = pattern(7, 16 * 512);
    let r = drv.command(0, &write10(8, 16, false), &a, 0);
    assert_eq!((r.response, r.status), (0, 0), "write: {r:?}");
    let r = drv.command(0, &read10(8, 16), &[], 16 * 512);
    assert_eq!(r.data_in, a);
    // The image holds it after SIGKILL.
    daemon.kill();
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[8 * 512..24 * 512], &a[..]);
}

/// SIGKILL, then a new daemon on the same image and socket: a new
/// connection reads back every flushed and FUA byte, and the new daemon
/// holds the image lock again (the dead one's OFD locks died with it).
#[test]
fn restarted_after_sigkill_serves_every_flushed_byte() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 4 << 20);
    let sock = dir.path().join("vus.sock");
    let arg = img.to_str().unwrap();
    let mut daemon = Daemon::start(&sock, &[arg]);
    let mut drv = ScsiDriver::connect(&sock);
    // Flushed writes all over the image, FUA writes, and an unflushed one
    // written last (the kernel has it; SIGKILL loses nothing it has).
    let mut expect: Vec<(u32, Vec<u8>)> = Vec::new();
    for (i, lba) in [0u32, 777, 4096, 8191 - 16].into_iter().enumerate() {
        let data = pattern(10 + i as u8, 16 * 512);
        let r = drv.command(0, &write10(lba, 16, false), &data, 0);
        assert_eq!((r.response, r.status), (0, 0), "write: {r:?}");
        expect.push((lba, data));
    }
    let r = drv.command(0, &SYNCHRONIZE_CACHE_10, &[], 0);
    assert_eq!((r.response, r.status), (0, 0), "flush: {r:?}");
    for (i, lba) in [100u32, 5000].into_iter().enumerate() {
        let data = pattern(20 + i as u8, 8 * 512);
        let r = drv.command(0, &write10(lba, 8, true), &data, 0);
        assert_eq!((r.response, r.status), (0, 0), "FUA write: {r:?}");
        expect.push((lba, data));
    }
    let unflushed = pattern(30, 8 * 512);
    let r = drv.command(0, &write10(6000, 8, false), &unflushed, 0);
    assert_eq!((r.response, r.status), (0, 0), "write: {r:?}");
    expect.push((6000, unflushed));
    daemon.kill();
    drop(drv);

    // The SIGKILLed daemon left its socket file behind: the new one
    // replaces it, and takes the lock the dead one held.
    assert!(sock.exists(), "stale socket left by SIGKILL");
    let mut restarted = Daemon::start(&sock, &[arg]);
    let mut drv = ScsiDriver::connect(&sock);
    for (lba, data) in &expect {
        let blocks = (data.len() / 512) as u16;
        let r = drv.command(0, &read10(*lba, blocks), &[], data.len() as u32);
        assert_eq!((r.response, r.status), (0, 0), "read: {r:?}");
        assert_eq!(&r.data_in, data, "data at LBA {lba} after the restart");
    }
    // The lock: a second daemon on the image is refused while it serves.
    let other = std::process::Command::new(common::BIN)
        .arg("-s")
        .arg(dir.path().join("other.sock"))
        .arg(arg)
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(1), "{other:?}");
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("locked by") && stderr.contains("it is being written"),
        "{stderr}"
    );
    restarted.kill();
}

#[test]
fn direct_io_writes_and_reads_sync_engine() {
    direct_io_writes_and_reads("sync");
}

#[test]
fn direct_io_writes_and_reads_io_uring_engine() {
    direct_io_writes_and_reads("io-uring");
}
