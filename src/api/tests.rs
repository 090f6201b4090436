//! The protocol against a mock LUN manager: every error case, with the
//! JSON-RPC 2.0 codes written out as the specification gives them (never
//! taken from the module's constants).

use std::sync::Mutex;

use serde_json::{json, Value};

use super::protocol::handle_line;
use super::{LunInfo, Management, MethodError};

/// Records every call; answers from a fixed script.
#[derive(Default)]
struct Mock {
    calls: Mutex<Vec<String>>,
}

impl Mock {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Management for Mock {
    fn lun_add(&self, image: &str, lun: Option<u16>) -> Result<u16, MethodError> {
        self.record(format!("lun_add {image} {lun:?}"));
        match (image, lun) {
            ("locked.raw", _) => Err(MethodError::image(
                "image locked.raw: locked by another process",
            )),
            (_, Some(3)) => Err(MethodError::lun_in_use(3)),
            (_, Some(lun)) => Ok(lun),
            (_, None) => Ok(7),
        }
    }

    fn lun_remove(&self, lun: u16) -> Result<(), MethodError> {
        self.record(format!("lun_remove {lun}"));
        match lun {
            9 => Err(MethodError::no_such_lun(9)),
            13 => panic!("a bug in the LUN manager"),
            14 => Err(MethodError::no_such_lun(14).with_message("two\nlines\r")),
            _ => Ok(()),
        }
    }

    fn lun_resize(&self, lun: u16, size: Option<u64>, shrink: bool) -> Result<u64, MethodError> {
        self.record(format!("lun_resize {lun} {size:?} {shrink}"));
        match size {
            Some(size) if size % 512 != 0 => Err(MethodError::invalid_params(format!(
                "size {size}: not a multiple of the block size (512)"
            ))),
            Some(size) => Ok(size),
            None if lun == 2 => Err(MethodError::not_supported(
                "LUN 2: a block device cannot grow",
            )),
            None => Ok(1 << 20),
        }
    }

    fn lun_list(&self) -> Vec<LunInfo> {
        self.record("lun_list".into());
        vec![LunInfo {
            lun: 0,
            image: "/img/a.raw".into(),
            size: 1 << 30,
            block_size: 4096,
            read_only: true,
            serial: "ABC".into(),
            naa: "0x5001405f00c0ffee".into(),
        }]
    }

    fn stats(&self) -> Value {
        self.record("stats".into());
        json!([{"lun": 0, "reads": 5}])
    }
}

impl MethodError {
    fn with_message(mut self, message: &str) -> MethodError {
        self.message = message.into();
        self
    }
}

/// The reply to `line`, parsed, checked to be one line.
fn reply(mock: &Mock, line: &str) -> Option<Value> {
    handle_line(line.as_bytes(), mock).map(|text| {
        assert!(!text.contains('\n'), "{text}");
        serde_json::from_str(&text).unwrap()
    })
}

/// The result of a successful call with id 1.
fn result(mock: &Mock, line: &str) -> Value {
    let r = reply(mock, line).expect("a reply");
    assert_eq!(r["jsonrpc"], "2.0", "{r}");
    assert_eq!(r["id"], 1, "{r}");
    assert!(r.get("error").is_none(), "{r}");
    r["result"].clone()
}

/// Asserts that `line` is answered by error `code` with `id`; returns the
/// message.
fn error(mock: &Mock, line: &str, code: i64, id: Value) -> String {
    let r = reply(mock, line).unwrap_or_else(|| panic!("no reply to {line}"));
    assert_eq!(r["jsonrpc"], "2.0", "{line} → {r}");
    assert_eq!(r["error"]["code"], code, "{line} → {r}");
    assert_eq!(r["id"], id, "{line} → {r}");
    assert!(r.get("result").is_none(), "{line} → {r}");
    let message = r["error"]["message"].as_str().unwrap().to_string();
    assert!(
        !message.is_empty() && !message.contains(['\n', '\r']),
        "{message:?}"
    );
    message
}

/// `{"jsonrpc": "2.0", "method": METHOD, "params": PARAMS, "id": 1}`.
fn req(method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).to_string()
}

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;

#[test]
fn parse_errors_have_a_null_id() {
    let m = Mock::default();
    for line in [
        r#"{"jsonrpc": "2.0", "method": "version", "id": 1"#,
        "{",
        "nonsense",
        r#"{"jsonrpc": "2.0", "method": "version", "id": 1} x"#,
        r#"{"jsonrpc": "2.0", "method": "version", "id": 1}{}"#,
        "'single'",
    ] {
        let message = error(&m, line, PARSE_ERROR, Value::Null);
        assert!(message.starts_with("parse error"), "{message}");
    }
    // Not UTF-8.
    let r = handle_line(b"{\"method\": \"\xff\"}", &m).unwrap();
    let r: Value = serde_json::from_str(&r).unwrap();
    assert_eq!(r["error"]["code"], PARSE_ERROR);
    assert_eq!(r["id"], Value::Null);
    // Nesting deeper than the parser goes: an error, not a stack overflow.
    error(&m, &"[".repeat(100_000), PARSE_ERROR, Value::Null);
    assert!(m.calls().is_empty());
}

#[test]
fn invalid_requests() {
    let m = Mock::default();
    // Not an object: id null.
    for line in ["1", "\"version\"", "null", "true"] {
        error(&m, line, INVALID_REQUEST, Value::Null);
    }
    // The spec's own example: no id, still a reply, with id null.
    error(
        &m,
        r#"{"jsonrpc": "2.0", "method": 1, "params": "bar"}"#,
        INVALID_REQUEST,
        Value::Null,
    );
    for (line, id) in [
        (r#"{"method": "version", "id": 1}"#, json!(1)),
        (
            r#"{"jsonrpc": "1.0", "method": "version", "id": 1}"#,
            json!(1),
        ),
        (
            r#"{"jsonrpc": 2.0, "method": "version", "id": "a"}"#,
            json!("a"),
        ),
        (
            r#"{"jsonrpc": null, "method": "version", "id": 1}"#,
            json!(1),
        ),
        (r#"{"jsonrpc": "2.0", "id": 1}"#, json!(1)),
        (r#"{"jsonrpc": "2.0", "method": 1, "id": 1}"#, json!(1)),
        (r#"{"jsonrpc": "2.0", "method": null, "id": 1}"#, json!(1)),
        (
            r#"{"jsonrpc": "2.0", "method": ["version"], "id": 1}"#,
            json!(1),
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "version", "params": 5, "id": 1}"#,
            json!(1),
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "version", "params": "x", "id": 1}"#,
            json!(1),
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "version", "params": null, "id": 1}"#,
            json!(1),
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "version", "param": {}, "id": 1}"#,
            json!(1),
        ),
        // An id that is neither a string, a number nor null: id null.
        (
            r#"{"jsonrpc": "2.0", "method": "version", "id": {}}"#,
            Value::Null,
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "version", "id": [1]}"#,
            Value::Null,
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "version", "id": true}"#,
            Value::Null,
        ),
    ] {
        error(&m, line, INVALID_REQUEST, id);
    }
    assert!(m.calls().is_empty());
}

#[test]
fn ids_are_echoed() {
    let m = Mock::default();
    for id in [
        json!("abc"),
        json!(42),
        json!(-1.5),
        json!(0),
        Value::Null,
        json!(""),
    ] {
        let line = json!({"jsonrpc": "2.0", "method": "version", "id": id}).to_string();
        let r = reply(&m, &line).unwrap();
        assert_eq!(r["id"], id);
        assert_eq!(r["result"]["name"], "vhost-device-scsi");
        let line = json!({"jsonrpc": "2.0", "method": "nope", "id": id}).to_string();
        error(&m, &line, METHOD_NOT_FOUND, id);
    }
}

#[test]
fn unknown_methods() {
    let m = Mock::default();
    for method in ["nope", "Version", "lun-add", "", "lun_add "] {
        let message = error(&m, &req(method, json!({})), METHOD_NOT_FOUND, json!(1));
        assert!(message.contains("method not found"), "{message}");
    }
    // A method name of any length is quoted short.
    let long = "x".repeat(100_000);
    let message = error(&m, &req(&long, json!({})), METHOD_NOT_FOUND, json!(1));
    assert!(message.len() < 200, "{message}");
}

#[test]
fn invalid_params() {
    let m = Mock::default();
    for (method, params) in [
        // By position.
        ("lun_remove", json!([1])),
        ("version", json!([])),
        // Unknown names.
        ("version", json!({"x": 1})),
        ("lun_list", json!({"lun": 1})),
        ("stats", json!({"": 1})),
        ("lun_remove", json!({"lnu": 3})),
        ("lun_remove", json!({"lun": 3, "force": true})),
        ("lun_add", json!({"image": "a.raw", "read_only": true})),
        ("lun_resize", json!({"lun": 1, "bytes": 512})),
        // Missing.
        ("lun_add", json!({})),
        ("lun_add", json!({"lun": 1})),
        ("lun_remove", json!({})),
        ("lun_resize", json!({"size": 512})),
        // Wrong types.
        ("lun_add", json!({"image": 5})),
        ("lun_add", json!({"image": null})),
        ("lun_add", json!({"image": ["a.raw"]})),
        ("lun_add", json!({"image": ""})),
        ("lun_add", json!({"image": "a.raw", "lun": "1"})),
        ("lun_add", json!({"image": "a.raw", "lun": null})),
        ("lun_remove", json!({"lun": "3"})),
        ("lun_remove", json!({"lun": true})),
        ("lun_resize", json!({"lun": 1, "shrink": "yes"})),
        ("lun_resize", json!({"lun": 1, "shrink": 1})),
        // LUN out of range, negative, not an integer.
        ("lun_remove", json!({"lun": -1})),
        ("lun_remove", json!({"lun": 16384})),
        ("lun_remove", json!({"lun": 65536})),
        ("lun_remove", json!({"lun": 4294967296u64})),
        ("lun_remove", json!({"lun": u64::MAX})),
        ("lun_remove", json!({"lun": 1.0})),
        ("lun_remove", json!({"lun": 1.5})),
        ("lun_remove", json!({"lun": 1e30})),
        ("lun_add", json!({"image": "a.raw", "lun": -5})),
        ("lun_add", json!({"image": "a.raw", "lun": 16384})),
        // Sizes: negative, fractional, a string, beyond 64 bits.
        ("lun_resize", json!({"lun": 1, "size": -1})),
        ("lun_resize", json!({"lun": 1, "size": -512})),
        ("lun_resize", json!({"lun": 1, "size": 1.5})),
        ("lun_resize", json!({"lun": 1, "size": 512.0})),
        ("lun_resize", json!({"lun": 1, "size": "1G"})),
        ("lun_resize", json!({"lun": 1, "size": null})),
    ] {
        let line = req(method, params.clone());
        error(&m, &line, INVALID_PARAMS, json!(1));
    }
    // A number beyond 64 bits, as text (json! cannot write it).
    for size in ["18446744073709551616", "1e20", "99999999999999999999999"] {
        let line = format!(
            r#"{{"jsonrpc": "2.0", "method": "lun_resize", "params": {{"lun": 1, "size": {size}}}, "id": 1}}"#
        );
        error(&m, &line, INVALID_PARAMS, json!(1));
    }
    assert!(m.calls().is_empty(), "{:?}", m.calls());
    // What the messages say.
    let message = error(
        &m,
        &req("lun_remove", json!({"lun": 16384})),
        INVALID_PARAMS,
        json!(1),
    );
    assert_eq!(
        message,
        "lun: must be an integer from 0 to 16383, not 16384"
    );
    let message = error(
        &m,
        &req("lun_remove", json!({"lnu": 3})),
        INVALID_PARAMS,
        json!(1),
    );
    assert_eq!(message, "invalid params: unknown parameter \"lnu\"");
    let message = error(&m, &req("lun_add", json!({})), INVALID_PARAMS, json!(1));
    assert_eq!(message, "invalid params: missing parameter \"image\"");
    // A long value is quoted short.
    let long = "x".repeat(100_000);
    let message = error(
        &m,
        &req("lun_remove", json!({ "lun": long })),
        INVALID_PARAMS,
        json!(1),
    );
    assert!(message.len() < 200, "{message}");
}

#[test]
fn the_edges_of_the_ranges_are_accepted() {
    let m = Mock::default();
    assert_eq!(
        result(&m, &req("lun_remove", json!({"lun": 16383}))),
        json!({"lun": 16383})
    );
    assert_eq!(
        result(&m, &req("lun_remove", json!({"lun": 0}))),
        json!({"lun": 0})
    );
    assert_eq!(
        result(&m, &req("lun_resize", json!({"lun": 1, "size": 0}))),
        json!({"lun": 1, "size": 0})
    );
    // The largest size reaches the manager (which refuses it here).
    error(
        &m,
        &req("lun_resize", json!({"lun": 1, "size": u64::MAX})),
        INVALID_PARAMS,
        json!(1),
    );
    assert_eq!(
        m.calls(),
        [
            "lun_remove 16383",
            "lun_remove 0",
            "lun_resize 1 Some(0) false",
            "lun_resize 1 Some(18446744073709551615) false",
        ]
    );
}

#[test]
fn methods_and_their_results() {
    let m = Mock::default();
    assert_eq!(
        result(&m, &req("lun_add", json!({"image": "/img/d1.raw,ro"}))),
        json!({"lun": 7})
    );
    assert_eq!(
        result(&m, &req("lun_add", json!({"image": "a,,b.raw", "lun": 5}))),
        json!({"lun": 5})
    );
    assert_eq!(
        result(&m, &req("lun_remove", json!({"lun": 4}))),
        json!({"lun": 4})
    );
    assert_eq!(
        result(
            &m,
            &req(
                "lun_resize",
                json!({"lun": 1, "size": 4096, "shrink": true})
            )
        ),
        json!({"lun": 1, "size": 4096})
    );
    assert_eq!(
        result(&m, &req("lun_resize", json!({"lun": 1}))),
        json!({"lun": 1, "size": 1048576})
    );
    assert_eq!(
        result(&m, &req("lun_list", json!({}))),
        json!({"luns": [{
            "lun": 0,
            "image": "/img/a.raw",
            "size": 1073741824,
            "block_size": 4096,
            "read_only": true,
            "serial": "ABC",
            "naa": "0x5001405f00c0ffee",
        }]})
    );
    assert_eq!(
        result(&m, r#"{"jsonrpc": "2.0", "method": "stats", "id": 1}"#),
        json!({"luns": [{"lun": 0, "reads": 5}]})
    );
    assert_eq!(
        result(&m, r#"{"jsonrpc": "2.0", "method": "version", "id": 1}"#),
        json!({"name": "vhost-device-scsi", "version": env!("CARGO_PKG_VERSION")})
    );
    assert_eq!(
        m.calls(),
        [
            "lun_add /img/d1.raw,ro None",
            "lun_add a,,b.raw Some(5)",
            "lun_remove 4",
            "lun_resize 1 Some(4096) true",
            "lun_resize 1 None false",
            "lun_list",
            "stats",
        ]
    );
}

#[test]
fn method_errors_have_their_codes() {
    let m = Mock::default();
    for (line, code, message) in [
        (
            req("lun_remove", json!({"lun": 9})),
            -32001,
            "LUN 9: no such LUN",
        ),
        (
            req("lun_add", json!({"image": "a.raw", "lun": 3})),
            -32002,
            "LUN 3: in use",
        ),
        (
            req("lun_add", json!({"image": "locked.raw"})),
            -32003,
            "image locked.raw: locked by another process",
        ),
        (
            req("lun_resize", json!({"lun": 2})),
            -32004,
            "LUN 2: a block device cannot grow",
        ),
        (
            req("lun_resize", json!({"lun": 1, "size": 1000})),
            INVALID_PARAMS,
            "size 1000: not a multiple of the block size (512)",
        ),
        // Line breaks in a message become spaces.
        (req("lun_remove", json!({"lun": 14})), -32001, "two lines "),
    ] {
        assert_eq!(error(&m, &line, code, json!(1)), message);
    }
}

#[test]
fn a_panicking_method_is_an_internal_error() {
    let m = Mock::default();
    error(
        &m,
        &req("lun_remove", json!({"lun": 13})),
        INTERNAL_ERROR,
        json!(1),
    );
    // And the next call is served.
    assert_eq!(
        result(&m, &req("lun_remove", json!({"lun": 1}))),
        json!({"lun": 1})
    );
}

#[test]
fn notifications_run_without_a_reply() {
    let m = Mock::default();
    for line in [
        r#"{"jsonrpc": "2.0", "method": "lun_remove", "params": {"lun": 4}}"#,
        // Errors of a notification are not reported either.
        r#"{"jsonrpc": "2.0", "method": "lun_remove", "params": {"lun": 9}}"#,
        r#"{"jsonrpc": "2.0", "method": "lun_remove", "params": {"lun": 99999}}"#,
        r#"{"jsonrpc": "2.0", "method": "nope"}"#,
        r#"{"jsonrpc": "2.0", "method": "version"}"#,
    ] {
        assert_eq!(reply(&m, line), None, "{line}");
    }
    assert_eq!(m.calls(), ["lun_remove 4", "lun_remove 9"]);
}

#[test]
fn batches() {
    let m = Mock::default();
    // Replies in request order; none for the notification; an invalid
    // member gets its own error.
    let line = format!(
        "[{}, {}, 1, {}]",
        req("lun_remove", json!({"lun": 4})),
        r#"{"jsonrpc": "2.0", "method": "lun_remove", "params": {"lun": 5}}"#,
        r#"{"jsonrpc": "2.0", "method": "nope", "id": "b"}"#,
    );
    let r = reply(&m, &line).unwrap();
    let replies = r.as_array().unwrap();
    assert_eq!(replies.len(), 3, "{r}");
    assert_eq!(replies[0]["result"], json!({"lun": 4}));
    assert_eq!(replies[0]["id"], 1);
    assert_eq!(replies[1]["error"]["code"], INVALID_REQUEST);
    assert_eq!(replies[1]["id"], Value::Null);
    assert_eq!(replies[2]["error"]["code"], METHOD_NOT_FOUND);
    assert_eq!(replies[2]["id"], "b");
    assert_eq!(m.calls(), ["lun_remove 4", "lun_remove 5"]);
    // All notifications: no reply at all.
    let line =
        r#"[{"jsonrpc": "2.0", "method": "version"}, {"jsonrpc": "2.0", "method": "stats"}]"#;
    assert_eq!(reply(&m, line), None);
    // An empty batch: one invalid request, not an array.
    error(&m, "[]", INVALID_REQUEST, Value::Null);
    // A batch in a batch is an invalid member.
    let r = reply(&m, "[[]]").unwrap();
    assert_eq!(r[0]["error"]["code"], INVALID_REQUEST);
    // More than 1024 requests: one error, none run.
    let calls = m.calls().len();
    let one = req("lun_remove", json!({"lun": 1}));
    let line = format!("[{}]", vec![one.as_str(); 1025].join(","));
    error(&m, &line, INVALID_REQUEST, Value::Null);
    assert_eq!(m.calls().len(), calls);
    let line = format!("[{}]", vec![one.as_str(); 1024].join(","));
    assert_eq!(reply(&m, &line).unwrap().as_array().unwrap().len(), 1024);
}

/// A manager whose `stats` reply is 4 MiB, counting its calls.
#[derive(Default)]
struct BigStats {
    calls: Mutex<usize>,
}

impl Management for BigStats {
    fn lun_add(&self, _: &str, _: Option<u16>) -> Result<u16, MethodError> {
        Err(MethodError::not_supported("not here"))
    }
    fn lun_remove(&self, _: u16) -> Result<(), MethodError> {
        Err(MethodError::not_supported("not here"))
    }
    fn lun_resize(&self, _: u16, _: Option<u64>, _: bool) -> Result<u64, MethodError> {
        Err(MethodError::not_supported("not here"))
    }
    fn lun_list(&self) -> Vec<LunInfo> {
        Vec::new()
    }
    fn stats(&self) -> Value {
        *self.calls.lock().unwrap() += 1;
        json!("x".repeat(4 << 20))
    }
}

/// Once a batch's replies pass 32 MiB (docs/api.md), the rest of the batch
/// is not executed: each request with an id gets -32005, a notification
/// nothing.
#[test]
fn a_batch_stops_executing_once_its_replies_pass_32_mib() {
    let big = BigStats::default();
    let mut batch: Vec<Value> = (1..=12)
        .map(|id| json!({"jsonrpc": "2.0", "method": "stats", "id": id}))
        .collect();
    batch.push(json!({"jsonrpc": "2.0", "method": "stats"}));
    let text = handle_line(Value::Array(batch).to_string().as_bytes(), &big).unwrap();
    let replies: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(replies.len(), 12, "the notification gets no reply");
    // Eight replies of 4 MiB and a little: the eighth passes 32 MiB.
    assert_eq!(*big.calls.lock().unwrap(), 8);
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r["id"], i + 1);
        if i < 8 {
            assert!(r.get("result").is_some(), "reply {}", i + 1);
        } else {
            assert_eq!(r["error"]["code"], -32005, "reply {}", i + 1);
        }
    }
}

#[test]
fn ctl_makes_a_relative_image_absolute_against_its_directory() {
    use super::client::absolute_image;
    use std::path::Path;
    let mut params = serde_json::Map::new();
    params.insert("image".into(), json!("d1.raw,ro"));
    absolute_image("lun_add", &mut params, Path::new("/srv/a,b/"));
    assert_eq!(params["image"], "/srv/a,,b/d1.raw,ro");
    // Absolute paths, other methods: unchanged.
    params.insert("image".into(), json!("/img/d2.raw"));
    absolute_image("lun_add", &mut params, Path::new("/srv"));
    assert_eq!(params["image"], "/img/d2.raw");
    params.insert("image".into(), json!("d3.raw"));
    absolute_image("lun_remove", &mut params, Path::new("/srv"));
    assert_eq!(params["image"], "d3.raw");
    // Network URIs: unchanged.
    for uri in [
        "nbd://10.0.0.1/e",
        "nbd+unix:///e?socket=/s",
        "iscsi://h/iqn.x:t/1",
    ] {
        params.insert("image".into(), json!(uri));
        absolute_image("lun_add", &mut params, Path::new("/srv"));
        assert_eq!(params["image"], uri);
    }
}
