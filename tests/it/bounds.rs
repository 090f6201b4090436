//! Memory the daemon allocates is bounded whatever lengths the guest asks
//! for: each command family at its largest transfer length (and beyond),
//! through the whole request path (split virtqueue in mock guest memory →
//! `ScsiBackend` → SCSI target → image file), with the binary's counting
//! allocator recording the peak of live heap bytes. The request runs on the
//! test's own thread and the allocator counts per thread (`alloc`), so the
//! tests running beside it in this binary do not disturb the peak.
//!
//! The bounds asserted are the ones docs/resource-bounds.md states.

use std::sync::Arc;

use vhost_device_scsi::scsi::inquiry::Identity;
use vhost_device_scsi::scsi::{Disk, DiskConfig, Target};
use vhost_device_scsi::storage::FileImage;
use vhost_device_scsi::virtio::backend::{QueueOptions, FIRST_REQUEST_QUEUE};
use vhost_device_scsi::virtio::chain::GuestMem;
use vhost_device_scsi::virtio::ScsiBackend;
use vhost_scsi_frontend::cdb::op::{
    READ_16, VERIFY_16, WRITE_16, WRITE_AND_VERIFY_16, WRITE_SAME_16,
};
use vhost_scsi_frontend::cdb::{
    block, compare_and_write, get_lba_status, unmap, unmap_list, verify, write_and_verify,
    write_same, WRITE_SAME_UNMAP,
};
use vhost_scsi_frontend::scsi::{self, lun_field};
use vhost_scsi_frontend::testkit::sparse_image;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::alloc;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// docs/resource-bounds.md: what one request may allocate, besides the
/// O_DIRECT bounce buffer.
const REQUEST_CAP: usize = MIB;
/// With `--direct` and guest buffers O_DIRECT cannot take, plus the
/// aligned bounce buffer of at most one transfer (32 MiB).
const DIRECT_REQUEST_CAP: usize = 32 * MIB + MIB;
/// A chain of the most descriptors an indirect table can hold (65535).
const CHAIN_CAP: usize = 4 * MIB;

const QUEUE_SIZE: u16 = 256;
const RING_BASE: u64 = 0x1000;
const RING_STRIDE: u64 = 0x4000;
const DATA_BASE: u64 = 0x10_0000;
/// Two adjacent regions of guest memory (mmap, not heap).
const REGION_SIZE: usize = 48 * MIB;
const RESP_LEN: u32 = 12 + 96;
const REQ_LEN: usize = 19 + 32;
/// A sparse image: 2 GiB, so 1 GiB ranges fit.
const IMAGE_SIZE: u64 = 2 << 30;

enum Buf {
    R(Vec<u8>),
    W(u32),
}

struct Harness {
    mem: GuestMemoryAtomic<GuestMem>,
    used: u64,
    desc: u64,
    avail: u64,
    backend: ScsiBackend,
    vrings: Vec<VringRwLock>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(direct: bool) -> Harness {
        // O_DIRECT needs a file system that supports it: not a tmpfs /tmp.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("disk.raw");
        sparse_image(&path, &[], IMAGE_SIZE).unwrap();
        let image = if direct {
            FileImage::open_direct(&path, false).unwrap()
        } else {
            FileImage::open(&path, false).unwrap()
        };
        let config = DiskConfig {
            block_size: 512,
            identity: Identity::derived(&path.to_string_lossy(), 0),
            solid_state: false,
            discard: true,
        };
        let disk = Disk::new(Box::new(image), config).unwrap();
        let mem = GuestMemoryAtomic::new(
            GuestMem::from_ranges(&[
                (GuestAddress(0), REGION_SIZE),
                (GuestAddress(REGION_SIZE as u64), REGION_SIZE),
            ])
            .unwrap(),
        );
        let backend =
            ScsiBackend::with_options(Arc::new(Target::new(vec![disk])), QueueOptions::default());
        backend.update_memory(mem.clone()).unwrap();
        let mut addrs = (0, 0, 0);
        let vrings = (0..=FIRST_REQUEST_QUEUE)
            .map(|q| {
                let vring = VringRwLock::new(mem.clone(), QUEUE_SIZE).unwrap();
                let guard = mem.memory();
                let mock = MockSplitQueue::create(
                    &*guard,
                    GuestAddress(RING_BASE + q as u64 * RING_STRIDE),
                    QUEUE_SIZE,
                );
                let r = (
                    mock.desc_table_addr().0,
                    mock.avail_addr().0,
                    mock.used_addr().0,
                );
                addrs = r;
                vring.set_queue_size(QUEUE_SIZE);
                vring.set_queue_info(r.0, r.1, r.2).unwrap();
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                vring
            })
            .collect();
        Harness {
            mem,
            desc: addrs.0,
            avail: addrs.1,
            used: addrs.2,
            backend,
            vrings,
            _dir: dir,
        }
    }

    /// Lays `bufs` out from DATA_BASE (`misalign` bytes off 4 KiB) and
    /// returns the descriptors and the writable buffers.
    fn layout(&self, bufs: &[Buf], misalign: u64) -> (Vec<Descriptor>, Vec<(u64, u32)>) {
        let mem = self.mem.memory();
        let mut at = DATA_BASE + misalign;
        let mut descs = Vec::new();
        let mut writable = Vec::new();
        for (i, buf) in bufs.iter().enumerate() {
            let next = if i + 1 < bufs.len() {
                VRING_DESC_F_NEXT as u16
            } else {
                0
            };
            let (len, flags) = match buf {
                Buf::R(bytes) => {
                    mem.write_slice(bytes, GuestAddress(at)).unwrap();
                    (bytes.len() as u32, next)
                }
                Buf::W(len) => {
                    if writable.is_empty() {
                        // The response area: no stale sense from before.
                        mem.write_slice(&vec![0u8; *len as usize], GuestAddress(at))
                            .unwrap();
                    }
                    writable.push((at, *len));
                    (*len, next | VRING_DESC_F_WRITE as u16)
                }
            };
            descs.push(Descriptor::new(at, len, flags, i as u16 + 1));
            at += u64::from(len).max(1);
        }
        (descs, writable)
    }

    fn publish(&mut self, descs: &[Descriptor]) -> u16 {
        let mem = self.mem.memory();
        for (i, d) in descs.iter().enumerate() {
            mem.write_obj(
                RawDescriptor::from(*d),
                GuestAddress(self.desc + 16 * i as u64),
            )
            .unwrap();
        }
        let idx: u16 = mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        mem.write_obj(
            0u16,
            GuestAddress(self.avail + 4 + 2 * u64::from(idx % QUEUE_SIZE)),
        )
        .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Runs the device on what was published; returns the used length
    /// and the peak of live heap bytes above the level before the kick.
    fn run(&mut self, used_before: u16) -> (u32, usize) {
        let base = alloc::reset_peak();
        self.backend
            .handle_event(FIRST_REQUEST_QUEUE as u16, EventSet::IN, &self.vrings, 0)
            .unwrap();
        let peak = alloc::peak_since(base);
        let mem = self.mem.memory();
        let used_after: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        assert_eq!(used_after, used_before.wrapping_add(1), "one used entry");
        let at = self.used + 4 + 8 * u64::from(used_before % QUEUE_SIZE);
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (len, peak)
    }

    /// One command: request, response and data buffers; returns the
    /// response (status, sense key, ASC, ASCQ) and the peak.
    fn command(&mut self, cdb: &[u8], data: Option<Buf>, misalign: u64) -> (Outcome, usize) {
        let mut bufs = vec![Buf::R(request(cdb)), Buf::W(RESP_LEN)];
        bufs.extend(data);
        // Data-out goes before the response (readable first).
        if matches!(bufs.last(), Some(Buf::R(_))) {
            bufs.swap(1, 2);
        }
        let (descs, writable) = self.layout(&bufs, misalign);
        let before = self.publish(&descs);
        let (_, peak) = self.run(before);
        let resp = writable[0].0;
        (self.outcome(resp), peak)
    }

    fn outcome(&self, resp: u64) -> Outcome {
        let mut r = [0u8; 12 + 18];
        self.mem
            .memory()
            .read_slice(&mut r, GuestAddress(resp))
            .unwrap();
        let sense = r[10] == 2;
        Outcome {
            response: r[11],
            status: r[10],
            key: if sense { r[12 + 2] & 0x0f } else { 0 },
            asc: if sense { r[12 + 12] } else { 0 },
            ascq: if sense { r[12 + 13] } else { 0 },
        }
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Outcome {
    response: u8,
    status: u8,
    key: u8,
    asc: u8,
    ascq: u8,
}

const GOOD: Outcome = Outcome {
    response: 0,
    status: 0,
    key: 0,
    asc: 0,
    ascq: 0,
};
/// ILLEGAL REQUEST / INVALID FIELD IN CDB.
const INVALID_FIELD_IN_CDB: Outcome = Outcome {
    response: 0,
    status: 2,
    key: 5,
    asc: 0x24,
    ascq: 0,
};
/// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST.
const INVALID_FIELD_IN_PARAM: Outcome = Outcome {
    response: 0,
    status: 2,
    key: 5,
    asc: 0x26,
    ascq: 0,
};
/// ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE.
const LBA_OUT_OF_RANGE: Outcome = Outcome {
    response: 0,
    status: 2,
    key: 5,
    asc: 0x21,
    ascq: 0,
};
/// The buffer cannot hold the transfer (virtio 1.2 §5.6.6.1).
const OVERRUN: Outcome = Outcome {
    response: 1,
    status: 0,
    key: 0,
    asc: 0,
    ascq: 0,
};

fn request(cdb: &[u8]) -> Vec<u8> {
    scsi::request(lun_field(0), 0, cdb, 32)
}

/// Blocks in the largest transfer (32 MiB of 512-byte blocks).
const MAX_BLOCKS: u32 = 65536;
/// Blocks in 1 GiB, the largest UNMAP / WRITE SAME range.
const GIB_BLOCKS: u32 = 1 << 21;

fn check(name: &str, got: (Outcome, usize), want: Outcome, cap: usize, peaks: &mut Vec<String>) {
    let (outcome, peak) = got;
    assert_eq!(outcome, want, "{name}");
    assert!(
        peak <= cap,
        "{name}: {peak} bytes allocated, more than the {cap} stated"
    );
    peaks.push(format!("{name}: {} KiB", peak.div_ceil(KIB)));
}

#[test]
fn memory_stays_bounded_at_the_largest_lengths() {
    let mut peaks = Vec::new();
    let mut h = Harness::new(false);
    let max = 32 * MIB as u32;
    let pattern = |len: usize| (0..len).map(|i| (i * 7 + 1) as u8).collect::<Vec<u8>>();

    // READ(16)/WRITE(16): the largest transfer, and 0xFFFFFFFF blocks.
    let out = h.command(
        &block(WRITE_16, 0, MAX_BLOCKS),
        Some(Buf::R(pattern(max as usize))),
        0,
    );
    check("WRITE(16) 32 MiB", out, GOOD, REQUEST_CAP, &mut peaks);
    let out = h.command(&block(READ_16, 0, MAX_BLOCKS), Some(Buf::W(max)), 0);
    check("READ(16) 32 MiB", out, GOOD, REQUEST_CAP, &mut peaks);
    let out = h.command(&block(READ_16, 0, u32::MAX), Some(Buf::W(max)), 0);
    check(
        "READ(16) 0xFFFFFFFF blocks",
        out,
        INVALID_FIELD_IN_CDB,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &block(WRITE_16, 0, u32::MAX),
        Some(Buf::R(vec![0; 4096])),
        0,
    );
    check(
        "WRITE(16) 0xFFFFFFFF blocks",
        out,
        INVALID_FIELD_IN_CDB,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(&block(READ_16, 0, MAX_BLOCKS + 1), Some(Buf::W(max)), 0);
    check(
        "READ(16) 32 MiB + 1 block",
        out,
        INVALID_FIELD_IN_CDB,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(&block(READ_16, u64::MAX, MAX_BLOCKS), Some(Buf::W(max)), 0);
    check(
        "READ(16) at LBA 2^64-1",
        out,
        LBA_OUT_OF_RANGE,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &block(WRITE_16, 0, MAX_BLOCKS),
        Some(Buf::R(vec![0; 4096])),
        0,
    );
    check(
        "WRITE(16) 32 MiB with 4 KiB of data",
        out,
        OVERRUN,
        REQUEST_CAP,
        &mut peaks,
    );

    // VERIFY(16): BYTCHK 00b, 01b and 11b over the largest transfer.
    let out = h.command(&block(VERIFY_16, 0, MAX_BLOCKS), None, 0);
    check("VERIFY(16) 32 MiB", out, GOOD, REQUEST_CAP, &mut peaks);
    let out = h.command(
        &verify(VERIFY_16, 0, MAX_BLOCKS, 1),
        Some(Buf::R(pattern(max as usize))),
        0,
    );
    check(
        "VERIFY(16) BYTCHK=01b 32 MiB",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    // The pattern repeats every 256 bytes: every block is its first one.
    let out = h.command(
        &verify(VERIFY_16, 0, MAX_BLOCKS, 3),
        Some(Buf::R(pattern(512))),
        0,
    );
    check(
        "VERIFY(16) BYTCHK=11b 32 MiB",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(&block(VERIFY_16, 0, u32::MAX), None, 0);
    check(
        "VERIFY(16) 0xFFFFFFFF blocks",
        out,
        INVALID_FIELD_IN_CDB,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &write_and_verify(WRITE_AND_VERIFY_16, 0, MAX_BLOCKS, 1),
        Some(Buf::R(pattern(max as usize))),
        0,
    );
    check(
        "WRITE AND VERIFY(16) 32 MiB",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );

    // WRITE SAME(16): 1 GiB of zeroes with UNMAP, 16 MiB of a pattern
    // (through the 64 KiB chunk), 0xFFFFFFFF blocks.
    let out = h.command(
        &write_same(WRITE_SAME_16, WRITE_SAME_UNMAP, 0, GIB_BLOCKS),
        Some(Buf::R(vec![0; 512])),
        0,
    );
    check(
        "WRITE SAME(16) UNMAP 1 GiB",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &block(WRITE_SAME_16, 0, 32768),
        Some(Buf::R(pattern(512))),
        0,
    );
    check(
        "WRITE SAME(16) 16 MiB pattern",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &block(WRITE_SAME_16, 0, GIB_BLOCKS + 1),
        Some(Buf::R(pattern(512))),
        0,
    );
    check(
        "WRITE SAME(16) 1 GiB + 1 block",
        out,
        INVALID_FIELD_IN_CDB,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &block(WRITE_SAME_16, 0, u32::MAX),
        Some(Buf::R(pattern(512))),
        0,
    );
    check(
        "WRITE SAME(16) 0xFFFFFFFF blocks",
        out,
        INVALID_FIELD_IN_CDB,
        REQUEST_CAP,
        &mut peaks,
    );

    // COMPARE AND WRITE: 64 blocks (the limit; verify + write data = 64 KiB),
    // and 255.
    let mut caw = vec![0u8; 64 * 512];
    caw.extend_from_slice(&pattern(64 * 512));
    let out = h.command(
        &compare_and_write(0, u64::from(GIB_BLOCKS) + 1000, 64),
        Some(Buf::R(caw)),
        0,
    );
    check(
        "COMPARE AND WRITE 64 blocks",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &compare_and_write(0, 0, 255),
        Some(Buf::R(vec![0; 2 * 255 * 512])),
        0,
    );
    check(
        "COMPARE AND WRITE 255 blocks",
        out,
        INVALID_FIELD_IN_CDB,
        REQUEST_CAP,
        &mut peaks,
    );

    // UNMAP: 64 descriptors of 1 Mi blocks in all (the Block Limits page's
    // MAXIMUM UNMAP LBA COUNT: 512 MiB of 512-byte blocks); 4094
    // descriptors.
    let ranges: Vec<(u64, u32)> = (0..64).map(|i| (i * 65536, 16384)).collect();
    let list = unmap_list(&ranges);
    let out = h.command(&unmap(0, list.len() as u16), Some(Buf::R(list)), 0);
    check(
        "UNMAP 64 descriptors, 1 Mi blocks",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    let ranges: Vec<(u64, u32)> = (0..4094).map(|i| (i, 1)).collect();
    let list = unmap_list(&ranges);
    let out = h.command(&unmap(0, list.len() as u16), Some(Buf::R(list)), 0);
    check(
        "UNMAP 4094 descriptors",
        out,
        INVALID_FIELD_IN_PARAM,
        REQUEST_CAP,
        &mut peaks,
    );
    let list = unmap_list(&[(0, u32::MAX)]);
    let out = h.command(&unmap(0, list.len() as u16), Some(Buf::R(list)), 0);
    check(
        "UNMAP 0xFFFFFFFF blocks",
        out,
        INVALID_FIELD_IN_PARAM,
        REQUEST_CAP,
        &mut peaks,
    );

    // Parameter data with the largest allocation lengths.
    let out = h.command(&[0x12, 0, 0, 0xff, 0xff, 0], Some(Buf::W(65535)), 0);
    check(
        "INQUIRY allocation length 65535",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &[0xa0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0],
        Some(Buf::W(MIB as u32)),
        0,
    );
    check(
        "REPORT LUNS allocation length 2^32-1",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    let mut lba_status = get_lba_status(0, u32::MAX);
    lba_status[14] = 0;
    let out = h.command(&lba_status, Some(Buf::W(MIB as u32)), 0);
    check(
        "GET LBA STATUS allocation length 2^32-1",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &[0xa3, 0x0c, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0],
        Some(Buf::W(MIB as u32)),
        0,
    );
    check(
        "REPORT SUPPORTED OPERATION CODES 2^32-1",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    let out = h.command(
        &[0x5a, 0, 0x3f, 0, 0, 0, 0, 0xff, 0xff, 0],
        Some(Buf::W(65535)),
        0,
    );
    check(
        "MODE SENSE(10) allocation length 65535",
        out,
        GOOD,
        REQUEST_CAP,
        &mut peaks,
    );
    // MODE SELECT(10) with the largest parameter list: a mode parameter
    // header and then 65527 bytes of nonsense.
    let mut select = vec![0u8; 65535];
    select[6..8].copy_from_slice(&[0, 0]);
    select[8] = 0x3e;
    let out = h.command(
        &[0x55, 0x10, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
        Some(Buf::R(select)),
        0,
    );
    assert_eq!(out.0.status, 2, "MODE SELECT(10) of nonsense: {:?}", out.0);
    check(
        "MODE SELECT(10) 65535 bytes",
        (out.0, out.1),
        out.0,
        REQUEST_CAP,
        &mut peaks,
    );

    // The longest chain a driver can build: an indirect table of 65535
    // descriptors (virtio 1.2 §2.7.5.3.1), 1-byte data-in buffers.
    let out = indirect_chain(&mut h);
    check(
        "READ into 65533 descriptors",
        out,
        GOOD,
        CHAIN_CAP,
        &mut peaks,
    );

    // O_DIRECT with guest buffers off the memory alignment: the bounce
    // buffer, at most one transfer.
    let mut d = Harness::new(true);
    let out = d.command(
        &block(WRITE_16, 0, MAX_BLOCKS),
        Some(Buf::R(pattern(max as usize))),
        1,
    );
    check(
        "O_DIRECT misaligned WRITE(16) 32 MiB",
        out,
        GOOD,
        DIRECT_REQUEST_CAP,
        &mut peaks,
    );
    let out = d.command(&block(READ_16, 0, MAX_BLOCKS), Some(Buf::W(max)), 1);
    check(
        "O_DIRECT misaligned READ(16) 32 MiB",
        out,
        GOOD,
        DIRECT_REQUEST_CAP,
        &mut peaks,
    );
    let out = d.command(
        &verify(VERIFY_16, 0, MAX_BLOCKS, 1),
        Some(Buf::R(pattern(max as usize))),
        1,
    );
    check(
        "O_DIRECT VERIFY(16) BYTCHK=01b 32 MiB",
        out,
        GOOD,
        DIRECT_REQUEST_CAP,
        &mut peaks,
    );

    eprintln!("peak heap per command:\n  {}", peaks.join("\n  "));
}

/// READ(16) of 127 blocks (65024 bytes) into an indirect chain of 65535
/// descriptors: the request, the response and 65533 one-byte data-in
/// buffers (the last ones get nothing: residual).
fn indirect_chain(h: &mut Harness) -> (Outcome, usize) {
    const ENTRIES: u32 = 65535;
    let mem = h.mem.memory();
    let table = DATA_BASE;
    let req_addr = table + 16 * u64::from(ENTRIES);
    let resp_addr = req_addr + REQ_LEN as u64;
    let data_addr = resp_addr + u64::from(RESP_LEN);
    mem.write_slice(&request(&block(READ_16, 0, 127)), GuestAddress(req_addr))
        .unwrap();
    let mut raw = Vec::with_capacity(16 * ENTRIES as usize);
    for i in 0..ENTRIES {
        let next = if i + 1 < ENTRIES {
            VRING_DESC_F_NEXT as u16
        } else {
            0
        };
        let (addr, len, flags) = match i {
            0 => (req_addr, REQ_LEN as u32, next),
            1 => (resp_addr, RESP_LEN, next | VRING_DESC_F_WRITE as u16),
            _ => (
                data_addr + u64::from(i - 2),
                1,
                next | VRING_DESC_F_WRITE as u16,
            ),
        };
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, (i + 1) as u16));
        raw.extend_from_slice(vm_memory::ByteValued::as_slice(&d));
    }
    mem.write_slice(&raw, GuestAddress(table)).unwrap();
    drop(raw);
    drop(mem);
    let head = Descriptor::new(table, 16 * ENTRIES, VRING_DESC_F_INDIRECT as u16, 0);
    let before = h.publish(&[head]);
    let (_, peak) = h.run(before);
    (h.outcome(resp_addr), peak)
}
