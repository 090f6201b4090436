//! The NBD client backend (`storage::nbd`) against real servers:
//! qemu-nbd and qemu-storage-daemon on Unix sockets, nbdkit over TCP on
//! 127.0.0.1 with its log, error and delay filters; a server killed and
//! started again under I/O, and one that stays dead. A missing tool skips
//! a test, and fails it under CI=true. (The asynchronous path, with
//! pinned guest memory only the crate can build, is tested in
//! `src/storage/nbd/tests.rs`, against qemu-nbd too.)

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_device_scsi::storage::{Extent, IoBufs, IoBufsMut, NbdImage, NbdOptions, Storage};

fn tool(name: &str) -> Option<PathBuf> {
    crate::common::tool(name, "qemu-utils or nbdkit")
}

/// A server process, killed when dropped.
pub(crate) struct Server(std::process::Child);

impl Server {
    pub(crate) fn spawn(tool: &Path, args: &[&str]) -> Server {
        let child = Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", tool.display()));
        Server(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Opens `uri`, retrying while the server starts (up to 10 s).
fn open(uri: &str, options: NbdOptions) -> NbdImage {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match NbdImage::open(uri, options) {
            Ok(image) => return image,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn read(image: &NbdImage, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut bufs = IoBufsMut::new();
    bufs.push_bytes(&mut buf);
    image.read_vectored_at(&mut bufs, offset)?;
    drop(bufs);
    Ok(buf)
}

fn write(image: &NbdImage, offset: u64, data: &[u8], durable: bool) -> io::Result<()> {
    let mut bufs = IoBufs::new();
    bufs.push_bytes(data);
    image.write_vectored_at(&bufs, offset, durable)
}

const MIB: usize = 1 << 20;

/// An 8 MiB image: 4 MiB of data, then a hole.
fn image_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("disk.raw");
    let mut contents = pattern(1, 4 * MIB);
    std::fs::write(&path, &contents).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    contents.resize(8 * MIB, 0);
    (path, contents)
}

fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", sock.display())
}

/// What every server must do: the whole disk read back as the file holds
/// it, writes (plain and durable) landing in the file, flush, zeroing with
/// and without deallocation, extents matching the file's holes.
fn exercise(image: &NbdImage, file: &Path, contents: &[u8]) {
    assert_eq!(image.size(), contents.len() as u64);
    assert!(!image.read_only());
    let whole = read(image, 0, contents.len()).unwrap();
    assert!(whole == contents, "the whole disk reads as the file");

    let data = pattern(2, 3 * MIB + 4096);
    write(image, 512 * 1024, &data, false).unwrap();
    write(image, 6 * MIB as u64, &data[..MIB], true).unwrap();
    image.flush().unwrap();
    let on_disk = std::fs::read(file).unwrap();
    assert!(on_disk[512 * 1024..][..data.len()] == data[..], "written");
    assert!(on_disk[6 * MIB..][..MIB] == data[..MIB], "written durably");

    // Extents: data up to 4 MiB + 4096 + 512 KiB ... the file's own map.
    let extent = image.extent(0).unwrap();
    assert!(
        extent.allocated && extent.len >= 3 * MIB as u64,
        "{extent:?}"
    );
    let hole_at = 5 * MIB as u64;
    assert_eq!(
        image.extent(hole_at).unwrap(),
        Extent {
            allocated: false,
            len: MIB as u64
        },
        "the hole between 5 and 6 MiB"
    );

    // Zeroing with deallocation punches a hole in the file.
    let blocks = std::fs::metadata(file).unwrap().blocks();
    image.write_zeroes(MIB as u64, MIB as u64, true).unwrap();
    let after = std::fs::metadata(file).unwrap().blocks();
    assert!(
        after + 2048 <= blocks,
        "1 MiB deallocated: {blocks} -> {after} blocks"
    );
    assert!(!image.extent(MIB as u64).unwrap().allocated);
    // Without: zeroes, the blocks kept (ext4 marks them unwritten, which
    // SEEK_DATA, and so the server, may report as a hole).
    let blocks = std::fs::metadata(file).unwrap().blocks();
    image.write_zeroes(2 * MIB as u64, 4096, false).unwrap();
    assert!(read(image, 2 * MIB as u64, 4096).unwrap() == vec![0; 4096]);
    assert_eq!(
        std::fs::metadata(file).unwrap().blocks(),
        blocks,
        "nothing deallocated"
    );
    let on_disk = std::fs::read(file).unwrap();
    assert!(
        on_disk[MIB..2 * MIB + 4096].iter().all(|b| *b == 0),
        "zeroed"
    );

    // Past the end.
    let err = read(image, 8 * MIB as u64 - 512, 1024).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn nbd_qemu_nbd_over_a_unix_socket() {
    let Some(qemu_nbd) = tool("qemu-nbd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (file, contents) = image_file(dir.path());
    let sock = dir.path().join("nbd.sock");
    let _server = Server::spawn(
        &qemu_nbd,
        &[
            "-f",
            "raw",
            "--discard=unmap",
            "--persistent",
            "-x",
            "disk",
            "-k",
            sock.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    );
    let image = open(&unix_uri(&sock), NbdOptions::default());
    assert_eq!(image.connections(), 1);
    exercise(&image, &file, &contents);
}

#[test]
fn nbd_qemu_storage_daemon_with_several_connections() {
    let Some(qsd) = tool("qemu-storage-daemon") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (file, contents) = image_file(dir.path());
    let sock = dir.path().join("nbd.sock");
    let blockdev = format!(
        "driver=file,filename={},node-name=file0,discard=unmap",
        file.display()
    );
    // qemu-storage-daemon advertises NBD_FLAG_CAN_MULTI_CONN itself.
    let server = format!(
        "addr.type=unix,addr.path={},max-connections=4",
        sock.display()
    );
    let _server = Server::spawn(
        &qsd,
        &[
            "--blockdev",
            &blockdev,
            "--nbd-server",
            &server,
            "--export",
            "type=nbd,id=e0,node-name=file0,name=disk,writable=on",
        ],
    );
    let options = NbdOptions {
        connections: 3,
        ..NbdOptions::default()
    };
    let image = Arc::new(open(&unix_uri(&sock), options));
    assert_eq!(image.connections(), 3, "multi-conn: three connections");
    exercise(&image, &file, &contents);
    // Requests from several threads spread over the connections; a flush
    // on any covers them all.
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let image = image.clone();
            std::thread::spawn(move || {
                for i in 0..20u64 {
                    let offset = t * MIB as u64 + i * 16384;
                    write(&image, offset, &pattern(100 * t + i, 16384), false).unwrap();
                }
                image.flush().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let on_disk = std::fs::read(&file).unwrap();
    for t in 0..6u64 {
        for i in 0..20u64 {
            let at = (t * MIB as u64 + i * 16384) as usize;
            assert!(
                on_disk[at..at + 16384] == pattern(100 * t + i, 16384),
                "{t}/{i}"
            );
        }
    }
}

/// A free TCP port on 127.0.0.1 (free when this returns).
/// nbdkit in the foreground on 127.0.0.1:port with `args` (filters,
/// plugin, parameters).
fn nbdkit(port: u16, args: &[&str]) -> Option<Server> {
    let nbdkit = tool("nbdkit")?;
    let port = port.to_string();
    let mut all = vec!["-f", "-i", "127.0.0.1", "-p", &port, "-e", "disk"];
    all.extend_from_slice(args);
    Some(Server::spawn(&nbdkit, &all))
}

#[test]
fn nbd_nbdkit_over_tcp_sees_fua_and_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (file, contents) = image_file(dir.path());
    let log = dir.path().join("log.txt");
    let port = crate::common::free_port("127.0.0.1");
    let logfile = format!("logfile={}", log.display());
    let Some(_server) = nbdkit(
        port,
        &["--filter=log", "file", file.to_str().unwrap(), &logfile],
    ) else {
        return;
    };
    let image = open(
        &format!("nbd://127.0.0.1:{port}/disk"),
        NbdOptions::default(),
    );
    exercise(&image, &file, &contents);
    // nbdkit's file plugin reports the file's size to each connection:
    // the connection is made again for the new size, which is not a loss
    // (a write not flushed before it does not fail the next flush).
    write(&image, 0, &[9; 4096], false).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(12 * MIB as u64)
        .unwrap();
    assert_eq!(image.size(), 8 * MIB as u64);
    assert_eq!(image.refresh_size().unwrap(), 12 * MIB as u64);
    assert_eq!(image.size(), 12 * MIB as u64);
    assert!(read(&image, 11 * MIB as u64, MIB).unwrap() == vec![0; MIB]);
    image.flush().unwrap();
    drop(image);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(" Write ") && l.contains("fua=1")),
        "a durable write has FUA:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains(" Flush ")),
        "a flush:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains(" Zero ")),
        "write zeroes:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains(" Extents ")),
        "block status:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("Disconnect")),
        "disconnected:\n{log}"
    );
}

#[test]
fn nbd_nbdkit_error_filter_errors_reach_the_caller_as_errnos() {
    let port = crate::common::free_port("127.0.0.1");
    let Some(_server) = nbdkit(
        port,
        &[
            "--filter=error",
            "memory",
            "size=1M",
            "error-pread=ENOSPC",
            "error-pread-rate=1",
            "error-pwrite=EIO",
            "error-pwrite-rate=1",
        ],
    ) else {
        return;
    };
    let image = open(
        &format!("nbd://127.0.0.1:{port}/disk"),
        NbdOptions::default(),
    );
    let err = read(&image, 0, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let err = write(&image, 0, &[1; 4096], false).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    image.flush().unwrap();
}

#[test]
fn nbd_nbdkit_delay_filter_times_requests_out() {
    let port = crate::common::free_port("127.0.0.1");
    let Some(_server) = nbdkit(port, &["--filter=delay", "memory", "size=1M", "rdelay=5"]) else {
        return;
    };
    let options = NbdOptions {
        timeout: Duration::from_millis(500),
        ..NbdOptions::default()
    };
    let image = open(&format!("nbd://127.0.0.1:{port}/disk"), options);
    write(&image, 0, &[1; 4096], false).unwrap();
    let start = Instant::now();
    let err = read(&image, 0, 4096).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    // A server silent for a whole timeout with a command waiting is
    // taken for gone: the connection is made again, and what is not
    // delayed goes through.
    write(&image, 4096, &[2; 4096], false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while image.connected() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(image.connected(), 1);
}

fn qemu_nbd_server(qemu_nbd: &Path, sock: &Path, file: &Path) -> Server {
    Server::spawn(
        qemu_nbd,
        &[
            "-f",
            "raw",
            "--persistent",
            "-x",
            "disk",
            "-k",
            sock.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    )
}

#[test]
fn nbd_a_server_killed_and_restarted_under_io() {
    let Some(qemu_nbd) = tool("qemu-nbd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = image_file(dir.path());
    let sock = dir.path().join("nbd.sock");
    let mut server = qemu_nbd_server(&qemu_nbd, &sock, &file);
    let image = Arc::new(open(&unix_uri(&sock), NbdOptions::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four threads write and read back their own region until stopped.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (image, stop) = (image.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let offset = t * MIB as u64;
                    let data = pattern(1000 * t + round, 64 * 1024);
                    write(&image, offset, &data, round % 3 == 0).unwrap();
                    assert!(
                        read(&image, offset, data.len()).unwrap() == data,
                        "{t}/{round}"
                    );
                    round += 1;
                }
                round
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    server.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::fs::remove_file(&sock);
    let _server = qemu_nbd_server(&qemu_nbd, &sock, &file);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        assert!(t.join().unwrap() > 0);
    }
    assert_eq!(image.connected(), 1, "reconnected");
    // Writes acknowledged since the last flush before the loss: the next
    // flush reports them possibly lost, once.
    let err = image.flush().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    image.flush().unwrap();
}

#[test]
fn nbd_a_server_that_stays_dead_fails_requests_within_the_timeout() {
    let Some(qemu_nbd) = tool("qemu-nbd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (file, contents) = image_file(dir.path());
    let sock = dir.path().join("nbd.sock");
    let mut server = qemu_nbd_server(&qemu_nbd, &sock, &file);
    let options = NbdOptions {
        timeout: Duration::from_secs(1),
        ..NbdOptions::default()
    };
    let image = open(&unix_uri(&sock), options);
    assert!(read(&image, 0, 4096).unwrap() == contents[..4096]);
    server.kill();
    let start = Instant::now();
    let err = read(&image, 0, 4096).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::NotConnected | io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let err = image.flush().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotConnected, "{err}");
}
