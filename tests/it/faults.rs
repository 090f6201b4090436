//! Faults around the daemon, on the daemon process over a real vhost-user
//! connection: a guest flooding the log, the image's file system filling
//! up, the image shrinking underneath, the daemon killed and restarted.

use crate::common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read10, write10, ScsiDriver, BIN, SYNCHRONIZE_CACHE_10};
use vhost_scsi_frontend::sense::{key_asc_ascq, CheckCondition};
use vhost_scsi_frontend::testkit::sparse_image;
use vhost_scsi_frontend::{DaemonProcess, DriverConfig, ScsiFrontend};

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
    common::skipped(&format!("{test}: needs root to mount a tmpfs"));
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

/// CHECK CONDITION with (sense key, ASC, ASCQ).
#[track_caller]
fn sense_of(r: &common::Reply) -> (u8, u8, u8) {
    key_asc_ascq(&CheckCondition::sense(r))
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
    sparse_image(&img, &[], 16 << 20).unwrap();
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
///
/// It is also the durability oracle: it logs, in order, every WRITE and
/// FSYNC/FSYNCDIR request and the moment each is answered, and it can hold
/// FSYNC answers until the test lets them go — what the daemon's
/// `fdatasync` and `RWF_DSYNC` writes really ask of a file system, which a
/// SIGKILL of the daemon cannot show (the page cache survives it).
mod fuse {
    use std::ffi::CString;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::ops::Range;
    use std::os::fd::AsRawFd;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

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
    const FSYNCDIR: u32 = 30;
    const ACCESS: u32 = 34;
    const INTERRUPT: u32 = 36;
    const DESTROY: u32 = 38;
    const BATCH_FORGET: u32 = 42;
    const FOPEN_DIRECT_IO: u32 = 1;
    /// fuse_fsync_in.fsync_flags: fdatasync rather than fsync.
    const FUSE_FSYNC_FDATASYNC: u32 = 1;
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
        /// The durability log and whether FSYNC answers are held.
        log: Mutex<Log>,
        /// Signalled when the log or the hold changes.
        changed: Condvar,
    }

    #[derive(Default)]
    struct Log {
        events: Vec<Event>,
        hold_fsyncs: bool,
    }

    /// A request the daemon's file system calls caused, as the server got
    /// it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Op {
        /// FUSE_WRITE of `len` bytes at `offset`: `write_flags` are
        /// FUSE_WRITE_* (FUSE_WRITE_CACHE for page-cache write-back),
        /// `flags` the open flags the kernel passes along (O_DIRECT; and
        /// O_DSYNC or O_SYNC when this write is synchronous, RWF_DSYNC
        /// included).
        Write {
            offset: u64,
            len: u32,
            write_flags: u32,
            flags: u32,
        },
        /// FUSE_FSYNC (or FUSE_FSYNCDIR), `datasync` for fdatasync.
        Fsync { dir: bool, datasync: bool },
    }

    /// One line of the durability log, in the order the server saw them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Event {
        /// Request `unique` (the kernel's request id) arrived.
        Request(u64, Op),
        /// Request `unique` was answered with `error` (0 or -errno):
        /// logged just before the answer goes to the kernel, so anything
        /// the answer lets happen comes after it.
        Answered(u64, i32),
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
        /// that an `RWF_DSYNC` write ends in an FSYNC request; opened with
        /// O_DIRECT it takes direct writes (the kernel's `direct_IO`
        /// path), which end in one too.
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

        /// The durability log so far.
        pub fn events(&self) -> Vec<Event> {
            self.state.log.lock().unwrap().events.clone()
        }

        /// From now on, FSYNC requests are logged but not answered until
        /// [`release_fsyncs`](Self::release_fsyncs). The server answers
        /// nothing else meanwhile (it is one thread).
        pub fn hold_fsyncs(&self) {
            self.state.log.lock().unwrap().hold_fsyncs = true;
            self.state.changed.notify_all();
        }

        /// Answers the held FSYNC and stops holding.
        pub fn release_fsyncs(&self) {
            self.state.log.lock().unwrap().hold_fsyncs = false;
            self.state.changed.notify_all();
        }

        /// Waits up to `timeout` for `f` to find something in the log.
        pub fn wait_for<T>(
            &self,
            timeout: Duration,
            mut f: impl FnMut(&[Event]) -> Option<T>,
        ) -> Option<T> {
            let deadline = Instant::now() + timeout;
            let mut log = self.state.log.lock().unwrap();
            loop {
                if let Some(found) = f(&log.events) {
                    return Some(found);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                log = self.state.changed.wait_timeout(log, left).unwrap().0;
            }
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
                log: Mutex::new(Log::default()),
                changed: Condvar::new(),
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
            // A test that failed while holding an FSYNC leaves nothing
            // blocked.
            self.release_fsyncs();
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

    impl State {
        fn record(&self, event: Event) {
            self.log.lock().unwrap().events.push(event);
            self.changed.notify_all();
        }
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
                    // struct fuse_write_in: fh, offset, size, write_flags,
                    // lock_owner, flags, padding.
                    let (offset, len) = (u64_at(body, 8), u32_at(body, 16));
                    state.record(Event::Request(
                        unique,
                        Op::Write {
                            offset,
                            len,
                            write_flags: u32_at(body, 20),
                            flags: u32_at(body, 32),
                        },
                    ));
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
                FSYNC | FSYNCDIR => {
                    // struct fuse_fsync_in: fh, fsync_flags, padding.
                    let datasync = u32_at(body, 8) & FUSE_FSYNC_FDATASYNC != 0;
                    state.record(Event::Request(
                        unique,
                        Op::Fsync {
                            dir: opcode == FSYNCDIR,
                            datasync,
                        },
                    ));
                    let mut log = state.log.lock().unwrap();
                    while log.hold_fsyncs {
                        log = state.changed.wait(log).unwrap();
                    }
                    drop(log);
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
            if matches!(opcode, WRITE | FSYNC | FSYNCDIR) {
                let error = reply.as_ref().err().map_or(0, |errno| -errno);
                state.record(Event::Answered(unique, error));
            }
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
    let data = pattern(0x61, 1 << 20);
    // Blocks 1024-1031 (512 KiB to 516 KiB) fail.
    let Some(mount) = fuse_or_skip("eio_from_the_image_is_a_medium_error", || {
        fuse::Mount::new(data.clone(), (512 << 10)..(516 << 10))
    }) else {
        return;
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
    let Some(mount) = cached_fuse_or_skip(
        "a_durable_write_failing_with_enospc_makes_later_flushes_fail",
        vec![0; 1 << 20],
    ) else {
        return;
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

/// A FUSE file served through the page cache, or `None` (printed) where
/// this system cannot mount one; with `CI=true` that is a failure.
fn cached_fuse_or_skip(test: &str, data: Vec<u8>) -> Option<fuse::Mount> {
    fuse_or_skip(test, || fuse::Mount::cached(data))
}

/// The FUSE file system `mount` mounts, if this machine can mount one:
/// else the test is skipped (root and /dev/fuse are needed), and fails
/// under CI.
fn fuse_or_skip(
    test: &str,
    mount: impl FnOnce() -> std::io::Result<fuse::Mount>,
) -> Option<fuse::Mount> {
    if !root_or_skip(test) {
        return None;
    }
    match mount() {
        Ok(m) => Some(m),
        Err(e) => {
            common::skipped(&format!("{test}: cannot mount a FUSE file system: {e}"));
            None
        }
    }
}

/// How long the oracle waits for what must come (an FSYNC, a completion).
const ORACLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a held FSYNC is watched for a completion that must not come.
const HELD_WINDOW: Duration = Duration::from_millis(100);

/// Runs `cdb` (with `data` out) on the idle queue `q` while the file
/// system holds every FSYNC, and checks that it is durable at completion:
/// an FSYNC reaches the file system after WRITE requests covering the
/// bytes `range` (logged from `written_since` on) were answered, the
/// command does not complete while that FSYNC is unanswered, and
/// completes GOOD once it is.
fn synced_before_completion(
    q: &mut vhost_scsi_frontend::RequestQueue,
    mount: &fuse::Mount,
    what: &str,
    cdb: &[u8],
    data: &[u8],
    written_since: usize,
    range: std::ops::Range<u64>,
) {
    use fuse::{Event, Op};
    use vhost_scsi_frontend::{Command as ScsiCommand, Data};

    let mark = mount.events().len();
    mount.hold_fsyncs();
    let slot = q.next_free_slot().expect("an idle queue");
    let data_dir = if data.is_empty() {
        Data::None
    } else {
        q.write_data(slot, 0, data).unwrap();
        Data::Out(data.len() as u32)
    };
    q.submit(&ScsiCommand {
        lun: 0,
        cdb,
        data: data_dir,
    })
    .unwrap();
    q.notify().unwrap();

    // The FSYNC arrives (and is held) before the command completes.
    let deadline = Instant::now() + ORACLE_TIMEOUT;
    let held = loop {
        let fsync = mount.wait_for(Duration::from_millis(1), |events| {
            events[mark..].iter().find_map(|e| match e {
                Event::Request(unique, Op::Fsync { .. }) => Some(*unique),
                _ => None,
            })
        });
        if let Some(unique) = fsync {
            break unique;
        }
        if q.poll_used(Duration::ZERO).unwrap() {
            mount.release_fsyncs();
            panic!(
                "{what} completed and no FSYNC reached the file system; it saw {:?}",
                &mount.events()[mark..]
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: neither an FSYNC nor a completion in {ORACLE_TIMEOUT:?}; the file system saw {:?}",
            &mount.events()[mark..]
        );
    };
    let early = q.poll_used(HELD_WINDOW).unwrap();
    mount.release_fsyncs();
    assert!(
        !early,
        "{what} completed while its FSYNC was held unanswered; the file system saw {:?}",
        &mount.events()[mark..]
    );

    let mut done = None;
    while done.is_none() {
        q.reap(|c| done = Some(c)).unwrap();
        if done.is_none() {
            q.wait()
                .unwrap_or_else(|e| panic!("{what} after its FSYNC was answered: {e}"));
        }
    }
    let events = mount.events();
    let c = done.unwrap();
    let header = c.response.expect("a response");
    assert!(
        header.is_good(),
        "{what}: {header:?}, sense {:02x?}",
        q.read_sense(c.slot, header.sense_len).unwrap()
    );
    let fsync_at = events
        .iter()
        .position(|e| matches!(e, Event::Request(u, Op::Fsync { dir: false, .. }) if *u == held))
        .unwrap_or_else(|| panic!("{what}: the held request is no file FSYNC: {events:?}"));
    assert!(
        events[fsync_at..]
            .iter()
            .any(|e| matches!(e, Event::Answered(u, 0) if *u == held)),
        "{what} completed GOOD, but its FSYNC was not answered (or failed): {events:?}"
    );
    // The data went to the file system, and was answered, before the FSYNC.
    let before = &events[written_since..fsync_at];
    let mut covered = vec![false; (range.end - range.start) as usize];
    for e in before {
        let &Event::Request(unique, Op::Write { offset, len, .. }) = e else {
            continue;
        };
        if !before.contains(&Event::Answered(unique, 0)) {
            continue;
        }
        let end = offset + u64::from(len);
        for b in offset.max(range.start)..end.min(range.end) {
            covered[(b - range.start) as usize] = true;
        }
    }
    assert!(
        covered.iter().all(|&c| c),
        "{what}: bytes {range:?} were not all written (and answered) before the FSYNC: {:?}",
        &events[written_since..]
    );
}

/// MODE SELECT(6) of the caching page with WCE cleared (SBC-3 §6.4.5).
fn write_cache_off(q: &mut vhost_scsi_frontend::RequestQueue) {
    let mut params = vec![0u8, 0, 0, 0]; // header, no block descriptor
    let mut page = vec![0u8; 20];
    page[0] = 0x08;
    page[1] = 0x12;
    params.extend_from_slice(&page);
    let cdb = [0x15, 0x10, 0, 0, params.len() as u8, 0];
    let r = q.command(0, &cdb, &params, 0).unwrap();
    good(&r, "MODE SELECT WCE=0");
}

/// The durability oracle, on the daemon binary serving an image on the
/// FUSE file system with `engine` (and `--direct`): SYNCHRONIZE CACHE
/// after a plain WRITE, a FUA WRITE, and with WCE=0 a plain WRITE each
/// reach the file system as an FSYNC after their data, and complete only
/// once it is answered. A SIGKILL of the daemon could not tell: the page
/// cache keeps unsynced data.
///
/// What arrives (Linux 6.18, no FOPEN_DIRECT_IO): `fdatasync` is an FSYNC
/// with FUSE_FSYNC_FDATASYNC; an `RWF_DSYNC` write, buffered or O_DIRECT,
/// is a WRITE whose `flags` carry O_DSYNC followed by that FSYNC (the
/// kernel's `generic_write_sync`), so the oracle needs no flag. (A file
/// opened with FOPEN_DIRECT_IO gets the O_DSYNC flag and no FSYNC.)
/// Through the page cache the io_uring engine writes synchronously, so
/// its `RWF_DSYNC` is tested by the `--direct` case.
fn syncs_reach_the_file_system_before_completion(test: &str, engine: &str, direct: bool) {
    const BS: usize = 4096;
    let Some(mount) = cached_fuse_or_skip(test, vec![0; 1 << 20]) else {
        return;
    };
    let sockdir = tempfile::tempdir().unwrap();
    let sock = sockdir.path().join("vus.sock");
    let log = sockdir.path().join("daemon.log");
    // 4096-byte blocks: FUSE does not report STATX_DIOALIGN, so --direct
    // assumes 4096.
    let lun = format!("{},block-size={BS}", mount.file().to_str().unwrap());
    let mut args = vec!["--io-engine", engine, &lun];
    if direct {
        args.insert(0, "--direct");
    }
    let mut daemon = start_logged(&sock, &args, &log, Some("warn"));
    let mut frontend = ScsiFrontend::connect(&sock, &DriverConfig::default()).unwrap();
    let q = frontend.queue(0).unwrap();
    let block = |lba: u64| lba * BS as u64..(lba + 1) * BS as u64;

    // SYNCHRONIZE CACHE(10) after a plain WRITE.
    let since = mount.events().len();
    let a = pattern(0x71, BS);
    good(
        &q.command(0, &write10(1, 1, false), &a, 0).unwrap(),
        "WRITE",
    );
    synced_before_completion(
        q,
        &mount,
        "SYNCHRONIZE CACHE(10)",
        &SYNCHRONIZE_CACHE_10,
        &[],
        since,
        block(1),
    );
    // A FUA WRITE.
    let b = pattern(0x72, BS);
    let since = mount.events().len();
    synced_before_completion(
        q,
        &mount,
        "FUA WRITE(10)",
        &write10(2, 1, true),
        &b,
        since,
        block(2),
    );
    // WCE=0, then a plain WRITE.
    write_cache_off(q);
    let c = pattern(0x73, BS);
    let since = mount.events().len();
    synced_before_completion(
        q,
        &mount,
        "WRITE(10) with WCE=0",
        &write10(3, 1, false),
        &c,
        since,
        block(3),
    );

    let r = q.command(0, &read10(1, 3), &[], 3 * BS as u32).unwrap();
    good(&r, "read back");
    assert_eq!(r.data_in, [a, b, c].concat());
    eprintln!("{test}: the whole log: {:?}", mount.events());
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
    daemon.kill();
    drop(frontend);
    drop(mount);
}

#[test]
fn syncs_reach_the_file_system_before_completion_sync_engine() {
    syncs_reach_the_file_system_before_completion(
        "syncs_reach_the_file_system_before_completion_sync_engine",
        "sync",
        false,
    );
}

#[test]
fn syncs_reach_the_file_system_before_completion_io_uring_engine() {
    syncs_reach_the_file_system_before_completion(
        "syncs_reach_the_file_system_before_completion_io_uring_engine",
        "io-uring",
        false,
    );
}

#[test]
fn syncs_reach_the_file_system_before_completion_sync_engine_direct() {
    syncs_reach_the_file_system_before_completion(
        "syncs_reach_the_file_system_before_completion_sync_engine_direct",
        "sync",
        true,
    );
}

#[test]
fn syncs_reach_the_file_system_before_completion_io_uring_engine_direct() {
    syncs_reach_the_file_system_before_completion(
        "syncs_reach_the_file_system_before_completion_io_uring_engine_direct",
        "io-uring",
        true,
    );
}

/// SBC-3 §5.24 and the sticky flush error: a SYNCHRONIZE CACHE whose
/// FSYNC fails with EIO fails with MEDIUM ERROR / WRITE ERROR, and so does
/// every later one, without asking the file system again (it would answer
/// GOOD now, and the data the error was about may be lost). With io_uring
/// the flush is the engine's FSYNC request; with the sync engine an
/// `fdatasync` in the worker thread.
fn a_failed_flush_fails_every_later_flush(test: &str, engine: &str) {
    let Some(mount) = cached_fuse_or_skip(test, vec![0; 1 << 20]) else {
        return;
    };
    let sockdir = tempfile::tempdir().unwrap();
    let sock = sockdir.path().join("vus.sock");
    let log = sockdir.path().join("daemon.log");
    let img = mount.file();
    let args = ["--io-engine", engine, img.to_str().unwrap()];
    let mut daemon = start_logged(&sock, &args, &log, Some("warn"));
    let mut drv = ScsiDriver::connect(&sock);
    const WRITE_ERROR: (u8, u8, u8) = (0x03, 0x0c, 0x00);

    let data = pattern(0x64, 4096);
    good(
        &drv.command(0, &write10(8, 8, false), &data, 0),
        "cached write",
    );
    let before = mount.fsyncs();
    mount.fail_next_fsync(libc::EIO);
    let r = drv.command(0, &SYNCHRONIZE_CACHE_10, &[], 0);
    assert_eq!(
        mount.fsyncs(),
        before + 1,
        "the flush reached the file system"
    );
    assert_eq!(
        sense_of(&r),
        WRITE_ERROR,
        "SYNCHRONIZE CACHE whose FSYNC failed"
    );
    for _ in 0..2 {
        let r = drv.command(0, &SYNCHRONIZE_CACHE_10, &[], 0);
        assert_eq!(sense_of(&r), WRITE_ERROR, "a later SYNCHRONIZE CACHE");
    }
    assert_eq!(
        mount.fsyncs(),
        before + 1,
        "a flush that must fail does not ask the file system"
    );
    let r = drv.command(0, &read10(8, 8), &[], 4096);
    good(&r, "read");
    assert_eq!(r.data_in, data);
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
    daemon.kill();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("all later flushes will fail"), "{log}");
    drop(mount);
}

#[test]
fn a_failed_flush_fails_every_later_flush_sync_engine() {
    a_failed_flush_fails_every_later_flush(
        "a_failed_flush_fails_every_later_flush_sync_engine",
        "sync",
    );
}

#[test]
fn a_failed_flush_fails_every_later_flush_io_uring_engine() {
    a_failed_flush_fails_every_later_flush(
        "a_failed_flush_fails_every_later_flush_io_uring_engine",
        "io-uring",
    );
}

/// Answers held FSYNCs when dropped.
struct ReleaseFsyncs<'m>(&'m fuse::Mount);

impl Drop for ReleaseFsyncs<'_> {
    fn drop(&mut self) {
        self.0.release_fsyncs();
    }
}

/// With io_uring, SYNCHRONIZE CACHE is a request in flight like a READ:
/// while the file system holds its FSYNC, a READ on the same queue (of
/// another LUN, whose image is on another file system: the FUSE server
/// answers nothing while it holds the FSYNC) is served and completes, and
/// the flush completes GOOD once the FSYNC is answered. (A flush carried
/// out in the worker thread would hold the READ up until the FSYNC was
/// answered.)
#[test]
fn a_flush_in_flight_holds_up_no_read_io_uring_engine() {
    use vhost_scsi_frontend::{Command as ScsiCommand, Data};
    const TEST: &str = "a_flush_in_flight_holds_up_no_read_io_uring_engine";
    let Some(mount) = cached_fuse_or_skip(TEST, vec![0; 1 << 20]) else {
        return;
    };
    let sockdir = tempfile::tempdir().unwrap();
    let sock = sockdir.path().join("vus.sock");
    let log = sockdir.path().join("daemon.log");
    let data = pattern(0x65, 1 << 20);
    let other = sockdir.path().join("other.raw");
    std::fs::write(&other, &data).unwrap();
    let img = mount.file();
    let args = [
        "--io-engine",
        "io-uring",
        img.to_str().unwrap(),
        other.to_str().unwrap(),
    ];
    let mut daemon = start_logged(&sock, &args, &log, Some("warn"));
    let config = DriverConfig {
        queue_depth: 2,
        ..DriverConfig::default()
    };
    let mut frontend = ScsiFrontend::connect(&sock, &config).unwrap();
    let q = frontend.queue(0).unwrap();
    // Whatever fails below, the FSYNC is answered before the daemon is
    // killed (a daemon with an FSYNC held in the kernel cannot exit).
    let _release = ReleaseFsyncs(&mount);
    let flush = submit_held_flush(q, &mount);
    let read = q
        .submit(&ScsiCommand {
            lun: 1,
            cdb: &read10(16, 8),
            data: Data::In(4096),
        })
        .unwrap();
    q.notify().unwrap();
    let mut completed = Vec::new();
    let deadline = Instant::now() + ORACLE_TIMEOUT;
    while !completed.iter().any(|&(slot, _)| slot == read) && Instant::now() < deadline {
        if q.poll_used(Duration::from_millis(10)).unwrap() {
            q.reap(|c| completed.push((c.slot, c.response.map(|h| h.is_good()))))
                .unwrap();
        }
    }
    let flush_done_early = completed.iter().any(|&(slot, _)| slot == flush);
    mount.release_fsyncs();
    assert!(
        completed.contains(&(read, Some(true))),
        "the READ was not answered GOOD while the flush's FSYNC was held: {completed:?}"
    );
    assert!(
        !flush_done_early,
        "SYNCHRONIZE CACHE completed while its FSYNC was held"
    );
    let mut got = vec![0u8; 4096];
    q.read_data(read, 0, &mut got).unwrap();
    assert_eq!(got, &data[16 * 512..24 * 512]);
    while !completed.iter().any(|&(slot, _)| slot == flush) {
        q.wait().unwrap();
        q.reap(|c| completed.push((c.slot, c.response.map(|h| h.is_good()))))
            .unwrap();
    }
    assert!(
        completed.contains(&(flush, Some(true))),
        "SYNCHRONIZE CACHE after its FSYNC was answered: {completed:?}"
    );
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
    daemon.kill();
    drop(_release);
    drop(frontend);
    drop(mount);
}

/// An upgrade's SIGTERM completes what the daemon took from the guest's
/// queues before it exits: a SYNCHRONIZE CACHE whose FSYNC the file system
/// holds is answered (GOOD, on the used ring) once the file system lets it
/// go, and only then does the daemon exit with status 0 and remove its
/// socket. The VMM reads the used index back after the disconnect, so the
/// next daemon resumes exactly after the requests the last one took.
#[test]
fn sigterm_completes_the_requests_in_flight_before_exiting() {
    const TEST: &str = "sigterm_completes_the_requests_in_flight_before_exiting";
    let Some(mount) = cached_fuse_or_skip(TEST, vec![0; 1 << 20]) else {
        return;
    };
    let sockdir = tempfile::tempdir().unwrap();
    let sock = sockdir.path().join("vus.sock");
    let log = sockdir.path().join("daemon.log");
    let img = mount.file();
    let args = ["--io-engine", "io-uring", img.to_str().unwrap()];
    let mut daemon = start_logged(&sock, &args, &log, Some("info"));
    let mut frontend = ScsiFrontend::connect(&sock, &DriverConfig::default()).unwrap();
    let q = frontend.queue(0).unwrap();
    let _release = ReleaseFsyncs(&mount);
    let flush = submit_held_flush(q, &mount);
    // SIGTERM while the flush is in flight: the daemon waits for it.
    // SAFETY: kill(2) on the daemon's pid, a child of this process.
    assert_eq!(unsafe { libc::kill(daemon.pid() as i32, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon exited with a flush in flight"
    );
    mount.release_fsyncs();
    let mut completed = Vec::new();
    let deadline = Instant::now() + ORACLE_TIMEOUT;
    while completed.is_empty() && Instant::now() < deadline {
        if q.poll_used(Duration::from_millis(10)).unwrap() {
            q.reap(|c| completed.push((c.slot, c.response.map(|h| h.is_good()))))
                .unwrap();
        }
    }
    assert_eq!(
        completed,
        [(flush, Some(true))],
        "the flush was not answered before the daemon exited"
    );
    let deadline = Instant::now() + ORACLE_TIMEOUT;
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists(), "the socket was left behind");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("SIGTERM received: requests in flight completed"),
        "{text}"
    );
    drop(_release);
    drop(frontend);
    drop(mount);
}

/// Holds the FSYNCs of `mount`'s file system, submits a SYNCHRONIZE CACHE
/// of LUN 0 on `q` and waits until its FSYNC is held there; its slot.
fn submit_held_flush(q: &mut vhost_scsi_frontend::RequestQueue, mount: &fuse::Mount) -> usize {
    use vhost_scsi_frontend::{Command as ScsiCommand, Data};
    let mark = mount.events().len();
    mount.hold_fsyncs();
    let flush = q
        .submit(&ScsiCommand {
            lun: 0,
            cdb: &SYNCHRONIZE_CACHE_10,
            data: Data::None,
        })
        .unwrap();
    q.notify().unwrap();
    let held = mount.wait_for(ORACLE_TIMEOUT, |events| {
        events[mark..]
            .iter()
            .any(|e| matches!(e, fuse::Event::Request(_, fuse::Op::Fsync { .. })))
            .then_some(())
    });
    if held.is_none() {
        mount.release_fsyncs();
        panic!(
            "no FSYNC reached the file system: {:?}",
            &mount.events()[mark..]
        );
    }
    flush
}

/// A stop does not wait on storage that hangs for ever: with a flush held
/// in the file system, a second SIGTERM makes the daemon remove its socket
/// and exit at once (the 10 s bound works the same way, without it), and
/// it says it did not wait.
#[test]
fn a_second_signal_stops_without_waiting_for_hung_storage() {
    const TEST: &str = "a_second_signal_stops_without_waiting_for_hung_storage";
    let Some(mount) = cached_fuse_or_skip(TEST, vec![0; 1 << 20]) else {
        return;
    };
    let sockdir = tempfile::tempdir().unwrap();
    let sock = sockdir.path().join("vus.sock");
    let log = sockdir.path().join("daemon.log");
    let img = mount.file();
    let args = ["--io-engine", "io-uring", img.to_str().unwrap()];
    let mut daemon = start_logged(&sock, &args, &log, Some("info"));
    let mut frontend = ScsiFrontend::connect(&sock, &DriverConfig::default()).unwrap();
    let q = frontend.queue(0).unwrap();
    let _release = ReleaseFsyncs(&mount);
    let _flush = submit_held_flush(q, &mount);
    let pid = daemon.pid() as i32;
    // SAFETY: kill(2) on the daemon's pid, a child of this process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sock.exists(),
        "the first SIGTERM did not wait for the flush"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the second SIGTERM did not stop the daemon"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("then another signal: exiting without waiting"),
        "{text}"
    );
    // The process itself ends once the kernel lets go of the held FSYNC.
    mount.release_fsyncs();
    let deadline = Instant::now() + ORACLE_TIMEOUT;
    while daemon.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(_release);
    drop(frontend);
    drop(mount);
}
