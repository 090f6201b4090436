//! I/O engines: how a request queue's READ and WRITE transfers and flushes
//! reach the storage. One completion-based interface for every engine: the
//! caller submits a [`Submission`] (the storage, the [`Request`] — a
//! transfer and its memory, or a flush — and a token); the engine either
//! carries it out during the call
//! ([`Submitted::Done`]) or queues it ([`Submitted::Queued`]) and hands
//! its result back later through [`Engine::reap`], signalling its
//! completion eventfd when one arrives. The caller (the transport) knows
//! nothing of how an engine works; the engine knows nothing of SCSI or
//! virtio.
//!
//! Two engines: [`SyncEngine`] (`preadv`/`pwritev2`/`fdatasync` in the
//! call) and [`super::uring::UringEngine`] (io_uring, many requests in
//! flight). Zeroing, deallocation and extent queries are not requests
//! (yet): the SCSI unit calls the [`Storage`] for them directly, on the
//! worker thread.

use std::io;
use std::sync::Arc;

use super::iobufs::{IoBufsMut, PinnedBufs};
use super::Storage;

/// Which engine carries out READ and WRITE transfers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// One synchronous `preadv`/`pwritev` at a time per worker thread.
    #[default]
    Sync,
    /// Up to 128 requests (`uring::RING_ENTRIES`) in flight per
    /// request queue.
    IoUring,
}

impl std::fmt::Display for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoEngine::Sync => "sync",
            IoEngine::IoUring => "io-uring",
        })
    }
}

/// A planned transfer: byte offset and length in the storage, and its
/// direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub offset: u64,
    pub len: usize,
    pub direction: Direction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Storage to memory.
    Read,
    /// Memory to storage; `durable`: on stable storage at completion.
    Write { durable: bool },
}

/// The memory of one transfer, as its owner (the transport) holds it.
/// Each engine uses it the way it works: batches borrowed for a
/// synchronous call, or pinned for the kernel to access after the call.
pub trait TransferMemory {
    /// Hands the first `len` bytes to `io` as batches with the byte offset
    /// of each, consuming them as each batch succeeds. Every batch but the
    /// last ends at a multiple of `granule` bytes from the start (O_DIRECT
    /// takes only aligned transfers, see [`Storage::transfer_granule`]).
    fn transfer(
        &mut self,
        len: usize,
        granule: usize,
        direction: Direction,
        io: &mut dyn FnMut(&mut IoBufsMut<'_>, u64) -> io::Result<()>,
    ) -> io::Result<()>;

    /// Pins the first `len` bytes into `out`, valid until `out` is
    /// released whatever becomes of `self`: false (and `out` released) if
    /// the memory cannot be pinned or takes more than `max_pieces` pieces.
    fn pin(&self, len: usize, max_pieces: usize, out: &mut PinnedBufs) -> bool;
}

/// What a submission asks of the storage.
pub enum Request<'r> {
    /// Move `transfer.len` bytes between the storage and `memory`.
    Transfer {
        transfer: Transfer,
        memory: &'r mut dyn TransferMemory,
    },
    /// Make every completed write durable ([`Storage::flush`]).
    Flush,
}

/// One request handed to an engine.
pub struct Submission<'r> {
    pub storage: &'r Arc<dyn Storage>,
    pub request: Request<'r>,
    /// Given back with the result when the request completes later.
    pub token: u64,
}

/// What became of a submission.
#[derive(Debug)]
pub enum Submitted {
    /// Carried out during the call (`memory` consumed as far as it went).
    Done(io::Result<()>),
    /// In flight: its result comes from [`Engine::reap`] with its token.
    /// The engine keeps the storage and the pinned memory until then.
    Queued,
}

/// An I/O engine serving one request queue (used by one thread at a time).
pub trait Engine: Send {
    /// Carries out or queues a transfer.
    fn submit(&mut self, submission: Submission<'_>) -> Submitted;

    /// Hands queued transfers to the kernel.
    fn push(&mut self) {}

    /// Passes every result that has arrived to `completed` (token, result);
    /// returns how many.
    fn reap(&mut self, _completed: &mut dyn FnMut(u64, io::Result<()>)) -> usize {
        0
    }

    /// As [`Engine::reap`], when results may have arrived during
    /// submission (reads the page cache answered at once): cheap when
    /// none could have.
    fn reap_inline(&mut self, _completed: &mut dyn FnMut(u64, io::Result<()>)) -> usize {
        0
    }

    /// Whether results are waiting to be reaped.
    fn has_completions(&mut self) -> bool {
        false
    }

    /// Transfers in flight.
    fn in_flight(&self) -> usize {
        0
    }

    /// No transfer can be queued until one completes ([`Engine::submit`]
    /// then carries transfers out synchronously).
    fn is_full(&self) -> bool {
        false
    }

    /// Most transfers in flight at once so far.
    fn peak(&self) -> usize {
        0
    }

    /// Waits for every transfer in flight, passing each result to
    /// `completed`. False if the engine failed with transfers still in
    /// flight (their memory then stays pinned for good).
    fn drain(&mut self, _completed: &mut dyn FnMut(u64, io::Result<()>)) -> bool {
        true
    }
}

/// Carries out `request` on `storage` synchronously.
pub fn run_sync(storage: &dyn Storage, request: Request<'_>) -> io::Result<()> {
    match request {
        Request::Transfer { transfer, memory } => transfer_sync(storage, transfer, memory),
        Request::Flush => storage.flush(),
    }
}

/// Carries out `transfer` on `storage` synchronously through `memory`,
/// in batches at the storage's granule.
pub fn transfer_sync(
    storage: &dyn Storage,
    transfer: Transfer,
    memory: &mut dyn TransferMemory,
) -> io::Result<()> {
    let granule = storage.transfer_granule();
    memory.transfer(
        transfer.len,
        granule,
        transfer.direction,
        &mut |bufs, done| {
            let offset = transfer.offset + done;
            match transfer.direction {
                Direction::Read => storage.read_vectored_at(bufs, offset),
                Direction::Write { durable } => {
                    storage.write_vectored_at(&bufs.as_source(), offset, durable)
                }
            }
        },
    )
}

/// The synchronous engine: every transfer is carried out in
/// [`Engine::submit`] (no completion ever comes later, so it has no
/// completion eventfd).
#[derive(Debug, Default)]
pub struct SyncEngine;

impl Engine for SyncEngine {
    fn submit(&mut self, submission: Submission<'_>) -> Submitted {
        Submitted::Done(run_sync(&**submission.storage, submission.request))
    }
}
