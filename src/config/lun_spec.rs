//! The `IMAGE[,OPTIONS]` syntax of a LUN: an image path and its per-LUN
//! options, parsed without clap, so that the command line and anything
//! else that adds LUNs share one syntax and one set of messages.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Most images one daemon serves: LUNs 0..=16383, every LUN that flat
/// space addressing (SAM-5 §4.6.10, 14 bits) can express.
pub const MAX_IMAGES: usize = crate::scsi::lun::MAX_LUN as usize + 1;

/// Longest `serial=` value. VPD page 80h has room for more, but 20
/// characters is what ATA and most initiator tools expect of a serial.
pub(crate) const MAX_SERIAL_LEN: usize = 20;

/// Where a LUN's blocks are: a local image, or a URI naming storage on
/// the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// A regular file or block device.
    Local,
    /// `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`: an
    /// emulated disk over an NBD client.
    Nbd,
    /// `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN`: a
    /// passthrough unit forwarding to a remote iSCSI logical unit.
    Iscsi,
}

/// The per-LUN options only network LUNs take, with the kinds that take
/// them.
const NETWORK_OPTIONS: [(&str, &[ImageSource]); 6] = [
    ("unfiltered", &[ImageSource::Iscsi]),
    ("user", &[ImageSource::Iscsi]),
    ("password-file", &[ImageSource::Iscsi]),
    ("password-env", &[ImageSource::Iscsi]),
    ("connections", &[ImageSource::Nbd]),
    ("timeout", &[ImageSource::Nbd, ImageSource::Iscsi]),
];

/// Most connections to one NBD export (`connections=`).
pub const MAX_NBD_CONNECTIONS: u8 = 8;

/// One IMAGE argument: the image and its per-LUN options.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LunSpec {
    /// The image's path, or a network URI ([`LunSpec::source`]).
    pub path: PathBuf,
    /// `ro`: this LUN is read-only.
    pub read_only: bool,
    /// `block-size=`: logical block size, 512 or 4096.
    pub block_size: Option<u32>,
    /// `serial=`: unit serial number, overriding the derived one.
    pub serial: Option<String>,
    /// `wwn=`: NAA designator, overriding the derived one.
    pub wwn: Option<u64>,
    /// `unfiltered` (iSCSI): forward even the commands the passthrough
    /// filter keeps from the remote unit.
    #[serde(default)]
    pub unfiltered: bool,
    /// `user=` (iSCSI): the CHAP user, overriding the URI's.
    #[serde(default)]
    pub user: Option<String>,
    /// `password-file=` (iSCSI): the CHAP password is the file's first
    /// line.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `password-env=` (iSCSI): the CHAP password is this environment
    /// variable of the daemon.
    #[serde(default)]
    pub password_env: Option<String>,
    /// `connections=` (NBD): connections to the export, 1 to
    /// 8 (`MAX_NBD_CONNECTIONS`) (more than one if the server allows).
    #[serde(default)]
    pub connections: Option<u8>,
    /// `timeout=` (NBD, iSCSI): seconds a request may wait for the
    /// server, reconnection included, 1 to 3600.
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

impl ImageSource {
    /// Where the blocks of the LUN at `path` (an IMAGE argument's path or
    /// URI) are.
    pub fn of(path: &std::path::Path) -> ImageSource {
        source_of(path.as_os_str().as_bytes())
    }

    /// Whether the storage at `path` is reached over TCP (`nbd://`,
    /// `iscsi://`): the sandbox must let the daemon open TCP sockets.
    pub fn over_tcp(path: &std::path::Path) -> bool {
        match ImageSource::of(path) {
            ImageSource::Local => false,
            ImageSource::Iscsi => true,
            ImageSource::Nbd => !path.as_os_str().as_bytes().starts_with(b"nbd+unix://"),
        }
    }
}

impl LunSpec {
    /// Where the LUN's blocks are, from the path's form.
    pub fn source(&self) -> ImageSource {
        source_of(self.path.as_os_str().as_bytes())
    }

    /// `timeout=` as a duration, or `default`.
    pub fn timeout_or(&self, default: std::time::Duration) -> std::time::Duration {
        self.timeout_secs
            .map_or(default, |s| std::time::Duration::from_secs(u64::from(s)))
    }

    /// Whether the LUN's storage is reached over TCP (`nbd://`,
    /// `iscsi://`): the sandbox must let the daemon open TCP sockets.
    pub fn needs_tcp(&self) -> bool {
        ImageSource::over_tcp(&self.path)
    }

    /// The path or URI for messages and logs: a password in an iSCSI URI
    /// (`USER%PASSWORD@`) left out.
    pub fn display(&self) -> String {
        redact(&self.path.to_string_lossy())
    }
}

fn source_of(path: &[u8]) -> ImageSource {
    if path.starts_with(b"iscsi://") {
        ImageSource::Iscsi
    } else if path.starts_with(b"nbd://") || path.starts_with(b"nbd+") || path.starts_with(b"nbds")
    {
        // nbd+unix://, and the schemes the NBD URI standard names that the
        // client refuses with its own message (nbds://, nbd+vsock://).
        ImageSource::Nbd
    } else {
        ImageSource::Local
    }
}

/// `text` with the password of an `iscsi://USER%PASSWORD@...` URI left
/// out (the iSCSI backend's rule: [`crate::storage::iscsi::redact`]).
pub fn redact(text: &str) -> String {
    crate::storage::iscsi::redact(text)
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
        let image = redact(&String::from_utf8_lossy(&path));
        let source = source_of(&path);
        let fail = |option: Option<&str>, reason: &str| LunSpecError {
            image: if path.is_empty() {
                redact(&arg.to_string_lossy())
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
            let network = NETWORK_OPTIONS.iter().find(|(n, _)| *n == name);
            if !matches!(name, "ro" | "block-size" | "serial" | "wwn") && network.is_none() {
                return Err(fail(
                    option,
                    "unknown option (known: ro, block-size=, serial=, wwn=; for nbd:// \
                     connections=, timeout=; for iscsi:// unfiltered, user=, password-file=, \
                     password-env=, timeout=)",
                ));
            }
            if let Some((_, kinds)) = network {
                if !kinds.contains(&source) {
                    return Err(fail(
                        option,
                        match kinds {
                            [ImageSource::Nbd] => "only for nbd:// and nbd+unix:// LUNs",
                            [ImageSource::Iscsi] => "only for iscsi:// LUNs",
                            _ => "only for nbd:// and iscsi:// LUNs",
                        },
                    ));
                }
            }
            if source == ImageSource::Iscsi && matches!(name, "block-size" | "serial" | "wwn") {
                return Err(fail(
                    option,
                    "not for iscsi:// LUNs: the remote unit reports its own",
                ));
            }
            if seen.iter().any(|s| s == name) {
                return Err(fail(option, "given twice"));
            }
            seen.push(name.to_string());
            if name == "ro" || name == "unfiltered" {
                if value.is_some() {
                    return Err(fail(option, "takes no value"));
                }
                if name == "ro" {
                    spec.read_only = true;
                } else {
                    spec.unfiltered = true;
                }
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
                "wwn" => spec.wwn = Some(parse_wwn(value).map_err(|r| fail(option, r))?),
                "user" => spec.user = Some(value.to_string()),
                "password-file" => spec.password_file = Some(PathBuf::from(value)),
                "password-env" => spec.password_env = Some(value.to_string()),
                "connections" => {
                    spec.connections = Some(
                        value
                            .parse::<u8>()
                            .ok()
                            .filter(|n| (1..=MAX_NBD_CONNECTIONS).contains(n))
                            .ok_or_else(|| fail(option, "must be from 1 to 8"))?,
                    )
                }
                _ => {
                    spec.timeout_secs = Some(
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|n| (1..=3600).contains(n))
                            .ok_or_else(|| fail(option, "must be whole seconds from 1 to 3600"))?,
                    )
                }
            }
        }
        if spec.password_file.is_some() && spec.password_env.is_some() {
            return Err(fail(
                Some("password-env"),
                "password-file= and password-env= are exclusive",
            ));
        }
        Ok(spec)
    }
}

/// `PATH[,OPTION]...` from a string, as [`LunSpec::parse`].
impl std::str::FromStr for LunSpec {
    type Err = LunSpecError;

    fn from_str(s: &str) -> Result<LunSpec, LunSpecError> {
        LunSpec::parse(OsStr::new(s))
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
                ..LunSpec::default()
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
    fn network_uris_and_their_options() {
        let spec =
            parse("nbd+unix:///disk?socket=/run/nbd.sock,connections=4,timeout=60,ro").unwrap();
        assert_eq!(spec.source(), ImageSource::Nbd);
        assert_eq!(
            spec.path,
            PathBuf::from("nbd+unix:///disk?socket=/run/nbd.sock")
        );
        assert_eq!(
            (spec.connections, spec.timeout_secs, spec.read_only),
            (Some(4), Some(60), true)
        );
        assert_eq!(
            parse("nbd://10.0.0.1/x").unwrap().source(),
            ImageSource::Nbd
        );
        let spec = parse(
            "iscsi://10.0.0.2/iqn.2026-01.com.example:t/1,unfiltered,user=u,password-file=/etc/p",
        )
        .unwrap();
        assert_eq!(spec.source(), ImageSource::Iscsi);
        assert!(spec.unfiltered);
        assert_eq!(spec.user.as_deref(), Some("u"));
        assert_eq!(spec.password_file, Some(PathBuf::from("/etc/p")));
        assert_eq!(parse("/img/nbd.raw").unwrap().source(), ImageSource::Local);
        let o = |s: &str| Some(s.to_string());
        assert_eq!(
            err("d.raw,connections=2"),
            (
                o("connections=2"),
                "only for nbd:// and nbd+unix:// LUNs".into()
            )
        );
        assert_eq!(
            err("nbd://h/e,unfiltered"),
            (o("unfiltered"), "only for iscsi:// LUNs".into())
        );
        assert_eq!(
            err("d.raw,timeout=5").1,
            "only for nbd:// and iscsi:// LUNs"
        );
        assert_eq!(err("nbd://h/e,connections=9").1, "must be from 1 to 8");
        assert_eq!(err("nbd://h/e,connections=0").1, "must be from 1 to 8");
        assert_eq!(
            err("nbd://h/e,timeout=0").1,
            "must be whole seconds from 1 to 3600"
        );
        assert_eq!(
            err("iscsi://h/t/1,block-size=4096").1,
            "not for iscsi:// LUNs: the remote unit reports its own"
        );
        assert_eq!(
            err("iscsi://h/t/1,password-file=/a,password-env=B").1,
            "password-file= and password-env= are exclusive"
        );
    }

    #[test]
    fn a_password_in_a_uri_never_shows() {
        let spec = parse("iscsi://alice%s3cret@10.0.0.2:3261/iqn.x:t/1").unwrap();
        assert_eq!(spec.display(), "iscsi://alice@10.0.0.2:3261/iqn.x:t/1");
        let e = parse("iscsi://alice%s3cret@h/iqn.x:t/1,bogus").unwrap_err();
        assert!(!e.image.contains("s3cret"), "{}", e.image);
        // A '%' in the password and an '@' too: cut up to the last '@'.
        assert_eq!(redact("iscsi://bob%p%@ss@h/t/0"), "iscsi://bob@h/t/0");
        // A base64 secret with '/' in it.
        assert_eq!(
            redact("iscsi://u%Zm9v/YmFy@h/iqn.x:t/1"),
            "iscsi://u@h/iqn.x:t/1"
        );
        let e = parse("iscsi://u%Zm9v/YmFy@h/iqn.x:t/1,bogus").unwrap_err();
        assert!(!e.image.contains("YmFy"), "{}", e.image);
        assert_eq!(redact("iscsi://h/t/0"), "iscsi://h/t/0");
        assert_eq!(redact("/img/a%b@c.raw"), "/img/a%b@c.raw");
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
