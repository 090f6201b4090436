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

/// A minimal FUSE file system in this process, straight on /dev/fuse (FUSE
/// protocol 7.31, the subset a file's open, stat, read, write and sync
/// need): one file, `disk.raw`, whose reads and writes of one byte range
/// fail with EIO, as a failing disk's would. Root only (mount(2)); opened
/// with FOPEN_DIRECT_IO so every read reaches the server with the
/// daemon's own offset and length.
mod fuse {
    use std::ffi::CString;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::ops::Range;
    use std::os::fd::AsRawFd;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    const LOOKUP: u32 = 1;
    const FORGET: u32 = 2;
    const GETATTR: u32 = 3;
    const SETATTR: u32 = 4;
    const OPEN: u32 = 14;
    const READ: u32 = 15;
    const WRITE: u32 = 16;
    const RELEASE: u32 = 18;
    const FSYNC: u32 = 20;
    const FLUSH: u32 = 25;
    const INIT: u32 = 26;
    const ACCESS: u32 = 34;
    const INTERRUPT: u32 = 36;
    const DESTROY: u32 = 38;
    const BATCH_FORGET: u32 = 42;
    const FOPEN_DIRECT_IO: u32 = 1;
    const ROOT: u64 = 1;
    const FILE: u64 = 2;
    const MAX_WRITE: u32 = 128 << 10;
    pub const NAME: &str = "disk.raw";

    struct State {
        data: Mutex<Vec<u8>>,
        bad: Range<u64>,
        /// Opens answered with FOPEN_DIRECT_IO.
        direct_io: bool,
        /// The errno the next FSYNC is answered with, once.
        fsync_error: Mutex<Option<i32>>,
        /// FSYNC requests served.
        fsyncs: AtomicU32,
    }

    /// The mounted file system; unmounted (and its server stopped) when
    /// dropped.
    pub struct Mount {
        dir: tempfile::TempDir,
        state: Arc<State>,
        server: Option<JoinHandle<()>>,
    }

    impl Mount {
        /// A file of `data` whose bytes in `bad` fail with EIO, opened
        /// with FOPEN_DIRECT_IO.
        pub fn new(data: Vec<u8>, bad: Range<u64>) -> std::io::Result<Mount> {
            Mount::start(data, bad, true)
        }

        /// A file of `data` that goes through the kernel's page cache
        /// (written through, as FUSE does without its writeback cache), so
        /// that an `RWF_DSYNC` write ends in an FSYNC request.
        pub fn cached(data: Vec<u8>) -> std::io::Result<Mount> {
            Mount::start(data, 0..0, false)
        }

        /// Answers the next FSYNC with `errno`, as a file system reporting
        /// an earlier write-back error does.
        pub fn fail_next_fsync(&self, errno: i32) {
            *self.state.fsync_error.lock().unwrap() = Some(errno);
        }

        /// FSYNC requests served so far.
        pub fn fsyncs(&self) -> u32 {
            self.state.fsyncs.load(Ordering::Relaxed)
        }

        fn start(data: Vec<u8>, bad: Range<u64>, direct_io: bool) -> std::io::Result<Mount> {
            let dev = File::options().read(true).write(true).open("/dev/fuse")?;
            let dir = tempfile::tempdir()?;
            let target = CString::new(dir.path().to_str().unwrap()).unwrap();
            let opts = CString::new(format!(
                "fd={},rootmode=40000,user_id=0,group_id=0",
                dev.as_raw_fd()
            ))
            .unwrap();
            // SAFETY: valid C strings; mounts a FUSE file system served
            // through `dev`.
            let rc = unsafe {
                libc::mount(
                    c"vhost-scsi-test".as_ptr(),
                    target.as_ptr(),
                    c"fuse".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    opts.as_ptr().cast(),
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let state = Arc::new(State {
                data: Mutex::new(data),
                bad,
                direct_io,
                fsync_error: Mutex::new(None),
                fsyncs: AtomicU32::new(0),
            });
            let served = state.clone();
            let server = std::thread::spawn(move || serve(dev, &served));
            Ok(Mount {
                dir,
                state,
                server: Some(server),
            })
        }

        pub fn file(&self) -> PathBuf {
            self.dir.path().join(NAME)
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            let target = CString::new(self.path().to_str().unwrap()).unwrap();
            // SAFETY: a valid C string; lazily unmounts our own mount, which
            // ends the server's reads with ENODEV.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            if let Some(server) = self.server.take() {
                let _ = server.join();
            }
        }
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// struct fuse_attr (88 bytes).
    fn attr(node: u64, size: u64) -> Vec<u8> {
        let mut a = Vec::with_capacity(88);
        a.extend_from_slice(&node.to_le_bytes()); // ino
        a.extend_from_slice(&size.to_le_bytes());
        a.extend_from_slice(&size.div_ceil(512).to_le_bytes()); // blocks
        a.extend_from_slice(&[0; 24]); // atime, mtime, ctime
        a.extend_from_slice(&[0; 12]); // their nanoseconds
        let mode = if node == ROOT {
            libc::S_IFDIR | 0o755
        } else {
            libc::S_IFREG | 0o644
        };
        a.extend_from_slice(&mode.to_le_bytes());
        a.extend_from_slice(&(if node == ROOT { 2u32 } else { 1 }).to_le_bytes()); // nlink
        a.extend_from_slice(&[0; 8]); // uid, gid
        a.extend_from_slice(&0u32.to_le_bytes()); // rdev
        a.extend_from_slice(&4096u32.to_le_bytes()); // blksize
        a.extend_from_slice(&0u32.to_le_bytes()); // flags
        a
    }

    fn serve(mut dev: File, state: &State) {
        let mut buf = vec![0u8; MAX_WRITE as usize + 64 * 1024];
        loop {
            let n = match dev.read(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENOENT)) => continue,
                // ENODEV: unmounted.
                Err(_) => return,
            };
            let req = &buf[..n];
            if req.len() < 40 {
                return;
            }
            let opcode = u32_at(req, 4);
            let unique = u64_at(req, 8);
            let node = u64_at(req, 16);
            let body = &req[40..];
            let size = state.data.lock().unwrap().len() as u64;
            let reply: Result<Vec<u8>, i32> = match opcode {
                FORGET | BATCH_FORGET | INTERRUPT => continue,
                INIT => {
                    let max_readahead = u32_at(body, 8);
                    let mut out = Vec::with_capacity(64);
                    out.extend_from_slice(&7u32.to_le_bytes());
                    out.extend_from_slice(&31u32.to_le_bytes());
                    out.extend_from_slice(&max_readahead.to_le_bytes());
                    out.extend_from_slice(&0u32.to_le_bytes()); // flags
                    out.extend_from_slice(&16u16.to_le_bytes()); // max_background
                    out.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
                    out.extend_from_slice(&MAX_WRITE.to_le_bytes());
                    out.extend_from_slice(&1u32.to_le_bytes()); // time_gran
                    out.extend_from_slice(&[0; 36]); // max_pages .. unused
                    Ok(out)
                }
                LOOKUP => {
                    let name = body.split(|&b| b == 0).next().unwrap_or_default();
                    if node == ROOT && name == NAME.as_bytes() {
                        let mut out = Vec::with_capacity(128);
                        out.extend_from_slice(&FILE.to_le_bytes());
                        out.extend_from_slice(&[0; 8 + 8 + 8 + 4 + 4]); // generation, valid times
                        out.extend_from_slice(&attr(FILE, size));
                        Ok(out)
                    } else {
                        Err(libc::ENOENT)
                    }
                }
                GETATTR | SETATTR => {
                    let mut out = vec![0u8; 16]; // attr_valid, nsec, dummy
                    out.extend_from_slice(&attr(node, if node == ROOT { 0 } else { size }));
                    Ok(out)
                }
                OPEN => {
                    let mut out = vec![0u8; 16];
                    if state.direct_io {
                        out[8..12].copy_from_slice(&FOPEN_DIRECT_IO.to_le_bytes());
                    }
                    Ok(out)
                }
                READ => {
                    let (offset, len) = (u64_at(body, 8), u64::from(u32_at(body, 16)));
                    let end = (offset + len).min(size);
                    if offset < state.bad.end && end > state.bad.start {
                        Err(libc::EIO)
                    } else if offset >= size {
                        Ok(Vec::new())
                    } else {
                        Ok(state.data.lock().unwrap()[offset as usize..end as usize].to_vec())
                    }
                }
                WRITE => {
                    let (offset, len) = (u64_at(body, 8), u32_at(body, 16));
                    let bytes = &body[40..40 + len as usize];
                    let end = offset + u64::from(len);
                    if offset < state.bad.end && end > state.bad.start {
                        Err(libc::EIO)
                    } else {
                        let mut data = state.data.lock().unwrap();
                        if data.len() < end as usize {
                            data.resize(end as usize, 0);
                        }
                        data[offset as usize..end as usize].copy_from_slice(bytes);
                        let mut out = len.to_le_bytes().to_vec();
                        out.extend_from_slice(&[0; 4]);
                        Ok(out)
                    }
                }
                FSYNC => {
                    state.fsyncs.fetch_add(1, Ordering::Relaxed);
                    match state.fsync_error.lock().unwrap().take() {
                        Some(errno) => Err(errno),
                        None => Ok(Vec::new()),
                    }
                }
                RELEASE | FLUSH | ACCESS => Ok(Vec::new()),
                DESTROY => {
                    let _ = dev.write_all(&header(16, 0, unique));
                    return;
                }
                _ => Err(libc::ENOSYS),
            };
            let out = match reply {
                Ok(body) => {
                    let mut out = header(16 + body.len(), 0, unique);
                    out.extend_from_slice(&body);
                    out
                }
                Err(errno) => header(16, -errno, unique),
            };
            // The request may have been interrupted meanwhile (ENOENT).
            let _ = dev.write_all(&out);
        }
    }

    /// struct fuse_out_header.
    fn header(len: usize, error: i32, unique: u64) -> Vec<u8> {
        let mut h = Vec::with_capacity(len);
        h.extend_from_slice(&(len as u32).to_le_bytes());
        h.extend_from_slice(&error.to_le_bytes());
        h.extend_from_slice(&unique.to_le_bytes());
        h
    }
}

/// Reads that fail with EIO underneath (a FUSE file whose one range fails,
/// as a failing disk would): MEDIUM ERROR / UNRECOVERED READ ERROR for
/// READ and VERIFY touching it, WRITE ERROR for a write into it, correct
/// data elsewhere, and the daemon goes on.
#[test]
fn eio_from_the_image_is_a_medium_error() {
    if !root_or_skip("eio_from_the_image_is_a_medium_error") {
        return;
    }
    let data = pattern(0x61, 1 << 20);
    // Blocks 1024-1031 (512 KiB to 516 KiB) fail.
    let mount = match fuse::Mount::new(data.clone(), (512 << 10)..(516 << 10)) {
        Ok(m) => m,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot mount a FUSE file system (CI=true): {e}"
            );
            eprintln!("skipped: cannot mount a FUSE file system: {e}");
            return;
        }
    };
    let sockdir = tempfile::tempdir().unwrap();
    let sock = sockdir.path().join("vus.sock");
    let log = sockdir.path().join("daemon.log");
    let img = mount.file();
    let mut daemon = start_logged(&sock, &[img.to_str().unwrap()], &log, Some("warn"));
    let mut drv = ScsiDriver::connect(&sock);

    let r = drv.command(0, &read10(0, 16), &[], 8192);
    good(&r, "read before the bad range");
    assert_eq!(r.data_in, data[..8192]);
    const MEDIUM_ERROR: (u8, u8, u8) = (0x03, 0x11, 0x00);
    for (lba, blocks, what) in [
        (1024, 1, "the first bad block"),
        (1020, 8, "blocks into the bad range"),
        (1031, 2, "blocks out of the bad range"),
    ] {
        let r = drv.command(0, &read10(lba, blocks), &[], u32::from(blocks) * 512);
        assert_eq!(sense_of(&r), MEDIUM_ERROR, "READ of {what}");
    }
    let verify = [0x2f, 0, 0, 0, 0x03, 0xe8, 0, 0, 100, 0]; // LBA 1000, 100 blocks
    assert_eq!(
        sense_of(&drv.command(0, &verify, &[], 0)),
        MEDIUM_ERROR,
        "VERIFY"
    );
    // A write into the bad range: MEDIUM ERROR / WRITE ERROR.
    let r = drv.command(0, &write10(1026, 1, false), &[0x77; 512], 0);
    assert_eq!(sense_of(&r), (0x03, 0x0c, 0x00), "WRITE into the bad range");
    // Around it, everything works.
    let r = drv.command(0, &read10(1032, 8), &[], 4096);
    good(&r, "read after the bad range");
    assert_eq!(r.data_in, data[1032 * 512..1040 * 512]);
    let fresh = pattern(0x62, 4096);
    good(
        &drv.command(0, &write10(1500, 8, true), &fresh, 0),
        "FUA write elsewhere",
    );
    good(&drv.command(0, &SYNCHRONIZE_CACHE_10, &[], 0), "flush");
    let r = drv.command(0, &read10(1500, 8), &[], 4096);
    good(&r, "read back");
    assert_eq!(r.data_in, fresh);
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
    daemon.kill();
    drop(mount);
}

/// A durable write whose sync reports ENOSPC (as thin storage, NFS or
/// btrfs report an earlier write-back error, once): the write fails with
/// SPACE ALLOCATION FAILED, and every later SYNCHRONIZE CACHE fails with
/// MEDIUM ERROR / WRITE ERROR although the file system would now flush
/// fine: the data the error was about may be lost.
#[test]
fn a_durable_write_failing_with_enospc_makes_later_flushes_fail() {
    if !root_or_skip("a_durable_write_failing_with_enospc_makes_later_flushes_fail") {
        return;
    }
    let mount = match fuse::Mount::cached(vec![0; 1 << 20]) {
        Ok(m) => m,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot mount a FUSE file system (CI=true): {e}"
            );
            eprintln!("skipped: cannot mount a FUSE file system: {e}");
            return;
        }
    };
    let sockdir = tempfile::tempdir().unwrap();
    let sock = sockdir.path().join("vus.sock");
    let log = sockdir.path().join("daemon.log");
    let img = mount.file();
    let mut daemon = start_logged(&sock, &[img.to_str().unwrap()], &log, Some("warn"));
    let mut drv = ScsiDriver::connect(&sock);

    let data = pattern(0x63, 4096);
    good(
        &drv.command(0, &write10(8, 8, false), &data, 0),
        "cached write",
    );
    good(
        &drv.command(0, &SYNCHRONIZE_CACHE_10, &[], 0),
        "first flush",
    );
    let before = mount.fsyncs();
    mount.fail_next_fsync(libc::ENOSPC);
    let r = drv.command(0, &write10(16, 8, true), &data, 0);
    assert_eq!(
        mount.fsyncs(),
        before + 1,
        "the FUA write's sync reached the file system"
    );
    assert_eq!(
        sense_of(&r),
        (0x07, 0x27, 0x07),
        "FUA write whose sync fails with ENOSPC"
    );
    // The file system would flush fine now; the daemon must not say so.
    const WRITE_ERROR: (u8, u8, u8) = (0x03, 0x0c, 0x00);
    for _ in 0..2 {
        let r = drv.command(0, &SYNCHRONIZE_CACHE_10, &[], 0);
        assert_eq!(sense_of(&r), WRITE_ERROR, "SYNCHRONIZE CACHE after it");
    }
    let r = drv.command(0, &write10(24, 8, true), &data, 0);
    assert_eq!(sense_of(&r), WRITE_ERROR, "a later FUA write");
    // Reads go on.
    let r = drv.command(0, &read10(8, 8), &[], 4096);
    good(&r, "read");
    assert_eq!(r.data_in, data);
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
    daemon.kill();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("all later flushes will fail"), "{log}");
    drop(mount);
}
