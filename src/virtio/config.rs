//! The virtio-scsi configuration space (virtio 1.2 §5.6.4).

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_scsi::virtio_scsi_config;
use vm_memory::ByteValued;

use super::wire::Wire;

use super::request::{Sizes, MAX_CDB_SIZE, MAX_SENSE_SIZE};

/// Offsets of the fields the driver may write.
const SENSE_SIZE_OFFSET: u32 = offset_of!(virtio_scsi_config, sense_size) as u32;
const CDB_SIZE_OFFSET: u32 = offset_of!(virtio_scsi_config, cdb_size) as u32;
/// Size of struct virtio_scsi_config.
pub(crate) const CONFIG_LEN: usize = size_of::<virtio_scsi_config>();

/// Why a configuration write was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("config write at offset {offset} of {len} bytes touches read-only fields")]
    ReadOnlyField { offset: u32, len: usize },
    #[error("{field} {value} out of range")]
    OutOfRange { field: &'static str, value: u32 },
}

/// The values this device reports.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScsiConfig {
    pub num_request_queues: u32,
    pub seg_max: u32,
    pub max_sectors: u32,
    pub cmd_per_lun: u32,
    pub sizes: Sizes,
    pub max_target: u16,
    pub max_lun: u32,
}

impl ScsiConfig {
    /// struct virtio_scsi_config, little endian (virtio 1.x devices).
    pub(crate) fn to_bytes(self) -> [u8; CONFIG_LEN] {
        let space = Wire(virtio_scsi_config {
            num_queues: self.num_request_queues.to_le(),
            seg_max: self.seg_max.to_le(),
            max_sectors: self.max_sectors.to_le(),
            cmd_per_lun: self.cmd_per_lun.to_le(),
            // sizeof(struct virtio_scsi_event) (§5.6.6.3).
            event_info_size: 16u32.to_le(),
            sense_size: (self.sizes.sense as u32).to_le(),
            cdb_size: (self.sizes.cdb as u32).to_le(),
            max_channel: 0,
            max_target: self.max_target.to_le(),
            max_lun: self.max_lun.to_le(),
        });
        let mut bytes = [0u8; CONFIG_LEN];
        bytes.copy_from_slice(space.as_slice());
        bytes
    }

    /// `size` bytes at `offset`, or nothing if that is outside the space.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= bytes.len() => bytes[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    /// Applies a driver write: only sense_size and cdb_size are writable
    /// (virtio 1.2 §5.6.4.1), each as a whole little-endian u32.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), ConfigError> {
        let read_only = || ConfigError::ReadOnlyField {
            offset,
            len: data.len(),
        };
        let value = match <[u8; 4]>::try_from(data) {
            Ok(v) => u32::from_le_bytes(v),
            Err(_) => return Err(read_only()),
        };
        match offset {
            SENSE_SIZE_OFFSET => {
                if value > MAX_SENSE_SIZE {
                    return Err(ConfigError::OutOfRange {
                        field: "sense_size",
                        value,
                    });
                }
                self.sizes.sense = value as usize;
            }
            CDB_SIZE_OFFSET => {
                // At least a 6-byte CDB must fit.
                if !(6..=MAX_CDB_SIZE).contains(&value) {
                    return Err(ConfigError::OutOfRange {
                        field: "cdb_size",
                        value,
                    });
                }
                self.sizes.cdb = value as usize;
            }
            _ => return Err(read_only()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ScsiConfig {
        ScsiConfig {
            num_request_queues: 16,
            seg_max: 254,
            max_sectors: 0xffff,
            cmd_per_lun: 128,
            sizes: Sizes::default(),
            max_target: 0,
            max_lun: 16383,
        }
    }

    #[test]
    fn layout() {
        // virtio 1.2 §5.6.4: offsets written out from the spec's struct.
        assert_eq!(
            (SENSE_SIZE_OFFSET, CDB_SIZE_OFFSET, CONFIG_LEN),
            (20, 24, 36)
        );
        let b = config().to_bytes();
        assert_eq!(&b[16..20], &16u32.to_le_bytes(), "event_info_size");
        assert_eq!(&b[28..32], &[0, 0, 0, 0], "max_channel, max_target");
        assert_eq!(&b[0..4], &16u32.to_le_bytes());
        assert_eq!(&b[20..24], &96u32.to_le_bytes());
        assert_eq!(&b[24..28], &32u32.to_le_bytes());
        assert_eq!(&b[32..36], &16383u32.to_le_bytes());
    }

    #[test]
    fn reads_are_bounded() {
        let c = config();
        assert_eq!(c.read(20, 4), 96u32.to_le_bytes().to_vec());
        assert!(c.read(34, 4).is_empty());
        assert!(c.read(u32::MAX, u32::MAX).is_empty());
    }

    #[test]
    fn writes() {
        let mut c = config();
        c.write(24, &16u32.to_le_bytes()).unwrap();
        assert_eq!(c.sizes.cdb, 16);
        c.write(20, &0u32.to_le_bytes()).unwrap();
        assert_eq!(c.sizes.sense, 0);
        assert!(c.write(24, &5u32.to_le_bytes()).is_err());
        assert!(c.write(20, &1000u32.to_le_bytes()).is_err());
        assert!(c.write(0, &1u32.to_le_bytes()).is_err());
        assert!(c.write(20, &[1, 2]).is_err());
        assert!(c.write(u32::MAX, &[]).is_err());
    }
}
