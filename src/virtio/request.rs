//! Request queue: virtio-scsi command requests (virtio 1.2 §5.6.6.1).
//!
//! ```text
//! device-readable:  lun[8] id(le64) task_attr prio crn cdb[cdb_size] | data-out
//! device-writable:  sense_len(le32) residual(le32) status_qualifier(le16)
//!                   status response sense[sense_size]              | data-in
//! ```
//! Any part may be split across descriptors at any byte.

use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_OVERRUN,
};

use std::mem::offset_of;

use virtio_bindings::virtio_scsi::{virtio_scsi_cmd_req, virtio_scsi_cmd_resp};
use vm_memory::ByteValued;

use super::answer::Answered;
use super::chain::SplitChain;
use super::sglist::{GuestDataIn, GuestDataOut, SgList};
use super::wire::Wire;
use std::sync::Arc;
use std::time::Instant;

use crate::scsi::passthrough::Patch;
use crate::scsi::{Completion, Direction, Disk, LunAddress, Planned, Prepared, Target};
use crate::storage::remote::{DataDirection, RemoteOp, RemoteResult};
use crate::storage::{PinnedBufs, Request, Storage, TransferMemory};

/// Bytes of the request header before the CDB (virtio_scsi_cmd_req).
pub const REQ_HEADER_LEN: usize = offset_of!(virtio_scsi_cmd_req, cdb);
/// Bytes of the response header before the sense data
/// (virtio_scsi_cmd_resp).
pub const RESP_HEADER_LEN: usize = offset_of!(virtio_scsi_cmd_resp, sense);
/// Largest CDB and sense sizes the driver may configure (they size stack
/// buffers, so they are capped whatever the driver writes).
pub const MAX_CDB_SIZE: u32 = 256;
pub const MAX_SENSE_SIZE: u32 = 256;

/// CDB and sense sizes in force (virtio 1.2 §5.6.4: the driver may change
/// them in the configuration space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub cdb: usize,
    pub sense: usize,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            cdb: virtio_bindings::virtio_scsi::VIRTIO_SCSI_CDB_DEFAULT_SIZE as usize,
            sense: virtio_bindings::virtio_scsi::VIRTIO_SCSI_SENSE_DEFAULT_SIZE as usize,
        }
    }
}

/// The response header plus sense, as written back.
struct Response {
    sense_len: u32,
    residual: u32,
    status: u8,
    response: u8,
    sense: [u8; MAX_SENSE_SIZE as usize],
}

impl Response {
    fn new(response: u32) -> Self {
        Response {
            sense_len: 0,
            residual: 0,
            status: 0,
            response: response as u8,
            sense: [0; MAX_SENSE_SIZE as usize],
        }
    }

    /// Writes the response header and `sizes.sense` bytes of sense area.
    fn write(&self, out: &mut SgList<'_, ()>, sizes: Sizes) -> usize {
        let mut bytes = [0u8; RESP_HEADER_LEN + MAX_SENSE_SIZE as usize];
        let len = self.encode(&mut bytes, sizes);
        out.write_from(&bytes[..len])
    }

    /// The response header and `sizes.sense` bytes of sense area, as
    /// written back; returns their length.
    fn encode(
        &self,
        out: &mut [u8; RESP_HEADER_LEN + MAX_SENSE_SIZE as usize],
        sizes: Sizes,
    ) -> usize {
        let sense = sizes.sense.min(MAX_SENSE_SIZE as usize);
        let mut header = Wire::<virtio_scsi_cmd_resp>(virtio_scsi_cmd_resp::default());
        header.0.sense_len = self.sense_len.to_le();
        header.0.resid = self.residual.to_le();
        // status_qualifier stays zero.
        header.0.status = self.status;
        header.0.response = self.response;
        out[..RESP_HEADER_LEN].copy_from_slice(&header.as_slice()[..RESP_HEADER_LEN]);
        out[RESP_HEADER_LEN..RESP_HEADER_LEN + sense].copy_from_slice(&self.sense[..sense]);
        RESP_HEADER_LEN + sense
    }
}

/// Why a request could not be executed at all; logged by the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request header shorter than {0} bytes")]
    ShortHeader(usize),
    #[error("response buffer shorter than {0} bytes")]
    ShortResponse(usize),
    #[error("both data-out and data-in present without VIRTIO_SCSI_F_INOUT")]
    BidirectionalData,
}

/// Most pieces of a response area (12 + at most 256 sense bytes) pinned
/// for a response written after the transfer completes.
const MAX_RESPONSE_PIECES: usize = 16;

/// Most pieces of a data buffer pinned for a remote backend (Linux's
/// UIO_MAXIOV; a driver's chain has at most a queue's worth of
/// descriptors, 254 data segments for Linux's virtio-scsi).
const MAX_REMOTE_DATA_PIECES: usize = 1024;

/// How [`start_command`] left a request.
// Not boxed: the request path allocates nothing; the value lives on the
// stack for one request.
#[allow(clippy::large_enum_variant)]
pub enum Started<'a> {
    /// Answered.
    Done(Answered<RequestError>),
    /// A validated READ, WRITE or SYNCHRONIZE CACHE whose storage work is
    /// still to be done, by an engine ([`PendingCommand::request`]).
    Transfer(PendingCommand<'a>),
}

/// A READ, WRITE or SYNCHRONIZE CACHE whose response is written once its
/// storage work is done.
pub struct PendingCommand<'a> {
    /// The logical unit, held until the command is answered.
    pub unit: Arc<Disk>,
    /// When the command began.
    pub started: Instant,
    pub work: Planned,
    sizes: Sizes,
    resp_area: SgList<'a, ()>,
    /// Data-in for a read, data-out for a write; for a flush or a
    /// forwarded command, whichever the guest supplied (for a flush, its
    /// length is the residual).
    data: SgList<'a, ()>,
}

/// What is needed to answer a command whose result comes after its
/// [`PendingCommand`] is gone: kept while its work is in flight.
#[derive(Debug)]
pub struct TransferReply {
    pub unit: Arc<Disk>,
    pub started: Instant,
    pub work: Planned,
    pub sizes: Sizes,
    /// Bytes of the data buffer (data-in or data-out) the guest supplied.
    pub data_len: usize,
}

impl<'a> PendingCommand<'a> {
    /// The storage the command's work is carried out on (its unit's,
    /// borrowed: no reference count is taken per request), and the
    /// request that carries it out locally (a transfer moves bytes through
    /// the data buffer); `None` for a forwarded command, which only its
    /// storage's remote backend can carry out
    /// ([`PendingCommand::remote_op`]).
    pub fn request(&mut self) -> (&Arc<dyn Storage>, Option<Request<'_>>) {
        let request = match self.work {
            Planned::Transfer(transfer) => Some(Request::Transfer {
                transfer,
                memory: &mut self.data,
            }),
            Planned::Flush => Some(Request::Flush),
            Planned::Forward(_) => None,
        };
        (self.unit.storage(), request)
    }

    /// The work as a remote backend's op.
    pub fn remote_op(&self) -> RemoteOp {
        match self.work {
            Planned::Transfer(transfer) => match transfer.direction {
                Direction::Read => RemoteOp::Read {
                    offset: transfer.offset,
                    len: transfer.len,
                },
                Direction::Write { durable } => RemoteOp::Write {
                    offset: transfer.offset,
                    len: transfer.len,
                    durable,
                },
            },
            Planned::Flush => RemoteOp::Flush,
            Planned::Forward(forwarded) => RemoteOp::Scsi {
                cdb: forwarded.cdb,
                direction: forwarded.direction,
                len: forwarded.len,
                tag: forwarded.tag,
            },
        }
    }

    /// Pins the data buffer a remote op moves (all of a transfer's or a
    /// forwarded command's, none of a flush's) into `out`; false if it is
    /// cut into more than [`MAX_REMOTE_DATA_PIECES`].
    pub fn pin_data(&self, out: &mut PinnedBufs) -> bool {
        let len = match self.work {
            Planned::Transfer(transfer) => transfer.len,
            Planned::Forward(forwarded) => forwarded.len,
            Planned::Flush => {
                out.release();
                return true;
            }
        };
        if len == 0 {
            out.release();
            return true;
        }
        self.data.pin(len, MAX_REMOTE_DATA_PIECES, out)
    }

    /// Pins the head of a forwarded command's data-in that its patch
    /// rewrites into `out`: false if there is no patch (or it cannot be
    /// pinned; the data then goes to the guest unpatched).
    pub fn pin_patch(&self, out: &mut PinnedBufs) -> bool {
        let span = match self.work {
            Planned::Forward(forwarded) => forwarded.patch.span(),
            _ => 0,
        };
        let span = span.min(self.data.remaining());
        if span == 0 {
            out.release();
            return false;
        }
        self.data.pin(span, MAX_RESPONSE_PIECES, out)
    }

    /// Answers the command with the result of its work, carried out
    /// through [`PendingCommand::request`] (a transfer's data buffer counts
    /// what was moved), or of a remote op that never started.
    pub fn answer(mut self, result: RemoteResult) -> Answered<RequestError> {
        let completion = Target::finish_work(&self.unit, &self.work, self.started, result);
        let response = response_for(completion, self.sizes, self.data.remaining());
        let written = response.write(&mut self.resp_area, self.sizes) + self.data_in_written();
        Answered::ok(saturate(written))
    }

    fn data_in_written(&self) -> usize {
        match self.work {
            Planned::Transfer(transfer) if transfer.direction == Direction::Read => {
                self.data.consumed()
            }
            _ => 0,
        }
    }

    /// Pins the response area into `out`, for [`finish_transfer`] to write
    /// once the transfer is done; false if it cannot be (cut into more
    /// than a response's worth of pieces).
    pub fn pin_response(&self, out: &mut PinnedBufs) -> bool {
        self.resp_area
            .pin(self.resp_area.remaining(), MAX_RESPONSE_PIECES, out)
    }

    /// What answering the command later needs.
    pub fn into_reply(self) -> TransferReply {
        TransferReply {
            unit: self.unit,
            started: self.started,
            work: self.work,
            sizes: self.sizes,
            data_len: self.data.remaining(),
        }
    }
}

/// Writes the response of work completed after its [`PendingCommand`]
/// was gone (all of a transfer moved if `result` is Ok; what the remote
/// says it moved for a forwarded command) into the response area pinned
/// in `resp`; returns the used length. A forwarded command's data-in is
/// patched first through `patch`, its head pinned by
/// [`PendingCommand::pin_patch`] (empty: no patch).
pub fn finish_transfer(
    reply: &TransferReply,
    result: RemoteResult,
    resp: &mut PinnedBufs,
    patch: &mut PinnedBufs,
) -> u32 {
    let (transferred, data_in) = match (&reply.work, &result) {
        (Planned::Transfer(transfer), RemoteResult::Io(Ok(()))) => {
            (transfer.len, transfer.direction == Direction::Read)
        }
        (Planned::Forward(forwarded), RemoteResult::Scsi(Ok(outcome))) => {
            // Never more than the buffer, whatever the backend says.
            let moved = outcome.transferred.min(forwarded.len).min(reply.data_len);
            let data_in = forwarded.direction == DataDirection::FromDevice;
            if data_in {
                apply_patch(&forwarded.patch, patch, moved);
            }
            (moved, data_in)
        }
        _ => (0, false),
    };
    let completion = Target::finish_work(&reply.unit, &reply.work, reply.started, result);
    let response = response_for(
        completion,
        reply.sizes,
        reply.data_len.saturating_sub(transferred),
    );
    let mut bytes = [0u8; RESP_HEADER_LEN + MAX_SENSE_SIZE as usize];
    let len = response.encode(&mut bytes, reply.sizes);
    let written = resp.fill_from(&bytes[..len]);
    saturate(written + if data_in { transferred } else { 0 })
}

/// Rewrites the pinned head of a forwarded command's data-in (of which
/// `moved` bytes arrived) as `patch` says.
fn apply_patch(patch: &Patch, head: &mut PinnedBufs, moved: usize) {
    let mut bytes = [0u8; 16];
    let span = patch.span().min(bytes.len());
    if span == 0 {
        return;
    }
    let mut bufs = head.borrow_mut();
    let n = bufs.gather_into(&mut bytes[..span]);
    patch.apply(&mut bytes[..n], moved);
    bufs.fill_from(&bytes[..n]);
}

/// The response for a command's completion; `residual` is the part of the
/// data buffer not transferred.
fn response_for(completion: Completion, sizes: Sizes, residual: usize) -> Response {
    let mut r = Response::new(VIRTIO_SCSI_S_OK);
    r.status = completion.status();
    let mut sense = |bytes: &[u8]| {
        let n = bytes.len().min(sizes.sense);
        r.sense[..n].copy_from_slice(&bytes[..n]);
        r.sense_len = n as u32;
    };
    match completion {
        Completion::Good => {}
        Completion::CheckCondition(data) => sense(data.encode().as_slice()),
        Completion::Forwarded(outcome) => sense(outcome.sense()),
        Completion::BufferTooSmall => {
            // virtio 1.2 §5.6.6.1: the CDB requires more data than the
            // data-in or data-out buffer holds.
            r = Response::new(VIRTIO_SCSI_S_OVERRUN);
        }
    }
    r.residual = saturate(residual);
    r
}

/// Which asynchronous transfers must end before a command runs
/// synchronously (see [`start_command`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncBarrier {
    /// Those of the calling thread: they must not wait behind it.
    OwnThread,
    /// Every thread's: the command waits until none is left on its unit.
    AllThreads,
}

/// Parses one command request and runs it, except that a READ or WRITE is
/// only validated and planned: its transfer is handed over to the caller
/// ([`Started::Transfer`]). `before_sync` is called before a command
/// touches the storage synchronously.
pub fn start_command<'a>(
    chain: SplitChain<'a>,
    target: &Target,
    sizes: Sizes,
    before_sync: &mut dyn FnMut(SyncBarrier),
) -> Started<'a> {
    let SplitChain {
        mut readable,
        mut writable,
        ..
    } = chain;
    let resp_len = RESP_HEADER_LEN + sizes.sense;
    let Some(mut resp_area) = writable.split_front(resp_len) else {
        // Nowhere to put a response: complete the chain with nothing
        // written; the guest's driver sees a zero length.
        return Started::Done(Answered::malformed(
            0,
            RequestError::ShortResponse(resp_len),
        ));
    };
    let mut data_in = writable;

    let req_len = REQ_HEADER_LEN + sizes.cdb;
    let mut header = [0u8; REQ_HEADER_LEN + MAX_CDB_SIZE as usize];
    if readable.read_into(&mut header[..req_len]) < req_len {
        let written = Response::new(VIRTIO_SCSI_S_FAILURE).write(&mut resp_area, sizes);
        return Started::Done(Answered::malformed(
            saturate(written),
            RequestError::ShortHeader(req_len),
        ));
    }
    let mut data_out = readable;

    // virtio 1.2 §5.6.6.1.1: without VIRTIO_SCSI_F_INOUT a request with
    // both data-out and data-in is failed at once.
    if data_out.remaining() > 0 && data_in.remaining() > 0 {
        let written = Response::new(VIRTIO_SCSI_S_FAILURE).write(&mut resp_area, sizes);
        return Started::Done(Answered::malformed(
            saturate(written),
            RequestError::BidirectionalData,
        ));
    }

    let mut lun = [0u8; 8];
    let lun_at = offset_of!(virtio_scsi_cmd_req, lun);
    lun.copy_from_slice(&header[lun_at..lun_at + 8]);
    let cdb = &header[REQ_HEADER_LEN..req_len];

    // virtio 1.2 §5.6.6.1: lun[0] is 1, lun[1] the target, lun[2..4] a
    // single-level LUN. Only target 0 exists.
    let mut response = if lun[0] != 1 || lun[1] != 0 {
        Response::new(VIRTIO_SCSI_S_BAD_TARGET)
    } else {
        let mut sam_lun = [0u8; 8];
        sam_lun[..6].copy_from_slice(&lun[2..8]);
        let address = LunAddress::decode(&sam_lun);
        // READ and WRITE go through the same plan-transfer-finish steps
        // whichever engine does the transfer, so all answer alike.
        let tag_at = offset_of!(virtio_scsi_cmd_req, tag);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&header[tag_at..tag_at + 8]);
        let prepared = target.prepare(
            address,
            cdb,
            u64::from_le_bytes(tag),
            data_in.remaining(),
            data_out.remaining(),
        );
        let completion = match prepared {
            Prepared::HandOver {
                unit,
                work,
                started,
            } => {
                let data = match work {
                    Planned::Transfer(transfer) => match transfer.direction {
                        Direction::Read => data_in,
                        Direction::Write { .. } => data_out,
                    },
                    Planned::Flush | Planned::Forward(_) => {
                        if work == Planned::Flush {
                            // SYNCHRONIZE CACHE covers every transfer this
                            // thread has in flight: they complete first.
                            before_sync(SyncBarrier::OwnThread);
                        }
                        // Whichever buffer the guest supplied (at most one,
                        // without VIRTIO_SCSI_F_INOUT).
                        if data_in.remaining() > 0 {
                            data_in
                        } else {
                            data_out
                        }
                    }
                };
                return Started::Transfer(PendingCommand {
                    unit,
                    started,
                    work,
                    sizes,
                    resp_area,
                    data,
                });
            }
            Prepared::Complete(completion) => completion,
            Prepared::Execute | Prepared::ExecuteExclusive => {
                before_sync(if matches!(prepared, Prepared::ExecuteExclusive) {
                    SyncBarrier::AllThreads
                } else {
                    SyncBarrier::OwnThread
                });
                target.execute(
                    address,
                    cdb,
                    &mut GuestDataIn(&mut data_in),
                    &mut GuestDataOut(&mut data_out),
                )
            }
        };
        response_for(completion, sizes, 0)
    };
    // Residual: the part of the data buffer not transferred.
    let data_in_written = data_in.consumed();
    let residual = if data_in_written > 0 || data_in.remaining() > 0 {
        data_in.remaining()
    } else {
        data_out.remaining()
    };
    response.residual = saturate(residual);
    let written = response.write(&mut resp_area, sizes) + data_in_written;
    Started::Done(Answered::ok(saturate(written)))
}

/// A byte count as a 32-bit ring or header field (chains can describe more
/// than 4 GiB in total; such counts saturate).
pub fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
