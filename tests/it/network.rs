//! Network LUNs through the daemon (issue 19): the daemon process, its
//! vhost-user socket and a virtio-scsi driver, against real servers on
//! loopback (qemu-nbd here; tgtd in `iscsi.rs`'s fixtures). The backends'
//! own protocol tests are `nbd.rs` and `iscsi.rs`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost_scsi_frontend::cdb::{get_lba_status, read16, unmap, unmap_list, write16};

use crate::common::{skipped, Daemon, ScsiDriver, SYNCHRONIZE_CACHE_10};
use crate::nbd::Server;

const CTL: &str = env!("CARGO_BIN_EXE_vhost-device-scsi-ctl");
const MIB: usize = 1 << 20;

/// qemu-nbd serving a raw file on a Unix socket (discards punch holes).
struct QemuNbd {
    child: Child,
    file: PathBuf,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(file: &Path, socket: &Path) -> Option<QemuNbd> {
        if Command::new("qemu-nbd").arg("--version").output().is_err() {
            skipped("qemu-nbd is not installed (Debian's qemu-utils)");
            return None;
        }
        let mut server = QemuNbd {
            child: Command::new("true").spawn().unwrap(),
            file: file.to_path_buf(),
            socket: socket.to_path_buf(),
        };
        server.launch();
        Some(server)
    }

    fn launch(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        self.child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "--persistent",
                "--shared=8",
                "--discard=unmap",
                "-x",
                "disk",
            ])
            .arg("-k")
            .arg(&self.socket)
            .arg(&self.file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not listen on {}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761) ^ seed).rotate_left(seed % 31) as u8)
        .collect()
}

/// Sense key, ASC, ASCQ of fixed-format sense.
fn key_asc(sense: &[u8]) -> (u8, u8, u8) {
    (sense[2] & 0x0f, sense[12], sense[13])
}

/// Whether `len` bytes at `offset` of `file` are a hole (SEEK_DATA from
/// there lands past them, or nowhere).
fn is_hole(file: &Path, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    // SAFETY: lseek on a descriptor this function owns.
    let data = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    data < 0 || data as u64 >= offset + len
}

#[test]
fn an_nbd_lun_reads_writes_flushes_and_discards_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.raw");
    let original = pattern(8 * MIB, 11);
    std::fs::write(&file, &original).unwrap();
    let Some(server) = QemuNbd::start(&file, &dir.path().join("nbd.sock")) else {
        return;
    };
    let socket = dir.path().join("vus.sock");
    let _daemon = Daemon::start(&socket, &[&server.uri()]);
    let mut driver = ScsiDriver::connect(&socket);
    // The whole disk, 1 MiB at a time: the export's bytes (sectors of 512).
    for mib in 0..8u64 {
        let reply = driver.command(0, &read16(mib * 2048, 2048), &[], MIB as u32);
        assert_eq!(
            (reply.response, reply.status),
            (0, 0),
            "{:02x?}",
            reply.sense
        );
        let at = mib as usize * MIB;
        assert!(
            reply.data_in == original[at..at + MIB],
            "MiB {mib} differs from the export"
        );
    }
    // A FUA WRITE of 64 KiB at LBA 1000 lands in the file.
    let data = pattern(64 << 10, 99);
    let reply = driver.command(0, &write16(1000, 128, true), &data, 0);
    assert_eq!(reply.status, 0, "{:02x?}", reply.sense);
    let mut back = vec![0u8; data.len()];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact_at(&mut back, 1000 * 512)
        .unwrap();
    assert_eq!(back, data);
    let reply = driver.command(0, &SYNCHRONIZE_CACHE_10, &[], 0);
    assert_eq!(reply.status, 0);
    // UNMAP of 1 MiB at 2 MiB: a hole in the export's file (qemu-nbd
    // --discard=unmap), zeroes to the guest, and GET LBA STATUS says
    // deallocated there (SBC-3 §5.8: provisioning status 1) and mapped
    // before it.
    assert!(!is_hole(&file, 2 * MIB as u64, MIB as u64));
    let list = unmap_list(&[(4096, 2048)]);
    let reply = driver.command(0, &unmap(0, list.len() as u16), &list, 0);
    assert_eq!(reply.status, 0, "{:02x?}", reply.sense);
    assert!(
        is_hole(&file, 2 * MIB as u64, MIB as u64),
        "no hole after UNMAP"
    );
    let reply = driver.command(0, &read16(4096, 8), &[], 4096);
    assert!(reply.data_in.iter().all(|&b| b == 0));
    let reply = driver.command(0, &get_lba_status(4096, 24), &[], 24);
    assert_eq!(reply.status, 0, "{:02x?}", reply.sense);
    let descriptor = &reply.data_in[8..24];
    assert_eq!(
        u64::from_be_bytes(descriptor[..8].try_into().unwrap()),
        4096
    );
    assert!(u32::from_be_bytes(descriptor[8..12].try_into().unwrap()) >= 2048);
    assert_eq!(descriptor[12] & 0x0f, 1, "deallocated");
    let reply = driver.command(0, &get_lba_status(0, 24), &[], 24);
    assert_eq!(reply.data_in[8 + 12] & 0x0f, 0, "mapped");
}

#[test]
fn an_nbd_server_restarted_under_the_daemon_is_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.raw");
    std::fs::write(&file, pattern(MIB, 3)).unwrap();
    let Some(mut server) = QemuNbd::start(&file, &dir.path().join("nbd.sock")) else {
        return;
    };
    let socket = dir.path().join("vus.sock");
    let mut daemon = Daemon::start(&socket, &[&format!("{},timeout=20", server.uri())]);
    let mut driver = ScsiDriver::connect(&socket);
    let reply = driver.command(0, &read16(0, 8), &[], 4096);
    assert_eq!(reply.status, 0);
    server.kill();
    let restart = {
        let file = file.clone();
        let socket = server.socket.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            let mut s = QemuNbd {
                child: Command::new("true").spawn().unwrap(),
                file,
                socket,
            };
            s.launch();
            s
        })
    };
    // Sent while the server is down: completes once it is back, with the
    // data written before.
    let data = pattern(4096, 5);
    let started = Instant::now();
    let reply = driver.command(0, &write16(16, 8, true), &data, 0);
    assert_eq!(
        reply.status,
        0,
        "{:02x?} after {:?}",
        reply.sense,
        started.elapsed()
    );
    let reply = driver.command(0, &read16(16, 8), &[], 4096);
    assert_eq!(reply.data_in, data);
    let _server = restart.join().unwrap();
    assert!(
        daemon.process.try_wait().unwrap().is_none(),
        "the daemon died"
    );
    // The write that waited for the reconnection is in the file.
    let mut back = vec![0u8; 4096];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact_at(&mut back, 16 * 512)
        .unwrap();
    assert_eq!(back, data);
    daemon.kill();
}

#[test]
fn an_unreachable_nbd_server_is_an_aborted_command_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.raw");
    std::fs::write(&file, pattern(MIB, 4)).unwrap();
    let local = dir.path().join("local.raw");
    std::fs::write(&local, pattern(MIB, 6)).unwrap();
    let Some(mut server) = QemuNbd::start(&file, &dir.path().join("nbd.sock")) else {
        return;
    };
    let socket = dir.path().join("vus.sock");
    let _daemon = Daemon::start(
        &socket,
        &[
            &format!("{},timeout=2", server.uri()),
            local.to_str().unwrap(),
        ],
    );
    let mut driver = ScsiDriver::connect(&socket);
    server.kill();
    // ABORTED COMMAND, LOGICAL UNIT COMMUNICATION FAILURE or TIME-OUT
    // (SPC-4: 0Bh 08h/00h, 08h/01h) within the 2 s timeout and a margin.
    let started = Instant::now();
    let reply = driver.command(0, &read16(0, 8), &[], 4096);
    let waited = started.elapsed();
    assert_eq!(reply.status, 2);
    let (key, asc, ascq) = key_asc(&reply.sense);
    assert_eq!((key, asc), (0x0b, 0x08), "{:02x?}", reply.sense);
    assert!(ascq <= 1);
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // The local LUN is served meanwhile.
    let reply = driver.command(1, &read16(0, 8), &[], 4096);
    assert_eq!(reply.status, 0);
    assert_eq!(reply.data_in, pattern(MIB, 6)[..4096]);
}

#[test]
fn lun_add_of_a_tcp_lun_under_a_sandbox_without_network_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local.raw");
    std::fs::write(&local, pattern(MIB, 1)).unwrap();
    let socket = dir.path().join("vus.sock");
    let api = dir.path().join("api.sock");
    let mut daemon = Daemon::start(
        &socket,
        &[
            "--api-socket",
            api.to_str().unwrap(),
            local.to_str().unwrap(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = Command::new(CTL)
            .arg("--api-socket")
            .arg(&api)
            .args(["lun_add", "image=nbd://127.0.0.1:1/x"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !stderr.contains("cannot connect") || Instant::now() > deadline {
            break stderr;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(out.contains("--sandbox-allow-network"), "{out}");
    // The daemon is alive (a socket(AF_INET) under its filter would have
    // ended it).
    assert!(daemon.process.try_wait().unwrap().is_none());
    daemon.kill();
}

#[test]
fn an_iscsi_lun_is_passed_through_by_the_daemon() {
    use crate::iscsi::{available, pattern, Tgt, BLOCK, PRODUCT, VENDOR};
    if !available() {
        return;
    }
    let tgt = Tgt::start(None);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local.raw");
    std::fs::write(&local, vec![0x5a; MIB]).unwrap();
    let socket = dir.path().join("vus.sock");
    let api = dir.path().join("api.sock");
    let mut daemon = Daemon::start(
        &socket,
        &[
            "--api-socket",
            api.to_str().unwrap(),
            &tgt.uri(),
            local.to_str().unwrap(),
        ],
    );
    let mut driver = ScsiDriver::connect(&socket);
    // A new session: tgt may report a unit attention first.
    let mut reply = driver.command(0, &[0, 0, 0, 0, 0, 0], &[], 0);
    for _ in 0..3 {
        if reply.status == 0 {
            break;
        }
        assert_eq!(reply.sense[2] & 0x0f, 0x6, "{:02x?}", reply.sense);
        reply = driver.command(0, &[0, 0, 0, 0, 0, 0], &[], 0);
    }
    assert_eq!(reply.status, 0);
    // INQUIRY: tgt's identity as tgtadm set it (T10 vendor at bytes
    // 8-15, product at 16-31), not the daemon's.
    let reply = driver.command(0, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!(reply.status, 0);
    assert_eq!(
        String::from_utf8_lossy(&reply.data_in[8..16]).trim_end(),
        VENDOR
    );
    assert!(String::from_utf8_lossy(&reply.data_in[16..32]).starts_with(PRODUCT));
    // READ: the backing file's bytes.
    let reply = driver.command(0, &read16(0, 16), &[], 16 * BLOCK as u32);
    assert_eq!(reply.status, 0, "{:02x?}", reply.sense);
    assert!(
        reply.data_in == pattern(0, 16 * BLOCK),
        "not the file's bytes"
    );
    // A FUA WRITE lands in the file.
    let data: Vec<u8> = (0..8 * BLOCK).map(|i| (i % 251) as u8 ^ 0x3c).collect();
    let reply = driver.command(0, &write16(100, 8, true), &data, 0);
    assert_eq!(reply.status, 0, "{:02x?}", reply.sense);
    assert_eq!(tgt.image_bytes()[100 * BLOCK..108 * BLOCK], data[..]);
    // REPORT LUNS: the daemon's two LUNs, not tgt's (its LUN 0 controller
    // and LUN 1).
    let reply = driver.command(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[], 64);
    assert_eq!(reply.data_in[..4], 16u32.to_be_bytes());
    assert_eq!(
        reply.data_in[8..24],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    // FORMAT UNIT never reaches tgt: ILLEGAL REQUEST, INVALID COMMAND
    // OPERATION CODE from the daemon's filter.
    let reply = driver.command(0, &[0x04, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(key_asc(&reply.sense), (0x5, 0x20, 0x00));
    // LOGICAL UNIT RESET (virtio-scsi subtype 5) at the remote: FUNCTION
    // COMPLETE, and I/O goes on (past tgt's unit attention for it).
    assert_eq!(driver.tmf(5, 0), 0);
    let mut reply = driver.command(0, &read16(100, 8), &[], 8 * BLOCK as u32);
    if reply.status != 0 {
        assert_eq!(key_asc(&reply.sense).0, 0x6, "{:02x?}", reply.sense);
        reply = driver.command(0, &read16(100, 8), &[], 8 * BLOCK as u32);
    }
    assert_eq!(reply.data_in, data);
    // lun_remove flushes it (SYNCHRONIZE CACHE at the remote) and logs out.
    let out = Command::new(CTL)
        .arg("--api-socket")
        .arg(&api)
        .args(["lun_remove", "lun=0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = driver.command(0, &read16(0, 1), &[], BLOCK as u32);
    assert_eq!(
        key_asc(&reply.sense),
        (0x5, 0x25, 0x00),
        "LOGICAL UNIT NOT SUPPORTED"
    );
    assert!(daemon.process.try_wait().unwrap().is_none());
    daemon.kill();
}

#[test]
fn a_chap_password_in_a_uri_reaches_no_log_line_or_answer() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local.raw");
    std::fs::write(&local, pattern(MIB, 2)).unwrap();
    let socket = dir.path().join("vus.sock");
    let api = dir.path().join("api.sock");
    let log = dir.path().join("daemon.log");
    let mut daemon = Daemon::start_logging_to(
        &socket,
        &[
            "--sandbox-allow-network",
            "--api-socket",
            api.to_str().unwrap(),
            local.to_str().unwrap(),
        ],
        &log,
    );
    // Nothing listens on port 1: the login fails, and every line about it
    // names the URI. The password has a '/' in it, as base64 secrets do.
    let deadline = Instant::now() + Duration::from_secs(5);
    let answer = loop {
        let out = Command::new(CTL)
            .arg("--api-socket")
            .arg(&api)
            .args([
                "lun_add",
                "image=iscsi://alice%hun/ter2@127.0.0.1:1/iqn.2026-12.test:t/1,timeout=2",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !stderr.contains("cannot connect to") || Instant::now() > deadline {
            break stderr;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        answer.contains("iscsi://alice@127.0.0.1:1/iqn.2026-12.test:t/1"),
        "{answer}"
    );
    assert!(!answer.contains("ter2"), "{answer}");
    daemon.kill();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("lun_add"), "{logged}");
    assert!(!logged.contains("ter2"), "{logged}");
}

/// qemu-nbd serving `file` over TCP on 127.0.0.1:`port`.
fn qemu_nbd_tcp(file: &Path, port: u16) -> Server {
    let port_arg = port.to_string();
    let args = [
        "-f",
        "raw",
        "--persistent",
        "--shared=8",
        "-x",
        "disk",
        "-b",
        "127.0.0.1",
    ];
    let mut args: Vec<&str> = args.to_vec();
    args.extend(["-p", &port_arg, file.to_str().unwrap()]);
    let server = Server::spawn(Path::new("qemu-nbd"), &args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "qemu-nbd does not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// A network LUN named by host name, under the sandbox (the default):
/// resolving `localhost` again — a size refresh's new handshake, a
/// reconnection from a confined connection thread, a `lun_add` — reads
/// /etc/hosts (allowed to Landlock for network LUNs) and may ask DNS
/// (sendmmsg, allowed to seccomp); a call the filter traps would end the
/// daemon with status 159.
#[test]
fn a_network_lun_named_by_host_name_resolves_under_the_sandbox() {
    if Command::new("qemu-nbd").arg("--version").output().is_err() {
        skipped("qemu-nbd is not installed (Debian's qemu-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.raw");
    std::fs::write(&file, pattern(MIB, 8)).unwrap();
    let port = crate::common::free_port("127.0.0.1");
    let server = qemu_nbd_tcp(&file, port);
    let socket = dir.path().join("vus.sock");
    let api = dir.path().join("api.sock");
    let uri = format!("nbd://localhost:{port}/disk");
    let mut daemon = Daemon::start(&socket, &["--api-socket", api.to_str().unwrap(), &uri]);
    let ctl = |args: &[&str]| {
        let out = Command::new(CTL)
            .arg("--api-socket")
            .arg(&api)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !api.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    ctl(&["lun_resize", "lun=0"]);
    ctl(&["lun_add", &format!("image={uri}"), "lun=1"]);
    // The server restarted: both LUNs' connection threads resolve again.
    drop(server);
    let _server = qemu_nbd_tcp(&file, port);
    let mut driver = ScsiDriver::connect(&socket);
    for lun in [0, 1] {
        let mut reply = driver.command(lun, &read16(0, 8), &[], 4096);
        if reply.status == 2 && key_asc(&reply.sense) == (0x6, 0x3f, 0x0e) {
            // REPORTED LUNS DATA HAS CHANGED, from the lun_add.
            reply = driver.command(lun, &read16(0, 8), &[], 4096);
        }
        assert_eq!(reply.status, 0, "LUN {lun}: {:02x?}", reply.sense);
        assert_eq!(reply.data_in, pattern(MIB, 8)[..4096]);
    }
    assert!(
        daemon.process.try_wait().unwrap().is_none(),
        "the daemon died"
    );
    daemon.kill();
}
