//! What the driver puts in and reads out of a virtio-scsi request
//! (virtio 1.2 §5.6.6.1): CDBs for the commands a load generator issues and
//! the response header.

/// `virtio_scsi_cmd_req` with the default 32-byte CDB: `lun[8]`, `id`
/// (le64), `task_attr`, `prio`, `crn`, `cdb[32]`.
pub const REQUEST_LEN: usize = 8 + 8 + 3 + 32;
/// `virtio_scsi_cmd_resp` with the default 96-byte sense: `sense_len`
/// (le32), `residual` (le32), `status_qualifier` (le16), `status`,
/// `response`, `sense[96]`.
pub const RESPONSE_LEN: usize = 4 + 4 + 2 + 1 + 1 + 96;
/// The response header before the sense bytes.
pub const RESPONSE_HEADER_LEN: usize = 12;

/// VIRTIO_SCSI_S_OK.
pub const VIRTIO_SCSI_S_OK: u8 = 0;
/// SCSI status GOOD.
pub const STATUS_GOOD: u8 = 0;

pub const SYNCHRONIZE_CACHE_10: [u8; 10] = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The LUN field of a request: target 0, `lun` in flat space addressing,
/// as Linux's virtio_scsi driver writes it.
pub fn lun_field(lun: u16) -> [u8; 8] {
    [1, 0, 0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0]
}

/// A CDB of up to 16 bytes, without allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cdb {
    bytes: [u8; 16],
    len: u8,
}

impl Cdb {
    /// `bytes` must be at most 16 bytes long; longer input is truncated.
    pub fn new(bytes: &[u8]) -> Cdb {
        let len = bytes.len().min(16);
        let mut cdb = Cdb {
            bytes: [0; 16],
            len: len as u8,
        };
        cdb.bytes[..len].copy_from_slice(&bytes[..len]);
        cdb
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

pub fn write10(lba: u32, blocks: u16, fua: bool) -> [u8; 10] {
    let mut cdb = read10(lba, blocks);
    cdb[0] = 0x2a;
    if fua {
        cdb[1] = 0x08;
    }
    cdb
}

pub fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

pub fn write16(lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
    let mut cdb = read16(lba, blocks);
    cdb[0] = 0x8a;
    if fua {
        cdb[1] = 0x08;
    }
    cdb
}

/// READ or WRITE of `blocks` at `lba`: the 10-byte CDB when the range fits
/// it (LBA below 2^32, at most 65535 blocks), else the 16-byte one, as
/// Linux's sd driver chooses.
pub fn read_write(write: bool, lba: u64, blocks: u32) -> Cdb {
    let end = lba.checked_add(u64::from(blocks));
    match (u32::try_from(lba), u16::try_from(blocks), end) {
        (Ok(lba10), Ok(blocks10), Some(end)) if end <= 1 << 32 => {
            if write {
                Cdb::new(&write10(lba10, blocks10, false))
            } else {
                Cdb::new(&read10(lba10, blocks10))
            }
        }
        _ => {
            if write {
                Cdb::new(&write16(lba, blocks, false))
            } else {
                Cdb::new(&read16(lba, blocks))
            }
        }
    }
}

/// The response header the device wrote (virtio 1.2 §5.6.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    pub sense_len: u32,
    pub residual: u32,
    pub status_qualifier: u16,
    pub status: u8,
    pub response: u8,
}

impl ResponseHeader {
    pub fn parse(bytes: &[u8; RESPONSE_HEADER_LEN]) -> ResponseHeader {
        let [s0, s1, s2, s3, r0, r1, r2, r3, q0, q1, status, response] = *bytes;
        ResponseHeader {
            sense_len: u32::from_le_bytes([s0, s1, s2, s3]),
            residual: u32::from_le_bytes([r0, r1, r2, r3]),
            status_qualifier: u16::from_le_bytes([q0, q1]),
            status,
            response,
        }
    }

    /// VIRTIO_SCSI_S_OK and GOOD status.
    pub fn is_good(&self) -> bool {
        self.response == VIRTIO_SCSI_S_OK && self.status == STATUS_GOOD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_byte_cdbs_below_two_tib() {
        assert_eq!(read_write(false, 8, 8).as_slice(), &read10(8, 8));
        assert_eq!(
            read_write(true, 0xffff_fff8, 8).as_slice(),
            &write10(0xffff_fff8, 8, false)
        );
        // The last block below 2^32 is still reachable with READ(10).
        assert_eq!(read_write(false, 0xffff_ffff, 1).as_slice()[0], 0x28);
    }

    #[test]
    fn sixteen_byte_cdbs_beyond() {
        assert_eq!(
            read_write(false, 1 << 32, 8).as_slice(),
            &read16(1 << 32, 8)
        );
        // Crossing 2^32 blocks.
        assert_eq!(read_write(true, 0xffff_fffc, 8).as_slice()[0], 0x8a);
        // More blocks than READ(10) can carry.
        assert_eq!(read_write(false, 0, 0x1_0000).as_slice()[0], 0x88);
    }

    #[test]
    fn response_header_fields() {
        let h = ResponseHeader::parse(&[18, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2, 0]);
        assert_eq!(h.sense_len, 18);
        assert_eq!(h.residual, 512);
        assert_eq!(h.status, 2);
        assert!(!h.is_good());
    }
}
