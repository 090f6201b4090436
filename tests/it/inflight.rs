//! In-flight tracking over the real socket (vhost-user "Inflight I/O
//! tracking", VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), with the region's
//! layout written out from the specification:
//!
//! ```text
//! queue region: u64 features; u16 version; u16 desc_num;
//!               u16 last_batch_head; u16 used_idx; DescStateSplit desc[];
//! DescStateSplit: u8 inflight; u8 padding[5]; u16 next; u64 counter;
//! ```
//!
//! each queue's part `align_up(16 * queue_size + 2, 64)` bytes long
//! (libvhost-user's `vu_inflight_queue_size`, which QEMU sizes the region
//! with).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vhost_scsi_frontend::cdb::{read10, write10};
use vhost_scsi_frontend::raw::{
    RawConfig, RawDesc, RawDevice, UsedElem, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vhost_scsi_frontend::scsi::{lun_field, request, REQUEST_LEN, RESPONSE_LEN};

use crate::common::Daemon;

const BLOCK: usize = 512;
const WAIT: Duration = Duration::from_secs(10);
/// The request queue's vhost-user index (virtio 1.2 §5.6.2).
const REQUEST_QUEUE: u64 = 2;
/// RawConfig's defaults: four queues of 256 entries.
const QUEUE_SIZE: u64 = 256;
/// One queue's part of the region: align_up(16 * 256 + 2, 64).
const QUEUE_PART: u64 = 4160;

/// Byte offset in the region of a field of the request queue's part.
fn field(offset_in_queue: u64) -> u64 {
    REQUEST_QUEUE * QUEUE_PART + offset_in_queue
}
fn version() -> u64 {
    field(8)
}
fn desc_num() -> u64 {
    field(10)
}
fn last_batch_head() -> u64 {
    field(12)
}
fn used_idx() -> u64 {
    field(14)
}
fn inflight(head: u16) -> u64 {
    field(16 + 16 * u64::from(head))
}
fn counter(head: u16) -> u64 {
    field(16 + 16 * u64::from(head) + 8)
}

fn read_u8(f: &File, at: u64) -> u8 {
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0]
}
fn read_u16(f: &File, at: u64) -> u16 {
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, at).unwrap();
    u16::from_le_bytes(b)
}
fn read_u64(f: &File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_le_bytes(b)
}

/// A daemon on a 1 MiB image of zeros, and its socket.
struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        File::create(&img).unwrap().set_len(1 << 20).unwrap();
        let sock = dir.path().join("vus.sock");
        Setup { dir, img, sock }
    }

    fn daemon(&self) -> Daemon {
        let log = self.dir.path().join("daemon.log");
        Daemon::start_logging_to(&self.sock, &[self.img.to_str().unwrap()], &log)
    }

    fn device(&self) -> RawDevice {
        RawDevice::connect(
            &self.sock,
            &RawConfig {
                inflight: true,
                ..RawConfig::default()
            },
        )
        .unwrap()
    }

    fn image_block(&self, lba: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        File::open(&self.img)
            .unwrap()
            .read_exact_at(&mut b, lba * BLOCK as u64)
            .unwrap();
        b
    }
}

/// Writes a three-descriptor chain at table entries `first..first + 3`:
/// the request for `cdb`, then data-out (`data`, for a WRITE) or the
/// response, then the response or data-in. Returns the head and the
/// data-in address (READ) or 0.
fn chain(
    dev: &mut RawDevice,
    first: u16,
    cdb: &[u8],
    data: Option<&[u8]>,
    data_in: usize,
) -> (u16, u64) {
    let req = dev.alloc(REQUEST_LEN as u64);
    dev.write(req, &request(lun_field(0), u64::from(first), cdb, 32))
        .unwrap();
    let resp = dev.alloc(RESPONSE_LEN as u64);
    let mut descs = vec![RawDesc::new(req, REQUEST_LEN as u32, 0, 0)];
    let mut data_in_at = 0;
    if let Some(data) = data {
        let at = dev.alloc(data.len() as u64);
        dev.write(at, data).unwrap();
        descs.push(RawDesc::new(at, data.len() as u32, 0, 0));
    }
    descs.push(RawDesc::new(
        resp,
        RESPONSE_LEN as u32,
        VRING_DESC_F_WRITE,
        0,
    ));
    if data_in > 0 {
        data_in_at = dev.alloc(data_in as u64);
        descs.push(RawDesc::new(
            data_in_at,
            data_in as u32,
            VRING_DESC_F_WRITE,
            0,
        ));
    }
    let n = descs.len();
    for (i, mut d) in descs.into_iter().enumerate() {
        if i + 1 < n {
            d.flags |= VRING_DESC_F_NEXT;
            d.next = first + i as u16 + 1;
        }
        dev.write_desc(first + i as u16, d).unwrap();
    }
    (first, data_in_at)
}

fn used(dev: &mut RawDevice) -> UsedElem {
    dev.wait_used(WAIT)
        .unwrap()
        .expect("a request was completed")
}

/// Each request the daemon takes is recorded, and cleared once it is on
/// the used ring: after two requests the request queue's part holds
/// version 1 and desc_num 256 (the daemon's GET_INFLIGHT_FD answer), each
/// head's counter in the order taken (0, 1), no head in flight, the last
/// batch the last head returned, and used_idx the used ring's index.
#[test]
fn each_request_is_recorded_and_cleared() {
    let setup = Setup::new();
    let _daemon = setup.daemon();
    let mut dev = setup.device();
    let (geometry, region) = dev.inflight_region().expect("a region");
    assert_eq!(
        (
            geometry.num_queues,
            geometry.queue_size,
            geometry.mmap_offset
        ),
        (4, QUEUE_SIZE as u16, 0)
    );
    assert!(
        geometry.mmap_size >= 4 * QUEUE_PART,
        "{}",
        geometry.mmap_size
    );
    let region = region.try_clone().unwrap();
    assert_eq!(read_u16(&region, version()), 1);
    assert_eq!(read_u16(&region, desc_num()), QUEUE_SIZE as u16);

    let (w, _) = chain(&mut dev, 0, &write10(3, 1, false), Some(&[0x5a; BLOCK]), 0);
    dev.publish(w).unwrap();
    dev.kick().unwrap();
    assert_eq!(used(&mut dev).id, 0);
    let (r, data) = chain(&mut dev, 4, &read10(3, 1), None, BLOCK);
    dev.publish(r).unwrap();
    dev.kick().unwrap();
    assert_eq!(used(&mut dev).id, 4);
    assert_eq!(dev.read(data, BLOCK).unwrap(), vec![0x5a; BLOCK]);

    assert_eq!(
        (read_u64(&region, counter(0)), read_u64(&region, counter(4))),
        (0, 1)
    );
    assert_eq!(
        (read_u8(&region, inflight(0)), read_u8(&region, inflight(4))),
        (0, 0)
    );
    assert_eq!(read_u16(&region, last_batch_head()), 4);
    assert_eq!(read_u16(&region, used_idx()), 2);
    assert_eq!(dev.used_idx().unwrap(), 2);
}

/// A daemon killed with requests taken and not completed: the next one,
/// given the region, serves them again in the order the region's counters
/// give (not the order of their heads), before anything new, and resumes
/// the available ring after them although the VMM, as QEMU does after a
/// crash, set it to the used index. Three WRITEs of one block are in
/// flight (heads 10, 13 and 16, taken in the order 16, 10, 13); a READ of
/// that block made available after them must see head 13's data, which
/// also ends up in the image. Each is served once: exactly four chains
/// come back.
#[test]
fn a_new_daemon_serves_what_was_in_flight_in_order() {
    let setup = Setup::new();
    let mut daemon = setup.daemon();
    let mut dev = setup.device();
    let region = dev
        .inflight_region()
        .expect("a region")
        .1
        .try_clone()
        .unwrap();
    // One request completed normally first: used index 1.
    let (w, _) = chain(&mut dev, 0, &write10(8, 1, false), Some(&[0x11; BLOCK]), 0);
    dev.publish(w).unwrap();
    dev.kick().unwrap();
    assert_eq!(used(&mut dev).id, 0);
    daemon.kill();

    // What a daemon killed mid-flight leaves: three chains available and
    // taken (available index 4, used index 1), recorded in flight.
    let patterns = [(10u16, 0xa1u8, 8u64), (13, 0xb2, 9), (16, 0xc3, 7)];
    for &(head, byte, count) in &patterns {
        chain(
            &mut dev,
            head,
            &write10(8, 1, false),
            Some(&[byte; BLOCK]),
            0,
        );
        dev.publish(head).unwrap();
        region
            .write_all_at(&count.to_le_bytes(), counter(head))
            .unwrap();
        region.write_all_at(&[1], inflight(head)).unwrap();
    }
    // And a READ made available after them, not yet taken.
    let (r, data) = chain(&mut dev, 20, &read10(8, 1), None, BLOCK);
    dev.publish(r).unwrap();
    assert_eq!(dev.avail_idx(), 5);

    let _daemon = setup.daemon();
    dev.reconnect(&setup.sock).unwrap();
    let order: Vec<u32> = (0..4).map(|_| used(&mut dev).id).collect();
    assert_eq!(order, vec![16, 10, 13, 20], "the order chains came back in");
    assert_eq!(dev.read(data, BLOCK).unwrap(), vec![0xb2; BLOCK]);
    assert_eq!(setup.image_block(8), vec![0xb2; BLOCK]);
    // Nothing taken twice.
    assert_eq!(dev.wait_used(Duration::from_millis(300)).unwrap(), None);
    for head in [10, 13, 16, 20] {
        assert_eq!(read_u8(&region, inflight(head)), 0, "head {head} in flight");
    }
    assert_eq!(read_u16(&region, used_idx()), 5);
    // The counter goes on after the largest resubmitted (9): the READ,
    // taken after them, got 10.
    assert_eq!(read_u64(&region, counter(20)), 10);
}

/// A region the daemon cannot rely on is refused, and the daemon goes on
/// serving: one whose memfd could still shrink (a VMM truncating it later
/// would make the daemon's next access raise SIGBUS), one smaller than the
/// queues need, and GET_INFLIGHT_FD for more queues than the device has.
#[test]
fn unusable_regions_are_refused() {
    let setup = Setup::new();
    let _daemon = setup.daemon();
    let geometry = VhostUserInflight {
        mmap_size: 4 * QUEUE_PART,
        mmap_offset: 0,
        num_queues: 4,
        queue_size: QUEUE_SIZE as u16,
    };
    // Unsealed.
    let unsealed = memfd(4 * QUEUE_PART);
    let mut dev = setup.device();
    let refused = dev
        .vhost_frontend()
        .set_inflight_fd(&geometry, unsealed.as_raw_fd());
    assert!(refused.is_err(), "an unsealed region was taken");
    drop(dev);
    // Too small for its queues (sealed this time).
    let small = sealed_memfd(QUEUE_PART);
    let mut dev = setup.device();
    let refused = dev.vhost_frontend().set_inflight_fd(
        &VhostUserInflight {
            mmap_size: QUEUE_PART,
            ..geometry
        },
        small.as_raw_fd(),
    );
    assert!(refused.is_err(), "a region too small was taken");
    drop(dev);
    // More queues than the device has (it has 2 + 16).
    let mut dev = setup.device();
    let refused = dev.vhost_frontend().get_inflight_fd(&VhostUserInflight {
        num_queues: 5000,
        ..geometry
    });
    assert!(refused.is_err(), "a region for 5000 queues was made");
    drop(dev);
    // Still serving.
    let mut dev = setup.device();
    let (r, _) = chain(&mut dev, 0, &read10(0, 1), None, BLOCK);
    dev.publish(r).unwrap();
    dev.kick().unwrap();
    assert_eq!(used(&mut dev).id, 0);
}

fn memfd(len: u64) -> File {
    let fd =
        rustix::fs::memfd_create("test-region", rustix::fs::MemfdFlags::ALLOW_SEALING).unwrap();
    let file = File::from(fd);
    file.set_len(len).unwrap();
    file
}

fn sealed_memfd(len: u64) -> File {
    let file = memfd(len);
    rustix::fs::fcntl_add_seals(
        &file,
        rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW,
    )
    .unwrap();
    file
}

/// Dirty logging over the real socket (vhost-user "Migration"): with
/// SET_LOG_BASE and VHOST_F_LOG_ALL, a READ of 12 KiB into guest pages
/// 0x30..0x32 marks each of them (bit `gpa / 4096` of the log, byte
/// `page / 8`, bit `page % 8`), the response's page 0x34 and the used
/// ring's page 0x12 (the request ring's used ring: descriptor table at
/// 0x10000, 256 entries, available ring after it, used ring at the next
/// page); the page holding only the request header (0x33, device-readable)
/// is not marked. Without LOG_ALL nothing is.
#[test]
fn a_read_marks_every_page_it_wrote_in_the_dirty_log() {
    for log_all in [true, false] {
        let setup = Setup::new();
        let _daemon = setup.daemon();
        let mut dev = RawDevice::connect(
            &setup.sock,
            &RawConfig {
                log: true,
                ..RawConfig::default()
            },
        )
        .unwrap();
        // 4 MiB of guest memory: 1024 pages, 128 bytes of log.
        let log = sealed_memfd(4096);
        dev.start_dirty_log(&log, 4096, log_all).unwrap();
        let (data, req, resp) = (0x30000u64, 0x33000u64, 0x34000u64);
        dev.write(req, &request(lun_field(0), 1, &read10(0, 24), 32))
            .unwrap();
        let descs = [
            RawDesc::new(req, REQUEST_LEN as u32, VRING_DESC_F_NEXT, 1),
            RawDesc::new(
                resp,
                RESPONSE_LEN as u32,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                2,
            ),
            RawDesc::new(data, 24 * BLOCK as u32, VRING_DESC_F_WRITE, 0),
        ];
        for (i, d) in descs.into_iter().enumerate() {
            dev.write_desc(i as u16, d).unwrap();
        }
        dev.publish(0).unwrap();
        dev.kick().unwrap();
        assert_eq!(used(&mut dev).id, 0);
        let marked = |page: u64| {
            let mut b = [0u8; 1];
            log.read_exact_at(&mut b, page / 8).unwrap();
            b[0] & (1 << (page % 8)) != 0
        };
        let expected: Vec<(u64, bool)> = [0x30, 0x31, 0x32, 0x34, 0x12]
            .into_iter()
            .map(|p| (p, log_all))
            .chain([(0x33, false)])
            .collect();
        let seen: Vec<(u64, bool)> = expected.iter().map(|&(p, _)| (p, marked(p))).collect();
        assert_eq!(seen, expected, "pages marked (LOG_ALL {log_all})");
    }
}
