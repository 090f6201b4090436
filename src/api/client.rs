//! The client side of the API, as `vhost-device-scsi-ctl` uses it:
//! `KEY=VALUE` arguments into parameters ([`parse_param`], [`params`]), one
//! request line ([`request_line`]), its reply ([`parse_reply`]), and the
//! whole exchange over the socket ([`call`]).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::protocol::RpcError;

/// The longest reply line read, in bytes: a `lun_list` of 16384 LUNs is a
/// few MiB; a reply longer than this is an error, not an allocation.
pub const MAX_REPLY: usize = 64 << 20;

/// The one request id the client uses.
const ID: u64 = 1;

/// Why a call did not give a result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {}: {source}", .path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: the daemon closed the connection without a reply", .path.display())]
    NoReply { path: PathBuf },
    #[error("{}: a reply longer than {MAX_REPLY} bytes", .path.display())]
    ReplyTooLong { path: PathBuf },
    #[error("{}: not a JSON-RPC reply: {reason}", .path.display())]
    BadReply { path: PathBuf, reason: String },
    /// The daemon answered with an error; shown as `MESSAGE (code N)`.
    #[error(transparent)]
    Rpc(RpcError),
}

/// What a reply line came to, before the socket's path is known.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyError {
    /// Not a JSON-RPC 2.0 reply, and why.
    Bad(String),
    /// The daemon's error.
    Rpc(RpcError),
}

/// One `KEY=VALUE` argument as a parameter: integers become JSON numbers,
/// `true` and `false` booleans, anything else a string (everything after
/// the first `=`, so `image=/var/lib/d1.raw,ro` is a string). `size`
/// also takes a K, M, G or T suffix (powers of 1024): `size=10G`.
pub fn parse_param(arg: &str) -> Result<(String, Value), String> {
    let Some((key, value)) = arg.split_once('=') else {
        return Err(format!("{arg:?}: not KEY=VALUE"));
    };
    if key.is_empty() {
        return Err(format!("{arg:?}: no KEY before ="));
    }
    let parsed = if let Ok(n) = value.parse::<u64>() {
        json!(n)
    } else if let Ok(n) = value.parse::<i64>() {
        json!(n)
    } else if let Some(n) = (key == "size").then(|| size_with_suffix(value)).flatten() {
        json!(n)
    } else if value == "true" || value == "false" {
        Value::Bool(value == "true")
    } else {
        Value::String(value.to_string())
    };
    Ok((key.to_string(), parsed))
}

/// `N` followed by K, M, G or T (either case): N times that power of 1024,
/// if it fits 64 bits.
fn size_with_suffix(value: &str) -> Option<u64> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let shift = match unit {
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return None,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// The parameters object of `pairs`; a key given twice is an error.
pub fn params(pairs: Vec<(String, Value)>) -> Result<Map<String, Value>, String> {
    let mut map = Map::new();
    for (key, value) in pairs {
        if map.contains_key(&key) {
            return Err(format!("parameter {key:?} given twice"));
        }
        map.insert(key, value);
    }
    Ok(map)
}

/// `--params JSON`: a JSON object.
pub fn parse_params_json(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("not a JSON object".to_string()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// `lun_add`'s `image` made absolute against `cwd` if it is relative: the
/// daemon refuses a relative path (its working directory is not the
/// client's). A comma in `cwd` is written `,,`, as IMAGE arguments want.
/// Network URIs (`nbd://`, `iscsi://`, ...) are left as they are.
pub fn absolute_image(method: &str, params: &mut Map<String, Value>, cwd: &Path) {
    if method != "lun_add" {
        return;
    }
    if let Some(Value::String(image)) = params.get_mut("image") {
        let local = crate::config::ImageSource::of(Path::new(image.as_str()))
            == crate::config::ImageSource::Local;
        if local && !image.is_empty() && !image.starts_with('/') {
            let dir = cwd.to_string_lossy().replace(',', ",,");
            *image = format!("{}/{image}", dir.trim_end_matches('/'));
        }
    }
}

/// The request line (without `\n`) calling `method` with `params`; empty
/// parameters are left out.
pub fn request_line(method: &str, params: &Map<String, Value>) -> String {
    let mut request = json!({"jsonrpc": "2.0", "method": method, "id": ID});
    if !params.is_empty() {
        request["params"] = Value::Object(params.clone());
    }
    request.to_string()
}

/// The `result` of a reply line, or the error it carries.
pub fn parse_reply(line: &[u8]) -> Result<Value, ReplyError> {
    let bad = |reason: &str| ReplyError::Bad(reason.to_string());
    let reply: Value = serde_json::from_slice(line).map_err(|e| ReplyError::Bad(e.to_string()))?;
    let Value::Object(mut reply) = reply else {
        return Err(bad("not an object"));
    };
    if reply.get("jsonrpc") != Some(&json!("2.0")) {
        return Err(bad("no \"jsonrpc\": \"2.0\""));
    }
    match (reply.remove("result"), reply.remove("error")) {
        (Some(result), None) => Ok(result),
        (None, Some(error)) => {
            let code = error.get("code").and_then(Value::as_i64);
            let message = error.get("message").and_then(Value::as_str);
            match (code, message) {
                (Some(code), Some(message)) => Err(ReplyError::Rpc(RpcError {
                    code,
                    message: message.to_string(),
                })),
                _ => Err(bad("an error without a code and message")),
            }
        }
        _ => Err(bad("neither a result nor an error")),
    }
}

/// Calls `method` with `params` on the API socket at `path`: one request,
/// one reply line, its result.
pub fn call(path: &Path, method: &str, params: &Map<String, Value>) -> Result<Value, ClientError> {
    let io_error = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let mut request = request_line(method, params);
    request.push('\n');
    stream.write_all(request.as_bytes()).map_err(io_error)?;
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_REPLY)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    BufReader::new(&stream)
        .take(limit)
        .read_until(b'\n', &mut line)
        .map_err(io_error)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REPLY {
        return Err(ClientError::ReplyTooLong {
            path: path.to_path_buf(),
        });
    } else if line.is_empty() {
        return Err(ClientError::NoReply {
            path: path.to_path_buf(),
        });
    }
    parse_reply(&line).map_err(|e| match e {
        ReplyError::Rpc(e) => ClientError::Rpc(e),
        ReplyError::Bad(reason) => ClientError::BadReply {
            path: path.to_path_buf(),
            reason,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_arguments() {
        let p = |arg: &str| parse_param(arg).unwrap();
        assert_eq!(p("lun=3"), ("lun".into(), json!(3)));
        assert_eq!(p("lun=-1"), ("lun".into(), json!(-1)));
        assert_eq!(p("shrink=true"), ("shrink".into(), json!(true)));
        assert_eq!(p("shrink=false"), ("shrink".into(), json!(false)));
        assert_eq!(
            p("image=/var/lib/img/d1.raw,ro"),
            ("image".into(), json!("/var/lib/img/d1.raw,ro"))
        );
        assert_eq!(p("image=a=b"), ("image".into(), json!("a=b")));
        assert_eq!(p("image="), ("image".into(), json!("")));
        assert_eq!(
            p("size=18446744073709551615"),
            ("size".into(), json!(u64::MAX))
        );
        for (text, bytes) in [
            ("1K", 1024u64),
            ("2k", 2048),
            ("3M", 3 << 20),
            ("10G", 10 << 30),
            ("1t", 1 << 40),
        ] {
            assert_eq!(p(&format!("size={text}")).1, json!(bytes), "{text}");
        }
        // No suffix for other keys, nor one that overflows or is not one.
        assert_eq!(p("lun=1K").1, json!("1K"));
        assert_eq!(p("size=16777216T").1, json!("16777216T"));
        assert_eq!(p("size=1.5G").1, json!("1.5G"));
        assert_eq!(p("size=G").1, json!("G"));
        assert_eq!(p("size=-1K").1, json!("-1K"));
        assert_eq!(p("size=1KB").1, json!("1KB"));
        assert!(parse_param("lun").is_err());
        assert!(parse_param("=3").is_err());
    }

    #[test]
    fn params_and_request() {
        let map = params(vec![
            ("image".into(), json!("a.raw")),
            ("lun".into(), json!(2)),
        ])
        .unwrap();
        let line = request_line("lun_add", &map);
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            json!({"jsonrpc": "2.0", "method": "lun_add", "params": {"image": "a.raw", "lun": 2}, "id": 1})
        );
        assert_eq!(
            serde_json::from_str::<Value>(&request_line("version", &Map::new())).unwrap(),
            json!({"jsonrpc": "2.0", "method": "version", "id": 1})
        );
        assert!(params(vec![("lun".into(), json!(1)), ("lun".into(), json!(2))]).is_err());
        assert_eq!(parse_params_json(r#"{"lun": 1}"#).unwrap()["lun"], json!(1));
        assert!(parse_params_json("[1]").is_err());
        assert!(parse_params_json("{").is_err());
    }

    #[test]
    fn replies() {
        assert_eq!(
            parse_reply(br#"{"jsonrpc":"2.0","result":{"lun":3},"id":1}"#),
            Ok(json!({"lun": 3}))
        );
        assert_eq!(
            parse_reply(br#"{"jsonrpc":"2.0","error":{"code":-32001,"message":"LUN 3: no such LUN"},"id":1}"#),
            Err(ReplyError::Rpc(RpcError {
                code: -32001,
                message: "LUN 3: no such LUN".into()
            }))
        );
        for bad in [
            &b"nonsense"[..],
            b"[]",
            br#"{"result":1,"id":1}"#,
            br#"{"jsonrpc":"2.0","id":1}"#,
            br#"{"jsonrpc":"2.0","result":1,"error":{"code":1,"message":"x"},"id":1}"#,
            br#"{"jsonrpc":"2.0","error":{"code":"x","message":"x"},"id":1}"#,
        ] {
            assert!(
                matches!(parse_reply(bad), Err(ReplyError::Bad(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // What the operator sees of a daemon's error.
        let e = ClientError::Rpc(RpcError {
            code: -32602,
            message: "lun: must be an integer from 0 to 16383, not 16384".into(),
        });
        assert_eq!(
            e.to_string(),
            "lun: must be an integer from 0 to 16383, not 16384 (code -32602)"
        );
    }
}
