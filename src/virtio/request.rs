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

use super::chain::SplitChain;
use super::sglist::{GuestDataIn, GuestDataOut, SgList};
use crate::scsi::{Completion, LunAddress, Target};

/// Bytes of the request header before the CDB.
pub const REQ_HEADER_LEN: usize = 8 + 8 + 3;
/// Bytes of the response header before the sense data.
pub const RESP_HEADER_LEN: usize = 4 + 4 + 2 + 1 + 1;
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
        let mut header = [0u8; RESP_HEADER_LEN];
        header[0..4].copy_from_slice(&self.sense_len.to_le_bytes());
        header[4..8].copy_from_slice(&self.residual.to_le_bytes());
        // status_qualifier stays zero.
        header[10] = self.status;
        header[11] = self.response;
        out.write_from(&header) + out.write_from(&self.sense[..sizes.sense])
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

/// Executes one command request. Returns the number of bytes written to the
/// device-writable part (the used-ring length), and the error if the
/// request was malformed.
pub fn handle_command(
    chain: SplitChain<'_>,
    target: &Target,
    sizes: Sizes,
) -> (u32, Option<RequestError>) {
    let SplitChain {
        mut readable,
        mut writable,
    } = chain;
    let resp_len = RESP_HEADER_LEN + sizes.sense;
    let Some(mut resp_area) = writable.split_front(resp_len) else {
        // Nowhere to put a response: complete the chain with nothing
        // written; the guest's driver sees a zero length.
        return (0, Some(RequestError::ShortResponse(resp_len)));
    };
    let mut data_in = writable;

    let req_len = REQ_HEADER_LEN + sizes.cdb;
    let mut header = [0u8; REQ_HEADER_LEN + MAX_CDB_SIZE as usize];
    if readable.read_into(&mut header[..req_len]) < req_len {
        let written = Response::new(VIRTIO_SCSI_S_FAILURE).write(&mut resp_area, sizes);
        return (saturate(written), Some(RequestError::ShortHeader(req_len)));
    }
    let mut data_out = readable;

    // virtio 1.2 §5.6.6.1.1: without VIRTIO_SCSI_F_INOUT a request with
    // both data-out and data-in is failed at once.
    if data_out.remaining() > 0 && data_in.remaining() > 0 {
        let written = Response::new(VIRTIO_SCSI_S_FAILURE).write(&mut resp_area, sizes);
        return (saturate(written), Some(RequestError::BidirectionalData));
    }

    let mut lun = [0u8; 8];
    lun.copy_from_slice(&header[0..8]);
    let cdb = &header[REQ_HEADER_LEN..req_len];

    // virtio 1.2 §5.6.6.1: lun[0] is 1, lun[1] the target, lun[2..4] a
    // single-level LUN. Only target 0 exists.
    let mut response = if lun[0] != 1 || lun[1] != 0 {
        Response::new(VIRTIO_SCSI_S_BAD_TARGET)
    } else {
        let mut sam_lun = [0u8; 8];
        sam_lun[..6].copy_from_slice(&lun[2..8]);
        let address = LunAddress::decode(&sam_lun);
        let completion = target.execute(
            address,
            cdb,
            &mut GuestDataIn(&mut data_in),
            &mut GuestDataOut(&mut data_out),
        );
        let mut r = Response::new(VIRTIO_SCSI_S_OK);
        r.status = completion.status();
        match completion {
            Completion::Good => {}
            Completion::CheckCondition(sense) => {
                let encoded = sense.encode();
                let bytes = encoded.as_slice();
                let n = bytes.len().min(sizes.sense);
                r.sense[..n].copy_from_slice(&bytes[..n]);
                r.sense_len = n as u32;
            }
            Completion::BufferTooSmall => {
                // virtio 1.2 §5.6.6.1: the CDB requires more data than the
                // data-in or data-out buffer holds.
                r = Response::new(VIRTIO_SCSI_S_OVERRUN);
            }
        }
        r
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
    (saturate(written), None)
}

/// A byte count as a 32-bit ring or header field (chains can describe more
/// than 4 GiB in total; such counts saturate).
pub fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
