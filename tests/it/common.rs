//! The daemon process and a virtio-scsi driver over a real vhost-user
//! connection, for tests that drive the daemon exactly as QEMU plus a guest
//! would: a thin wrapper over the frontend crate's driver
//! (`vhost_scsi_frontend`) that panics where a test should fail.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vhost_scsi_frontend::{process_cpu_time, DaemonProcess, DriverConfig, ScsiFrontend};

pub use vhost_scsi_frontend::cdb::{read10, write10, SYNCHRONIZE_CACHE_10};
pub use vhost_scsi_frontend::Reply;

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-scsi");

/// A running daemon process, killed when dropped.
pub struct Daemon {
    pub process: DaemonProcess,
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
        Daemon { process }
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
        Daemon { process }
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

    /// A task management function (virtio-scsi subtype) to `lun`: the
    /// response byte.
    pub fn tmf(&mut self, subtype: u32, lun: u16) -> u8 {
        self.frontend
            .tmf(subtype, lun, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("TMF {subtype}: {e}"))
    }

    /// One SCSI command to target 0, `lun`, on the first request queue.
    pub fn command(&mut self, lun: u16, cdb: &[u8], data_out: &[u8], data_in_len: u32) -> Reply {
        self.frontend
            .queue(0)
            .expect("one request queue")
            .command(lun, cdb, data_out, data_in_len)
            .unwrap_or_else(|e| panic!("command {cdb:02x?}: {e}"))
    }
}

/// User plus system CPU time of `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    process_cpu_time(pid).unwrap_or_else(|e| panic!("CPU time of {pid}: {e}"))
}

/// `name` on the PATH; None, with the reason printed, when it is missing
/// (a failure under CI, whose .ci/run installs the Debian `package`).
pub fn tool(name: &str, package: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skipped(&format!("{name} not found (Debian package {package})"));
    }
    found
}

/// A TCP port nothing listens on at `host` (`127.0.0.1`, `[::1]`) now.
pub fn free_port(host: &str) -> u16 {
    std::net::TcpListener::bind(format!("{host}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
