//! A worker thread's event loop: one epoll instance per worker thread,
//! watching the kick eventfds of the queues it serves (while they are
//! live), the listeners the backend asks for (io_uring completions, start
//! nudges, posted device events) and an exit event.
//!
//! vhost-user-backend has such a loop (`VringEpollHandler`), but it can only
//! be created by its own request handler, which the daemon replaces with
//! its own (`handler.rs`, for in-flight tracking and dirty logging); this
//! is the loop that handler starts, calling the same
//! [`VhostUserBackend::handle_event`] of [`ScsiBackend`].

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Mutex, PoisonError};

use log::{debug, warn};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::ScsiBackend;

/// Event id of the exit eventfd.
const EXIT: u64 = u64::MAX;
/// Event id of the eventfd that asks for the pending queues to be served.
const WAKE: u64 = u64::MAX - 1;
/// Events taken from epoll per wait.
const EVENTS_PER_WAIT: usize = 64;

/// The epoll instance of one worker thread and the eventfds that steer it.
pub(crate) struct WorkerLoop {
    epoll: Epoll,
    exit: EventFd,
    wake: EventFd,
    /// This thread's queues (local indexes) to serve once, whether or not
    /// they were kicked: a queue just started may hold requests whose kick
    /// the daemon consumed while the queue was stopped, or that a daemon
    /// before this one was kicked for.
    pending: Mutex<Vec<u16>>,
}

impl WorkerLoop {
    pub(crate) fn new() -> io::Result<WorkerLoop> {
        let epoll = Epoll::new()?;
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        for (fd, id) in [(exit.as_raw_fd(), EXIT), (wake.as_raw_fd(), WAKE)] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, id))?;
        }
        Ok(WorkerLoop {
            epoll,
            exit,
            wake,
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Watches `fd` for input under event id `id` (a queue's local index,
    /// or one of the backend's listener ids). Watching it again is no
    /// error.
    pub(crate) fn watch(&self, fd: RawFd, id: u64) -> io::Result<()> {
        match self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, id))
        {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Stops watching `fd` (not watched: nothing to do).
    pub(crate) fn unwatch(&self, fd: RawFd) {
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Delete,
            fd,
            EpollEvent::new(EventSet::IN, 0),
        ) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                debug!("cannot stop watching descriptor {fd}: {e}");
            }
        }
    }

    /// Has the thread serve its queue `local` once, soon.
    pub(crate) fn serve_once(&self, local: u16) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if !pending.contains(&local) {
            pending.push(local);
        }
        drop(pending);
        if let Err(e) = self.wake.write(1) {
            warn!("cannot wake a worker thread: {e}");
        }
    }

    /// Ends [`WorkerLoop::run`] after the event it is handling.
    pub(crate) fn stop(&self) {
        if let Err(e) = self.exit.write(1) {
            warn!("cannot stop a worker thread: {e}");
        }
    }

    /// The loop of worker thread `thread`, serving `vrings` (its queues, in
    /// the order of [`ScsiBackend::thread_queues`]) until stopped. An error
    /// of the backend ends it, as vhost-user-backend's loop does: the
    /// backend has completed the thread's requests in flight by then.
    pub(crate) fn run(&self, backend: &ScsiBackend, vrings: &[VringRwLock], thread: usize) {
        let mut events = vec![EpollEvent::new(EventSet::empty(), 0); EVENTS_PER_WAIT];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("worker thread {thread}: epoll failed: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let result = match event.data() {
                    EXIT => return,
                    WAKE => {
                        let _ = self.wake.read();
                        let pending = std::mem::take(
                            &mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner),
                        );
                        pending
                            .into_iter()
                            .try_for_each(|local| Self::serve_queue(backend, vrings, thread, local))
                    }
                    id => match usize::try_from(id).ok().filter(|&i| i < vrings.len()) {
                        Some(local) => {
                            // The kick is consumed whether or not the queue
                            // is live; a queue that becomes live is served
                            // once anyway (`serve_once`).
                            let read = vrings[local].read_kick();
                            let hung_up = EventSet::from_bits_truncate(event.events)
                                .intersects(EventSet::HANG_UP | EventSet::ERROR);
                            // Not an eventfd that can be read (a pipe whose
                            // other end is closed, say): epoll would report
                            // it again at once, for ever.
                            let unusable = match &read {
                                Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                                    Some(e.to_string())
                                }
                                _ if hung_up => Some("hung up".to_string()),
                                _ => None,
                            };
                            match unusable {
                                Some(why) => {
                                    warn!("worker thread {thread}: queue {local}'s kick descriptor is unusable ({why}): no longer watched");
                                    self.unwatch_kick(&vrings[local]);
                                    Ok(())
                                }
                                None => Self::serve_queue(backend, vrings, thread, local as u16),
                            }
                        }
                        None => match u16::try_from(id) {
                            Ok(id) => backend.handle_event(
                                id,
                                EventSet::from_bits_truncate(event.events),
                                vrings,
                                thread,
                            ),
                            Err(_) => Err(io::Error::other(format!("unknown event id {id}"))),
                        },
                    },
                };
                if let Err(e) = result {
                    warn!("worker thread {thread} stops: {e}");
                    return;
                }
            }
        }
    }

    /// Stops watching `vring`'s kick descriptor.
    fn unwatch_kick(&self, vring: &VringRwLock) {
        if let Some(kick) = vring.get_ref().get_kick() {
            self.unwatch(kick.as_raw_fd());
        }
    }

    /// Serves queue `local` of the thread if it is started and enabled.
    fn serve_queue(
        backend: &ScsiBackend,
        vrings: &[VringRwLock],
        thread: usize,
        local: u16,
    ) -> io::Result<()> {
        let Some(vring) = vrings.get(usize::from(local)) else {
            return Ok(());
        };
        let live = {
            let state = vring.get_ref();
            state.get_queue().ready() && state.is_enabled()
        };
        if !live {
            return Ok(());
        }
        backend.handle_event(local, EventSet::IN, vrings, thread)
    }
}
