//! Target `request`: the whole request path. The input lays out a split
//! virtqueue in mock guest memory — descriptor table, available ring and
//! its index, buffer contents — and the backend's queue handler
//! (`ScsiBackend::handle_event`, as the vring worker thread calls it) serves
//! it, against in-memory LUNs.
//!
//! Input:
//!
//! ```text
//! u8   queue (mod 4: control, event, request queue 0, request queue 1)
//! u8   log2 of the queue size (mod 9: 1 to 256)
//! u16  ring base: where the device's next_avail and next_used start
//! u8   flags: bit 0 EVENT_IDX, bit 1 a config write of cdb_size and
//!      sense_size follows (u8 each)
//! u8   descriptor count n, then n descriptors written to the table from
//!      index 0 (those past the queue size are dropped):
//!        addr  u8 selector, then u16 (or u64 for the raw selector):
//!              0xf0 rings, 0xf1 third region, 0xf2 unmapped gap, 0xf3 back
//!              from the end of memory, 0xf4 back from 2^64, 0xf5 raw;
//!              anything else: the data area (DATA_BASE + u16), which
//!              crosses the boundary of two adjacent regions
//!        len   u8 selector, then u16 (selector bit 7 clear) or u32
//!        u8 flags (NEXT 1, WRITE 2, INDIRECT 4, the rest as given), u16 next
//! u16  available ring index, relative to the base (more than the queue
//!      size is a driver bug the device must survive), then one u16 head
//!      per new entry (at most the queue size)
//! u8   payload count, then each: addr (as above), u16 length, bytes —
//!      written into guest memory before the rings (headers, CDBs, data,
//!      indirect tables)
//! ```
//!
//! Invariants (checked against a model that walks the same chains with
//! virtio-queue on the memory before the device runs):
//! - no panic, `handle_event` never fails (a failure would end the worker
//!   thread and so every queue it serves), no hang;
//! - no storage access outside a LUN, nothing written to a read-only LUN;
//! - one used-ring entry per popped chain whose head is a valid index, in
//!   order; an unusable chain (readable after writable, outside memory,
//!   or broken: a loop, a link past its table, a nested indirect table)
//!   has used length 0;
//! - every used length is at most the chain's writable bytes, and exactly
//!   the bytes written: writable buffers are poisoned and compared (a
//!   second run with another poison settles bytes written with the poison
//!   value), and the written bytes are a prefix of the writable part;
//! - nothing changes in guest memory outside the writable descriptors of
//!   usable chains and the used ring (snapshot + diff);
//! - virtio-scsi responses are well-formed (response code, status, sense
//!   length and sense, residual);
//! - the device keeps serving: afterwards a valid READ on another request
//!   queue, and one on the same queue (control queue: a TMF), succeed and
//!   return the LUN's data.
//!
//! Where a writable buffer overlaps the rings or an indirect table, the
//! device legitimately rewrites its own input, so only the first and last
//! invariants are checked; where writable buffers overlap each other or a
//! readable buffer, the exact byte accounting is skipped.

use std::fs::File;
use std::ops::Range;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_device_scsi::scsi::inquiry::Identity;
use vhost_device_scsi::scsi::{Disk, DiskConfig, Target};
use vhost_device_scsi::storage::MemImage;
use vhost_device_scsi::virtio::backend::{QueueOptions, CONTROL_QUEUE, EVENT_QUEUE};
use vhost_device_scsi::virtio::chain::GuestMem;
use vhost_device_scsi::virtio::ScsiBackend;
use vhost_scsi_frontend::scsi::{lun_field, request};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::cdb::{block_cdb, random_command, READ_10, READ_6, WRITE_10};
use super::{
    check_sense, count, overlaps, pattern, Checked, Encoder, Handle, Input, Rng, SenseContext,
};

/// Guest memory: two adjacent regions, then a third after a hole.
const REGIONS: [(u64, usize); 3] = [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x4_0000, 0x1_0000)];
const MEM_END: u64 = 0x5_0000;
const GAP: u64 = 0x2_0000;
const REGION2: u64 = 0x4_0000;
/// Queue q's rings: descriptor table at q * RING_STRIDE, available ring
/// and used ring after it (room for 256 entries each).
const RING_STRIDE: u64 = 0x2000;
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x1400;
const QUEUES: usize = 4;
/// Fuzzed buffers: DATA_BASE + u16, across the region 0/1 boundary.
const DATA_BASE: u64 = 0x8000;
/// The follow-up requests' buffers (end of the third region).
const FOLLOW_UP: u64 = 0x4_c000;
const MAX_QUEUE_SIZE: u16 = 256;
const POISON: [u8; 2] = [0xa5, 0x5a];

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const REQ_HEADER: usize = 19;
const RESP_HEADER: usize = 12;

// virtio-scsi response codes (virtio 1.2 §5.6.6.1).
const S_OK: u8 = 0;
const S_OVERRUN: u8 = 1;
const S_BAD_TARGET: u8 = 3;
const S_FAILURE: u8 = 9;
const S_FUNCTION_REJECTED: u8 = 11;
const S_INCORRECT_LUN: u8 = 12;

/// A guest address as the input names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    Data(u16),
    Ring(u16),
    Region2(u16),
    Gap(u16),
    End(u16),
    High(u16),
    Raw(u64),
}

impl Addr {
    fn read(input: &mut Input<'_>) -> Addr {
        match input.u8() {
            0xf0 => Addr::Ring(input.u16()),
            0xf1 => Addr::Region2(input.u16()),
            0xf2 => Addr::Gap(input.u16()),
            0xf3 => Addr::End(input.u16()),
            0xf4 => Addr::High(input.u16()),
            0xf5 => Addr::Raw(input.u64()),
            _ => Addr::Data(input.u16()),
        }
    }

    fn encode(self, e: &mut Encoder) {
        match self {
            Addr::Data(o) => e.u8(0).u16(o),
            Addr::Ring(o) => e.u8(0xf0).u16(o),
            Addr::Region2(o) => e.u8(0xf1).u16(o),
            Addr::Gap(o) => e.u8(0xf2).u16(o),
            Addr::End(o) => e.u8(0xf3).u16(o),
            Addr::High(o) => e.u8(0xf4).u16(o),
            Addr::Raw(a) => e.u8(0xf5).u64(a),
        };
    }

    pub fn resolve(self) -> u64 {
        match self {
            Addr::Data(o) => DATA_BASE + u64::from(o),
            Addr::Ring(o) => u64::from(o),
            Addr::Region2(o) => REGION2 + u64::from(o),
            Addr::Gap(o) => GAP + u64::from(o),
            Addr::End(o) => MEM_END - u64::from(o),
            Addr::High(o) => u64::MAX - u64::from(o),
            Addr::Raw(a) => a,
        }
    }
}

/// A descriptor table entry.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: Addr,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    fn read(input: &mut Input<'_>) -> Desc {
        let addr = Addr::read(input);
        let len = if input.u8() & 0x80 == 0 {
            u32::from(input.u16())
        } else {
            input.u32()
        };
        let flags = u16::from(input.u8());
        let next = input.u16();
        Desc {
            addr,
            len,
            flags,
            next,
        }
    }

    fn encode(&self, e: &mut Encoder) {
        self.addr.encode(e);
        match u16::try_from(self.len) {
            Ok(len) => e.u8(0).u16(len),
            Err(_) => e.u8(0x80).u32(self.len),
        };
        e.u8(self.flags as u8).u16(self.next);
    }

    /// The 16 bytes of a split virtqueue descriptor (virtio 1.2 §2.7.5).
    pub fn raw(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.resolve().to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// Bytes written into guest memory before the rings are laid out.
#[derive(Clone, Debug)]
pub struct Payload {
    pub addr: Addr,
    pub bytes: Vec<u8>,
}

/// A decoded input.
#[derive(Clone, Debug, Default)]
pub struct Case {
    pub queue: u8,
    pub size_log: u8,
    pub base: u16,
    pub event_idx: bool,
    /// cdb_size and sense_size written to the config space.
    pub sizes: Option<(u8, u8)>,
    pub descs: Vec<Desc>,
    /// Available ring index minus the base.
    pub avail_delta: u16,
    pub heads: Vec<u16>,
    pub payloads: Vec<Payload>,
}

impl Case {
    pub fn decode(data: &[u8]) -> Case {
        let mut input = Input::new(data);
        let queue = input.u8() % QUEUES as u8;
        let size_log = input.u8() % 9;
        let base = input.u16();
        let flags = input.u8();
        let sizes = (flags & 2 != 0).then(|| (input.u8(), input.u8()));
        let n = input.u8();
        let descs = (0..n).map(|_| Desc::read(&mut input)).collect();
        let avail_delta = input.u16();
        let entries = avail_delta.min(1 << size_log);
        let heads = (0..entries).map(|_| input.u16()).collect();
        let count = input.u8();
        let payloads = (0..count)
            .map(|_| {
                let addr = Addr::read(&mut input);
                let len = usize::from(input.u16());
                Payload {
                    addr,
                    bytes: input.bytes(len).to_vec(),
                }
            })
            .collect();
        Case {
            queue,
            size_log,
            base,
            event_idx: flags & 1 != 0,
            sizes,
            descs,
            avail_delta,
            heads,
            payloads,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u8(self.queue).u8(self.size_log).u16(self.base);
        e.u8(u8::from(self.event_idx) | if self.sizes.is_some() { 2 } else { 0 });
        if let Some((cdb, sense)) = self.sizes {
            e.u8(cdb).u8(sense);
        }
        let descs = &self.descs[..self.descs.len().min(255)];
        e.u8(descs.len() as u8);
        for d in descs {
            d.encode(&mut e);
        }
        e.u16(self.avail_delta);
        let entries = usize::from(self.avail_delta.min(self.size()));
        for i in 0..entries {
            e.u16(self.heads.get(i).copied().unwrap_or(0));
        }
        let payloads = &self.payloads[..self.payloads.len().min(255)];
        e.u8(payloads.len() as u8);
        for p in payloads {
            p.addr.encode(&mut e);
            let bytes = &p.bytes[..p.bytes.len().min(0xffff)];
            e.u16(bytes.len() as u16).bytes(bytes);
        }
        e.0
    }

    pub fn size(&self) -> u16 {
        1 << (self.size_log % 9)
    }

    fn queue_index(&self) -> usize {
        usize::from(self.queue) % QUEUES
    }
}

/// Names of the counters [`run`] keeps (see [`super::stats`]).
pub const STATS: [&str; 13] = [
    "",
    "rings overwritten",
    "buffers overlap",
    "exact",
    "head past table",
    "usable chains",
    "unusable chains",
    "second runs",
    "GOOD",
    "CHECK CONDITION",
    "OVERRUN",
    "BAD TARGET",
    "FAILURE",
];

/// Guest addresses of queue `q`'s rings.
fn rings(q: usize) -> (u64, u64, u64) {
    let base = q as u64 * RING_STRIDE;
    (base, base + AVAIL_OFFSET, base + USED_OFFSET)
}

/// The LUNs: writable 512-byte blocks with discard, read-only 4096-byte
/// blocks, and a sparse writable one (writes past its stored 4 KiB find
/// no space) with an unreadable block.
fn target() -> (Target, Vec<Handle>) {
    thread_local! {
        static CONTENTS: [Vec<u8>; 3] = [pattern(0x2000, 32 << 10), pattern(0x2001, 16 << 10), pattern(0x2002, 4 << 10)];
    }
    let images = CONTENTS.with(|c| {
        [
            MemImage::new(c[0].clone(), false),
            MemImage::new(c[1].clone(), true),
            MemImage::sparse(c[2].clone(), 64 << 10, false).with_read_error(1024..1536),
        ]
    });
    let mut disks = Vec::new();
    let mut handles = Vec::new();
    for (n, image) in images.into_iter().enumerate() {
        let checked = Checked::new(Arc::new(image), "request target LUN");
        handles.push(checked.handle());
        let config = DiskConfig {
            block_size: if n == 1 { 4096 } else { 512 },
            identity: Identity::derived("/fuzz/request", n as u16),
            solid_state: false,
            discard: n != 1,
        };
        disks.push(Disk::new(Box::new(checked), config).expect("valid fuzz LUN"));
    }
    (Target::new(disks), handles)
}

/// One device with its guest memory, laid out from a case.
struct World {
    mem: GuestMemoryAtomic<GuestMem>,
    backend: ScsiBackend,
    vrings: Vec<VringRwLock>,
    luns: Vec<Handle>,
    /// Per queue: its kick eventfd, which the backend also writes when a
    /// pass runs out of time with requests left.
    kicks: Vec<EventFd>,
}

impl World {
    fn new(case: &Case) -> World {
        let guest = GuestMem::from_ranges(
            &REGIONS
                .iter()
                .map(|&(a, s)| (GuestAddress(a), s))
                .collect::<Vec<_>>(),
        )
        .expect("guest memory");
        for p in &case.payloads {
            // Parts outside guest memory are simply not written.
            let _ = guest.write_slice(&p.bytes, GuestAddress(p.addr.resolve()));
        }
        let q = case.queue_index();
        let size = case.size();
        for other in (0..QUEUES).filter(|&o| o != q) {
            let zero = vec![0u8; RING_STRIDE as usize];
            write(&guest, other as u64 * RING_STRIDE, &zero);
        }
        let (desc, avail, used) = rings(q);
        for (i, d) in case.descs.iter().take(usize::from(size)).enumerate() {
            write(&guest, desc + 16 * i as u64, &d.raw());
        }
        // Available ring: flags, idx, the new entries from the base on.
        write(&guest, avail, &0u16.to_le_bytes());
        write(
            &guest,
            avail + 2,
            &case.base.wrapping_add(case.avail_delta).to_le_bytes(),
        );
        for (i, head) in case.heads.iter().enumerate() {
            let slot = case.base.wrapping_add(i as u16) % size;
            write(&guest, avail + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        }
        // Used ring: as the device left it at the base.
        write(&guest, used, &vec![0u8; 6 + 8 * usize::from(size)]);
        write(&guest, used + 2, &case.base.to_le_bytes());

        let mem = GuestMemoryAtomic::new(guest);
        let (target, luns) = target();
        let backend = ScsiBackend::with_options(
            Arc::new(target),
            QueueOptions {
                request_queues: QUEUES - 2,
                threads: 1,
                poll: std::time::Duration::ZERO,
            },
        );
        backend.update_memory(mem.clone()).expect("memory update");
        if let Some((cdb, sense)) = case.sizes {
            // Out-of-range sizes are refused, as from a real driver.
            let _ = backend.write_config(24, &u32::from(cdb).to_le_bytes());
            let _ = backend.write_config(20, &u32::from(sense).to_le_bytes());
        }
        let kicks: Vec<EventFd> = (0..QUEUES)
            .map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("kick eventfd"))
            .collect();
        let vrings = (0..QUEUES)
            .map(|i| {
                let vring = VringRwLock::new(mem.clone(), MAX_QUEUE_SIZE).expect("vring");
                let kick = kicks[i].try_clone().expect("kick eventfd copy");
                // SAFETY: the copy is a descriptor nothing else owns.
                vring.set_kick(Some(unsafe { File::from_raw_fd(kick.into_raw_fd()) }));
                let (d, a, u) = rings(i);
                vring.set_queue_size(if i == q { size } else { MAX_QUEUE_SIZE });
                vring.set_queue_info(d, a, u).expect("ring addresses");
                if i == q {
                    vring.set_queue_event_idx(case.event_idx);
                    vring.set_queue_next_avail(case.base);
                    vring.set_queue_next_used(case.base);
                }
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                vring
            })
            .collect();
        World {
            mem,
            backend,
            vrings,
            luns,
            kicks,
        }
    }

    fn guest(&self) -> impl std::ops::Deref<Target = GuestMem> + '_ {
        self.mem.memory()
    }

    fn snapshot(&self) -> Vec<Vec<u8>> {
        let mem = self.guest();
        REGIONS
            .iter()
            .map(|&(a, s)| {
                let mut v = vec![0u8; s];
                mem.read_slice(&mut v, GuestAddress(a)).expect("snapshot");
                v
            })
            .collect()
    }

    fn read(&self, r: &Range<u64>) -> Vec<u8> {
        let mut v = vec![0u8; (r.end - r.start) as usize];
        self.guest()
            .read_slice(&mut v, GuestAddress(r.start))
            .expect("read of a checked range");
        v
    }

    fn sizes(&self) -> (usize, usize) {
        let get = |offset| {
            let b = self.backend.read_config(offset, 4);
            u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize
        };
        (get(24), get(20))
    }

    /// Kicks `queue` and runs the worker as its epoll loop would: again
    /// while the queue's kick eventfd is signalled (a pass that ran out of
    /// time kicks itself). Each such pass took a request, so there are at
    /// most as many as the queue holds.
    fn kick(&self, queue: usize) {
        for _ in 0..=MAX_QUEUE_SIZE {
            let result = self
                .backend
                .handle_event(queue as u16, EventSet::IN, &self.vrings, 0);
            assert!(
                result.is_ok(),
                "handle_event on queue {queue} failed: {result:?} (the worker thread would stop serving)"
            );
            if self.kicks[queue].read().is_err() {
                return;
            }
        }
        panic!("queue {queue} kicked itself more often than it holds requests");
    }
}

fn write(mem: &GuestMem, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr))
        .expect("harness write inside guest memory");
}

/// Whether `r` (non-empty) lies in guest memory, possibly across adjacent
/// regions.
fn in_memory(r: &Range<u64>) -> bool {
    let mut pos = r.start;
    while pos < r.end {
        match REGIONS
            .iter()
            .find(|&&(a, s)| a <= pos && pos < a + s as u64)
        {
            Some(&(a, s)) => pos = a + s as u64,
            None => return false,
        }
    }
    true
}

/// A chain as the model sees it.
#[derive(Debug)]
struct Chain {
    head: u16,
    /// The device can use it: no readable descriptor after a writable one,
    /// everything inside guest memory, and the chain followed to its end.
    usable: bool,
    readable: Vec<Range<u64>>,
    writable: Vec<Range<u64>>,
}

impl Chain {
    fn writable_len(&self) -> u64 {
        self.writable.iter().map(|r| r.end - r.start).sum()
    }

    fn readable_len(&self) -> u64 {
        self.readable.iter().map(|r| r.end - r.start).sum()
    }
}

/// What the device should do with a case, from the memory before it runs.
struct Model {
    /// Chains popped, in order (heads past the queue size included: they
    /// get no used entry).
    chains: Vec<Chain>,
    /// A writable buffer of a usable chain overlaps a ring or an indirect
    /// table: the device may rewrite its own input, or write the ring over
    /// the buffer.
    structural: bool,
    /// Writable buffers overlap each other or a readable buffer.
    aliased: bool,
}

impl Model {
    fn new(case: &Case, mem: &GuestMem) -> Model {
        let q = case.queue_index();
        let size = case.size();
        let (desc, avail, used) = rings(q);
        let mut chains = Vec::new();
        if q != EVENT_QUEUE {
            let mut queue = Queue::new(MAX_QUEUE_SIZE).expect("queue");
            queue.set_size(size);
            queue.set_desc_table_address(Some(desc as u32), Some(0));
            queue.set_avail_ring_address(Some(avail as u32), Some(0));
            queue.set_used_ring_address(Some(used as u32), Some(0));
            queue.set_next_avail(case.base);
            queue.set_ready(true);
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let mut c = Chain {
                    head,
                    usable: true,
                    readable: Vec::new(),
                    writable: Vec::new(),
                };
                // A chain the iterator stops following before a descriptor
                // without NEXT (a loop, a link past the table, a nested
                // or unreadable indirect table) is broken: unusable.
                let mut ended = false;
                for d in chain {
                    ended = !d.has_next();
                    if d.len() == 0 {
                        continue;
                    }
                    // A buffer that wraps past 2^64 is outside memory too.
                    let end = d.addr().0.checked_add(u64::from(d.len()));
                    let r = d.addr().0..end.unwrap_or(u64::MAX);
                    if end.is_none() || !in_memory(&r) {
                        c.usable = false;
                    }
                    if d.is_write_only() {
                        c.writable.push(r);
                    } else {
                        if !c.writable.is_empty() {
                            c.usable = false;
                        }
                        c.readable.push(r);
                    }
                }
                if !ended {
                    c.usable = false;
                }
                if !c.usable {
                    c.readable.clear();
                    c.writable.clear();
                }
                chains.push(c);
            }
        }
        // Structures the device reads or writes while it serves: the rings
        // (of every queue: a kick of the control queue serves the request
        // queues first) and every indirect table the descriptor table can
        // name.
        let mut structures = vec![
            desc..desc + 16 * u64::from(size),
            avail..avail + 6 + 2 * u64::from(size),
            used..used + 6 + 8 * u64::from(size),
        ];
        for other in (0..QUEUES).filter(|&o| o != q) {
            let (d, a, u) = rings(other);
            let n = u64::from(MAX_QUEUE_SIZE);
            structures.extend([d..d + 16 * n, a..a + 6 + 2 * n, u..u + 6 + 8 * n]);
        }
        for i in 0..u64::from(size) {
            let mut raw = [0u8; 16];
            if mem
                .read_slice(&mut raw, GuestAddress(desc + 16 * i))
                .is_ok()
            {
                let flags = u16::from_le_bytes([raw[12], raw[13]]);
                if flags & F_INDIRECT != 0 {
                    let addr = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
                    let len = u64::from(u32::from_le_bytes(
                        raw[8..12].try_into().unwrap_or_default(),
                    ));
                    structures.push(addr..addr.saturating_add(len));
                }
            }
        }
        let writable = || chains.iter().flat_map(|c| c.writable.iter());
        let structural = writable().any(|w| structures.iter().any(|s| overlaps(w, s)));
        // Overlaps among buffers: sort by start, sweep.
        let mut all: Vec<(&Range<u64>, bool)> = chains
            .iter()
            .flat_map(|c| {
                c.readable
                    .iter()
                    .map(|r| (r, false))
                    .chain(c.writable.iter().map(|w| (w, true)))
            })
            .collect();
        all.sort_by_key(|(r, _)| r.start);
        let (mut end_any, mut end_writable) = (0u64, 0u64);
        let mut aliased = false;
        for (r, w) in all {
            if r.start < end_writable || (w && r.start < end_any) {
                aliased = true;
                break;
            }
            end_any = end_any.max(r.end);
            if w {
                end_writable = end_writable.max(r.end);
            }
        }
        Model {
            chains,
            structural,
            aliased,
        }
    }

    /// Chains that get a used entry, in order.
    fn completed(&self, size: u16) -> impl Iterator<Item = &Chain> {
        self.chains.iter().filter(move |c| c.head < size)
    }
}

/// Poisons every writable buffer of the model's usable chains.
fn poison(world: &World, model: &Model, value: u8) {
    let mem = world.guest();
    for w in model.chains.iter().flat_map(|c| c.writable.iter()) {
        write(&mem, w.start, &vec![value; (w.end - w.start) as usize]);
    }
}

/// A chain's writable bytes, concatenated.
fn written(world: &World, chain: &Chain) -> Vec<u8> {
    chain.writable.iter().flat_map(|w| world.read(w)).collect()
}

/// Which of `bytes` differ from the poison.
fn changed(bytes: &[u8], poison: u8) -> Vec<bool> {
    bytes.iter().map(|&b| b != poison).collect()
}

/// The used entries the device added, from the base on.
fn used_entries(world: &World, case: &Case) -> Vec<(u32, u32)> {
    let (_, _, used) = rings(case.queue_index());
    let size = case.size();
    let mem = world.guest();
    let idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used idx");
    let count = idx.wrapping_sub(case.base);
    assert!(
        count <= size,
        "used index moved by {count} in a queue of {size}"
    );
    (0..count)
        .map(|i| {
            let slot = u64::from(case.base.wrapping_add(i) % size);
            let at = used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
            (id, len)
        })
        .collect()
}

/// Every byte of guest memory that differs from `before` lies in
/// `allowed`.
fn check_diff(world: &World, before: &[Vec<u8>], allowed: &[Range<u64>]) {
    let after = world.snapshot();
    for (&(base, _), (old, new)) in REGIONS.iter().zip(before.iter().zip(&after)) {
        if old == new {
            continue;
        }
        for (i, (a, b)) in old.iter().zip(new).enumerate() {
            let addr = base + i as u64;
            if a != b {
                assert!(
                    allowed.iter().any(|r| r.contains(&addr)),
                    "guest memory at {addr:#x} changed ({a:#04x} -> {b:#04x}) outside the writable descriptors and the used ring"
                );
            }
        }
    }
}

/// The fuzz target.
pub fn run(data: &[u8]) {
    let case = Case::decode(data);
    let q = case.queue_index();
    let size = case.size();
    let world = World::new(&case);
    let model = Model::new(&case, &world.guest());
    if !model.structural {
        poison(&world, &model, POISON[0]);
    }
    let before = world.snapshot();
    world.kick(q);
    count(if model.structural {
        1
    } else if model.aliased {
        2
    } else {
        3
    });
    for c in &model.chains {
        count(if c.head >= size {
            4
        } else if c.usable {
            5
        } else {
            6
        });
    }

    if !model.structural {
        let expected: Vec<&Chain> = model.completed(size).collect();
        let used = used_entries(&world, &case);
        assert_eq!(
            used.len(),
            expected.len(),
            "used entries {used:?} for the chains {:?}",
            expected.iter().map(|c| c.head).collect::<Vec<_>>()
        );
        for (&(id, len), chain) in used.iter().zip(&expected) {
            assert_eq!(id, u32::from(chain.head), "used id");
            if !chain.usable {
                assert_eq!(len, 0, "used length of an unusable chain {chain:?}");
            }
            assert!(
                u64::from(len) <= chain.writable_len(),
                "used length {len} > {} writable bytes",
                chain.writable_len()
            );
        }
        let (_, _, used_ring) = rings(q);
        let mut allowed: Vec<Range<u64>> = Vec::new();
        allowed.push(used_ring..used_ring + 6 + 8 * u64::from(size));
        allowed.extend(expected.iter().flat_map(|c| c.writable.iter().cloned()));
        check_diff(&world, &before, &allowed);

        if !model.aliased {
            let lens: Vec<u32> = used.iter().map(|&(_, len)| len).collect();
            check_exact(&case, &world, &expected, &lens);
        }
    }
    follow_up(&world, &case);
}

/// Used lengths are exactly the bytes written, a prefix of the writable
/// part; responses are well-formed.
fn check_exact(case: &Case, world: &World, chains: &[&Chain], lens: &[u32]) {
    let q = case.queue_index();
    let mut ambiguous = Vec::new();
    let firsts: Vec<Vec<u8>> = chains.iter().map(|c| written(world, c)).collect();
    for (i, (bytes, &len)) in firsts.iter().zip(lens).enumerate() {
        let len = len as usize;
        let marks = changed(bytes, POISON[0]);
        if let Some(last) = marks.iter().rposition(|&m| m) {
            assert!(
                last < len,
                "byte {last} written, beyond the used length {len}"
            );
        }
        if marks[..len].iter().any(|&m| !m) {
            ambiguous.push(i);
        }
    }
    if !ambiguous.is_empty() {
        count(7);
        // Bytes equal to the poison: run again with another one; every
        // byte the device wrote differs from one poison or the other.
        let second = World::new(case);
        let model = Model::new(case, &second.guest());
        poison(&second, &model, POISON[1]);
        second.kick(q);
        let chains2: Vec<&Chain> = model.completed(case.size()).collect();
        let lens2: Vec<u32> = used_entries(&second, case).iter().map(|u| u.1).collect();
        assert_eq!(lens, &lens2[..], "used lengths differ between runs");
        for i in ambiguous {
            let a = changed(&firsts[i], POISON[0]);
            let b = changed(&written(&second, chains2[i]), POISON[1]);
            let len = lens[i] as usize;
            for (j, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(
                    *x || *y,
                    j < len,
                    "chain {i}: byte {j} written={} but used length {len}",
                    *x || *y
                );
            }
        }
    }
    let (cdb_size, sense_size) = world.sizes();
    for ((chain, bytes), &len) in chains.iter().zip(&firsts).zip(lens) {
        if !chain.usable {
            continue;
        }
        if q == CONTROL_QUEUE {
            check_control_response(bytes, len);
        } else {
            // Readable buffers do not overlap writable ones here: they
            // still hold the request.
            let header: Vec<u8> = chain
                .readable
                .iter()
                .flat_map(|r| world.read(r))
                .take(REQ_HEADER)
                .collect();
            check_response(chain, &header, bytes, len as usize, cdb_size, sense_size);
        }
    }
}

fn check_control_response(bytes: &[u8], len: u32) {
    assert!(len <= 5, "control response of {len} bytes");
    if len >= 1 {
        let response = if len == 5 { bytes[4] } else { bytes[0] };
        assert!(
            [
                S_OK,
                S_BAD_TARGET,
                S_FAILURE,
                S_FUNCTION_REJECTED,
                S_INCORRECT_LUN
            ]
            .contains(&response),
            "control response {response}"
        );
    }
}

/// A command response (virtio 1.2 §5.6.6.1): the response code fits what
/// the chain's shape asks for; status, sense length, sense and residual
/// are consistent.
fn check_response(
    chain: &Chain,
    header: &[u8],
    bytes: &[u8],
    len: usize,
    cdb_size: usize,
    sense_size: usize,
) {
    let resp_len = RESP_HEADER + sense_size;
    let req_len = REQ_HEADER + cdb_size;
    let writable = chain.writable_len() as usize;
    let readable = chain.readable_len() as usize;
    if writable < resp_len {
        assert_eq!(len, 0, "no room for the response, yet {len} bytes used");
        return;
    }
    assert!(
        len >= resp_len,
        "used length {len} < response {resp_len} for {chain:?}"
    );
    let data_in = writable - resp_len;
    let data_in_written = len - resp_len;
    let sense_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap_or_default()) as usize;
    let residual = u32::from_le_bytes(bytes[4..8].try_into().unwrap_or_default()) as usize;
    assert_eq!(&bytes[8..10], &[0, 0], "status qualifier");
    let status = bytes[10];
    let response = bytes[11];
    assert!(
        sense_len <= sense_size,
        "sense_len {sense_len} > {sense_size}"
    );
    assert!(
        bytes[RESP_HEADER + sense_len..resp_len]
            .iter()
            .all(|&b| b == 0),
        "bytes after the sense"
    );
    if readable < req_len {
        count(12);
        assert_eq!(
            (response, len),
            (S_FAILURE, resp_len),
            "short request header"
        );
        return;
    }
    let data_out = readable - req_len;
    if data_out > 0 && data_in > 0 {
        count(12);
        assert_eq!(
            (response, len),
            (S_FAILURE, resp_len),
            "bidirectional request"
        );
        return;
    }
    // virtio 1.2 §5.6.6.1: lun[0] is 1, lun[1] the target; only target 0.
    if header[0] != 1 || header[1] != 0 {
        assert_eq!((response, len), (S_BAD_TARGET, resp_len), "another target");
    }
    count(match (response, status) {
        (S_OK, 0) => 8,
        (S_OK, _) => 9,
        (S_OVERRUN, _) => 10,
        (S_BAD_TARGET, _) => 11,
        _ => 12,
    });
    match response {
        S_OK => {
            assert!(status == 0 || status == 2, "status {status:#x}");
            if status == 0 {
                assert_eq!(sense_len, 0, "sense with GOOD");
            } else {
                assert!(
                    sense_len > 0 || sense_size == 0,
                    "CHECK CONDITION without sense"
                );
                let sense = &bytes[RESP_HEADER..RESP_HEADER + sense_len];
                // Truncated sense (a small sense_size) is not checked further.
                let full = match sense.first() {
                    Some(0x72) => sense.len() >= 8 && usize::from(sense[7]) + 8 == sense.len(),
                    Some(_) => sense.len() == 18,
                    None => false,
                };
                if full {
                    check_sense(
                        sense,
                        &SenseContext {
                            cdb_len: 16.max(cdb_size.min(32)),
                            param_len: data_out,
                            descriptor: sense[0] == 0x72,
                        },
                    );
                }
            }
            if data_in > 0 {
                assert_eq!(residual, data_in - data_in_written, "data-in residual");
            } else {
                assert!(
                    residual <= data_out,
                    "data-out residual {residual} > {data_out}"
                );
            }
        }
        S_OVERRUN | S_BAD_TARGET => {
            assert_eq!(
                (status, sense_len, data_in_written),
                (0, 0, 0),
                "response {response}"
            );
        }
        other => panic!("response code {other} for a well-formed request"),
    }
}

/// The device keeps serving: a READ of LUN 0 block 0 on another request
/// queue and, for a request queue, on the same queue (after whatever state
/// the case left it in; for the control queue a TMF) succeeds.
fn follow_up(world: &World, case: &Case) {
    let q = case.queue_index();
    let other = if q == 2 { 3 } else { 2 };
    read_block(world, other);
    match q {
        CONTROL_QUEUE => nexus_reset(world, q),
        EVENT_QUEUE => {}
        _ => read_block(world, q),
    }
    // Nothing reached a read-only LUN.
    assert_eq!(world.luns[1].changes.load(Ordering::Relaxed), 0);
}

/// Submits one chain on `queue` through an indirect table at FOLLOW_UP
/// (so any queue size will do), kicks, and returns the used length and
/// the writable bytes.
fn submit(world: &World, queue: usize, readable: &[u8], writable: &[u32]) -> (u32, Vec<u8>) {
    let mem = world.guest();
    let vring = &world.vrings[queue];
    let (next_avail, next_used, size) = {
        let state = vring.get_ref();
        let q = state.get_queue();
        (q.next_avail(), q.next_used(), q.size())
    };
    let mut table = Vec::new();
    write(&mem, FOLLOW_UP, readable);
    let count = 1 + writable.len();
    table.extend_from_slice(
        &Desc {
            addr: Addr::Region2((FOLLOW_UP - REGION2) as u16),
            len: readable.len() as u32,
            flags: if count > 1 { F_NEXT } else { 0 },
            next: 1,
        }
        .raw(),
    );
    let mut at = FOLLOW_UP + 0x400;
    let mut buffers = Vec::new();
    for (i, &len) in writable.iter().enumerate() {
        write(&mem, at, &vec![0xee; len as usize]);
        let last = i + 2 == count;
        table.extend_from_slice(
            &Desc {
                addr: Addr::Region2((at - REGION2) as u16),
                len,
                flags: F_WRITE | if last { 0 } else { F_NEXT },
                next: i as u16 + 2,
            }
            .raw(),
        );
        buffers.push(at..at + u64::from(len));
        at += u64::from(len).max(1);
    }
    let table_at = FOLLOW_UP + 0x3000;
    write(&mem, table_at, &table);
    let (desc, avail, used) = rings(queue);
    write(
        &mem,
        desc,
        &Desc {
            addr: Addr::Region2((table_at - REGION2) as u16),
            len: table.len() as u32,
            flags: F_INDIRECT,
            next: 0,
        }
        .raw(),
    );
    write(&mem, avail, &0u16.to_le_bytes());
    write(
        &mem,
        avail + 4 + 2 * u64::from(next_avail % size),
        &0u16.to_le_bytes(),
    );
    write(&mem, avail + 2, &next_avail.wrapping_add(1).to_le_bytes());
    drop(mem);
    world.kick(queue);
    let mem = world.guest();
    let now_used = vring.get_ref().get_queue().next_used();
    assert_eq!(
        now_used,
        next_used.wrapping_add(1),
        "queue {queue}: the follow-up request was not completed"
    );
    let at = used + 4 + 8 * u64::from(next_used % size);
    let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
    let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
    assert_eq!(id, 0, "queue {queue}: follow-up used id");
    drop(mem);
    let bytes = buffers.iter().flat_map(|b| world.read(b)).collect();
    (len, bytes)
}

fn read_block(world: &World, queue: usize) {
    let (cdb_size, sense_size) = world.sizes();
    let mut request = vec![1, 0, 0x40, 0, 0, 0, 0, 0];
    request.extend_from_slice(&[0u8; 11]);
    // The driver may have shrunk the CDB area below a READ(10).
    let op = if cdb_size < 10 { READ_6 } else { READ_10 };
    let mut cdb = block_cdb(op, 0, 1);
    cdb.resize(cdb_size, 0);
    request.extend_from_slice(&cdb);
    let resp_len = (RESP_HEADER + sense_size) as u32;
    // A LOGICAL UNIT RESET or I_T NEXUS RESET among the requests leaves a
    // unit attention (SAM-5 §5.14: 29h/03h, 29h/07h), reported once each
    // before the READ runs, as to any initiator, which retries.
    let mut attempt = 0;
    let (len, bytes) = loop {
        let (len, bytes) = submit(world, queue, &request, &[resp_len, 512]);
        let sense = &bytes[RESP_HEADER..RESP_HEADER + sense_size];
        // SPC-4 §4.5: descriptor format (72h/73h) or fixed format.
        let (key, asc) = match sense.first().map(|b| b & 0x7f) {
            Some(0x72 | 0x73) => (sense.get(1), sense.get(2)),
            _ => (sense.get(2), sense.get(12)),
        };
        let unit_attention = bytes[10] == 0x02 && key.is_some_and(|k| k & 0x0f == 0x06);
        attempt += 1;
        if !unit_attention || attempt > 2 {
            break (len, bytes);
        }
        if let Some(&asc) = asc {
            assert_eq!(
                asc, 0x29,
                "queue {queue}: unit attention other than a reset's"
            );
        }
    };
    assert_eq!(
        len,
        resp_len + 512,
        "queue {queue}: follow-up READ used length"
    );
    assert_eq!(
        (bytes[11], bytes[10]),
        (S_OK, 0),
        "queue {queue}: follow-up READ response and status"
    );
    let image = world.luns[0].image.data();
    assert_eq!(
        &bytes[resp_len as usize..],
        &image[..512],
        "queue {queue}: follow-up READ data"
    );
}

fn nexus_reset(world: &World, queue: usize) {
    // virtio_scsi_ctrl_tmf_req: type TMF (0), subtype I_T NEXUS RESET (4),
    // LUN, id.
    let mut request = vec![0, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0x40, 0, 0, 0, 0, 0];
    request.extend_from_slice(&[0u8; 8]);
    let (len, bytes) = submit(world, queue, &request, &[1]);
    assert_eq!((len, bytes[0]), (1, S_OK), "follow-up TMF");
}

// ---------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------

/// A buffer of a chain being generated.
#[derive(Clone, Debug)]
pub enum Seg {
    R(Vec<u8>),
    W(u32),
}

/// Builds a case chain by chain.
pub struct Builder {
    pub case: Case,
    next_data: u32,
}

impl Builder {
    pub fn new(queue: u8, size_log: u8, base: u16) -> Builder {
        Builder {
            case: Case {
                queue,
                size_log,
                base,
                ..Case::default()
            },
            next_data: 0,
        }
    }

    /// Room for `len` bytes in the data area.
    pub fn alloc(&mut self, len: u32) -> Addr {
        let len = len.min(0x8000);
        if self.next_data + len > 0xffff {
            self.next_data = 0;
        }
        let at = self.next_data;
        self.next_data += len.max(1);
        Addr::Data(at as u16)
    }

    fn payload(&mut self, addr: Addr, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.case.payloads.push(Payload { addr, bytes });
        }
    }

    /// Places `segs` as one chain, directly in the table or (`indirect`)
    /// through an indirect table; makes it available. Returns its head.
    pub fn chain(&mut self, segs: &[Seg], indirect: bool) -> u16 {
        let mut descs = Vec::new();
        let first = if indirect {
            0
        } else {
            self.case.descs.len() as u16
        };
        for (i, seg) in segs.iter().enumerate() {
            let next = first + i as u16 + 1;
            let more = if i + 1 < segs.len() { F_NEXT } else { 0 };
            let d = match seg {
                Seg::R(bytes) => {
                    let addr = self.alloc(bytes.len() as u32);
                    self.payload(addr, bytes.clone());
                    Desc {
                        addr,
                        len: bytes.len() as u32,
                        flags: more,
                        next,
                    }
                }
                Seg::W(len) => Desc {
                    addr: self.alloc(*len),
                    len: *len,
                    flags: more | F_WRITE,
                    next,
                },
            };
            descs.push(d);
        }
        let head = self.case.descs.len() as u16;
        if indirect {
            let table: Vec<u8> = descs.iter().flat_map(|d| d.raw()).collect();
            let addr = self.alloc(table.len() as u32);
            self.payload(addr, table.clone());
            self.case.descs.push(Desc {
                addr,
                len: table.len() as u32,
                flags: F_INDIRECT,
                next: 0,
            });
        } else {
            self.case.descs.extend(descs);
        }
        self.make_available(head);
        head
    }

    pub fn event_idx(&mut self, on: bool) {
        self.case.event_idx = on;
    }

    /// A config-space write of the CDB and sense sizes.
    pub fn sizes(&mut self, cdb: u8, sense: u8) {
        self.case.sizes = Some((cdb, sense));
    }

    pub fn make_available(&mut self, head: u16) {
        self.case.heads.push(head);
        self.case.avail_delta = self.case.heads.len() as u16;
    }

    pub fn encode(&self) -> Vec<u8> {
        self.case.encode()
    }
}

/// virtio_scsi_cmd_req for `lun` (flat space addressing) with `cdb` padded
/// to `cdb_size`.
pub fn command_header(lun: u16, cdb: &[u8], cdb_size: usize) -> Vec<u8> {
    request(lun_field(lun), 0, cdb, cdb_size)
}

/// Splits `bytes` into readable pieces: whole, halves, or 1-byte pieces.
fn split_readable(rng: &mut Rng, bytes: Vec<u8>) -> Vec<Seg> {
    match rng.below(6) {
        0 if bytes.len() > 1 => {
            let at = 1 + rng.below(bytes.len() as u64 - 1) as usize;
            vec![Seg::R(bytes[..at].to_vec()), Seg::R(bytes[at..].to_vec())]
        }
        1 if bytes.len() <= 64 => bytes.iter().map(|&b| Seg::R(vec![b])).collect(),
        _ => vec![Seg::R(bytes)],
    }
}

fn split_writable(rng: &mut Rng, len: u32) -> Vec<Seg> {
    match rng.below(5) {
        0 if len > 1 => {
            let at = 1 + rng.below(u64::from(len) - 1) as u32;
            vec![Seg::W(at), Seg::W(len - at)]
        }
        1 if len > 0 && len <= 4096 => {
            let n = 1 + rng.below(8) as u32;
            let piece = len.div_ceil(n);
            let mut out = Vec::new();
            let mut left = len;
            while left > 0 {
                out.push(Seg::W(piece.min(left)));
                left -= piece.min(left);
            }
            out
        }
        _ => vec![Seg::W(len)],
    }
}

/// The segments of one request on a request queue.
fn command_segments(rng: &mut Rng, cdb_size: usize, sense_size: usize) -> Vec<Seg> {
    let lun = if rng.one_in(8) {
        rng.below(4) as u16
    } else {
        0
    };
    let (block, blocks, image) = match lun {
        1 => (4096, 4, pattern(0x2001, 16 << 10)),
        2 => (512, 128, pattern(0x2002, 4 << 10)),
        _ => (512, 64, pattern(0x2000, 32 << 10)),
    };
    let (cdb, data_out, fit) = random_command(rng, block, blocks, &image);
    let mut header = command_header(lun, &cdb, cdb_size);
    if rng.one_in(16) {
        header[rng.below(8) as usize] = rng.next() as u8;
    }
    let mut segs = split_readable(rng, header);
    if !data_out.is_empty() {
        segs.extend(split_readable(rng, data_out));
    }
    let resp = (RESP_HEADER + sense_size) as u32;
    let resp = match rng.below(12) {
        0 => rng.below(u64::from(resp)) as u32,
        _ => resp,
    };
    let data_in = match rng.below(6) {
        0 => fit.saturating_sub(rng.below(600) as u32),
        1 => fit + rng.below(600) as u32,
        _ => fit,
    };
    let writable = resp + data_in;
    segs.extend(split_writable(rng, writable));
    segs
}

fn control_segments(rng: &mut Rng) -> Vec<Seg> {
    let lun = [1, 0, 0x40, rng.below(4) as u8, 0, 0, 0, 0];
    let (request, response) = match rng.below(3) {
        0 => {
            let mut r = vec![0, 0, 0, 0];
            r.extend_from_slice(&(rng.below(12) as u32).to_le_bytes());
            r.extend_from_slice(&lun);
            r.extend_from_slice(&rng.next().to_le_bytes());
            (r, 1)
        }
        1 => {
            let mut r = vec![rng.pick(&[1u8, 2]), 0, 0, 0];
            r.extend_from_slice(&lun);
            r.extend_from_slice(&rng.bytes(4));
            (r, 5)
        }
        _ => {
            let n = rng.below(30) as usize;
            (rng.bytes(n), rng.below(6) as u32)
        }
    };
    let mut segs = split_readable(rng, request);
    segs.push(Seg::W(response));
    segs
}

/// Breaks a chain the way a buggy or hostile driver would.
fn damage(rng: &mut Rng, segs: &mut Vec<Seg>) {
    match rng.below(4) {
        // A readable buffer after a writable one.
        0 => {
            let n = 1 + rng.below(32) as usize;
            segs.push(Seg::R(rng.bytes(n)));
        }
        // Zero-length buffers anywhere.
        1 => {
            let at = rng.below(segs.len() as u64 + 1) as usize;
            let seg = if rng.one_in(2) {
                Seg::R(vec![])
            } else {
                Seg::W(0)
            };
            segs.insert(at, seg);
        }
        // Shuffled.
        2 if segs.len() > 1 => {
            let a = rng.below(segs.len() as u64) as usize;
            let b = rng.below(segs.len() as u64) as usize;
            segs.swap(a, b);
        }
        _ => segs.truncate(rng.below(segs.len() as u64 + 1) as usize),
    }
}

/// A random case: a few chains (requests, TMFs, broken ones), direct or
/// indirect, then damage to descriptors and ring at random.
pub fn generate(rng: &mut Rng) -> Vec<u8> {
    let queue = match rng.below(16) {
        0 => CONTROL_QUEUE as u8,
        1 => EVENT_QUEUE as u8,
        2..=4 => 3,
        _ => 2,
    };
    let size_log = if rng.one_in(6) {
        rng.below(9)
    } else {
        4 + rng.below(5)
    } as u8;
    let base = match rng.below(4) {
        0 => rng.next() as u16,
        1 => 0u16.wrapping_sub(rng.below(4) as u16),
        _ => 0,
    };
    let mut b = Builder::new(queue, size_log, base);
    b.case.event_idx = rng.one_in(2);
    let (mut cdb_size, mut sense_size) = (32usize, 96usize);
    if rng.one_in(6) {
        cdb_size = 6 + rng.below(40) as usize;
        sense_size = rng.below(120) as usize;
        b.case.sizes = Some((cdb_size as u8, sense_size as u8));
    }
    let chains = 1 + rng.below(4);
    for _ in 0..chains {
        let mut segs = if queue == CONTROL_QUEUE as u8 {
            control_segments(rng)
        } else {
            command_segments(rng, cdb_size, sense_size)
        };
        if rng.one_in(5) {
            damage(rng, &mut segs);
        }
        let indirect = rng.one_in(4);
        b.chain(&segs, indirect);
    }
    // Damage at the descriptor and ring level.
    let size = b.case.size();
    for _ in 0..rng.below(3) {
        match rng.below(10) {
            0 if !b.case.descs.is_empty() => {
                let i = rng.below(b.case.descs.len() as u64) as usize;
                b.case.descs[i].addr = match rng.below(6) {
                    0 => Addr::Gap(rng.next() as u16),
                    1 => Addr::End(rng.below(64) as u16),
                    2 => Addr::High(rng.below(64) as u16),
                    3 => Addr::Ring(rng.below(0x8000) as u16),
                    4 => Addr::Region2(rng.next() as u16),
                    _ => Addr::Data(0x8000 - rng.below(32) as u16),
                };
            }
            1 if !b.case.descs.is_empty() => {
                // A loop or a jump anywhere, even past the table.
                let i = rng.below(b.case.descs.len() as u64) as usize;
                b.case.descs[i].flags |= F_NEXT;
                b.case.descs[i].next = rng.below(u64::from(size) + 2) as u16;
            }
            2 if !b.case.descs.is_empty() => {
                let i = rng.below(b.case.descs.len() as u64) as usize;
                b.case.descs[i].len = rng.pick(&[0, 1, 15, 0xffff, 1 << 30, u32::MAX]);
            }
            3 if !b.case.descs.is_empty() => {
                let i = rng.below(b.case.descs.len() as u64) as usize;
                b.case.descs[i].flags ^= 1 << rng.below(16);
            }
            4 => b.make_available(rng.below(u64::from(size) + 4) as u16),
            5 => b.case.avail_delta = rng.pick(&[0, size, size + 1, 0x8000, 0xffff]),
            6 if !b.case.heads.is_empty() => {
                let i = rng.below(b.case.heads.len() as u64) as usize;
                b.case.heads[i] = rng.pick(&[size, size + 1, 0xffff, 0]);
            }
            7 => {
                // An indirect table nested in an indirect table, or one
                // pointing at itself.
                let addr = b.alloc(32);
                let inner = Desc {
                    addr,
                    len: 32,
                    flags: F_INDIRECT,
                    next: 0,
                };
                let mut table = inner.raw().to_vec();
                table.extend_from_slice(&inner.raw());
                b.payload(addr, table);
                b.case.descs.push(inner);
                let head = b.case.descs.len() as u16 - 1;
                b.make_available(head);
            }
            8 if !b.case.payloads.is_empty() => {
                let i = rng.below(b.case.payloads.len() as u64) as usize;
                let p = &mut b.case.payloads[i];
                if !p.bytes.is_empty() {
                    let j = rng.below(p.bytes.len() as u64) as usize;
                    p.bytes[j] = rng.next() as u8;
                }
            }
            _ => {
                // A writable buffer over another chain's buffer or the
                // rings.
                let len = 1 + rng.below(256) as u32;
                let addr = if rng.one_in(2) {
                    Addr::Ring(rng.below(0x8000) as u16)
                } else {
                    Addr::Data(rng.below(0x400) as u16)
                };
                b.case.descs.push(Desc {
                    addr,
                    len,
                    flags: F_WRITE,
                    next: 0,
                });
                let head = b.case.descs.len() as u16 - 1;
                b.make_available(head);
            }
        }
    }
    b.encode()
}

// ---------------------------------------------------------------------------
// Seed corpus
// ---------------------------------------------------------------------------

const RESP: u32 = (RESP_HEADER + 96) as u32;

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    block_cdb(READ_10, u64::from(lba), u32::from(blocks))
}

/// A READ(10) of `blocks` from LUN 0 as one chain in a fresh builder.
fn one_read(blocks: u16, data_in: u32) -> Builder {
    let mut b = Builder::new(2, 8, 0);
    b.chain(
        &[
            Seg::R(command_header(0, &read10(0, blocks), 32)),
            Seg::W(RESP),
            Seg::W(data_in),
        ],
        false,
    );
    b
}

/// The seed corpus (`fuzz/corpus/request/`), by file name: valid chains of
/// every shape, the malformed ones a driver can make, and the regression
/// inputs of bugs the target found.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out: Vec<(&'static str, Builder)> = Vec::new();
    out.push(("read10", one_read(2, 1024)));
    out.push(("read-overrun", one_read(8, 1000)));
    {
        let mut b = Builder::new(3, 6, 0);
        b.chain(
            &[
                Seg::R(command_header(0, &block_cdb(WRITE_10, 3, 2), 32)),
                Seg::R(pattern(11, 1024)),
                Seg::W(RESP),
            ],
            false,
        );
        out.push(("write10", b));
    }
    {
        let mut b = Builder::new(2, 8, 0);
        let header = command_header(0, &super::cdb::inquiry(false, 0, 96), 32);
        let mut segs: Vec<Seg> = header.iter().map(|&x| Seg::R(vec![x])).collect();
        segs.extend((0..RESP).map(|_| Seg::W(1)));
        segs.push(Seg::W(96));
        b.chain(&segs, false);
        out.push(("inquiry-one-byte-descriptors", b));
    }
    {
        let mut b = Builder::new(2, 4, 0);
        b.chain(
            &[
                Seg::R(command_header(0, &read10(5, 3), 32)),
                Seg::W(RESP),
                Seg::W(700),
                Seg::W(836),
            ],
            true,
        );
        out.push(("read-indirect", b));
    }
    {
        let mut b = Builder::new(2, 5, 0xfffe);
        b.event_idx(true);
        for i in 0..4u16 {
            b.chain(
                &[
                    Seg::R(command_header(i % 3, &read10(u32::from(i), 1), 32)),
                    Seg::W(RESP),
                    Seg::W(if i == 1 { 4096 } else { 512 }),
                ],
                i == 2,
            );
        }
        out.push(("four-requests-ring-wrap-event-idx", b));
    }
    {
        // Data-in across the boundary of the two adjacent regions.
        let mut b = one_read(2, 0);
        b.case.descs.push(Desc {
            addr: Addr::Data((0x1_0000 - DATA_BASE - 300) as u16),
            len: 1024,
            flags: F_WRITE,
            next: 0,
        });
        b.case.descs[2].flags |= F_NEXT;
        b.case.descs[2].next = 3;
        out.push(("read-straddling-regions", b));
    }
    {
        let mut b = Builder::new(0, 4, 0);
        let mut tmf = vec![0, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0x40, 0, 0, 0, 0, 0];
        tmf.extend_from_slice(&[0; 8]);
        b.chain(&[Seg::R(tmf), Seg::W(1)], false);
        let mut abort = vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x40, 9, 0, 0, 0, 0];
        abort.extend_from_slice(&[0; 8]);
        b.chain(&[Seg::R(abort), Seg::W(1)], false);
        let mut an = vec![1, 0, 0, 0, 1, 0, 0x40, 0, 0, 0, 0, 0];
        an.extend_from_slice(&[0xff; 4]);
        b.chain(&[Seg::R(an), Seg::W(5)], false);
        out.push(("control-tmf-and-an-query", b));
    }
    {
        let mut b = Builder::new(1, 3, 0);
        b.chain(&[Seg::W(16)], false);
        out.push(("event-queue-buffer", b));
    }
    {
        let mut b = Builder::new(2, 8, 0);
        b.sizes(6, 0);
        b.chain(
            &[
                Seg::R(command_header(0, &block_cdb(READ_6, 0, 1), 6)),
                Seg::W(12),
                Seg::W(512),
            ],
            false,
        );
        b.chain(
            &[Seg::R(command_header(0, &[0xff; 6], 6)), Seg::W(12)],
            false,
        );
        out.push(("small-cdb-and-sense-sizes", b));
    }
    {
        let mut b = Builder::new(2, 4, 0);
        b.chain(
            &[
                Seg::R(command_header(0, &read10(0, 1), 32)),
                Seg::W(RESP),
                Seg::R(vec![0; 16]),
            ],
            false,
        );
        out.push(("readable-after-writable", b));
    }
    {
        let mut b = one_read(1, 512);
        b.case.descs[2].addr = Addr::Gap(0x100);
        let mut c = one_read(1, 512);
        c.case.descs[2].addr = Addr::End(100);
        b.case.descs.extend(c.case.descs.iter().map(|d| Desc {
            next: d.next + 3,
            ..*d
        }));
        b.make_available(3);
        out.push(("outside-memory", b));
    }
    {
        let mut b = one_read(1, 512);
        b.case.descs[2].flags |= F_NEXT;
        b.case.descs[2].next = 0;
        out.push(("descriptor-loop", b));
    }
    {
        let mut b = one_read(1, 512);
        b.case.descs[1].next = 300;
        out.push(("next-past-table", b));
    }
    {
        let mut b = one_read(1, 512);
        b.chain(&[Seg::R(vec![]), Seg::W(0), Seg::W(0)], false);
        b.case.descs[1].len = 0;
        out.push(("zero-length-descriptors", b));
    }
    {
        // An indirect descriptor whose table holds indirect descriptors.
        let mut b = Builder::new(2, 4, 0);
        let inner = b.alloc(32);
        let d = Desc {
            addr: inner,
            len: 32,
            flags: F_INDIRECT,
            next: 0,
        };
        let mut table = d.raw().to_vec();
        table.extend_from_slice(&d.raw());
        b.payload(inner, table);
        b.case.descs.push(d);
        b.make_available(0);
        out.push(("nested-indirect", b));
    }
    {
        // The device's response buffer over the available ring.
        let mut b = Builder::new(2, 4, 0);
        b.chain(
            &[Seg::R(command_header(0, &read10(0, 1), 32)), Seg::W(RESP)],
            false,
        );
        b.case.descs[1].addr = Addr::Ring((2 * RING_STRIDE + AVAIL_OFFSET) as u16);
        out.push(("writable-over-the-rings", b));
    }
    {
        // An available entry naming descriptor 19 of a 16-entry table
        // before a good chain: handle_event failed, ending the worker.
        let mut b = Builder::new(2, 4, 0);
        b.make_available(19);
        b.chain(
            &[
                Seg::R(command_header(0, &read10(1, 1), 32)),
                Seg::W(RESP),
                Seg::W(512),
            ],
            false,
        );
        out.push(("regress-head-past-table", b));
    }
    {
        // avail.idx 17 entries ahead in a 16-entry queue: the queue
        // handler spun forever.
        let mut b = one_read(1, 512);
        b.case.size_log = 4;
        b.case.avail_delta = 17;
        out.push(("regress-avail-index-jump", b));
    }
    out.sort_by_key(|(name, _)| *name);
    out.into_iter().map(|(n, b)| (n, b.encode())).collect()
}
