//! A direct-access block device logical unit (SBC-3) over a [`Storage`].

use super::buffer::{DataIn, DataOut};
use super::cdb::{BlockRange, Command};
use super::error::{CommandError, CommandResult};
use super::inquiry::{self, Identity, VpdParams};
use super::mode::{self, ModeParams};
use super::sense::{self, SenseData};
use crate::storage::{IoVec, Storage};

/// The largest single transfer, in bytes, reported in the block limits VPD
/// page (and enforced): 32 MiB.
pub const MAX_TRANSFER_BYTES: u32 = 32 << 20;

/// Scratch space VERIFY reads through, so that its memory use does not
/// depend on the verification length the initiator asks for.
const VERIFY_CHUNK: usize = 64 << 10;

/// Physical block size reported to the guest when the logical block is
/// smaller: host file systems and devices work in 4 KiB units, so guests
/// that align to it avoid read-modify-write cycles.
const PHYSICAL_BLOCK: u32 = 4096;

/// How a disk is presented.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub block_size: u32,
    pub identity: Identity,
    pub solid_state: bool,
    /// Offer thin provisioning: UNMAP, WRITE SAME with UNMAP, LBPME.
    pub discard: bool,
}

/// Why a storage object cannot be served as a disk.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskError {
    #[error("image is empty")]
    Empty,
    #[error("size {size} is not a multiple of the {block_size}-byte block size")]
    NotBlockMultiple { size: u64, block_size: u32 },
    #[error("block size {0} is not supported (512 or 4096)")]
    BadBlockSize(u32),
}

pub struct Disk {
    storage: Box<dyn Storage>,
    config: DiskConfig,
    blocks: u64,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("config", &self.config)
            .field("blocks", &self.blocks)
            .finish()
    }
}

impl Disk {
    pub fn new(storage: Box<dyn Storage>, config: DiskConfig) -> Result<Disk, DiskError> {
        let block_size = config.block_size;
        if block_size != 512 && block_size != 4096 {
            return Err(DiskError::BadBlockSize(block_size));
        }
        let size = storage.size();
        if size == 0 {
            return Err(DiskError::Empty);
        }
        if size % u64::from(block_size) != 0 {
            return Err(DiskError::NotBlockMultiple { size, block_size });
        }
        Ok(Disk {
            blocks: size / u64::from(block_size),
            storage,
            config,
        })
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn block_size(&self) -> u32 {
        self.config.block_size
    }

    pub fn read_only(&self) -> bool {
        self.storage.read_only()
    }

    pub fn identity(&self) -> &Identity {
        &self.config.identity
    }

    fn max_transfer_blocks(&self) -> u32 {
        MAX_TRANSFER_BYTES / self.config.block_size
    }

    fn physical_exponent(&self) -> u8 {
        (PHYSICAL_BLOCK.max(self.config.block_size) / self.config.block_size).trailing_zeros() as u8
    }

    /// Standard INQUIRY data of this unit.
    pub fn inquiry(&self) -> Vec<u8> {
        inquiry::standard(inquiry::TYPE_DISK, &self.config.identity)
    }

    /// Executes a block command (everything but the target-level commands
    /// REPORT LUNS and REPORT SUPPORTED ...).
    pub fn execute(
        &self,
        cmd: &Command,
        data_in: &mut dyn DataIn,
        _data_out: &mut dyn DataOut,
    ) -> CommandResult<()> {
        match cmd {
            Command::TestUnitReady
            | Command::StartStopUnit
            | Command::PreventAllowMediumRemoval => Ok(()),
            Command::RequestSense { desc, alloc_len } => request_sense(
                SenseData::new(sense::NO_ADDITIONAL_SENSE),
                *desc,
                *alloc_len,
                data_in,
            ),
            Command::Inquiry {
                evpd: false,
                alloc_len,
                ..
            } => {
                send(data_in, &self.inquiry(), usize::from(*alloc_len));
                Ok(())
            }
            Command::Inquiry {
                evpd: true,
                page,
                alloc_len,
            } => {
                let data = inquiry::vpd(*page, &self.vpd_params())?;
                send(data_in, &data, usize::from(*alloc_len));
                Ok(())
            }
            Command::ModeSense(req) => {
                let data = mode::mode_sense(req, &self.mode_params())?;
                send(data_in, &data, usize::from(req.alloc_len));
                Ok(())
            }
            Command::ReadCapacity10 => {
                // SBC-3 §5.16: a last LBA beyond 32 bits reads FFFFFFFFh,
                // telling the initiator to use READ CAPACITY(16).
                let last = u32::try_from(self.blocks - 1).unwrap_or(u32::MAX);
                let mut data = [0u8; 8];
                data[..4].copy_from_slice(&last.to_be_bytes());
                data[4..].copy_from_slice(&self.config.block_size.to_be_bytes());
                send(data_in, &data, data.len());
                Ok(())
            }
            Command::ReadCapacity16 { alloc_len } => {
                // SBC-3 §5.17, table 65: no protection, LBPME=0, LBPRZ=0.
                let mut data = [0u8; 32];
                data[..8].copy_from_slice(&(self.blocks - 1).to_be_bytes());
                data[8..12].copy_from_slice(&self.config.block_size.to_be_bytes());
                data[13] = self.physical_exponent();
                send(data_in, &data, *alloc_len as usize);
                Ok(())
            }
            Command::Read(range) => self.read(range, data_in),
            Command::Write(range) => {
                self.check_transfer(range)?;
                // Writes arrive with the write support; until then every
                // unit is write protected (SBC-3 §4.10).
                Err(CommandError::WriteProtected)
            }
            Command::Verify { range, bytchk } => {
                if *bytchk != 0 {
                    // Comparing against data-out is not implemented yet.
                    return Err(CommandError::field_bit(1, 2));
                }
                self.check_transfer(range)?;
                self.verify_medium(range)
            }
            Command::SynchronizeCache(range) => {
                // SBC-3 §5.24: NUMBER OF LOGICAL BLOCKS zero means "through
                // the last LBA"; the range must still be on the medium.
                let end = if range.blocks == 0 {
                    range.lba.checked_add(1)
                } else {
                    range.lba.checked_add(u64::from(range.blocks))
                };
                if end.is_none_or(|end| end > self.blocks) {
                    return Err(CommandError::LbaOutOfRange);
                }
                self.storage.flush().map_err(CommandError::WriteError)
            }
            Command::ReportLuns { .. }
            | Command::ReportSupportedOpcodes(_)
            | Command::ReportSupportedTmfs { .. } => {
                // Target-level commands never reach a disk; be total anyway.
                Err(CommandError::InvalidOpcode(0))
            }
        }
    }

    /// Checks the transfer length against the block limits and the range
    /// against the capacity, with overflow-safe arithmetic.
    fn check_transfer(&self, range: &BlockRange) -> CommandResult<()> {
        if range.blocks > self.max_transfer_blocks() {
            // SBC-3 §6.5.3: longer than MAXIMUM TRANSFER LENGTH.
            return Err(CommandError::field(range.length_field));
        }
        match range.lba.checked_add(u64::from(range.blocks)) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(CommandError::LbaOutOfRange),
        }
    }

    fn byte_offset(&self, lba: u64) -> u64 {
        // lba < blocks, and blocks * block_size is the image size: no overflow.
        lba * u64::from(self.config.block_size)
    }

    fn read(&self, range: &BlockRange, data_in: &mut dyn DataIn) -> CommandResult<()> {
        self.check_transfer(range)?;
        // blocks <= MAX_TRANSFER_BYTES / block_size, so this fits in u32.
        let len = range.blocks as usize * self.config.block_size as usize;
        if len > data_in.remaining() {
            return Err(CommandError::DataInTooSmall {
                required: len as u64,
                available: data_in.remaining(),
            });
        }
        if len == 0 {
            return Ok(());
        }
        data_in
            .read_from(&*self.storage, self.byte_offset(range.lba), len)
            .map_err(CommandError::ReadError)
    }

    /// VERIFY with BYTCHK=0 (SBC-3 §5.33): read the range back to make sure
    /// the medium can deliver it.
    fn verify_medium(&self, range: &BlockRange) -> CommandResult<()> {
        let total = u64::from(range.blocks) * u64::from(self.config.block_size);
        let mut scratch = vec![0u8; VERIFY_CHUNK.min(total as usize)];
        let mut done = 0u64;
        while done < total {
            let n = scratch.len().min((total - done) as usize);
            let iov = IoVec {
                iov_base: scratch.as_mut_ptr().cast(),
                iov_len: n,
            };
            self.storage
                .read_vectored_at(&[iov], self.byte_offset(range.lba) + done)
                .map_err(CommandError::ReadError)?;
            done += n as u64;
        }
        Ok(())
    }

    fn vpd_params(&self) -> VpdParams<'_> {
        VpdParams {
            identity: &self.config.identity,
            physical_exponent: self.physical_exponent(),
            max_transfer_blocks: self.max_transfer_blocks(),
            solid_state: self.config.solid_state,
        }
    }

    fn mode_params(&self) -> ModeParams {
        ModeParams {
            blocks: self.blocks,
            block_size: self.config.block_size,
            read_only: self.read_only(),
            write_cache: false,
        }
    }
}

/// Sends parameter data truncated to the allocation length and to the
/// initiator's buffer (SPC-4 §4.2.5.6: returning less is not an error).
pub fn send(data_in: &mut dyn DataIn, data: &[u8], alloc_len: usize) {
    data_in.write_bytes(&data[..data.len().min(alloc_len)]);
}

/// REQUEST SENSE (SPC-4 §6.39): returns `sense` as parameter data in fixed
/// format; descriptor format is not supported yet.
pub fn request_sense(
    sense: SenseData,
    desc: bool,
    alloc_len: u8,
    data_in: &mut dyn DataIn,
) -> CommandResult<()> {
    if desc {
        return Err(CommandError::field_bit(1, 0));
    }
    send(data_in, &sense.to_fixed(), usize::from(alloc_len));
    Ok(())
}
