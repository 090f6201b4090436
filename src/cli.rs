//! Command-line interface: the clap definitions. The per-LUN option syntax
//! of the IMAGE arguments is [`LunSpec`]'s, in `config/lun_spec.rs`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::virtio::uring::IoEngine;

pub use crate::config::{LunSpec, LunSpecError, MAX_IMAGES, MAX_SERIAL_LEN};

/// vhost-user SCSI target: serves raw disk images to a virtual machine as
/// SCSI disks on target 0, one LUN per image in command-line order.
#[derive(Debug, Parser)]
#[command(name = "vhost-device-scsi", version, about, long_about = None)]
pub struct Cli {
    /// Unix socket to listen on for the VMM (QEMU's vhost-user-scsi-pci
    /// chardev); a stale socket file there is replaced.
    #[arg(short = 's', long = "socket-path", value_name = "PATH")]
    pub socket_path: PathBuf,

    /// Permissions of the socket, in octal (default 0600): whoever may
    /// connect to it gets every image, so only the daemon's user may
    /// unless this (with --socket-group) lets a group or everyone in.
    /// The umask does not widen it.
    #[arg(long = "socket-mode", value_name = "MODE", default_value = "0600",
          value_parser = parse_socket_mode)]
    pub socket_mode: u32,

    /// Group of the socket: a group name or a numeric gid (default: the
    /// daemon's group). With --socket-mode 0660 its members may connect.
    #[arg(long = "socket-group", value_name = "GROUP",
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub socket_group: Option<String>,

    /// Serve every image read-only (as ",ro" on each): images are opened
    /// O_RDONLY and guest writes fail with DATA PROTECT.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,

    /// Report the disks as solid state (non-rotating) to the guest.
    #[arg(long = "solid-state")]
    pub solid_state: bool,

    /// Do not offer UNMAP or WRITE SAME with UNMAP: thin provisioning off,
    /// guest discards never punch holes in the images.
    #[arg(long = "no-discard")]
    pub no_discard: bool,

    /// Open the images with O_DIRECT, bypassing the host page cache (as
    /// QEMU's cache=none); the block size must meet the image's direct I/O
    /// alignment.
    #[arg(long = "direct")]
    pub direct: bool,

    /// Request queues to offer the VMM (1-62; QEMU asks for one per vCPU by
    /// default, and must not ask for more than are offered).
    #[arg(long = "num-queues", value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u8).range(1..=62))]
    pub num_queues: u8,

    /// Worker threads serving the request queues (1 to --num-queues);
    /// request queue i is served by thread i modulo THREADS.
    #[arg(long = "threads", value_name = "T", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=62))]
    pub threads: u8,

    /// Busy-poll a queue for up to this many microseconds after it runs dry
    /// before sleeping until the next kick (0-1000; 0, the default, never
    /// polls): lower latency for a core's worth of CPU.
    #[arg(long = "poll-us", value_name = "US", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=1000))]
    pub poll_us: u16,

    /// How READ and WRITE transfers are carried out: `io-uring` keeps up to
    /// 128 in flight per request queue; `sync` does one synchronous call at
    /// a time per worker thread; `auto` (the default) uses io_uring where
    /// the kernel supports it, else sync.
    #[arg(long = "io-engine", value_name = "ENGINE", value_enum,
          default_value_t = IoEngineChoice::Auto)]
    pub io_engine: IoEngineChoice,

    /// Raw disk images (regular files or block devices), LUN 0 first; up to
    /// 16384. Options may follow a path after commas,
    /// IMAGE[,ro][,block-size=512|4096][,serial=SERIAL][,wwn=0xHEX], where
    /// SERIAL is 1-20 printable ASCII characters without spaces, HEX is 16
    /// hex digits of an NAA designator of type 2, 3 or 5, and a literal
    /// comma in a path is written ",,".
    // At least one: a daemon with no logical unit would serve a SCSI host
    // that the guest finds empty.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<OsString>,
}

/// The `--io-engine` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngineChoice {
    Auto,
    Sync,
    #[value(name = "io-uring")]
    IoUring,
}

/// `--socket-mode`: permission bits in octal, 0-0777 (an optional leading
/// `0o` is accepted); no setuid, setgid or sticky bit, which mean nothing
/// on a socket.
fn parse_socket_mode(value: &str) -> Result<u32, String> {
    let digits = value.strip_prefix("0o").unwrap_or(value);
    let bad = || "not an octal mode from 0000 to 0777 (e.g. 0660)".to_string();
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(bad());
    }
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(bad()),
    }
}

/// The gid of group `name` in the group database, or `None` if there is
/// no such group.
fn group_id(name: &str) -> Result<Option<u32>, String> {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `group` and `result` are written by getgrnam_r, which
        // keeps its strings in `buf` (valid for `buf.len()` bytes).
        let (rc, found) = unsafe {
            let mut group: libc::group = std::mem::zeroed();
            let mut result: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            );
            (rc, (!result.is_null()).then_some(group.gr_gid))
        };
        match rc {
            0 => return Ok(found),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // No entry: some implementations say so with an errno.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => {
                return Err(format!(
                    "cannot look up the group: {}",
                    std::io::Error::from_raw_os_error(e)
                ))
            }
        }
    }
}

impl Cli {
    /// Who may connect to the socket: `--socket-mode` and `--socket-group`
    /// resolved (a group name first, as chown(1) does, then a numeric
    /// gid), or why the group is unusable.
    pub fn socket_access(&self) -> Result<crate::daemon::SocketAccess, String> {
        let group = match &self.socket_group {
            None => None,
            Some(name) => {
                let gid = match group_id(name).map_err(|e| format!("--socket-group {name}: {e}"))? {
                    Some(gid) => gid,
                    None => name.parse::<u32>().ok().filter(|&g| g != u32::MAX).ok_or_else(|| {
                        format!("--socket-group {name}: no such group (a group name or a numeric gid)")
                    })?,
                };
                Some(crate::daemon::SocketGroup {
                    name: name.clone(),
                    gid,
                })
            }
        };
        Ok(crate::daemon::SocketAccess {
            mode: self.socket_mode,
            group,
        })
    }

    /// The I/O engine to use: `auto` probes io_uring (logging why it falls
    /// back to sync); an explicit `io-uring` that does not work here is an
    /// error.
    pub fn io_engine(&self) -> Result<IoEngine, String> {
        match self.io_engine {
            IoEngineChoice::Sync => Ok(IoEngine::Sync),
            IoEngineChoice::IoUring => crate::virtio::uring::probe()
                .map(|()| IoEngine::IoUring)
                .map_err(|e| format!("--io-engine io-uring: io_uring is not usable here: {e}")),
            IoEngineChoice::Auto => match crate::virtio::uring::probe() {
                Ok(()) => Ok(IoEngine::IoUring),
                Err(e) => {
                    log::info!("io_uring is not usable here ({e}): using the sync I/O engine");
                    Ok(IoEngine::Sync)
                }
            },
        }
    }

    /// How the request queues are served, or why the flags do not fit.
    pub fn queue_options(&self) -> Result<crate::virtio::backend::QueueOptions, String> {
        if self.threads > self.num_queues {
            return Err(format!(
                "--threads {}: more threads than request queues (--num-queues {})",
                self.threads, self.num_queues
            ));
        }
        Ok(crate::virtio::backend::QueueOptions {
            request_queues: usize::from(self.num_queues),
            threads: usize::from(self.threads),
            poll: std::time::Duration::from_micros(u64::from(self.poll_us)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["vhost-device-scsi", "-s", "s.sock"].iter().chain(args))
    }

    #[test]
    fn io_engine_option() {
        assert_eq!(cli(&["a.raw"]).unwrap().io_engine, IoEngineChoice::Auto);
        for (value, choice) in [
            ("auto", IoEngineChoice::Auto),
            ("sync", IoEngineChoice::Sync),
            ("io-uring", IoEngineChoice::IoUring),
        ] {
            let parsed = cli(&["--io-engine", value, "a.raw"]).unwrap();
            assert_eq!(parsed.io_engine, choice);
        }
        assert_eq!(
            cli(&["--io-engine", "sync", "a.raw"])
                .unwrap()
                .io_engine()
                .unwrap(),
            IoEngine::Sync
        );
        let e = cli(&["--io-engine", "uring", "a.raw"]).unwrap_err();
        assert!(e.to_string().contains("--io-engine"), "{e}");
    }

    #[test]
    fn socket_modes() {
        for (text, mode) in [("0600", 0o600), ("660", 0o660), ("0o777", 0o777), ("0", 0)] {
            assert_eq!(parse_socket_mode(text), Ok(mode), "{text}");
        }
        for text in [
            "", "0o", "8", "0999", "1777", "04755", "00660", "+660", "rw", "0x1ff",
        ] {
            assert!(parse_socket_mode(text).is_err(), "{text}");
        }
        assert_eq!(cli(&["i"]).unwrap().socket_mode, 0o600);
    }
}
