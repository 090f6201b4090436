//! Command-line interface: clap definitions and the per-LUN option syntax
//! of the IMAGE arguments.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use clap::Parser;

use crate::virtio::uring::IoEngine;

/// Most images one daemon serves: LUNs 0..=16383, every LUN that flat
/// space addressing (SAM-5 §4.6.10, 14 bits) can express.
pub const MAX_IMAGES: usize = crate::scsi::lun::MAX_LUN as usize + 1;

/// Longest `serial=` value. VPD page 80h has room for more, but 20
/// characters is what ATA and most initiator tools expect of a serial.
pub const MAX_SERIAL_LEN: usize = 20;

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

/// One IMAGE argument: the image and its per-LUN options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LunSpec {
    pub path: PathBuf,
    /// `ro`: this LUN is read-only.
    pub read_only: bool,
    /// `block-size=`: logical block size, 512 or 4096.
    pub block_size: Option<u32>,
    /// `serial=`: unit serial number, overriding the derived one.
    pub serial: Option<String>,
    /// `wwn=`: NAA designator, overriding the derived one.
    pub wwn: Option<u64>,
}

/// A malformed IMAGE argument. `image` is its path part (or the whole
/// argument when that is what is wrong); `option` the offending option as
/// written, if an option is to blame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", .option.as_ref().map(|o| format!("{o}: ")).unwrap_or_default())]
pub struct LunSpecError {
    pub image: String,
    pub option: Option<String>,
    pub reason: String,
}

impl LunSpec {
    /// Parses `PATH[,OPTION]...`, with ",," standing for a literal comma
    /// (QEMU's convention) in the path and in option values alike.
    pub fn parse(arg: &OsStr) -> Result<LunSpec, LunSpecError> {
        let mut fields = split_commas(arg.as_bytes()).into_iter();
        let path = fields.next().unwrap_or_default();
        let image = String::from_utf8_lossy(&path).into_owned();
        let fail = |option: Option<&str>, reason: &str| LunSpecError {
            image: if path.is_empty() {
                arg.to_string_lossy().into_owned()
            } else {
                image.clone()
            },
            option: option.map(str::to_string),
            reason: reason.to_string(),
        };
        if path.is_empty() {
            return Err(fail(None, "no image path before the options"));
        }
        let mut spec = LunSpec {
            path: PathBuf::from(OsString::from_vec(path.clone())),
            ..LunSpec::default()
        };
        let mut seen: Vec<String> = Vec::new();
        for field in fields {
            let text = String::from_utf8_lossy(&field).into_owned();
            let option = Some(text.as_str());
            if field.is_empty() {
                return Err(fail(
                    None,
                    "empty option (a comma in a path is written \",,\")",
                ));
            }
            let (name, value) = match text.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (text.as_str(), None),
            };
            if !matches!(name, "ro" | "block-size" | "serial" | "wwn") {
                return Err(fail(
                    option,
                    "unknown option (known: ro, block-size=, serial=, wwn=)",
                ));
            }
            if seen.iter().any(|s| s == name) {
                return Err(fail(option, "given twice"));
            }
            seen.push(name.to_string());
            if name == "ro" {
                if value.is_some() {
                    return Err(fail(option, "takes no value"));
                }
                spec.read_only = true;
                continue;
            }
            let value = match value {
                Some(v) if !v.is_empty() => v,
                _ => return Err(fail(option, "needs a value")),
            };
            match name {
                "block-size" => {
                    spec.block_size = Some(match value {
                        "512" => 512,
                        "4096" => 4096,
                        _ => return Err(fail(option, "must be 512 or 4096")),
                    })
                }
                "serial" => spec.serial = Some(parse_serial(value).map_err(|r| fail(option, r))?),
                _ => spec.wwn = Some(parse_wwn(value).map_err(|r| fail(option, r))?),
            }
        }
        Ok(spec)
    }
}

/// Splits at single commas; ",," is a literal comma.
fn split_commas(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut fields = vec![Vec::new()];
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1)) {
            (b',', Some(b',')) => {
                fields.last_mut().unwrap().push(b',');
                i += 2;
            }
            (b',', _) => {
                fields.push(Vec::new());
                i += 1;
            }
            (b, _) => {
                fields.last_mut().unwrap().push(b);
                i += 1;
            }
        }
    }
    fields
}

fn parse_serial(value: &str) -> Result<String, &'static str> {
    if !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("only printable ASCII without spaces (0x21-0x7e) is allowed");
    }
    if value.len() > MAX_SERIAL_LEN {
        return Err("at most 20 characters");
    }
    Ok(value.to_string())
}

/// A 64-bit NAA designator (SPC-4 §7.8.6.6): 16 hex digits, "0x" optional,
/// NAA type (the first digit) 2 (IEEE extended), 3 (locally assigned) or 5
/// (IEEE registered). Type 6 is 128 bits long and has no place here.
fn parse_wwn(value: &str) -> Result<u64, &'static str> {
    let digits = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
        .unwrap_or(value);
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be 16 hex digits, e.g. 0x5000c50012345678");
    }
    let wwn = u64::from_str_radix(digits, 16).map_err(|_| "not a hex number")?;
    match wwn >> 60 {
        2 | 3 | 5 => Ok(wwn),
        _ => Err("NAA type (first digit) must be 2 (IEEE extended), 3 (locally assigned) or 5 (IEEE registered)"),
    }
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

    fn parse(s: &str) -> Result<LunSpec, LunSpecError> {
        LunSpec::parse(OsStr::new(s))
    }

    fn err(s: &str) -> (Option<String>, String) {
        let e = parse(s).unwrap_err();
        (e.option, e.reason)
    }

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

    #[test]
    fn plain_paths_still_work() {
        let spec = parse("/img/disk.raw").unwrap();
        assert_eq!(spec.path, PathBuf::from("/img/disk.raw"));
        assert_eq!(
            spec,
            LunSpec {
                path: "/img/disk.raw".into(),
                ..LunSpec::default()
            }
        );
        // Non-UTF-8 paths pass through untouched.
        let raw = OsStr::from_bytes(b"/img/\xff.raw,ro");
        let spec = LunSpec::parse(raw).unwrap();
        assert_eq!(spec.path.as_os_str().as_bytes(), b"/img/\xff.raw");
        assert!(spec.read_only);
    }

    #[test]
    fn every_option() {
        let spec = parse("d.raw,ro,block-size=4096,serial=abc-1_X,wwn=0x5000C50012345678").unwrap();
        assert_eq!(
            spec,
            LunSpec {
                path: "d.raw".into(),
                read_only: true,
                block_size: Some(4096),
                serial: Some("abc-1_X".into()),
                wwn: Some(0x5000_c500_1234_5678),
            }
        );
        assert_eq!(parse("d,block-size=512").unwrap().block_size, Some(512));
        assert_eq!(
            parse("d,wwn=3000000000000001").unwrap().wwn,
            Some(0x3000_0000_0000_0001)
        );
        assert_eq!(
            parse("d,wwn=0X2ABCDEF012345678").unwrap().wwn,
            Some(0x2abc_def0_1234_5678)
        );
        assert_eq!(
            parse("d,serial=12345678901234567890")
                .unwrap()
                .serial
                .unwrap()
                .len(),
            20
        );
    }

    #[test]
    fn double_commas_are_literal() {
        assert_eq!(parse("a,,b.raw").unwrap().path, PathBuf::from("a,b.raw"));
        let spec = parse("a,,,ro").unwrap();
        assert_eq!(spec.path, PathBuf::from("a,"));
        assert!(spec.read_only);
        assert_eq!(parse("x,,ro").unwrap().path, PathBuf::from("x,ro"));
        assert_eq!(
            parse("d,serial=a,,b").unwrap().serial.as_deref(),
            Some("a,b")
        );
    }

    #[test]
    fn errors_name_the_option() {
        let o = |s: &str| Some(s.to_string());
        assert_eq!(
            err("d,block-size=1000"),
            (o("block-size=1000"), "must be 512 or 4096".into())
        );
        assert_eq!(err("d,block-size").1, "needs a value");
        assert_eq!(err("d,block-size=").1, "needs a value");
        assert_eq!(err("d,bogus=1").0, o("bogus=1"));
        assert!(err("d,bogus").1.starts_with("unknown option"));
        assert!(err("d,RO").1.starts_with("unknown option"));
        assert_eq!(err("d,ro=on"), (o("ro=on"), "takes no value".into()));
        assert_eq!(
            err("d,ro,block-size=512,ro"),
            (o("ro"), "given twice".into())
        );
        assert_eq!(
            err("d,serial=a,serial=b"),
            (o("serial=b"), "given twice".into())
        );
        assert_eq!(err("d,serial=").1, "needs a value");
        assert!(err("d,serial=a b").1.contains("printable ASCII"));
        assert!(err("d,serial=caf\u{e9}").1.contains("printable ASCII"));
        assert_eq!(
            err("d,serial=123456789012345678901").1,
            "at most 20 characters"
        );
        assert!(err("d,wwn=0x5000").1.contains("16 hex digits"));
        assert!(err("d,wwn=0x5000c5001234567g").1.contains("16 hex digits"));
        assert!(err("d,wwn=+x5000c500123456789").1.contains("16 hex digits"));
        assert!(err("d,wwn=0x6000c50012345678").1.contains("NAA type"));
        assert!(err("d,wwn=0x1000c50012345678").1.contains("NAA type"));
        assert!(err("d,").1.starts_with("empty option"));
        assert!(err("d,,,").1.starts_with("empty option"));
        assert!(
            err("d,ro,,").1.starts_with("unknown option"),
            "\"ro,\" is one option"
        );
        let e = parse(",ro").unwrap_err();
        assert_eq!((e.image.as_str(), e.option), (",ro", None));
        assert_eq!(
            parse("").unwrap_err().reason,
            "no image path before the options"
        );
    }

    #[test]
    fn error_message() {
        let e = parse("disk.raw,block-size=1000").unwrap_err();
        assert_eq!(e.image, "disk.raw");
        assert_eq!(e.to_string(), "block-size=1000: must be 512 or 4096");
        let e = parse(",ro").unwrap_err();
        assert_eq!(e.to_string(), "no image path before the options");
    }
}
