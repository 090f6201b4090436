//! A minimal virtio-scsi driver over a real vhost-user connection, for tests
//! that drive the daemon process exactly as QEMU plus a guest would: shared
//! memfd memory (SET_MEM_TABLE), split virtqueues with kick and call
//! eventfds, one request at a time.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-scsi");

const MEM_SIZE: usize = 16 << 20;
const QUEUE_SIZE: u16 = 64;
/// Rings of queue i live at i * RING_STRIDE.
const RING_STRIDE: u64 = 0x1_0000;
const DATA_BASE: u64 = 0x10_0000;
const RESP_LEN: u32 = 108;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// A running daemon process, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn start(socket: &Path, args: &[&str]) -> Daemon {
        let child = Command::new(BIN)
            .arg("-s")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("daemon exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_idx: u16,
}

/// What the device answered.
#[derive(Debug)]
pub struct Reply {
    pub used_len: u32,
    pub response: u8,
    pub status: u8,
    pub residual: u32,
    pub sense: Vec<u8>,
    pub data_in: Vec<u8>,
}

pub struct ScsiDriver {
    frontend: Frontend,
    mem: GuestMemoryMmap<()>,
    queues: Vec<DriverQueue>,
}

fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"scsi-test-mem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

impl ScsiDriver {
    /// Connects (retrying until the daemon listens) and sets up the
    /// control, event and first request queue.
    pub fn connect(socket: &Path) -> ScsiDriver {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut frontend = loop {
            match Frontend::connect(socket, 3) {
                Ok(f) => break f,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        // VERSION_1 and vhost-user protocol features; no EVENT_IDX: every
        // completion is signalled.
        let features = offered & ((1 << 32) | (1 << 30));
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend
            .set_protocol_features(
                protocol & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
            )
            .unwrap();

        let file = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let info = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: region.file_offset().unwrap().file().as_raw_fd(),
        };
        frontend.set_mem_table(&[info]).unwrap();

        let mut queues = Vec::new();
        for q in 0..3usize {
            let base = q as u64 * RING_STRIDE;
            let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
            frontend.set_vring_num(q, QUEUE_SIZE).unwrap();
            frontend
                .set_vring_addr(
                    q,
                    &VringConfigData {
                        queue_max_size: QUEUE_SIZE,
                        queue_size: QUEUE_SIZE,
                        flags: 0,
                        desc_table_addr: host + desc,
                        used_ring_addr: host + used,
                        avail_ring_addr: host + avail,
                        log_addr: None,
                    },
                )
                .unwrap();
            frontend.set_vring_base(q, 0).unwrap();
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            frontend.set_vring_call(q, &call).unwrap();
            frontend.set_vring_kick(q, &kick).unwrap();
            frontend.set_vring_enable(q, true).unwrap();
            queues.push(DriverQueue {
                desc,
                avail,
                used,
                kick,
                call,
                avail_idx: 0,
                used_idx: 0,
            });
        }
        ScsiDriver {
            frontend,
            mem,
            queues,
        }
    }

    /// Places `bufs` (readable contents, or writable lengths) as one chain,
    /// kicks, and waits for the used entry; returns the used length and the
    /// writable buffers' contents.
    fn submit(&mut self, queue: usize, readable: &[&[u8]], writable: &[u32]) -> (u32, Vec<u8>) {
        let q = &mut self.queues[queue];
        let mut next = DATA_BASE;
        let total = readable.len() + writable.len();
        let mut index = 0u16;
        let mut out_addrs = Vec::new();
        let put = |addr: u64, len: u32, write: bool, index: u16| {
            let flags = if (index as usize) + 1 < total {
                VRING_DESC_F_NEXT
            } else {
                0
            } | if write { VRING_DESC_F_WRITE } else { 0 };
            let d = q.desc + 16 * u64::from(index);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(index + 1, GuestAddress(d + 14)).unwrap();
        };
        for r in readable {
            self.mem.write_slice(r, GuestAddress(next)).unwrap();
            put(next, r.len() as u32, false, index);
            next += r.len() as u64;
            index += 1;
        }
        for &w in writable {
            self.mem
                .write_slice(&vec![0xee; w as usize], GuestAddress(next))
                .unwrap();
            put(next, w, true, index);
            out_addrs.push((next, w));
            next += u64::from(w);
            index += 1;
        }
        let slot = q.avail + 4 + 2 * u64::from(q.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(q.avail_idx, GuestAddress(q.avail + 2))
            .unwrap();
        q.kick.write(1).unwrap();

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(q.used + 2)).unwrap();
            if used != q.used_idx {
                break;
            }
            assert!(Instant::now() < deadline, "no completion within 10 s");
            let _ = q.call.read();
            std::thread::sleep(Duration::from_micros(200));
        }
        let elem = q.used + 4 + 8 * u64::from(q.used_idx % QUEUE_SIZE);
        let used_len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        q.used_idx = q.used_idx.wrapping_add(1);
        let mut written = Vec::new();
        for (addr, len) in out_addrs {
            let mut buf = vec![0u8; len as usize];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            written.extend_from_slice(&buf);
        }
        (used_len, written)
    }

    /// One SCSI command to target 0, `lun`, on the first request queue.
    pub fn command(&mut self, lun: u16, cdb: &[u8], data_out: &[u8], data_in_len: u32) -> Reply {
        let mut req = vec![0u8; 51];
        req[..4].copy_from_slice(&[1, 0, 0x40 | (lun >> 8) as u8, lun as u8]);
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        let mut readable: Vec<&[u8]> = vec![&req];
        if !data_out.is_empty() {
            readable.push(data_out);
        }
        let mut writable = vec![RESP_LEN];
        if data_in_len > 0 {
            writable.push(data_in_len);
        }
        let (used_len, w) = self.submit(2, &readable, &writable);
        let sense_len = u32::from_le_bytes(w[0..4].try_into().unwrap()) as usize;
        Reply {
            used_len,
            residual: u32::from_le_bytes(w[4..8].try_into().unwrap()),
            status: w[10],
            response: w[11],
            sense: w[12..12 + sense_len.min(96)].to_vec(),
            data_in: w[RESP_LEN as usize..].to_vec(),
        }
    }

    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }
}

pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

pub fn write10(lba: u32, blocks: u16, fua: bool) -> [u8; 10] {
    let mut cdb = read10(lba, blocks);
    cdb[0] = 0x2a;
    if fua {
        cdb[1] = 0x08;
    }
    cdb
}

pub const SYNCHRONIZE_CACHE_10: [u8; 10] = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
