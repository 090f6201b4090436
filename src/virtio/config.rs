//! The virtio-scsi configuration space (virtio 1.2 §5.6.4).

use super::request::{Sizes, MAX_CDB_SIZE, MAX_SENSE_SIZE};

/// Offsets of the fields the driver may write.
const SENSE_SIZE_OFFSET: u32 = 20;
const CDB_SIZE_OFFSET: u32 = 24;
/// Size of struct virtio_scsi_config.
pub const CONFIG_LEN: usize = 36;

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
pub struct ScsiConfig {
    pub num_request_queues: u32,
    pub seg_max: u32,
    pub max_sectors: u32,
    pub cmd_per_lun: u32,
    pub sizes: Sizes,
    pub max_target: u16,
    pub max_lun: u32,
}

impl ScsiConfig {
    /// struct virtio_scsi_config, little endian.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put32 = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(0, self.num_request_queues);
        put32(4, self.seg_max);
        put32(8, self.max_sectors);
        put32(12, self.cmd_per_lun);
        // event_info_size: sizeof(struct virtio_scsi_event).
        put32(16, 16);
        put32(20, self.sizes.sense as u32);
        put32(24, self.sizes.cdb as u32);
        put32(32, self.max_lun);
        // max_channel (offset 28) stays 0.
        b[30..32].copy_from_slice(&self.max_target.to_le_bytes());
        b
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
        let b = config().to_bytes();
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
