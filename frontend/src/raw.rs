//! A low-level vhost-user virtio-scsi driver for hostile-guest tests: it
//! sets the device up like [`ScsiFrontend`](super::ScsiFrontend) does, but
//! then hands the caller the raw parts of the request queue — descriptor
//! table, indirect tables, available ring entries and index, guest memory
//! split into several regions — so that a test can write exactly the
//! malformed chains and ring states a broken or malicious guest could.
//! [`RawSocket`] goes one level lower still: a bare Unix stream that sends
//! vhost-user messages byte by byte, with any size field and any file
//! descriptors attached.
//!
//! Nothing here is used by the load generator; its path (`ScsiFrontend`,
//! `RequestQueue`) is separate and unchanged.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

use super::ring::RingAddrs;
use super::{
    connect_with_retry, memfd, poll_in, vhost_err, wait_for_signal, FrontendError, CONTROL_QUEUE,
    EVENT_QUEUE, FIRST_REQUEST_QUEUE,
};

use super::ring::{FEATURE_INDIRECT_DESC, FEATURE_VERSION_1};
pub use super::ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// Control and event queue size.
const AUX_QUEUE_SIZE: u16 = 128;
/// Where the three rings live in region 0, and where free memory starts.
const CONTROL_RING: u64 = 0x0;
const EVENT_RING: u64 = 0x4000;
const REQUEST_RING: u64 = 0x10000;
const FREE_START: u64 = 0x20000;

/// A split-ring descriptor as the guest writes it (little-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

// SAFETY: plain integers, no padding (8 + 4 + 2 + 2 bytes), any bit pattern
// is valid.
unsafe impl ByteValued for RawDesc {}

impl RawDesc {
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> RawDesc {
        RawDesc {
            addr,
            len,
            flags,
            next,
        }
    }
}

/// One guest memory region: `size` bytes at guest-physical `gpa`, each in a
/// memfd of its own (so two regions are separate mappings in the daemon
/// even where they are guest-physically contiguous).
#[derive(Clone, Copy, Debug)]
pub struct RegionSpec {
    pub gpa: u64,
    pub size: u64,
}

/// How [`RawDevice::connect`] sets the device up.
#[derive(Clone, Debug)]
pub struct RawConfig {
    /// Guest memory; the first region must start at 0 and hold at least
    /// 256 KiB (the rings live there).
    pub regions: Vec<RegionSpec>,
    /// Size of the first request queue (vhost-user index 2).
    pub queue_size: u16,
    /// Queues the vhost-user connection may address (at least 3).
    pub max_queues: u64,
    /// Enable the request queue at setup. When the device enables a queue
    /// it serves whatever is already available on it (vhost-user-backend
    /// processes a queue once when its kick is registered), so a test that
    /// needs requests to sit unserved until a moment of its choosing sets
    /// the queue up disabled and calls
    /// [`RawDevice::enable_request_queue`] then.
    pub enable_request_queue: bool,
    pub connect_timeout: Duration,
    /// Negotiate in-flight tracking as QEMU does when the device offers
    /// it: GET_INFLIGHT_FD for every queue the connection may address
    /// (`max_queues`) at `queue_size`, then SET_INFLIGHT_FD with the
    /// region, before the rings are set up. The region is kept
    /// ([`RawDevice::inflight_region`]) and handed to the next daemon by
    /// [`RawDevice::reconnect`].
    pub inflight: bool,
    /// Negotiate dirty logging (LOG_SHMFD) when the device offers it, for
    /// [`RawDevice::start_dirty_log`].
    pub log: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            regions: vec![RegionSpec {
                gpa: 0,
                size: 4 << 20,
            }],
            queue_size: 256,
            max_queues: 4,
            enable_request_queue: true,
            connect_timeout: Duration::from_secs(10),
            inflight: false,
            log: false,
        }
    }
}

/// A used ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

/// A set-up device whose first request queue the caller drives by hand.
/// EVENT_IDX is not negotiated: the device signals every used buffer and
/// every kick is seen.
pub struct RawDevice {
    frontend: Frontend,
    mem: GuestMemoryMmap<()>,
    queue_size: u16,
    ring: RingAddrs,
    kick: EventFd,
    call: EventFd,
    _aux: Vec<(EventFd, EventFd)>,
    avail_idx: u16,
    last_used: u16,
    next_free: u64,
    config: RawConfig,
    /// The in-flight region and its geometry, once negotiated.
    inflight: Option<(VhostUserInflight, File)>,
}

/// A new vhost-user connection to `socket`, negotiated as at setup:
/// SET_OWNER, the protocol features (MQ, REPLY_ACK, and INFLIGHT_SHMFD
/// with [`RawConfig::inflight`]), the virtio features.
fn negotiate(socket: &Path, config: &RawConfig) -> Result<Frontend, FrontendError> {
    let mut frontend = connect_with_retry(socket, config.max_queues, config.connect_timeout)?;
    frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
    let offered = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;
    let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    let protocol = frontend
        .get_protocol_features()
        .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
    let mut wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
    if config.inflight {
        wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    if config.log {
        wanted |= VhostUserProtocolFeatures::LOG_SHMFD;
    }
    frontend
        .set_protocol_features(protocol & wanted)
        .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
    let features = (FEATURE_VERSION_1 | protocol_bit) | (offered & FEATURE_INDIRECT_DESC);
    frontend
        .set_features(features)
        .map_err(vhost_err("SET_FEATURES"))?;
    // Every request asks for an acknowledgement (REPLY_ACK), so a
    // request the backend refuses fails where it is sent.
    if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    Ok(frontend)
}

fn ring_addrs(base: u64, size: u16) -> RingAddrs {
    let desc = base;
    let avail = desc + RingAddrs::desc_bytes(size);
    let used = (avail + RingAddrs::avail_bytes(size)).div_ceil(4096) * 4096;
    RingAddrs { desc, avail, used }
}

impl RawDevice {
    /// Connects to `socket` (retrying until it listens) and sets up the
    /// control, event and first request queue; the queues are enabled and
    /// empty.
    pub fn connect(socket: &Path, config: &RawConfig) -> Result<RawDevice, FrontendError> {
        if config.queue_size == 0 || config.queue_size > super::MAX_QUEUE_SIZE {
            return Err(FrontendError::Config(format!(
                "queue size {}",
                config.queue_size
            )));
        }
        match config.regions.first() {
            Some(r) if r.gpa == 0 && r.size >= FREE_START * 2 => {}
            _ => {
                return Err(FrontendError::Config(
                    "the first region must start at 0 and hold at least 256 KiB".into(),
                ))
            }
        }
        let frontend = negotiate(socket, config)?;
        let mut ranges = Vec::new();
        for r in &config.regions {
            let len = usize::try_from(r.size)
                .map_err(|_| FrontendError::MemorySetup(format!("{} bytes", r.size)))?;
            ranges.push((
                GuestAddress(r.gpa),
                len,
                Some(FileOffset::new(memfd(r.size)?, 0)),
            ));
        }
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&ranges)
            .map_err(|e| FrontendError::MemorySetup(e.to_string()))?;
        let mut device = RawDevice {
            frontend,
            mem,
            queue_size: config.queue_size,
            ring: ring_addrs(REQUEST_RING, config.queue_size),
            kick: EventFd::new(libc::EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            call: EventFd::new(libc::EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            _aux: Vec::new(),
            avail_idx: 0,
            last_used: 0,
            next_free: FREE_START,
            config: config.clone(),
            inflight: None,
        };
        let all: Vec<usize> = (0..config.regions.len()).collect();
        device.set_mem_table(&all)?;
        if config.inflight {
            let (region, file) = super::inflight_region(
                &mut device.frontend,
                config.max_queues as u16,
                config.queue_size,
            )?;
            device.inflight = Some((region, file));
        }

        for _ in [CONTROL_QUEUE, EVENT_QUEUE] {
            device._aux.push((
                EventFd::new(libc::EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
                EventFd::new(libc::EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            ));
        }
        device.set_up_queues(config.enable_request_queue)?;
        Ok(device)
    }

    /// Connects to the daemon at `socket` (a new one, the one before
    /// killed) as QEMU reconnects: the same memory table, the in-flight
    /// region kept from the first connection (SET_INFLIGHT_FD), and every
    /// ring set up again where it is, its available index resumed from
    /// its used index. The request queue is enabled.
    pub fn reconnect(&mut self, socket: &Path) -> Result<(), FrontendError> {
        self.frontend = negotiate(socket, &self.config)?;
        let all: Vec<usize> = (0..self.config.regions.len()).collect();
        self.set_mem_table(&all)?;
        if let Some((region, file)) = &self.inflight {
            self.frontend
                .set_inflight_fd(region, file.as_raw_fd())
                .map_err(vhost_err("SET_INFLIGHT_FD"))?;
        }
        self.set_up_queues(true)
    }

    /// Sets up the control, event and request queues (their rings where
    /// they are, their eventfds), enables the control and event queues,
    /// and the request queue if `enable_request`.
    fn set_up_queues(&mut self, enable_request: bool) -> Result<(), FrontendError> {
        let aux: Vec<(EventFd, EventFd)> = self
            ._aux
            .iter()
            .map(|(k, c)| Ok((k.try_clone()?, c.try_clone()?)))
            .collect::<io::Result<_>>()
            .map_err(FrontendError::EventFd)?;
        for ((index, base), (kick, call)) in
            [(CONTROL_QUEUE, CONTROL_RING), (EVENT_QUEUE, EVENT_RING)]
                .into_iter()
                .zip(&aux)
        {
            self.setup_vring(
                index,
                AUX_QUEUE_SIZE,
                ring_addrs(base, AUX_QUEUE_SIZE),
                kick,
                call,
            )?;
        }
        let (kick, call) = (
            self.kick.try_clone().map_err(FrontendError::EventFd)?,
            self.call.try_clone().map_err(FrontendError::EventFd)?,
        );
        self.setup_vring(
            FIRST_REQUEST_QUEUE,
            self.queue_size,
            self.ring,
            &kick,
            &call,
        )?;
        for index in [CONTROL_QUEUE, EVENT_QUEUE] {
            self.frontend
                .set_vring_enable(index, true)
                .map_err(vhost_err("SET_VRING_ENABLE"))?;
        }
        if enable_request {
            self.enable_request_queue()?;
        }
        Ok(())
    }

    /// Starts dirty logging as QEMU does when a migration begins:
    /// SET_LOG_BASE with `log` (`size` bytes from offset 0), then
    /// SET_FEATURES with the features negotiated plus VHOST_F_LOG_ALL
    /// (bit 26) if `log_all`.
    pub fn start_dirty_log(
        &mut self,
        log: &File,
        size: u64,
        log_all: bool,
    ) -> Result<(), FrontendError> {
        let region = vhost::VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: 0,
            mmap_handle: log.as_raw_fd(),
        };
        self.frontend
            .set_log_base(0, Some(region))
            .map_err(vhost_err("SET_LOG_BASE"))?;
        let offered = self
            .frontend
            .get_features()
            .map_err(vhost_err("GET_FEATURES"))?;
        let features = FEATURE_VERSION_1
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (offered & FEATURE_INDIRECT_DESC)
            | if log_all { 1 << 26 } else { 0 };
        self.frontend
            .set_features(features)
            .map_err(vhost_err("SET_FEATURES"))
    }

    /// The in-flight region the daemon created (GET_INFLIGHT_FD) and its
    /// geometry, if [`RawConfig::inflight`] asked for it.
    pub fn inflight_region(&self) -> Option<&(VhostUserInflight, File)> {
        self.inflight.as_ref()
    }

    /// The guest address of this process's address `host`, if it is in
    /// guest memory.
    fn gpa_of(&self, host: u64) -> Option<u64> {
        self.mem.iter().find_map(|region| {
            let start = region.as_ptr() as u64;
            (host >= start && host - start < region.len())
                .then(|| region.start_addr().0 + (host - start))
        })
    }

    /// SET_VRING_ENABLE for the request queue: the device serves what is
    /// available on it and listens to its kicks from now on.
    pub fn enable_request_queue(&mut self) -> Result<(), FrontendError> {
        self.frontend
            .set_vring_enable(FIRST_REQUEST_QUEUE, true)
            .map_err(vhost_err("SET_VRING_ENABLE"))
    }

    /// The host (this process's) address of guest address `gpa`.
    pub fn host_addr(&self, gpa: u64) -> Result<u64, FrontendError> {
        Ok(self.mem.get_host_address(GuestAddress(gpa))? as u64)
    }

    /// Sends SET_MEM_TABLE naming the regions `indexes` (into the
    /// configured regions) — all of them at setup; a subset, a reordering
    /// or the same table again later.
    pub fn set_mem_table(&mut self, indexes: &[usize]) -> Result<(), FrontendError> {
        let regions: Vec<_> = self.mem.iter().collect();
        let mut table = Vec::new();
        for &i in indexes {
            let region = regions
                .get(i)
                .ok_or_else(|| FrontendError::Config(format!("no memory region {i}")))?;
            let gpa = region.start_addr().0;
            table.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: gpa,
                memory_size: region.len(),
                userspace_addr: self.host_addr(gpa)?,
                mmap_offset: 0,
                mmap_handle: region
                    .file_offset()
                    .ok_or_else(|| FrontendError::MemorySetup("region without a file".into()))?
                    .file()
                    .as_raw_fd(),
            });
        }
        self.frontend
            .set_mem_table(&table)
            .map(|_| ())
            .map_err(vhost_err("SET_MEM_TABLE"))
    }

    /// The memfd behind configured region `i`, to describe it in a memory
    /// table of the caller's own making.
    pub fn region_fd(&self, i: usize) -> Result<RawFd, FrontendError> {
        let region = self
            .mem
            .iter()
            .nth(i)
            .ok_or_else(|| FrontendError::Config(format!("no memory region {i}")))?;
        Ok(region
            .file_offset()
            .ok_or_else(|| FrontendError::MemorySetup("region without a file".into()))?
            .file()
            .as_raw_fd())
    }

    /// SET_VRING_NUM, _BASE (0), _ADDR, _KICK and _CALL for queue `index`
    /// with its rings at guest addresses `addrs` (translated to this
    /// process's addresses as QEMU does).
    fn setup_vring(
        &mut self,
        index: usize,
        size: u16,
        addrs: RingAddrs,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), FrontendError> {
        let (desc, avail, used) = (
            self.host_addr(addrs.desc)?,
            self.host_addr(addrs.avail)?,
            self.host_addr(addrs.used)?,
        );
        self.setup_vring_at(index, size, [desc, avail, used], kick, call)
    }

    /// Like the setup of every queue, but with the rings at arbitrary
    /// frontend addresses `[desc, avail, used]`: ones outside every memory
    /// region included.
    pub fn setup_vring_at(
        &mut self,
        index: usize,
        size: u16,
        host: [u64; 3],
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), FrontendError> {
        // The available index to resume from: 0 for a new ring; after a
        // reconnect the used index, which is all QEMU knows when the
        // daemon before died (vhost_virtqueue_stop's "ring restore").
        let base = self
            .gpa_of(host[2])
            .and_then(|used| {
                self.mem
                    .load::<u16>(GuestAddress(used + 2), Ordering::Acquire)
                    .ok()
            })
            .unwrap_or(0);
        let f = &mut self.frontend;
        f.set_vring_num(index, size)
            .map_err(vhost_err("SET_VRING_NUM"))?;
        f.set_vring_base(index, base)
            .map_err(vhost_err("SET_VRING_BASE"))?;
        f.set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: super::MAX_QUEUE_SIZE,
                queue_size: size,
                flags: 0,
                desc_table_addr: host[0],
                used_ring_addr: host[2],
                avail_ring_addr: host[1],
                log_addr: None,
            },
        )
        .map_err(vhost_err("SET_VRING_ADDR"))?;
        f.set_vring_kick(index, kick)
            .map_err(vhost_err("SET_VRING_KICK"))?;
        f.set_vring_call(index, call)
            .map_err(vhost_err("SET_VRING_CALL"))?;
        Ok(())
    }

    /// The vhost-user connection, for messages sent by hand.
    pub fn vhost_frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Takes `len` bytes of free guest memory in region 0 (64-byte
    /// aligned), for buffers and indirect tables.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_free.div_ceil(64) * 64;
        self.next_free = addr + len;
        addr
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), FrontendError> {
        self.mem.write_slice(bytes, GuestAddress(gpa))?;
        Ok(())
    }

    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, FrontendError> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(gpa))?;
        Ok(buf)
    }

    /// Writes descriptor `index` of the request queue's table (any index:
    /// the table is followed by other guest memory).
    pub fn write_desc(&self, index: u16, desc: RawDesc) -> Result<(), FrontendError> {
        self.write_descs_at(self.ring.desc + 16 * u64::from(index), &[desc])
    }

    /// Writes `descs` as a table at `gpa` (an indirect table).
    pub fn write_descs_at(&self, gpa: u64, descs: &[RawDesc]) -> Result<(), FrontendError> {
        for (i, d) in descs.iter().enumerate() {
            self.mem.write_obj(*d, GuestAddress(gpa + 16 * i as u64))?;
        }
        Ok(())
    }

    /// Writes available ring entry `slot` (taken modulo the queue size).
    pub fn write_avail_entry(&self, slot: u16, head: u16) -> Result<(), FrontendError> {
        let addr = self.ring.avail + 4 + 2 * u64::from(slot % self.queue_size);
        self.mem.write_obj(head, GuestAddress(addr))?;
        Ok(())
    }

    /// The driver's available index as last stored.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Stores avail->idx (release: after the entries and descriptors).
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<(), FrontendError> {
        self.avail_idx = idx;
        self.mem
            .store(idx, GuestAddress(self.ring.avail + 2), Ordering::Release)?;
        Ok(())
    }

    /// Puts `head` in the next available entry and moves the index by one.
    pub fn publish(&mut self, head: u16) -> Result<(), FrontendError> {
        self.write_avail_entry(self.avail_idx, head)?;
        self.set_avail_idx(self.avail_idx.wrapping_add(1))
    }

    /// Kicks the request queue.
    pub fn kick(&self) -> Result<(), FrontendError> {
        fence(Ordering::SeqCst);
        self.kick.write(1).map_err(FrontendError::EventFd)
    }

    /// The device's used index.
    pub fn used_idx(&self) -> Result<u16, FrontendError> {
        Ok(self
            .mem
            .load(GuestAddress(self.ring.used + 2), Ordering::Acquire)?)
    }

    /// The next used element, if the device returned one not yet taken.
    fn take_used(&mut self) -> Result<Option<UsedElem>, FrontendError> {
        if self.used_idx()? == self.last_used {
            return Ok(None);
        }
        let elem = self.ring.used + 4 + 8 * u64::from(self.last_used % self.queue_size);
        let id: u32 = self.mem.read_obj(GuestAddress(elem))?;
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4))?;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(UsedElem { id, len }))
    }

    /// The next used element, waiting for the call eventfd up to `timeout`;
    /// `None` if the device returned nothing in that time. An element
    /// already there is returned at once. Otherwise the driver sleeps, and
    /// the device must signal what it returns meanwhile (EVENT_IDX is not
    /// negotiated and VRING_AVAIL_F_NO_INTERRUPT never set, so every used
    /// buffer asks for a notification, virtio 1.2 §2.7.7): an element that
    /// appears without a signal within [`INTERRUPT_GRACE`](super::INTERRUPT_GRACE) is
    /// [`FrontendError::LostInterrupt`], even past `timeout`.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Option<UsedElem>, FrontendError> {
        if let Some(elem) = self.take_used()? {
            return Ok(Some(elem));
        }
        // Signals for elements taken earlier without sleeping would end the
        // sleep at once and stand in for a missing one. Dropped before the
        // used ring is looked at again, so a signal consumed here belongs
        // to an element that look sees.
        let _ = self.call.read();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(elem) = self.take_used()? {
                return Ok(Some(elem));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let last_used = self.last_used;
            let used = self.ring.used;
            let mem = &self.mem;
            let signalled = wait_for_signal(&self.call, FIRST_REQUEST_QUEUE, left, || {
                let idx: u16 = mem.load(GuestAddress(used + 2), Ordering::Acquire)?;
                Ok(idx != last_used)
            })?;
            if !signalled {
                return Ok(None);
            }
            // Signalled: the element is there, or the signal was a late one
            // for an element already taken (then sleep again).
        }
    }
}

/// vhost-user message header flags: protocol version 1, and "reply needed".
pub const VHOST_USER_VERSION: u32 = 0x1;
pub const VHOST_USER_NEED_REPLY: u32 = 0x8;

/// A bare vhost-user connection: messages are assembled by hand, so their
/// size fields, bodies and attached descriptors can be anything.
pub struct RawSocket {
    stream: UnixStream,
}

/// What came back after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A reply: header (request, flags, size) and body.
    Reply {
        request: u32,
        size: u32,
        body: Vec<u8>,
    },
    /// The backend closed the connection.
    Closed,
    /// Nothing within the timeout.
    Nothing,
}

impl RawSocket {
    pub fn connect(socket: &Path, timeout: Duration) -> Result<RawSocket, FrontendError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => return Ok(RawSocket { stream }),
                Err(e) if Instant::now() >= deadline => {
                    return Err(FrontendError::Daemon(format!(
                        "cannot connect to {}: {e}",
                        socket.display()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Sends a header (`request`, `flags`, `size` as given, whatever the
    /// body's real length) followed by `body`, with `fds` attached as
    /// SCM_RIGHTS.
    pub fn send(
        &self,
        request: u32,
        flags: u32,
        size: u32,
        body: &[u8],
        fds: &[RawFd],
    ) -> Result<(), FrontendError> {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(body);
        let mut iov = libc::iovec {
            iov_base: msg.as_mut_ptr().cast(),
            iov_len: msg.len(),
        };
        let fd_bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        let mut control = vec![0u8; if fds.is_empty() { 0 } else { space }];
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if !fds.is_empty() {
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = control.len() as _;
            // SAFETY: the control buffer has CMSG_SPACE(fd_bytes) bytes, so
            // the first header and its data fit; the pointers stay within it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    fd_bytes,
                );
            }
        }
        // SAFETY: hdr points to live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(FrontendError::Daemon(format!(
                "sendmsg: {}",
                io::Error::last_os_error()
            )));
        }
        if n as usize != msg.len() {
            return Err(FrontendError::Daemon(format!(
                "sendmsg: {n} of {} bytes",
                msg.len()
            )));
        }
        Ok(())
    }

    /// Reads the backend's next reply, or notices that it closed the
    /// connection, within `timeout`.
    pub fn answer(&mut self, timeout: Duration) -> Result<Answer, FrontendError> {
        if !poll_in(self.stream.as_raw_fd(), timeout)? {
            return Ok(Answer::Nothing);
        }
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(socket_error)?;
        let mut header = [0u8; 12];
        match self.stream.read(&mut header) {
            Ok(0) => return Ok(Answer::Closed),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Answer::Closed),
            Err(e) => return Err(socket_error(e)),
            Ok(n) if n < 12 => {
                self.stream
                    .read_exact(&mut header[n..])
                    .map_err(socket_error)?;
            }
            Ok(_) => {}
        }
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (request, size) = (word(0), word(8));
        let mut body = vec![0u8; (size as usize).min(4096)];
        self.stream.read_exact(&mut body).map_err(socket_error)?;
        Ok(Answer::Reply {
            request,
            size,
            body,
        })
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}

fn socket_error(e: io::Error) -> FrontendError {
    FrontendError::Daemon(format!("vhost-user socket: {e}"))
}

/// A file to pass where none is expected.
pub fn spare_fd() -> Result<File, FrontendError> {
    memfd(4096)
}
