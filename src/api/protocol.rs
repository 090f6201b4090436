//! JSON-RPC 2.0 (<https://www.jsonrpc.org/specification>), one line at a
//! time: [`handle_line`] parses a request (or a batch of them), checks it,
//! calls the method on the [`Management`] implementation and returns the
//! reply line, or nothing for a notification (a request without `id`).
//!
//! What is accepted beyond the letter of the specification, and refused:
//! - an `id` is echoed in the reply whenever it is a valid one (a string,
//!   a number or null), also in an invalid-request error; otherwise the
//!   reply's `id` is null;
//! - a request object with a member other than `jsonrpc`, `method`,
//!   `params` and `id` is an invalid request (-32600), and so are `params`
//!   that are neither an object nor an array; parameters by position (an
//!   array) are invalid parameters (-32602): every method takes them by
//!   name;
//! - an unknown parameter name is invalid parameters, and so is a null
//!   value for an optional parameter (leave it out instead);
//! - batches are supported as the specification says (an array of
//!   replies in request order, none if all were notifications, an empty
//!   array is an invalid request), up to [`MAX_BATCH`] requests: a larger
//!   batch is answered by one invalid-request error and none of it runs.
//!
//! A panic in a method is caught and answered with -32603 (internal
//! error); the client and the daemon go on.

use std::panic::{catch_unwind, AssertUnwindSafe};

use log::{error, info, warn};
use serde_json::{json, Map, Value};

use super::{Management, MethodError, MAX_LUN};

/// Invalid JSON, or not UTF-8, or a line too long (`id` null).
pub const PARSE_ERROR: i64 = -32700;
/// Not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// No method of that name.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Parameters missing, unknown, of the wrong type or out of range.
pub const INVALID_PARAMS: i64 = -32602;
/// A method failed unexpectedly (a panic in it).
pub const INTERNAL_ERROR: i64 = -32603;
/// Sent to a client over the server's limit before it is disconnected.
pub const TOO_MANY_CLIENTS: i64 = -32000;

/// The most requests a batch may hold.
pub const MAX_BATCH: usize = 1024;
/// -32005: a batch's replies passed [`MAX_REPLY_BYTES`]; the request was
/// not executed.
pub const REPLY_TOO_LARGE: i64 = -32005;
/// Most bytes of a batch's replies before its remaining requests are
/// refused (one `stats` of 16384 LUNs is about 7 MiB): what sixteen
/// clients' batches can make the daemon hold stays bounded.
pub const MAX_REPLY_BYTES: usize = 32 << 20;

/// The longest excerpt of a client's value quoted in an error message.
const QUOTE_MAX: usize = 40;

/// A JSON-RPC error: its code and a one-line message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    /// The JSON-RPC error code.
    pub code: i64,
    /// What went wrong, one line.
    pub message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: one_line(&message.into()),
        }
    }

    fn invalid_params(message: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_PARAMS, message)
    }
}

impl From<MethodError> for RpcError {
    fn from(e: MethodError) -> RpcError {
        RpcError::new(e.code(), e.message)
    }
}

/// The reply to one line (without its `\n`), or `None` when there is none
/// to send (a notification, or a batch of them).
pub fn handle_line(line: &[u8], management: &dyn Management) -> Option<String> {
    let Ok(text) = std::str::from_utf8(line) else {
        return Some(error_line(
            &Value::Null,
            PARSE_ERROR,
            "parse error: not UTF-8",
        ));
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            return Some(error_line(
                &Value::Null,
                PARSE_ERROR,
                &format!("parse error: {e}"),
            ))
        }
    };
    match value {
        Value::Array(requests) if requests.is_empty() => Some(error_line(
            &Value::Null,
            INVALID_REQUEST,
            "invalid request: an empty batch",
        )),
        Value::Array(requests) if requests.len() > MAX_BATCH => Some(error_line(
            &Value::Null,
            INVALID_REQUEST,
            &format!(
                "invalid request: a batch of {} requests, at most {MAX_BATCH}",
                requests.len()
            ),
        )),
        Value::Array(requests) => {
            // Each reply is serialized as soon as it is made, and once they
            // pass MAX_REPLY_BYTES the rest of the batch is not executed.
            let mut out = String::from("[");
            let mut replies = 0usize;
            for request in requests {
                let reply = if out.len() > MAX_REPLY_BYTES {
                    // A notification (no `id`) gets no reply either way.
                    request.get("id").map(|id| {
                        error_reply(
                            id.clone(),
                            &RpcError::new(
                                REPLY_TOO_LARGE,
                                format!(
                                    "reply too large: the batch's replies passed {} MiB; request not executed, send it on its own",
                                    MAX_REPLY_BYTES >> 20
                                ),
                            ),
                        )
                    })
                } else {
                    handle_request(request, management)
                };
                if let Some(reply) = reply {
                    if replies > 0 {
                        out.push(',');
                    }
                    out.push_str(&reply.to_string());
                    replies += 1;
                }
            }
            out.push(']');
            (replies > 0).then_some(out)
        }
        request => handle_request(request, management).map(|reply| reply.to_string()),
    }
}

/// An error reply with `id`, as one line (without its `\n`).
pub fn error_line(id: &Value, code: i64, message: &str) -> String {
    error_reply(id.clone(), &RpcError::new(code, message)).to_string()
}

fn error_reply(id: Value, e: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "error": {"code": e.code, "message": e.message}, "id": id})
}

/// The reply object to one request, or `None` for a notification.
fn handle_request(request: Value, management: &dyn Management) -> Option<Value> {
    let request = match Request::parse(request) {
        Ok(request) => request,
        Err((id, e)) => return Some(error_reply(id, &e)),
    };
    let outcome = Call::parse(&request.method, request.params).and_then(|call| {
        // A panic in the LUN manager is its bug; the client gets an
        // internal error and the daemon goes on.
        catch_unwind(AssertUnwindSafe(|| call.run(management))).unwrap_or_else(|_| {
            error!("api: {}: the method panicked", request.method);
            Err(RpcError::new(
                INTERNAL_ERROR,
                "internal error: the method failed unexpectedly",
            ))
        })
    });
    let id = request.id?;
    Some(match outcome {
        Ok(result) => json!({"jsonrpc": "2.0", "result": result, "id": id}),
        Err(e) => error_reply(id, &e),
    })
}

/// A request object, checked.
struct Request {
    /// The id to echo; `None` for a notification.
    id: Option<Value>,
    method: String,
    /// `params` as given: an object, an array, or absent.
    params: Option<Value>,
}

impl Request {
    /// Checks the request object's members; an error carries the id to
    /// reply with (the request's, if valid, else null).
    fn parse(value: Value) -> Result<Request, (Value, RpcError)> {
        let Value::Object(mut members) = value else {
            return Err((
                Value::Null,
                RpcError::new(INVALID_REQUEST, "invalid request: not a JSON object"),
            ));
        };
        let id = match members.remove("id") {
            None => None,
            Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
            Some(other) => {
                return Err((
                    Value::Null,
                    RpcError::new(
                        INVALID_REQUEST,
                        format!(
                            "invalid request: id must be a string, a number or null, not {}",
                            quote(&other)
                        ),
                    ),
                ))
            }
        };
        let reply_id = id.clone().unwrap_or(Value::Null);
        let invalid = |message: String| (reply_id.clone(), RpcError::new(INVALID_REQUEST, message));
        match members.remove("jsonrpc") {
            Some(Value::String(v)) if v == "2.0" => {}
            Some(other) => {
                return Err(invalid(format!(
                    "invalid request: jsonrpc must be \"2.0\", not {}",
                    quote(&other)
                )))
            }
            None => return Err(invalid("invalid request: no jsonrpc member".into())),
        }
        let method = match members.remove("method") {
            Some(Value::String(method)) => method,
            Some(other) => {
                return Err(invalid(format!(
                    "invalid request: method must be a string, not {}",
                    quote(&other)
                )))
            }
            None => return Err(invalid("invalid request: no method member".into())),
        };
        let params = match members.remove("params") {
            None => None,
            Some(params @ (Value::Object(_) | Value::Array(_))) => Some(params),
            Some(other) => {
                return Err(invalid(format!(
                    "invalid request: params must be an object, not {}",
                    quote(&other)
                )))
            }
        };
        if let Some(name) = members.keys().next() {
            return Err(invalid(format!(
                "invalid request: unknown member {}",
                quote(&Value::String(name.clone()))
            )));
        }
        Ok(Request { id, method, params })
    }
}

/// A method call with its parameters, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    LunAdd {
        image: String,
        lun: Option<u16>,
    },
    LunRemove {
        lun: u16,
    },
    LunResize {
        lun: u16,
        size: Option<u64>,
        shrink: bool,
    },
    LunList,
    Stats,
    Version,
}

impl Call {
    /// The call of `method` with `params`: method not found, or invalid
    /// parameters.
    fn parse(method: &str, params: Option<Value>) -> Result<Call, RpcError> {
        let names: &[&str] = match method {
            "lun_add" => &["image", "lun"],
            "lun_remove" => &["lun"],
            "lun_resize" => &["lun", "size", "shrink"],
            "lun_list" | "stats" | "version" => &[],
            _ => {
                return Err(RpcError::new(
                    METHOD_NOT_FOUND,
                    format!(
                        "method not found: {}",
                        quote(&Value::String(method.to_string()))
                    ),
                ))
            }
        };
        let mut params = Params::new(params, names)?;
        Ok(match method {
            "lun_add" => {
                let image = required("image", params.string("image")?)?;
                if image.is_empty() {
                    return Err(RpcError::invalid_params("image: must not be empty"));
                }
                Call::LunAdd {
                    image,
                    lun: params.lun()?,
                }
            }
            "lun_remove" => Call::LunRemove {
                lun: required("lun", params.lun()?)?,
            },
            "lun_resize" => Call::LunResize {
                lun: required("lun", params.lun()?)?,
                size: params.size()?,
                shrink: params.bool("shrink")?.unwrap_or(false),
            },
            "lun_list" => Call::LunList,
            "stats" => Call::Stats,
            _ => Call::Version,
        })
    }

    /// Runs the call; mutating calls are logged (info, or warn when they
    /// fail).
    fn run(self, management: &dyn Management) -> Result<Value, RpcError> {
        match self {
            Call::LunAdd { image, lun } => {
                let asked = lun.map_or_else(|| "lowest free".to_string(), |l| l.to_string());
                // Logged without a password an iscsi:// URI may carry.
                let shown = crate::config::redact(&image);
                match management.lun_add(&image, lun) {
                    Ok(lun) => {
                        info!("api: lun_add image={shown:?} lun={asked} -> LUN {lun}");
                        Ok(json!({ "lun": lun }))
                    }
                    Err(e) => {
                        warn!("api: lun_add image={shown:?} lun={asked} failed: {e}");
                        Err(e.into())
                    }
                }
            }
            Call::LunRemove { lun } => match management.lun_remove(lun) {
                Ok(()) => {
                    info!("api: lun_remove lun={lun} -> removed");
                    Ok(json!({ "lun": lun }))
                }
                Err(e) => {
                    warn!("api: lun_remove lun={lun} failed: {e}");
                    Err(e.into())
                }
            },
            Call::LunResize { lun, size, shrink } => {
                let asked = size.map_or_else(|| "image size".to_string(), |s| s.to_string());
                match management.lun_resize(lun, size, shrink) {
                    Ok(size) => {
                        info!("api: lun_resize lun={lun} size={asked} shrink={shrink} -> {size} bytes");
                        Ok(json!({ "lun": lun, "size": size }))
                    }
                    Err(e) => {
                        warn!("api: lun_resize lun={lun} size={asked} shrink={shrink} failed: {e}");
                        Err(e.into())
                    }
                }
            }
            Call::LunList => Ok(json!({ "luns": management.lun_list() })),
            Call::Stats => Ok(json!({ "luns": management.stats() })),
            Call::Version => Ok(json!({
                "name": "vhost-device-scsi",
                "version": env!("CARGO_PKG_VERSION"),
            })),
        }
    }
}

/// A method's parameters by name, each taken once.
struct Params(Map<String, Value>);

impl Params {
    /// `params` (absent, or an object with no names but `names`).
    fn new(params: Option<Value>, names: &[&str]) -> Result<Params, RpcError> {
        let map = match params {
            None => Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(RpcError::invalid_params(
                    "invalid params: parameters are taken by name (an object), not by position",
                ))
            }
        };
        if let Some(unknown) = map.keys().find(|k| !names.contains(&k.as_str())) {
            return Err(RpcError::invalid_params(format!(
                "invalid params: unknown parameter {}",
                quote(&Value::String(unknown.clone()))
            )));
        }
        Ok(Params(map))
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, RpcError> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(RpcError::invalid_params(format!(
                "{name}: must be a string, not {}",
                quote(&other)
            ))),
        }
    }

    fn bool(&mut self, name: &str) -> Result<Option<bool>, RpcError> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(RpcError::invalid_params(format!(
                "{name}: must be true or false, not {}",
                quote(&other)
            ))),
        }
    }

    /// `lun`: an integer from 0 to [`MAX_LUN`].
    fn lun(&mut self) -> Result<Option<u16>, RpcError> {
        self.0
            .remove("lun")
            .map(|value| {
                value
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|&n| n <= MAX_LUN)
                    .ok_or_else(|| {
                        RpcError::invalid_params(format!(
                            "lun: must be an integer from 0 to {MAX_LUN}, not {}",
                            quote(&value)
                        ))
                    })
            })
            .transpose()
    }

    /// `size`: a whole number of bytes that fits 64 bits.
    fn size(&mut self) -> Result<Option<u64>, RpcError> {
        self.0
            .remove("size")
            .map(|value| {
                value.as_u64().ok_or_else(|| {
                    RpcError::invalid_params(format!(
                        "size: must be an integer number of bytes from 0 to {}, not {}",
                        u64::MAX,
                        quote(&value)
                    ))
                })
            })
            .transpose()
    }
}

/// A required parameter's value, or the error naming it.
fn required<T>(name: &str, value: Option<T>) -> Result<T, RpcError> {
    value.ok_or_else(|| {
        RpcError::invalid_params(format!("invalid params: missing parameter \"{name}\""))
    })
}

/// A client's value as JSON, cut to [`QUOTE_MAX`] characters: the error
/// message says what was sent without echoing a megabyte of it.
fn quote(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(QUOTE_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// `message` on one line: line breaks and other control characters become
/// spaces.
fn one_line(message: &str) -> String {
    message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
