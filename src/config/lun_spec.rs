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

/// One IMAGE argument: the image and its per-LUN options.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
