//! Passthrough logical units: commands forwarded as they are to a SCSI
//! logical unit elsewhere (an iSCSI LUN), the way QEMU's `scsi-block`
//! forwards them to a host device. The remote unit answers INQUIRY, READ
//! CAPACITY, MODE SENSE, READ and WRITE itself; the daemon stays in
//! charge of:
//!
//! - REPORT LUNS (the guest's LUN map is the daemon's, not the remote
//!   target's; `target.rs` answers it);
//! - the command filter: FORMAT UNIT, WRITE BUFFER, SANITIZE, ATA
//!   PASS-THROUGH and vendor-specific operation codes (C0h-FFh, SPC-4
//!   §4.3.5.1) are refused with INVALID COMMAND OPERATION CODE unless the
//!   unit is `unfiltered`;
//! - read-only units: write-class commands end in DATA PROTECT / WRITE
//!   PROTECTED before they reach the remote, and MODE SENSE reports WP=1
//!   (SBC-3 §6.5.2, the DEVICE-SPECIFIC PARAMETER of the mode parameter
//!   header) so the guest mounts read-only;
//! - the Block Limits VPD page (SBC-3 §6.6.4): MAXIMUM and OPTIMAL
//!   TRANSFER LENGTH capped to what the daemon's request path takes
//!   (`disk::MAX_TRANSFER_BYTES`);
//! - how a command that never reached the remote ends (the session down:
//!   a retryable ABORTED COMMAND, see `error.rs`).

use crate::storage::remote::{CdbBytes, DataDirection, ScsiOutcome};

use super::cdb::Command;
use super::disk::MAX_TRANSFER_BYTES;
use super::error::{CommandError, CommandResult};

/// A command to forward, as planned for the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub cdb: CdbBytes,
    pub direction: DataDirection,
    /// The data buffer's length (what the command may move).
    pub len: usize,
    /// The guest's tag of the command, which ABORT TASK names.
    pub tag: u64,
    /// What the daemon rewrites in the data-in once it is in.
    pub patch: Patch,
}

/// A rewrite of a forwarded command's data-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patch {
    None,
    /// INQUIRY, Block Limits VPD page: cap MAXIMUM and OPTIMAL TRANSFER
    /// LENGTH at `max_blocks`.
    BlockLimits {
        max_blocks: u32,
    },
    /// MODE SENSE of a read-only unit: set WP in the header's
    /// DEVICE-SPECIFIC PARAMETER, byte `at` (2 for MODE SENSE(6), 3 for
    /// MODE SENSE(10)).
    WriteProtect {
        at: usize,
    },
}

impl Patch {
    /// How many leading bytes of the data-in the patch needs.
    pub fn span(&self) -> usize {
        match self {
            Patch::None => 0,
            Patch::BlockLimits { .. } => 16,
            Patch::WriteProtect { at } => at + 1,
        }
    }

    /// Rewrites `head`, the first bytes of a data-in of which `transferred`
    /// arrived (nothing beyond those is touched).
    pub fn apply(&self, head: &mut [u8], transferred: usize) {
        let n = head.len().min(transferred);
        let head = &mut head[..n];
        match *self {
            Patch::None => {}
            Patch::BlockLimits { max_blocks } => {
                // SBC-3 table 197: byte 1 is the page code, bytes 8-11
                // MAXIMUM TRANSFER LENGTH (0: no limit), 12-15 OPTIMAL
                // TRANSFER LENGTH.
                if head.len() < 16 || head[1] != 0xb0 {
                    return;
                }
                for range in [8..12, 12..16] {
                    let mut field = [0u8; 4];
                    field.copy_from_slice(&head[range.clone()]);
                    let value = u32::from_be_bytes(field);
                    let capped = if value == 0 && range.start == 8 {
                        max_blocks
                    } else {
                        value.min(max_blocks)
                    };
                    head[range].copy_from_slice(&capped.to_be_bytes());
                }
            }
            Patch::WriteProtect { at } => {
                if let Some(byte) = head.get_mut(at) {
                    *byte |= 0x80;
                }
            }
        }
    }
}

/// Whether `cdb` is one the filter keeps from the remote unit.
fn filtered(cdb: &[u8]) -> bool {
    matches!(
        cdb[0],
        0x04 // FORMAT UNIT (SBC-3 §5.2)
        | 0x3b // WRITE BUFFER (SPC-4 §6.49): firmware downloads
        | 0x48 // SANITIZE (SBC-3 §5.26)
        | 0x85 | 0xa1 // ATA PASS-THROUGH (16), (12) (SAT-3): ATA erase, microcode
        | 0xb5 // SECURITY PROTOCOL OUT (SPC-4 §6.31): e.g. a TCG Opal revert
        | 0xc0..=0xff // vendor specific (SPC-4 §4.3.5.1)
    )
}

/// Whether `cdb` may change the medium's contents (refused on a
/// read-only unit).
fn writes_medium(cdb: &[u8]) -> bool {
    match cdb[0] {
        0x0a | 0x2a | 0xaa | 0x8a // WRITE (6/10/12/16)
        | 0x2e | 0xae | 0x8e // WRITE AND VERIFY (10/12/16)
        | 0x41 | 0x93 // WRITE SAME (10/16)
        | 0x42 // UNMAP
        | 0x89 // COMPARE AND WRITE
        | 0x3f // WRITE LONG (10)
        | 0x9f // SERVICE ACTION OUT (16): WRITE LONG (16), WRITE SCATTERED
        | 0x07 // REASSIGN BLOCKS
        | 0x50 | 0x51 | 0x53 // XDWRITE, XPWRITE, XDWRITEREAD (10)
        | 0x8b // ORWRITE (16)
        | 0x9c // WRITE ATOMIC (16)
        | 0x83 // EXTENDED COPY, WRITE USING TOKEN (SPC-4 §6.4)
        | 0x9a // WRITE STREAM (16) (SBC-4)
        | 0x94 // ZBC OUT: RESET WRITE POINTER, FINISH ZONE (ZBC)
        // What the filter keeps back, and vendor-specific commands, whose
        // effect is unknown: refused on a read-only unit even unfiltered.
        | 0x04 | 0x48 | 0x3b | 0x85 | 0xa1 | 0xb5 | 0xc0..=0xff => true,
        // Variable-length CDBs (SBC-3 table 13): the service action in
        // bytes 8-9.
        0x7f => {
            let action = u16::from_be_bytes([
                cdb.get(8).copied().unwrap_or(0),
                cdb.get(9).copied().unwrap_or(0),
            ]);
            // XDWRITE, XPWRITE, XDWRITEREAD, WRITE, WRITE AND VERIFY,
            // WRITE SAME, ORWRITE, and (SBC-4) WRITE ATOMIC, WRITE STREAM,
            // WRITE SCATTERED (32).
            matches!(action, 0x0004 | 0x0006 | 0x0007 | 0x000b..=0x0011)
        }
        _ => false,
    }
}

/// The length of the CDB starting `cdb` by its operation code's group
/// (SPC-4 §4.2.5.1, table 2: groups 0 six bytes, 1 and 2 ten, 4 sixteen,
/// 5 twelve; 7Fh variable-length, eight bytes plus its ADDITIONAL CDB
/// LENGTH, §4.2.4); 16 for the reserved and vendor-specific groups, whose
/// length is not known (transports such as iSCSI carry 16 bytes anyway).
fn cdb_length(cdb: &[u8]) -> usize {
    match super::cdb::cdb_length(cdb[0]) {
        0 if cdb[0] == 0x7f => 8 + usize::from(cdb.get(7).copied().unwrap_or(0)),
        0 => 16,
        n => n,
    }
}

/// Plans `cdb` for a passthrough unit: the command to forward, or why it
/// ends here. `data_in`/`data_out`: the guest's buffers (at most one is
/// non-empty, virtio-scsi without INOUT); `block_size`: the remote
/// unit's logical block length.
pub fn plan(
    cdb: &[u8],
    tag: u64,
    data_in: usize,
    data_out: usize,
    read_only: bool,
    unfiltered: bool,
    block_size: u32,
) -> CommandResult<Forwarded> {
    let Some(&opcode) = cdb.first() else {
        return Err(CommandError::InvalidOpcode(0));
    };
    if !unfiltered && filtered(cdb) {
        return Err(CommandError::InvalidOpcode(opcode));
    }
    if read_only && writes_medium(cdb) {
        return Err(CommandError::WriteProtected);
    }
    // The virtio request's CDB field is `cdb_size` bytes (32 by default)
    // whatever the command: forward the command's own length.
    let len = cdb_length(cdb).min(cdb.len());
    let bytes = CdbBytes::new(&cdb[..len]).ok_or(CommandError::InvalidOpcode(opcode))?;
    // READ and WRITE whose data buffer is smaller than the transfer their
    // CDB asks for are not executed (virtio 1.2 §5.6.6.1: OVERRUN), as on
    // an emulated unit: the remote would be asked for data the guest has
    // no room for, or for data-out the guest did not give.
    match Command::parse(cdb) {
        Ok(Command::Read { range, .. }) => {
            let required = u64::from(range.blocks) * u64::from(block_size);
            if (data_in as u64) < required {
                return Err(CommandError::DataInTooSmall {
                    required,
                    available: data_in,
                });
            }
        }
        Ok(Command::Write { range, .. }) => {
            let required = u64::from(range.blocks) * u64::from(block_size);
            if (data_out as u64) < required {
                return Err(CommandError::DataOutTooSmall {
                    required,
                    available: data_out,
                });
            }
        }
        _ => {}
    }
    let (direction, len) = if data_in > 0 {
        (DataDirection::FromDevice, data_in)
    } else if data_out > 0 {
        (DataDirection::ToDevice, data_out)
    } else {
        (DataDirection::None, 0)
    };
    let patch = match opcode {
        // INQUIRY with EVPD=1 for page B0h.
        0x12 if cdb.get(1).is_some_and(|b| b & 1 == 1) && cdb.get(2) == Some(&0xb0) => {
            Patch::BlockLimits {
                max_blocks: MAX_TRANSFER_BYTES / block_size.max(1),
            }
        }
        0x1a if read_only => Patch::WriteProtect { at: 2 },
        0x5a if read_only => Patch::WriteProtect { at: 3 },
        _ => Patch::None,
    };
    Ok(Forwarded {
        cdb: bytes,
        direction,
        len,
        tag,
        patch,
    })
}

/// The sense key of forwarded sense bytes (fixed format: byte 2;
/// descriptor format: byte 1; SPC-4 §4.5), for statistics.
pub fn sense_key(outcome: &ScsiOutcome) -> Option<u8> {
    let sense = outcome.sense();
    match sense.first().map(|b| b & 0x7f) {
        Some(0x70 | 0x71) => sense.get(2).map(|b| b & 0x0f),
        Some(0x72 | 0x73) => sense.get(1).map(|b| b & 0x0f),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_rw(cdb: &[u8], read_only: bool, unfiltered: bool) -> CommandResult<Forwarded> {
        plan(cdb, 9, 4096, 0, read_only, unfiltered, 512)
    }

    #[test]
    fn the_filter_refuses_dangerous_opcodes_unless_unfiltered() {
        // SPC-4: FORMAT UNIT 04h, WRITE BUFFER 3Bh, SANITIZE 48h, ATA
        // PASS-THROUGH 85h/A1h, vendor specific C0h-FFh.
        for opcode in [0x04u8, 0x3b, 0x48, 0x85, 0xa1, 0xb5, 0xc0, 0xd5, 0xff] {
            let cdb = [opcode, 0, 0, 0, 0, 0];
            assert!(
                matches!(plan_rw(&cdb, false, false), Err(CommandError::InvalidOpcode(o)) if o == opcode),
                "{opcode:#x}"
            );
            assert!(plan_rw(&cdb, false, true).is_ok(), "{opcode:#x}");
        }
        // INQUIRY, READ(10), READ CAPACITY(16), PERSISTENT RESERVE IN pass.
        for opcode in [0x12u8, 0x28, 0x9e, 0x5e] {
            assert!(plan_rw(&[opcode, 0, 0, 0, 0, 0], false, false).is_ok());
        }
    }

    #[test]
    fn a_read_only_unit_refuses_writes_before_the_remote() {
        let write16 = [0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0];
        assert!(matches!(
            plan(&write16, 1, 0, 4096, true, false, 512),
            Err(CommandError::WriteProtected)
        ));
        assert!(plan(&write16, 1, 0, 4096, false, false, 512).is_ok());
        // WRITE(32): 7Fh, service action 000Bh in bytes 8-9.
        let mut write32 = [0u8; 32];
        write32[0] = 0x7f;
        write32[7] = 0x18;
        write32[9] = 0x0b;
        assert!(matches!(
            plan(&write32, 1, 0, 512, true, true, 512),
            Err(CommandError::WriteProtected)
        ));
        // READ(32), service action 0009h, passes.
        write32[9] = 0x09;
        assert!(plan(&write32, 1, 512, 0, true, true, 512).is_ok());
        // UNMAP, WRITE SAME(16), COMPARE AND WRITE, EXTENDED COPY, WRITE
        // STREAM(16), ZBC OUT, SECURITY PROTOCOL OUT, a vendor-specific
        // opcode: refused even unfiltered.
        for opcode in [0x42u8, 0x93, 0x89, 0x83, 0x9a, 0x94, 0xb5, 0xc7] {
            assert!(matches!(
                plan(&[opcode, 0, 0, 0, 0, 0], 1, 0, 512, true, true, 512),
                Err(CommandError::WriteProtected)
            ));
        }
        // READ(10), SYNCHRONIZE CACHE(10), MODE SENSE(10) still go.
        for opcode in [0x28u8, 0x35, 0x5a] {
            assert!(plan(
                &[opcode, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                1,
                512,
                0,
                true,
                false,
                512
            )
            .is_ok());
        }
    }

    #[test]
    fn the_forwarded_cdb_has_its_own_length_not_the_fields() {
        // A 32-byte CDB field holding TEST UNIT READY, READ(10), READ(16),
        // READ(12), a 32-byte variable-length CDB (ADDITIONAL CDB LENGTH
        // 18h) and a vendor-specific one.
        let field = |opcode: u8| {
            let mut f = [0u8; 32];
            f[0] = opcode;
            f
        };
        let len = |f: [u8; 32]| {
            plan(&f, 1, 0, 0, false, true, 512)
                .unwrap()
                .cdb
                .as_slice()
                .len()
        };
        assert_eq!(len(field(0x00)), 6);
        assert_eq!(len(field(0x28)), 10);
        assert_eq!(len(field(0x88)), 16);
        assert_eq!(len(field(0xa8)), 12);
        let mut var = field(0x7f);
        var[7] = 0x18;
        assert_eq!(len(var), 32);
        assert_eq!(len(field(0xc5)), 16);
        // A field shorter than the command (cdb_size 16, a 32-byte CDB):
        // what there is.
        let mut short = [0u8; 16];
        short[0] = 0x7f;
        short[7] = 0x18;
        assert_eq!(
            plan(&short, 1, 0, 0, false, true, 512)
                .unwrap()
                .cdb
                .as_slice()
                .len(),
            16
        );
    }

    #[test]
    fn direction_and_length_follow_the_guest_buffers() {
        let f = plan(
            &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0],
            77,
            4096,
            0,
            false,
            false,
            512,
        )
        .unwrap();
        assert_eq!(
            (f.direction, f.len, f.tag),
            (DataDirection::FromDevice, 4096, 77)
        );
        let f = plan(
            &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            1,
            0,
            512,
            false,
            false,
            512,
        )
        .unwrap();
        assert_eq!((f.direction, f.len), (DataDirection::ToDevice, 512));
        let f = plan(&[0, 0, 0, 0, 0, 0], 1, 0, 0, false, false, 512).unwrap();
        assert_eq!((f.direction, f.len), (DataDirection::None, 0));
        assert_eq!(f.cdb.as_slice(), [0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn the_cdb_fields_padding_is_not_forwarded() {
        // virtio-scsi hands over cdb_size (32) bytes whatever the command.
        let mut field = [0u8; 32];
        field[..6].copy_from_slice(&[0x12, 0, 0, 0, 36, 0]);
        let f = plan(&field, 1, 36, 0, false, false, 512).unwrap();
        assert_eq!(f.cdb.as_slice(), [0x12, 0, 0, 0, 36, 0]);
        field[..10].copy_from_slice(&[0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0]);
        assert_eq!(
            plan(&field, 1, 512, 0, false, false, 512)
                .unwrap()
                .cdb
                .as_slice()
                .len(),
            10
        );
        field[..16].copy_from_slice(&[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0]);
        assert_eq!(
            plan(&field, 1, 512, 0, false, false, 512)
                .unwrap()
                .cdb
                .as_slice()
                .len(),
            16
        );
        let mut read12 = [0u8; 32];
        read12[0] = 0xa8;
        read12[9] = 1;
        assert_eq!(
            plan(&read12, 1, 512, 0, false, false, 512)
                .unwrap()
                .cdb
                .as_slice()
                .len(),
            12
        );
        // A variable-length CDB: 8 + ADDITIONAL CDB LENGTH.
        let mut var = [0u8; 32];
        var[0] = 0x7f;
        var[7] = 0x18;
        assert_eq!(cdb_length(&var), 32);
    }

    #[test]
    fn a_read_or_write_larger_than_its_buffer_is_not_forwarded() {
        // READ(10) of 8 blocks of 512 into 2048 bytes; WRITE(10) of 2 blocks
        // from 512.
        assert!(matches!(
            plan(
                &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0],
                1,
                2048,
                0,
                false,
                false,
                512
            ),
            Err(CommandError::DataInTooSmall {
                required: 4096,
                available: 2048
            })
        ));
        assert!(matches!(
            plan(
                &[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0],
                1,
                0,
                512,
                false,
                false,
                512
            ),
            Err(CommandError::DataOutTooSmall {
                required: 1024,
                available: 512
            })
        ));
        // 4096-byte blocks: READ(16) of one block needs 4096.
        let read16 = [0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(plan(&read16, 1, 4096, 0, false, false, 4096).is_ok());
        assert!(plan(&read16, 1, 4095, 0, false, false, 4096).is_err());
        // A larger buffer is fine (the residual tells the rest).
        assert!(plan(
            &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            1,
            8192,
            0,
            false,
            false,
            512
        )
        .is_ok());
    }

    #[test]
    fn block_limits_are_capped_at_the_request_path() {
        let inquiry_b0 = [0x12, 0x01, 0xb0, 0x00, 0x40, 0x00];
        let f = plan(&inquiry_b0, 1, 64, 0, false, false, 512).unwrap();
        // 32 MiB in 512-byte blocks.
        assert_eq!(f.patch, Patch::BlockLimits { max_blocks: 65536 });
        let f4k = plan(&inquiry_b0, 1, 64, 0, false, false, 4096).unwrap();
        assert_eq!(f4k.patch, Patch::BlockLimits { max_blocks: 8192 });
        // A page saying: no maximum (0), optimal 0x00100000 blocks.
        let mut page = [0u8; 64];
        page[1] = 0xb0;
        page[3] = 0x3c;
        page[12..16].copy_from_slice(&0x0010_0000u32.to_be_bytes());
        f.patch.apply(&mut page[..16], 64);
        assert_eq!(page[8..12], 65536u32.to_be_bytes());
        assert_eq!(page[12..16], 65536u32.to_be_bytes());
        // A smaller remote limit stays.
        page[8..12].copy_from_slice(&128u32.to_be_bytes());
        page[12..16].copy_from_slice(&8u32.to_be_bytes());
        f.patch.apply(&mut page[..16], 64);
        assert_eq!(page[8..12], 128u32.to_be_bytes());
        assert_eq!(page[12..16], 8u32.to_be_bytes());
        // Only what arrived is touched.
        let mut short = [0u8; 16];
        short[1] = 0xb0;
        f.patch.apply(&mut short, 10);
        assert_eq!(short[8..12], [0; 4]);
        // Another page (INQUIRY page 83h) is left alone.
        assert_eq!(
            plan(&[0x12, 1, 0x83, 0, 64, 0], 1, 64, 0, false, false, 512)
                .unwrap()
                .patch,
            Patch::None
        );
    }

    #[test]
    fn mode_sense_of_a_read_only_unit_says_write_protected() {
        let f6 = plan(&[0x1a, 0, 0x3f, 0, 0xff, 0], 1, 255, 0, true, false, 512).unwrap();
        let f10 = plan(
            &[0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 0xff, 0],
            1,
            255,
            0,
            true,
            false,
            512,
        )
        .unwrap();
        assert_eq!(f6.patch, Patch::WriteProtect { at: 2 });
        assert_eq!(f10.patch, Patch::WriteProtect { at: 3 });
        let mut header = [0x23, 0, 0x10, 0];
        f6.patch.apply(&mut header, 4);
        assert_eq!(header, [0x23, 0, 0x90, 0]);
        // Writable: untouched.
        assert_eq!(
            plan(&[0x1a, 0, 0x3f, 0, 0xff, 0], 1, 255, 0, false, false, 512)
                .unwrap()
                .patch,
            Patch::None
        );
    }

    #[test]
    fn sense_keys_of_both_formats() {
        // Fixed: 70h, key in byte 2. Descriptor: 72h, key in byte 1.
        let fixed = ScsiOutcome::new(2, &[0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0], 0);
        let desc = ScsiOutcome::new(2, &[0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0], 0);
        assert_eq!(sense_key(&fixed), Some(5));
        assert_eq!(sense_key(&desc), Some(6));
        assert_eq!(sense_key(&ScsiOutcome::new(0, &[], 0)), None);
    }
}
