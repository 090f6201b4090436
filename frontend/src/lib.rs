//! A virtio-scsi driver over a real vhost-user connection: what QEMU plus a
//! guest's virtio_scsi driver do to a vhost-user-scsi backend, in a library,
//! for the load generator (`vhost-scsi-bench`) and the tests that drive the
//! daemon process.
//!
//! [`ScsiFrontend::connect`] negotiates like QEMU (SET_OWNER, features with
//! VERSION_1, PROTOCOL_FEATURES and EVENT_IDX, protocol features MQ and
//! REPLY_ACK, GET_QUEUE_NUM before using more than one request queue), shares
//! one memfd as guest memory (SET_MEM_TABLE), and sets up the control, event
//! and M request queues as split rings with kick and call eventfds, enabling
//! them with SET_VRING_ENABLE. Each [`RequestQueue`] keeps N requests in
//! flight, each in a slot of three descriptors (header, response, one data
//! buffer; no INDIRECT) with a free list of heads, and follows the EVENT_IDX
//! rules a guest follows: used_event in the available ring asks for
//! interrupts, the device's avail_event decides whether to kick (virtio 1.2
//! §2.7.7, §2.7.10). Queues are `Send`, so each can be driven by its own
//! thread.
//!
//! The crate is the other side of vhost-device-scsi's socket, kept out of
//! the daemon: besides the driver, [`raw`] is a frontend that breaks the
//! rules on purpose (for the hostile-guest tests), [`scsi`] holds what a
//! driver puts in a request and reads from its response, [`DaemonProcess`]
//! runs the daemon as a child process and [`LatencyHistogram`] records
//! latencies. The test kit the daemon's tests and fuzz targets share is
//! here too: [`cdb`], the CDB and parameter-list builders (SPC-4, SBC-3),
//! [`sense`], sense data and the assertions made on it, and [`testkit`],
//! image files and the mode pages the daemon reports. The load generator `vhost-scsi-bench` is this crate's binary.
//! The daemon's integration tests use the crate as a dev-dependency; it
//! uses the daemon's library only for what is defined once there (the queue
//! indexes of virtio 1.2 §5.6.2).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cdb;
mod histogram;
mod process;
mod queue;
pub mod raw;
mod ring;
pub mod scsi;
pub mod sense;
pub mod testkit;

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use histogram::LatencyHistogram;
pub use process::{process_cpu_time, DaemonProcess};
pub use queue::{Command, Completion, Data, Reply, RequestQueue};
pub use ring::vring_need_event;

use queue::{SlotAddrs, DESCS_PER_SLOT};
use ring::{Descriptor, RingAddrs, SplitRing, VRING_DESC_F_WRITE};
use ring::{FEATURE_EVENT_IDX, FEATURE_VERSION_1};

/// VIRTIO_SCSI_F_HOTPLUG and VIRTIO_SCSI_F_CHANGE (virtio 1.2 §5.6.3).
const FEATURE_HOTPLUG: u64 = 1 << 1;
const FEATURE_CHANGE: u64 = 1 << 2;

/// Queue indexes (virtio 1.2 §5.6.2).
pub use vhost_device_scsi::virtio::backend::{CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE};

/// How long a driver waiting on the call eventfd gives the device to signal
/// a used entry it has seen appear: the device writes the used index
/// first and signals afterwards (this daemon after up to `SIGNAL_BATCH`
/// more chains, or at the end of its pass), so the signal may come a little
/// later, never a second later on a device that works. A completion not
/// signalled by then is an error ([`FrontendError::LostInterrupt`]), not a
/// success found by looking at the ring.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(1);
/// How often a driver asleep on the call eventfd looks at the used ring,
/// to notice a completion that came without a signal.
const USED_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// Largest virtqueue a driver may set up (split ring maximum, 2^15; the
/// device takes at most [`vhost_device_scsi::virtio::backend::MAX_QUEUE_SIZE`]).
pub const MAX_QUEUE_SIZE: u16 = 1024;
const _: () =
    assert!(MAX_QUEUE_SIZE as usize == vhost_device_scsi::virtio::backend::MAX_QUEUE_SIZE);
/// Size of the control and event queues (QEMU's default virtqueue size).
const AUX_QUEUE_SIZE: u16 = 128;
/// Event buffers the driver posts, as Linux's virtio_scsi does.
const EVENT_BUFFERS: u16 = 8;
/// `struct virtio_scsi_event`.
const EVENT_LEN: u32 = 16;
/// The control request and its response.
const CONTROL_BUFFER_LEN: u64 = 128;
/// `virtio_scsi_ctrl_tmf_req`: `type`, `subtype`, `lun[8]`, `id`.
const TMF_REQUEST_LEN: u32 = 4 + 4 + 8 + 8;
/// Request slot metadata: header (51 bytes) and response (108 bytes).
const SLOT_META_LEN: u64 = 256;
const PAGE: u64 = 4096;

/// Everything that can go wrong driving a device. Nothing the device sends
/// back is trusted: a bad used index, id or length is an error here.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("cannot connect to {}: {source}", .path.display())]
    Connect { path: PathBuf, source: vhost::Error },
    #[error("vhost-user {request}: {source}")]
    VhostUser {
        request: &'static str,
        source: vhost::Error,
    },
    #[error("the device does not offer {0}")]
    MissingFeature(&'static str),
    #[error("{asked} request queue(s) asked for, the device offers {offered}")]
    TooManyQueues { asked: usize, offered: usize },
    #[error("invalid driver configuration: {0}")]
    Config(String),
    #[error("cannot create guest memory: {0}")]
    MemorySetup(String),
    #[error("guest memory access: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error(
        "queue {queue}: the device returned used id {id}, not the head of a request in flight"
    )]
    UsedId { queue: usize, id: u32 },
    #[error("queue {queue}: the device moved the used index from {last} to {device} with {in_flight} request(s) in flight")]
    UsedIndex {
        queue: usize,
        last: u16,
        device: u16,
        in_flight: usize,
    },
    #[error(
        "queue {queue}: used length {used_len} exceeds the request's {writable} writable bytes"
    )]
    UsedLength {
        queue: usize,
        used_len: u32,
        writable: u32,
    },
    #[error("queue {queue}: no completion within {timeout:?}")]
    Timeout { queue: usize, timeout: Duration },
    /// The used ring showed a completion the driver had asked to be told
    /// about (it was asleep on the call eventfd, with used_event at that
    /// entry under EVENT_IDX), and no signal followed within
    /// [`INTERRUPT_GRACE`] (virtio 1.2 §2.7.7, §2.7.10).
    #[error("queue {queue}: completion without interrupt: a used entry appeared while the driver waited for one, and the call eventfd was not signalled within {grace:?}")]
    LostInterrupt { queue: usize, grace: Duration },
    #[error("queue {queue}: all {depth} request slots are in flight")]
    QueueFull { queue: usize, depth: usize },
    #[error("queue {queue}: a single command needs an idle queue")]
    Busy { queue: usize },
    #[error("queue {queue}: nothing in flight to wait for")]
    NothingInFlight { queue: usize },
    #[error("no request slot {slot} (queue depth {depth})")]
    NoSuchSlot { slot: usize, depth: usize },
    #[error("{len} bytes do not fit a slot's {capacity}-byte data buffer")]
    DataTooLarge { len: u64, capacity: u32 },
    #[error("a CDB of {0} bytes is longer than the 32 bytes a request has room for")]
    CdbTooLong(usize),
    #[error("a command cannot have both data-out and data-in (VIRTIO_SCSI_F_INOUT)")]
    Bidirectional,
    #[error("daemon: {0}")]
    Daemon(String),
}

/// Waits until `fd` is readable or `timeout` passes.
pub(crate) fn poll_in(
    fd: std::os::unix::io::RawFd,
    timeout: Duration,
) -> Result<bool, FrontendError> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(FrontendError::EventFd(e));
    }
    Ok(rc > 0)
}

/// Sleeps on queue `queue`'s call eventfd until it is signalled (the
/// signal is consumed: true) or `timeout` passes with nothing returned
/// (false). The caller has asked for an interrupt at the next used entry
/// and seen none there after asking, so the device owes a signal for any
/// entry that appears now: `has_used` looks at the used ring every
/// [`USED_CHECK_INTERVAL`], and once it shows an entry, the signal must
/// follow within [`INTERRUPT_GRACE`] (whether or not `timeout` is over by
/// then), or this fails with [`FrontendError::LostInterrupt`]. Finding the
/// entry is never taken as the signal.
pub(crate) fn wait_for_signal(
    call: &EventFd,
    queue: usize,
    timeout: Duration,
    mut has_used: impl FnMut() -> Result<bool, FrontendError>,
) -> Result<bool, FrontendError> {
    let deadline = Instant::now() + timeout;
    // When an entry was first seen without a signal.
    let mut seen: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let step = match seen {
            Some(at) => (at + INTERRUPT_GRACE).saturating_duration_since(now),
            None => deadline
                .saturating_duration_since(now)
                .min(USED_CHECK_INTERVAL),
        };
        if poll_in(call.as_raw_fd(), step)? {
            // Non-blocking: reads (and clears) the count.
            let _ = call.read();
            return Ok(true);
        }
        let now = Instant::now();
        match seen {
            Some(at) if now >= at + INTERRUPT_GRACE => {
                return Err(FrontendError::LostInterrupt {
                    queue,
                    grace: INTERRUPT_GRACE,
                })
            }
            Some(_) => {}
            None if has_used()? => seen = Some(now),
            None if now >= deadline => return Ok(false),
            None => {}
        }
    }
}

fn vhost_err(request: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::VhostUser { request, source }
}

/// How the driver sets itself up.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Request queues to set up (M); more than one needs the device's MQ.
    pub request_queues: usize,
    /// Requests in flight per queue (N), at most 341 (three descriptors
    /// each in a queue of at most 1024).
    pub queue_depth: usize,
    /// Data buffer per request slot, in bytes.
    pub data_size: u32,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when the device offers it.
    pub event_idx: bool,
    /// How long [`RequestQueue::wait`] waits for a completion.
    pub timeout: Duration,
    /// How long to keep retrying to connect to the socket.
    pub connect_timeout: Duration,
    /// Negotiate VIRTIO_SCSI_F_HOTPLUG (LUNs added and removed are
    /// reported on the event queue) when the device offers it.
    pub hotplug: bool,
    /// Negotiate VIRTIO_SCSI_F_CHANGE (capacity changes are reported).
    pub param_change: bool,
    /// Event buffers posted at set-up (at most 8; Linux posts 8).
    pub event_buffers: u16,
    /// Negotiate in-flight tracking (INFLIGHT_SHMFD) when the device
    /// offers it, as QEMU does: GET_INFLIGHT_FD, then SET_INFLIGHT_FD with
    /// the region, before the rings are set up; the region is kept for the
    /// connection's life.
    pub inflight: bool,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            request_queues: 1,
            queue_depth: 1,
            data_size: 1 << 20,
            event_idx: true,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            hotplug: false,
            param_change: false,
            event_buffers: EVENT_BUFFERS,
            inflight: false,
        }
    }
}

impl DriverConfig {
    /// The virtqueue size for `queue_depth` requests of three descriptors:
    /// the next power of two.
    pub fn ring_size(&self) -> Result<u16, FrontendError> {
        if self.queue_depth == 0 || self.request_queues == 0 {
            return Err(FrontendError::Config(
                "at least one request queue and a queue depth of one are needed".into(),
            ));
        }
        let descs = self.queue_depth * usize::from(DESCS_PER_SLOT);
        match u16::try_from(descs.next_power_of_two()) {
            Ok(size) if size <= MAX_QUEUE_SIZE => Ok(size),
            _ => Err(FrontendError::Config(format!(
                "queue depth {}: at most {} requests of {DESCS_PER_SLOT} descriptors fit a \
                 {MAX_QUEUE_SIZE}-entry virtqueue",
                self.queue_depth,
                usize::from(MAX_QUEUE_SIZE) / usize::from(DESCS_PER_SLOT)
            ))),
        }
    }
}

/// Hands out guest addresses, in order, from 0.
struct Bump(u64);

impl Bump {
    fn take(&mut self, len: u64, align: u64) -> u64 {
        let addr = self.0.div_ceil(align) * align;
        self.0 = addr + len;
        addr
    }
}

struct RingPlan {
    addrs: RingAddrs,
    slots: Vec<SlotAddrs>,
}

fn plan_ring(bump: &mut Bump, size: u16) -> RingAddrs {
    let desc = bump.take(RingAddrs::desc_bytes(size), PAGE);
    let avail = bump.take(RingAddrs::avail_bytes(size), 2);
    let used = bump.take(RingAddrs::used_bytes(size), PAGE);
    RingAddrs { desc, avail, used }
}

fn memfd(size: u64) -> Result<File, FrontendError> {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vhost-scsi-frontend".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(FrontendError::MemorySetup(format!(
            "memfd_create: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| FrontendError::MemorySetup(format!("memfd of {size} bytes: {e}")))?;
    Ok(file)
}

/// The control or event queue: kept configured, used for TMFs and events.
struct AuxQueue {
    ring: SplitRing,
    kick: EventFd,
    _call: EventFd,
}

/// A connected, configured virtio-scsi device.
pub struct ScsiFrontend {
    frontend: Frontend,
    mem: Arc<GuestMemoryMmap<()>>,
    features: u64,
    queues_offered: u64,
    aux: Vec<AuxQueue>,
    queues: Vec<RequestQueue>,
    /// Guest address of the 8 event buffers (buffer i at + 16 * i).
    event_buffers: u64,
    /// The in-flight region, kept while connected (QEMU keeps it too).
    _inflight: Option<File>,
    /// Guest address of the control request (+ 0) and response (+ 64).
    control_buffer: u64,
}

/// Connects to the backend listening at `socket`, retrying until it
/// listens or `timeout` passes (the daemon may still be starting).
/// Negotiates in-flight tracking as QEMU does at a device's first start:
/// GET_INFLIGHT_FD for `num_queues` queues of `queue_size` entries, then
/// SET_INFLIGHT_FD with the region the device made. The region (its
/// geometry and descriptor), which QEMU keeps for every later daemon.
pub(crate) fn inflight_region(
    frontend: &mut Frontend,
    num_queues: u16,
    queue_size: u16,
) -> Result<(vhost::vhost_user::message::VhostUserInflight, File), FrontendError> {
    let asked = vhost::vhost_user::message::VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues,
        queue_size,
    };
    let (region, file) = frontend
        .get_inflight_fd(&asked)
        .map_err(vhost_err("GET_INFLIGHT_FD"))?;
    frontend
        .set_inflight_fd(&region, file.as_raw_fd())
        .map_err(vhost_err("SET_INFLIGHT_FD"))?;
    Ok((region, file))
}

pub(crate) fn connect_with_retry(
    socket: &Path,
    max_queues: u64,
    timeout: Duration,
) -> Result<Frontend, FrontendError> {
    let deadline = Instant::now() + timeout;
    loop {
        match Frontend::connect(socket, max_queues) {
            Ok(f) => return Ok(f),
            Err(source) if Instant::now() >= deadline => {
                return Err(FrontendError::Connect {
                    path: socket.to_path_buf(),
                    source,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

impl ScsiFrontend {
    /// Connects to the backend at `socket` (retrying until it listens or
    /// `config.connect_timeout` passes) and sets the device up.
    pub fn connect(socket: &Path, config: &DriverConfig) -> Result<ScsiFrontend, FrontendError> {
        let ring_size = config.ring_size()?;
        let mut frontend = connect_with_retry(
            socket,
            (FIRST_REQUEST_QUEUE + 1) as u64,
            config.connect_timeout,
        )?;

        // Negotiation, in QEMU's order.
        frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & FEATURE_VERSION_1 == 0 {
            return Err(FrontendError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        if offered & protocol_bit == 0 {
            return Err(FrontendError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        let protocol = frontend
            .get_protocol_features()
            .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
        let mut wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        if config.inflight {
            wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        frontend
            .set_protocol_features(protocol & wanted)
            .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
        let queues_offered = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            frontend
                .get_queue_num()
                .map_err(vhost_err("GET_QUEUE_NUM"))?
        } else {
            (FIRST_REQUEST_QUEUE + 1) as u64
        };
        let request_offered =
            usize::try_from(queues_offered.saturating_sub(FIRST_REQUEST_QUEUE as u64))
                .unwrap_or(usize::MAX);
        if config.request_queues > request_offered {
            return Err(FrontendError::TooManyQueues {
                asked: config.request_queues,
                offered: request_offered,
            });
        }
        let mut features = FEATURE_VERSION_1 | protocol_bit;
        if config.event_idx {
            features |= offered & FEATURE_EVENT_IDX;
        }
        if config.hotplug {
            features |= offered & FEATURE_HOTPLUG;
        }
        if config.param_change {
            features |= offered & FEATURE_CHANGE;
        }
        frontend
            .set_features(features)
            .map_err(vhost_err("SET_FEATURES"))?;
        let event_idx = features & FEATURE_EVENT_IDX != 0;

        // Guest memory: control and event rings with the event buffers,
        // then per request queue its ring, slot metadata and data buffers.
        let mut bump = Bump(0);
        let aux_rings = [
            plan_ring(&mut bump, AUX_QUEUE_SIZE),
            plan_ring(&mut bump, AUX_QUEUE_SIZE),
        ];
        let event_buffers = bump.take(u64::from(EVENT_LEN * u32::from(EVENT_BUFFERS)), 64);
        let control_buffer = bump.take(CONTROL_BUFFER_LEN, 64);
        let data_stride = u64::from(config.data_size).div_ceil(PAGE).max(1) * PAGE;
        let plans: Vec<RingPlan> = (0..config.request_queues)
            .map(|_| {
                let addrs = plan_ring(&mut bump, ring_size);
                let meta = bump.take(SLOT_META_LEN * config.queue_depth as u64, PAGE);
                let data = bump.take(data_stride * config.queue_depth as u64, PAGE);
                let slots = (0..config.queue_depth as u64)
                    .map(|i| SlotAddrs {
                        header: meta + i * SLOT_META_LEN,
                        response: meta + i * SLOT_META_LEN + 128,
                        data: data + i * data_stride,
                    })
                    .collect();
                RingPlan { addrs, slots }
            })
            .collect();
        let mem_size = bump.0.div_ceil(2 << 20) * (2 << 20);
        let mem_len = usize::try_from(mem_size)
            .map_err(|_| FrontendError::MemorySetup(format!("{mem_size} bytes")))?;
        let file = memfd(mem_size)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            mem_len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| FrontendError::MemorySetup(e.to_string()))?;
        let mem = Arc::new(mem);
        let host = mem.get_host_address(GuestAddress(0))? as u64;
        let region = mem
            .find_region(GuestAddress(0))
            .ok_or_else(|| FrontendError::MemorySetup("no region at 0".into()))?;
        let fd = vm_memory::GuestMemoryRegion::file_offset(region)
            .ok_or_else(|| FrontendError::MemorySetup("region without a file".into()))?
            .file()
            .as_raw_fd();
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: mem_size,
                userspace_addr: host,
                mmap_offset: 0,
                mmap_handle: fd,
            }])
            .map_err(vhost_err("SET_MEM_TABLE"))?;
        let inflight =
            if config.inflight && protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
                let queues = u16::try_from(FIRST_REQUEST_QUEUE + config.request_queues)
                    .map_err(|_| FrontendError::Config("too many queues".into()))?;
                let (_, file) = inflight_region(&mut frontend, queues, ring_size)?;
                Some(file)
            } else {
                None
            };

        let setup_ring = |frontend: &mut Frontend,
                          index: usize,
                          size: u16,
                          addrs: RingAddrs|
         -> Result<(SplitRing, EventFd, EventFd), FrontendError> {
            frontend
                .set_vring_num(index, size)
                .map_err(vhost_err("SET_VRING_NUM"))?;
            frontend
                .set_vring_base(index, 0)
                .map_err(vhost_err("SET_VRING_BASE"))?;
            frontend
                .set_vring_addr(
                    index,
                    &VringConfigData {
                        queue_max_size: MAX_QUEUE_SIZE,
                        queue_size: size,
                        flags: 0,
                        desc_table_addr: host + addrs.desc,
                        used_ring_addr: host + addrs.used,
                        avail_ring_addr: host + addrs.avail,
                        log_addr: None,
                    },
                )
                .map_err(vhost_err("SET_VRING_ADDR"))?;
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(FrontendError::EventFd)?;
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(FrontendError::EventFd)?;
            frontend
                .set_vring_kick(index, &kick)
                .map_err(vhost_err("SET_VRING_KICK"))?;
            frontend
                .set_vring_call(index, &call)
                .map_err(vhost_err("SET_VRING_CALL"))?;
            Ok((
                SplitRing::new(mem.clone(), size, addrs, event_idx),
                kick,
                call,
            ))
        };

        let mut aux = Vec::new();
        for (index, addrs) in aux_rings.into_iter().enumerate() {
            let (ring, kick, call) = setup_ring(&mut frontend, index, AUX_QUEUE_SIZE, addrs)?;
            aux.push(AuxQueue {
                ring,
                kick,
                _call: call,
            });
        }
        let mut queues = Vec::new();
        for (i, plan) in plans.into_iter().enumerate() {
            let index = FIRST_REQUEST_QUEUE + i;
            let (ring, kick, call) = setup_ring(&mut frontend, index, ring_size, plan.addrs)?;
            queues.push(RequestQueue::new(
                index,
                ring,
                mem.clone(),
                kick,
                call,
                &plan.slots,
                config.data_size,
                config.timeout,
            ));
        }
        for index in 0..FIRST_REQUEST_QUEUE + config.request_queues {
            frontend
                .set_vring_enable(index, true)
                .map_err(vhost_err("SET_VRING_ENABLE"))?;
        }

        // Post the event buffers as Linux does; the device keeps them until
        // it has an event to report.
        let mut device = ScsiFrontend {
            frontend,
            mem,
            features,
            queues_offered,
            aux,
            queues,
            event_buffers,
            control_buffer,
            _inflight: inflight,
        };
        for i in 0..config.event_buffers.min(EVENT_BUFFERS) {
            device.post_event_buffer(i)?;
        }
        Ok(device)
    }

    /// Posts event buffer `i` (0-7) on the event queue, kicking the
    /// device if it asks.
    pub fn post_event_buffer(&mut self, i: u16) -> Result<(), FrontendError> {
        self.post_event_descriptor(i, EVENT_LEN, true)
    }

    /// Posts event buffer `i` (0-7) as a descriptor of `len` bytes (at
    /// most 16), device-writable or not: a malformed buffer, for the
    /// hostile-driver tests.
    pub fn post_event_descriptor(
        &mut self,
        i: u16,
        len: u32,
        writable: bool,
    ) -> Result<(), FrontendError> {
        let event = &mut self.aux[EVENT_QUEUE];
        event.ring.write_desc(
            i,
            Descriptor {
                addr: self.event_buffers + u64::from(i) * u64::from(EVENT_LEN),
                len: len.min(EVENT_LEN),
                flags: if writable { VRING_DESC_F_WRITE } else { 0 },
                next: 0,
            },
        )?;
        event.ring.publish(i)?;
        if event.ring.kick_needed()? {
            event.kick.write(1).map_err(FrontendError::EventFd)?;
        }
        Ok(())
    }

    /// The next event the device wrote (`struct virtio_scsi_event`, 16
    /// bytes) with the length it reported, waiting up to `timeout`; its
    /// buffer is posted again, as Linux does. `None` if none came.
    pub fn next_event(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<([u8; EVENT_LEN as usize], u32)>, FrontendError> {
        let deadline = Instant::now() + timeout;
        loop {
            let used = self.aux[EVENT_QUEUE]
                .ring
                .next_used(EVENT_QUEUE, usize::from(EVENT_BUFFERS))?;
            if let Some((id, len)) = used {
                let index = u16::try_from(id)
                    .ok()
                    .filter(|&i| i < EVENT_BUFFERS)
                    .ok_or_else(|| {
                        FrontendError::MemorySetup(format!("event queue: used id {id}"))
                    })?;
                let mut event = [0u8; EVENT_LEN as usize];
                self.mem.read_slice(
                    &mut event,
                    GuestAddress(self.event_buffers + u64::from(index) * u64::from(EVENT_LEN)),
                )?;
                self.post_event_buffer(index)?;
                return Ok(Some((event, len)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends the task management function `subtype` (virtio 1.2
    /// §5.6.6.2: VIRTIO_SCSI_T_TMF; 5 is LOGICAL UNIT RESET, 4 I_T NEXUS
    /// RESET) for target 0, `lun`, on the control queue, and waits up to
    /// `timeout` for its response byte (0: VIRTIO_SCSI_S_OK). One at a
    /// time.
    pub fn tmf(&mut self, subtype: u32, lun: u16, timeout: Duration) -> Result<u8, FrontendError> {
        let mut req = Vec::with_capacity(TMF_REQUEST_LEN as usize);
        req.extend_from_slice(&0u32.to_le_bytes());
        req.extend_from_slice(&subtype.to_le_bytes());
        req.extend_from_slice(&scsi::lun_field(lun));
        req.extend_from_slice(&1u64.to_le_bytes());
        let (request, response) = (self.control_buffer, self.control_buffer + 64);
        self.mem.write_slice(&req, GuestAddress(request))?;
        self.mem.write_slice(&[0xff], GuestAddress(response))?;
        let control = &mut self.aux[CONTROL_QUEUE];
        control.ring.write_desc(
            0,
            Descriptor {
                addr: request,
                len: TMF_REQUEST_LEN,
                flags: ring::VRING_DESC_F_NEXT,
                next: 1,
            },
        )?;
        control.ring.write_desc(
            1,
            Descriptor {
                addr: response,
                len: 1,
                flags: VRING_DESC_F_WRITE,
                next: 0,
            },
        )?;
        control.ring.publish(0)?;
        if control.ring.kick_needed()? {
            control.kick.write(1).map_err(FrontendError::EventFd)?;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if control.ring.next_used(CONTROL_QUEUE, 1)?.is_some() {
                let mut byte = [0u8; 1];
                self.mem.read_slice(&mut byte, GuestAddress(response))?;
                return Ok(byte[0]);
            }
            if Instant::now() >= deadline {
                return Err(FrontendError::Timeout {
                    queue: CONTROL_QUEUE,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The virtio features acknowledged.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.features & FEATURE_EVENT_IDX != 0
    }

    /// All queues the device offers (GET_QUEUE_NUM: control, event and
    /// request queues).
    pub fn queues_offered(&self) -> u64 {
        self.queues_offered
    }

    /// Guest memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        vm_memory::GuestMemoryBackend::last_addr(&*self.mem).0 + 1
    }

    pub fn queues(&self) -> &[RequestQueue] {
        &self.queues
    }

    /// The request queues, to hand one to each submitting thread.
    pub fn queues_mut(&mut self) -> &mut [RequestQueue] {
        &mut self.queues
    }

    /// Request queue `i` (0 = the first request queue, vhost-user index 2).
    pub fn queue(&mut self, i: usize) -> Option<&mut RequestQueue> {
        self.queues.get_mut(i)
    }

    /// The vhost-user connection, for messages this driver does not send.
    pub fn vhost_frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }
}
