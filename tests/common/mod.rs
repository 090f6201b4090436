//! The daemon process and a virtio-scsi driver over a real vhost-user
//! connection, for tests that drive the daemon exactly as QEMU plus a guest
//! would: a thin wrapper over the library's driver
//! (`vhost_scsi_frontend`) that panics where a test should fail.

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vhost::vhost_user::Frontend;
use vhost_scsi_frontend::{DaemonProcess, DriverConfig, ScsiFrontend};

pub use vhost_scsi_frontend::cdb::{read10, write10, SYNCHRONIZE_CACHE_10};
pub use vhost_scsi_frontend::Reply;

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-scsi");

/// A running daemon process, killed when dropped.
pub struct Daemon {
    pub process: DaemonProcess,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn start(socket: &Path, args: &[&str]) -> Daemon {
        let mut command = Command::new(BIN);
        command
            .arg("-s")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        let process = DaemonProcess::spawn(command, socket, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("daemon: {e}"));
        Daemon {
            process,
            socket: socket.to_path_buf(),
        }
    }

    /// As [`Daemon::start`], with the daemon's standard error (its log)
    /// going to the file `log`.
    pub fn start_logging_to(socket: &Path, args: &[&str], log: &Path) -> Daemon {
        let file = std::fs::File::create(log).unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("-s")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(file);
        let process = DaemonProcess::spawn(command, socket, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("daemon: {e}"));
        Daemon {
            process,
            socket: socket.to_path_buf(),
        }
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// One request queue, one request at a time.
pub struct ScsiDriver {
    frontend: ScsiFrontend,
}

impl ScsiDriver {
    /// Connects (retrying until the daemon listens) and sets up the
    /// control, event and first request queue, with EVENT_IDX.
    pub fn connect(socket: &Path) -> ScsiDriver {
        let frontend = ScsiFrontend::connect(socket, &DriverConfig::default())
            .unwrap_or_else(|e| panic!("cannot set up the device: {e}"));
        ScsiDriver { frontend }
    }

    /// One SCSI command to target 0, `lun`, on the first request queue.
    pub fn command(&mut self, lun: u16, cdb: &[u8], data_out: &[u8], data_in_len: u32) -> Reply {
        self.frontend
            .queue(0)
            .expect("one request queue")
            .command(lun, cdb, data_out, data_in_len)
            .unwrap_or_else(|e| panic!("command {cdb:02x?}: {e}"))
    }

    pub fn frontend(&mut self) -> &mut Frontend {
        self.frontend.vhost_frontend()
    }
}

/// User plus system CPU time of `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: state is field 3, utime and
    // stime fields 14 and 15 (proc(5)).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// A check this machine cannot make: says so on standard error, or fails
/// the test under CI (`CI=true`), whose machines must make every check.
pub fn skipped(reason: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "not checked under CI=true: {reason}"
    );
    eprintln!("skipped: {reason}");
}
