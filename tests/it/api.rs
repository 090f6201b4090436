//! The management API over a real Unix socket, against a mock LUN manager:
//! clients served side by side, the limits (line length, clients), bad
//! bytes, the socket's set-up, and `vhost-device-scsi-ctl` as a process.
//! JSON-RPC codes are written out as the specification and docs/api.md
//! give them.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_device_scsi::api::{self, LunInfo, Management, MethodError};
use vhost_device_scsi::daemon::{self, SocketAccess, SocketGroup, SocketRole};

const CTL: &str = env!("CARGO_BIN_EXE_vhost-device-scsi-ctl");

/// How long any read in these tests may wait before the test fails.
const PATIENCE: Duration = Duration::from_secs(5);

/// Records calls; `lun_remove` of LUN 1 waits at a gate the test opens.
#[derive(Default)]
struct Mock {
    calls: Mutex<Vec<String>>,
    /// (a lun_remove of LUN 1 is waiting, the gate is open)
    gate: Mutex<(bool, bool)>,
    gate_changed: Condvar,
}

impl Mock {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// Waits until a `lun_remove` of LUN 1 is inside the mock.
    fn wait_for_waiter(&self) {
        let gate = self.gate.lock().unwrap();
        let (gate, timeout) = self
            .gate_changed
            .wait_timeout_while(gate, PATIENCE, |(waiting, _)| !*waiting)
            .unwrap();
        assert!(!timeout.timed_out() && gate.0, "lun_remove never called");
    }

    fn open_gate(&self) {
        self.gate.lock().unwrap().1 = true;
        self.gate_changed.notify_all();
    }
}

impl Management for Mock {
    fn lun_add(&self, image: &str, lun: Option<u16>) -> Result<u16, MethodError> {
        self.record(format!("lun_add {image} {lun:?}"));
        Ok(lun.unwrap_or(0))
    }

    fn lun_remove(&self, lun: u16) -> Result<(), MethodError> {
        self.record(format!("lun_remove {lun}"));
        match lun {
            1 => {
                let mut gate = self.gate.lock().unwrap();
                gate.0 = true;
                self.gate_changed.notify_all();
                let (_gate, timeout) = self
                    .gate_changed
                    .wait_timeout_while(gate, PATIENCE, |(_, open)| !*open)
                    .unwrap();
                assert!(!timeout.timed_out(), "the gate was never opened");
                Ok(())
            }
            9 => Err(MethodError::no_such_lun(9)),
            _ => Ok(()),
        }
    }

    fn lun_resize(&self, lun: u16, size: Option<u64>, shrink: bool) -> Result<u64, MethodError> {
        self.record(format!("lun_resize {lun} {size:?} {shrink}"));
        Ok(size.unwrap_or(4096))
    }

    fn lun_list(&self) -> Vec<LunInfo> {
        vec![LunInfo {
            lun: 0,
            image: "/img/a.raw".into(),
            size: 1 << 20,
            block_size: 512,
            read_only: false,
            serial: "S0".into(),
            naa: "0x5001405f00000001".into(),
        }]
    }

    fn stats(&self) -> Value {
        json!([])
    }
}

/// A mock manager served on a socket in a temporary directory.
struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    mock: Arc<Mock>,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mock = Arc::new(Mock::default());
        api::serve(listener, mock.clone()).unwrap();
        Server {
            _dir: dir,
            path,
            mock,
        }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.path)
    }
}

struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_write_timeout(Some(PATIENCE)).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next reply line, parsed.
    fn reply(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "a whole line: {line:?}");
        serde_json::from_str(&line).unwrap()
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let line = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
        self.send(format!("{line}\n").as_bytes());
        self.reply()
    }

    /// Asserts that the server closed the connection (end of file, or a
    /// reset for the bytes it left unread).
    fn assert_closed(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest)),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
    }
}

/// Asserts that `reply` is error `code` with id `id`.
fn assert_error(reply: &Value, code: i64, id: Value) {
    assert_eq!(reply["jsonrpc"], "2.0", "{reply}");
    assert_eq!(reply["error"]["code"], code, "{reply}");
    assert_eq!(reply["id"], id, "{reply}");
}

fn assert_version(reply: &Value) {
    assert_eq!(reply["result"]["name"], "vhost-device-scsi", "{reply}");
    assert_eq!(reply["id"], 1, "{reply}");
}

/// A client inside a slow call holds up no other client.
#[test]
fn api_clients_are_served_side_by_side() {
    let server = Server::start();
    let mut slow = server.connect();
    slow.send(b"{\"jsonrpc\": \"2.0\", \"method\": \"lun_remove\", \"params\": {\"lun\": 1}, \"id\": 1}\n");
    server.mock.wait_for_waiter();
    let mut quick = server.connect();
    assert_version(&quick.call("version", json!({})));
    assert_eq!(
        quick.call("lun_remove", json!({"lun": 2}))["result"],
        json!({"lun": 2})
    );
    server.mock.open_gate();
    assert_eq!(slow.reply()["result"], json!({"lun": 1}));
    assert_eq!(server.mock.calls(), ["lun_remove 1", "lun_remove 2"]);
}

/// A line over 1 MiB: a parse error, and the connection is closed; the
/// server goes on. A line of exactly 1 MiB is read.
#[test]
fn api_an_over_long_line_is_refused() {
    let server = Server::start();
    let mut client = server.connect();
    client.send(&vec![b' '; (1 << 20) + 1]);
    assert_error(&client.reply(), -32700, Value::Null);
    client.assert_closed();
    // 1 MiB exactly, request and padding, is served.
    let mut client = server.connect();
    let request = br#"{"jsonrpc": "2.0", "method": "version", "id": 1}"#;
    let mut line = request.to_vec();
    line.resize(1 << 20, b' ');
    line.push(b'\n');
    client.send(&line);
    assert_version(&client.reply());
}

/// Garbage and invalid UTF-8 are parse errors; the connection and the
/// server go on.
#[test]
fn api_garbage_is_a_parse_error() {
    let server = Server::start();
    let mut client = server.connect();
    client.send(b"\xff\xfe\x00garbage\n");
    assert_error(&client.reply(), -32700, Value::Null);
    client.send(b"{\"jsonrpc\": \"2.0\", \"method\": \"\xc3\x28\", \"id\": 1}\n");
    assert_error(&client.reply(), -32700, Value::Null);
    client.send(b"}{\n");
    assert_error(&client.reply(), -32700, Value::Null);
    // Blank lines get no reply; the next request is answered.
    client.send(b"\n  \r\n");
    assert_version(&client.call("version", json!({})));
    // A client that sends garbage and leaves.
    let mut rude = server.connect();
    rude.send(b"\x00\x01\x02");
    drop(rude);
    assert_version(&server.connect().call("version", json!({})));
    // A last line without a newline is answered before the close.
    let mut last = server.connect();
    last.send(br#"{"jsonrpc": "2.0", "method": "version", "id": 1}"#);
    last.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_version(&last.reply());
    last.assert_closed();
}

/// Sixteen clients are served; the seventeenth gets one error line
/// (-32000) and is closed; a place that frees up is taken again.
#[test]
fn api_the_seventeenth_client_is_refused() {
    let server = Server::start();
    let mut clients: Vec<Client> = (0..16).map(|_| server.connect()).collect();
    for client in &mut clients {
        assert_version(&client.call("version", json!({})));
    }
    let mut extra = server.connect();
    let reply = extra.reply();
    assert_error(&reply, -32000, Value::Null);
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many clients"),
        "{reply}"
    );
    extra.assert_closed();
    drop(clients.pop());
    // The server notices the departure on its own time.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut client = server.connect();
        // A refused client may find its side shut before it writes.
        let request = json!({"jsonrpc": "2.0", "method": "version", "id": 1});
        let _ = client.stream.write_all(format!("{request}\n").as_bytes());
        let reply = client.reply();
        if reply.get("result").is_some() {
            break;
        }
        assert_error(&reply, -32000, Value::Null);
        assert!(Instant::now() < deadline, "the freed place was never given");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client that sends requests and never reads the replies blocks only
/// itself.
#[test]
fn api_a_client_that_never_reads_blocks_only_itself() {
    let server = Server::start();
    let deaf = UnixStream::connect(&server.path).unwrap();
    deaf.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let request = format!(
        "{}\n",
        json!({"jsonrpc": "2.0", "method": "lun_list", "id": 1})
    );
    // Until its own writes stop going through: the server is stuck
    // writing replies to it.
    let many = request.repeat(50_000);
    let _ = (&deaf).write_all(many.as_bytes());
    let mut other = server.connect();
    assert_version(&other.call("version", json!({})));
}

/// The ctl binary against the mock: results on stdout, errors one line on
/// stderr, exit statuses 0, 1 and 2.
#[test]
fn api_ctl_binary() {
    let server = Server::start();
    let ctl = |args: &[&str]| -> Output {
        Command::new(CTL)
            .arg("--api-socket")
            .arg(&server.path)
            .args(args)
            .output()
            .unwrap()
    };
    let out = ctl(&["version"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed,
        json!({"name": "vhost-device-scsi", "version": env!("CARGO_PKG_VERSION")})
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).lines().count() > 1,
        "pretty"
    );
    let out = ctl(&["lun_add", "image=/img/d1.raw,ro", "lun=2"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!({"lun": 2})
    );
    let out = ctl(&["lun_resize", "lun=1", "size=1G", "shrink=true"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!({"lun": 1, "size": 1073741824})
    );
    let out = ctl(&["--params", r#"{"lun": 3, "size": 512}"#, "lun_resize"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = ctl(&["lun_list"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["luns"][0]["naa"], "0x5001405f00000001");
    assert_eq!(
        server.mock.calls(),
        [
            "lun_add /img/d1.raw,ro Some(2)",
            "lun_resize 1 Some(1073741824) true",
            "lun_resize 3 Some(512) false",
        ]
    );
    // The daemon's errors.
    let out = ctl(&["lun_remove", "lun=9"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "vhost-device-scsi-ctl: error: LUN 9: no such LUN (code -32001)\n"
    );
    assert!(out.stdout.is_empty());
    let out = ctl(&["lun_remove", "lun=16384"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "vhost-device-scsi-ctl: error: lun: must be an integer from 0 to 16383, not 16384 (code -32602)\n"
    );
    let out = ctl(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).ends_with("(code -32601)\n"));
    // No daemon there: one line naming the socket.
    let missing = server.path.with_file_name("missing.sock");
    let out = Command::new(CTL)
        .args(["-s", missing.to_str().unwrap(), "version"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("vhost-device-scsi-ctl: error: cannot connect to ")
            && stderr.contains(missing.to_str().unwrap()),
        "{stderr}"
    );
    // Usage errors.
    for args in [
        &[][..],
        &["lun_remove", "lun"],
        &["lun_remove", "=1"],
        &["lun_remove", "lun=1", "lun=2"],
        &["--params", "[1]", "lun_remove"],
        &["--params", "{", "lun_remove"],
        &["--params", "{}", "lun_remove", "lun=1"],
    ] {
        let out = ctl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
    let out = Command::new(CTL).arg("version").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no socket: {out:?}");
}

/// The permission bits and group of the file at `path`.
fn mode_and_group(path: &Path) -> (u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.gid())
}

/// The API socket gets the vhost-user socket's treatment: the mode and
/// group asked for, a stale socket replaced, a live one and any other
/// file refused with errors naming --api-socket.
#[test]
fn api_socket_set_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    let access = |mode| SocketAccess {
        mode,
        group: Some(SocketGroup {
            name: gid.to_string(),
            gid,
        }),
    };
    for mode in [0o600, 0o660, 0o640, 0o666] {
        let listener = daemon::bind_unix(&path, &access(mode), SocketRole::Api).unwrap();
        assert_eq!(mode_and_group(&path), (mode, gid));
        // Live: refused, and left alone.
        let e = daemon::bind_unix(&path, &access(mode), SocketRole::Api).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "--api-socket {}: in use by a running process",
                path.display()
            )
        );
        assert!(UnixStream::connect(&path).is_ok());
        // Stale once its listener is gone: replaced.
        drop(listener);
        assert!(path.exists());
    }
    let listener = daemon::bind_unix(
        &path,
        &SocketAccess {
            mode: 0o600,
            group: None,
        },
        SocketRole::Api,
    )
    .unwrap();
    assert_eq!(mode_and_group(&path), (0o600, gid));
    api::serve(listener, Arc::new(Mock::default())).unwrap();
    assert_version(&Client::connect(&path).call("version", json!({})));
    // Not a socket: refused, and never removed.
    let file = dir.path().join("regular");
    std::fs::write(&file, b"keep").unwrap();
    let e = daemon::bind_unix(&file, &access(0o600), SocketRole::Api).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "--api-socket {}: exists and is not a socket",
            file.display()
        )
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // The vhost-user socket's errors keep their wording.
    let e = daemon::bind_unix(&file, &access(0o600), SocketRole::Vhost).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("socket path {}: exists and is not a socket", file.display())
    );
}
