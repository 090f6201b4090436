//! Control queue: task management functions and asynchronous notification
//! queries (virtio 1.2 §5.6.6.2).
//!
//! Requests run to completion on their queue's worker thread, and before the
//! control queue's thread answers a TMF it first completes every request
//! available on the request queues it serves. With one worker thread (the
//! default) no command is therefore in the task set when a TMF is answered:
//! aborts, clears and resets find nothing to do and complete (FUNCTION
//! COMPLETE), and queries find no task (SAM-5 §7.6: FUNCTION COMPLETE means
//! "not in the task set"). With `--threads` > 1, a command may still be
//! executing on another thread when a TMF is answered; it completes normally
//! (the guest's driver ignores a completion for a command its error handler
//! already owns).
//!
//! A TMF addressed to a passthrough unit (`scsi/passthrough.rs`) is also
//! carried out at the remote unit, on the backend's session, after the
//! requests before it have completed: ABORT TASK (by the request's tag),
//! ABORT TASK SET and CLEAR TASK SET (as ABORT TASK SET), LOGICAL UNIT
//! RESET; its answer is the remote's. The remote establishes its own unit
//! attention for a reset.

use std::mem::size_of;

use virtio_bindings::virtio_scsi::{
    virtio_scsi_ctrl_an_req, virtio_scsi_ctrl_tmf_req, VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_FUNCTION_REJECTED, VIRTIO_SCSI_S_INCORRECT_LUN,
    VIRTIO_SCSI_S_OK, VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_TMF,
    VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_ABORT_TASK_SET, VIRTIO_SCSI_T_TMF_CLEAR_ACA,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
};

use vm_memory::ByteValued;

use super::answer::Answered;
use super::chain::SplitChain;
use super::request::saturate;
use super::wire::Wire;
use crate::scsi::{LunAddress, Target};
use crate::storage::remote::{TaskManagement, TaskManagementResponse};

/// How long a TMF forwarded to a remote unit is waited for.
const REMOTE_TMF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `virtio_scsi_ctrl_tmf_req`: `type`, `subtype`, `lun[8]`, `id`.
const TMF_REQ_LEN: usize = size_of::<virtio_scsi_ctrl_tmf_req>();
/// `virtio_scsi_ctrl_an_req`: `type`, `lun[8]`, `event_requested`.
const AN_REQ_LEN: usize = size_of::<virtio_scsi_ctrl_an_req>();

/// Why a control request was malformed; logged by the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ControlError {
    #[error("control request shorter than {0} bytes")]
    ShortRequest(usize),
    #[error("no room for the control response")]
    ShortResponse,
    #[error("unknown control request type {0}")]
    UnknownType(u32),
}

/// Handles one control request; returns the used length and the error if
/// the request was malformed.
pub(crate) fn handle_control(chain: SplitChain<'_>, target: &Target) -> Answered<ControlError> {
    let SplitChain {
        mut readable,
        mut writable,
        ..
    } = chain;
    // The larger of the two requests; both start with their type.
    let mut req = Wire::<virtio_scsi_ctrl_tmf_req>::default();
    let got = readable.read_into(req.as_mut_slice());
    if got < size_of::<u32>() {
        return fail(&mut writable, ControlError::ShortRequest(size_of::<u32>()));
    }
    match u32::from_le(req.0.type_) {
        VIRTIO_SCSI_T_TMF => {
            if got < TMF_REQ_LEN {
                return fail(&mut writable, ControlError::ShortRequest(TMF_REQ_LEN));
            }
            let response = task_management(
                target,
                u32::from_le(req.0.subtype),
                &req.0.lun,
                u64::from_le(req.0.tag),
            );
            // virtio_scsi_ctrl_tmf_resp: response.
            write_response(&mut writable, &[response as u8])
        }
        VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE => {
            if got < AN_REQ_LEN {
                return fail(&mut writable, ControlError::ShortRequest(AN_REQ_LEN));
            }
            let mut an = Wire::<virtio_scsi_ctrl_an_req>::default();
            an.as_mut_slice()
                .copy_from_slice(&req.as_slice()[..AN_REQ_LEN]);
            let response = if is_target_zero(&an.0.lun) {
                VIRTIO_SCSI_S_OK
            } else {
                VIRTIO_SCSI_S_BAD_TARGET
            };
            // virtio_scsi_ctrl_an_resp: event_actual (le32), response. No
            // asynchronous events are supported: event_actual is zero.
            let mut resp = [0u8; 5];
            resp[4] = response as u8;
            write_response(&mut writable, &resp)
        }
        other => fail(&mut writable, ControlError::UnknownType(other)),
    }
}

fn is_target_zero(lun: &[u8; 8]) -> bool {
    lun[0] == 1 && lun[1] == 0
}

/// The response code of a task management function (virtio 1.2 §5.6.6.2.1).
fn task_management(target: &Target, subtype: u32, lun: &[u8; 8], tag: u64) -> u32 {
    if !is_target_zero(lun) {
        return VIRTIO_SCSI_S_BAD_TARGET;
    }
    let mut sam_lun = [0u8; 8];
    sam_lun[..6].copy_from_slice(&lun[2..8]);
    let address = LunAddress::decode(&sam_lun);
    let lu_exists = match address {
        LunAddress::Lun(n) => target.has_unit(n),
        LunAddress::ReportLunsWlun => true,
        LunAddress::Unsupported => false,
    };
    let forwarded = match (address, subtype) {
        (LunAddress::Lun(n), VIRTIO_SCSI_T_TMF_ABORT_TASK) => {
            Some((n, TaskManagement::AbortTask { tag }))
        }
        (
            LunAddress::Lun(n),
            VIRTIO_SCSI_T_TMF_ABORT_TASK_SET | VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
        ) => Some((n, TaskManagement::AbortTaskSet)),
        (LunAddress::Lun(n), VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET) => {
            Some((n, TaskManagement::LogicalUnitReset))
        }
        _ => None,
    };
    if let Some((n, tmf)) = forwarded {
        match target.forward_task_management(n, tmf, REMOTE_TMF_TIMEOUT) {
            // VIRTIO_SCSI_S_FUNCTION_COMPLETE == VIRTIO_SCSI_S_OK == 0.
            Some(TaskManagementResponse::Complete) => return VIRTIO_SCSI_S_OK,
            Some(TaskManagementResponse::Rejected) => return VIRTIO_SCSI_S_FUNCTION_REJECTED,
            Some(TaskManagementResponse::Failed) => return VIRTIO_SCSI_S_FAILURE,
            None => {}
        }
    }
    match subtype {
        // Nexus-wide: does not name a logical unit. SAM-5 §7.8: every
        // unit establishes I_T NEXUS LOSS OCCURRED.
        VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET => {
            target.reset_nexus();
            VIRTIO_SCSI_S_OK
        }
        // SAM-5 §7.7: the unit establishes BUS DEVICE RESET FUNCTION
        // OCCURRED. (Its commands are already complete: the control queue
        // is served after the thread's transfers in flight.)
        VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET if lu_exists => {
            if let LunAddress::Lun(n) = address {
                target.reset_unit(n);
            }
            VIRTIO_SCSI_S_OK
        }
        VIRTIO_SCSI_T_TMF_ABORT_TASK
        | VIRTIO_SCSI_T_TMF_ABORT_TASK_SET
        | VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET
        | VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET
        | VIRTIO_SCSI_T_TMF_QUERY_TASK
        | VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => {
            if lu_exists {
                // FUNCTION COMPLETE (VIRTIO_SCSI_S_FUNCTION_COMPLETE == 0).
                VIRTIO_SCSI_S_OK
            } else {
                VIRTIO_SCSI_S_INCORRECT_LUN
            }
        }
        // ACA is not supported (NACA=1 CDBs are rejected), so there is
        // never an ACA condition to clear.
        VIRTIO_SCSI_T_TMF_CLEAR_ACA => VIRTIO_SCSI_S_FUNCTION_REJECTED,
        _ => VIRTIO_SCSI_S_FUNCTION_REJECTED,
    }
}

fn write_response(out: &mut super::sglist::SgList<'_, ()>, resp: &[u8]) -> Answered<ControlError> {
    let n = out.write_from(resp);
    if n < resp.len() {
        Answered::malformed(saturate(n), ControlError::ShortResponse)
    } else {
        Answered::ok(saturate(n))
    }
}

/// A malformed request: answer VIRTIO_SCSI_S_FAILURE in the first byte of
/// the response buffer if there is room (a TMF response is that one byte;
/// the request's type cannot be trusted to say more).
fn fail(out: &mut super::sglist::SgList<'_, ()>, error: ControlError) -> Answered<ControlError> {
    let n = out.write_from(&[VIRTIO_SCSI_S_FAILURE as u8]);
    Answered::malformed(saturate(n), error)
}
