//! Command descriptor blocks: one typed value per supported command, parsed
//! from untrusted bytes without panicking.
//!
//! Field offsets follow SPC-4 (§6: INQUIRY, MODE SENSE, REPORT LUNS, REQUEST
//! SENSE, REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS, TEST
//! UNIT READY) and SBC-3 (§5: READ, WRITE, VERIFY, READ CAPACITY, SYNCHRONIZE
//! CACHE, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL).

use super::error::{CommandError, CommandResult};

/// Operation codes the target recognises.
pub(crate) mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
}

/// Service actions of SERVICE ACTION IN(16) and MAINTENANCE IN.
pub(crate) mod service_action {
    pub(crate) const READ_CAPACITY_16: u16 = 0x10;
    pub(crate) const GET_LBA_STATUS: u16 = 0x12;
    pub(crate) const REPORT_SUPPORTED_OPERATION_CODES: u16 = 0x0c;
    pub(crate) const REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS: u16 = 0x0d;
}

/// Page control field of MODE SENSE (SPC-4 §6.11, table 157).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

/// A logical block range from a READ/WRITE/VERIFY/SYNCHRONIZE CACHE CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub lba: u64,
    pub blocks: u32,
    /// CDB byte holding the transfer length, for the sense field pointer.
    pub length_field: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeSense {
    /// MODE SENSE(10) rather than (6).
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub pc: PageControl,
    pub page: u8,
    pub subpage: u8,
    pub alloc_len: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportOpcodes {
    pub rctd: bool,
    pub options: u8,
    pub opcode: u8,
    pub service_action: u16,
    pub alloc_len: u32,
}

/// A parsed CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc_len: u8,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc_len: u16,
    },
    ModeSense(ModeSense),
    StartStopUnit,
    PreventAllowMediumRemoval,
    ReadCapacity10,
    ReadCapacity16 {
        alloc_len: u32,
    },
    /// READ(6/10/12/16).
    Read {
        range: BlockRange,
        /// Force unit access: cached writes to the range reach the medium
        /// before it is read (SBC-3 §5.11, table 38).
        fua: bool,
    },
    /// WRITE, or WRITE AND VERIFY (`verify`).
    Write {
        range: BlockRange,
        /// Force unit access: durable at completion.
        fua: bool,
        verify: bool,
        /// WRITE AND VERIFY with BYTCHK 01b: the medium is compared byte by
        /// byte with the data-out after the write (SBC-3 §5.38).
        bytchk: bool,
    },
    /// WRITE SAME(10/16): one block of data-out (or zeroes with NDOB)
    /// written to every block of the range, or the range unmapped.
    WriteSame {
        range: BlockRange,
        unmap: bool,
        ndob: bool,
    },
    Unmap {
        param_len: u16,
    },
    GetLbaStatus {
        lba: u64,
        alloc_len: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u8,
        fua: bool,
    },
    ModeSelect {
        ten: bool,
        param_len: u16,
    },
    Verify {
        range: BlockRange,
        bytchk: u8,
    },
    SynchronizeCache(BlockRange),
    ReportLuns {
        select_report: u8,
        alloc_len: u32,
    },
    ReportSupportedOpcodes(ReportOpcodes),
    ReportSupportedTmfs {
        repd: bool,
        alloc_len: u32,
    },
}

/// Read access to CDB bytes; bytes past the end read as zero, so no index
/// can panic whatever the initiator sent.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }
    fn be(&self, start: usize, len: usize) -> u64 {
        (start..start + len).fold(0u64, |acc, i| (acc << 8) | u64::from(self.u8(i)))
    }
    fn u16(&self, i: usize) -> u16 {
        self.be(i, 2) as u16
    }
    fn u32(&self, i: usize) -> u32 {
        self.be(i, 4) as u32
    }
    fn u64(&self, i: usize) -> u64 {
        self.be(i, 8)
    }
}

/// CDB length implied by the operation code's group (SPC-4 §4.2.5.1).
pub(crate) fn cdb_length(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 0,
    }
}

impl Command {
    /// Parses a CDB. Unknown operation codes give INVALID COMMAND OPERATION
    /// CODE; bad fields give INVALID FIELD IN CDB pointing at the field.
    pub fn parse(cdb: &[u8]) -> CommandResult<Command> {
        use opcode::*;
        let b = Bytes(cdb);
        let op = b.u8(0);
        let len = cdb_length(op);
        let cmd = match op {
            TEST_UNIT_READY => Command::TestUnitReady,
            REQUEST_SENSE => Command::RequestSense {
                desc: b.u8(1) & 0x01 != 0,
                alloc_len: b.u8(4),
            },
            INQUIRY => {
                // CMDDT is obsolete (SPC-4 §6.6): reject it set.
                if b.u8(1) & 0x02 != 0 {
                    return Err(CommandError::field_bit(1, 1));
                }
                let evpd = b.u8(1) & 0x01 != 0;
                if !evpd && b.u8(2) != 0 {
                    return Err(CommandError::field(2));
                }
                Command::Inquiry {
                    evpd,
                    page: b.u8(2),
                    alloc_len: b.u16(3),
                }
            }
            MODE_SENSE_6 | MODE_SENSE_10 => {
                let ten = op == MODE_SENSE_10;
                Command::ModeSense(ModeSense {
                    ten,
                    dbd: b.u8(1) & 0x08 != 0,
                    llbaa: ten && b.u8(1) & 0x10 != 0,
                    pc: match b.u8(2) >> 6 {
                        0 => PageControl::Current,
                        1 => PageControl::Changeable,
                        2 => PageControl::Default,
                        _ => PageControl::Saved,
                    },
                    page: b.u8(2) & 0x3f,
                    subpage: b.u8(3),
                    alloc_len: if ten { b.u16(7) } else { u16::from(b.u8(4)) },
                })
            }
            START_STOP_UNIT => Command::StartStopUnit,
            PREVENT_ALLOW_MEDIUM_REMOVAL => Command::PreventAllowMediumRemoval,
            READ_CAPACITY_10 => {
                // SBC-3 §5.15: with PMI=0 the LBA field shall be zero.
                if b.u8(8) & 0x01 == 0 && b.u32(2) != 0 {
                    return Err(CommandError::field(2));
                }
                Command::ReadCapacity10
            }
            SERVICE_ACTION_IN_16 => match u16::from(b.u8(1) & 0x1f) {
                service_action::READ_CAPACITY_16 => Command::ReadCapacity16 {
                    alloc_len: b.u32(10),
                },
                service_action::GET_LBA_STATUS => Command::GetLbaStatus {
                    lba: b.u64(2),
                    alloc_len: b.u32(10),
                },
                _ => return Err(CommandError::field_bit(1, 4)),
            },
            READ_6 | WRITE_6 => {
                // SBC-3 §5.8: a transfer length of zero means 256 blocks.
                let blocks = match b.u8(4) {
                    0 => 256,
                    n => u32::from(n),
                };
                let range = BlockRange {
                    lba: u64::from(b.u8(1) & 0x1f) << 16 | u64::from(b.u16(2)),
                    blocks,
                    length_field: 4,
                };
                if op == READ_6 {
                    Command::Read { range, fua: false }
                } else {
                    Command::Write {
                        range,
                        fua: false,
                        verify: false,
                        bytchk: false,
                    }
                }
            }
            READ_10 | READ_12 | READ_16 => Command::Read {
                range: protected_range(&b, op)?,
                fua: b.u8(1) & 0x08 != 0,
            },
            WRITE_10 | WRITE_12 | WRITE_16 => Command::Write {
                range: protected_range(&b, op)?,
                fua: b.u8(1) & 0x08 != 0,
                verify: false,
                bytchk: false,
            },
            WRITE_AND_VERIFY_10 | WRITE_AND_VERIFY_12 | WRITE_AND_VERIFY_16 => {
                let range = protected_range(&b, op)?;
                // SBC-3 §5.38-5.40, BYTCHK (byte 1 bits 2-1): 00b verify
                // the medium, 01b compare it with the data-out; 10b and
                // 11b are reserved.
                let bytchk = match (b.u8(1) >> 1) & 0x03 {
                    0 => false,
                    1 => true,
                    _ => return Err(CommandError::field_bit(1, 2)),
                };
                Command::Write {
                    range,
                    fua: false,
                    verify: true,
                    bytchk,
                }
            }
            WRITE_SAME_10 | WRITE_SAME_16 => {
                let range = protected_range(&b, op)?;
                // SBC-3 §5.41/§5.42: ANCHOR needs anchored LBAs (ANC_SUP=0).
                if b.u8(1) & 0x10 != 0 {
                    return Err(CommandError::field_bit(1, 4));
                }
                // WSNZ=1 (block limits VPD): zero blocks is not allowed.
                if range.blocks == 0 {
                    return Err(CommandError::field(range.length_field));
                }
                Command::WriteSame {
                    range,
                    unmap: b.u8(1) & 0x08 != 0,
                    ndob: op == WRITE_SAME_16 && b.u8(1) & 0x01 != 0,
                }
            }
            UNMAP => {
                // SBC-3 §5.28: ANCHOR needs anchored LBAs (ANC_SUP=0).
                if b.u8(1) & 0x01 != 0 {
                    return Err(CommandError::field_bit(1, 0));
                }
                Command::Unmap {
                    param_len: b.u16(7),
                }
            }
            COMPARE_AND_WRITE => {
                if b.u8(1) & 0xe0 != 0 {
                    return Err(CommandError::field_bit(1, 7));
                }
                Command::CompareAndWrite {
                    lba: b.u64(2),
                    blocks: b.u8(13),
                    fua: b.u8(1) & 0x08 != 0,
                }
            }
            MODE_SELECT_6 | MODE_SELECT_10 => {
                // SPC-4 §6.9: PF=0 (vendor-specific pages) is not supported,
                // nor is saving (SP=1).
                if b.u8(1) & 0x10 == 0 {
                    return Err(CommandError::field_bit(1, 4));
                }
                if b.u8(1) & 0x01 != 0 {
                    return Err(CommandError::field_bit(1, 0));
                }
                let ten = op == MODE_SELECT_10;
                Command::ModeSelect {
                    ten,
                    param_len: if ten { b.u16(7) } else { u16::from(b.u8(4)) },
                }
            }
            VERIFY_10 | VERIFY_12 | VERIFY_16 => Command::Verify {
                range: protected_range(&b, op)?,
                bytchk: (b.u8(1) >> 1) & 0x03,
            },
            SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
                Command::SynchronizeCache(block_range(&b, op))
            }
            REPORT_LUNS => Command::ReportLuns {
                select_report: b.u8(2),
                alloc_len: b.u32(6),
            },
            MAINTENANCE_IN => match u16::from(b.u8(1) & 0x1f) {
                service_action::REPORT_SUPPORTED_OPERATION_CODES => {
                    Command::ReportSupportedOpcodes(ReportOpcodes {
                        rctd: b.u8(2) & 0x80 != 0,
                        options: b.u8(2) & 0x07,
                        opcode: b.u8(3),
                        service_action: b.u16(4),
                        alloc_len: b.u32(6),
                    })
                }
                service_action::REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS => {
                    Command::ReportSupportedTmfs {
                        repd: b.u8(2) & 0x80 != 0,
                        alloc_len: b.u32(6),
                    }
                }
                _ => return Err(CommandError::field_bit(1, 4)),
            },
            _ => return Err(CommandError::InvalidOpcode(op)),
        };
        // NACA=1 asks for ACA, which this target does not support (SAM-5 §5.9,
        // SPC-4 §4.3.4.3 control byte). Checked once the opcode is known to
        // be supported, so an unknown opcode always reports as such.
        if len > 0 && b.u8(len - 1) & 0x04 != 0 {
            return Err(CommandError::field_bit(len as u16 - 1, 2));
        }
        Ok(cmd)
    }
}

/// LBA and transfer length of a 10/12/16-byte block command.
fn block_range(b: &Bytes, op: u8) -> BlockRange {
    match cdb_length(op) {
        10 => BlockRange {
            lba: u64::from(b.u32(2)),
            blocks: u32::from(b.u16(7)),
            length_field: 7,
        },
        12 => BlockRange {
            lba: u64::from(b.u32(2)),
            blocks: b.u32(6),
            length_field: 6,
        },
        _ => BlockRange {
            lba: b.u64(2),
            blocks: b.u32(10),
            length_field: 10,
        },
    }
}

/// Like [`block_range`], for commands with an RDPROTECT/WRPROTECT/VRPROTECT
/// field: protection information is not supported, so it must be zero
/// (SBC-3 §5.11 and the tables it refers to).
fn protected_range(b: &Bytes, op: u8) -> CommandResult<BlockRange> {
    if b.u8(1) & 0xe0 != 0 {
        return Err(CommandError::field_bit(1, 7));
    }
    Ok(block_range(b, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read6_zero_length_means_256() {
        let cmd = Command::parse(&[0x08, 0x1f, 0xff, 0xff, 0, 0]).unwrap();
        assert_eq!(
            cmd,
            Command::Read {
                range: BlockRange {
                    lba: 0x1f_ffff,
                    blocks: 256,
                    length_field: 4
                },
                fua: false
            }
        );
    }

    #[test]
    fn read16_fields() {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        cdb[2..10].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
        cdb[10..14].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            Command::parse(&cdb).unwrap(),
            Command::Read {
                range: BlockRange {
                    lba: 0x0123_4567_89ab_cdef,
                    blocks: 7,
                    length_field: 10
                },
                fua: false
            }
        );
        cdb[1] = 0x08;
        assert!(matches!(
            Command::parse(&cdb),
            Ok(Command::Read { fua: true, .. })
        ));
    }

    #[test]
    fn rdprotect_is_rejected() {
        let err = Command::parse(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap_err();
        assert!(matches!(
            err,
            CommandError::InvalidField {
                byte: 1,
                bit: Some(7)
            }
        ));
    }

    #[test]
    fn naca_is_rejected() {
        let err = Command::parse(&[0x00, 0, 0, 0, 0, 0x04]).unwrap_err();
        assert!(matches!(
            err,
            CommandError::InvalidField {
                byte: 5,
                bit: Some(2)
            }
        ));
    }

    #[test]
    fn unknown_opcode_wins_over_naca() {
        assert!(matches!(
            Command::parse(&[0xc0, 0, 0, 0, 0, 0x04]),
            Err(CommandError::InvalidOpcode(0xc0))
        ));
    }

    #[test]
    fn unknown_opcode() {
        assert!(matches!(
            Command::parse(&[0xc0; 16]),
            Err(CommandError::InvalidOpcode(0xc0))
        ));
        assert!(matches!(Command::parse(&[]), Ok(Command::TestUnitReady)));
    }

    #[test]
    fn short_cdb_reads_as_zero() {
        // A READ(16) cut after the opcode: every field reads as zero.
        assert!(matches!(
            Command::parse(&[0x88]),
            Ok(Command::Read {
                range: BlockRange {
                    lba: 0,
                    blocks: 0,
                    ..
                },
                fua: false
            })
        ));
    }

    #[test]
    fn inquiry_page_without_evpd() {
        assert!(matches!(
            Command::parse(&[0x12, 0, 0x80, 0, 0xff, 0]),
            Err(CommandError::InvalidField { byte: 2, bit: None })
        ));
    }

    #[test]
    fn unknown_service_actions() {
        assert!(matches!(
            Command::parse(&[0x9e, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]),
            Err(CommandError::InvalidField {
                byte: 1,
                bit: Some(4)
            })
        ));
        assert!(matches!(
            Command::parse(&[0xa3, 0x05, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]),
            Err(CommandError::InvalidField {
                byte: 1,
                bit: Some(4)
            })
        ));
    }

    #[test]
    fn read_capacity10_lba_without_pmi() {
        assert!(Command::parse(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]).is_err());
        assert!(Command::parse(&[0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0]).is_ok());
    }
}
