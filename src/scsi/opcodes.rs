//! REPORT SUPPORTED OPERATION CODES and REPORT SUPPORTED TASK MANAGEMENT
//! FUNCTIONS (SPC-4 §6.35, §6.36): what the target implements, with CDB
//! usage data matching what [`super::cdb::Command::parse`] evaluates.

use super::cdb::{opcode::*, service_action, ReportOpcodes};
use super::error::{CommandError, CommandResult};

/// One supported command.
struct OpcodeInfo {
    opcode: u8,
    service_action: Option<u16>,
    /// CDB usage data (SPC-4 §6.35.3): byte 0 is the opcode (and, where the
    /// command has one, the service action sits in its field); each other
    /// byte has a one for every bit the device server evaluates.
    usage: &'static [u8],
    /// Only supported where thin provisioning (discard) is offered.
    needs_discard: bool,
}

const fn op(opcode: u8, usage: &'static [u8]) -> OpcodeInfo {
    OpcodeInfo {
        opcode,
        service_action: None,
        usage,
        needs_discard: false,
    }
}

const fn op_sa(opcode: u8, sa: u16, usage: &'static [u8]) -> OpcodeInfo {
    OpcodeInfo {
        opcode,
        service_action: Some(sa),
        usage,
        needs_discard: false,
    }
}

const fn thin(info: OpcodeInfo) -> OpcodeInfo {
    OpcodeInfo {
        needs_discard: true,
        ..info
    }
}

const FF: u8 = 0xff;
/// Control byte: NACA is evaluated (and rejected).
const CTL: u8 = 0x04;
/// Byte 1 of VERIFY(10/12/16) (SBC-3 §5.33-5.35): VRPROTECT (rejected
/// unless zero), DPO (accepted; a hint about caching the host page cache
/// does not take) and BYTCHK.
const VERIFY_BYTE1: u8 = 0xf6;
/// Byte 1 of WRITE AND VERIFY(10/12/16) (SBC-3 §5.38-5.40): WRPROTECT,
/// DPO (accepted, as for VERIFY) and BYTCHK.
const WV_BYTE1: u8 = 0xf6;

/// Sorted by opcode, then service action.
static SUPPORTED: &[OpcodeInfo] = &[
    op(TEST_UNIT_READY, &[TEST_UNIT_READY, 0, 0, 0, 0, CTL]),
    op(REQUEST_SENSE, &[REQUEST_SENSE, 0x01, 0, 0, FF, CTL]),
    op(READ_6, &[READ_6, 0x1f, FF, FF, FF, CTL]),
    op(WRITE_6, &[WRITE_6, 0x1f, FF, FF, FF, CTL]),
    op(INQUIRY, &[INQUIRY, 0x03, FF, FF, FF, CTL]),
    op(MODE_SELECT_6, &[MODE_SELECT_6, 0x11, 0, 0, FF, CTL]),
    op(MODE_SENSE_6, &[MODE_SENSE_6, 0x08, FF, FF, FF, CTL]),
    op(START_STOP_UNIT, &[START_STOP_UNIT, 0, 0, 0, 0, CTL]),
    op(
        PREVENT_ALLOW_MEDIUM_REMOVAL,
        &[PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0, CTL],
    ),
    op(
        READ_CAPACITY_10,
        &[READ_CAPACITY_10, 0, FF, FF, FF, FF, 0, 0, 0x01, CTL],
    ),
    op(READ_10, &[READ_10, 0xe8, FF, FF, FF, FF, 0, FF, FF, CTL]),
    op(WRITE_10, &[WRITE_10, 0xe8, FF, FF, FF, FF, 0, FF, FF, CTL]),
    op(
        WRITE_AND_VERIFY_10,
        &[
            WRITE_AND_VERIFY_10,
            WV_BYTE1,
            FF,
            FF,
            FF,
            FF,
            0,
            FF,
            FF,
            CTL,
        ],
    ),
    op(
        VERIFY_10,
        &[VERIFY_10, VERIFY_BYTE1, FF, FF, FF, FF, 0, FF, FF, CTL],
    ),
    op(
        SYNCHRONIZE_CACHE_10,
        &[SYNCHRONIZE_CACHE_10, 0, FF, FF, FF, FF, 0, FF, FF, CTL],
    ),
    op(
        WRITE_SAME_10,
        &[WRITE_SAME_10, 0xf8, FF, FF, FF, FF, 0, FF, FF, CTL],
    ),
    thin(op(UNMAP, &[UNMAP, 0x01, 0, 0, 0, 0, 0, FF, FF, CTL])),
    op(
        MODE_SELECT_10,
        &[MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, FF, FF, CTL],
    ),
    op(
        MODE_SENSE_10,
        &[MODE_SENSE_10, 0x18, FF, FF, 0, 0, 0, FF, FF, CTL],
    ),
    op(
        READ_16,
        &[
            READ_16, 0xe8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL,
        ],
    ),
    op(
        COMPARE_AND_WRITE,
        &[
            COMPARE_AND_WRITE,
            0xe8,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
            0,
            FF,
            0,
            CTL,
        ],
    ),
    op(
        WRITE_16,
        &[
            WRITE_16, 0xe8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL,
        ],
    ),
    op(
        WRITE_AND_VERIFY_16,
        &[
            WRITE_AND_VERIFY_16,
            WV_BYTE1,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    ),
    op(
        VERIFY_16,
        &[
            VERIFY_16,
            VERIFY_BYTE1,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    ),
    op(
        SYNCHRONIZE_CACHE_16,
        &[
            SYNCHRONIZE_CACHE_16,
            0,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    ),
    op(
        WRITE_SAME_16,
        &[
            WRITE_SAME_16,
            0xf9,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    ),
    op_sa(
        SERVICE_ACTION_IN_16,
        service_action::READ_CAPACITY_16,
        &[
            SERVICE_ACTION_IN_16,
            service_action::READ_CAPACITY_16 as u8,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    ),
    thin(op_sa(
        SERVICE_ACTION_IN_16,
        service_action::GET_LBA_STATUS,
        &[
            SERVICE_ACTION_IN_16,
            service_action::GET_LBA_STATUS as u8,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    )),
    op(
        REPORT_LUNS,
        &[REPORT_LUNS, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, CTL],
    ),
    op_sa(
        MAINTENANCE_IN,
        service_action::REPORT_SUPPORTED_OPERATION_CODES,
        &[
            MAINTENANCE_IN,
            service_action::REPORT_SUPPORTED_OPERATION_CODES as u8,
            0x87,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    ),
    op_sa(
        MAINTENANCE_IN,
        service_action::REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
        &[
            MAINTENANCE_IN,
            service_action::REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS as u8,
            0x80,
            0,
            0,
            0,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    ),
    op(
        READ_12,
        &[READ_12, 0xe8, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL],
    ),
    op(
        WRITE_12,
        &[WRITE_12, 0xe8, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL],
    ),
    op(
        WRITE_AND_VERIFY_12,
        &[
            WRITE_AND_VERIFY_12,
            WV_BYTE1,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    ),
    op(
        VERIFY_12,
        &[
            VERIFY_12,
            VERIFY_BYTE1,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
    ),
];

/// Command timeouts descriptor (SPC-4 §6.35.4): length 0x0a, no values
/// (zero means "not specified").
const TIMEOUTS_DESCRIPTOR: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn has_service_actions(opcode: u8) -> bool {
    SUPPORTED
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// The commands a logical unit supports, given whether it offers discard.
fn supported(discard: bool) -> impl Iterator<Item = &'static OpcodeInfo> + Clone {
    SUPPORTED
        .iter()
        .filter(move |c| discard || !c.needs_discard)
}

/// Parameter data for REPORT SUPPORTED OPERATION CODES.
pub(crate) fn report_supported_opcodes(
    req: &ReportOpcodes,
    discard: bool,
) -> CommandResult<Vec<u8>> {
    let mut out = Vec::new();
    match req.options {
        // All commands (SPC-4 §6.35.2, table 262).
        0 => {
            let descriptor_len = if req.rctd { 20 } else { 8 };
            let total = supported(discard).count() * descriptor_len;
            out.extend_from_slice(&(total as u32).to_be_bytes());
            for c in supported(discard) {
                out.push(c.opcode);
                out.push(0);
                out.extend_from_slice(&c.service_action.unwrap_or(0).to_be_bytes());
                out.push(0);
                out.push((if req.rctd { 0x02 } else { 0 }) | u8::from(c.service_action.is_some()));
                out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                if req.rctd {
                    out.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
                }
            }
        }
        // One command (SPC-4 §6.35.3, table 264).
        1..=3 => {
            let with_sa = has_service_actions(req.opcode);
            let found = match req.options {
                1 if with_sa => return Err(CommandError::field_bit(2, 2)),
                1 => supported(discard).find(|c| c.opcode == req.opcode),
                // SPC-4 §6.35.2, table 263: option 010b on a command this
                // logical unit supports without service actions is an
                // invalid field; one it does not support is SUPPORT 001b.
                2 if !with_sa && supported(discard).any(|c| c.opcode == req.opcode) => {
                    return Err(CommandError::field_bit(2, 2))
                }
                _ if with_sa => supported(discard).find(|c| {
                    c.opcode == req.opcode && c.service_action == Some(req.service_action)
                }),
                _ => supported(discard).find(|c| c.opcode == req.opcode),
            };
            out.push(0);
            match found {
                Some(c) => {
                    // SUPPORT 011b: supported in conformance with a standard.
                    out.push(0x03 | if req.rctd { 0x80 } else { 0 });
                    out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                    out.extend_from_slice(c.usage);
                    if req.rctd {
                        out.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
                    }
                }
                None => {
                    // SUPPORT 001b: not supported; no usage data.
                    out.push(0x01);
                    out.extend_from_slice(&[0, 0]);
                }
            }
        }
        _ => return Err(CommandError::field_bit(2, 2)),
    }
    Ok(out)
}

/// Parameter data for REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4
/// §6.36): ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET,
/// QUERY TASK, QUERY TASK SET and I_T NEXUS RESET are answered on the
/// control queue.
pub(crate) fn report_supported_tmfs(repd: bool) -> Vec<u8> {
    // ATS | ATSS | CTSS | LURS | QTS
    let byte0 = 0x80 | 0x40 | 0x10 | 0x08 | 0x04;
    // QTSS | ITNRS
    let byte1 = 0x02 | 0x01;
    if repd {
        let mut out = vec![0u8; 16];
        out[0] = byte0;
        out[1] = byte1;
        out[3] = 0x0c;
        out
    } else {
        vec![byte0, byte1, 0, 0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::{cdb_length, Command};

    fn req(options: u8, opcode: u8, sa: u16) -> ReportOpcodes {
        ReportOpcodes {
            rctd: false,
            options,
            opcode,
            service_action: sa,
            alloc_len: 4096,
        }
    }

    #[test]
    fn table_is_consistent_with_the_parser() {
        for c in SUPPORTED {
            assert_eq!(c.usage[0], c.opcode);
            assert_eq!(c.usage.len(), cdb_length(c.opcode), "{:#x}", c.opcode);
            // A CDB holding only the opcode (and service action) parses.
            let mut cdb = vec![0u8; c.usage.len()];
            cdb[0] = c.opcode;
            if let Some(sa) = c.service_action {
                cdb[1] = sa as u8;
            }
            let parsed = Command::parse(&cdb);
            assert!(
                !matches!(parsed, Err(CommandError::InvalidOpcode(_))),
                "{:#x} listed but not parsed",
                c.opcode
            );
        }
        let sorted = SUPPORTED
            .windows(2)
            .all(|w| (w[0].opcode, w[0].service_action) < (w[1].opcode, w[1].service_action));
        assert!(sorted);
    }

    #[test]
    fn all_commands_listing() {
        let out = report_supported_opcodes(&req(0, 0, 0), true).unwrap();
        let len = u32::from_be_bytes(out[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, SUPPORTED.len() * 8);
        assert_eq!(out.len(), 4 + len);
        // READ CAPACITY(16) has SERVACTV set.
        let rc16 = out[4..].chunks(8).find(|d| d[0] == 0x9e).unwrap();
        assert_eq!(rc16[3], 0x10);
        assert_eq!(rc16[5], 0x01);
        assert_eq!(u16::from_be_bytes([rc16[6], rc16[7]]), 16);
    }

    #[test]
    fn all_commands_with_timeouts() {
        let mut r = req(0, 0, 0);
        r.rctd = true;
        let out = report_supported_opcodes(&r, true).unwrap();
        assert_eq!(out.len(), 4 + SUPPORTED.len() * 20);
        assert_eq!(out[4 + 5] & 0x02, 0x02);
    }

    #[test]
    fn one_command() {
        let out = report_supported_opcodes(&req(1, 0x28, 0), true).unwrap();
        assert_eq!(out[1] & 0x07, 3);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]), 10);
        assert_eq!(out[4], 0x28);
        let out = report_supported_opcodes(&req(1, 0x44, 0), true).unwrap();
        assert_eq!(out[1] & 0x07, 1);
        // UNMAP only where discard is offered.
        let out = report_supported_opcodes(&req(1, 0x42, 0), true).unwrap();
        assert_eq!(out[1] & 0x07, 3);
        let out = report_supported_opcodes(&req(1, 0x42, 0), false).unwrap();
        assert_eq!(out[1] & 0x07, 1);
        let all = report_supported_opcodes(&req(0, 0, 0), false).unwrap();
        assert!(!all[4..].chunks(8).any(|d| d[0] == 0x42));
        assert!(!all[4..].chunks(8).any(|d| d[0] == 0x9e && d[3] == 0x12));
    }

    #[test]
    fn one_command_service_action_rules() {
        // Option 1 on an opcode with service actions is an invalid field.
        assert!(report_supported_opcodes(&req(1, 0x9e, 0), true).is_err());
        let out = report_supported_opcodes(&req(2, 0x9e, 0x10), true).unwrap();
        assert_eq!(out[1] & 0x07, 3);
        let out = report_supported_opcodes(&req(2, 0x9e, 0x13), true).unwrap();
        assert_eq!(out[1] & 0x07, 1);
        // Option 2 on an opcode without service actions is an invalid field,
        // unless this logical unit does not support it.
        assert!(report_supported_opcodes(&req(2, 0x28, 0), true).is_err());
        assert!(report_supported_opcodes(&req(2, 0x42, 0), true).is_err());
        let out = report_supported_opcodes(&req(2, 0x42, 0), false).unwrap();
        assert_eq!(out, [0, 0x01, 0, 0]);
        // Option 3 ignores the service action where there is none.
        let out = report_supported_opcodes(&req(3, 0x28, 7), true).unwrap();
        assert_eq!(out[1] & 0x07, 3);
        assert!(report_supported_opcodes(&req(4, 0x28, 0), true).is_err());
    }

    #[test]
    fn tmf_bits() {
        assert_eq!(report_supported_tmfs(false), vec![0xdc, 0x03, 0, 0]);
        let ext = report_supported_tmfs(true);
        assert_eq!(ext.len(), 16);
        assert_eq!(ext[3], 0x0c);
    }
}
