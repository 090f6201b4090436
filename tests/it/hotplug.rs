//! LUNs added, removed and resized through the management API of the real
//! daemon binary (`--api-socket`), seen from a virtio-scsi driver: the
//! events on the event queue (virtio 1.2 §5.6.6.3), the unit attentions
//! (SAM-5 §5.14) over the request queue, the TMFs' unit attentions over
//! the control queue, the image released by `lun_remove`, the API's
//! errors and statistics, and LUNs coming and going under load.
//!
//! Expected bytes and codes are written out from the specifications
//! (virtio 1.2, SPC-4 Annex D, JSON-RPC 2.0 and docs/api.md), never taken
//! from the daemon's constants.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_scsi_frontend::cdb::{inquiry, read10, read_capacity16, report_luns, request_sense};
use vhost_scsi_frontend::sense::{assert_lun_not_supported, assert_sense, key_asc_ascq};
use vhost_scsi_frontend::{DriverConfig, Reply, ScsiFrontend};

use crate::common::Daemon;

const BLOCK: usize = 512;
/// Every image starts at 1 MiB.
const IMAGE_LEN: usize = 1 << 20;
/// How long an event that must come may take.
const EVENT_WAIT: Duration = Duration::from_secs(2);
/// How long to wait for an event that must not come.
const NO_EVENT_WAIT: Duration = Duration::from_millis(200);

// SCSI status (SAM-5) and sense keys (SPC-4 §4.5.6).
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const UNIT_ATTENTION: u8 = 0x06;
// TEST UNIT READY (SPC-4 §6.47).
const TUR: [u8; 6] = [0; 6];
// TMF subtypes (virtio 1.2 §5.6.6.2).
const TMF_I_T_NEXUS_RESET: u32 = 4;
const TMF_LOGICAL_UNIT_RESET: u32 = 5;

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// Byte `i` of image `n`: a pattern distinct per image and per block.
fn image_bytes(n: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / BLOCK) as u8).wrapping_mul(31) ^ (i as u8) ^ n.wrapping_mul(0x5b))
        .collect()
}

/// A daemon with an API socket, serving `start_images` of the images made
/// (image i at LUN i); `spare` more images exist for lun_add.
struct Env {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    api: PathBuf,
    images: Vec<PathBuf>,
    daemon: Daemon,
}

impl Env {
    fn new(start_images: usize, spare: usize, args: &[&str]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost.sock");
        let api = dir.path().join("api.sock");
        let images: Vec<PathBuf> = (0..start_images + spare)
            .map(|i| {
                let path = dir.path().join(format!("disk{i}.img"));
                std::fs::write(&path, image_bytes(i as u8, IMAGE_LEN)).unwrap();
                path
            })
            .collect();
        let mut all: Vec<&str> = vec!["--api-socket", api.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend(images[..start_images].iter().map(|p| p.to_str().unwrap()));
        let daemon = Daemon::start(&socket, &all);
        Env {
            _dir: dir,
            socket,
            api,
            images,
            daemon,
        }
    }

    fn image(&self, i: usize) -> &str {
        self.images[i].to_str().unwrap()
    }

    fn api(&self) -> Api {
        Api::connect(&self.api)
    }

    fn driver(&self, config: DriverConfig) -> ScsiFrontend {
        ScsiFrontend::connect(&self.socket, &config)
            .unwrap_or_else(|e| panic!("cannot set up the device: {e}"))
    }

    /// The daemon process has not exited.
    fn assert_running(&mut self) {
        assert!(
            self.daemon.process.try_wait().unwrap().is_none(),
            "the daemon exited"
        );
    }
}

fn hotplug_driver() -> DriverConfig {
    DriverConfig {
        hotplug: true,
        param_change: true,
        ..DriverConfig::default()
    }
}

/// A JSON-RPC 2.0 client over the API socket, one line each way.
struct Api {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Api {
    fn connect(path: &Path) -> Api {
        let deadline = Instant::now() + Duration::from_secs(5);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => panic!("API socket {path:?}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Api {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            next_id: 1,
        }
    }

    /// Sends `line` (a `\n` is added) and returns the reply line, parsed.
    fn raw(&mut self, line: &str) -> Value {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        assert!(reply.ends_with('\n'), "a reply is one line: {reply:?}");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
    }

    /// The whole reply to `method` with `params`.
    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let reply = self.raw(
            &json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}).to_string(),
        );
        assert_eq!(reply["jsonrpc"], "2.0", "{reply}");
        assert_eq!(reply["id"], id, "{reply}");
        reply
    }

    /// The result of a call that must succeed.
    #[track_caller]
    fn ok(&mut self, method: &str, params: Value) -> Value {
        let reply = self.request(method, params.clone());
        assert!(
            reply.get("error").is_none(),
            "{method} {params}: error {reply}"
        );
        reply["result"].clone()
    }

    /// The error code and message of a call that must fail.
    #[track_caller]
    fn err(&mut self, method: &str, params: Value) -> (i64, String) {
        let reply = self.request(method, params.clone());
        error_of(&reply, &format!("{method} {params}"))
    }
}

/// The code and message of an error reply; the message is one line.
#[track_caller]
fn error_of(reply: &Value, what: &str) -> (i64, String) {
    assert!(reply.get("result").is_none(), "{what}: succeeded: {reply}");
    let code = reply["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("{what}: no error code: {reply}"));
    let message = reply["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no message: {reply}"))
        .to_string();
    assert!(
        !message.is_empty() && !message.contains('\n'),
        "{what}: the message is one line: {message:?}"
    );
    (code, message)
}

/// One command on request queue 0.
fn cmd(fe: &mut ScsiFrontend, lun: u16, cdb: &[u8], data_in_len: u32) -> Reply {
    fe.queue(0)
        .unwrap()
        .command(lun, cdb, &[], data_in_len)
        .unwrap_or_else(|e| panic!("LUN {lun} command {cdb:02x?}: {e}"))
}

#[track_caller]
fn assert_good(reply: &Reply, what: &str) {
    assert_eq!(
        (reply.response, reply.status),
        (0, GOOD),
        "{what}: GOOD expected, sense {:02x?}",
        reply.sense
    );
}

/// CHECK CONDITION, UNIT ATTENTION with `asc`/`ascq`.
#[track_caller]
fn assert_ua(reply: &Reply, asc: u8, ascq: u8) {
    assert_sense(reply, UNIT_ATTENTION, asc, ascq);
}

/// `struct virtio_scsi_event` (virtio 1.2 §5.6.6.3) for target 0, `lun`
/// given as the two LUN bytes of REPORT LUNS.
fn event(event: u32, lun: [u8; 2], reason: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[..4].copy_from_slice(&event.to_le_bytes());
    e[4] = 1;
    e[5] = 0;
    e[6..8].copy_from_slice(&lun);
    e[12..].copy_from_slice(&reason.to_le_bytes());
    e
}

// VIRTIO_SCSI_T_TRANSPORT_RESET = 1 with EVT_RESET_RESCAN = 1 /
// EVT_RESET_REMOVED = 2; VIRTIO_SCSI_T_PARAM_CHANGE = 3 with ASC 2Ah
// (bits 0-7), ASCQ 09h (bits 8-15); EVENTS_MISSED = bit 31.
fn added(lun: [u8; 2]) -> [u8; 16] {
    event(1, lun, 1)
}
fn removed(lun: [u8; 2]) -> [u8; 16] {
    event(1, lun, 2)
}
fn capacity_changed(lun: [u8; 2]) -> [u8; 16] {
    event(3, lun, 0x0000_092a)
}
const EVENTS_MISSED: u32 = 0x8000_0000;

/// The next event, which must come, with the length the device gave.
#[track_caller]
fn next_event(fe: &mut ScsiFrontend) -> [u8; 16] {
    let (bytes, len) = fe
        .next_event(EVENT_WAIT)
        .unwrap()
        .unwrap_or_else(|| panic!("no event within {EVENT_WAIT:?}"));
    assert_eq!(len, 16, "used length of the event {bytes:02x?}");
    bytes
}

#[track_caller]
fn assert_no_event(fe: &mut ScsiFrontend) {
    if let Some(e) = fe.next_event(NO_EVENT_WAIT).unwrap() {
        panic!("unexpected event {e:02x?}");
    }
}

/// Grows (or shrinks) the file `path` to `len` bytes.
fn set_file_len(path: &Path, len: u64) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Tries to take an OFD write lock on all of `file` (without waiting): it
/// conflicts with any lock another open file description holds on it.
fn try_write_lock(file: &File) -> std::io::Result<()> {
    // SAFETY: a plain C struct of integers; all zeroes is valid (and l_pid
    // must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    // SAFETY: F_OFD_SETLK reads the one flock it is given.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The LUNs REPORT LUNS data lists (8 bytes each after an 8-byte header).
fn reported_luns(data: &[u8]) -> Vec<[u8; 8]> {
    let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    data[8..8 + len]
        .chunks(8)
        .map(|c| c.try_into().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

#[test]
fn events_for_added_resized_and_removed_luns() {
    let env = Env::new(1, 1, &[]);
    let mut fe = env.driver(hotplug_driver());
    let mut api = env.api();

    assert_eq!(
        api.ok("lun_add", json!({"image": env.image(1)})),
        json!({"lun": 1})
    );
    assert_eq!(next_event(&mut fe), added([0, 1]));

    // The operator grew the file; lun_resize without a size takes it.
    set_file_len(&env.images[1], 2 * IMAGE_LEN as u64);
    assert_eq!(
        api.ok("lun_resize", json!({"lun": 1})),
        json!({"lun": 1, "size": 2 * IMAGE_LEN})
    );
    assert_eq!(next_event(&mut fe), capacity_changed([0, 1]));
    // With a size, the daemon grows the file.
    assert_eq!(
        api.ok("lun_resize", json!({"lun": 1, "size": 3 * IMAGE_LEN})),
        json!({"lun": 1, "size": 3 * IMAGE_LEN})
    );
    assert_eq!(next_event(&mut fe), capacity_changed([0, 1]));
    assert_eq!(
        std::fs::metadata(&env.images[1]).unwrap().len(),
        3 * IMAGE_LEN as u64
    );
    // The same size again changes nothing: no event.
    api.ok("lun_resize", json!({"lun": 1, "size": 3 * IMAGE_LEN}));
    assert_no_event(&mut fe);

    assert_eq!(api.ok("lun_remove", json!({"lun": 1})), json!({"lun": 1}));
    assert_eq!(next_event(&mut fe), removed([0, 1]));

    // LUN 300 in flat space addressing (SAM-5 §4.7.7): 01b << 6 | 300 >> 8,
    // 300 & 0xff.
    assert_eq!(
        api.ok("lun_add", json!({"image": env.image(1), "lun": 300})),
        json!({"lun": 300})
    );
    assert_eq!(next_event(&mut fe), added([0x41, 0x2c]));
    assert_no_event(&mut fe);
}

#[test]
fn an_event_without_a_buffer_is_kept_and_the_next_one_says_events_missed() {
    let env = Env::new(1, 2, &[]);
    let mut fe = env.driver(DriverConfig {
        event_buffers: 0,
        ..hotplug_driver()
    });
    let mut api = env.api();
    api.ok("lun_add", json!({"image": env.image(1)}));
    api.ok("lun_add", json!({"image": env.image(2)}));
    assert_no_event(&mut fe);

    fe.post_event_buffer(0).unwrap();
    let mut first = added([0, 1]);
    first[..4].copy_from_slice(&(1 | EVENTS_MISSED).to_le_bytes());
    assert_eq!(next_event(&mut fe), first);
    // next_event posted buffer 0 again; the second event comes in it,
    // without EVENTS_MISSED.
    assert_eq!(next_event(&mut fe), added([0, 2]));
    fe.post_event_buffer(1).unwrap();
    assert_no_event(&mut fe);
}

/// A hostile driver's event buffers — shorter than an event, or
/// device-readable — are returned unused (used length 0) and the event
/// waits for a usable one (virtio 1.2 §5.6.6.3: buffers are at least an
/// event long); the daemon serves on.
#[test]
fn unusable_event_buffers_are_returned_empty_and_the_event_waits() {
    for (len, writable) in [(8, true), (16, false), (0, true)] {
        let mut env = Env::new(1, 1, &[]);
        let mut fe = env.driver(DriverConfig {
            event_buffers: 0,
            ..hotplug_driver()
        });
        let mut api = env.api();
        api.ok("lun_add", json!({"image": env.image(1)}));
        fe.post_event_descriptor(0, len, writable).unwrap();
        let what = format!("buffer of {len} bytes (writable: {writable})");
        let (_, used) = fe
            .next_event(EVENT_WAIT)
            .unwrap()
            .unwrap_or_else(|| panic!("{what} not returned"));
        assert_eq!(used, 0, "{what}");
        // next_event posted buffer 0 again, as a usable one: the event
        // comes in it, saying an event found no buffer.
        let mut first = added([0, 1]);
        first[..4].copy_from_slice(&(1 | EVENTS_MISSED).to_le_bytes());
        assert_eq!(next_event(&mut fe), first, "after the {what}");
        api.ok("lun_remove", json!({"lun": 1}));
        assert_eq!(next_event(&mut fe), removed([0, 1]), "after the {what}");
        let reply = cmd(&mut fe, 0, &TUR, 0);
        assert_eq!(
            reply.status, CHECK_CONDITION,
            "the LUN changes' unit attention"
        );
        assert_good(&cmd(&mut fe, 0, &TUR, 0), "TEST UNIT READY after it");
        env.assert_running();
    }
}

#[test]
fn no_events_without_the_features_but_the_unit_attention_is_there() {
    let env = Env::new(1, 1, &[]);
    let mut fe = env.driver(DriverConfig {
        hotplug: false,
        param_change: false,
        ..DriverConfig::default()
    });
    let mut api = env.api();
    api.ok("lun_add", json!({"image": env.image(1)}));
    assert_no_event(&mut fe);
    api.ok("lun_resize", json!({"lun": 1, "size": 2 * IMAGE_LEN}));
    assert_no_event(&mut fe);
    // REPORTED LUNS DATA HAS CHANGED (SPC-4 Annex D: 3Fh/0Eh).
    assert_ua(&cmd(&mut fe, 0, &TUR, 0), 0x3f, 0x0e);
}

// ---------------------------------------------------------------------------
// Unit attentions over the request queue
// ---------------------------------------------------------------------------

#[test]
fn lun_add_reports_luns_changed_once_on_each_other_lun_never_to_inquiry() {
    let env = Env::new(2, 1, &[]);
    let mut fe = env.driver(hotplug_driver());
    let mut api = env.api();
    assert_good(&cmd(&mut fe, 0, &TUR, 0), "TUR before");
    api.ok("lun_add", json!({"image": env.image(2)}));

    // INQUIRY neither reports nor clears it (SAM-5 §5.14).
    for _ in 0..2 {
        let r = cmd(&mut fe, 0, &inquiry(false, 0, 96), 96);
        assert_good(&r, "INQUIRY with a unit attention pending");
        assert_eq!(r.data_in[0], 0x00, "a direct-access block device");
    }
    assert_ua(&cmd(&mut fe, 0, &TUR, 0), 0x3f, 0x0e);
    assert_good(&cmd(&mut fe, 0, &TUR, 0), "TUR once reported");
    assert_ua(&cmd(&mut fe, 1, &read10(0, 1), 512), 0x3f, 0x0e);
    assert_good(&cmd(&mut fe, 1, &read10(0, 1), 512), "READ once reported");
    // Not on the LUN added.
    let r = cmd(&mut fe, 2, &read10(0, 1), 512);
    assert_good(&r, "READ of the new LUN");
    assert_eq!(r.data_in, image_bytes(2, IMAGE_LEN)[..512]);
}

#[test]
fn report_luns_lists_the_new_lun_and_clears_the_condition_on_every_lun() {
    let env = Env::new(2, 1, &[]);
    let mut fe = env.driver(hotplug_driver());
    let mut api = env.api();
    api.ok("lun_add", json!({"image": env.image(2)}));
    let r = cmd(&mut fe, 0, &report_luns(0, 4096), 4096);
    assert_good(&r, "REPORT LUNS");
    // Peripheral device addressing (SAM-5 §4.7.4): 00h, the LUN.
    assert_eq!(
        reported_luns(&r.data_in),
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0, 0, 0],
            [0, 2, 0, 0, 0, 0, 0, 0]
        ]
    );
    assert_good(&cmd(&mut fe, 0, &TUR, 0), "TUR of LUN 0 after REPORT LUNS");
    assert_good(&cmd(&mut fe, 1, &TUR, 0), "TUR of LUN 1 after REPORT LUNS");
}

#[test]
fn request_sense_returns_the_unit_attention_with_good_status_and_clears_it() {
    let env = Env::new(1, 1, &[]);
    let mut fe = env.driver(hotplug_driver());
    let mut api = env.api();
    api.ok("lun_add", json!({"image": env.image(1)}));
    let r = cmd(&mut fe, 0, &request_sense(0, 252), 252);
    assert_good(&r, "REQUEST SENSE");
    // Fixed format (DESC=0): current error, 70h.
    assert_eq!(r.data_in[0] & 0x7f, 0x70, "{:02x?}", &r.data_in[..18]);
    assert_eq!(key_asc_ascq(&r.data_in), (UNIT_ATTENTION, 0x3f, 0x0e));
    assert_good(&cmd(&mut fe, 0, &TUR, 0), "TUR after REQUEST SENSE");
    // With nothing pending, REQUEST SENSE returns NO SENSE.
    let r = cmd(&mut fe, 0, &request_sense(0, 252), 252);
    assert_good(&r, "REQUEST SENSE");
    assert_eq!(key_asc_ascq(&r.data_in), (0, 0, 0));
}

#[test]
fn lun_resize_reports_capacity_changed_once_and_read_capacity_shows_it() {
    let env = Env::new(2, 0, &[]);
    let mut fe = env.driver(hotplug_driver());
    let mut api = env.api();
    set_file_len(&env.images[0], 2 * IMAGE_LEN as u64);
    api.ok("lun_resize", json!({"lun": 0}));
    // CAPACITY DATA HAS CHANGED (2Ah/09h), once.
    assert_ua(&cmd(&mut fe, 0, &read10(0, 8), 4096), 0x2a, 0x09);
    let r = cmd(&mut fe, 0, &read10(0, 8), 4096);
    assert_good(&r, "READ once reported");
    assert_eq!(r.data_in, image_bytes(0, IMAGE_LEN)[..4096]);
    // SBC-3 §5.16.2: the last LBA, then the block length.
    let r = cmd(&mut fe, 0, &read_capacity16(32), 32);
    assert_good(&r, "READ CAPACITY(16)");
    let blocks = (2 * IMAGE_LEN / BLOCK) as u64;
    assert_eq!(r.data_in[..8], (blocks - 1).to_be_bytes());
    assert_eq!(r.data_in[8..12], 512u32.to_be_bytes());
    // A block of the grown part reads (zeroes).
    let r = cmd(&mut fe, 0, &read10(blocks as u32 - 1, 1), 512);
    assert_good(&r, "READ of the last block");
    assert_eq!(r.data_in, [0u8; 512]);
    // Not on the other LUN.
    assert_good(&cmd(&mut fe, 1, &TUR, 0), "TUR of LUN 1");

    // With a size: the daemon grows the file itself.
    api.ok("lun_resize", json!({"lun": 0, "size": 3 * IMAGE_LEN}));
    assert_ua(&cmd(&mut fe, 0, &read_capacity16(32), 32), 0x2a, 0x09);
    let r = cmd(&mut fe, 0, &read_capacity16(32), 32);
    assert_eq!(
        r.data_in[..8],
        ((3 * IMAGE_LEN / BLOCK) as u64 - 1).to_be_bytes()
    );
}

#[test]
fn a_removed_lun_is_not_supported_and_inquiry_says_no_logical_unit() {
    let env = Env::new(2, 0, &[]);
    let mut fe = env.driver(hotplug_driver());
    let mut api = env.api();
    assert_good(&cmd(&mut fe, 1, &read10(0, 1), 512), "READ before");
    api.ok("lun_remove", json!({"lun": 1}));
    // LOGICAL UNIT NOT SUPPORTED (05h/25h/00h).
    assert_lun_not_supported(&cmd(&mut fe, 1, &TUR, 0));
    assert_lun_not_supported(&cmd(&mut fe, 1, &read10(0, 1), 512));
    // SPC-4 §6.6.2: peripheral qualifier 011b, device type 1Fh.
    let r = cmd(&mut fe, 1, &inquiry(false, 0, 36), 36);
    assert_good(&r, "INQUIRY of the removed LUN");
    assert_eq!(r.data_in[0], 0x7f);
    // The remaining LUN has REPORTED LUNS DATA HAS CHANGED.
    assert_ua(&cmd(&mut fe, 0, &TUR, 0), 0x3f, 0x0e);
    let r = cmd(&mut fe, 0, &report_luns(0, 4096), 4096);
    assert_eq!(reported_luns(&r.data_in), [[0u8; 8]]);
}

#[test]
fn tmfs_over_the_control_queue_establish_their_unit_attentions() {
    let env = Env::new(2, 0, &[]);
    let mut fe = env.driver(hotplug_driver());
    let wait = Duration::from_secs(5);
    // VIRTIO_SCSI_S_OK = 0.
    assert_eq!(fe.tmf(TMF_LOGICAL_UNIT_RESET, 0, wait).unwrap(), 0);
    // BUS DEVICE RESET FUNCTION OCCURRED (29h/03h), on that LUN alone.
    assert_ua(&cmd(&mut fe, 0, &TUR, 0), 0x29, 0x03);
    assert_good(&cmd(&mut fe, 0, &TUR, 0), "TUR after it");
    assert_good(&cmd(&mut fe, 1, &TUR, 0), "TUR of LUN 1");

    assert_eq!(fe.tmf(TMF_I_T_NEXUS_RESET, 0, wait).unwrap(), 0);
    // I_T NEXUS LOSS OCCURRED (29h/07h), on every LUN.
    assert_ua(&cmd(&mut fe, 0, &TUR, 0), 0x29, 0x07);
    assert_ua(&cmd(&mut fe, 1, &read10(0, 1), 512), 0x29, 0x07);
    assert_good(&cmd(&mut fe, 0, &TUR, 0), "TUR of LUN 0 after it");
    assert_good(&cmd(&mut fe, 1, &TUR, 0), "TUR of LUN 1 after it");
}

#[test]
fn several_unit_attentions_are_reported_one_per_command_resets_first() {
    let env = Env::new(1, 1, &[]);
    let mut fe = env.driver(hotplug_driver());
    let mut api = env.api();
    let wait = Duration::from_secs(5);
    api.ok("lun_add", json!({"image": env.image(1)}));
    api.ok("lun_resize", json!({"lun": 0, "size": 2 * IMAGE_LEN}));
    assert_eq!(fe.tmf(TMF_I_T_NEXUS_RESET, 0, wait).unwrap(), 0);
    assert_eq!(fe.tmf(TMF_LOGICAL_UNIT_RESET, 0, wait).unwrap(), 0);
    for (asc, ascq) in [(0x29, 0x03), (0x29, 0x07), (0x2a, 0x09), (0x3f, 0x0e)] {
        assert_ua(&cmd(&mut fe, 0, &TUR, 0), asc, ascq);
    }
    assert_good(&cmd(&mut fe, 0, &TUR, 0), "TUR with nothing pending");
}

// ---------------------------------------------------------------------------
// lun_remove releases the image
// ---------------------------------------------------------------------------

#[test]
fn lun_remove_closes_the_image_and_it_can_be_added_again() {
    let env = Env::new(2, 0, &[]);
    let mut fe = env.driver(hotplug_driver());
    let mut api = env.api();
    assert_good(&cmd(&mut fe, 1, &read10(0, 8), 4096), "READ before");
    // The daemon holds its locks on the image while it serves it.
    let other = File::options()
        .read(true)
        .write(true)
        .open(&env.images[1])
        .unwrap();
    assert!(
        try_write_lock(&other).is_err(),
        "the daemon holds no lock on the image it serves"
    );
    api.ok("lun_remove", json!({"lun": 1}));
    // Once lun_remove answered, the image is closed: its locks are gone.
    try_write_lock(&other).expect("the image is still locked after lun_remove");
    drop(other);

    assert_eq!(
        api.ok("lun_add", json!({"image": env.image(1), "lun": 1})),
        json!({"lun": 1})
    );
    let r = cmd(&mut fe, 1, &read10(2, 8), 4096);
    assert_good(&r, "READ of the LUN added again");
    assert_eq!(r.data_in, image_bytes(1, IMAGE_LEN)[1024..1024 + 4096]);
}

// ---------------------------------------------------------------------------
// The API's errors and statistics against the real daemon
// ---------------------------------------------------------------------------

#[test]
fn api_errors_from_the_real_daemon() {
    let env = Env::new(1, 2, &[]);
    let mut api = env.api();

    // JSON-RPC 2.0 §5.1 codes.
    let reply = api.raw("{\"jsonrpc\": \"2.0\", \"method\": ");
    assert_eq!(error_of(&reply, "malformed JSON").0, -32700);
    assert_eq!(reply["id"], Value::Null);
    assert_eq!(api.err("no_such_method", json!({})).0, -32601);
    for (method, params) in [
        ("lun_remove", json!({"lun": "1"})),
        ("lun_remove", json!({"lun": 70000})),
        ("lun_remove", json!({})),
        ("lun_add", json!({"image": 5})),
        ("lun_add", json!({"image": env.image(1), "lun": 70000})),
        ("lun_add", json!({"image": env.image(1), "lun": -1})),
        ("lun_resize", json!({"lun": 0, "size": "big"})),
        ("lun_resize", json!({"lun": 0, "shrink": 1})),
        ("lun_list", json!({"extra": 1})),
    ] {
        assert_eq!(
            api.err(method, params.clone()).0,
            -32602,
            "{method} {params}"
        );
    }

    // docs/api.md's codes.
    let missing = env._dir.path().join("no-such-dir/missing.img");
    let (code, message) = api.err("lun_add", json!({"image": missing.to_str().unwrap()}));
    assert_eq!(code, -32003);
    assert!(
        message.contains(missing.to_str().unwrap()),
        "the message names the path: {message}"
    );
    // Locked by another process (this one): an OFD write lock on it all.
    let holder = File::options()
        .read(true)
        .write(true)
        .open(&env.images[2])
        .unwrap();
    try_write_lock(&holder).unwrap();
    let (code, message) = api.err("lun_add", json!({"image": env.image(2)}));
    assert_eq!(code, -32003, "{message}");
    drop(holder);
    assert_eq!(
        api.err("lun_add", json!({"image": env.image(1), "lun": 0}))
            .0,
        -32002
    );
    assert_eq!(api.err("lun_remove", json!({"lun": 5})).0, -32001);
    assert_eq!(api.err("lun_resize", json!({"lun": 5})).0, -32001);
    // Not a multiple of the 512-byte block size.
    assert_eq!(
        api.err("lun_resize", json!({"lun": 0, "size": IMAGE_LEN + 100}))
            .0,
        -32602
    );
    // Smaller, without "shrink".
    assert_eq!(
        api.err("lun_resize", json!({"lun": 0, "size": IMAGE_LEN / 2}))
            .0,
        -32602
    );
    assert_eq!(
        std::fs::metadata(&env.images[0]).unwrap().len(),
        IMAGE_LEN as u64,
        "a refused shrink left the image alone"
    );

    // Still serving.
    let version = api.ok("version", json!({}));
    assert_eq!(version["name"], "vhost-device-scsi");
    assert!(version["version"].is_string(), "{version}");
    let list = api.ok("lun_list", json!({}));
    let luns = list["luns"].as_array().unwrap();
    assert_eq!(luns.len(), 1, "{list}");
    assert_eq!(luns[0]["lun"], 0);
    assert_eq!(luns[0]["size"], IMAGE_LEN);
    assert_eq!(luns[0]["image"], env.image(0));
    // The image whose lock was released is added now.
    assert_eq!(
        api.ok("lun_add", json!({"image": env.image(2)})),
        json!({"lun": 1})
    );
}

#[test]
fn lun_resize_with_a_size_on_a_read_only_daemon_is_not_supported() {
    let env = Env::new(1, 0, &["--read-only"]);
    let mut api = env.api();
    let (code, message) = api.err("lun_resize", json!({"lun": 0, "size": 2 * IMAGE_LEN}));
    assert_eq!(code, -32004, "{message}");
    assert_eq!(
        std::fs::metadata(&env.images[0]).unwrap().len(),
        IMAGE_LEN as u64
    );
    // Without a size, after the operator grew it, it is taken.
    set_file_len(&env.images[0], 2 * IMAGE_LEN as u64);
    assert_eq!(
        api.ok("lun_resize", json!({"lun": 0})),
        json!({"lun": 0, "size": 2 * IMAGE_LEN})
    );
}

/// The statistics entry of LUN `lun`.
fn lun_stats(api: &mut Api, lun: u16) -> Value {
    let stats = api.ok("stats", json!({}));
    let luns = stats["luns"]
        .as_array()
        .unwrap_or_else(|| panic!("stats: {stats}"));
    luns.iter()
        .find(|e| e["lun"] == lun)
        .unwrap_or_else(|| panic!("stats without LUN {lun}: {stats}"))
        .clone()
}

#[test]
fn stats_count_reads_bytes_latencies_and_errors() {
    const N: u64 = 20;
    let env = Env::new(1, 0, &[]);
    let mut fe = env.driver(DriverConfig::default());
    let mut api = env.api();
    let image = image_bytes(0, IMAGE_LEN);
    for i in 0..N as u32 {
        let r = cmd(&mut fe, 0, &read10(i * 8, 8), 4096);
        assert_good(&r, "READ");
        let at = i as usize * 4096;
        assert_eq!(r.data_in, image[at..at + 4096]);
    }
    let s = lun_stats(&mut api, 0);
    assert!(s["commands"]["read"].as_u64().unwrap() >= N, "{s}");
    assert!(s["bytes_read"].as_u64().unwrap() >= N * 4096, "{s}");
    assert!(s["latency_us"]["count"].as_u64().unwrap() >= N, "{s}");
    assert_eq!(s["image"], env.image(0));

    // One block past the end: LOGICAL BLOCK ADDRESS OUT OF RANGE.
    let r = cmd(&mut fe, 0, &read10((IMAGE_LEN / BLOCK) as u32, 1), 512);
    assert_eq!(r.status, CHECK_CONDITION);
    let s = lun_stats(&mut api, 0);
    assert!(
        s["errors"]["illegal_request"].as_u64().unwrap_or(0) >= 1,
        "{s}"
    );
}

// ---------------------------------------------------------------------------
// Under load
// ---------------------------------------------------------------------------

/// Two request queues on two worker threads read LUN 0 without pause while
/// a second LUN is added and removed 50 times: every READ ends GOOD (with
/// the image's bytes) or with a unit attention, which is retried.
#[test]
fn luns_come_and_go_while_two_queues_read() {
    const ROUNDS: usize = 50;
    let mut env = Env::new(1, 1, &["--threads", "2", "--num-queues", "2"]);
    let mut fe = env.driver(DriverConfig {
        request_queues: 2,
        ..hotplug_driver()
    });
    let mut api = env.api();
    let image = image_bytes(0, IMAGE_LEN);
    let blocks = (IMAGE_LEN / BLOCK) as u32;
    let stop = AtomicBool::new(false);
    // (when the READ was submitted, how long it took), per queue.
    let latencies: Mutex<Vec<(Instant, Duration)>> = Mutex::new(Vec::new());
    let (window_start, window_end) = std::thread::scope(|s| {
        for (q, queue) in fe.queues_mut().iter_mut().enumerate() {
            let (stop, image, latencies) = (&stop, &image, &latencies);
            s.spawn(move || {
                let mut seen = Vec::new();
                let mut i = q as u32;
                let mut reads = 0u32;
                while !stop.load(Ordering::Relaxed) || reads < 10 {
                    let lba = (i * 97) % (blocks - 8);
                    i += 2;
                    let mut attentions = 0;
                    loop {
                        let started = Instant::now();
                        let r = queue
                            .command(0, &read10(lba, 8), &[], 4096)
                            .unwrap_or_else(|e| panic!("queue {q}: READ: {e}"));
                        seen.push((started, started.elapsed()));
                        if r.status == GOOD && r.response == 0 {
                            let at = lba as usize * BLOCK;
                            assert_eq!(r.data_in, image[at..at + 4096], "queue {q} LBA {lba}");
                            break;
                        }
                        // Only unit attentions, and a bounded number of them
                        // in a row (each reported one is cleared).
                        assert_eq!(
                            key_asc_ascq(&r.sense).0,
                            UNIT_ATTENTION,
                            "queue {q}: READ of LBA {lba}: status {:#x} sense {:02x?}",
                            r.status,
                            r.sense
                        );
                        attentions += 1;
                        assert!(attentions <= 4, "queue {q}: unit attentions without end");
                    }
                    reads += 1;
                }
                latencies.lock().unwrap().extend(seen);
            });
        }
        // Some reads before the management calls.
        std::thread::sleep(Duration::from_millis(100));
        let window_start = Instant::now();
        for _ in 0..ROUNDS {
            api.ok("lun_add", json!({"image": env.image(1), "lun": 1}));
            api.ok("lun_remove", json!({"lun": 1}));
        }
        let window_end = Instant::now();
        stop.store(true, Ordering::Relaxed);
        (window_start, window_end)
    });
    env.assert_running();
    let latencies = latencies.into_inner().unwrap();
    let max = |f: &dyn Fn(Instant) -> bool| {
        latencies
            .iter()
            .filter(|(at, _)| f(*at))
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    };
    let before = max(&|at| at < window_start);
    let during = max(&|at| at >= window_start && at <= window_end);
    eprintln!(
        "{} READs; longest READ latency before the management calls {before:?}, during \
         {ROUNDS} lun_add + lun_remove rounds ({:?}) {during:?}",
        latencies.len(),
        window_end - window_start
    );
    // The daemon still answers both sides.
    assert_eq!(
        api.ok("lun_list", json!({}))["luns"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = cmd(&mut fe, 0, &report_luns(0, 4096), 4096);
    assert_good(&r, "REPORT LUNS after the load");
    assert_eq!(reported_luns(&r.data_in), [[0u8; 8]]);
    assert_good(&cmd(&mut fe, 0, &TUR, 0), "TUR after the load");
}

/// The API socket has its own permissions: `--socket-mode 0660` (for the
/// VMM's group) leaves it 0600; `--api-socket-mode` sets them.
#[test]
fn the_api_socket_has_its_own_mode() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |env: &Env| {
        let mut api = env.api();
        api.ok("version", json!({}));
        std::fs::metadata(&env.api).unwrap().permissions().mode() & 0o777
    };
    let env = Env::new(1, 0, &["--socket-mode", "0660"]);
    assert_eq!(
        std::fs::metadata(&env.socket).unwrap().permissions().mode() & 0o777,
        0o660
    );
    assert_eq!(mode(&env), 0o600);
    let env = Env::new(1, 0, &["--api-socket-mode", "0640"]);
    assert_eq!(mode(&env), 0o640);
}

/// The guest's state survives an upgrade (SIGTERM, then a new daemon):
/// the write cache it switched off stays off, descriptor-format sense stays
/// on, and a unit attention it had not seen yet is still reported once —
/// through the state file the stopping daemon leaves next to its socket.
#[test]
fn the_guests_state_survives_sigterm_and_a_new_daemon() {
    use vhost_scsi_frontend::cdb::{mode_select6, mode_select6_list, mode_sense6};
    use vhost_scsi_frontend::testkit::{caching_page, control_page};
    const PF: u8 = 0x10;
    let mut env = Env::new(2, 0, &[]);
    let mut fe = env.driver(DriverConfig::default());
    for page in [caching_page(false), control_page(true)] {
        let params = mode_select6_list(&[], &page);
        let reply = fe
            .queue(0)
            .unwrap()
            .command(0, &mode_select6(PF, params.len() as u8), &params, 0)
            .unwrap();
        assert_good(&reply, "MODE SELECT");
    }
    // A pending unit attention on LUN 1: a resize it has not seen.
    set_file_len(&env.images[1], 2 * IMAGE_LEN as u64);
    env.api().ok("lun_resize", json!({"lun": 1}));
    drop(fe);
    let state_file = env.socket.with_extension("sock.state");
    // SIGTERM with a VMM connected: the state goes to the file.
    let mut fe = env.driver(DriverConfig::default());
    let status = env
        .daemon
        .process
        .terminate(Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "the daemon stopped with {status}");
    drop(fe);
    assert!(state_file.exists(), "no state file at {state_file:?}");
    let images: Vec<&str> = env.images.iter().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec!["--api-socket", env.api.to_str().unwrap()];
    args.extend(images);
    env.daemon = Daemon::start(&env.socket, &args);
    assert!(!state_file.exists(), "the state file is used once");
    fe = env.driver(DriverConfig::default());
    let wce = |fe: &mut ScsiFrontend| {
        let reply = cmd(fe, 0, &mode_sense6(0x08, 0x08, 0, 255), 255);
        assert_good(&reply, "MODE SENSE caching page");
        reply.data_in[4 + 2] & 0x04 != 0
    };
    assert!(!wce(&mut fe), "WCE came back on after the restart");
    // LUN 1: its resize's unit attention, in descriptor format (D_SENSE
    // was set on LUN 0 only: fixed format here), then GOOD.
    assert_ua(&cmd(&mut fe, 1, &TUR, 0), 0x2a, 0x09);
    assert_good(&cmd(&mut fe, 1, &TUR, 0), "TEST UNIT READY after it");
    // LUN 0: descriptor-format sense (response code 72h) for an error.
    let reply = cmd(&mut fe, 0, &read10(0xffff_fff0, 1), 512);
    assert_eq!(reply.status, CHECK_CONDITION);
    assert_eq!(reply.sense[0] & 0x7f, 0x72, "sense {:02x?}", reply.sense);
}

/// A LUN added through the API is there again after an upgrade (SIGTERM,
/// then a new daemon with only the command line's LUNs): the state file
/// carries its IMAGE argument, and the guest, which has the disk, keeps
/// reading it, with no unit attention for an addition it knew of.
#[test]
fn a_lun_added_through_the_api_survives_an_upgrade() {
    let mut env = Env::new(1, 1, &[]);
    let image1 = env.image(1).to_string();
    env.api().ok(
        "lun_add",
        json!({"image": format!("{image1},ro"), "lun": 5}),
    );
    let mut fe = env.driver(DriverConfig::default());
    // The addition's unit attention on LUN 0, seen before the upgrade.
    assert_ua(&cmd(&mut fe, 0, &TUR, 0), 0x3f, 0x0e);
    let status = env
        .daemon
        .process
        .terminate(Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "the daemon stopped with {status}");
    drop(fe);
    let args = ["--api-socket", env.api.to_str().unwrap(), env.image(0)];
    env.daemon = Daemon::start(&env.socket, &args);
    let mut fe = env.driver(DriverConfig::default());
    let reply = cmd(&mut fe, 5, &read10(2, 1), BLOCK as u32);
    assert_good(&reply, "READ of LUN 5 after the upgrade");
    assert_eq!(
        reply.data_in,
        image_bytes(1, IMAGE_LEN)[2 * BLOCK..3 * BLOCK]
    );
    assert_good(&cmd(&mut fe, 0, &TUR, 0), "LUN 0: no unit attention");
    let list = env.api().ok("lun_list", json!({}));
    let luns: Vec<(u64, bool)> = list["luns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["lun"].as_u64().unwrap(),
                l["read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(luns, [(0, false), (5, true)], "{list}");
}
