//! Command-line interface: the clap definitions, and [`Cli::into_config`],
//! which turns them into a [`DaemonConfig`]. The per-LUN option syntax of
//! the IMAGE arguments is [`LunSpec`]'s, in `config/lun_spec.rs`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::Parser;

use crate::config::{self, ConfigError, DaemonConfig, SocketConfig};
use crate::virtio::backend::QueueOptions;

pub use crate::config::{IoEngineChoice, LunSpec, LunSpecError, MAX_IMAGES};

/// vhost-user SCSI target: serves raw disk images to a virtual machine as
/// SCSI disks on target 0, one LUN per image in command-line order.
#[derive(Debug, Parser)]
#[command(name = "vhost-device-scsi", version, about, long_about = None)]
pub struct Cli {
    /// Unix socket to listen on for the VMM (QEMU's vhost-user-scsi-pci
    /// chardev); a stale socket file there is replaced.
    #[arg(short = 's', long = "socket-path", value_name = "PATH")]
    pub socket_path: PathBuf,

    /// Serve the listening Unix socket open at descriptor N instead of
    /// binding --socket-path (which then names it: the state file's
    /// default path and the log use it). For supervisors other than
    /// systemd; under systemd socket activation (LISTEN_FDS) the socket
    /// is taken without it. The socket is never unlinked.
    #[arg(long = "socket-fd", value_name = "N",
          value_parser = clap::value_parser!(i32).range(0..))]
    pub socket_fd: Option<i32>,

    /// Unix socket for the management API (JSON-RPC 2.0, one request a
    /// line: add, remove and resize LUNs, list them, statistics; the
    /// client is vhost-device-scsi-ctl). Whoever may connect to it may
    /// open any file the daemon can as a LUN: it has its own
    /// --api-socket-mode and --api-socket-group.
    #[arg(long = "api-socket", value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Permissions of the API socket, in octal (default 0600: only the
    /// daemon's user); not widened by --socket-mode.
    #[arg(long = "api-socket-mode", value_name = "MODE", default_value = "0600",
          value_parser = parse_socket_mode)]
    pub api_socket_mode: u32,

    /// Group of the API socket: a group name or a numeric gid (default:
    /// the daemon's group).
    #[arg(long = "api-socket-group", value_name = "GROUP",
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub api_socket_group: Option<String>,

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

    /// How READ and WRITE transfers and SYNCHRONIZE CACHE's flush are
    /// carried out: `io-uring` keeps up to 128 in flight per request queue;
    /// `sync` does one synchronous call at a time per worker thread; `auto`
    /// (the default) uses io_uring where the kernel supports it, else sync.
    #[arg(long = "io-engine", value_name = "ENGINE", value_enum,
          default_value_t = IoEngineChoice::Auto)]
    pub io_engine: IoEngineChoice,

    /// Where SIGTERM (or SIGINT) leaves the guest's state (the write cache
    /// and sense format it set, its pending unit attentions, a flush
    /// failure, the LUNs added through the API) for the next daemon, which
    /// takes it over at start and removes the file (default: the socket
    /// path with ".state" appended).
    #[arg(long = "state-file", value_name = "PATH")]
    pub state_file: Option<PathBuf>,

    /// Start for an incoming live migration (the VMM started with
    /// -incoming): open and check every image, but take no image lock
    /// until the VMM starts the device, so the daemon of the VM's source
    /// may still hold them.
    #[arg(long = "incoming")]
    pub incoming: bool,

    /// Confine the daemon once its images and sockets are open: Landlock
    /// (files only beneath the images', the sockets', the state file's and
    /// --sandbox-allow directories) where the kernel has it, and a seccomp
    /// allowlist of system calls (any other ends the daemon with a line
    /// on stderr). `off` applies neither.
    #[arg(long = "sandbox", value_name = "MODE", value_enum,
          default_value_t = crate::sandbox::SandboxMode::On)]
    pub sandbox: crate::sandbox::SandboxMode,

    /// With the sandbox on, a directory beneath which the management API's
    /// lun_add may open images (repeatable); without it lun_add can only
    /// add images in the directories of the startup images.
    #[arg(long = "sandbox-allow", value_name = "DIR")]
    pub sandbox_allow: Vec<PathBuf>,

    /// With the sandbox on, let the management API's lun_add attach
    /// network LUNs over TCP (nbd://, iscsi://) though none is given at
    /// start-up (with one at start-up, TCP sockets are allowed anyway).
    #[arg(long = "sandbox-allow-network")]
    pub sandbox_allow_network: bool,

    /// The iSCSI initiator name the daemon logs in to iscsi:// LUNs with
    /// (an iqn., eui. or naa. name, as the target's ACLs know it; default:
    /// iqn.2008-11.org.linux-kvm:vhost-device-scsi.HOSTNAME).
    #[arg(long = "initiator-name", value_name = "IQN",
          value_parser = parse_initiator_name)]
    pub initiator_name: Option<String>,

    /// Raw disk images (regular files or block devices) or network LUNs
    /// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`,
    /// `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN`), LUN 0 first;
    /// up to 16384. Options may follow after commas,
    /// `IMAGE[,ro][,block-size=512|4096][,serial=SERIAL][,wwn=0xHEX]`, where
    /// `SERIAL` is 1-20 printable ASCII characters without spaces, `HEX` is
    /// 16 hex digits of an NAA designator of type 2, 3 or 5, and a literal
    /// comma in a path is written `,,`; network LUNs take more (see
    /// docs/network-storage.md).
    // At least one: a daemon with no logical unit would serve a SCSI host
    // that the guest finds empty.
    // The --help text is the `help` below, not this doc comment: clap shows
    // a doc comment as it is, backticks and all, and without them rustdoc
    // reads the brackets as links. Keep the two saying the same thing (and
    // the doc comment one paragraph: a second would become clap's long_help,
    // which `help` does not override).
    #[arg(
        value_name = "IMAGE",
        required = true,
        help = "Raw disk images (regular files or block devices) or network \
                LUNs (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, \
                iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN), LUN 0 \
                first; up to 16384. Options may follow after commas, \
                IMAGE[,ro][,block-size=512|4096][,serial=SERIAL][,wwn=0xHEX], \
                where SERIAL is 1-20 printable ASCII characters without \
                spaces, HEX is 16 hex digits of an NAA designator of type 2, \
                3 or 5, and a literal comma in a path is written \",,\"; \
                network LUNs take more (docs/network-storage.md)"
    )]
    pub images: Vec<OsString>,
}

/// The `--io-engine` values: `auto`, `sync`, `io-uring`.
impl clap::ValueEnum for IoEngineChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &IoEngineChoice::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()))
    }
}

/// `--initiator-name`: an iSCSI name (RFC 3720 §3.2.6.3): `iqn.`, `eui.`
/// or `naa.` and then letters, digits and `.-:`, at most 223 bytes.
fn parse_initiator_name(value: &str) -> Result<String, String> {
    let known = ["iqn.", "eui.", "naa."]
        .iter()
        .any(|p| value.to_ascii_lowercase().starts_with(p));
    let chars = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    if !known || !chars || value.len() > 223 || value.len() < 5 {
        return Err(
            "not an iSCSI name: iqn., eui. or naa. then letters, digits, '.', '-' and ':' \
             (e.g. iqn.2026-01.com.example:host1), at most 223 characters"
                .to_string(),
        );
    }
    Ok(value.to_string())
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

impl Cli {
    /// The daemon's configuration: the flags as they are, every IMAGE
    /// argument parsed (`config::parse_luns`), and the checks clap does
    /// not make (more threads than request queues, the API socket at the
    /// vhost-user socket's path), in that order. Nothing
    /// here looks at the system: the socket's group, the I/O engine and the
    /// images are for start-up.
    pub fn into_config(self) -> Result<DaemonConfig, ConfigError> {
        let queues = QueueOptions {
            request_queues: usize::from(self.num_queues),
            threads: usize::from(self.threads),
            poll: std::time::Duration::from_micros(u64::from(self.poll_us)),
        };
        config::check_queues(&queues)?;
        let socket = SocketConfig {
            path: self.socket_path,
            fd: self.socket_fd,
            api_socket: self.api_socket,
            mode: self.socket_mode,
            group: self.socket_group,
            api_mode: self.api_socket_mode,
            api_group: self.api_socket_group,
        };
        socket.check_api_socket()?;
        let luns = config::parse_luns(&self.images)?;
        Ok(DaemonConfig {
            socket,
            luns,
            read_only: self.read_only,
            direct: self.direct,
            discard: !self.no_discard,
            solid_state: self.solid_state,
            queues,
            io_engine: self.io_engine,
            state_file: self.state_file,
            incoming: self.incoming,
            sandbox: self.sandbox,
            sandbox_allow: self.sandbox_allow,
            sandbox_network: self.sandbox_allow_network,
            initiator_name: self.initiator_name,
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
    fn initiator_names_are_checked() {
        for good in [
            "iqn.2026-01.com.example:host1",
            "eui.02004567A425678D",
            "naa.52004567BA64678D",
        ] {
            assert_eq!(
                cli(&["--initiator-name", good, "a"])
                    .unwrap()
                    .initiator_name
                    .as_deref(),
                Some(good)
            );
        }
        for bad in [
            "host1",
            "iqn.",
            "iqn.2026-01.com.example:host one",
            "iqn.a_b",
        ] {
            let e = cli(&["--initiator-name", bad, "a"])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--initiator-name") && e.contains("not an iSCSI name"),
                "{bad}: {e}"
            );
        }
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
                .into_config()
                .unwrap()
                .io_engine,
            IoEngineChoice::Sync
        );
        let e = cli(&["--io-engine", "uring", "a.raw"]).unwrap_err();
        assert!(e.to_string().contains("--io-engine"), "{e}");
        assert!(
            e.to_string()
                .contains("[possible values: auto, sync, io-uring]"),
            "{e}"
        );
    }

    /// A command line with no flags gives `DaemonConfig::new`'s defaults.
    #[test]
    fn defaults_are_the_configs() {
        let config = cli(&["a.raw", "b,,c.raw,ro"])
            .unwrap()
            .into_config()
            .unwrap();
        let luns = vec![
            LunSpec::parse("a.raw".as_ref()).unwrap(),
            LunSpec {
                path: "b,c.raw".into(),
                read_only: true,
                ..LunSpec::default()
            },
        ];
        assert_eq!(config, DaemonConfig::new("s.sock", luns));
    }

    #[test]
    fn every_flag_reaches_the_config() {
        let config = cli(&[
            "--api-socket",
            "api.sock",
            "--socket-fd",
            "7",
            "--socket-mode",
            "0660",
            "--socket-group",
            "kvm",
            "--api-socket-mode",
            "0640",
            "--api-socket-group",
            "adm",
            "-r",
            "--solid-state",
            "--no-discard",
            "--direct",
            "--num-queues",
            "4",
            "--threads",
            "2",
            "--poll-us",
            "50",
            "--io-engine",
            "io-uring",
            "--incoming",
            "--sandbox",
            "off",
            "--sandbox-allow",
            "/srv/images",
            "--initiator-name",
            "iqn.2026-01.com.example:host1",
            "a.raw,block-size=4096",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(
            config,
            DaemonConfig {
                socket: SocketConfig {
                    path: "s.sock".into(),
                    fd: Some(7),
                    api_socket: Some("api.sock".into()),
                    mode: 0o660,
                    group: Some("kvm".into()),
                    api_mode: 0o640,
                    api_group: Some("adm".into()),
                },
                luns: vec![LunSpec {
                    path: "a.raw".into(),
                    block_size: Some(4096),
                    ..LunSpec::default()
                }],
                read_only: true,
                direct: true,
                discard: false,
                solid_state: true,
                queues: QueueOptions {
                    request_queues: 4,
                    threads: 2,
                    poll: std::time::Duration::from_micros(50),
                },
                io_engine: IoEngineChoice::IoUring,
                state_file: None,
                incoming: true,
                sandbox: crate::sandbox::SandboxMode::Off,
                sandbox_allow: vec!["/srv/images".into()],
                sandbox_network: false,
                initiator_name: Some("iqn.2026-01.com.example:host1".into()),
            }
        );
    }

    /// The operator errors of the conversion, in the order they are
    /// checked: threads, then the number of images, then each image's
    /// options.
    #[test]
    fn conversion_errors() {
        let message = |args: &[&str]| cli(args).unwrap().into_config().unwrap_err().to_string();
        assert_eq!(
            message(&["--num-queues", "2", "--threads", "3", "a,bogus"]),
            "--threads 3: more threads than request queues (--num-queues 2)"
        );
        assert_eq!(
            message(&["a.raw", "b.raw,block-size=1"]),
            "LUN 1 (b.raw): block-size=1: must be 512 or 4096"
        );
        assert_eq!(
            message(&["--api-socket", "s.sock", "a,bogus"]),
            "--api-socket s.sock: the same path as --socket-path"
        );
        let mut many = vec!["a,bogus"; MAX_IMAGES + 1];
        many[0] = "a.raw";
        assert_eq!(
            message(&many),
            "too many images: 16385 given, at most 16384 (LUNs 0-16383)"
        );
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
        assert_eq!(
            cli(&["i"]).unwrap().socket_mode,
            crate::config::DEFAULT_SOCKET_MODE
        );
    }
}
