//! A job: one operation of the image (a `RemoteOp`, or a synchronous
//! call's), split into NBD commands ([`Sub`]s) that all go to one
//! connection. The job owns the request's memory until it finishes;
//! exactly one result leaves, once: when its last command succeeded, at
//! the first error, or at its deadline.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::super::remote::{RemoteCompletion, RemoteResult};
use super::super::{Extent, PinnedBufs};
use super::durability::Durability;

/// Most commands one job is split into.
pub const MAX_SUBS: usize = 1 << 16;

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    Read,
    Write { fua: bool },
    Flush,
    Trim,
    Zero { no_hole: bool },
    BlockStatus,
}

/// The memory a job moves bytes into or out of.
pub enum Bufs {
    /// The guest's pinned memory (an asynchronous request).
    Pinned(PinnedBufs),
    /// A synchronous call's own copy (the caller's borrowed memory never
    /// crosses threads: the call may time out while a reply is on its
    /// way).
    Owned(Vec<u8>),
    None,
}

impl Bufs {
    /// Copies `data` in from byte `at` on; false if the memory is shorter.
    pub fn fill_at(&mut self, at: usize, data: &[u8]) -> bool {
        match self {
            Bufs::Pinned(p) => p.borrow_mut().fill_at(at, data) == data.len(),
            Bufs::Owned(v) => match at
                .checked_add(data.len())
                .and_then(|end| v.get_mut(at..end))
            {
                Some(dst) => {
                    dst.copy_from_slice(data);
                    true
                }
                None => false,
            },
            Bufs::None => false,
        }
    }

    /// Copies `out.len()` bytes out from byte `at` on; false if shorter.
    pub fn gather_at(&mut self, at: usize, out: &mut [u8]) -> bool {
        match self {
            Bufs::Pinned(p) => {
                let mut b = p.borrow_mut();
                b.advance(at);
                b.as_source().gather_into(out) == out.len()
            }
            Bufs::Owned(v) => match at.checked_add(out.len()).and_then(|end| v.get(at..end)) {
                Some(src) => {
                    out.copy_from_slice(src);
                    true
                }
                None => false,
            },
            Bufs::None => false,
        }
    }
}

/// What a job gives back besides success.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Nothing,
    Extent(Extent),
}

/// Where a synchronous call waits for its job.
#[derive(Default)]
pub struct SyncWait {
    done: Mutex<Option<(io::Result<Output>, Bufs)>>,
    cv: Condvar,
}

impl SyncWait {
    /// The job's result and memory, or `None` if `deadline` came first.
    pub fn wait(&self, deadline: Instant) -> Option<(io::Result<Output>, Bufs)> {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = done.take() {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            done = self
                .cv
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Who learns a job's result.
pub enum Completer {
    Remote(RemoteCompletion),
    Sync(Arc<SyncWait>),
}

struct JobState {
    bufs: Bufs,
    /// Taken when the job finishes.
    completer: Option<Completer>,
    /// Commands not yet answered.
    remaining: usize,
    /// A durable write to a server without FUA: a FLUSH follows.
    flush_after: bool,
    /// That FLUSH was sent.
    flushing: bool,
    /// The slot's loss epoch (connections lost that may have lost
    /// acknowledged writes) when a command of the job was first answered:
    /// a trailing FLUSH answered after a later loss does not cover it.
    first_answer: Option<u64>,
    /// A command's payload is being sent from the job's memory: an error
    /// reply waits for it ([`Job::fail`]) instead of cutting it short.
    sending: bool,
    /// The error the job ends with once that payload is sent.
    deferred: Option<io::Error>,
    output: Output,
}

/// One operation in flight.
pub struct Job {
    pub kind: JobKind,
    pub offset: u64,
    pub len: u64,
    pub deadline: Instant,
    state: Mutex<JobState>,
}

/// One NBD command of a job.
#[derive(Clone)]
pub struct Sub {
    pub job: Arc<Job>,
    /// `Flush` for the flush a write without FUA is followed by.
    pub kind: JobKind,
    pub offset: u64,
    pub len: u32,
    /// Where its bytes are in the job's memory.
    pub buf_at: usize,
}

impl Job {
    pub fn new(
        kind: JobKind,
        offset: u64,
        len: u64,
        deadline: Instant,
        bufs: Bufs,
        completer: Completer,
    ) -> Arc<Job> {
        Arc::new(Job {
            kind,
            offset,
            len,
            deadline,
            state: Mutex::new(JobState {
                bufs,
                completer: Some(completer),
                remaining: 0,
                flush_after: false,
                flushing: false,
                first_answer: None,
                sending: false,
                deferred: None,
                output: Output::Nothing,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Its commands, each at most `chunk` bytes (a multiple of the
    /// server's minimum block size); counted as remaining. `None` (and
    /// the job failed with EINVAL) if it would take more than
    /// [`MAX_SUBS`] commands.
    pub fn split(self: &Arc<Job>, chunk: u32) -> Option<Vec<Sub>> {
        let (mut at, chunk) = (0u64, u64::from(chunk.max(1)));
        if self.len.div_ceil(chunk) > MAX_SUBS as u64 {
            self.fail(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes in commands of at most {chunk}: more than {MAX_SUBS} commands",
                    self.len
                ),
            ));
            return None;
        }
        let mut subs = Vec::new();
        loop {
            let len = (self.len - at).min(chunk);
            subs.push(Sub {
                job: self.clone(),
                kind: self.kind,
                offset: self.offset + at,
                len: len as u32,
                buf_at: at as usize,
            });
            at += len;
            if at >= self.len {
                break;
            }
        }
        self.lock().remaining = subs.len();
        Some(subs)
    }

    pub fn finished(&self) -> bool {
        self.lock().completer.is_none()
    }

    /// Finished, or failed and waiting for a payload to be sent: its
    /// commands not yet sent are dropped.
    pub fn failing(&self) -> bool {
        let st = self.lock();
        st.completer.is_none() || st.deferred.is_some()
    }

    /// A command's payload is about to be sent from the job's memory;
    /// false if the job is finished or failing (nothing is to be sent).
    pub fn begin_send(&self) -> bool {
        let mut st = self.lock();
        if st.completer.is_none() || st.deferred.is_some() {
            return false;
        }
        st.sending = true;
        true
    }

    /// The payload begun with [`Job::begin_send`] is sent (or the
    /// connection broke): an error deferred meanwhile ends the job now.
    pub fn end_send(&self) {
        let mut st = self.lock();
        st.sending = false;
        if let Some(e) = st.deferred.take() {
            Self::finish_locked(st, Err(e));
        }
    }

    /// Runs `f` on the job's memory, unless the job has finished (its
    /// memory handed back): then `None`.
    pub fn with_bufs<R>(&self, f: impl FnOnce(&mut Bufs) -> R) -> Option<R> {
        let mut st = self.lock();
        st.completer.as_ref()?;
        Some(f(&mut st.bufs))
    }

    /// A durable write is going to a server without FUA: its last reply
    /// is followed by a FLUSH before it completes.
    pub fn needs_flush_after(&self) {
        self.lock().flush_after = true;
    }

    /// A command succeeded at the slot's loss epoch `epoch`. Returns the FLUSH
    /// to send now if the job needs one before it completes.
    pub fn sub_done(
        self: &Arc<Job>,
        output: Output,
        durability: &Durability,
        epoch: u64,
    ) -> Option<Sub> {
        let mut st = self.lock();
        st.completer.as_ref()?;
        if st.deferred.is_some() {
            return None;
        }
        if st.flushing {
            // The trailing FLUSH of a durable write: it covers the write
            // only if no connection was lost (with a possible loss of
            // acknowledged writes) since the write was acknowledged. A
            // deliberate reconnection (a new size) is not such a loss.
            if st.first_answer.is_some_and(|g| g < epoch) {
                log::warn!(
                    "NBD: durable write of {} bytes at {} failed: the connection dropped between the write and its flush",
                    self.len,
                    self.offset
                );
                Self::finish_locked(st, Err(io::Error::from_raw_os_error(libc::EIO)));
                return None;
            }
        } else {
            st.first_answer = Some(st.first_answer.map_or(epoch, |g| g.min(epoch)));
        }
        if output != Output::Nothing {
            st.output = output;
        }
        st.remaining = st.remaining.saturating_sub(1);
        if st.remaining > 0 {
            return None;
        }
        if st.flush_after {
            st.flush_after = false;
            st.flushing = true;
            st.remaining = 1;
            return Some(Sub {
                job: self.clone(),
                kind: JobKind::Flush,
                offset: 0,
                len: 0,
                buf_at: 0,
            });
        }
        let output = st.output;
        let result = if self.kind == JobKind::Flush && durability.take_loss() {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(output)
        };
        Self::finish_locked(st, result);
        None
    }

    /// Completes the job with `error` unless it has finished; while a
    /// payload of it is being sent, once that is sent (the memory stays
    /// the job's until then, so the stream stays usable).
    pub fn fail(&self, error: io::Error) {
        let mut st = self.lock();
        if st.sending {
            if st.completer.is_some() {
                st.deferred.get_or_insert(error);
            }
            return;
        }
        Self::finish_locked(st, Err(error));
    }

    /// Completes the job with `error` (or the error deferred) unless it
    /// has finished, even mid-payload: its deadline. The sender then finds
    /// the memory gone and cuts the connection.
    pub fn fail_now(&self, error: io::Error) {
        let mut st = self.lock();
        let error = st.deferred.take().unwrap_or(error);
        Self::finish_locked(st, Err(error));
    }

    fn finish_locked(mut st: MutexGuard<'_, JobState>, result: io::Result<Output>) {
        let Some(completer) = st.completer.take() else {
            return;
        };
        let bufs = std::mem::replace(&mut st.bufs, Bufs::None);
        drop(st);
        match completer {
            Completer::Remote(c) => {
                // The memory goes back before the result is posted.
                drop(bufs);
                c.complete(RemoteResult::Io(result.map(|_| ())));
            }
            Completer::Sync(w) => {
                *w.done.lock().unwrap_or_else(PoisonError::into_inner) = Some((result, bufs));
                w.cv.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_job_needing_more_than_max_subs_commands_fails_instead_of_splitting() {
        let wait = Arc::new(SyncWait::default());
        let deadline = Instant::now() + Duration::from_secs(5);
        // 32 MiB in commands of 1 byte.
        let job = Job::new(
            JobKind::Read,
            0,
            32 << 20,
            deadline,
            Bufs::None,
            Completer::Sync(wait.clone()),
        );
        assert!(job.split(1).is_none());
        let (result, _) = wait.wait(deadline).expect("failed at once");
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // At the limit, split.
        let wait = Arc::new(SyncWait::default());
        let job = Job::new(
            JobKind::Read,
            0,
            MAX_SUBS as u64 * 4096,
            deadline,
            Bufs::None,
            Completer::Sync(wait),
        );
        assert_eq!(job.split(4096).map(|s| s.len()), Some(MAX_SUBS));
    }
}
