//! 16384 LUNs, the most flat space addressing can express (SAM-5 §4.6.10):
//! in the emulator (REPORT LUNS lists them all, with peripheral device
//! addressing below 256 and flat space addressing above; commands reach LUN
//! 300 and LUN 16383 through flat space addresses) and through the daemon
//! over a real vhost-user connection, with its startup time and memory.
//!
//! The measurement for docs/benchmarks.md (*Startup with 16384 LUNs*) is an ignored test, best run on a
//! release build:
//!
//! ```sh
//! cargo test --release --test it scale:: -- --ignored --nocapture
//! ```

use crate::common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{cpu_time, ScsiDriver};
use vhost_device_scsi::scsi::inquiry::Identity;
use vhost_device_scsi::scsi::{
    Completion, Disk, DiskConfig, LunAddress, SliceDataOut, Target, VecDataIn,
};
use vhost_device_scsi::storage::MemImage;
use vhost_scsi_frontend::cdb::{inquiry, read10, report_luns};
use vhost_scsi_frontend::testkit::sparse_image;

const LUNS: usize = 16384;
/// INQUIRY, standard data.
fn inquiry_standard() -> Vec<u8> {
    inquiry(false, 0, 96)
}

/// INQUIRY, VPD page 80h (unit serial number).
fn inquiry_serial() -> Vec<u8> {
    inquiry(true, 0x80, 64)
}

/// The 8-byte LUN field a REPORT LUNS entry must hold for `n`, written out
/// from SAM-5 §4.6: peripheral device addressing (method 00b, bus 0) below
/// 256, flat space addressing (method 01b, 14 bits) from 256 on.
fn expected_entry(n: usize) -> [u8; 8] {
    if n < 256 {
        [0, n as u8, 0, 0, 0, 0, 0, 0]
    } else {
        [0x40 | (n >> 8) as u8, n as u8, 0, 0, 0, 0, 0, 0]
    }
}

/// A flat space address for `n`, as Linux and SeaBIOS send for any LUN.
fn flat(n: u16) -> [u8; 8] {
    [0x40 | (n >> 8) as u8, n as u8, 0, 0, 0, 0, 0, 0]
}

/// Block 0 of LUN `n` in the emulator target: its LUN number, repeated.
fn block0(n: u16) -> Vec<u8> {
    n.to_be_bytes().repeat(256)
}

/// 16384 read-only LUNs of 8 blocks; block 0 of LUNs 0, 255, 256, 300 and
/// 16383 holds the LUN number, the rest read as zeroes and take no memory.
fn big_target() -> Target {
    let disks = (0..LUNS as u16)
        .map(|n| {
            let data = if [0, 255, 256, 300, 16383].contains(&n) {
                block0(n)
            } else {
                Vec::new()
            };
            Disk::new(
                Box::new(MemImage::sparse(data, 8 * 512, true)),
                DiskConfig {
                    block_size: 512,
                    identity: Identity::derived(&format!("mem:lun-{n}"), n),
                    solid_state: true,
                    discard: false,
                },
            )
            .unwrap()
        })
        .collect();
    Target::new(disks)
}

/// Decodes `lun` as the transport does and runs `cdb` with `alloc` bytes of
/// data-in.
fn run(target: &Target, lun: [u8; 8], cdb: &[u8], alloc: usize) -> (Completion, Vec<u8>) {
    let mut din = VecDataIn::with_capacity(alloc);
    let mut dout = SliceDataOut::new(&[]);
    let completion = target.execute(LunAddress::decode(&lun), cdb, &mut din, &mut dout);
    (completion, din.data)
}

/// Checks REPORT LUNS data for `luns` ordinary LUNs (and the REPORT LUNS
/// well-known LUN last, if `wlun`).
fn check_report_luns(data: &[u8], luns: usize, wlun: bool) {
    let entries = luns + usize::from(wlun);
    assert_eq!(
        u32::from_be_bytes(data[..4].try_into().unwrap()) as usize,
        8 * entries,
        "LUN list length"
    );
    assert_eq!(&data[4..8], &[0; 4]);
    assert_eq!(data.len(), 8 + 8 * entries);
    for (n, entry) in data[8..].chunks(8).take(luns).enumerate() {
        assert_eq!(entry, expected_entry(n), "entry {n}");
    }
    if wlun {
        assert_eq!(&data[data.len() - 8..], &[0xc1, 0x01, 0, 0, 0, 0, 0, 0]);
    }
}

#[test]
fn report_luns_lists_16384_luns() {
    let target = big_target();
    let alloc = 8 + 8 * (LUNS + 1);
    for lun in [flat(0), [0; 8], flat(16383), flat(300)] {
        let (c, data) = run(&target, lun, &report_luns(0, alloc as u32), alloc);
        assert_eq!(c, Completion::Good);
        check_report_luns(&data, LUNS, false);
    }
    // With the well-known LUN, through the well-known LUN.
    let wlun = [0xc1, 0x01, 0, 0, 0, 0, 0, 0];
    let (c, data) = run(&target, wlun, &report_luns(2, alloc as u32), alloc);
    assert_eq!(c, Completion::Good);
    check_report_luns(&data, LUNS, true);
    // The boundaries, spelled out.
    assert_eq!(
        &data[8 + 255 * 8..8 + 256 * 8],
        &[0, 0xff, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        &data[8 + 256 * 8..8 + 257 * 8],
        &[0x41, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        &data[8 + 16383 * 8..8 + 16384 * 8],
        &[0x7f, 0xff, 0, 0, 0, 0, 0, 0]
    );
    // A short allocation length: the full list length, the first entries.
    let (c, data) = run(&target, flat(16383), &report_luns(0, 24), alloc);
    assert_eq!(c, Completion::Good);
    assert_eq!(data[..4], (8 * LUNS as u32).to_be_bytes());
    assert_eq!(data.len(), 24);
}

#[test]
fn flat_space_addresses_reach_every_lun() {
    let target = big_target();
    for n in [256u16, 300, 16383] {
        let (c, data) = run(&target, flat(n), &inquiry_standard(), 96);
        assert_eq!(c, Completion::Good, "LUN {n}");
        // Peripheral qualifier 000b, direct access block device.
        assert_eq!(data[0], 0x00, "LUN {n}");
        let (c, data) = run(&target, flat(n), &inquiry_serial(), 64);
        assert_eq!(c, Completion::Good, "LUN {n}");
        let serial = Identity::derived(&format!("mem:lun-{n}"), n).serial;
        assert_eq!(&data[4..4 + usize::from(data[3])], serial.as_bytes());
        let (c, data) = run(&target, flat(n), &read10(0, 2), 1024);
        assert_eq!(c, Completion::Good, "LUN {n}");
        assert_eq!(&data[..512], block0(n), "LUN {n}");
        assert_eq!(&data[512..], &[0; 512], "LUN {n}");
    }
    // Below 256 both methods address the same LUN.
    for n in [0u16, 255] {
        let peripheral = [0, n as u8, 0, 0, 0, 0, 0, 0];
        let (c, data) = run(&target, peripheral, &read10(0, 1), 512);
        assert_eq!(c, Completion::Good);
        assert_eq!(data, block0(n));
        assert_eq!(run(&target, flat(n), &read10(0, 1), 512).1, block0(n));
    }
    // Peripheral device addressing has 8 bits: 300 cannot be written that
    // way; 0x01 in the first byte is bus 1, where nothing is.
    let (c, data) = run(
        &target,
        [0x01, 0x2c, 0, 0, 0, 0, 0, 0],
        &inquiry_standard(),
        96,
    );
    assert_eq!(c, Completion::Good);
    assert_eq!(data[0], 0x7f, "no logical unit on bus 1");
}

#[test]
fn nothing_beyond_lun_16383() {
    let target = big_target();
    let not_supported = |c: Completion| match c {
        Completion::CheckCondition(s) => assert_eq!(
            (s.sense.key as u8, s.sense.asc, s.sense.ascq),
            (0x05, 0x25, 0x00),
            "{s:?}"
        ),
        other => panic!("expected LOGICAL UNIT NOT SUPPORTED, got {other:?}"),
    };
    // LUN 16384 has no single-level flat space address; the addresses an
    // initiator might try for it (extended flat space, SAM-5 §4.6.11;
    // logical unit addressing; a second level under LUN 0) reach nothing.
    for lun in [
        [0xd2, 0x00, 0x40, 0x00, 0, 0, 0, 0],
        [0x80, 0x40, 0x00, 0x00, 0, 0, 0, 0],
        [0x40, 0x00, 0x40, 0x00, 0, 0, 0, 0],
    ] {
        assert_eq!(LunAddress::decode(&lun), LunAddress::Unsupported);
        let (c, data) = run(&target, lun, &inquiry_standard(), 96);
        assert_eq!(c, Completion::Good);
        assert_eq!(data[0], 0x7f, "peripheral qualifier 011b for {lun:02x?}");
        not_supported(run(&target, lun, &read10(0, 1), 512).0);
    }
    // Nor does the target know a LUN 16384, however it is reached.
    let mut din = VecDataIn::with_capacity(512);
    let c = target.execute(
        LunAddress::Lun(16384),
        &read10(0, 1),
        &mut din,
        &mut SliceDataOut::new(&[]),
    );
    not_supported(c);
}

#[test]
fn config_space_max_lun_covers_every_lun() {
    let backend =
        vhost_device_scsi::virtio::ScsiBackend::new(std::sync::Arc::new(Target::default()));
    // struct virtio_scsi_config: max_lun is the le32 at offset 32; Linux
    // scans LUNs 0..=max_lun.
    let max_lun = u32::from_le_bytes(backend.read_config(32, 4).try_into().unwrap());
    assert_eq!(max_lun, 16383);
    assert_eq!(max_lun as usize + 1, vhost_device_scsi::cli::MAX_IMAGES);
}

// ---------------------------------------------------------------------------
// Through the daemon
// ---------------------------------------------------------------------------

/// Whether block 0 of image `i` of `n` holds `block0(i)`: images 0-127,
/// 255, 256, 300 and the last; the others are all holes.
fn marked(i: usize, n: usize) -> bool {
    i < 128 || [255, 256, 300, n - 1].contains(&i)
}

/// Creates `n` sparse 64 KiB images in `dir`, the marked ones with their
/// block 0 written.
fn make_images(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i:05}.raw"));
            let head = if marked(i, n) {
                block0(i as u16)
            } else {
                Vec::new()
            };
            sparse_image(&path, &head, 64 << 10).unwrap();
            path
        })
        .collect()
}

/// The hard open-file limit, if it is too low for `images` images (as the
/// daemon estimates: 64 + 6 per queue, 18 queues by default).
fn hard_limit_too_low(images: usize) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one rlimit it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let hard: u64 = limit.rlim_max;
    (hard < images as u64 + 64 + 6 * 18).then_some(hard)
}

/// VmRSS and VmHWM of `pid`, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A daemon started on `images`, killed when dropped.
struct Started {
    child: Child,
    /// From spawn until the socket exists (bound and listening).
    to_listening: Duration,
    cpu: Duration,
    /// VmRSS and VmHWM at that moment, KiB.
    rss: (u64, u64),
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(sock: &Path, args: &[&OsStr], rust_log: &str, log: &Path) -> Started {
    let _ = std::fs::remove_file(sock);
    let begin = Instant::now();
    let mut child = Command::new(common::BIN)
        .arg("-s")
        .arg(sock)
        .args(args)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let deadline = begin + Duration::from_secs(120);
    while !sock.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "daemon exited early: {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "daemon did not listen");
        std::thread::sleep(Duration::from_millis(1));
    }
    let to_listening = begin.elapsed();
    let pid = child.id();
    Started {
        to_listening,
        cpu: cpu_time(pid),
        rss: rss_kib(pid),
        child,
    }
}

/// Connects a frontend and checks what a guest would see of a daemon
/// serving `luns` LUNs, LUN l on `images[l % images.len()]`: REPORT LUNS
/// lists every LUN, and LUNs 0, 255, 256, 300 and the last answer INQUIRY
/// and READ with their own identity and their image's data.
fn check_through_vhost_user(sock: &Path, images: &[PathBuf], luns: usize) -> ScsiDriver {
    let mut driver = ScsiDriver::connect(sock);
    let alloc = 8 + 8 * luns as u32;
    let reply = driver.command(0, &report_luns(0, alloc), &[], alloc);
    assert_eq!((reply.response, reply.status), (0, 0), "{reply:?}");
    check_report_luns(&reply.data_in, luns, false);
    for lun in [0, 255, 256, 300, luns - 1]
        .into_iter()
        .filter(|&l| l < luns)
    {
        let i = lun % images.len();
        // The driver sends flat space addresses (lun[2] = 0x40 | high).
        let reply = driver.command(lun as u16, &inquiry_serial(), &[], 64);
        assert_eq!((reply.response, reply.status), (0, 0), "LUN {lun}");
        let canonical = std::fs::canonicalize(&images[i]).unwrap();
        let serial = Identity::derived(&canonical.to_string_lossy(), lun as u16).serial;
        let data = &reply.data_in;
        assert_eq!(&data[4..4 + usize::from(data[3])], serial.as_bytes());
        let reply = driver.command(lun as u16, &read10(0, 2), &[], 1024);
        assert_eq!((reply.response, reply.status), (0, 0), "LUN {lun}");
        let expected = if marked(i, images.len()) {
            block0(i as u16)
        } else {
            vec![0; 512]
        };
        assert_eq!(&reply.data_in[..512], expected, "LUN {lun}");
        assert_eq!(&reply.data_in[512..], &[0; 512], "LUN {lun}");
    }
    driver
}

#[test]
fn the_daemon_serves_16384_luns() {
    if let Some(hard) = hard_limit_too_low(LUNS) {
        common::skipped(&format!(
            "the hard open-file limit {hard} is too low for {LUNS} images"
        ));
        return;
    }
    // 16384 read-only LUNs on 128 images (readers share an image), which
    // is as many open files as 16384 images and quicker to set up.
    let dir = tempfile::tempdir().unwrap();
    let images = make_images(dir.path(), 128);
    let mut args = vec![OsStr::new("-r")];
    args.extend((0..LUNS).map(|lun| images[lun % images.len()].as_os_str()));
    let sock = dir.path().join("vus.sock");
    let log = dir.path().join("daemon.log");
    let mut daemon = start(&sock, &args, "info", &log);
    let _driver = check_through_vhost_user(&sock, &images, LUNS);
    eprintln!(
        "{LUNS} LUNs: listening after {:?}, VmRSS {} KiB",
        daemon.to_listening, daemon.rss.0
    );
    assert!(daemon.child.try_wait().unwrap().is_none());
    // One descriptor per LUN.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
        .unwrap()
        .count();
    assert!(fds > LUNS, "{fds} open files");
    // Every LUN was logged, the last one too.
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("] LUN ").count(), LUNS, "{}", &text[..500]);
    assert!(text.contains(&format!("LUN 16383: {}", images[127].display())));
}

/// One line of the numbers in docs/benchmarks.md: startup time, CPU and memory for
/// `n` images, median of several runs.
fn measure(dir: &Path, images: &[PathBuf], rust_log: &str) {
    const RUNS: usize = 5;
    let sock = dir.join("m.sock");
    let log = dir.join("m.log");
    let mut runs: Vec<(Duration, Duration, u64, u64)> = (0..RUNS)
        .map(|_| {
            let args: Vec<&OsStr> = images.iter().map(|p| p.as_os_str()).collect();
            let mut d = start(&sock, &args, rust_log, &log);
            let _driver = check_through_vhost_user(&sock, images, images.len());
            let connected = rss_kib(d.child.id());
            let _ = d.child.kill();
            (d.to_listening, d.cpu, d.rss.0, connected.0)
        })
        .collect();
    runs.sort();
    let (wall, cpu, rss, connected) = runs[RUNS / 2];
    let (min, max) = (runs[0].0, runs[RUNS - 1].0);
    println!(
        "{} images, RUST_LOG={rust_log}: listening after {:.0} ms (min {:.0}, max {:.0}), \
         {:.0} ms CPU; VmRSS {:.1} MiB listening, {:.1} MiB with a frontend connected",
        images.len(),
        wall.as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e3,
        rss as f64 / 1024.0,
        connected as f64 / 1024.0,
    );
}

#[test]
#[ignore = "a measurement: cargo test --release --test it scale:: -- --ignored --nocapture"]
fn measure_startup_and_memory() {
    if let Some(hard) = hard_limit_too_low(LUNS) {
        panic!("the hard open-file limit {hard} is too low for {LUNS} images");
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    println!(
        "{} CPUs ({cpu}), {} build",
        std::thread::available_parallelism().unwrap(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let dir = tempfile::tempdir().unwrap();
    let images = make_images(dir.path(), LUNS);
    for n in [1, 256, LUNS] {
        for rust_log in ["info", "warn"] {
            measure(dir.path(), &images[..n], rust_log);
        }
    }
}
