//! Integration tests: the vhost-user backend driven through real split
//! virtqueues in mock guest memory, as a guest driver would drive it.

use std::io::Write;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost_device_scsi::scsi::inquiry::Identity;
use vhost_device_scsi::scsi::{Disk, DiskConfig, Target};
use vhost_device_scsi::storage::FileImage;
use vhost_device_scsi::storage::IoEngine;
use vhost_device_scsi::virtio::backend::{
    QueueOptions, CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE,
};
use vhost_device_scsi::virtio::chain::GuestMem;
use vhost_device_scsi::virtio::{DirtyLog, ScsiBackend};
use vhost_scsi_frontend::cdb::{inquiry, read10};
use vhost_scsi_frontend::scsi::{self, lun_field as lun};
use vhost_scsi_frontend::vring_need_event;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_bindings::virtio_scsi::VIRTIO_SCSI_F_HOTPLUG;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

// Heap allocations of the current thread (the binary's counting allocator),
// to check that the request path allocates nothing.
use crate::alloc::allocations;

thread_local! {
    /// The I/O engine harnesses built on this (test) thread use.
    static ENGINE: std::cell::Cell<IoEngine> = const { std::cell::Cell::new(IoEngine::Sync) };
}

fn current_engine() -> IoEngine {
    ENGINE.with(std::cell::Cell::get)
}

/// Defines each test as a function of the I/O engine and runs it as two
/// tests, `sync_engine::NAME` and `io_uring_engine::NAME`.
macro_rules! on_both_engines {
    ($($(#[$attr:meta])* fn $name:ident() $body:block)*) => {
        $(
            $(#[$attr])*
            fn $name(engine: IoEngine) {
                ENGINE.with(|e| e.set(engine));
                $body
            }
        )*
        mod sync_engine {
            $(#[test] fn $name() { super::$name(super::IoEngine::Sync) })*
        }
        mod io_uring_engine {
            $(#[test] fn $name() { super::$name(super::IoEngine::IoUring) })*
        }
    };
}

const QUEUE_SIZE: u16 = 256;
/// Rings of queue i start at RING_BASE + i * RING_STRIDE.
const RING_BASE: u64 = 0x1000;
const RING_STRIDE: u64 = 0x4000;
/// Data buffers are allocated from here up.
pub(crate) const DATA_BASE: u64 = 0x10_0000;
/// Guest memory: two adjacent regions, so buffers can straddle them.
const REGION_SIZE: usize = 8 << 20;

pub(crate) const RESP_LEN: u32 = 12 + 96;
const REQ_LEN: usize = 19 + 32;

// virtio-scsi response codes (virtio 1.2 §5.6.6.1).
pub(crate) const S_OK: u8 = 0;
pub(crate) const S_OVERRUN: u8 = 1;
const S_BAD_TARGET: u8 = 3;
pub(crate) const S_FAILURE: u8 = 9;
pub(crate) const S_FUNCTION_REJECTED: u8 = 11;
const S_INCORRECT_LUN: u8 = 12;

/// A guest buffer in a descriptor: readable with contents, or writable.
pub(crate) enum Buf {
    R(Vec<u8>),
    W(u32),
}

/// What the device returned for a chain.
pub(crate) struct Used {
    len: u32,
    /// The writable buffers' contents, concatenated.
    pub(crate) written: Vec<u8>,
}

impl Used {
    pub(crate) fn response(&self) -> u8 {
        self.written[11]
    }
    pub(crate) fn status(&self) -> u8 {
        self.written[10]
    }
    pub(crate) fn sense_len(&self) -> u32 {
        u32::from_le_bytes(self.written[0..4].try_into().unwrap())
    }
    pub(crate) fn residual(&self) -> u32 {
        u32::from_le_bytes(self.written[4..8].try_into().unwrap())
    }
    pub(crate) fn sense(&self) -> &[u8] {
        &self.written[12..12 + self.sense_len() as usize]
    }
    pub(crate) fn data_in(&self) -> &[u8] {
        &self.written[RESP_LEN as usize..]
    }
}

/// Guest addresses of one split virtqueue's rings.
#[derive(Clone, Copy)]
struct Rings {
    desc: u64,
    avail: u64,
    used: u64,
}

pub(crate) struct Harness {
    pub(crate) mem: GuestMemoryAtomic<GuestMem>,
    rings: Vec<Rings>,
    pub(crate) backend: ScsiBackend,
    pub(crate) vrings: Vec<VringRwLock>,
    pub(crate) next_data: u64,
    images: Vec<Vec<u8>>,
    _files: Vec<tempfile::NamedTempFile>,
}

fn ring_addr(queue: usize) -> GuestAddress {
    GuestAddress(RING_BASE + queue as u64 * RING_STRIDE)
}

impl Harness {
    /// A target with one LUN per entry of `sizes`, each filled with a
    /// distinct byte pattern.
    fn new(sizes: &[usize]) -> Harness {
        Harness::with_access(sizes, true)
    }

    fn writable(sizes: &[usize]) -> Harness {
        Harness::with_access(sizes, false)
    }

    fn with_access(sizes: &[usize], read_only: bool) -> Harness {
        Harness::build(sizes, read_only, QueueOptions::default())
    }

    fn build(sizes: &[usize], read_only: bool, options: QueueOptions) -> Harness {
        Harness::build_full(sizes, read_only, options, false)
    }

    /// Writable images opened with O_DIRECT, on the target directory's file
    /// system (a tmpfs /tmp may not take O_DIRECT).
    fn direct(sizes: &[usize]) -> Harness {
        Harness::build_full(sizes, false, QueueOptions::default(), true)
    }

    fn build_full(
        sizes: &[usize],
        read_only: bool,
        options: QueueOptions,
        direct: bool,
    ) -> Harness {
        let mut files = Vec::new();
        let mut images = Vec::new();
        let mut disks = Vec::new();
        for (lun, &size) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..size)
                .map(|i| {
                    (i as u32)
                        .wrapping_mul(2654435761)
                        .rotate_left(lun as u32 * 7) as u8
                })
                .collect();
            let mut file = if direct {
                tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
            } else {
                tempfile::NamedTempFile::new().unwrap()
            };
            file.write_all(&data).unwrap();
            file.as_file().sync_all().unwrap();
            let image = if direct {
                FileImage::open_direct(file.path(), read_only).unwrap()
            } else {
                FileImage::open(file.path(), read_only).unwrap()
            };
            let config = DiskConfig {
                block_size: 512,
                identity: Identity::derived(&file.path().to_string_lossy(), lun as u16),
                solid_state: false,
                discard: true,
            };
            disks.push(Disk::new(Box::new(image), config).unwrap());
            files.push(file);
            images.push(data);
        }
        let mut h = Harness::with_disks(disks, options);
        h.images = images;
        h._files = files;
        h
    }

    /// A harness whose target serves `disks` (LUN N: the Nth).
    pub(crate) fn with_disks(disks: Vec<Disk>, options: QueueOptions) -> Harness {
        let mem = GuestMemoryAtomic::new(
            GuestMem::from_ranges(&[
                (GuestAddress(0), REGION_SIZE),
                (GuestAddress(REGION_SIZE as u64), REGION_SIZE),
            ])
            .unwrap(),
        );
        let mut backend =
            ScsiBackend::with_engine(Arc::new(Target::new(disks)), options, current_engine());
        // One kick, one pass over everything available, however slow the
        // machine: the harness has no epoll loop to come back on the kick
        // a pass that runs out of time gives its queue (the test of that
        // bound sets its own).
        backend.set_pass_budget(std::time::Duration::from_secs(3600));
        backend.update_memory(mem.clone()).unwrap();
        let mut rings = Vec::new();
        let vrings: Vec<VringRwLock> = (0..FIRST_REQUEST_QUEUE + 2)
            .map(|q| {
                let vring = VringRwLock::new(mem.clone(), QUEUE_SIZE).unwrap();
                // The mock lays out and zeroes the rings, as a driver would.
                let guard = mem.memory();
                let mock = MockSplitQueue::create(&*guard, ring_addr(q), QUEUE_SIZE);
                // The used ring goes past the whole available ring (the
                // mock places it after only half of it), so that every
                // queue entry can be in use at once.
                let avail = mock.avail_addr().0;
                let r = Rings {
                    desc: mock.desc_table_addr().0,
                    avail,
                    used: avail + 0x400,
                };
                rings.push(r);
                vring.set_queue_size(QUEUE_SIZE);
                vring.set_queue_info(r.desc, r.avail, r.used).unwrap();
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                vring
            })
            .collect();
        Harness {
            mem,
            rings,
            backend,
            vrings,
            next_data: DATA_BASE,
            images: Vec::new(),
            _files: Vec::new(),
        }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_data;
        self.next_data += u64::from(len).max(1);
        addr
    }

    /// Places raw descriptors at table index 0.. of `queue` and makes index
    /// 0 available.
    fn push_raw(&mut self, queue: usize, descs: &[SplitDescriptor]) {
        let r = self.rings[queue];
        let mem = self.mem.memory();
        for (i, d) in descs.iter().enumerate() {
            mem.write_obj(
                RawDescriptor::from(*d),
                GuestAddress(r.desc + 16 * i as u64),
            )
            .unwrap();
        }
        self.make_available(queue, 0);
    }

    /// Puts descriptor `head` in the available ring of `queue`.
    fn make_available(&self, queue: usize, head: u16) {
        make_available(&self.mem.memory(), self.rings[queue], head);
    }

    /// `times` TEST UNIT READYs made available on `queue`: one chain
    /// (request, response) at descriptors 0-1, made available `times`
    /// times. Synchronous with either engine: each completes in the pass
    /// that takes it.
    fn push_test_unit_ready(&mut self, queue: usize, times: usize) {
        self.next_data = DATA_BASE;
        let _ = self.push(queue, &[Buf::R(request(lun(0), &[0; 6])), Buf::W(RESP_LEN)]);
        for _ in 1..times {
            self.make_available(queue, 0);
        }
    }

    /// Gives `queue` a call eventfd of its own and returns it: an eventfd
    /// adds up the signals it is given (read with [`signals`]).
    fn count_signals(&self, queue: usize) -> EventFd {
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: dup of a descriptor we own; the File owns the copy.
        let copy = unsafe { libc::dup(call.as_raw_fd()) };
        assert!(copy >= 0);
        // SAFETY: `copy` is a fresh descriptor owned by nobody else.
        self.vrings[queue].set_call(Some(unsafe { std::fs::File::from_raw_fd(copy) }));
        call
    }

    /// Writes the driver's used_event (EVENT_IDX) of `queue`: the used
    /// index entry whose use it asks to be told about.
    fn set_used_event(&self, queue: usize, value: u16) {
        let r = self.rings[queue];
        self.mem
            .memory()
            .write_obj(value, GuestAddress(r.avail + 4 + 2 * u64::from(QUEUE_SIZE)))
            .unwrap();
    }

    /// A READ(10) of `blocks` blocks at `lba` as descriptors `first`,
    /// `first + 1`, `first + 2` of `queue` (request, response, data-in),
    /// with its buffers from `base` on and data-in page-aligned at `base +
    /// 0x1000` (so O_DIRECT takes it as it is); made available `times`
    /// times. Returns the response and data-in addresses.
    fn push_aligned_read(
        &mut self,
        queue: usize,
        first: u16,
        base: u64,
        lba: u32,
        blocks: u16,
        times: usize,
    ) -> (u64, u64) {
        assert_eq!(base % 0x1000, 0);
        let r = self.rings[queue];
        let (resp, data) = (base + 0x200, base + 0x1000);
        let len = u32::from(blocks) * 512;
        let mem = self.mem.memory();
        let req = request(lun(0), &read10(lba, blocks));
        mem.write_slice(&req, GuestAddress(base)).unwrap();
        let descs = [
            SplitDescriptor::new(base, req.len() as u32, VRING_DESC_F_NEXT as u16, first + 1),
            SplitDescriptor::new(
                resp,
                RESP_LEN,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                first + 2,
            ),
            SplitDescriptor::new(data, len, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            let at = r.desc + 16 * (u64::from(first) + i as u64);
            mem.write_obj(RawDescriptor::from(*d), GuestAddress(at))
                .unwrap();
        }
        drop(mem);
        for _ in 0..times {
            self.make_available(queue, first);
        }
        (resp, data)
    }

    /// Writes `bufs` into guest memory as one chain; returns the writable
    /// buffers' (address, length).
    pub(crate) fn push(&mut self, queue: usize, bufs: &[Buf]) -> Vec<(u64, u32)> {
        self.push_at(queue, 0, bufs)
    }

    /// As [`Harness::push`], the chain at descriptor `first` on (so that
    /// several chains can be available at once).
    pub(crate) fn push_at(&mut self, queue: usize, first: u16, bufs: &[Buf]) -> Vec<(u64, u32)> {
        let mut descs = Vec::new();
        let mut writable = Vec::new();
        for (i, buf) in bufs.iter().enumerate() {
            let next = if i + 1 < bufs.len() {
                VRING_DESC_F_NEXT as u16
            } else {
                0
            };
            let (addr, len, flags) = match buf {
                Buf::R(bytes) => {
                    let addr = self.alloc(bytes.len() as u32);
                    self.mem
                        .memory()
                        .write_slice(bytes, GuestAddress(addr))
                        .unwrap();
                    (addr, bytes.len() as u32, next)
                }
                Buf::W(len) => {
                    let addr = self.alloc(*len);
                    // Poison, so that unwritten bytes are visible.
                    self.mem
                        .memory()
                        .write_slice(&vec![0xee; *len as usize], GuestAddress(addr))
                        .unwrap();
                    writable.push((addr, *len));
                    (addr, *len, next | VRING_DESC_F_WRITE as u16)
                }
            };
            descs.push(SplitDescriptor::new(addr, len, flags, first + i as u16 + 1));
        }
        let r = self.rings[queue];
        let mem = self.mem.memory();
        for (i, d) in descs.iter().enumerate() {
            mem.write_obj(
                RawDescriptor::from(*d),
                GuestAddress(r.desc + 16 * (u64::from(first) + i as u64)),
            )
            .unwrap();
        }
        self.make_available(queue, first);
        writable
    }

    /// The device's used index on `queue`.
    pub(crate) fn used_idx(&self, queue: usize) -> u16 {
        self.mem
            .memory()
            .read_obj(GuestAddress(self.rings[queue].used + 2))
            .unwrap()
    }

    /// Kicks `queue` and returns the used-ring entries added since.
    pub(crate) fn kick(&mut self, queue: usize) -> Vec<(u16, u32)> {
        let r = self.rings[queue];
        let before = self.used_idx(queue);
        self.backend
            .handle_event(queue as u16, EventSet::IN, &self.vrings, 0)
            .unwrap();
        // Transfers an asynchronous engine has in flight complete too (the
        // daemon's epoll loop would see their completion events).
        self.backend.complete_transfers(&self.vrings, 0);
        let after = self.used_idx(queue);
        let mem = self.mem.memory();
        (before..after)
            .map(|i| {
                let at = r.used + 4 + 8 * u64::from(i % QUEUE_SIZE);
                let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
                (id as u16, len)
            })
            .collect()
    }

    pub(crate) fn read(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        self.mem
            .memory()
            .read_slice(&mut out, GuestAddress(addr))
            .unwrap();
        out
    }

    /// Submits one chain on `queue`, runs the device, and returns its used
    /// entry and the writable buffers' contents.
    pub(crate) fn submit(&mut self, queue: usize, bufs: &[Buf]) -> Used {
        self.next_data = DATA_BASE;
        let writable = self.push(queue, bufs);
        let used = self.kick(queue);
        assert_eq!(used.len(), 1, "one chain in, one used entry out");
        assert_eq!(used[0].0, 0, "head index");
        let written = writable
            .iter()
            .flat_map(|&(addr, len)| self.read(addr, len))
            .collect();
        Used {
            len: used[0].1,
            written,
        }
    }

    /// A typical command: header+CDB in one descriptor, response in one,
    /// data-in (if any) in one.
    pub(crate) fn command(&mut self, lun: [u8; 8], cdb: &[u8], data_in: u32) -> Used {
        let mut bufs = vec![Buf::R(request(lun, cdb)), Buf::W(RESP_LEN)];
        if data_in > 0 {
            bufs.push(Buf::W(data_in));
        }
        self.submit(FIRST_REQUEST_QUEUE, &bufs)
    }
}

/// Puts descriptor `head` in the available ring at `r` and moves the
/// available index by one.
fn make_available(mem: &GuestMem, r: Rings, head: u16) {
    let idx: u16 = mem.read_obj(GuestAddress(r.avail + 2)).unwrap();
    let slot = r.avail + 4 + 2 * u64::from(idx % QUEUE_SIZE);
    mem.write_obj(head, GuestAddress(slot)).unwrap();
    mem.write_obj(idx.wrapping_add(1), GuestAddress(r.avail + 2))
        .unwrap();
}

/// Signals given to `call` since it was last read (0 reads as EAGAIN).
fn signals(call: &EventFd) -> u64 {
    call.read().unwrap_or(0)
}

/// virtio_scsi_cmd_req with a 32-byte CDB area, tag 1234h.
pub(crate) fn request(lun: [u8; 8], cdb: &[u8]) -> Vec<u8> {
    scsi::request(lun, 0x1234, cdb, 32)
}

/// Bytes of a dirty log covering the harness's guest memory (two regions).
const DIRTY_LOG_LEN: u64 = 2 * REGION_SIZE as u64 / 0x1000 / 8;

/// A dirty log as QEMU makes one (a sealed memfd), and the VMM's own
/// descriptor of it.
fn dirty_log() -> (Arc<DirtyLog>, std::fs::File) {
    use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
    let file = std::fs::File::from(memfd_create("vhost-log", MemfdFlags::ALLOW_SEALING).unwrap());
    file.set_len(DIRTY_LOG_LEN).unwrap();
    fcntl_add_seals(&file, SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL).unwrap();
    let log = DirtyLog::from_vmm(file.try_clone().unwrap(), 0, DIRTY_LOG_LEN).unwrap();
    (Arc::new(log), file)
}

/// The pages whose bits are set in the log `file`, ascending.
fn marked_pages(file: &std::fs::File) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let mut bitmap = vec![0u8; DIRTY_LOG_LEN as usize];
    file.read_exact_at(&mut bitmap, 0).unwrap();
    (0..DIRTY_LOG_LEN * 8)
        .filter(|&page| bitmap[(page / 8) as usize] & (1 << (page % 8)) != 0)
        .collect()
}

/// INQUIRY, standard data.
fn inquiry_standard() -> Vec<u8> {
    inquiry(false, 0, 96)
}

#[test]
fn single_descriptor_parts() {
    let mut h = Harness::new(&[1 << 20]);
    let used = h.command(lun(0), &inquiry_standard(), 96);
    assert_eq!(used.response(), S_OK);
    assert_eq!(used.status(), 0);
    assert_eq!(used.sense_len(), 0);
    let data = used.data_in();
    assert_eq!(data[0], 0, "direct-access device");
    assert_eq!(&data[8..16], b"RUSTVMM ");
    let inquiry_len = data[4] as u32 + 5;
    assert_eq!(used.residual(), 96 - inquiry_len);
    assert_eq!(used.len, RESP_LEN + inquiry_len);
}

#[test]
fn header_split_at_every_byte() {
    let mut h = Harness::new(&[1 << 20]);
    let req = request(lun(0), &read10(7, 1));
    for split in 1..REQ_LEN {
        let bufs = [
            Buf::R(req[..split].to_vec()),
            Buf::R(req[split..].to_vec()),
            Buf::W(split as u32 % RESP_LEN),
            Buf::W(RESP_LEN - split as u32 % RESP_LEN + 512),
        ];
        let used = h.submit(FIRST_REQUEST_QUEUE, &bufs);
        assert_eq!(used.response(), S_OK, "split at {split}");
        assert_eq!(
            used.data_in(),
            &h.images[0][7 * 512..8 * 512],
            "split at {split}"
        );
    }
}

#[test]
fn header_in_one_byte_descriptors() {
    let mut h = Harness::new(&[1 << 20]);
    let req = request(lun(0), &read10(3, 2));
    let mut bufs: Vec<Buf> = req.iter().map(|&b| Buf::R(vec![b])).collect();
    // Response in 1-byte pieces too, then the data.
    bufs.extend((0..RESP_LEN).map(|_| Buf::W(1)));
    bufs.push(Buf::W(1024));
    let used = h.submit(FIRST_REQUEST_QUEUE, &bufs);
    assert_eq!(used.response(), S_OK);
    assert_eq!(used.data_in(), &h.images[0][3 * 512..5 * 512]);
}

#[test]
fn indirect_descriptor_table() {
    let mut h = Harness::new(&[1 << 20]);
    h.next_data = DATA_BASE;
    let req = request(lun(0), &read10(1, 1));
    let req_addr = h.alloc(req.len() as u32);
    h.mem
        .memory()
        .write_slice(&req, GuestAddress(req_addr))
        .unwrap();
    let resp_addr = h.alloc(RESP_LEN);
    let data_addr = h.alloc(512);
    let table = [
        SplitDescriptor::new(req_addr, req.len() as u32, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(
            resp_addr,
            RESP_LEN,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        ),
        SplitDescriptor::new(data_addr, 512, VRING_DESC_F_WRITE as u16, 0),
    ];
    let table_addr = h.alloc(16 * 3);
    for (i, d) in table.iter().enumerate() {
        h.mem
            .memory()
            .write_obj(
                RawDescriptor::from(*d),
                GuestAddress(table_addr + 16 * i as u64),
            )
            .unwrap();
    }
    h.push_raw(
        FIRST_REQUEST_QUEUE,
        &[SplitDescriptor::new(
            table_addr,
            16 * 3,
            VRING_DESC_F_INDIRECT as u16,
            0,
        )],
    );
    let used = h.kick(FIRST_REQUEST_QUEUE);
    assert_eq!(used, vec![(0, RESP_LEN + 512)]);
    assert_eq!(h.read(resp_addr, RESP_LEN)[11], S_OK);
    assert_eq!(h.read(data_addr, 512), &h.images[0][512..1024]);
}

#[test]
fn allocation_length_larger_than_buffer_is_truncated() {
    let mut h = Harness::new(&[1 << 20]);
    let used = h.command(lun(0), &[0x12, 0, 0, 0, 255, 0], 36);
    assert_eq!(used.response(), S_OK);
    assert_eq!(used.status(), 0);
    assert_eq!(used.residual(), 0);
    assert_eq!(used.len, RESP_LEN + 36);
}

#[test]
fn several_luns_and_both_lun_formats() {
    let mut h = Harness::new(&[64 << 10, 128 << 10, 4096]);
    for n in 0..3u16 {
        let flat = h.command(lun(n), &read10(1, 1), 512);
        assert_eq!(flat.status(), 0, "lun {n}");
        assert_eq!(flat.data_in(), &h.images[n as usize][512..1024], "lun {n}");
        // Windows' vioscsi: lun[2] == 0 (peripheral device addressing).
        let peripheral = h.command([1, 0, 0, n as u8, 0, 0, 0, 0], &read10(1, 1), 512);
        assert_eq!(peripheral.data_in(), flat.data_in(), "lun {n}");
    }
    // READ CAPACITY(10) tells the sizes apart.
    let cap = h.command(lun(1), &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(&cap.data_in()[..4], &255u32.to_be_bytes());
    // An absent LUN.
    let absent = h.command(lun(5), &read10(0, 1), 512);
    assert_eq!(absent.status(), 2);
    assert_eq!((absent.sense()[12], absent.sense()[13]), (0x25, 0x00));
    let inq = h.command(lun(5), &inquiry_standard(), 96);
    assert_eq!(inq.data_in()[0], 0x7f);
    // REPORT LUNS lists three.
    let luns = h.command(lun(0), &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256);
    assert_eq!(&luns.data_in()[..4], &24u32.to_be_bytes());
}

#[test]
fn other_targets_are_bad_target() {
    let mut h = Harness::new(&[4096]);
    for bad in [
        [1, 1, 0x40, 0, 0, 0, 0, 0],
        [0, 0, 0x40, 0, 0, 0, 0, 0],
        [2, 0, 0, 0, 0, 0, 0, 0],
    ] {
        let used = h.command(bad, &inquiry_standard(), 96);
        assert_eq!(used.response(), S_BAD_TARGET, "{bad:?}");
        assert_eq!(used.len, RESP_LEN);
    }
}

#[test]
fn requests_on_every_request_queue() {
    let mut h = Harness::new(&[4096]);
    for q in [FIRST_REQUEST_QUEUE, FIRST_REQUEST_QUEUE + 1] {
        h.next_data = DATA_BASE;
        let _ = h.push(
            q,
            &[
                Buf::R(request(lun(0), &inquiry_standard())),
                Buf::W(RESP_LEN),
                Buf::W(96),
            ],
        );
        let used = h.kick(q);
        assert_eq!(used.len(), 1, "queue {q}");
    }
}

/// virtio_scsi_ctrl_tmf_req.
pub(crate) fn tmf(subtype: u32, lun: [u8; 8]) -> Vec<u8> {
    let mut req = Vec::new();
    req.extend_from_slice(&0u32.to_le_bytes());
    req.extend_from_slice(&subtype.to_le_bytes());
    req.extend_from_slice(&lun);
    req.extend_from_slice(&7u64.to_le_bytes());
    req
}

#[test]
fn task_management_functions() {
    let mut h = Harness::new(&[4096, 4096]);
    let cases: &[(u32, [u8; 8], u8)] = &[
        (0, lun(0), S_OK),                // ABORT TASK
        (1, lun(1), S_OK),                // ABORT TASK SET
        (2, lun(0), S_FUNCTION_REJECTED), // CLEAR ACA
        (3, lun(0), S_OK),                // CLEAR TASK SET
        (4, lun(9), S_OK),                // I_T NEXUS RESET (no LU needed)
        (5, lun(1), S_OK),                // LOGICAL UNIT RESET
        (5, lun(9), S_INCORRECT_LUN),     // ... of an absent LUN
        (6, lun(0), S_OK),                // QUERY TASK
        (7, lun(0), S_OK),                // QUERY TASK SET
        (99, lun(0), S_FUNCTION_REJECTED),
        (5, [1, 3, 0x40, 0, 0, 0, 0, 0], S_BAD_TARGET),
    ];
    for &(subtype, l, want) in cases {
        let used = h.submit(CONTROL_QUEUE, &[Buf::R(tmf(subtype, l)), Buf::W(1)]);
        assert_eq!(used.len, 1, "subtype {subtype}");
        assert_eq!(used.written[0], want, "subtype {subtype} lun {l:?}");
    }
}

#[test]
fn async_notification_query() {
    let mut h = Harness::new(&[4096]);
    for req_type in [1u32, 2] {
        let mut req = Vec::new();
        req.extend_from_slice(&req_type.to_le_bytes());
        req.extend_from_slice(&lun(0));
        req.extend_from_slice(&0xffu32.to_le_bytes());
        let used = h.submit(CONTROL_QUEUE, &[Buf::R(req), Buf::W(5)]);
        assert_eq!(used.len, 5);
        assert_eq!(&used.written[..4], &[0, 0, 0, 0], "no events supported");
        assert_eq!(used.written[4], S_OK);
    }
}

#[test]
fn malformed_control_requests() {
    let mut h = Harness::new(&[4096]);
    // Too short for a TMF.
    let used = h.submit(CONTROL_QUEUE, &[Buf::R(vec![0, 0, 0, 0, 5]), Buf::W(1)]);
    assert_eq!(used.written[0], S_FAILURE);
    // Unknown type.
    let used = h.submit(CONTROL_QUEUE, &[Buf::R(vec![9, 0, 0, 0]), Buf::W(1)]);
    assert_eq!(used.written[0], S_FAILURE);
    // No response buffer at all.
    let used = h.submit(CONTROL_QUEUE, &[Buf::R(tmf(5, lun(0)))]);
    assert_eq!(used.len, 0);
}

#[test]
fn malformed_requests_are_answered_and_serving_continues() {
    let mut h = Harness::new(&[4096]);
    // Header shorter than lun+id+attrs+CDB.
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[Buf::R(vec![1, 0, 0x40, 0]), Buf::W(RESP_LEN)],
    );
    assert_eq!(used.response(), S_FAILURE);
    // Response buffer shorter than the response.
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[Buf::R(request(lun(0), &inquiry_standard())), Buf::W(50)],
    );
    assert_eq!(used.len, 0);
    // Both data-out and data-in without VIRTIO_SCSI_F_INOUT.
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(0), &inquiry_standard())),
            Buf::R(vec![0; 16]),
            Buf::W(RESP_LEN),
            Buf::W(96),
        ],
    );
    assert_eq!(used.response(), S_FAILURE);
    // Readable descriptor after a writable one.
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(0), &inquiry_standard())),
            Buf::W(RESP_LEN),
            Buf::R(vec![0; 16]),
        ],
    );
    assert_eq!(used.len, 0);
    // A descriptor pointing outside guest memory.
    h.push_raw(
        FIRST_REQUEST_QUEUE,
        &[SplitDescriptor::new(
            2 * REGION_SIZE as u64 - 8,
            4096,
            VRING_DESC_F_WRITE as u16,
            0,
        )],
    );
    assert_eq!(h.kick(FIRST_REQUEST_QUEUE), vec![(0, 0)]);
    // And the next good request is served.
    let used = h.command(lun(0), &read10(0, 1), 512);
    assert_eq!(used.status(), 0);
    assert_eq!(used.data_in(), &h.images[0][..512]);
}

/// An available ring entry naming a descriptor past the table (virtio 1.2
/// §2.7.6) is dropped: it names no chain, and the used ring cannot return
/// it. The requests around it are served; the queue handler does not fail
/// (which would end the worker thread and every queue it serves). Found by
/// the `request` fuzz target (fuzz/corpus/request/regress-head-past-table).
#[test]
fn head_index_past_the_table_is_dropped_and_serving_continues() {
    let mut h = Harness::new(&[4096]);
    h.next_data = DATA_BASE;
    let writable = h.push(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(0), &read10(1, 1))),
            Buf::W(RESP_LEN),
            Buf::W(512),
        ],
    );
    // Entry 0 now names QUEUE_SIZE + 3; entry 1 the good chain.
    let r = h.rings[FIRST_REQUEST_QUEUE];
    h.mem
        .memory()
        .write_obj(QUEUE_SIZE + 3, GuestAddress(r.avail + 4))
        .unwrap();
    h.make_available(FIRST_REQUEST_QUEUE, 0);
    let used = h.kick(FIRST_REQUEST_QUEUE);
    assert_eq!(used, vec![(0, RESP_LEN + 512)]);
    let (addr, len) = writable[1];
    assert_eq!(h.read(addr, len), &h.images[0][512..1024]);
    let used = h.command(lun(0), &read10(0, 1), 512);
    assert_eq!(used.status(), 0);
}

/// A driver that moves the available index more than a queue size ahead
/// (virtio 1.2 §2.7.6: the ring holds at most queue-size entries) gets
/// nothing served until it puts the index right; the kick returns instead
/// of spinning on entries that cannot be popped. Found by the `request`
/// fuzz target (fuzz/corpus/request/regress-avail-index-jump).
#[test]
fn available_index_too_far_ahead_does_not_hang_the_queue() {
    let h = Harness::new(&[4096]);
    let r = h.rings[FIRST_REQUEST_QUEUE];
    let set_idx = |h: &Harness, idx: u16| {
        h.mem
            .memory()
            .write_obj(idx, GuestAddress(r.avail + 2))
            .unwrap()
    };
    set_idx(&h, QUEUE_SIZE + 1);
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let mut h = h;
        let used = h.kick(FIRST_REQUEST_QUEUE);
        let _ = tx.send(());
        (h, used)
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("the queue handler returns");
    let (mut h, used) = worker.join().unwrap();
    assert!(used.is_empty(), "{used:?}");
    // The driver puts the index right: served again.
    set_idx(&h, 0);
    let used = h.command(lun(0), &read10(2, 1), 512);
    assert_eq!(used.status(), 0);
    assert_eq!(used.data_in(), &h.images[0][1024..1536]);
}

#[test]
fn event_queue_buffers_are_kept() {
    let mut h = Harness::new(&[4096]);
    let _ = h.push(EVENT_QUEUE, &[Buf::W(16)]);
    assert!(h.kick(EVENT_QUEUE).is_empty(), "no events are reported");
}

#[test]
fn config_space() {
    let h = Harness::new(&[4096]);
    let config = h.backend.read_config(0, 36);
    assert_eq!(config.len(), 36);
    assert_eq!(&config[0..4], &16u32.to_le_bytes(), "num_queues");
    assert_eq!(&config[20..24], &96u32.to_le_bytes(), "sense_size");
    assert_eq!(&config[24..28], &32u32.to_le_bytes(), "cdb_size");
    assert!(h.backend.read_config(30, 100).is_empty());
    assert!(h.backend.write_config(0, &[1, 0, 0, 0]).is_err());
    assert!(h.backend.write_config(u32::MAX, &[1]).is_err());
}

#[test]
fn smaller_cdb_and_sense_sizes_from_config() {
    let mut h = Harness::new(&[4096]);
    h.backend.write_config(24, &16u32.to_le_bytes()).unwrap();
    h.backend.write_config(20, &20u32.to_le_bytes()).unwrap();
    let mut req = request(lun(0), &read10(99, 1));
    req.truncate(19 + 16);
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[Buf::R(req), Buf::W(12 + 20), Buf::W(512)],
    );
    assert_eq!(used.written[10], 2, "CHECK CONDITION");
    assert_eq!(
        u32::from_le_bytes(used.written[0..4].try_into().unwrap()),
        18
    );
    assert_eq!(used.written[12 + 12], 0x21, "LBA out of range");
    assert_eq!(used.len, 12 + 20);
}

#[test]
fn offered_features() {
    let h = Harness::new(&[4096]);
    let f = h.backend.features();
    for bit in [1u32, 2, 28, 29, 30, 32] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & 1, 0, "VIRTIO_SCSI_F_INOUT is not offered");
}

// The data path, with each I/O engine.
on_both_engines! {
    /// Requests the driver made available before this daemon looked (after
    /// a restart, the guest kicked the daemon before) are served at the
    /// first nudge that finds their queue live, with no kick; the queue is
    /// signalled once then, as libvhost-user does after a reconnect, and
    /// later nudges leave it alone.
    fn requests_available_at_start_are_served_at_a_nudge() {
        let mut h = Harness::new(&[1 << 20]);
        let call = h.count_signals(FIRST_REQUEST_QUEUE);
        h.push_test_unit_ready(FIRST_REQUEST_QUEUE, 3);
        let (_, nudge) = h.backend.nudge_listener(0).expect("a nudge eventfd");
        let nudge = u16::try_from(nudge).unwrap();
        h.backend.nudge_queues();
        h.backend
            .handle_event(nudge, EventSet::IN, &h.vrings, 0)
            .unwrap();
        // TEST UNIT READY runs in the pass: nothing to reap.
        assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 3, "served without a kick");
        assert!(signals(&call) >= 1, "the queue was not signalled");
        // Started: a later nudge serves nothing and signals nothing.
        h.push_test_unit_ready(FIRST_REQUEST_QUEUE, 1);
        h.backend.nudge_queues();
        h.backend
            .handle_event(nudge, EventSet::IN, &h.vrings, 0)
            .unwrap();
        assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 3);
        assert_eq!(signals(&call), 0);
    }

    fn compare_and_write_after_transfers_in_flight() {
        let mut h = Harness::writable(&[1 << 20]);
        let r = h.rings[FIRST_REQUEST_QUEUE];
        let mut desc = 0u16;
        let mut chain = |h: &mut Harness, descs: &[(u64, u32, bool)]| {
            let head = desc;
            let mem = h.mem.memory();
            for (i, &(addr, len, writable)) in descs.iter().enumerate() {
                let last = i + 1 == descs.len();
                let mut flags = if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                if writable {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                let d = SplitDescriptor::new(addr, len, flags, if last { 0 } else { desc + 1 });
                mem.write_obj(RawDescriptor::from(d), GuestAddress(r.desc + 16 * u64::from(desc)))
                    .unwrap();
                desc += 1;
            }
            drop(mem);
            h.make_available(FIRST_REQUEST_QUEUE, head);
        };
        // Four READs of LBA 0..4, then COMPARE AND WRITE of LBA 2.
        for i in 0..4u64 {
            let base = DATA_BASE + i * 0x2000;
            let req = request(lun(0), &read10(i as u32, 1));
            h.mem.memory().write_slice(&req, GuestAddress(base)).unwrap();
            chain(&mut h, &[(base, REQ_LEN as u32, false), (base + 0x100, RESP_LEN + 512, true)]);
        }
        let mut caw = vec![0x89, 0];
        caw.extend_from_slice(&2u64.to_be_bytes());
        caw.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
        let new_block = vec![0x3cu8; 512];
        let mut data_out = h.images[0][2 * 512..3 * 512].to_vec();
        data_out.extend_from_slice(&new_block);
        let base = DATA_BASE + 0x10000;
        let req = request(lun(0), &caw);
        h.mem.memory().write_slice(&req, GuestAddress(base)).unwrap();
        h.mem.memory().write_slice(&data_out, GuestAddress(base + 0x100)).unwrap();
        chain(
            &mut h,
            &[
                (base, REQ_LEN as u32, false),
                (base + 0x100, 1024, false),
                (base + 0x1000, RESP_LEN, true),
            ],
        );
        // One kick: the READs go in flight (io_uring), the COMPARE AND
        // WRITE runs after them, without waiting for ever on them.
        let used = h.kick(FIRST_REQUEST_QUEUE);
        assert_eq!(used.len(), 5);
        let caw_resp = h.read(base + 0x1000, RESP_LEN);
        assert_eq!((caw_resp[11], caw_resp[10]), (S_OK, 0), "COMPARE AND WRITE: GOOD");
        for i in 0..4u64 {
            let resp = h.read(DATA_BASE + i * 0x2000 + 0x100, RESP_LEN + 512);
            assert_eq!((resp[11], resp[10]), (S_OK, 0), "READ {i}");
            let i = i as usize;
            assert_eq!(&resp[RESP_LEN as usize..], &h.images[0][i * 512..(i + 1) * 512]);
        }
        let on_disk = std::fs::read(h._files[0].path()).unwrap();
        assert_eq!(&on_disk[2 * 512..3 * 512], &new_block[..]);
    }

    fn a_used_ring_outside_memory_does_not_stop_the_worker() {
        let mut h = Harness::new(&[1 << 20]);
        // The second request queue's used ring points past guest memory.
        let bad = FIRST_REQUEST_QUEUE + 1;
        let r = h.rings[bad];
        h.vrings[bad]
            .set_queue_info(r.desc, r.avail, 4 * REGION_SIZE as u64)
            .unwrap();
        h.next_data = DATA_BASE;
        let _ = h.push(
            bad,
            &[
                Buf::R(request(lun(0), &read10(0, 1))),
                Buf::W(RESP_LEN),
                Buf::W(512),
            ],
        );
        h.backend
            .handle_event(bad as u16, EventSet::IN, &h.vrings, 0)
            .expect("a broken queue is not an error of the worker thread");
        // The same thread still serves the other queues.
        let used = h.command(lun(0), &read10(1, 1), 512);
        assert_eq!(used.data_in(), &h.images[0][512..1024]);
    }

    fn a_full_queue_drained_by_another_queue_is_served_again() {
        let mut h = Harness::direct(&[1 << 20]);
        // 200 READs on the first request queue (one chain made available
        // 200 times): with io_uring, 128 go in flight and the queue stops
        // popping.
        let (resp, data) = h.push_aligned_read(FIRST_REQUEST_QUEUE, 0, DATA_BASE, 16, 1, 200);
        h.backend
            .handle_event(FIRST_REQUEST_QUEUE as u16, EventSet::IN, &h.vrings, 0)
            .unwrap();
        if current_engine() == IoEngine::IoUring {
            assert_eq!(h.backend.transfers_in_flight(0), 128);
        }
        // An INQUIRY on the second request queue of the same thread: run
        // synchronously, after the thread's transfers in flight, which frees
        // the first queue's slots without its completion handler.
        h.next_data = DATA_BASE + 0x10_0000;
        let second = FIRST_REQUEST_QUEUE + 1;
        let _ = h.push(
            second,
            &[Buf::R(request(lun(0), &inquiry_standard())), Buf::W(RESP_LEN), Buf::W(96)],
        );
        h.backend
            .handle_event(second as u16, EventSet::IN, &h.vrings, 0)
            .unwrap();
        assert_eq!(h.used_idx(second), 1);
        if current_engine() == IoEngine::IoUring {
            assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 128);
            assert_eq!(h.backend.transfers_in_flight(0), 0);
            // The completion event (the drain's completions signalled it)
            // serves the stalled queue again: the other 72 are taken.
            let (_, event) = h.backend.completion_listener(0).unwrap();
            h.backend
                .handle_event(event as u16, EventSet::IN, &h.vrings, 0)
                .unwrap();
            let taken =
                usize::from(h.used_idx(FIRST_REQUEST_QUEUE)) + h.backend.transfers_in_flight(0);
            assert_eq!(taken, 200, "the stalled queue was served again");
        }
        h.backend.complete_transfers(&h.vrings, 0);
        assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 200);
        assert_eq!(h.read(resp, RESP_LEN)[11], S_OK);
        assert_eq!(h.read(data, 512), &h.images[0][16 * 512..17 * 512]);
    }

    fn direct_io_with_aligned_and_misaligned_buffers() {
        let mut h = Harness::direct(&[1 << 20]);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        // Data buffers at a page-aligned address and at an odd one.
        for (round, data_addr) in [(0u32, DATA_BASE + 0x10000), (1, DATA_BASE + 0x20000 + 3)] {
            let lba = 64 + round * 16;
            let mut write = read10(lba, 16);
            write[0] = 0x2a;
            for (cdb, is_write) in [(write, true), (read10(lba, 16), false)] {
                h.next_data = DATA_BASE;
                let req = request(lun(0), &cdb);
                let req_addr = h.alloc(req.len() as u32);
                h.mem
                    .memory()
                    .write_slice(&req, GuestAddress(req_addr))
                    .unwrap();
                let resp_addr = h.alloc(RESP_LEN);
                let descs = if is_write {
                    h.mem
                        .memory()
                        .write_slice(&data, GuestAddress(data_addr))
                        .unwrap();
                    [
                        SplitDescriptor::new(req_addr, req.len() as u32, VRING_DESC_F_NEXT as u16, 1),
                        SplitDescriptor::new(data_addr, 8192, VRING_DESC_F_NEXT as u16, 2),
                        SplitDescriptor::new(resp_addr, RESP_LEN, VRING_DESC_F_WRITE as u16, 0),
                    ]
                } else {
                    h.mem
                        .memory()
                        .write_slice(&[0xee; 8192], GuestAddress(data_addr))
                        .unwrap();
                    [
                        SplitDescriptor::new(req_addr, req.len() as u32, VRING_DESC_F_NEXT as u16, 1),
                        SplitDescriptor::new(
                            resp_addr,
                            RESP_LEN,
                            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                            2,
                        ),
                        SplitDescriptor::new(data_addr, 8192, VRING_DESC_F_WRITE as u16, 0),
                    ]
                };
                h.push_raw(FIRST_REQUEST_QUEUE, &descs);
                let used = h.kick(FIRST_REQUEST_QUEUE);
                let expected_len = if is_write { RESP_LEN } else { RESP_LEN + 8192 };
                assert_eq!(used, vec![(0, expected_len)], "round {round}, write {is_write}");
                let resp = h.read(resp_addr, RESP_LEN);
                assert_eq!((resp[11], resp[10]), (S_OK, 0), "round {round}, write {is_write}");
                if !is_write {
                    assert_eq!(h.read(data_addr, 8192), data, "round {round}");
                }
            }
            if round == 0 && current_engine() == IoEngine::IoUring {
                assert_eq!(h.backend.peak_in_flight(), 1, "aligned buffers go through the ring");
            }
        }
        let on_disk = std::fs::read(h._files[0].path()).unwrap();
        assert_eq!(&on_disk[64 * 512..80 * 512], &data[..]);
        assert_eq!(&on_disk[80 * 512..96 * 512], &data[..]);
    }

    fn requests_overlap_with_io_uring() {
        // O_DIRECT: the reads' completions come later, through the ring,
        // never during their submission.
        let mut h = Harness::direct(&[1 << 20]);
        // Eight READs made available before one kick.
        let data: Vec<(u64, u64)> = (0..8u16)
            .map(|i| {
                let base = DATA_BASE + u64::from(i) * 0x4000;
                h.push_aligned_read(FIRST_REQUEST_QUEUE, 3 * i, base, u32::from(i) * 8, 8, 1)
            })
            .collect();
        h.backend
            .handle_event(FIRST_REQUEST_QUEUE as u16, EventSet::IN, &h.vrings, 0)
            .unwrap();
        match current_engine() {
            IoEngine::IoUring => {
                // All eight were submitted before any completion was reaped.
                assert_eq!(h.backend.transfers_in_flight(0), 8);
                assert_eq!(h.backend.peak_in_flight(), 8);
                assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 0, "nothing completed before reaping");
            }
            IoEngine::Sync => {
                assert_eq!(h.backend.transfers_in_flight(0), 0);
                assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 8);
            }
        }
        h.backend.complete_transfers(&h.vrings, 0);
        assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 8);
        assert_eq!(h.backend.transfers_in_flight(0), 0);
        for (i, &(resp, addr)) in data.iter().enumerate() {
            assert_eq!(h.read(resp, RESP_LEN)[10..12], [0, S_OK], "READ {i}");
            assert_eq!(
                h.read(addr, 4096),
                &h.images[0][i * 4096..(i + 1) * 4096],
                "READ {i}"
            );
        }
    }

    fn more_requests_than_the_ring_holds_all_complete() {
        // O_DIRECT, so that no transfer completes during its submission
        // (page-cache reads that do are returned at once, and would never
        // fill the ring).
        let mut h = Harness::direct(&[1 << 20]);
        // One chain made available 200 times: more than a ring's 128 slots.
        let (resp, data) = h.push_aligned_read(FIRST_REQUEST_QUEUE, 0, DATA_BASE, 16, 1, 200);
        let used = h.kick(FIRST_REQUEST_QUEUE);
        assert_eq!(used.len(), 200, "every request completed, none dropped");
        assert!(used.iter().all(|&u| u == (0, RESP_LEN + 512)), "{used:?}");
        assert_eq!(h.read(resp, RESP_LEN)[10..12], [0, 0], "GOOD, VIRTIO_SCSI_S_OK");
        assert_eq!(h.read(data, 512), &h.images[0][16 * 512..17 * 512]);
        if current_engine() == IoEngine::IoUring {
            assert_eq!(h.backend.peak_in_flight(), 128, "the ring's capacity");
        }
    }

    fn the_guest_hears_of_completions_while_the_ring_is_served() {
        // 32 reads made available at once, and a driver without EVENT_IDX
        // that never suppresses interrupts: the device signals every 8
        // returned chains (SIGNAL_BATCH), not only once the whole ring is
        // served (nor once per chain).
        let mut h = Harness::new(&[1 << 20]);
        let call = h.count_signals(FIRST_REQUEST_QUEUE);
        h.next_data = DATA_BASE;
        let _ = h.push(FIRST_REQUEST_QUEUE, &[Buf::R(request(lun(0), &read10(16, 1))), Buf::W(RESP_LEN + 512)]);
        for _ in 1..32 {
            h.make_available(FIRST_REQUEST_QUEUE, 0);
        }
        let used = h.kick(FIRST_REQUEST_QUEUE);
        assert_eq!(used.len(), 32);
        let signals = signals(&call);
        if current_engine() == IoEngine::Sync {
            assert_eq!(signals, 4);
        } else {
            // Reads the page cache does not answer during their submission
            // are returned (and signalled) when they complete.
            assert!((2..=5).contains(&signals), "{signals} signals");
        }
    }

    fn signals_per_pass_without_event_idx() {
        // Without EVENT_IDX, and with VRING_AVAIL_F_NO_INTERRUPT clear, the
        // device must notify after it uses a buffer (virtio 1.2 §2.7.7.2);
        // one notification may follow several used buffers. This device
        // signals every 8 returned chains and once at the end of a pass for
        // the rest: a pass that returns anything signals at least once.
        let mut h = Harness::new(&[1 << 20]);
        let q = FIRST_REQUEST_QUEUE;
        let call = h.count_signals(q);
        // (chains returned in one pass, signals)
        let cases = [
            (1, 1),
            (2, 1),
            (3, 1),
            (4, 1),
            (5, 1),
            (6, 1),
            (7, 1),
            (8, 1),
            (9, 2),
            (15, 2),
            (16, 2),
            (17, 3),
        ];
        for (n, expected) in cases {
            h.push_test_unit_ready(q, n);
            assert_eq!(h.kick(q).len(), n);
            assert_eq!(signals(&call), expected, "{n} chains returned in one pass");
        }
        // A pass that returns nothing signals nothing.
        assert!(h.kick(q).is_empty());
        assert_eq!(signals(&call), 0);
    }

    fn signals_per_pass_with_event_idx() {
        // With EVENT_IDX the device must notify when the used index moves
        // past the driver's used_event, and need not otherwise (virtio 1.2
        // §2.7.10: vring_need_event(used_event, new, old)). Each pass below
        // starts at used index `u0` with `used_event = u0 + k`.
        let mut h = Harness::new(&[1 << 20]);
        let q = FIRST_REQUEST_QUEUE;
        h.vrings[q].set_queue_event_idx(true);
        let call = h.count_signals(q);
        let pass = |h: &mut Harness, n: usize, k: i32| {
            let u0 = h.used_idx(q);
            h.set_used_event(q, u0.wrapping_add_signed(k as i16));
            h.push_test_unit_ready(q, n);
            assert_eq!(h.kick(q).len(), n);
            signals(&call)
        };
        // used_event at any entry the pass uses, for passes of 1 to 7
        // chains (below SIGNAL_BATCH, so only the end of the pass
        // signals): exactly one signal.
        for n in 1..=7 {
            for k in 0..n {
                assert_eq!(pass(&mut h, n as usize, k), 1, "{n} chains, used_event u0 + {k}");
            }
        }
        // (chains in the pass, used_event - u0, signals)
        let cases = [
            // At the entry right after the pass: not reached yet.
            (1, 1, 0),
            (4, 4, 0),
            (7, 7, 0),
            // Far ahead.
            (1, 100, 0),
            (7, 1000, 0),
            // Behind: passed (and signalled) before this pass.
            (3, -1, 0),
            (7, -5, 0),
            // Longer passes: one signal still, at the batch of 8 or at
            // the end.
            (8, 0, 1),
            (8, 7, 1),
            (9, 8, 1),
            (9, 9, 0),
            (16, 3, 1),
            (16, 12, 1),
        ];
        for (n, k, expected) in cases {
            assert_eq!(pass(&mut h, n, k), expected, "{n} chains, used_event u0 + {k}");
        }
    }

    fn a_request_made_available_as_notifications_come_back_on_is_served() {
        // The driver makes a request available after the pass found the
        // ring empty but before notifications are back on: notifications
        // are off (NO_NOTIFY without EVENT_IDX; an avail_event the new
        // index does not pass with it), so the driver does not kick, and
        // only the re-check after enable_notification (virtio 1.2
        // §2.7.10) finds the request. It is served in the same pass.
        for event_idx in [false, true] {
            let mut h = Harness::new(&[1 << 20]);
            let q = FIRST_REQUEST_QUEUE;
            h.vrings[q].set_queue_event_idx(event_idx);
            let call = h.count_signals(q);
            h.push_test_unit_ready(q, 1);
            let (mem, r) = (h.mem.clone(), h.rings[q]);
            // Whether the hook ran, and whether the driver would have
            // kicked for what it published there.
            let fired = Arc::new(AtomicBool::new(false));
            let kicked = Arc::new(AtomicBool::new(false));
            let (f, k) = (fired.clone(), kicked.clone());
            h.backend.set_before_enable_notification(move |queue| {
                if queue != q || f.swap(true, Ordering::SeqCst) {
                    return;
                }
                let mem = mem.memory();
                let old: u16 = mem.read_obj(GuestAddress(r.avail + 2)).unwrap();
                make_available(&mem, r, 0);
                let kick = if event_idx {
                    let avail_event: u16 = mem
                        .read_obj(GuestAddress(r.used + 4 + 8 * u64::from(QUEUE_SIZE)))
                        .unwrap();
                    vring_need_event(avail_event, old.wrapping_add(1), old)
                } else {
                    let flags: u16 = mem.read_obj(GuestAddress(r.used)).unwrap();
                    flags & 1 == 0
                };
                k.store(kick, Ordering::SeqCst);
            });
            // One kick, one pass, no complete_transfers (which would serve
            // the queue again).
            h.backend
                .handle_event(q as u16, EventSet::IN, &h.vrings, 0)
                .unwrap();
            assert!(fired.load(Ordering::SeqCst), "the hook ran");
            assert!(
                !kicked.load(Ordering::SeqCst),
                "event_idx {event_idx}: the driver had no reason to kick"
            );
            assert_eq!(
                h.used_idx(q),
                2,
                "event_idx {event_idx}: the request made available as notifications came back on was served"
            );
            // One signal for each round that returned a chain (the used
            // index passes used_event 0 only in the first with EVENT_IDX).
            assert_eq!(signals(&call), if event_idx { 1 } else { 2 }, "event_idx {event_idx}");
        }
    }

    fn task_management_waits_for_transfers_in_flight() {
        let mut h = Harness::direct(&[1 << 20]);
        let (resp, data) = h.push_aligned_read(FIRST_REQUEST_QUEUE, 0, DATA_BASE, 8, 2, 1);
        // Kicked, but its completion not reaped yet.
        h.backend
            .handle_event(FIRST_REQUEST_QUEUE as u16, EventSet::IN, &h.vrings, 0)
            .unwrap();
        if current_engine() == IoEngine::IoUring {
            assert_eq!(h.backend.transfers_in_flight(0), 1);
        }
        h.next_data = DATA_BASE + 0x10_0000;
        let _ = h.push(CONTROL_QUEUE, &[Buf::R(tmf(1, lun(0))), Buf::W(1)]);
        // ABORT TASK SET: FUNCTION COMPLETE only once the READ is done.
        let used = h.kick(CONTROL_QUEUE);
        assert_eq!(used, vec![(0, 1)]);
        assert_eq!(h.backend.transfers_in_flight(0), 0);
        assert_eq!(
            h.used_idx(FIRST_REQUEST_QUEUE),
            1,
            "the READ was completed before the TMF answer"
        );
        assert_eq!(h.read(resp, RESP_LEN)[11], S_OK);
        assert_eq!(h.read(data, 1024), &h.images[0][8 * 512..10 * 512]);
    }

    fn read_past_the_end_of_a_truncated_image_is_a_medium_error() {
        let mut h = Harness::new(&[1 << 20]);
        // The image shrinks underneath the daemon to 1024 blocks.
        std::fs::OpenOptions::new()
            .write(true)
            .open(h._files[0].path())
            .unwrap()
            .set_len(512 << 10)
            .unwrap();
        // Straddling the new end (a short read), and wholly past it.
        for (lba, blocks) in [(1020u32, 8u16), (1500, 1)] {
            let len = u32::from(blocks) * 512;
            let used = h.command(lun(0), &read10(lba, blocks), len);
            assert_eq!((used.response(), used.status()), (S_OK, 2), "LBA {lba}");
            let sense = used.sense();
            assert_eq!(sense[2], 0x03, "MEDIUM ERROR");
            assert_eq!((sense[12], sense[13]), (0x11, 0x00), "UNRECOVERED READ ERROR");
            assert_eq!(used.residual(), len, "nothing transferred");
        }
        // Blocks still in the file read fine.
        let used = h.command(lun(0), &read10(1000, 8), 4096);
        assert_eq!(used.status(), 0);
        assert_eq!(used.data_in(), &h.images[0][1000 * 512..1008 * 512]);
    }

    fn read_into_many_descriptors() {
        let mut h = Harness::new(&[1 << 20]);
        // 8 blocks into data-in pieces of odd sizes.
        let pieces = [1000u32, 24, 1, 2071, 1];
        assert_eq!(pieces.iter().sum::<u32>(), 8 * 512 - 999);
        let mut bufs = vec![Buf::R(request(lun(0), &read10(100, 8))), Buf::W(RESP_LEN)];
        bufs.extend(pieces.iter().map(|&p| Buf::W(p)));
        bufs.push(Buf::W(999));
        let used = h.submit(FIRST_REQUEST_QUEUE, &bufs);
        assert_eq!(used.response(), S_OK);
        assert_eq!(used.status(), 0);
        assert_eq!(used.residual(), 0);
        assert_eq!(used.len, RESP_LEN + 4096);
        assert_eq!(used.data_in(), &h.images[0][100 * 512..108 * 512]);
    }

    fn data_straddling_two_memory_regions() {
        let mut h = Harness::new(&[1 << 20]);
        h.next_data = DATA_BASE;
        let req = request(lun(0), &read10(10, 4));
        let req_addr = h.alloc(req.len() as u32);
        h.mem
            .memory()
            .write_slice(&req, GuestAddress(req_addr))
            .unwrap();
        let resp_addr = h.alloc(RESP_LEN);
        // Data-in starts 1000 bytes before the region boundary.
        let data_addr = REGION_SIZE as u64 - 1000;
        h.push_raw(
            FIRST_REQUEST_QUEUE,
            &[
                SplitDescriptor::new(req_addr, req.len() as u32, VRING_DESC_F_NEXT as u16, 1),
                SplitDescriptor::new(
                    resp_addr,
                    RESP_LEN,
                    (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                    2,
                ),
                SplitDescriptor::new(data_addr, 2048, VRING_DESC_F_WRITE as u16, 0),
            ],
        );
        assert_eq!(h.kick(FIRST_REQUEST_QUEUE), vec![(0, RESP_LEN + 2048)]);
        assert_eq!(h.read(data_addr, 2048), &h.images[0][10 * 512..14 * 512]);
    }

    fn data_in_smaller_than_transfer_is_overrun() {
        let mut h = Harness::new(&[1 << 20]);
        let used = h.command(lun(0), &read10(0, 8), 2048);
        assert_eq!(used.response(), S_OVERRUN);
        assert_eq!(used.residual(), 2048, "nothing transferred");
        assert_eq!(used.len, RESP_LEN);
        assert!(
            used.data_in().iter().all(|&b| b == 0xee),
            "data-in untouched"
        );
    }

    fn check_condition_carries_sense() {
        let mut h = Harness::new(&[1 << 20]);
        let used = h.command(lun(0), &read10(2048, 1), 512);
        assert_eq!(used.response(), S_OK);
        assert_eq!(used.status(), 2, "CHECK CONDITION");
        assert_eq!(used.sense_len(), 18);
        let sense = used.sense();
        assert_eq!(sense[0], 0x70);
        assert_eq!(sense[2], 0x05);
        assert_eq!((sense[12], sense[13]), (0x21, 0x00));
        assert_eq!(used.residual(), 512);
    }

    fn write_on_read_only_lun_is_data_protect() {
        let mut h = Harness::new(&[1 << 20]);
        let mut cdb = read10(0, 1);
        cdb[0] = 0x2a;
        let used = h.submit(
            FIRST_REQUEST_QUEUE,
            &[
                Buf::R(request(lun(0), &cdb)),
                Buf::R(vec![0xab; 512]),
                Buf::W(RESP_LEN),
            ],
        );
        assert_eq!(used.status(), 2);
        assert_eq!(used.sense()[2], 0x07, "DATA PROTECT");
        assert_eq!((used.sense()[12], used.sense()[13]), (0x27, 0x00));
        assert_eq!(used.residual(), 512, "data-out not consumed");
        assert_eq!(used.len, RESP_LEN);
    }

    fn many_requests_per_kick() {
        let mut h = Harness::new(&[1 << 20]);
        // Three chains at descriptor indexes 0.., 3.., 6.. made available at once.
        let r = h.rings[FIRST_REQUEST_QUEUE];
        let mut data_addrs = Vec::new();
        for i in 0..3u16 {
            let base = DATA_BASE + u64::from(i) * 0x1000;
            let req = request(lun(0), &read10(u32::from(i), 1));
            let mem = h.mem.memory();
            mem.write_slice(&req, GuestAddress(base)).unwrap();
            let descs = [
                SplitDescriptor::new(base, REQ_LEN as u32, VRING_DESC_F_NEXT as u16, 3 * i + 1),
                SplitDescriptor::new(
                    base + 0x100,
                    RESP_LEN,
                    (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                    3 * i + 2,
                ),
                SplitDescriptor::new(base + 0x200, 512, VRING_DESC_F_WRITE as u16, 0),
            ];
            for (j, d) in descs.iter().enumerate() {
                let at = r.desc + 16 * u64::from(3 * i + j as u16);
                mem.write_obj(RawDescriptor::from(*d), GuestAddress(at))
                    .unwrap();
            }
            h.make_available(FIRST_REQUEST_QUEUE, 3 * i);
            data_addrs.push(base + 0x200);
        }
        let used = h.kick(FIRST_REQUEST_QUEUE);
        assert_eq!(
            used,
            vec![
                (0, RESP_LEN + 512),
                (3, RESP_LEN + 512),
                (6, RESP_LEN + 512)
            ]
        );
        for (i, addr) in data_addrs.iter().enumerate() {
            assert_eq!(h.read(*addr, 512), &h.images[0][i * 512..(i + 1) * 512]);
        }
    }

    fn write_from_many_descriptors_lands_in_the_image() {
        let mut h = Harness::writable(&[1 << 20]);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut cdb = read10(40, 8);
        cdb[0] = 0x2a;
        // Header and data-out split at odd places across descriptors.
        let req = request(lun(0), &cdb);
        let mut bufs = vec![Buf::R(req[..20].to_vec())];
        let mut joined = req[20..].to_vec();
        joined.extend_from_slice(&data[..777]);
        bufs.push(Buf::R(joined));
        bufs.push(Buf::R(data[777..778].to_vec()));
        bufs.push(Buf::R(data[778..].to_vec()));
        bufs.push(Buf::W(RESP_LEN));
        let used = h.submit(FIRST_REQUEST_QUEUE, &bufs);
        assert_eq!((used.response(), used.status()), (S_OK, 0));
        assert_eq!(used.residual(), 0, "all data-out consumed");
        assert_eq!(used.len, RESP_LEN);
        let on_disk = std::fs::read(h._files[0].path()).unwrap();
        assert_eq!(&on_disk[40 * 512..48 * 512], &data[..]);
        // And a READ through the queue returns it.
        let used = h.command(lun(0), &read10(40, 8), 4096);
        assert_eq!(used.data_in(), &data[..]);
    }

    fn data_out_smaller_than_transfer_is_overrun() {
        let mut h = Harness::writable(&[1 << 20]);
        let mut cdb = read10(0, 8);
        cdb[0] = 0x2a;
        let used = h.submit(
            FIRST_REQUEST_QUEUE,
            &[
                Buf::R(request(lun(0), &cdb)),
                Buf::R(vec![0x11; 1000]),
                Buf::W(RESP_LEN),
            ],
        );
        assert_eq!(used.response(), S_OVERRUN);
        assert_eq!(used.residual(), 1000, "nothing consumed");
        let on_disk = std::fs::read(h._files[0].path()).unwrap();
        assert_eq!(&on_disk[..4096], &h.images[0][..4096], "image unchanged");
    }

    fn descriptor_sense_after_mode_select() {
        let mut h = Harness::writable(&[1 << 20]);
        // MODE SELECT(6), PF=1: the control page with D_SENSE=1.
        let control = [0x0a, 0x0a, 0x02 | 0x04, 0x10, 0, 0, 0, 0, 0xff, 0xff, 0, 0];
        let mut list = vec![0, 0, 0, 0];
        list.extend_from_slice(&control);
        let used = h.submit(
            FIRST_REQUEST_QUEUE,
            &[
                Buf::R(request(lun(0), &[0x15, 0x10, 0, 0, list.len() as u8, 0])),
                Buf::R(list),
                Buf::W(RESP_LEN),
            ],
        );
        assert_eq!(
            (used.response(), used.status()),
            (S_OK, 0),
            "{:?}",
            used.sense()
        );
        let used = h.command(lun(0), &read10(4096, 1), 512);
        assert_eq!(used.status(), 2);
        assert_eq!(&used.sense()[..4], &[0x72, 0x05, 0x21, 0x00]);
        assert_eq!(used.sense_len(), 8);
    }

    fn more_than_64_descriptors_each_way() {
        // A Linux guest sends up to 126 segments per request; the data moves in
        // batches of 64 iovecs.
        let mut h = Harness::writable(&[1 << 20]);
        let data: Vec<u8> = (0..200 * 512u32).map(|i| (i % 251) as u8).collect();
        let mut cdb = read10(10, 200);
        cdb[0] = 0x2a;
        let mut bufs = vec![Buf::R(request(lun(0), &cdb))];
        bufs.extend(data.chunks(512).map(|c| Buf::R(c.to_vec())));
        bufs.push(Buf::W(RESP_LEN));
        let used = h.submit(FIRST_REQUEST_QUEUE, &bufs);
        assert_eq!(
            (used.response(), used.status()),
            (S_OK, 0),
            "{:?}",
            used.sense()
        );
        let mut bufs = vec![Buf::R(request(lun(0), &read10(10, 200))), Buf::W(RESP_LEN)];
        bufs.extend((0..200).map(|_| Buf::W(512)));
        let used = h.submit(FIRST_REQUEST_QUEUE, &bufs);
        assert_eq!(
            (used.response(), used.status()),
            (S_OK, 0),
            "{:?}",
            used.sense()
        );
        assert_eq!(used.data_in(), &data[..]);
    }

    fn read_and_write_paths_do_not_allocate() {
        let mut h = Harness::writable(&[1 << 20]);
        let mut write = read10(8, 8);
        write[0] = 0x2a;
        let payload = vec![0x5au8; 4096];
        // The counter sees this thread's allocations.
        let before = allocations();
        let probe = std::hint::black_box(vec![1u8; 3]);
        assert!(allocations() > before, "the counting allocator counts");
        drop(probe);
        // Warm up (first use of lazily initialised state).
        let _ = h.command(lun(0), &read10(0, 8), 4096);
        for (cdb, data_out, data_in) in [
            (read10(0, 8), None, 4096u32),
            (write, Some(payload.clone()), 0),
        ] {
            for _ in 0..3 {
                h.next_data = DATA_BASE;
                let mut bufs = vec![Buf::R(request(lun(0), &cdb))];
                if let Some(d) = &data_out {
                    bufs.push(Buf::R(d.clone()));
                }
                bufs.push(Buf::W(RESP_LEN));
                if data_in > 0 {
                    bufs.push(Buf::W(data_in));
                }
                let _ = h.push(FIRST_REQUEST_QUEUE, &bufs);
                let before = allocations();
                h.backend
                    .handle_event(FIRST_REQUEST_QUEUE as u16, EventSet::IN, &h.vrings, 0)
                    .unwrap();
                // Completing an asynchronous transfer allocates nothing
                // either.
                h.backend.complete_transfers(&h.vrings, 0);
                let made = allocations() - before;
                assert_eq!(
                    made, 0,
                    "{:#x}: {made} heap allocations on the I/O path",
                    cdb[0]
                );
            }
        }
    }

    fn a_pass_out_of_time_kicks_its_queue_again() {
        let mut h = Harness::new(&[1 << 20]);
        // Every pass takes one request, then its time is up.
        h.backend.set_pass_budget(std::time::Duration::ZERO);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: dup of a descriptor we own; the File owns the copy.
        let copy = unsafe { libc::dup(kick.as_raw_fd()) };
        assert!(copy >= 0);
        // SAFETY: `copy` is a fresh descriptor owned by nobody else.
        let copy = unsafe { std::fs::File::from_raw_fd(copy) };
        h.vrings[FIRST_REQUEST_QUEUE].set_kick(Some(copy));
        let (resp, data) = h.push_aligned_read(FIRST_REQUEST_QUEUE, 0, DATA_BASE, 16, 1, 5);
        let taken = |h: &Harness| {
            usize::from(h.used_idx(FIRST_REQUEST_QUEUE)) + h.backend.transfers_in_flight(0)
        };
        // As the worker's epoll loop does: one pass per kick.
        let mut passes = 0;
        loop {
            h.backend
                .handle_event(FIRST_REQUEST_QUEUE as u16, EventSet::IN, &h.vrings, 0)
                .unwrap();
            passes += 1;
            assert_eq!(taken(&h), passes, "one request per pass");
            if kick.read().is_err() {
                break;
            }
            assert!(passes < 5, "kicked again with nothing left");
        }
        // The fifth pass took the last request; its re-check found none
        // left, so it did not kick the queue again.
        assert_eq!(passes, 5);
        h.backend.complete_transfers(&h.vrings, 0);
        assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 5);
        assert_eq!(h.read(resp, RESP_LEN)[11], S_OK);
        assert_eq!(h.read(data, 512), &h.images[0][16 * 512..17 * 512]);
    }

    fn request_queues_on_a_second_thread() {
        let options = QueueOptions {
            request_queues: 2,
            threads: 2,
            poll: std::time::Duration::from_micros(50),
        };
        let mut h = Harness::build(&[1 << 20], true, options);
        assert_eq!(h.backend.queues_per_thread(), vec![0b0111, 0b1000]);
        // Thread 1 serves request queue 1 (global index 3) as its vring 0.
        h.next_data = DATA_BASE;
        let second = FIRST_REQUEST_QUEUE + 1;
        let writable = h.push(
            second,
            &[
                Buf::R(request(lun(0), &read10(5, 1))),
                Buf::W(RESP_LEN),
                Buf::W(512),
            ],
        );
        assert_eq!(h.used_idx(second), 0);
        h.backend
            .handle_event(0, EventSet::IN, &h.vrings[second..=second], 1)
            .unwrap();
        h.backend
            .complete_transfers(&h.vrings[second..=second], 1);
        assert_eq!(h.used_idx(second), 1);
        assert_eq!(h.read(writable[1].0, 512), &h.images[0][5 * 512..6 * 512]);
        // Thread 0 still serves the first request queue as its vring 2.
        let used = h.command(lun(0), &read10(6, 1), 512);
        assert_eq!(used.data_in(), &h.images[0][6 * 512..7 * 512]);
    }

    fn task_management_completes_pending_requests_first() {
        let mut h = Harness::new(&[1 << 20]);
        // A READ made available on the request queue but not kicked (its kick
        // is still in flight when the TMF arrives).
        h.next_data = DATA_BASE;
        let writable = h.push(
            FIRST_REQUEST_QUEUE,
            &[
                Buf::R(request(lun(0), &read10(3, 1))),
                Buf::W(RESP_LEN),
                Buf::W(512),
            ],
        );
        assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 0);
        // ABORT TASK SET on the control queue: the READ completes first.
        h.next_data = DATA_BASE + 0x10_0000;
        let _ = h.push(CONTROL_QUEUE, &[Buf::R(tmf(1, lun(0))), Buf::W(1)]);
        let used = h.kick(CONTROL_QUEUE);
        assert_eq!(used.len(), 1);
        assert_eq!(
            h.used_idx(FIRST_REQUEST_QUEUE),
            1,
            "the pending READ was completed before the TMF answer"
        );
        assert_eq!(h.read(writable[0].0, RESP_LEN)[11], S_OK);
        assert_eq!(h.read(writable[1].0, 512), &h.images[0][3 * 512..4 * 512]);
    }

    /// With a dirty log set (live migration), a READ marks every page it
    /// wrote: its response (here across a page boundary) and data-in, once
    /// written, then the used ring's element and index; the request's own
    /// page, the gap between the buffers and the rest of guest memory
    /// stay unmarked. With io_uring the READ (O_DIRECT) is in flight when
    /// the pass ends: nothing of it is marked before it completes.
    fn a_read_marks_what_it_wrote_in_the_dirty_log() {
        let mut h = Harness::direct(&[1 << 20]);
        // The used ring 4 bytes before a page: its flags and index on one
        // page, its elements on the next (and no EVENT_IDX: no
        // avail_event written there).
        let q = FIRST_REQUEST_QUEUE;
        let used = DATA_BASE + 0x8_0000 - 4;
        h.rings[q].used = used;
        h.vrings[q]
            .set_queue_info(h.rings[q].desc, h.rings[q].avail, used)
            .unwrap();
        let (log, file) = dirty_log();
        h.backend.set_dirty_log(Some(log.clone()));
        let base = DATA_BASE + 0x4_0000;
        let page = base / 0x1000;
        // Response from 8 bytes before page + 2: pages + 1 and + 2;
        // data-in, 24 blocks, pages + 4 to + 6.
        let (resp, data) = (base + 0x1ff8, base + 0x4000);
        let req = request(lun(0), &read10(16, 24));
        h.mem
            .memory()
            .write_slice(&req, GuestAddress(base))
            .unwrap();
        h.push_raw(
            FIRST_REQUEST_QUEUE,
            &[
                SplitDescriptor::new(base, req.len() as u32, VRING_DESC_F_NEXT as u16, 1),
                SplitDescriptor::new(
                    resp,
                    RESP_LEN,
                    (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                    2,
                ),
                SplitDescriptor::new(data, 24 * 512, VRING_DESC_F_WRITE as u16, 0),
            ],
        );
        h.backend
            .handle_event(FIRST_REQUEST_QUEUE as u16, EventSet::IN, &h.vrings, 0)
            .unwrap();
        if current_engine() == IoEngine::IoUring {
            assert_eq!(h.backend.transfers_in_flight(0), 1, "the READ is in flight");
            let marked = marked_pages(&file);
            for p in [page + 1, page + 2, page + 4, page + 5, page + 6] {
                assert!(!marked.contains(&p), "page {p:#x} marked before it was written");
            }
        }
        h.backend.complete_transfers(&h.vrings, 0);
        assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 1);
        assert_eq!(h.read(resp, RESP_LEN)[10..12], [0, S_OK]);
        assert_eq!(h.read(data, 24 * 512), &h.images[0][16 * 512..40 * 512]);

        let mut expected = vec![page + 1, page + 2, page + 4, page + 5, page + 6];
        // The used ring's flags and index, and its element 0 on the next
        // page; the flags of the second request queue (served too by
        // `complete_transfers`, its notifications disabled and enabled).
        expected.extend([used / 0x1000, (used + 4) / 0x1000]);
        expected.push(h.rings[q + 1].used / 0x1000);
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(marked_pages(&file), expected);
        assert_eq!(log.pages_past_log(), 0);
    }

    /// A log set and then cleared (the VMM dropped VHOST_F_LOG_ALL) is not
    /// written, nor is one never set.
    fn nothing_is_marked_without_a_log() {
        let mut h = Harness::direct(&[1 << 20]);
        let (log, file) = dirty_log();
        h.backend.set_dirty_log(Some(log.clone()));
        h.backend.set_dirty_log(None);
        assert!(h.backend.dirty_log().is_none());
        let (resp, _) = h.push_aligned_read(FIRST_REQUEST_QUEUE, 0, DATA_BASE, 0, 8, 2);
        assert_eq!(h.kick(FIRST_REQUEST_QUEUE).len(), 2);
        assert_eq!(h.read(resp, RESP_LEN)[10..12], [0, S_OK]);
        assert_eq!(marked_pages(&file), Vec::<u64>::new());
        assert_eq!(log.pages_marked(), 0);
    }

    /// The control and event queues' answers are marked too.
    fn control_and_event_queue_answers_are_marked() {
        let mut h = Harness::new(&[4096]);
        let hub = vhost_device_scsi::virtio::EventHub::new().unwrap();
        h.backend.set_event_hub(hub.clone());
        h.backend.acked_features(1 << VIRTIO_SCSI_F_HOTPLUG);
        let (log, file) = dirty_log();
        h.backend.set_dirty_log(Some(log));
        // A TMF; its one-byte response on a page of its own.
        let tmf_resp = DATA_BASE + 0x2_0000;
        let tmf_req = tmf(5, lun(0));
        let req_at = DATA_BASE + 0x3_0000;
        h.mem
            .memory()
            .write_slice(&tmf_req, GuestAddress(req_at))
            .unwrap();
        h.push_raw(
            CONTROL_QUEUE,
            &[
                SplitDescriptor::new(req_at, tmf_req.len() as u32, VRING_DESC_F_NEXT as u16, 1),
                SplitDescriptor::new(tmf_resp, 1, VRING_DESC_F_WRITE as u16, 0),
            ],
        );
        assert_eq!(h.kick(CONTROL_QUEUE), vec![(0, 1)]);
        // An event buffer crossing into the next page.
        let event_buf = DATA_BASE + 0x4_0ff8;
        h.push_raw(
            EVENT_QUEUE,
            &[SplitDescriptor::new(event_buf, 16, VRING_DESC_F_WRITE as u16, 0)],
        );
        hub.post(vhost_device_scsi::virtio::DeviceEvent::LunAdded(1));
        h.backend
            .handle_event(EVENT_QUEUE as u16, EventSet::IN, &h.vrings, 0)
            .unwrap();
        assert_eq!(h.used_idx(EVENT_QUEUE), 1);
        let marked = marked_pages(&file);
        for p in [tmf_resp, event_buf, event_buf + 8] {
            assert!(marked.contains(&(p / 0x1000)), "page of {p:#x} not marked: {marked:x?}");
        }
        assert!(!marked.contains(&(req_at / 0x1000)), "the request was not written");
        for q in [CONTROL_QUEUE, EVENT_QUEUE] {
            let used = h.rings[q].used;
            assert!(marked.contains(&(used / 0x1000)), "queue {q}'s used ring");
            assert!(marked.contains(&((used + 4) / 0x1000)), "queue {q}'s used element");
        }
    }
}

/// With io_uring and two worker threads: transfers in flight on a thread
/// that is not serving never hold up a COMPARE AND WRITE on the other
/// thread. When a thread's event loop ends (an event other than "readable"
/// on one of its descriptors: vhost-user-backend then stops the thread),
/// its transfers are completed first; and a COMPARE AND WRITE completes
/// the transfers of a thread not serving at that moment, since nobody else
/// may be left to reap them. Either used to leave COMPARE AND WRITE waiting
/// for ever, holding its unit.
#[test]
fn another_threads_transfers_do_not_wedge_compare_and_write() {
    ENGINE.with(|e| e.set(IoEngine::IoUring));
    let options = QueueOptions {
        request_queues: 2,
        threads: 2,
        poll: std::time::Duration::ZERO,
    };
    let mut h = Harness::build_full(&[1 << 20], false, options, true);
    // Request queue 1 (global index 3) is thread 1's vring 0.
    let second = FIRST_REQUEST_QUEUE + 1;
    let thread1 = h.vrings[second..=second].to_vec();
    let thread1 = &thread1[..];

    // Its event loop ends with eight O_DIRECT READs in flight.
    let _ = h.push_aligned_read(second, 0, DATA_BASE, 0, 8, 8);
    h.backend.handle_event(0, EventSet::IN, thread1, 1).unwrap();
    assert!(h.backend.transfers_in_flight(1) > 0, "READs in flight");
    assert!(h
        .backend
        .handle_event(0, EventSet::HANG_UP, thread1, 1)
        .is_err());
    assert_eq!(
        h.backend.transfers_in_flight(1),
        0,
        "drained as its loop ends"
    );
    assert_eq!(h.used_idx(second), 8);

    // Eight more in flight on thread 1, which then sits idle; a COMPARE AND
    // WRITE of LBA 2 on thread 0.
    let _ = h.push_aligned_read(second, 0, DATA_BASE, 0, 8, 8);
    h.backend.handle_event(0, EventSet::IN, thread1, 1).unwrap();
    assert!(h.backend.transfers_in_flight(1) > 0, "READs in flight");
    let mut caw = vec![0x89, 0];
    caw.extend_from_slice(&2u64.to_be_bytes());
    caw.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
    let mut data_out = h.images[0][2 * 512..3 * 512].to_vec();
    data_out.extend_from_slice(&[0x3c; 512]);
    h.next_data = DATA_BASE + 0x10_0000;
    let resp = h.push(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(0), &caw)),
            Buf::R(data_out),
            Buf::W(RESP_LEN),
        ],
    )[0]
    .0;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            h.backend
                .handle_event(FIRST_REQUEST_QUEUE as u16, EventSet::IN, &h.vrings, 0)
                .unwrap();
            let _ = tx.send(());
        });
        let done = rx.recv_timeout(std::time::Duration::from_secs(10));
        if done.is_err() {
            // Unblock the waiting thread before failing.
            h.backend.complete_transfers(&h.vrings[second..=second], 1);
            panic!("COMPARE AND WRITE waited for another thread's transfers");
        }
    });
    assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE), 1);
    let resp = h.read(resp, RESP_LEN);
    assert_eq!((resp[11], resp[10]), (S_OK, 0), "COMPARE AND WRITE: GOOD");
    assert_eq!(h.backend.transfers_in_flight(1), 0);
    assert_eq!(h.used_idx(second), 16);
}

/// Heads to serve again (from the in-flight region) left when a pass runs
/// out of time, with nothing new available, bring the worker back as new
/// requests would (the queue kicks itself): otherwise they would wait for
/// the guest's next kick, which may be its SCSI timeout.
#[test]
fn resubmits_left_after_a_pass_out_of_time_are_kicked_again() {
    use vhost_device_scsi::virtio::inflight_shm::InflightRegion;
    let mut h = Harness::new(&[1 << 20]);
    h.backend.set_pass_budget(std::time::Duration::ZERO);
    let q = FIRST_REQUEST_QUEUE;
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // SAFETY: dup of a descriptor we own; the File owns the copy.
    let copy = unsafe { libc::dup(kick.as_raw_fd()) };
    assert!(copy >= 0);
    // SAFETY: `copy` is a fresh descriptor owned by nobody else.
    h.vrings[q].set_kick(Some(unsafe { std::fs::File::from_raw_fd(copy) }));
    // Two READs the guest made available, which a killed daemon took.
    let (_, _) = h.push_aligned_read(q, 0, DATA_BASE, 16, 1, 1);
    let (_, _) = h.push_aligned_read(q, 3, DATA_BASE + 0x10000, 17, 1, 1);
    let (region, _file) = InflightRegion::create(h.vrings.len() as u16, QUEUE_SIZE).unwrap();
    let tracking = h.backend.tracking(q).unwrap().clone();
    tracking.set_region(region.queue(q as u16));
    region.queue(q as u16).unwrap().begin(0).unwrap();
    region.queue(q as u16).unwrap().begin(3).unwrap();
    // The new daemon starts the queue: two heads to resubmit, next_avail 2.
    tracking.start(q, &h.vrings[q]);
    assert_eq!(h.vrings[q].queue_next_avail(), 2);
    // One pass (one kick): takes one resubmitted head, then is out of time.
    h.backend
        .handle_event(q as u16, EventSet::IN, &h.vrings, 0)
        .unwrap();
    assert_eq!(h.used_idx(q), 1);
    assert!(
        kick.read().is_ok(),
        "a head to resubmit is left, but the queue was not kicked again: \
         it waits for the guest's next kick"
    );
}
