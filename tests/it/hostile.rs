//! Hostile-frontend suite: the daemon process, driven over its real
//! vhost-user socket by a frontend that breaks the rules on purpose —
//! malformed descriptor chains, broken ring indexes, memory tables swapped
//! under in-flight I/O, rings outside memory, malformed vhost-user
//! messages. Each case asserts the exact outcome (virtio-scsi response,
//! SCSI status and sense, used length, residual — or that the request is
//! never completed, or the connection dropped, where the daemon gives up as
//! virtio allows), and afterwards that the daemon process is alive, a fresh
//! connection reads the image's bytes back correctly, and the image holds
//! exactly what it should.
//!
//! Cases of the same shape — a chain that breaks a rule, refused or
//! answered exactly; a malformed vhost-user message, which ends the
//! connection — are rows of two tables (`chain_cases`, `message_cases`),
//! each run by one driver; every test named after a group of rows runs
//! those rows. The cases whose shape is their own (ring indexes, memory
//! tables, ring addresses, bounded passes, protocol features) are tests of
//! their own.
//!
//! The outcomes are listed in docs/hostile-guests.md.

use crate::common;

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::io::Read;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{cpu_time, read10, write10, Daemon, ScsiDriver};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_scsi_frontend::cdb::{inquiry, read16, write16};
use vhost_scsi_frontend::raw::{
    spare_fd, Answer, RawConfig, RawDesc, RawDevice, RawSocket, RegionSpec, UsedElem,
    VHOST_USER_NEED_REPLY, VHOST_USER_VERSION, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vhost_scsi_frontend::scsi::{self, lun_field, REQUEST_LEN, RESPONSE_LEN};
use vhost_scsi_frontend::sense::key_asc_ascq;
use vhost_scsi_frontend::testkit::sparse_image;
use vmm_sys_util::eventfd::EventFd;

/// How long a completion may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);
/// How long to watch for a completion that must not come. Where the suite
/// asserts that the daemon never completes a request, it also shows that
/// the request was not merely slow: a later request on the same queue, or
/// a fresh connection, is served.
const QUIET: Duration = Duration::from_millis(300);

const IMAGE_LEN: usize = 1 << 20;
const BLOCK: usize = 512;
const RESP_LEN: u32 = RESPONSE_LEN as u32;

// virtio-scsi response codes (virtio 1.2 §5.6.6.1).
const S_OK: u8 = 0;
const S_OVERRUN: u8 = 1;
const S_FAILURE: u8 = 9;
// SAM status, sense keys.
const GOOD: u8 = 0;
const CHECK_CONDITION: u8 = 2;
const ILLEGAL_REQUEST: u8 = 5;

// vhost-user request codes.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_CALL: u32 = 13;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;

/// Canary byte for buffers the device must not write.
const CANARY: u8 = 0xee;

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / BLOCK) as u8).wrapping_mul(7) ^ (i as u8).wrapping_mul(13))
        .collect()
}

/// A daemon serving one image, and what the image must hold.
struct Env {
    _dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    daemon: Daemon,
    /// The image's first `expected.len()` bytes; past them, `len` bytes in
    /// all, the image is one hole (sparse images only).
    expected: Vec<u8>,
    len: u64,
    /// The daemon's standard error (its log).
    log: PathBuf,
}

impl Env {
    fn new() -> Env {
        Env::with_image(IMAGE_LEN as u64)
    }

    /// An image of `len` bytes whose first MiB holds a pattern; the rest is
    /// a hole.
    fn with_image(len: u64) -> Env {
        Env::with_daemon_args(len, &[])
    }

    /// As [`Env::with_image`], the daemon also given `args`; the image in
    /// the target directory, whose file system takes O_DIRECT (a tmpfs
    /// /tmp does not).
    fn with_daemon_args(len: u64, args: &[&str]) -> Env {
        let dir = if args.is_empty() {
            tempfile::tempdir().unwrap()
        } else {
            tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
        };
        let img = dir.path().join("disk.raw");
        let expected = pattern(IMAGE_LEN);
        sparse_image(&img, &expected, len).unwrap();
        let sock = dir.path().join("vus.sock");
        let log = dir.path().join("daemon.log");
        let mut daemon_args = args.to_vec();
        daemon_args.push(img.to_str().unwrap());
        let daemon = Daemon::start_logging_to(&sock, &daemon_args, &log);
        Env {
            _dir: dir,
            img,
            sock,
            daemon,
            expected,
            len,
            log,
        }
    }

    /// Waits until the daemon's log has a line containing `what`.
    fn wait_for_log(&self, what: &str) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.lines().any(|l| l.contains(what)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {what:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn raw(&self) -> RawDevice {
        self.raw_with(&RawConfig::default())
    }

    fn raw_with(&self, config: &RawConfig) -> RawDevice {
        RawDevice::connect(&self.sock, config).unwrap_or_else(|e| panic!("raw frontend: {e}"))
    }

    fn pid(&self) -> u32 {
        self.daemon.process.pid()
    }

    fn assert_alive(&mut self) {
        assert_eq!(
            self.daemon.process.try_wait().unwrap(),
            None,
            "the daemon exited"
        );
    }

    /// After a hostile connection ended (`dev` is dropped first: the daemon
    /// serves one connection at a time): the daemon is alive, a fresh
    /// connection gets the image's bytes from READ(10), and the image holds
    /// exactly what it should.
    fn assert_still_serving(mut self, dev: Option<RawDevice>) {
        drop(dev);
        self.assert_alive();
        let sock = self.sock.clone();
        let (tx, rx) = mpsc::channel();
        // A daemon that no longer accepts would block the handshake; the
        // thread keeps the test itself from hanging.
        std::thread::spawn(move || {
            let mut drv = ScsiDriver::connect(&sock);
            let first = drv.command(0, &read10(0, 16), &[], 16 * BLOCK as u32);
            let last_lba = (IMAGE_LEN / BLOCK - 8) as u32;
            let last = drv.command(0, &read10(last_lba, 8), &[], 8 * BLOCK as u32);
            let _ = tx.send((first, last));
        });
        let (first, last) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a fresh connection is served");
        for r in [&first, &last] {
            assert_eq!((r.response, r.status), (S_OK, GOOD), "{r:?}");
        }
        assert_eq!(first.data_in, self.expected[..16 * BLOCK]);
        assert_eq!(last.data_in, self.expected[IMAGE_LEN - 8 * BLOCK..]);
        self.assert_image();
        self.assert_alive();
    }

    /// The image file holds `expected` and, past it, only a hole.
    fn assert_image(&self) {
        let mut f = std::fs::File::open(&self.img).unwrap();
        assert_eq!(f.metadata().unwrap().len(), self.len, "image size");
        let mut head = vec![0u8; self.expected.len()];
        f.read_exact(&mut head).unwrap();
        assert_eq!(hash(&head), hash(&self.expected), "image contents changed");
        if self.len > self.expected.len() as u64 {
            // SAFETY: lseek on a descriptor we own.
            let data = unsafe {
                libc::lseek(
                    f.as_raw_fd(),
                    self.expected.len() as libc::off_t,
                    libc::SEEK_DATA,
                )
            };
            let err = std::io::Error::last_os_error().raw_os_error();
            assert!(
                data == -1 && err == Some(libc::ENXIO),
                "data written past the first MiB (at {data})"
            );
        }
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// `virtio_scsi_cmd_req` for target 0, `lun`, tag 1234h.
fn request(lun: u16, cdb: &[u8]) -> Vec<u8> {
    scsi::request(lun_field(lun), 0x1234, cdb, 32)
}

/// The response the device wrote (virtio 1.2 §5.6.6.1).
#[derive(Debug)]
struct Resp {
    sense_len: u32,
    residual: u32,
    status: u8,
    response: u8,
    sense: Vec<u8>,
}

impl Resp {
    fn parse(b: &[u8]) -> Resp {
        let le = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Resp {
            sense_len: le(0),
            residual: le(4),
            status: b[10],
            response: b[11],
            sense: b[12..RESPONSE_LEN].to_vec(),
        }
    }

    /// Sense key, ASC, ASCQ.
    fn sense_key(&self) -> (u8, u8, u8) {
        key_asc_ascq(&self.sense)
    }
}

/// Guest buffers of one request.
struct Bufs {
    header: u64,
    resp: u64,
    data: u64,
}

/// Allocates a request header holding `cdb`, a response area and a
/// `data_len`-byte data buffer; the response and data hold the canary, or
/// `data_out` if given.
fn bufs(dev: &mut RawDevice, cdb: &[u8], data_len: usize, data_out: Option<&[u8]>) -> Bufs {
    let header = dev.alloc(REQUEST_LEN as u64);
    dev.write(header, &request(0, cdb)).unwrap();
    let resp = dev.alloc(RESPONSE_LEN as u64);
    dev.write(resp, &[CANARY; RESPONSE_LEN]).unwrap();
    let data = dev.alloc(data_len.max(1) as u64);
    match data_out {
        Some(bytes) => dev.write(data, bytes).unwrap(),
        None => dev.write(data, &vec![CANARY; data_len]).unwrap(),
    }
    Bufs { header, resp, data }
}

/// Writes `descs` at table indexes `first..`, each linked to the next with
/// NEXT (the caller's NEXT, `next` and other flags on the last are kept).
fn put_chain(dev: &RawDevice, first: u16, descs: &[RawDesc]) -> u16 {
    for (i, d) in descs.iter().enumerate() {
        let mut d = *d;
        if i + 1 < descs.len() {
            d.flags |= VRING_DESC_F_NEXT;
            d.next = first + i as u16 + 1;
        }
        dev.write_desc(first + i as u16, d).unwrap();
    }
    first
}

/// Descriptors for `header`, then data-out or response, in order.
fn r(addr: u64, len: usize) -> RawDesc {
    RawDesc::new(addr, len as u32, 0, 0)
}
fn w(addr: u64, len: usize) -> RawDesc {
    RawDesc::new(addr, len as u32, VRING_DESC_F_WRITE, 0)
}

fn submit(dev: &mut RawDevice, head: u16) {
    dev.publish(head).unwrap();
    dev.kick().unwrap();
}

fn completion(dev: &mut RawDevice) -> UsedElem {
    dev.wait_used(WAIT)
        .unwrap()
        .expect("the request is completed")
}

fn assert_untouched(dev: &RawDevice, addr: u64, len: usize, what: &str) {
    assert!(
        dev.read(addr, len).unwrap().iter().all(|&b| b == CANARY),
        "{what} was written"
    );
}

/// A well-formed READ(10) of `blocks` at `lba` with descriptors at
/// `first..first + 3`; returns the response and data-in.
fn good_read(dev: &mut RawDevice, first: u16, lba: u32, blocks: u16) -> (Resp, Vec<u8>) {
    let len = usize::from(blocks) * BLOCK;
    let b = bufs(dev, &read10(lba, blocks), len, None);
    let head = put_chain(
        dev,
        first,
        &[
            r(b.header, REQUEST_LEN),
            w(b.resp, RESPONSE_LEN),
            w(b.data, len),
        ],
    );
    submit(dev, head);
    let used = completion(dev);
    assert_eq!(
        used,
        UsedElem {
            id: head.into(),
            len: RESP_LEN + len as u32
        }
    );
    (
        Resp::parse(&dev.read(b.resp, RESPONSE_LEN).unwrap()),
        dev.read(b.data, len).unwrap(),
    )
}

// ---------------------------------------------------------------------
// Chain cases: one table, one driver
// ---------------------------------------------------------------------
//
// Most cases have one shape: the driver builds a request whose chain,
// buffers or lengths break a rule, submits it, and the device must refuse
// it (used length 0, nothing written) or answer it with an exact
// virtio-scsi response; the queue then still serves, and so does a fresh
// connection. Each such case is a row of `chain_cases()` (the test that
// runs it, what it is, the environment, the setup that builds the chain,
// the expected outcome); `run_chain_cases` is the one driver, and each
// test below runs the rows named after it, in order, on one daemon and one
// connection.

/// The daemon and guest memory a test's rows run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Setting {
    /// Image size (its first MiB holds a pattern, the rest is a hole).
    image_len: u64,
    /// Arguments for the daemon besides the image.
    daemon_args: &'static [&'static str],
    /// Guest memory regions as (guest-physical address, size).
    regions: &'static [(u64, u64)],
    /// Size of the request queue.
    queue_size: u16,
}

const DEFAULT_SETTING: Setting = Setting {
    image_len: IMAGE_LEN as u64,
    daemon_args: &[],
    regions: &[(0, 4 << 20)],
    queue_size: 256,
};

/// Two 4 MiB regions with a 4 MiB hole between them.
const REGIONS_WITH_A_HOLE: Setting = Setting {
    regions: &[(0, 4 << 20), (8 << 20, 4 << 20)],
    ..DEFAULT_SETTING
};

/// Two 4 MiB regions, guest-physically contiguous (two mappings in the
/// daemon).
const CONTIGUOUS_REGIONS: Setting = Setting {
    regions: &[(0, 4 << 20), (4 << 20, 4 << 20)],
    ..DEFAULT_SETTING
};

impl Setting {
    fn env(&self) -> Env {
        Env::with_daemon_args(self.image_len, self.daemon_args)
    }

    fn config(&self) -> RawConfig {
        RawConfig {
            regions: self
                .regions
                .iter()
                .map(|&(gpa, size)| RegionSpec { gpa, size })
                .collect(),
            queue_size: self.queue_size,
            ..RawConfig::default()
        }
    }
}

/// What the device must do with a row's chain.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Refused whole: completed with used length 0, nothing written.
    Refused,
    /// Completed with `used_len` bytes written and this response.
    Answered(Response),
}

/// The response header a row expects; `None` fields are not checked.
#[derive(Clone, Copy, Debug)]
struct Response {
    used_len: u32,
    response: u8,
    status: u8,
    residual: Option<u32>,
    sense_len: Option<u32>,
    /// (sense key, ASC, ASCQ) and the sense-key specific bytes 15-17.
    sense: Option<((u8, u8, u8), [u8; 3])>,
}

/// GOOD, nothing left over, `used_len` bytes written.
const fn good_response(used_len: u32) -> Response {
    Response {
        used_len,
        response: S_OK,
        status: GOOD,
        residual: Some(0),
        sense_len: None,
        sense: None,
    }
}

const fn good(used_len: u32) -> Expect {
    Expect::Answered(good_response(used_len))
}

/// VIRTIO_SCSI_S_OVERRUN with the buffer not transferred as residual
/// (virtio 1.2 §5.6.6.1): only the response written.
const fn overrun(residual: u32) -> Response {
    Response {
        used_len: RESP_LEN,
        response: S_OVERRUN,
        status: 0,
        residual: Some(residual),
        sense_len: None,
        sense: None,
    }
}

/// A further check of guest memory, once a chain completed.
type Check = Box<dyn Fn(&RawDevice)>;

/// A chain a row's setup built, and what to look at once it completed.
struct Built {
    head: u16,
    /// Where the response lands: these guest ranges, in order.
    resp: Vec<(u64, usize)>,
    /// Guest buffers the device must leave holding the canary.
    untouched: Vec<(u64, usize, &'static str)>,
    /// Guest buffers that must hold the image's bytes: (address, image
    /// offset, length).
    image_data: Vec<(u64, usize, usize)>,
    /// What the request wrote to the image: (offset, bytes).
    writes: Vec<(usize, Vec<u8>)>,
    /// Further checks of guest memory.
    check: Option<Check>,
}

impl Built {
    /// The chain at `head`, its response at `resp`.
    fn new(head: u16, resp: u64) -> Built {
        Built {
            head,
            resp: vec![(resp, RESPONSE_LEN)],
            untouched: Vec::new(),
            image_data: Vec::new(),
            writes: Vec::new(),
            check: None,
        }
    }

    fn untouched(mut self, addr: u64, len: usize, what: &'static str) -> Built {
        self.untouched.push((addr, len, what));
        self
    }

    fn image_data(mut self, addr: u64, offset: usize, len: usize) -> Built {
        self.image_data.push((addr, offset, len));
        self
    }

    fn writes(mut self, offset: usize, bytes: Vec<u8>) -> Built {
        self.writes.push((offset, bytes));
        self
    }

    fn check(mut self, f: impl Fn(&RawDevice) + 'static) -> Built {
        self.check = Some(Box::new(f));
        self
    }
}

/// A row of the table.
struct ChainCase {
    /// The test that runs it.
    test: &'static str,
    /// What it is, for failure messages.
    name: &'static str,
    setting: Setting,
    setup: fn(&mut RawDevice) -> Built,
    expect: Expect,
}

/// Runs the rows of `test` in order on one daemon and one connection:
/// each chain completed as its row expects (with the response, the
/// buffers that must stay untouched, the data-in and the image); then the
/// queue serves a READ, the daemon's peak RSS grew by less than 64 MiB
/// (nothing is allocated for what a hostile chain asks), and a fresh
/// connection reads the image correctly.
fn run_chain_cases(test: &str) {
    let cases: Vec<ChainCase> = chain_cases()
        .into_iter()
        .filter(|c| c.test == test)
        .collect();
    assert!(!cases.is_empty(), "no rows for {test}");
    let setting = cases[0].setting;
    assert!(
        cases.iter().all(|c| c.setting == setting),
        "{test}: the rows of one test share a setting"
    );
    let mut env = setting.env();
    let mut dev = env.raw_with(&setting.config());
    let hwm_before = proc_status_kib(env.pid(), "VmHWM:");
    for case in &cases {
        let what = format!("{test}: {}", case.name);
        let built = (case.setup)(&mut dev);
        submit(&mut dev, built.head);
        let used = completion(&mut dev);
        let resp: Vec<u8> = built
            .resp
            .iter()
            .flat_map(|&(addr, len)| dev.read(addr, len).unwrap())
            .collect();
        match case.expect {
            Expect::Refused => {
                assert_eq!(
                    used,
                    UsedElem {
                        id: built.head.into(),
                        len: 0
                    },
                    "{what}"
                );
                assert!(
                    resp.iter().all(|&b| b == CANARY),
                    "{what}: the response was written"
                );
            }
            Expect::Answered(want) => {
                assert_eq!(
                    used,
                    UsedElem {
                        id: built.head.into(),
                        len: want.used_len
                    },
                    "{what}"
                );
                let got = Resp::parse(&resp);
                assert_eq!(
                    (got.response, got.status),
                    (want.response, want.status),
                    "{what}: {got:?}"
                );
                if let Some(residual) = want.residual {
                    assert_eq!(got.residual, residual, "{what}: residual");
                }
                if let Some(sense_len) = want.sense_len {
                    assert_eq!(got.sense_len, sense_len, "{what}: sense length");
                }
                if let Some((code, sks)) = want.sense {
                    assert_eq!(got.sense_key(), code, "{what}: {got:?}");
                    assert_eq!(got.sense[15..18], sks, "{what}: {got:?}");
                }
            }
        }
        for &(addr, len, buffer) in &built.untouched {
            assert!(
                dev.read(addr, len).unwrap().iter().all(|&b| b == CANARY),
                "{what}: {buffer} was written"
            );
        }
        for &(addr, offset, len) in &built.image_data {
            assert!(
                dev.read(addr, len).unwrap() == env.expected[offset..offset + len],
                "{what}: data-in is not the image's {len} bytes at {offset}"
            );
        }
        for (offset, bytes) in &built.writes {
            env.expected[*offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        if !built.writes.is_empty() {
            env.assert_image();
        }
        if let Some(check) = &built.check {
            check(&dev);
        }
    }
    // The queue still serves.
    let (resp, data) = good_read(&mut dev, 0, 4, 2);
    assert_eq!((resp.response, resp.status), (S_OK, GOOD), "{test}");
    assert_eq!(data, env.expected[4 * BLOCK..6 * BLOCK], "{test}");
    let growth = proc_status_kib(env.pid(), "VmHWM:").saturating_sub(hwm_before);
    assert!(growth < 64 << 10, "{test}: peak RSS grew by {growth} KiB");
    env.assert_still_serving(Some(dev));
}

/// The table: every chain case, by test.
fn chain_cases() -> Vec<ChainCase> {
    fn row(
        test: &'static str,
        name: &'static str,
        setting: Setting,
        setup: fn(&mut RawDevice) -> Built,
        expect: Expect,
    ) -> ChainCase {
        ChainCase {
            test,
            name,
            setting,
            setup,
            expect,
        }
    }
    let d = DEFAULT_SETTING;
    vec![
        // Descriptors outside guest memory: no way to answer through a
        // chain that cannot be mapped.
        row(
            "descriptor_outside_guest_memory",
            "data-in running past the end of memory",
            REGIONS_WITH_A_HOLE,
            |dev| outside_read(dev, 0, |_| w((12 << 20) - 2048, 4096)),
            Expect::Refused,
        ),
        row(
            "descriptor_outside_guest_memory",
            "the header far outside",
            REGIONS_WITH_A_HOLE,
            |dev| {
                let b = bufs(dev, &read10(0, 8), 4096, None);
                let chain = [
                    r(1 << 40, REQUEST_LEN),
                    w(b.resp, RESPONSE_LEN),
                    w(b.data, 4096),
                ];
                refused_read(dev, 3, &b, &chain)
            },
            Expect::Refused,
        ),
        row(
            "descriptor_outside_guest_memory",
            "data-in from the end of region 0 into the hole",
            REGIONS_WITH_A_HOLE,
            |dev| outside_read(dev, 6, |_| w((4 << 20) - 1000, 4096)),
            Expect::Refused,
        ),
        row(
            "descriptor_outside_guest_memory",
            "the response in the hole",
            REGIONS_WITH_A_HOLE,
            |dev| {
                let b = bufs(dev, &read10(0, 8), 4096, None);
                let chain = [
                    r(b.header, REQUEST_LEN),
                    w((4 << 20) + 4096, RESPONSE_LEN),
                    w(b.data, 4096),
                ];
                refused_read(dev, 9, &b, &chain)
            },
            Expect::Refused,
        ),
        row(
            "descriptor_outside_guest_memory",
            "data-in wrapping around the address space",
            REGIONS_WITH_A_HOLE,
            |dev| outside_read(dev, 12, |_| w(u64::MAX - 100, 4096)),
            Expect::Refused,
        ),
        row(
            "descriptor_outside_guest_memory",
            "a WRITE(10) whose data-out lies in the hole: not executed",
            REGIONS_WITH_A_HOLE,
            |dev| {
                let b = bufs(dev, &write10(0, 8, true), 0, None);
                let chain = [
                    r(b.header, REQUEST_LEN),
                    r((4 << 20) + 8192, 4096),
                    w(b.resp, RESPONSE_LEN),
                ];
                Built::new(put_chain(dev, 15, &chain), b.resp)
            },
            Expect::Refused,
        ),
        // A buffer contiguous in guest-physical memory across two regions
        // is served like any other: reads and writes land on both sides of
        // the boundary.
        row(
            "descriptor_straddling_two_memory_regions",
            "READ(10) of 8 blocks into the straddling buffer",
            CONTIGUOUS_REGIONS,
            |dev| {
                let data = (4 << 20) - 1000;
                let b = bufs(dev, &read10(16, 8), 0, None);
                dev.write(data, &[CANARY; 4096]).unwrap();
                let chain = [
                    r(b.header, REQUEST_LEN),
                    w(b.resp, RESPONSE_LEN),
                    w(data, 4096),
                ];
                Built::new(put_chain(dev, 0, &chain), b.resp).image_data(data, 16 * BLOCK, 4096)
            },
            good(RESP_LEN + 4096),
        ),
        row(
            "descriptor_straddling_two_memory_regions",
            "WRITE(10) of 8 blocks from the straddling buffer",
            CONTIGUOUS_REGIONS,
            |dev| {
                let data = (4 << 20) - 1000;
                let out: Vec<u8> = (0..4096).map(|i| (i * 3 + 1) as u8).collect();
                dev.write(data, &out).unwrap();
                let b = bufs(dev, &write10(40, 8, false), 0, None);
                let chain = [
                    r(b.header, REQUEST_LEN),
                    r(data, 4096),
                    w(b.resp, RESPONSE_LEN),
                ];
                Built::new(put_chain(dev, 3, &chain), b.resp).writes(40 * BLOCK, out)
            },
            good(RESP_LEN),
        ),
        row(
            "header_split_over_one_byte_descriptors",
            "the 51-byte request header in 51 one-byte descriptors",
            d,
            |dev| {
                let b = bufs(dev, &read10(100, 8), 4096, None);
                let mut chain: Vec<RawDesc> = (0..REQUEST_LEN as u64)
                    .map(|i| r(b.header + i, 1))
                    .collect();
                chain.push(w(b.resp, RESPONSE_LEN));
                chain.push(w(b.data, 4096));
                Built::new(put_chain(dev, 0, &chain), b.resp).image_data(b.data, 100 * BLOCK, 4096)
            },
            good(RESP_LEN + 4096),
        ),
        // The request header marked writable: no readable part, so no
        // request; VIRTIO_SCSI_S_FAILURE goes to the first 108 writable
        // bytes, where the response lives (virtio 1.2 §5.6.6.1), and the
        // rest of the response descriptor is not written.
        row(
            "writable_descriptor_where_readable_required",
            "the request header marked writable",
            d,
            |dev| {
                let b = bufs(dev, &write10(0, 1, false), 0, None);
                let chain = [w(b.header, REQUEST_LEN), w(b.resp, RESPONSE_LEN)];
                let mut built = Built::new(put_chain(dev, 0, &chain), b.resp).untouched(
                    b.resp + (RESPONSE_LEN - REQUEST_LEN) as u64,
                    REQUEST_LEN,
                    "the response past the first 108 writable bytes",
                );
                built.resp = vec![
                    (b.header, REQUEST_LEN),
                    (b.resp, RESPONSE_LEN - REQUEST_LEN),
                ];
                built
            },
            Expect::Answered(Response {
                used_len: RESP_LEN,
                response: S_FAILURE,
                status: 0,
                residual: None,
                sense_len: Some(0),
                sense: None,
            }),
        ),
        // Data-out marked writable: the WRITE has no data-out, so
        // OVERRUN, the image untouched, the buffer (offered as data-in)
        // not written.
        row(
            "writable_descriptor_where_readable_required",
            "data-out marked writable",
            d,
            |dev| {
                let b = bufs(dev, &write10(0, 1, false), 512, None);
                let chain = [
                    r(b.header, REQUEST_LEN),
                    w(b.resp, RESPONSE_LEN),
                    w(b.data, 512),
                ];
                Built::new(put_chain(dev, 2, &chain), b.resp).untouched(
                    b.data,
                    512,
                    "the data buffer",
                )
            },
            Expect::Answered(overrun(512)),
        ),
        // The response marked readable: nowhere to answer.
        row(
            "readable_descriptor_where_writable_required",
            "the response marked readable",
            d,
            |dev| {
                let b = bufs(dev, &read10(0, 1), 512, None);
                let chain = [r(b.header, REQUEST_LEN), r(b.resp, RESPONSE_LEN)];
                Built::new(put_chain(dev, 0, &chain), b.resp)
            },
            Expect::Refused,
        ),
        // Data-in marked readable (before the response, where data-out
        // goes): the READ has no data-in, so OVERRUN with the unused
        // data-out as residual, and the readable buffer is not written.
        row(
            "readable_descriptor_where_writable_required",
            "data-in marked readable",
            d,
            |dev| {
                let b = bufs(dev, &read10(0, 1), 512, None);
                let chain = [
                    r(b.header, REQUEST_LEN),
                    r(b.data, 512),
                    w(b.resp, RESPONSE_LEN),
                ];
                Built::new(put_chain(dev, 2, &chain), b.resp).untouched(
                    b.data,
                    512,
                    "the readable data buffer",
                )
            },
            Expect::Answered(overrun(512)),
        ),
        // Zero-length descriptors anywhere in a chain (even readable ones
        // after writable ones) describe no bytes and are skipped.
        row(
            "zero_length_descriptors",
            "zero-length descriptors all along a READ",
            d,
            |dev| {
                let b = bufs(dev, &read10(8, 4), 2048, None);
                let chain = [
                    r(b.header, 0),
                    r(b.header, 20),
                    r(b.header + 20, 0),
                    r(b.header + 20, REQUEST_LEN - 20),
                    w(b.resp, 0),
                    w(b.resp, RESPONSE_LEN),
                    r(b.data, 0),
                    w(b.data, 1024),
                    w(b.data + 1024, 0),
                    w(b.data + 1024, 1024),
                    w(1 << 40, 0),
                ];
                Built::new(put_chain(dev, 0, &chain), b.resp).image_data(b.data, 8 * BLOCK, 2048)
            },
            good(RESP_LEN + 2048),
        ),
        // An INDIRECT descriptor inside an indirect table (virtio 1.2
        // §2.7.5.3.1: the driver MUST NOT): refused whole, even though the
        // part before it is a complete WRITE request.
        row(
            "indirect_table_that_nests",
            "a WRITE whose table ends in another table",
            d,
            |dev| {
                let out = vec![0x77u8; 512];
                let b = bufs(dev, &write10(2, 1, false), 512, Some(&out));
                let inner = dev.alloc(32);
                dev.write_descs_at(inner, &[w(b.resp, RESPONSE_LEN)])
                    .unwrap();
                let table = dev.alloc(64);
                dev.write_descs_at(
                    table,
                    &[
                        RawDesc::new(b.header, REQUEST_LEN as u32, VRING_DESC_F_NEXT, 1),
                        RawDesc::new(b.data, 512, VRING_DESC_F_NEXT, 2),
                        RawDesc::new(b.resp, RESP_LEN, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3),
                        RawDesc::new(inner, 16, VRING_DESC_F_INDIRECT, 0),
                    ],
                )
                .unwrap();
                dev.write_desc(0, RawDesc::new(table, 64, VRING_DESC_F_INDIRECT, 0))
                    .unwrap();
                Built::new(0, b.resp)
            },
            Expect::Refused,
        ),
        row(
            "indirect_table_that_nests",
            "a table whose only entry is another table",
            d,
            |dev| {
                let b = bufs(dev, &write10(2, 1, false), 512, Some(&[0x77; 512]));
                let inner = dev.alloc(32);
                dev.write_descs_at(inner, &[w(b.resp, RESPONSE_LEN)])
                    .unwrap();
                let table = dev.alloc(64);
                dev.write_descs_at(table, &[RawDesc::new(inner, 16, VRING_DESC_F_INDIRECT, 0)])
                    .unwrap();
                dev.write_desc(1, RawDesc::new(table, 16, VRING_DESC_F_INDIRECT, 0))
                    .unwrap();
                Built::new(1, b.resp)
            },
            Expect::Refused,
        ),
        // `next` fields that loop: the chain never ends within the table's
        // own length, so it is refused instead of being served from its
        // first descriptors.
        row(
            "indirect_table_that_loops",
            "an indirect table whose last entry links back",
            d,
            |dev| {
                let b = bufs(dev, &read10(0, 1), 512, None);
                let table = dev.alloc(48);
                dev.write_descs_at(
                    table,
                    &[
                        RawDesc::new(b.header, REQUEST_LEN as u32, VRING_DESC_F_NEXT, 1),
                        RawDesc::new(b.resp, RESP_LEN, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
                        RawDesc::new(b.data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                    ],
                )
                .unwrap();
                dev.write_desc(0, RawDesc::new(table, 48, VRING_DESC_F_INDIRECT, 0))
                    .unwrap();
                Built::new(0, b.resp).untouched(b.data, 512, "data-in")
            },
            Expect::Refused,
        ),
        // Indirect descriptors that name no usable table, and the same
        // table well-formed.
        row(
            "indirect_table_malformed",
            "a table length that is not a whole number of descriptors",
            d,
            |dev| {
                indirect_read(dev, 0, false, |table, _| {
                    RawDesc::new(table, 40, VRING_DESC_F_INDIRECT, 0)
                })
            },
            Expect::Refused,
        ),
        row(
            "indirect_table_malformed",
            "a zero-length table",
            d,
            |dev| {
                indirect_read(dev, 1, false, |table, _| {
                    RawDesc::new(table, 0, VRING_DESC_F_INDIRECT, 0)
                })
            },
            Expect::Refused,
        ),
        row(
            "indirect_table_malformed",
            "a table outside guest memory",
            d,
            |dev| {
                indirect_read(dev, 2, false, |_, _| {
                    RawDesc::new(1 << 40, 48, VRING_DESC_F_INDIRECT, 0)
                })
            },
            Expect::Refused,
        ),
        row(
            "indirect_table_malformed",
            "a table whose last entry links past it (NEXT set)",
            d,
            |dev| {
                indirect_read(dev, 3, false, |_, past| {
                    RawDesc::new(past, 48, VRING_DESC_F_INDIRECT, 0)
                })
            },
            Expect::Refused,
        ),
        row(
            "indirect_table_malformed",
            "the same table, well-formed: served",
            d,
            |dev| {
                indirect_read(dev, 4, true, |table, _| {
                    RawDesc::new(table, 48, VRING_DESC_F_INDIRECT, 0)
                })
            },
            good(RESP_LEN + 512),
        ),
        // A chain in the descriptor table longer than the queue (virtio 1.2
        // §2.7.5.3.1: the driver MUST NOT), which in a table of queue-size
        // entries means it loops (§2.7.5.2 forbids loops): refused.
        row(
            "chain_longer_than_the_queue",
            "a chain in the table that loops from descriptor 15 back to 2",
            SMALL_QUEUE,
            |dev| {
                let b = bufs(dev, &read10(0, 14), 14 * BLOCK, None);
                // 0: header, 1: response, 2..=15: data-in, 15 -> 2 again.
                let mut chain = vec![r(b.header, REQUEST_LEN), w(b.resp, RESPONSE_LEN)];
                chain.extend((0..14u64).map(|i| w(b.data + i * BLOCK as u64, BLOCK)));
                chain[15].flags |= VRING_DESC_F_NEXT;
                chain[15].next = 2;
                put_chain(dev, 0, &chain);
                Built::new(0, b.resp).untouched(b.data, 14 * BLOCK, "data-in")
            },
            Expect::Refused,
        ),
        // An indirect table with more entries than the queue size breaks
        // the letter of the same rule, but Linux builds such tables (up to
        // seg_max + 2 = 256 entries on QEMU's 128-entry queues) and QEMU
        // serves them, so the daemon does too, bounded by the table's own
        // length.
        row(
            "chain_longer_than_the_queue",
            "40 descriptors in one indirect table on a 16-entry queue",
            SMALL_QUEUE,
            |dev| {
                let b = bufs(dev, &read10(32, 38), 38 * BLOCK, None);
                let mut table = vec![r(b.header, REQUEST_LEN), w(b.resp, RESPONSE_LEN)];
                table.extend((0..38u64).map(|i| w(b.data + i * BLOCK as u64, BLOCK)));
                indirect(dev, 3, &mut table);
                Built::new(3, b.resp).image_data(b.data, 32 * BLOCK, 38 * BLOCK)
            },
            good(RESP_LEN + 38 * BLOCK as u32),
        ),
        // The longest table a descriptor can name: 65535 entries, the
        // header in 51 one-byte pieces, the response, then 65483 one-byte
        // data-in descriptors. Served (the driver checks that the peak RSS
        // grows by little more than the slices the daemon tracks).
        row(
            "chain_longer_than_the_queue",
            "65535 one-byte descriptors in one indirect table",
            SMALL_QUEUE,
            |dev| {
                let n = usize::from(u16::MAX);
                let data_len = n - REQUEST_LEN - 1;
                let b = bufs(dev, &read10(64, 16), data_len, None);
                let mut table: Vec<RawDesc> = (0..REQUEST_LEN as u64)
                    .map(|i| r(b.header + i, 1))
                    .collect();
                table.push(w(b.resp, RESPONSE_LEN));
                table.extend((0..data_len as u64).map(|i| w(b.data + i, 1)));
                indirect(dev, 4, &mut table);
                Built::new(4, b.resp).image_data(b.data, 64 * BLOCK, 16 * BLOCK)
            },
            Expect::Answered(Response {
                residual: Some((u16::MAX as usize - REQUEST_LEN - 1 - 16 * BLOCK) as u32),
                ..good_response(RESP_LEN + 16 * BLOCK as u32)
            }),
        ),
        // An available entry naming a descriptor ≥ the queue size names no
        // chain (virtio 1.2 §2.7.6) and cannot be returned (§2.7.8: a used
        // id is a head): it is dropped. The request after it is served, and
        // it is the only one returned.
        row(
            "available_head_index_past_the_queue",
            "an available entry past the table, then a READ",
            d,
            |dev| {
                let q = dev.queue_size();
                dev.publish(q + 3).unwrap();
                let b = bufs(dev, &read10(9, 1), 512, None);
                let chain = [
                    r(b.header, REQUEST_LEN),
                    w(b.resp, RESPONSE_LEN),
                    w(b.data, 512),
                ];
                Built::new(put_chain(dev, 0, &chain), b.resp)
                    .image_data(b.data, 9 * BLOCK, 512)
                    .check(|dev| {
                        assert_eq!(
                            dev.used_idx().unwrap(),
                            1,
                            "one used element for two entries"
                        );
                    })
            },
            good(RESP_LEN + 512),
        ),
        // A `next` field naming a descriptor ≥ the queue size: the chain is
        // broken, so it is refused, not served from the descriptors before
        // the bad link.
        row(
            "next_index_past_the_queue",
            "the response's next past the table",
            d,
            |dev| {
                let q = dev.queue_size();
                let b = bufs(dev, &read10(0, 1), 512, None);
                let head = put_chain(dev, 0, &[r(b.header, REQUEST_LEN), w(b.resp, RESPONSE_LEN)]);
                dev.write_desc(
                    1,
                    RawDesc::new(
                        b.resp,
                        RESP_LEN,
                        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                        q + 5,
                    ),
                )
                .unwrap();
                Built::new(head, b.resp)
            },
            Expect::Refused,
        ),
        // Data-out shorter than the WRITE: OVERRUN (virtio 1.2 §5.6.6.1),
        // nothing written to the image, residual = the data-out offered.
        row(
            "transfer_length_disagrees_with_the_buffers",
            "data-out shorter than the WRITE",
            d,
            |dev| {
                let b = bufs(dev, &write10(0, 8, true), 1024, Some(&[0x55; 1024]));
                let chain = [
                    r(b.header, REQUEST_LEN),
                    r(b.data, 1024),
                    w(b.resp, RESPONSE_LEN),
                ];
                Built::new(put_chain(dev, 0, &chain), b.resp)
            },
            Expect::Answered(Response {
                sense_len: Some(0),
                ..overrun(1024)
            }),
        ),
        // Data-in longer than the READ: GOOD, the data, and the unused rest
        // as residual, not written.
        row(
            "transfer_length_disagrees_with_the_buffers",
            "data-in longer than the READ",
            d,
            |dev| {
                let b = bufs(dev, &read10(20, 2), 4096, None);
                let chain = [
                    r(b.header, REQUEST_LEN),
                    w(b.resp, RESPONSE_LEN),
                    w(b.data, 4096),
                ];
                Built::new(put_chain(dev, 3, &chain), b.resp)
                    .image_data(b.data, 20 * BLOCK, 1024)
                    .untouched(b.data + 1024, 3072, "data-in past the transfer")
            },
            Expect::Answered(Response {
                residual: Some(3072),
                ..good_response(RESP_LEN + 1024)
            }),
        ),
        // Data-in shorter than the READ: OVERRUN, residual = the whole
        // data-in (nothing transferred), no data written.
        row(
            "data_in_buffer_too_short",
            "data-in shorter than the READ",
            d,
            |dev| {
                let b = bufs(dev, &read10(0, 8), 2048, None);
                let chain = [
                    r(b.header, REQUEST_LEN),
                    w(b.resp, RESPONSE_LEN),
                    w(b.data, 2048),
                ];
                Built::new(put_chain(dev, 0, &chain), b.resp).untouched(b.data, 2048, "data-in")
            },
            Expect::Answered(overrun(2048)),
        ),
        // Data-in shorter than an INQUIRY's allocation length is no error
        // (SPC-4: the allocation length is a limit, and the transfer stops
        // at the buffer): GOOD, the buffer filled, residual 0.
        row(
            "data_in_buffer_too_short",
            "data-in shorter than an INQUIRY's allocation length",
            d,
            |dev| {
                let b = bufs(dev, &inquiry(false, 0, 255), 36, None);
                let chain = [
                    r(b.header, REQUEST_LEN),
                    w(b.resp, RESPONSE_LEN),
                    w(b.data, 36),
                ];
                let data = b.data;
                Built::new(put_chain(dev, 3, &chain), b.resp).check(move |dev| {
                    let inquiry = dev.read(data, 36).unwrap();
                    assert_eq!(inquiry[0], 0x00, "direct-access block device");
                    assert!(usize::from(inquiry[4]) + 5 >= 36, "standard INQUIRY data");
                })
            },
            good(RESP_LEN + 36),
        ),
        // READ(16) and WRITE(16) asking for 1 GiB (2^21 blocks) with 4 KiB
        // buffers, on a 2 GiB image (so the range itself is valid): more
        // than the MAXIMUM TRANSFER LENGTH of the Block Limits page (32
        // MiB), so CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN CDB
        // with SKSV, C/D = CDB and the field pointer at byte 10, the
        // TRANSFER LENGTH (SBC-3 §6.5.3; SPC-4 §4.5.2.4.2). Nothing is
        // allocated for what the guest asks (the driver checks the peak
        // RSS).
        row(
            "one_gib_transfer_length",
            "READ(16) of 1 GiB into 4 KiB",
            TWO_GIB_IMAGE,
            |dev| big_transfer(dev, 0, &read16(0, 1 << 21)),
            TRANSFER_TOO_LONG,
        ),
        row(
            "one_gib_transfer_length",
            "WRITE(16) of 1 GiB from 4 KiB",
            TWO_GIB_IMAGE,
            |dev| big_transfer(dev, 3, &write16(0, 1 << 21, false)),
            TRANSFER_TOO_LONG,
        ),
        // 32 MiB, the largest transfer allowed, with 4 KiB buffers: OVERRUN.
        row(
            "one_gib_transfer_length",
            "READ(16) of 32 MiB into 4 KiB",
            TWO_GIB_IMAGE,
            |dev| big_transfer(dev, 6, &read16(1 << 20, 1 << 16)),
            Expect::Answered(overrun(4096)),
        ),
        row(
            "one_gib_transfer_length",
            "WRITE(16) with FUA of 32 MiB from 4 KiB",
            TWO_GIB_IMAGE,
            |dev| big_transfer(dev, 9, &write16(1 << 20, 1 << 16, true)),
            Expect::Answered(overrun(4096)),
        ),
        // With --direct, a WRITE(10) and a READ(10) of 64 KiB whose data
        // buffer is cut into 500-byte pieces (132 of them: more than one
        // batch of iovecs to the storage, none at the image's alignment),
        // and of 1 KiB in 1-byte pieces: GOOD, and the bytes arrive. The
        // pieces used to go to the storage in batches of 64 iovecs, each
        // bounced on its own at the batch's offset: 32000 bytes at offset
        // 0, which O_DIRECT refuses with EINVAL, so the READ failed with
        // MEDIUM ERROR and the WRITE with 03/0Ch after writing part of its
        // data.
        row(
            "direct_io_with_finely_split_buffers",
            "WRITE(10) of 64 KiB in 500-byte pieces",
            DIRECT,
            |dev| split_write(dev, 0, 64, 64 * 1024, 500),
            good(RESP_LEN),
        ),
        row(
            "direct_io_with_finely_split_buffers",
            "READ(10) of 64 KiB in 500-byte pieces",
            DIRECT,
            |dev| split_read(dev, 1, 64, 64 * 1024, 500),
            good(RESP_LEN + 64 * 1024),
        ),
        row(
            "direct_io_with_finely_split_buffers",
            "WRITE(10) of 1 KiB in 1-byte pieces",
            DIRECT,
            |dev| split_write(dev, 2, 300, 1024, 1),
            good(RESP_LEN),
        ),
        row(
            "direct_io_with_finely_split_buffers",
            "READ(10) of 1 KiB in 1-byte pieces",
            DIRECT,
            |dev| split_read(dev, 3, 300, 1024, 1),
            good(RESP_LEN + 1024),
        ),
    ]
}

/// A 16-entry request queue.
const SMALL_QUEUE: Setting = Setting {
    queue_size: 16,
    ..DEFAULT_SETTING
};

/// A 2 GiB image (its first MiB a pattern, the rest a hole).
const TWO_GIB_IMAGE: Setting = Setting {
    image_len: 2 << 30,
    ..DEFAULT_SETTING
};

/// The daemon with `--direct`; the image in the target directory, whose
/// file system takes O_DIRECT.
const DIRECT: Setting = Setting {
    daemon_args: &["--direct"],
    ..DEFAULT_SETTING
};

/// A transfer longer than the MAXIMUM TRANSFER LENGTH: INVALID FIELD IN
/// CDB at the TRANSFER LENGTH (byte 10), the 4 KiB buffer not transferred.
const TRANSFER_TOO_LONG: Expect = Expect::Answered(Response {
    used_len: RESP_LEN,
    response: S_OK,
    status: CHECK_CONDITION,
    residual: Some(4096),
    sense_len: None,
    sense: Some(((ILLEGAL_REQUEST, 0x24, 0x00), [0xc0, 0, 10])),
});

/// A READ(10) of 8 blocks at descriptors `first..first + 3` whose data-in
/// descriptor is `data`'s (given the well-placed buffers).
fn outside_read(dev: &mut RawDevice, first: u16, data: fn(&Bufs) -> RawDesc) -> Built {
    let b = bufs(dev, &read10(0, 8), 4096, None);
    let chain = [r(b.header, REQUEST_LEN), w(b.resp, RESPONSE_LEN), data(&b)];
    refused_read(dev, first, &b, &chain)
}

/// `chain` at `first..`, for a READ that must be refused: its response and
/// data-in stay untouched.
fn refused_read(dev: &mut RawDevice, first: u16, b: &Bufs, chain: &[RawDesc]) -> Built {
    Built::new(put_chain(dev, first, chain), b.resp).untouched(b.data, 4096, "data-in")
}

/// A READ(10) of block 0 whose chain is an indirect table, named by the
/// descriptor `desc(table, past)` at `head`: `table` holds the request's
/// three descriptors, `past` the same with the last linking past the end.
/// Its data-in must hold block 0 if `served`, else stay untouched.
fn indirect_read(
    dev: &mut RawDevice,
    head: u16,
    served: bool,
    desc: fn(u64, u64) -> RawDesc,
) -> Built {
    let b = bufs(dev, &read10(0, 1), 512, None);
    let entries = [
        RawDesc::new(b.header, REQUEST_LEN as u32, VRING_DESC_F_NEXT, 1),
        RawDesc::new(b.resp, RESP_LEN, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        RawDesc::new(b.data, 512, VRING_DESC_F_WRITE, 0),
    ];
    let table = dev.alloc(48);
    dev.write_descs_at(table, &entries).unwrap();
    let past = dev.alloc(48);
    let mut linked_past = entries;
    linked_past[2] = RawDesc::new(b.data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3);
    dev.write_descs_at(past, &linked_past).unwrap();
    dev.write_desc(head, desc(table, past)).unwrap();
    let built = Built::new(head, b.resp);
    if served {
        built.image_data(b.data, 0, 512)
    } else {
        built.untouched(b.data, 512, "data-in")
    }
}

/// Links `table` with NEXT, writes it at a fresh address and names it by
/// an INDIRECT descriptor at `head`.
fn indirect(dev: &mut RawDevice, head: u16, table: &mut [RawDesc]) {
    let n = table.len();
    for (i, d) in table.iter_mut().enumerate().take(n - 1) {
        d.flags |= VRING_DESC_F_NEXT;
        d.next = i as u16 + 1;
    }
    let addr = dev.alloc(16 * n as u64);
    dev.write_descs_at(addr, table).unwrap();
    dev.write_desc(
        head,
        RawDesc::new(addr, 16 * n as u32, VRING_DESC_F_INDIRECT, 0),
    )
    .unwrap();
}

/// READ(16) or WRITE(16) `cdb` with a 4 KiB data buffer at
/// `first..first + 3`.
fn big_transfer(dev: &mut RawDevice, first: u16, cdb: &[u8]) -> Built {
    let write = cdb[0] == 0x8a;
    let b = bufs(dev, cdb, 4096, Some(&[0x66; 4096]));
    let chain = if write {
        [
            r(b.header, REQUEST_LEN),
            r(b.data, 4096),
            w(b.resp, RESPONSE_LEN),
        ]
    } else {
        [
            r(b.header, REQUEST_LEN),
            w(b.resp, RESPONSE_LEN),
            w(b.data, 4096),
        ]
    };
    Built::new(put_chain(dev, first, &chain), b.resp)
}

/// The bytes `split_write` writes at `lba`.
fn fresh(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ 0xa5).collect()
}

/// WRITE(10) of `len` fresh bytes at `lba`, the data-out cut into `piece`
/// bytes, in an indirect table named at `head`.
fn split_write(dev: &mut RawDevice, head: u16, lba: u32, len: usize, piece: usize) -> Built {
    let blocks = (len / BLOCK) as u16;
    let out = fresh(len);
    let b = bufs(dev, &write10(lba, blocks, false), len, Some(&out));
    let chain = finely_split(dev, head, &b, len, piece, true);
    Built::new(chain, b.resp).writes(lba as usize * BLOCK, out)
}

/// READ(10) of `len` bytes at `lba`, the data-in cut into `piece` bytes,
/// in an indirect table named at `head`.
fn split_read(dev: &mut RawDevice, head: u16, lba: u32, len: usize, piece: usize) -> Built {
    let blocks = (len / BLOCK) as u16;
    let b = bufs(dev, &read10(lba, blocks), len, None);
    let chain = finely_split(dev, head, &b, len, piece, false);
    Built::new(chain, b.resp).image_data(b.data, lba as usize * BLOCK, len)
}

/// Declares each test that runs its rows of a table through `$driver`
/// (with its doc comment), and `$names`, the list of them.
macro_rules! table_tests {
    ($driver:ident, $names:ident: $($(#[$doc:meta])* $name:ident,)*) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                $driver(stringify!($name));
            }
        )*
        const $names: &[&str] = &[$(stringify!($name)),*];
    };
}

table_tests! {
    run_chain_cases, CHAIN_TESTS:
    /// Descriptors outside guest memory — past its end, far beyond it, in
    /// the hole between two regions, or running from a region into that
    /// hole — and a WRITE whose data-out is outside: each chain is
    /// completed with a used length of 0 and nothing written or executed.
    descriptor_outside_guest_memory,
    /// A buffer that is contiguous in guest-physical memory but spans two
    /// memory regions is served like any other.
    descriptor_straddling_two_memory_regions,
    /// The 51-byte request header in 51 one-byte descriptors: served.
    header_split_over_one_byte_descriptors,
    /// Device-writable where device-readable is required: the header (no
    /// request: S_FAILURE in the first 108 writable bytes) or the data-out
    /// (OVERRUN).
    writable_descriptor_where_readable_required,
    /// Device-readable where device-writable is required: the response
    /// (refused) or the data-in (OVERRUN).
    readable_descriptor_where_writable_required,
    /// Zero-length descriptors anywhere in a chain are skipped.
    zero_length_descriptors,
    /// An indirect table with an INDIRECT descriptor inside: refused whole.
    indirect_table_that_nests,
    /// An indirect table whose `next` fields loop: refused.
    indirect_table_that_loops,
    /// Indirect descriptors that name no usable table — a length that is
    /// not a whole number of descriptors, a zero length, a table outside
    /// guest memory, a last entry linking past the table — are refused;
    /// the same table well-formed is served.
    indirect_table_malformed,
    /// A chain in the table longer than the queue is refused; indirect
    /// tables longer than the queue, up to 65535 entries, are served.
    chain_longer_than_the_queue,
    /// An available entry naming a descriptor past the table is dropped.
    available_head_index_past_the_queue,
    /// A `next` field past the table breaks the chain: refused.
    next_index_past_the_queue,
    /// The CDB's transfer length disagrees with the buffers: OVERRUN for
    /// short data-out, a residual for long data-in.
    transfer_length_disagrees_with_the_buffers,
    /// Data-in shorter than a READ (OVERRUN) or than an INQUIRY's
    /// allocation length (no error).
    data_in_buffer_too_short,
    /// 1 GiB transfers refused by the MAXIMUM TRANSFER LENGTH, 32 MiB ones
    /// into 4 KiB buffers OVERRUN, nothing allocated for either.
    one_gib_transfer_length,
    /// With `--direct`, data buffers cut into 500-byte and 1-byte pieces.
    direct_io_with_finely_split_buffers,
}

/// Every row belongs to a test that runs it.
#[test]
fn every_hostile_case_is_run() {
    for case in chain_cases() {
        assert!(
            CHAIN_TESTS.contains(&case.test),
            "{}: {} is not a test",
            case.name,
            case.test
        );
    }
    for case in message_cases() {
        assert!(
            MESSAGE_TESTS.contains(&case.test),
            "{}: {} is not a test",
            case.name,
            case.test
        );
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------
// Ring indexes
// ---------------------------------------------------------------------

/// The driver moves avail.idx more than a queue size ahead (virtio 1.2
/// §2.7.6: the ring holds queue-size entries). Nothing on the queue is
/// served while the index is broken — neither the bogus entries nor the
/// valid one behind them — and nothing spins; once the driver puts the
/// index right, the waiting request is served.
#[test]
fn avail_idx_jumps_more_than_the_queue_size() {
    let env = Env::new();
    let mut dev = env.raw();
    let b = bufs(&mut dev, &read10(3, 1), 512, None);
    let head = put_chain(
        &dev,
        0,
        &[
            r(b.header, REQUEST_LEN),
            w(b.resp, RESPONSE_LEN),
            w(b.data, 512),
        ],
    );
    dev.write_avail_entry(0, head).unwrap();
    dev.set_avail_idx(dev.queue_size() + 1).unwrap();
    dev.kick().unwrap();
    assert_eq!(dev.wait_used(QUIET).unwrap(), None);
    assert_eq!(dev.used_idx().unwrap(), 0);
    assert_untouched(&dev, b.resp, RESPONSE_LEN, "the response");
    // Put right: one entry available.
    dev.set_avail_idx(1).unwrap();
    dev.kick().unwrap();
    assert_eq!(
        completion(&mut dev),
        UsedElem {
            id: 0,
            len: RESP_LEN + 512
        }
    );
    let resp = Resp::parse(&dev.read(b.resp, RESPONSE_LEN).unwrap());
    assert_eq!((resp.response, resp.status), (S_OK, GOOD));
    assert_eq!(
        dev.read(b.data, 512).unwrap(),
        env.expected[3 * BLOCK..4 * BLOCK]
    );
    // None of the entries past the index put right came back later.
    assert_eq!(dev.used_idx().unwrap(), 1, "only the request put right");
    env.assert_still_serving(Some(dev));
}

// ---------------------------------------------------------------------
// Memory table and ring addresses
// ---------------------------------------------------------------------

/// Makes `n` READ(10)s of `blocks` each available (not kicked), their
/// headers and responses in region 0 and their data-in from guest address
/// `data` up; returns each one's (LBA, response address, data address).
fn reads_into(
    dev: &mut RawDevice,
    first: u16,
    n: u16,
    blocks: u16,
    data: u64,
) -> Vec<(u32, u64, u64)> {
    let len = usize::from(blocks) * BLOCK;
    let image_blocks = (IMAGE_LEN / BLOCK) as u32;
    (0..n)
        .map(|i| {
            let lba = u32::from(i) * u32::from(blocks) % image_blocks;
            let b = bufs(dev, &read10(lba, blocks), 0, None);
            let addr = data + u64::from(i) * len as u64;
            dev.write(addr, &vec![CANARY; len]).unwrap();
            let head = put_chain(
                dev,
                first + 3 * i,
                &[
                    r(b.header, REQUEST_LEN),
                    w(b.resp, RESPONSE_LEN),
                    w(addr, len),
                ],
            );
            dev.publish(head).unwrap();
            (lba, b.resp, addr)
        })
        .collect()
}

/// SET_MEM_TABLE while requests are in flight. Requests made available
/// before a table that drops the region holding their data-in are refused
/// when the device gets to them (used length 0, nothing written: their
/// buffers are outside memory now). Requests kicked just before such a
/// table races them are each completed exactly once, either served in
/// full under the table they were popped with (GOOD, the image's bytes:
/// the daemon keeps the old mapping alive until the batch is done) or
/// refused; no completion is lost or doubled, nothing is written to the
/// response of a refused one. With the region back, requests are served.
#[test]
fn memory_table_changes_while_io_is_in_flight() {
    let env = Env::new();
    let region1 = 4u64 << 20;
    let config = RawConfig {
        regions: vec![
            RegionSpec {
                gpa: 0,
                size: 4 << 20,
            },
            RegionSpec {
                gpa: region1,
                size: 8 << 20,
            },
        ],
        ..RawConfig::default()
    };
    // The request queue stays disabled until the table has changed, so
    // nothing can serve the first requests early.
    let config = RawConfig {
        enable_request_queue: false,
        ..config
    };
    let mut dev = env.raw_with(&config);

    // Available before region 1 goes away, served after.
    let reqs = reads_into(&mut dev, 0, 8, 8, region1);
    dev.set_mem_table(&[0]).unwrap();
    dev.enable_request_queue().unwrap();
    for i in 0..8u32 {
        assert_eq!(completion(&mut dev), UsedElem { id: 3 * i, len: 0 });
        let (_, resp, data) = reqs[i as usize];
        assert_untouched(&dev, resp, RESPONSE_LEN, "a refused request's response");
        assert_untouched(&dev, data, 8 * BLOCK, "a refused request's data-in");
    }

    // Region 1 back; 64 reads of 128 KiB kicked, then region 1 dropped.
    dev.set_mem_table(&[0, 1]).unwrap();
    const N: u16 = 64;
    const BLOCKS: u16 = 256;
    let len = usize::from(BLOCKS) * BLOCK;
    let reqs = reads_into(&mut dev, 0, N, BLOCKS, region1);
    dev.kick().unwrap();
    dev.set_mem_table(&[0]).unwrap();
    let mut seen = vec![false; usize::from(N)];
    for _ in 0..N {
        let used = completion(&mut dev);
        let i = (used.id / 3) as usize;
        assert!(used.id % 3 == 0 && i < usize::from(N), "bad id {}", used.id);
        assert!(!seen[i], "request {i} completed twice");
        seen[i] = true;
        let (lba, resp, data) = reqs[i];
        if used.len == 0 {
            assert_untouched(&dev, resp, RESPONSE_LEN, "a refused request's response");
        } else {
            assert_eq!(used.len, RESP_LEN + len as u32);
            let resp = Resp::parse(&dev.read(resp, RESPONSE_LEN).unwrap());
            assert_eq!((resp.response, resp.status, resp.residual), (S_OK, GOOD, 0));
            let start = lba as usize * BLOCK;
            assert_eq!(
                dev.read(data, len).unwrap(),
                env.expected[start..start + len]
            );
        }
    }
    assert_eq!(
        dev.wait_used(QUIET).unwrap(),
        None,
        "more completions than requests"
    );

    // Region 1 back: served again.
    dev.set_mem_table(&[0, 1]).unwrap();
    let reqs = reads_into(&mut dev, 0, 1, 2, region1);
    dev.kick().unwrap();
    assert_eq!(
        completion(&mut dev),
        UsedElem {
            id: 0,
            len: RESP_LEN + 1024
        }
    );
    let (lba, _, data) = reqs[0];
    assert_eq!(lba, 0);
    assert_eq!(dev.read(data, 1024).unwrap(), env.expected[..1024]);
    // No racing READ came back a second time after the quiet watch: the
    // used ring holds the 8 refused, the 64 and this one.
    assert_eq!(
        dev.used_idx().unwrap(),
        8 + N + 1,
        "more completions than requests"
    );
    env.assert_still_serving(Some(dev));
}

/// A memory table whose region runs past the end of its file (8 MiB
/// announced from a 4 MiB memfd). mmap accepts it, but the first access
/// beyond the file raises SIGBUS — before the fix, a response written
/// there killed the daemon. The table is now refused (REPLY_ACK failure),
/// unmapped, and the connection ended. (vhost-user-backend publishes a
/// table before the backend can examine it, so a queue already serving at
/// that instant could still touch it: see ARCHITECTURE.md.)
#[test]
fn memory_table_region_past_the_end_of_its_file() {
    let env = Env::new();
    // The request queue is enabled only after the table was sent (see
    // below), so nothing is served while the daemon examines it.
    let mut dev = env.raw_with(&RawConfig {
        enable_request_queue: false,
        ..RawConfig::default()
    });
    let b = bufs(&mut dev, &read10(0, 8), 4096, None);
    let head = put_chain(
        &dev,
        0,
        &[
            r(b.header, REQUEST_LEN),
            w(6 << 20, RESPONSE_LEN),
            w(b.data, 4096),
        ],
    );
    dev.publish(head).unwrap();
    let table = [vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 8 << 20,
        userspace_addr: dev.host_addr(0).unwrap(),
        mmap_offset: 0,
        mmap_handle: dev.region_fd(0).unwrap(),
    }];
    let err = dev
        .vhost_frontend()
        .set_mem_table(&table)
        .expect_err("a region past the end of its file accepted");
    assert!(
        matches!(
            err,
            vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::BackendInternalError)
        ),
        "{err:?}"
    );
    // The connection is gone: the queue cannot be enabled, and the request
    // made available (its response would lie past the file) is never
    // served.
    assert!(dev.enable_request_queue().is_err());
    assert!(dev.vhost_frontend().get_features().is_err());
    dev.kick().unwrap();
    assert_eq!(dev.wait_used(QUIET).unwrap(), None);
    // The connection is over, so it need not be closed for the daemon to
    // serve a fresh one: kept, to look at its used ring afterwards.
    env.assert_still_serving(None);
    assert_eq!(
        dev.used_idx().unwrap(),
        0,
        "the request was completed after all"
    );
    assert_untouched(&dev, b.data, 4096, "the request's data-in");
}

/// SET_VRING_ADDR with ring addresses in no memory region: the daemon
/// cannot translate them, answers the message with a failure (REPLY_ACK)
/// and ends the connection (vhost-user-backend treats a failed request as
/// fatal to the connection); it listens again.
#[test]
fn vring_addresses_outside_memory() {
    let env = Env::new();
    let mut dev = env.raw();
    let (kick, call) = (
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    let err = dev
        .setup_vring_at(3, 64, [0x10, 0x2000, 0x4000], &kick, &call)
        .expect_err("ring addresses outside memory accepted");
    assert!(err.to_string().contains("SET_VRING_ADDR"), "{err}");
    // The connection is gone.
    assert!(dev.vhost_frontend().get_features().is_err());
    env.assert_still_serving(Some(dev));
}

/// Ring addresses that start inside memory but whose used ring runs past
/// its end: accepted (the start translates), and the request made
/// available is popped and executed, but its used element would lie past
/// the end of memory, so it can never be returned: the daemon gives up on
/// that queue (virtio 1.2 §2.1.2 lets a device stop using a queue the
/// driver broke) without signalling, and without ending the worker thread
/// — queue 2, served by the same thread, keeps working.
#[test]
fn vring_running_past_the_end_of_memory() {
    let env = Env::new();
    let mut dev = env.raw();
    let end = 4u64 << 20;
    let used = end - 4;
    // A READ(10) in descriptors 0-2 of queue 3's table, made available.
    let (kick, call, b) = queue_at_with_one_read(&mut dev, 3, 256, [0x30000, 0x38000, used]);
    kick.write(1).unwrap();
    // The worker looks at the queue, finds its used ring outside memory and
    // leaves it alone: the READ is not even executed, since it could never
    // be returned (its response and data-in stay untouched).
    env.wait_for_log("rings outside guest memory");
    assert!(
        dev.read(b.resp, RESPONSE_LEN)
            .unwrap()
            .iter()
            .all(|&x| x == CANARY),
        "queue 3's request was executed"
    );
    assert!(
        dev.read(b.data, 512).unwrap().iter().all(|&x| x == CANARY),
        "queue 3's data-in was written"
    );
    // Queue 2, same worker thread, still served.
    let (resp, data) = good_read(&mut dev, 0, 30, 2);
    assert_eq!((resp.response, resp.status), (S_OK, GOOD));
    assert_eq!(data, env.expected[30 * BLOCK..32 * BLOCK]);
    assert_eq!(call.read().ok(), None, "queue 3 signalled a completion");
    assert_eq!(
        dev.read(used + 2, 2).unwrap(),
        [0, 0],
        "queue 3's used index moved"
    );
    env.assert_still_serving(Some(dev));
}

// ---------------------------------------------------------------------
// The vhost-user socket itself
// ---------------------------------------------------------------------

fn raw_socket(sock: &Path) -> RawSocket {
    RawSocket::connect(sock, WAIT).unwrap()
}

// ---------------------------------------------------------------------
// vhost-user message cases: one table, one driver
// ---------------------------------------------------------------------
//
// A malformed vhost-user message — a size field that disagrees with what
// the request carries, file descriptors where a request takes none — ends
// the connection (vhost-user-backend: InvalidMessage), and the daemon
// listens again. Each row sends one message over a raw socket; the rows of
// a test share a connection until one ends it.

/// What the daemon answers a row's message with.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// The connection ends.
    Closed,
    /// GET_FEATURES answered: 8 bytes, VIRTIO_F_VERSION_1 among them (the
    /// raw socket is understood).
    Features,
}

/// A row of the table.
struct MessageCase {
    /// The test that runs it.
    test: &'static str,
    /// What it is, for failure messages.
    name: &'static str,
    /// Sends the message; `fds` are two spare descriptors to attach.
    send: fn(&mut RawSocket, fds: [RawFd; 2]),
    outcome: Outcome,
}

/// Runs the rows of `test` in order, a fresh connection whenever the last
/// one ended; the daemon stays alive throughout, and afterwards a fresh
/// connection reads the image correctly.
fn run_message_cases(test: &str) {
    let cases: Vec<MessageCase> = message_cases()
        .into_iter()
        .filter(|c| c.test == test)
        .collect();
    assert!(!cases.is_empty(), "no rows for {test}");
    let mut env = Env::new();
    let spare = [spare_fd().unwrap(), spare_fd().unwrap()];
    let fds = [spare[0].as_raw_fd(), spare[1].as_raw_fd()];
    let mut socket: Option<RawSocket> = None;
    for case in &cases {
        let what = format!("{test}: {}", case.name);
        let s = socket.get_or_insert_with(|| raw_socket(&env.sock));
        (case.send)(s, fds);
        let answer = s.answer(WAIT).unwrap();
        match case.outcome {
            Outcome::Closed => {
                assert_eq!(answer, Answer::Closed, "{what}");
                socket = None;
            }
            Outcome::Features => match answer {
                Answer::Reply {
                    request,
                    size,
                    body,
                } => {
                    assert_eq!((request, size), (GET_FEATURES, 8), "{what}");
                    let features = u64::from_le_bytes(body[..8].try_into().unwrap());
                    assert_ne!(features & (1 << 32), 0, "{what}: VIRTIO_F_VERSION_1");
                }
                other => panic!("{what}: {other:?}"),
            },
        }
        env.assert_alive();
    }
    drop(socket);
    env.assert_still_serving(None);
}

/// The table: every vhost-user message case, by test.
fn message_cases() -> Vec<MessageCase> {
    fn row(
        test: &'static str,
        name: &'static str,
        send: fn(&mut RawSocket, [RawFd; 2]),
        outcome: Outcome,
    ) -> MessageCase {
        MessageCase {
            test,
            name,
            send,
            outcome,
        }
    }
    const FLAGS: u32 = VHOST_USER_VERSION;
    vec![
        row(
            "vhost_user_messages_with_wrong_sizes",
            "a well-formed GET_FEATURES",
            |s, _| s.send(GET_FEATURES, FLAGS, 0, &[], &[]).unwrap(),
            Outcome::Features,
        ),
        row(
            "vhost_user_messages_with_wrong_sizes",
            "then SET_VRING_NUM with a 4-byte body",
            |s, _| {
                s.send(
                    SET_VRING_NUM,
                    FLAGS | VHOST_USER_NEED_REPLY,
                    4,
                    &[2, 0, 0, 0],
                    &[],
                )
                .unwrap()
            },
            Outcome::Closed,
        ),
        row(
            "vhost_user_messages_with_wrong_sizes",
            "SET_FEATURES with a 16-byte body",
            |s, _| s.send(SET_FEATURES, FLAGS, 16, &[0u8; 16], &[]).unwrap(),
            Outcome::Closed,
        ),
        row(
            "vhost_user_messages_with_wrong_sizes",
            "a header announcing more than the 4 KiB maximum",
            |s, _| {
                s.send(SET_VRING_NUM, FLAGS, 0x10_0000, &[0u8; 8], &[])
                    .unwrap()
            },
            Outcome::Closed,
        ),
        row(
            "vhost_user_messages_with_unexpected_fds",
            "GET_FEATURES with a descriptor attached",
            |s, [fd, _]| s.send(GET_FEATURES, FLAGS, 0, &[], &[fd]).unwrap(),
            Outcome::Closed,
        ),
        row(
            "vhost_user_messages_with_unexpected_fds",
            "SET_VRING_NUM with two descriptors attached",
            |s, fds| {
                let mut body = [0u8; 8];
                body[..4].copy_from_slice(&2u32.to_le_bytes());
                body[4..].copy_from_slice(&64u32.to_le_bytes());
                s.send(SET_VRING_NUM, FLAGS, 8, &body, &fds).unwrap()
            },
            Outcome::Closed,
        ),
        row(
            "vhost_user_messages_with_unexpected_fds",
            "SET_VRING_CALL with a descriptor, saying it has none (bit 8)",
            |s, [fd, _]| {
                let body = (2u64 | 0x100).to_le_bytes();
                s.send(SET_VRING_CALL, FLAGS, 8, &body, &[fd]).unwrap()
            },
            Outcome::Closed,
        ),
    ]
}

table_tests! {
    run_message_cases, MESSAGE_TESTS:
    /// Messages whose size field disagrees with what the request carries:
    /// a SET_VRING_NUM with a 4-byte body, a SET_FEATURES with a 16-byte
    /// body, a header announcing more than the 4 KiB maximum. A well-formed
    /// GET_FEATURES first shows the raw socket is understood.
    vhost_user_messages_with_wrong_sizes,
    /// File descriptors attached where a request takes none (GET_FEATURES,
    /// SET_VRING_NUM), or one attached to a SET_VRING_CALL that says it
    /// has none (bit 8).
    vhost_user_messages_with_unexpected_fds,
}

// ---------------------------------------------------------------------
// Bounded passes: no guest can pin a worker or hold a queue's stop up
// ---------------------------------------------------------------------

/// Sets up queue `queue` with `size` entries and its rings at the guest
/// addresses `[desc, avail, used]`, enables it, and makes a READ(10) of
/// block 0 available in its descriptors 0-2 (without a kick). Returns the
/// queue's kick and call eventfds and the READ's buffers.
fn queue_at_with_one_read(
    dev: &mut RawDevice,
    queue: usize,
    size: u16,
    [desc, avail, used]: [u64; 3],
) -> (EventFd, EventFd, Bufs) {
    let (kick, call) = (
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    let addrs = [
        dev.host_addr(desc).unwrap(),
        dev.host_addr(avail).unwrap(),
        dev.host_addr(used).unwrap(),
    ];
    dev.setup_vring_at(queue, size, addrs, &kick, &call)
        .unwrap();
    dev.vhost_frontend().set_vring_enable(queue, true).unwrap();
    let b = bufs(dev, &read10(0, 1), 512, None);
    let chain = [
        r(b.header, REQUEST_LEN),
        w(b.resp, RESPONSE_LEN),
        w(b.data, 512),
    ];
    for (i, d) in chain.iter().enumerate() {
        let mut d = *d;
        if i < 2 {
            d.flags |= VRING_DESC_F_NEXT;
            d.next = i as u16 + 1;
        }
        dev.write_descs_at(desc + 16 * i as u64, &[d]).unwrap();
    }
    dev.write(avail + 4, &0u16.to_le_bytes()).unwrap();
    dev.write(avail + 2, &1u16.to_le_bytes()).unwrap();
    (kick, call, b)
}

/// A queue — request queue 3, or the control queue — whose available ring
/// is at guest address 0, with `avail.idx = 1` and a kick. virtio allows the
/// address; virtio-queue pops nothing from such a ring, which used to make
/// the worker loop for ever (pop: nothing, re-enable notifications: work
/// available), holding its lock: a host core at 100%, every queue of the
/// thread dead, and the next connection never served. Now the queue is
/// refused (logged), the worker stays idle, the thread's other queue keeps
/// working, and a fresh connection is served after this one ends.
#[test]
fn available_ring_at_guest_address_zero() {
    for queue in [3usize, 0] {
        let env = Env::new();
        let mut dev = env.raw();
        // Descriptor table and used ring clear of the other queues' rings
        // and of the buffers `bufs` allocates; the available ring at 0 (over
        // the control queue's descriptor table, unused here).
        let (kick, call, b) = queue_at_with_one_read(&mut dev, queue, 64, [0x30000, 0, 0x38000]);
        kick.write(1).unwrap();
        env.wait_for_log(&format!("queue {queue}: malformed request from the guest"));
        // Kicked again and again: each kick is one short look, no loop.
        let cpu_before = cpu_time(env.pid());
        let window = Instant::now();
        for _ in 0..20 {
            kick.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        // The same worker thread serves queue 2.
        let (resp, data) = good_read(&mut dev, 0, 30, 2);
        assert_eq!((resp.response, resp.status), (S_OK, GOOD));
        assert_eq!(data, env.expected[30 * BLOCK..32 * BLOCK]);
        let busy = cpu_time(env.pid()) - cpu_before;
        let elapsed = window.elapsed();
        // A spinning worker uses the whole window; a few kicks use
        // next to nothing (clock ticks are 10 ms here).
        assert!(
            busy < elapsed / 2,
            "queue {queue}: the daemon used {busy:?} of CPU in {elapsed:?}"
        );
        assert_untouched(&dev, b.resp, RESPONSE_LEN, "the refused queue's response");
        assert_eq!(call.read().ok(), None, "the refused queue signalled");
        env.assert_still_serving(Some(dev));
    }
}

/// GET_VRING_BASE (QEMU sends it at VM stop, reset, migration and
/// shutdown) while the worker is busy with slow requests: 255 FUA WRITEs
/// of 1 MiB each, the VMM stopping the queue 20 ms into them. The pass
/// that serves them notices the queue stopped and ends, so the answer
/// comes in bounded time (it used to wait for ever: the pass spun on the
/// stopped queue while holding the lock stopping it needs). Every request
/// the returned index accounts for was returned to the used ring, and
/// none after it was executed.
#[test]
fn queue_stopped_behind_slow_requests() {
    let env = Env::new();
    let mut dev = env.raw();
    // The writes put back the bytes the image holds: its contents stay.
    let b = bufs(
        &mut dev,
        &write16(0, (IMAGE_LEN / BLOCK) as u32, true),
        IMAGE_LEN,
        Some(&env.expected),
    );
    let head = put_chain(
        &dev,
        0,
        &[
            r(b.header, REQUEST_LEN),
            r(b.data, IMAGE_LEN),
            w(b.resp, RESPONSE_LEN),
        ],
    );
    let count = dev.queue_size() - 1;
    for _ in 0..count {
        dev.publish(head).unwrap();
    }
    dev.kick().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (tx, rx) = mpsc::channel();
    let sent = Instant::now();
    std::thread::spawn(move || {
        let base = dev.vhost_frontend().get_vring_base(2);
        let _ = tx.send((base, dev));
    });
    let (base, dev) = rx
        .recv_timeout(WAIT)
        .expect("GET_VRING_BASE is answered behind slow requests");
    let base = base.expect("GET_VRING_BASE") as u16;
    eprintln!(
        "GET_VRING_BASE answered after {:?}: {base} of {count} taken",
        sent.elapsed()
    );
    assert!(
        base < count,
        "all {count} writes were done before the queue was stopped: nothing tested"
    );
    assert_eq!(
        dev.used_idx().unwrap(),
        base,
        "every request taken was returned"
    );
    let resp = Resp::parse(&dev.read(b.resp, RESPONSE_LEN).unwrap());
    if base > 0 {
        assert_eq!((resp.response, resp.status), (S_OK, GOOD), "{resp:?}");
    }
    env.assert_still_serving(Some(dev));
}

// ---------------------------------------------------------------------
// O_DIRECT with finely split guest buffers (the rows of
// direct_io_with_finely_split_buffers)
// ---------------------------------------------------------------------

/// `len` bytes at `data` cut into descriptors of `piece` bytes (the last
/// shorter), after the header and before or after the response as virtio
/// orders them, in an indirect table at a fresh address; the chain's head
/// is descriptor `head` of the queue's table.
fn finely_split(
    dev: &mut RawDevice,
    head: u16,
    b: &Bufs,
    len: usize,
    piece: usize,
    write: bool,
) -> u16 {
    let mut data = Vec::new();
    let mut at = 0;
    while at < len {
        let n = piece.min(len - at);
        data.push(if write {
            r(b.data + at as u64, n)
        } else {
            w(b.data + at as u64, n)
        });
        at += n;
    }
    let mut descs = vec![r(b.header, REQUEST_LEN)];
    if write {
        descs.extend(data);
        descs.push(w(b.resp, RESPONSE_LEN));
    } else {
        descs.push(w(b.resp, RESPONSE_LEN));
        descs.extend(data);
    }
    let count = descs.len();
    for (i, d) in descs.iter_mut().enumerate() {
        if i + 1 < count {
            d.flags |= VRING_DESC_F_NEXT;
            d.next = i as u16 + 1;
        }
    }
    let table = dev.alloc(16 * count as u64);
    dev.write_descs_at(table, &descs).unwrap();
    dev.write_desc(
        head,
        RawDesc::new(table, 16 * count as u32, VRING_DESC_F_INDIRECT, 0),
    )
    .unwrap();
    head
}

// ---------------------------------------------------------------------
// Protocol features never offered
// ---------------------------------------------------------------------

/// The daemon offers MQ, REPLY_ACK, INFLIGHT_SHMFD and LOG_SHMFD only, but
/// the vhost crate records whatever SET_PROTOCOL_FEATURES acks. A VMM that
/// acks CONFIG, CONFIGURE_MEM_SLOTS and RESET_DEVICE anyway gets: GET_CONFIG
/// and SET_CONFIG refused (the configuration space stays as it was: a READ
/// still answers with the default 96-byte sense area), and ADD_MEM_REG
/// accepted only up to the 8 regions
/// SET_MEM_TABLE can carry (the ninth is refused and the connection ends).
/// And SET_LOG_BASE (LOG_SHMFD, offered) with a log file that is not a
/// sealed memfd is refused: a VMM could shrink it under the daemon.
/// The daemon serves the next connection each time.
#[test]
fn protocol_features_never_offered_stay_unusable() {
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    use vhost::vhost_user::VhostUserFrontend;
    let unoffered = P::CONFIG | P::CONFIGURE_MEM_SLOTS | P::LOG_SHMFD | P::RESET_DEVICE;
    let env = Env::new();

    // CONFIG, over a raw socket: the vhost crate's frontend waits for ever
    // on a GET_CONFIG answer that reports failure.
    let flags = VHOST_USER_VERSION;
    let mut s = raw_socket(&env.sock);
    let acked = (P::REPLY_ACK | unoffered).bits().to_le_bytes();
    s.send(SET_PROTOCOL_FEATURES, flags, 8, &acked, &[])
        .unwrap();
    // VhostUserConfig: offset, size, flags, then `size` bytes.
    let mut body = Vec::new();
    for field in [0u32, 36, 0] {
        body.extend_from_slice(&field.to_le_bytes());
    }
    body.extend_from_slice(&[0u8; 36]);
    s.send(GET_CONFIG, flags, body.len() as u32, &body, &[])
        .unwrap();
    match s.answer(WAIT).unwrap() {
        // The vhost-user specification: a zero-size payload is a failure.
        Answer::Reply {
            request,
            size,
            body,
        } => assert_eq!(
            (request, size, &body[4..8]),
            (GET_CONFIG, 12, &[0u8; 4][..]),
            "GET_CONFIG answered with the configuration space"
        ),
        other => panic!("GET_CONFIG: {other:?}"),
    }
    // sense_size 0: every later response would carry no sense data.
    let mut body = Vec::new();
    for field in [20u32, 4, 1, 0] {
        body.extend_from_slice(&field.to_le_bytes());
    }
    s.send(
        SET_CONFIG,
        flags | VHOST_USER_NEED_REPLY,
        body.len() as u32,
        &body,
        &[],
    )
    .unwrap();
    // Refused: vhost-user-backend ends the connection on a failed request.
    assert_eq!(s.answer(WAIT).unwrap(), Answer::Closed, "SET_CONFIG");
    drop(s);

    // RESET_DEVICE, as SET_VRING_ENABLE 0 on every queue would: the
    // connection goes on; the disabled queue is not served.
    let mut dev = env.raw();
    let f = dev.vhost_frontend();
    f.set_protocol_features(P::MQ | P::REPLY_ACK | unoffered)
        .unwrap();
    f.reset_device().unwrap();
    drop(dev);

    // LOG_SHMFD, with a log that is not a sealed memfd.
    let mut dev = env.raw();
    let log = spare_fd().unwrap();
    let f = dev.vhost_frontend();
    f.set_protocol_features(P::MQ | P::REPLY_ACK | unoffered)
        .unwrap();
    let region = vhost::VhostUserDirtyLogRegion {
        mmap_size: 4096,
        mmap_offset: 0,
        mmap_handle: log.as_raw_fd(),
    };
    assert!(
        f.set_log_base(0, Some(region)).is_err(),
        "SET_LOG_BASE accepted"
    );
    drop(dev);

    // CONFIGURE_MEM_SLOTS: the connection's table has one region; seven
    // more are taken, the ninth is refused.
    let mut dev = env.raw();
    let regions: Vec<std::fs::File> = (0..8).map(|_| spare_fd().unwrap()).collect();
    let f = dev.vhost_frontend();
    f.set_protocol_features(P::MQ | P::REPLY_ACK | unoffered)
        .unwrap();
    for (i, fd) in regions.iter().enumerate() {
        let info = vhost::VhostUserMemoryRegionInfo {
            guest_phys_addr: 0x1000_0000 + 0x10_0000 * i as u64,
            memory_size: 4096,
            userspace_addr: 0x7000_0000_0000 + 0x10_0000 * i as u64,
            mmap_offset: 0,
            mmap_handle: fd.as_raw_fd(),
        };
        let added = f.add_mem_region(&info);
        if i < 7 {
            added.unwrap_or_else(|e| panic!("region {}: {e}", i + 2));
        } else {
            assert!(added.is_err(), "a ninth memory region was added");
        }
    }
    env.assert_still_serving(Some(dev));
}

/// A kick "eventfd" that is the read end of a pipe whose write end is
/// closed: epoll reports it readable (end of file, hang-up) at once and
/// for ever. The worker thread used to read it, fail, and go round again:
/// a host core at 100%. Now the descriptor is no longer watched (logged),
/// the worker stays idle, and the next connection is served.
#[test]
fn a_kick_descriptor_that_always_hangs_up_is_dropped() {
    let env = Env::new();
    let mut dev = env.raw();
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the write end is ours, closed once.
    unsafe { libc::close(fds[1]) };
    // SAFETY: the read end is ours, given away to the EventFd.
    let kick = unsafe { EventFd::from_raw_fd(fds[0]) };
    dev.vhost_frontend().set_vring_kick(2, &kick).unwrap();
    env.wait_for_log("kick descriptor");
    let cpu_before = cpu_time(env.pid());
    let window = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let busy = cpu_time(env.pid()) - cpu_before;
    let elapsed = window.elapsed();
    assert!(
        busy < elapsed / 2,
        "the daemon used {busy:?} of CPU in {elapsed:?}"
    );
    env.assert_still_serving(Some(dev));
}
