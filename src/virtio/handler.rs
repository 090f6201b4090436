//! The vhost-user requests of one VMM connection (QEMU
//! docs/interop/vhost-user.rst): the device's side of the protocol, on the
//! `vhost` crate's [`BackendReqHandler`](vhost::vhost_user::BackendReqHandler),
//! which parses and answers the messages.
//!
//! vhost-user-backend 0.24 has such a handler, but it is private to the
//! crate and answers INFLIGHT_SHMFD's messages "not supported", and its
//! dirty-log support needs a bitmap type on all guest memory that the
//! daemon's raw-iovec transfers would bypass anyway. So the daemon has its
//! own, on the layer below (the `vhost` crate), and still uses
//! vhost-user-backend for what it exports: [`VringRwLock`] (a queue's state
//! with its eventfds) and the [`VhostUserBackend`] trait [`ScsiBackend`]
//! implements. Its worker threads run `worker::WorkerLoop`s.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestRegionMmap};

use super::backend::ScsiBackend;
use super::chain::GuestMem;
use super::dirty_log::{wait_until_unused, DirtyLog};
use super::inflight_shm::InflightRegion;
use super::memory::check_memory_table;
use super::worker::WorkerLoop;

/// Memory slots reported by GET_MAX_MEM_SLOTS (never asked: the
/// CONFIGURE_MEM_SLOTS protocol feature is not offered).
const MAX_MEM_SLOTS: u64 = 8;

/// Where a memory region is in the VMM's address space (SET_VRING_ADDR
/// gives ring addresses there).
#[derive(Debug, Clone, Copy)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot create a queue: {0}")]
    Vring(virtio_queue::Error),
    #[error("cannot set up a worker thread's event loop: {0}")]
    EventLoop(io::Error),
    #[error("cannot start a worker thread: {0}")]
    Thread(io::Error),
}

/// One VMM connection: its queues, guest memory and worker threads.
pub struct Connection {
    backend: Arc<ScsiBackend>,
    mem: GuestMemoryAtomic<GuestMem>,
    vrings: Vec<VringRwLock>,
    loops: Vec<Arc<WorkerLoop>>,
    threads: Vec<JoinHandle<()>>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    mappings: Vec<AddrMapping>,
    /// The dirty log from the last SET_LOG_BASE, in force while
    /// VHOST_F_LOG_ALL is acknowledged.
    log: Option<Arc<DirtyLog>>,
    /// Queues started at least once in this connection.
    queues_started: Vec<bool>,
}

/// vhost's VHOST_F_LOG_ALL feature bit (linux/vhost_types.h): the VMM
/// wants every write into guest memory logged (live migration).
pub const VHOST_F_LOG_ALL: u64 = 26;

impl Connection {
    /// The device for a new connection: its queues, and one worker thread
    /// per entry of [`ScsiBackend::thread_queues`], each watching the
    /// backend's listeners for it.
    pub fn new(backend: Arc<ScsiBackend>) -> Result<Connection, ConnectionError> {
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        let max = backend.max_queue_size() as u16;
        let vrings = (0..backend.num_queues())
            .map(|_| VringRwLock::new(mem.clone(), max).map_err(ConnectionError::Vring))
            .collect::<Result<Vec<_>, _>>()?;
        let mut connection = Connection {
            backend: backend.clone(),
            mem,
            vrings,
            loops: Vec::new(),
            threads: Vec::new(),
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            mappings: Vec::new(),
            log: None,
            queues_started: Vec::new(),
        };
        connection.queues_started = vec![false; connection.vrings.len()];
        for (thread, queues) in backend.thread_queues().iter().enumerate() {
            let worker = Arc::new(WorkerLoop::new().map_err(ConnectionError::EventLoop)?);
            let listeners = [
                backend.completion_listener(thread),
                backend.nudge_listener(thread),
                // Thread 0 serves the event queue, and delivers the events
                // the management API posts.
                backend.event_listener().filter(|_| thread == 0),
            ];
            for (fd, id) in listeners.into_iter().flatten() {
                worker.watch(fd, id).map_err(ConnectionError::EventLoop)?;
            }
            let vrings: Vec<VringRwLock> = queues
                .iter()
                .map(|&q| connection.vrings[q].clone())
                .collect();
            let (run, backend) = (worker.clone(), backend.clone());
            // Pushed before the spawn so that Drop stops it if a later one
            // fails.
            connection.loops.push(worker);
            let handle = std::thread::Builder::new()
                .name(format!("vring-worker-{thread}"))
                .spawn(move || run.run(&backend, &vrings, thread))
                .map_err(ConnectionError::Thread)?;
            connection.threads.push(handle);
        }
        Ok(connection)
    }

    fn vring(&self, index: u32) -> VhostUserResult<&VringRwLock> {
        self.vrings
            .get(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    /// Watches queue `index`'s kick while the queue is started and
    /// enabled, and has it served once when it becomes so (requests may be
    /// waiting whose kick was consumed, or never came to this daemon).
    fn update_watch(&self, index: usize) {
        let Some(vring) = self.vrings.get(index) else {
            return;
        };
        let Some((thread, local)) = self.backend.queue_owner(index) else {
            return;
        };
        let Some(worker) = self.loops.get(thread) else {
            return;
        };
        let state = vring.get_ref();
        let Some(kick) = state.get_kick() else {
            return;
        };
        let fd = kick.as_raw_fd();
        if state.get_queue().ready() && state.is_enabled() {
            drop(state);
            match worker.watch(fd, local as u64) {
                Ok(()) => worker.serve_once(local as u16),
                Err(e) => warn!("queue {index}: cannot watch its kick: {e}"),
            }
        } else {
            worker.unwatch(fd);
        }
    }

    /// Stops watching queue `index`'s kick (before its eventfd changes).
    fn unwatch(&self, index: usize) {
        let (Some(vring), Some((thread, _))) =
            (self.vrings.get(index), self.backend.queue_owner(index))
        else {
            return;
        };
        if let (Some(kick), Some(worker)) = (vring.get_ref().get_kick(), self.loops.get(thread)) {
            worker.unwatch(kick.as_raw_fd());
        }
    }

    /// A queue is started once it has a kick eventfd (vhost-user "Starting
    /// and stopping rings": the back-end starts a ring when it gets its
    /// kick).
    fn start_if_ready(&mut self, index: u8) -> VhostUserResult<()> {
        let Some(vring) = self.vrings.get(usize::from(index)) else {
            return Ok(());
        };
        let needs_start = {
            let state = vring.get_ref();
            !state.get_queue().ready() && state.get_kick().is_some()
        };
        if needs_start {
            // Images opened inactive (`--incoming`, or released at the end
            // of a migration) are locked before any request is served; a
            // queue whose images another process holds does not start.
            let target = self.backend.target();
            if !target.images_active() {
                target.activate_images().map_err(|e| {
                    error!("cannot start the device: {e}");
                    VhostUserError::ReqHandlerError(io::Error::other(e))
                })?;
                info!("device started: image locks taken");
            }
            // The requests a daemon before this one took and never
            // completed are served first (INFLIGHT_SHMFD).
            if let Some(tracking) = self.backend.tracking(usize::from(index)) {
                tracking.start(usize::from(index), vring);
            }
            vring.set_queue_ready(true);
            self.update_watch(usize::from(index));
            if let Some(started) = self.queues_started.get_mut(usize::from(index)) {
                *started = true;
            }
        }
        Ok(())
    }

    /// The queue count and size of an in-flight region the VMM asks for
    /// or hands over: at most this device's queues, and a queue size no
    /// ring can exceed.
    fn inflight_geometry(&self, inflight: &VhostUserInflight) -> VhostUserResult<(u16, u16)> {
        let (queues, size) = (inflight.num_queues, inflight.queue_size);
        if queues == 0
            || usize::from(queues) > self.vrings.len()
            || size == 0
            || usize::from(size) > self.backend.max_queue_size()
        {
            warn!(
                "in-flight region for {queues} queue(s) of {size} entries refused: \
                 the device has {} queues of at most {} entries",
                self.vrings.len(),
                self.backend.max_queue_size()
            );
            return Err(VhostUserError::InvalidParam);
        }
        Ok((queues, size))
    }

    /// Puts `log` in force and, before the request is answered, waits
    /// until no worker marks the log it replaces (the VMM reads that one a
    /// last time, then unmaps it).
    fn switch_log(&self, log: Option<Arc<DirtyLog>>) {
        let unchanged = match (&log, &self.backend.dirty_log()) {
            (Some(new), Some(old)) => Arc::ptr_eq(new, old),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return;
        }
        if let Some(previous) = self.backend.set_dirty_log(log) {
            // `self.log` may still hold it (LOG_ALL dropped, the log kept
            // for the next migration).
            let held = usize::from(self.log.as_ref().is_some_and(|l| Arc::ptr_eq(l, &previous)));
            wait_until_unused(&previous, held);
        }
    }

    /// For the log line at the disconnect: the features the VMM
    /// acknowledged and how many queues it started.
    pub fn summary(&self) -> String {
        format!(
            "features {}; {} of {} queues started",
            feature_names(self.acked_features),
            self.queues_started.iter().filter(|&&s| s).count(),
            self.vrings.len()
        )
    }

    /// Whether the VMM acknowledged VHOST_F_LOG_ALL.
    fn logging(&self) -> bool {
        self.acked_features & (1 << VHOST_F_LOG_ALL) != 0
    }

    /// Whether every queue is stopped (GET_VRING_BASE) or never started.
    fn device_stopped(&self) -> bool {
        self.vrings.iter().all(|v| !v.get_ref().get_queue().ready())
    }

    fn vmm_va_to_gpa(&self, vmm_va: u64) -> VhostUserResult<u64> {
        self.mappings
            .iter()
            .find(|m| vmm_va >= m.vmm_addr && vmm_va - m.vmm_addr < m.size)
            .and_then(|m| (vmm_va - m.vmm_addr).checked_add(m.gpa))
            .ok_or(VhostUserError::InvalidParam)
    }

    /// Makes `mem` the connection's guest memory, once checked (a table
    /// refused leaves the one before in place, and the request fails).
    fn install_memory(&mut self, mem: GuestMem) -> VhostUserResult<()> {
        // Checked before the queues can see it: a region past the end of
        // its file would raise SIGBUS at a worker's first access there.
        check_memory_table(&mem).map_err(|e| {
            VhostUserError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, e))
        })?;
        self.mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(mem);
        self.backend
            .update_memory(self.mem.clone())
            .map_err(VhostUserError::ReqHandlerError)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for worker in &self.loops {
            worker.stop();
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                warn!("a worker thread panicked");
            }
        }
    }
}

/// The names of the virtio and vhost feature bits in `features` the
/// device offers (others as their bit numbers), for the log.
fn feature_names(features: u64) -> String {
    const NAMES: [(u32, &str); 7] = [
        (0, "SCSI_INOUT"),
        (1, "SCSI_HOTPLUG"),
        (2, "SCSI_CHANGE"),
        (28, "RING_INDIRECT_DESC"),
        (29, "RING_EVENT_IDX"),
        (32, "VERSION_1"),
        (26, "LOG_ALL"),
    ];
    let mut names: Vec<String> = Vec::new();
    for bit in 0..64u32 {
        if features & (1 << bit) == 0 {
            continue;
        }
        match NAMES.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => names.push((*name).to_string()),
            None if bit == 30 => names.push("PROTOCOL_FEATURES".into()),
            None => names.push(format!("bit {bit}")),
        }
    }
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

/// The names of the vhost-user protocol features in `features`.
fn protocol_feature_names(features: u64) -> String {
    let known = VhostUserProtocolFeatures::from_bits_truncate(features);
    let mut names: Vec<String> = known
        .iter_names()
        .map(|(name, _)| name.to_string())
        .collect();
    let unknown = features & !known.bits();
    if unknown != 0 {
        names.push(format!("{unknown:#x}"));
    }
    names.join(" ")
}

fn unsupported(what: &'static str) -> VhostUserError {
    VhostUserError::InvalidOperation(what)
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        if self.owned {
            return Err(VhostUserError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        self.switch_log(None);
        self.log = None;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        for (index, vring) in self.vrings.iter().enumerate() {
            vring.set_enabled(false);
            self.update_watch(index);
        }
        self.acked_features = 0;
        self.switch_log(None);
        self.backend.reset_device();
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        if features != self.acked_features {
            info!(
                "VMM acknowledged features {}{}",
                feature_names(features),
                if self.acked_protocol_features != 0 {
                    format!(
                        "; protocol features {}",
                        protocol_feature_names(self.acked_protocol_features)
                    )
                } else {
                    String::new()
                }
            );
        }
        self.acked_features = features;
        // vhost-user "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES
        // the rings are enabled at once.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for (index, vring) in self.vrings.iter().enumerate() {
                vring.set_enabled(true);
                self.update_watch(index);
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features);
        // Logging starts before this request is answered: the VMM copies
        // guest memory only after that (vhost-user "Migration").
        self.switch_log(if self.logging() {
            self.log.clone()
        } else {
            None
        });
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(unsupported("postcopy is not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let mapped = GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(VhostUserError::InvalidParam)?;
            regions.push(mapped);
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
            });
        }
        let mem = GuestMem::from_regions(regions)
            .map_err(|e| VhostUserError::ReqHandlerError(io::Error::other(e)))?;
        self.install_memory(mem)?;
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        if num == 0 || num as usize > self.backend.max_queue_size() {
            return Err(VhostUserError::InvalidParam);
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        // A started queue gets SET_VRING_ADDR again when the VMM switches
        // dirty logging on or off (QEMU's vhost_dev_set_log, with the same
        // rings): its addresses are set again, but its used index is the
        // device's own, which a worker may be moving right now.
        let running = vring.get_ref().get_queue().ready();
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| VhostUserError::InvalidParam)?;
        if !running {
            // SET_VRING_BASE gives the next available index only; the used
            // index is the one in the ring (as libvhost-user takes it).
            let used_idx = vring
                .queue_used_idx()
                .map_err(|_| VhostUserError::BackendInternalError)?;
            vring.set_queue_next_used(used_idx);
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        let base = u16::try_from(base).map_err(|_| VhostUserError::InvalidParam)?;
        vring.set_queue_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        // vhost-user: the back-end stops the ring on GET_VRING_BASE; the
        // index returned accounts for every request taken (the backend
        // completes those in flight first).
        let vring = self.vring(index)?.clone();
        // Requests a daemon before this one took and this one has not
        // served again yet are served now: the index returned counts them,
        // and where the ring goes next (a migration's destination, a
        // driver's new rings) nothing would serve them. At most a queue
        // size of them; each pass serves them first.
        if let Some(tracking) = self.backend.tracking(index as usize) {
            for _ in 0..64 {
                if !tracking.has_resubmits() {
                    break;
                }
                self.backend.process_queue(index as usize, &vring);
            }
        }
        vring.set_queue_ready(false);
        self.update_watch(index as usize);
        self.backend
            .stop_vring(index)
            .map_err(VhostUserError::ReqHandlerError)?;
        let next_avail = vring.queue_next_avail();
        self.unwatch(index as usize);
        vring.set_kick(None);
        vring.set_call(None);
        // The device stopped while the VMM logged: the end of a live
        // migration, after which the destination's daemon takes the images
        // over. Their locks go now, before the reply (QEMU's source
        // inactivates its images at this point too); they are taken back
        // if the VM resumes here (the migration failed or was cancelled).
        if self.logging() && self.device_stopped() && self.backend.target().images_active() {
            match self.backend.target().deactivate_images() {
                Ok(()) => info!("device stopped during migration: images flushed, locks released"),
                Err(e) => error!("device stopped during migration, image locks kept: {e}"),
            }
        }
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?;
        self.unwatch(usize::from(index));
        // The worker reads the kick when epoll says it can; non-blocking,
        // a read that finds nothing (another reader of a shared eventfd
        // was first) cannot hold the thread, nor its exit. QEMU's
        // eventfds are non-blocking already.
        if let Some(fd) = &fd {
            let nonblocking = rustix::fs::fcntl_getfl(fd).and_then(|flags| {
                rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)
            });
            if let Err(e) = nonblocking {
                warn!(
                    "queue {index}: kick descriptor refused: {}",
                    io::Error::from(e)
                );
                return Err(VhostUserError::InvalidParam);
            }
        }
        self.vrings[usize::from(index)].set_kick(fd);
        self.start_if_ready(index)?;
        // A new eventfd for a started queue: watch that one.
        self.update_watch(usize::from(index));
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_call(fd);
        self.start_if_ready(index)?;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        // Only with VHOST_USER_F_PROTOCOL_FEATURES acked (vhost-user "Ring
        // states").
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_watch(index as usize);
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        self.backend
            .set_config(offset, buf)
            .map_err(VhostUserError::ReqHandlerError)
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // No back-end requests are sent (no protocol feature that needs
        // them is offered): the channel is dropped, closing it.
        debug!("back-end request channel offered; not used");
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        Err(unsupported("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(unsupported("no shared objects"))
    }

    /// vhost-user GET_INFLIGHT_FD: a new region for `num_queues` queues of
    /// `queue_size` entries, which the VMM keeps and hands back with
    /// SET_INFLIGHT_FD at every start, this daemon's or the next one's.
    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        let (queues, size) = self.inflight_geometry(inflight)?;
        let (region, file) = InflightRegion::create(queues, size).map_err(|e| {
            warn!("cannot create the in-flight region: {e}");
            VhostUserError::ReqHandlerError(io::Error::other(e))
        })?;
        let reply = VhostUserInflight {
            mmap_size: region.mmap_size(),
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        };
        Ok((reply, file))
    }

    /// vhost-user SET_INFLIGHT_FD: the region the queues are tracked in
    /// from now on (checked whole first: `InflightRegion::from_vmm`); each
    /// queue resubmits what it says when the queue starts.
    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        let (queues, size) = self.inflight_geometry(inflight)?;
        let region =
            InflightRegion::from_vmm(file, inflight.mmap_offset, inflight.mmap_size, queues, size)
                .map_err(|e| {
                    warn!("in-flight region refused: {e}");
                    VhostUserError::ReqHandlerError(io::Error::other(e))
                })?;
        for index in 0..self.vrings.len() {
            if let Some(tracking) = self.backend.tracking(index) {
                tracking.set_region(u16::try_from(index).ok().and_then(|i| region.queue(i)));
            }
        }
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(unsupported("postcopy is not supported"));
        }
        let mapped = Arc::new(
            GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(VhostUserError::InvalidParam)?,
        );
        let mem = self
            .mem
            .memory()
            .insert_region(mapped)
            .map_err(|e| VhostUserError::ReqHandlerError(io::Error::other(e)))?;
        self.install_memory(mem)?;
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| VhostUserError::ReqHandlerError(io::Error::other(e)))?;
        self.install_memory(mem)?;
        self.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _file: File,
    ) -> VhostUserResult<Option<File>> {
        Err(unsupported("device state transfer is not offered"))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        Err(unsupported("device state transfer is not offered"))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(unsupported("no shared memory regions"))
    }

    /// vhost-user SET_LOG_BASE (LOG_SHMFD): the log every page the daemon
    /// writes is marked in while VHOST_F_LOG_ALL is acknowledged (a new
    /// one replaces the old at once: the VMM resizes it when guest memory
    /// grows).
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostUserResult<()> {
        let log = DirtyLog::from_vmm(file, log.mmap_offset, log.mmap_size).map_err(|e| {
            warn!("dirty log refused: {e}");
            VhostUserError::ReqHandlerError(io::Error::other(e))
        })?;
        let log = Arc::new(log);
        self.log = Some(log.clone());
        if self.logging() {
            self.switch_log(Some(log));
        }
        Ok(())
    }
}
