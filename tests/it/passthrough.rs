//! Remote storage on the request path, through real virtqueues: a
//! passthrough unit (commands forwarded as they are) and an emulated disk
//! over a remote backend (READ, WRITE and SYNCHRONIZE CACHE handed to it),
//! both against in-process doubles of a remote. The doubles answer on a
//! thread of their own, as a network backend does, and can be held (a
//! request stays in flight), taken down (the session is gone) or made to
//! drop requests. The real backends (NBD, iSCSI) are tested against real
//! servers in `nbd.rs` and `iscsi.rs`.
//!
//! Expected values are SPC-4/SBC-3's: sense keys and codes are written out.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vhost_device_scsi::scsi::inquiry::Identity;
use vhost_device_scsi::scsi::{
    Completion, Disk, DiskConfig, LunAddress, SliceDataOut, Target, VecDataIn,
};
use vhost_device_scsi::storage::remote::{
    DataDirection, RemoteCompletion, RemoteOp, RemoteResult, RemoteStorage, ScsiOutcome,
    TaskManagement, TaskManagementResponse,
};
use vhost_device_scsi::storage::{Extent, IoBufs, IoBufsMut, MemImage, PinnedBufs, Storage};
use vhost_device_scsi::virtio::backend::{QueueOptions, CONTROL_QUEUE, FIRST_REQUEST_QUEUE};
use vhost_scsi_frontend::cdb::read10;
use vhost_scsi_frontend::scsi::lun_field as lun;
use vhost_user_backend::VhostUserBackend;

use crate::virtqueue::{request, tmf, Buf, Harness, RESP_LEN, S_OK};

const BLOCK: usize = 512;
const REMOTE_BLOCKS: usize = 64;

/// Holds requests at a double until released.
#[derive(Default)]
struct Gate {
    held: Mutex<bool>,
    open: Condvar,
}

impl Gate {
    fn hold(&self) {
        *self.held.lock().unwrap() = true;
    }
    fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.open.notify_all();
    }
    fn pass(&self) {
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.open.wait(held).unwrap();
        }
    }
}

/// What the doubles share with the test.
#[derive(Default)]
struct Remote {
    gate: Gate,
    /// The session is down: requests fail with ConnectionReset.
    down: AtomicBool,
    /// Requests are dropped without a result.
    drop_requests: AtomicBool,
    /// CDBs (or ops) that reached the remote.
    seen: Mutex<Vec<Vec<u8>>>,
    tmfs: Mutex<Vec<TaskManagement>>,
    /// Requests taken and not yet answered.
    in_flight: AtomicUsize,
}

type Job = (RemoteOp, PinnedBufs, RemoteCompletion);

/// A remote SCSI logical unit: the daemon's own emulation of a disk
/// (LUN 0 of an inner target) behind a thread, as an iSCSI target would
/// be. Its Block Limits page says "no maximum transfer length", as many
/// arrays do.
struct ForwardingDouble {
    remote: Arc<Remote>,
    jobs: Mutex<mpsc::Sender<Job>>,
    read_only: bool,
}

impl ForwardingDouble {
    fn new(read_only: bool) -> (ForwardingDouble, Arc<Remote>, Arc<Target>) {
        let data: Vec<u8> = (0..REMOTE_BLOCKS * BLOCK)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let inner = Arc::new(Target::new(vec![Disk::new(
            Box::new(MemImage::new(data, false)),
            DiskConfig {
                block_size: BLOCK as u32,
                identity: Identity::derived("remote-array", 0),
                solid_state: true,
                discard: true,
            },
        )
        .unwrap()]));
        let remote = Arc::new(Remote::default());
        let (tx, rx) = mpsc::channel::<Job>();
        {
            let remote = remote.clone();
            let inner = inner.clone();
            std::thread::spawn(move || {
                for (op, mut bufs, completion) in rx {
                    remote.gate.pass();
                    let RemoteOp::Scsi {
                        cdb,
                        direction,
                        len,
                        ..
                    } = op
                    else {
                        completion.complete(RemoteResult::Scsi(Err(io::Error::other("not SCSI"))));
                        continue;
                    };
                    remote.seen.lock().unwrap().push(cdb.as_slice().to_vec());
                    if remote.drop_requests.load(Ordering::SeqCst) {
                        drop(completion);
                        remote.in_flight.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    if remote.down.load(Ordering::SeqCst) {
                        completion.complete(RemoteResult::Scsi(Err(io::Error::from(
                            io::ErrorKind::ConnectionReset,
                        ))));
                        remote.in_flight.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    let mut out = vec![
                        0u8;
                        if direction == DataDirection::ToDevice {
                            len
                        } else {
                            0
                        }
                    ];
                    bufs.borrow_mut().gather_into(&mut out);
                    let mut din =
                        VecDataIn::with_capacity(if direction == DataDirection::FromDevice {
                            len
                        } else {
                            0
                        });
                    let completion_inner = inner.execute(
                        LunAddress::Lun(0),
                        cdb.as_slice(),
                        &mut din,
                        &mut SliceDataOut::new(&out),
                    );
                    // A remote without a transfer limit.
                    if cdb.as_slice()[..3] == [0x12, 1, 0xb0] && din.data.len() >= 16 {
                        din.data[8..12].copy_from_slice(&0u32.to_be_bytes());
                        din.data[12..16].copy_from_slice(&0x0100_0000u32.to_be_bytes());
                    }
                    let moved = if direction == DataDirection::FromDevice {
                        bufs.fill_from(&din.data)
                    } else {
                        out.len()
                    };
                    let outcome = match completion_inner {
                        Completion::Good => ScsiOutcome::new(0, &[], moved),
                        Completion::CheckCondition(sense) => {
                            ScsiOutcome::new(2, &sense.to_fixed(), 0)
                        }
                        other => panic!("inner target: {other:?}"),
                    };
                    drop(bufs);
                    remote.in_flight.fetch_sub(1, Ordering::SeqCst);
                    completion.complete(RemoteResult::Scsi(Ok(outcome)));
                }
            });
        }
        (
            ForwardingDouble {
                remote: remote.clone(),
                jobs: Mutex::new(tx),
                read_only,
            },
            remote,
            inner,
        )
    }
}

impl RemoteStorage for ForwardingDouble {
    fn submit(&self, op: RemoteOp, bufs: PinnedBufs, completion: RemoteCompletion) {
        self.remote.in_flight.fetch_add(1, Ordering::SeqCst);
        let _ = self.jobs.lock().unwrap().send((op, bufs, completion));
    }

    fn task_management(&self, tmf: TaskManagement, _timeout: Duration) -> TaskManagementResponse {
        self.remote.tmfs.lock().unwrap().push(tmf);
        TaskManagementResponse::Complete
    }
}

impl Storage for ForwardingDouble {
    fn size(&self) -> u64 {
        (REMOTE_BLOCKS * BLOCK) as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_vectored_at(&self, _: &mut IoBufsMut<'_>, _: u64) -> io::Result<()> {
        unreachable!("a passthrough unit's storage is never read directly")
    }
    fn write_vectored_at(&self, _: &IoBufs<'_>, _: u64, _: bool) -> io::Result<()> {
        unreachable!("a passthrough unit's storage is never written directly")
    }
    fn flush(&self) -> io::Result<()> {
        unreachable!("a passthrough unit's storage is never flushed directly")
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        unreachable!()
    }
    fn extent(&self, _: u64) -> io::Result<Extent> {
        unreachable!()
    }
    fn remote(&self) -> Option<&dyn RemoteStorage> {
        Some(self)
    }
    fn scsi_passthrough(&self) -> bool {
        true
    }
}

/// Remote block storage (as an NBD export): a memory image behind a
/// thread; reads, writes and flushes only.
struct BlockDouble {
    image: Arc<MemImage>,
    remote: Arc<Remote>,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl BlockDouble {
    fn new(image: Arc<MemImage>) -> (BlockDouble, Arc<Remote>) {
        let remote = Arc::new(Remote::default());
        let (tx, rx) = mpsc::channel::<Job>();
        {
            let remote = remote.clone();
            let image = image.clone();
            std::thread::spawn(move || {
                for (op, mut bufs, completion) in rx {
                    remote.gate.pass();
                    remote
                        .seen
                        .lock()
                        .unwrap()
                        .push(format!("{op:?}").into_bytes());
                    let result = if remote.down.load(Ordering::SeqCst) {
                        Err(io::Error::from(io::ErrorKind::NotConnected))
                    } else {
                        match op {
                            RemoteOp::Read { offset, len } => {
                                let mut b = bufs.borrow_mut();
                                assert_eq!(b.len(), len);
                                image.read_vectored_at(&mut b, offset)
                            }
                            RemoteOp::Write {
                                offset,
                                len,
                                durable,
                            } => {
                                let b = bufs.borrow_mut();
                                assert_eq!(b.len(), len);
                                image.write_vectored_at(&b.as_source(), offset, durable)
                            }
                            RemoteOp::Flush => image.flush(),
                            RemoteOp::Scsi { .. } => Err(io::Error::other("not a SCSI unit")),
                        }
                    };
                    drop(bufs);
                    remote.in_flight.fetch_sub(1, Ordering::SeqCst);
                    completion.complete(RemoteResult::Io(result));
                }
            });
        }
        (
            BlockDouble {
                image,
                remote: remote.clone(),
                jobs: Mutex::new(tx),
            },
            remote,
        )
    }
}

impl RemoteStorage for BlockDouble {
    fn submit(&self, op: RemoteOp, bufs: PinnedBufs, completion: RemoteCompletion) {
        self.remote.in_flight.fetch_add(1, Ordering::SeqCst);
        let _ = self.jobs.lock().unwrap().send((op, bufs, completion));
    }
}

impl Storage for BlockDouble {
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        self.image.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64, durable: bool) -> io::Result<()> {
        self.image.write_vectored_at(bufs, offset, durable)
    }
    fn flush(&self) -> io::Result<()> {
        self.image.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        self.image.write_zeroes(offset, len, deallocate)
    }
    fn extent(&self, offset: u64) -> io::Result<Extent> {
        self.image.extent(offset)
    }
    fn remote(&self) -> Option<&dyn RemoteStorage> {
        Some(self)
    }
}

fn config(name: &str, lun: u16) -> DiskConfig {
    DiskConfig {
        block_size: BLOCK as u32,
        identity: Identity::derived(name, lun),
        solid_state: false,
        discard: true,
    }
}

/// LUN 0: a local memory disk; LUN 1: the passthrough unit.
fn passthrough_harness(read_only: bool, unfiltered: bool) -> (Harness, Arc<Remote>, Arc<Target>) {
    let (double, remote, inner) = ForwardingDouble::new(read_only);
    let local = Disk::new(
        Box::new(MemImage::new(vec![0x11; 8 * BLOCK], false)),
        config("local", 0),
    )
    .unwrap();
    let forwarded = Disk::new(Box::new(double), config("iscsi", 1))
        .unwrap()
        .with_unfiltered(unfiltered);
    (
        Harness::with_disks(vec![local, forwarded], QueueOptions::default()),
        remote,
        inner,
    )
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = read10(lba, blocks);
    cdb[0] = 0x2a;
    cdb
}

/// Sense key, ASC, ASCQ of fixed-format sense.
fn key_asc(sense: &[u8]) -> (u8, u8, u8) {
    (sense[2] & 0x0f, sense[12], sense[13])
}

fn inner_read(inner: &Target, lba: u32, blocks: u16) -> Vec<u8> {
    let mut din = VecDataIn::with_capacity(usize::from(blocks) * BLOCK);
    let c = inner.execute(
        LunAddress::Lun(0),
        &read10(lba, blocks),
        &mut din,
        &mut SliceDataOut::new(&[]),
    );
    assert_eq!(c, Completion::Good);
    din.data
}

#[test]
fn a_passthrough_unit_forwards_inquiry_reads_and_writes() {
    let (mut h, remote, inner) = passthrough_harness(false, false);
    // INQUIRY: the remote's identity, not the daemon's (T10 vendor at
    // bytes 8-15, product at 16-31).
    let used = h.command(lun(1), &[0x12, 0, 0, 0, 96, 0], 200);
    assert_eq!((used.response(), used.status()), (S_OK, 0));
    let mut din = VecDataIn::with_capacity(96);
    inner.execute(
        LunAddress::Lun(0),
        &[0x12, 0, 0, 0, 96, 0],
        &mut din,
        &mut SliceDataOut::new(&[]),
    );
    assert_eq!(&used.data_in()[..din.data.len()], &din.data[..]);
    // Residual: the 200-byte buffer less the bytes moved.
    assert_eq!(used.residual() as usize, 200 - din.data.len());
    // READ(10) of 4 blocks at LBA 3: the remote's bytes, straight in.
    let used = h.command(lun(1), &read10(3, 4), 4 * BLOCK as u32);
    assert_eq!(
        (used.response(), used.status(), used.residual()),
        (S_OK, 0, 0)
    );
    assert_eq!(used.data_in(), &inner_read(&inner, 3, 4)[..]);
    // WRITE(10) of 2 blocks at LBA 10 lands at the remote.
    let payload: Vec<u8> = (0..2 * BLOCK).map(|i| (i % 13) as u8 ^ 0xa5).collect();
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(1), &write10(10, 2))),
            Buf::R(payload.clone()),
            Buf::W(RESP_LEN),
        ],
    );
    assert_eq!(
        (used.response(), used.status(), used.residual()),
        (S_OK, 0, 0)
    );
    assert_eq!(inner_read(&inner, 10, 2), payload);
    let seen: Vec<u8> = remote.seen.lock().unwrap().iter().map(|c| c[0]).collect();
    assert_eq!(seen, [0x12, 0x28, 0x2a]);
}

#[test]
fn the_remote_sense_reaches_the_guest_as_it_is() {
    let (mut h, _remote, _inner) = passthrough_harness(false, false);
    // READ(10) past the end: ILLEGAL REQUEST, LBA OUT OF RANGE (21h/00h),
    // from the remote.
    let used = h.command(lun(1), &read10(REMOTE_BLOCKS as u32, 1), BLOCK as u32);
    assert_eq!((used.response(), used.status()), (S_OK, 2));
    assert_eq!(key_asc(used.sense()), (0x5, 0x21, 0x00));
    assert_eq!(used.residual(), BLOCK as u32, "nothing moved");
}

#[test]
fn the_filter_and_write_protection_stop_commands_before_the_remote() {
    let (mut h, remote, inner) = passthrough_harness(true, false);
    let before = inner_read(&inner, 0, 8);
    // FORMAT UNIT: ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (20h/00h).
    let used = h.command(lun(1), &[0x04, 0, 0, 0, 0, 0], 0);
    assert_eq!(used.status(), 2);
    assert_eq!(key_asc(used.sense()), (0x5, 0x20, 0x00));
    // A vendor-specific opcode too.
    let used = h.command(lun(1), &[0xc5, 0, 0, 0, 0, 0], 0);
    assert_eq!(key_asc(used.sense()), (0x5, 0x20, 0x00));
    // WRITE(10) on a read-only unit: DATA PROTECT, WRITE PROTECTED (27h/00h).
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(1), &write10(0, 1))),
            Buf::R(vec![0xff; BLOCK]),
            Buf::W(RESP_LEN),
        ],
    );
    assert_eq!(used.status(), 2);
    assert_eq!(key_asc(used.sense()), (0x7, 0x27, 0x00));
    // UNMAP too.
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(1), &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0])),
            Buf::R(vec![0; 24]),
            Buf::W(RESP_LEN),
        ],
    );
    assert_eq!(key_asc(used.sense()), (0x7, 0x27, 0x00));
    assert!(
        remote.seen.lock().unwrap().is_empty(),
        "nothing reached the remote"
    );
    assert_eq!(inner_read(&inner, 0, 8), before);
    // MODE SENSE(6) of the read-only unit: WP (bit 7 of byte 2) is set,
    // though the remote's own header says writable.
    let used = h.command(lun(1), &[0x1a, 0, 0x3f, 0, 0xff, 0], 255);
    assert_eq!(used.status(), 0);
    assert_eq!(used.data_in()[2] & 0x80, 0x80);
    // MODE SENSE(10): byte 3.
    let used = h.command(lun(1), &[0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 0xff, 0], 255);
    assert_eq!(used.data_in()[3] & 0x80, 0x80);
    // READ still goes.
    let used = h.command(lun(1), &read10(0, 1), BLOCK as u32);
    assert_eq!(used.status(), 0);
}

#[test]
fn an_unfiltered_unit_forwards_what_the_filter_keeps() {
    let (mut h, remote, _inner) = passthrough_harness(false, true);
    // The remote (the emulated disk) does not know WRITE BUFFER: its own
    // INVALID COMMAND OPERATION CODE comes back, after it got there.
    let used = h.command(lun(1), &[0x3b, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0);
    assert_eq!(key_asc(used.sense()), (0x5, 0x20, 0x00));
    assert_eq!(remote.seen.lock().unwrap().len(), 1);
    // MODE SENSE of a writable unit: WP stays clear.
    let used = h.command(lun(1), &[0x1a, 0, 0x3f, 0, 0xff, 0], 255);
    assert_eq!(used.data_in()[2] & 0x80, 0);
}

#[test]
fn block_limits_are_capped_at_what_the_daemon_takes() {
    let (mut h, _remote, _inner) = passthrough_harness(false, false);
    // INQUIRY, EVPD=1, page B0h. The remote says: no maximum, optimal
    // 0x01000000 blocks. The daemon takes 32 MiB: 65536 blocks of 512.
    let used = h.command(lun(1), &[0x12, 1, 0xb0, 0, 64, 0], 64);
    assert_eq!(used.status(), 0);
    let page = used.data_in();
    assert_eq!(page[1], 0xb0);
    assert_eq!(
        page[8..12],
        65536u32.to_be_bytes(),
        "MAXIMUM TRANSFER LENGTH"
    );
    assert_eq!(
        page[12..16],
        65536u32.to_be_bytes(),
        "OPTIMAL TRANSFER LENGTH"
    );
}

#[test]
fn report_luns_on_a_passthrough_unit_is_the_daemons_map() {
    let (mut h, remote, _inner) = passthrough_harness(false, false);
    let used = h.command(lun(1), &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], 64);
    assert_eq!(used.status(), 0);
    let data = used.data_in();
    // LUN LIST LENGTH 16: LUNs 0 and 1, peripheral addressing.
    assert_eq!(data[..4], 16u32.to_be_bytes());
    assert_eq!(data[8..16], [0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(data[16..24], [0, 1, 0, 0, 0, 0, 0, 0]);
    assert!(remote.seen.lock().unwrap().is_empty());
}

#[test]
fn a_session_that_is_down_is_a_retryable_aborted_command() {
    let (mut h, remote, _inner) = passthrough_harness(false, false);
    remote.down.store(true, Ordering::SeqCst);
    // ABORTED COMMAND, LOGICAL UNIT COMMUNICATION FAILURE (0Bh 08h/00h).
    let used = h.command(lun(1), &read10(0, 1), BLOCK as u32);
    assert_eq!((used.response(), used.status()), (S_OK, 2));
    assert_eq!(key_asc(used.sense()), (0xb, 0x08, 0x00));
    // A request the backend drops is answered all the same.
    remote.down.store(false, Ordering::SeqCst);
    remote.drop_requests.store(true, Ordering::SeqCst);
    let used = h.command(lun(1), &read10(0, 1), BLOCK as u32);
    assert_eq!(key_asc(used.sense()), (0xb, 0x08, 0x00));
    remote.drop_requests.store(false, Ordering::SeqCst);
    let used = h.command(lun(1), &read10(0, 1), BLOCK as u32);
    assert_eq!(used.status(), 0);
}

#[test]
fn task_management_reaches_the_remote() {
    let (mut h, remote, _inner) = passthrough_harness(false, false);
    // LOGICAL UNIT RESET (5), ABORT TASK (0, tag 7 as `tmf` writes it),
    // ABORT TASK SET (1), CLEAR TASK SET (3).
    for subtype in [5u32, 0, 1, 3] {
        let used = h.submit(CONTROL_QUEUE, &[Buf::R(tmf(subtype, lun(1))), Buf::W(1)]);
        assert_eq!(used.written[0], S_OK, "subtype {subtype}");
    }
    assert_eq!(
        *remote.tmfs.lock().unwrap(),
        [
            TaskManagement::LogicalUnitReset,
            TaskManagement::AbortTask { tag: 7 },
            TaskManagement::AbortTaskSet,
            TaskManagement::AbortTaskSet,
        ]
    );
    // The local unit's reset stays local: a unit attention there.
    let used = h.submit(CONTROL_QUEUE, &[Buf::R(tmf(5, lun(0))), Buf::W(1)]);
    assert_eq!(used.written[0], S_OK);
    assert_eq!(remote.tmfs.lock().unwrap().len(), 4);
    let used = h.command(lun(0), &[0, 0, 0, 0, 0, 0], 0);
    assert_eq!(key_asc(used.sense()), (0x6, 0x29, 0x03));
}

/// LUN 0: a local memory disk; LUN 1: an emulated disk over the block
/// double.
fn block_harness() -> (Harness, Arc<Remote>, Arc<MemImage>) {
    let data: Vec<u8> = (0..REMOTE_BLOCKS * BLOCK)
        .map(|i| (i * 5 % 253) as u8)
        .collect();
    let image = Arc::new(MemImage::new(data, false));
    let (double, remote) = BlockDouble::new(image.clone());
    let local = Disk::new(
        Box::new(MemImage::new(vec![0x11; 8 * BLOCK], false)),
        config("local", 0),
    )
    .unwrap();
    let over_remote = Disk::new(Box::new(double), config("nbd", 1)).unwrap();
    (
        Harness::with_disks(vec![local, over_remote], QueueOptions::default()),
        remote,
        image,
    )
}

#[test]
fn an_emulated_disk_on_remote_storage_hands_transfers_to_it() {
    let (mut h, remote, image) = block_harness();
    let used = h.command(lun(1), &read10(5, 3), 3 * BLOCK as u32);
    assert_eq!((used.response(), used.status()), (S_OK, 0));
    assert_eq!(used.data_in(), &image.data()[5 * BLOCK..8 * BLOCK]);
    let payload = vec![0x3cu8; BLOCK];
    let mut fua = write10(9, 1);
    fua[1] = 0x08;
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(1), &fua)),
            Buf::R(payload.clone()),
            Buf::W(RESP_LEN),
        ],
    );
    assert_eq!(used.status(), 0);
    assert_eq!(&image.data()[9 * BLOCK..10 * BLOCK], &payload[..]);
    let used = h.command(lun(1), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0);
    assert_eq!(used.status(), 0);
    let seen: Vec<String> = remote
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    assert_eq!(
        seen,
        [
            format!("Read {{ offset: {}, len: {} }}", 5 * BLOCK, 3 * BLOCK),
            format!(
                "Write {{ offset: {}, len: {}, durable: true }}",
                9 * BLOCK,
                BLOCK
            ),
            "Flush".to_string(),
        ]
    );
}

#[test]
fn an_unreachable_server_fails_a_write_without_poisoning_later_flushes() {
    let (mut h, remote, _image) = block_harness();
    remote.down.store(true, Ordering::SeqCst);
    let mut fua = write10(0, 1);
    fua[1] = 0x08;
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(1), &fua)),
            Buf::R(vec![1; BLOCK]),
            Buf::W(RESP_LEN),
        ],
    );
    assert_eq!(key_asc(used.sense()), (0xb, 0x08, 0x00));
    let used = h.command(lun(1), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0);
    assert_eq!(key_asc(used.sense()), (0xb, 0x08, 0x00));
    remote.down.store(false, Ordering::SeqCst);
    // Back: the retried write and the flush succeed (a local write error
    // would have failed every later flush, SBC-3 §4.10).
    let used = h.submit(
        FIRST_REQUEST_QUEUE,
        &[
            Buf::R(request(lun(1), &fua)),
            Buf::R(vec![1; BLOCK]),
            Buf::W(RESP_LEN),
        ],
    );
    assert_eq!(used.status(), 0);
    let used = h.command(lun(1), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0);
    assert_eq!(used.status(), 0);
}

#[test]
fn a_request_held_at_the_remote_does_not_hold_up_the_queue() {
    let (mut h, remote, image) = block_harness();
    remote.gate.hold();
    // A READ to the remote disk, then one to the local disk, then a TEST
    // UNIT READY: one kick, and the local two are answered while the
    // remote READ is still held.
    h.next_data = crate::virtqueue::DATA_BASE;
    let remote_in = h.push_at(
        FIRST_REQUEST_QUEUE,
        0,
        &[
            Buf::R(request(lun(1), &read10(0, 2))),
            Buf::W(RESP_LEN),
            Buf::W(2 * BLOCK as u32),
        ],
    );
    let local_in = h.push_at(
        FIRST_REQUEST_QUEUE,
        3,
        &[
            Buf::R(request(lun(0), &read10(0, 1))),
            Buf::W(RESP_LEN),
            Buf::W(BLOCK as u32),
        ],
    );
    h.push_at(
        FIRST_REQUEST_QUEUE,
        6,
        &[
            Buf::R(request(lun(1), &[0, 0, 0, 0, 0, 0])),
            Buf::W(RESP_LEN),
        ],
    );
    let before = h.used_idx(FIRST_REQUEST_QUEUE);
    // A worker that waited for the remote would wait for ever: the
    // watchdog opens the gate after 5 s, and the count below fails.
    let (done, watch) = mpsc::channel::<()>();
    let watchdog = {
        let remote = remote.clone();
        std::thread::spawn(move || {
            let _ = watch.recv_timeout(Duration::from_secs(5));
            remote.gate.release();
        })
    };
    h.backend
        .handle_event(
            FIRST_REQUEST_QUEUE as u16,
            vmm_sys_util::epoll::EventSet::IN,
            &h.vrings,
            0,
        )
        .unwrap();
    assert_eq!(
        h.used_idx(FIRST_REQUEST_QUEUE).wrapping_sub(before),
        2,
        "local READ and TUR answered"
    );
    assert_eq!(h.read(local_in[1].0, BLOCK as u32), vec![0x11; BLOCK]);
    assert_eq!(
        remote.in_flight.load(Ordering::SeqCst),
        1,
        "the remote READ is held"
    );
    remote.gate.release();
    h.backend.complete_transfers(&h.vrings, 0);
    drop(done);
    watchdog.join().unwrap();
    assert_eq!(h.used_idx(FIRST_REQUEST_QUEUE).wrapping_sub(before), 3);
    assert_eq!(
        h.read(remote_in[1].0, 2 * BLOCK as u32),
        image.data()[..2 * BLOCK]
    );
    let resp = h.read(remote_in[0].0, RESP_LEN);
    assert_eq!((resp[10], resp[11]), (0, S_OK));
}

#[test]
fn a_read_larger_than_its_buffer_is_an_overrun_before_the_remote() {
    let (mut h, remote, _inner) = passthrough_harness(false, false);
    // READ(10) of 8 blocks into 2048 bytes: VIRTIO_SCSI_S_OVERRUN (virtio
    // 1.2 §5.6.6.1), as on an emulated unit.
    let used = h.command(lun(1), &read10(0, 8), 2048);
    assert_eq!(used.response(), crate::virtqueue::S_OVERRUN);
    assert!(remote.seen.lock().unwrap().is_empty());
}
