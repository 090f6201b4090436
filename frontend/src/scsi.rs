//! What the driver puts in and reads out of a virtio-scsi request
//! (virtio 1.2 §5.6.6.1): the request header and the response header. The
//! CDBs that go in the request are [`crate::cdb`]'s.

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

/// The LUN field of a request: target 0, `lun` in flat space addressing,
/// as Linux's virtio_scsi driver writes it.
pub fn lun_field(lun: u16) -> [u8; 8] {
    [1, 0, 0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0]
}

/// `virtio_scsi_cmd_req` (virtio 1.2 §5.6.6.1) for the LUN field `lun`,
/// with the tag `id`, task attribute, priority and CRN zero, and `cdb`
/// padded with zeroes (or cut) to `cdb_size` bytes, the configuration
/// space's cdb_size (32 unless the driver set another).
pub fn request(lun: [u8; 8], id: u64, cdb: &[u8], cdb_size: usize) -> Vec<u8> {
    let mut req = Vec::with_capacity(19 + cdb_size);
    req.extend_from_slice(&lun);
    req.extend_from_slice(&id.to_le_bytes());
    req.extend_from_slice(&[0; 3]);
    req.extend_from_slice(&cdb[..cdb.len().min(cdb_size)]);
    req.resize(19 + cdb_size, 0);
    req
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
    fn request_header_fields() {
        let req = request(lun_field(300), 0x1234, &[0x12, 0, 0, 0, 96, 0], 32);
        assert_eq!(req.len(), REQUEST_LEN);
        assert_eq!(&req[..8], &[1, 0, 0x41, 0x2c, 0, 0, 0, 0]);
        assert_eq!(&req[8..16], &[0x34, 0x12, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&req[16..25], &[0, 0, 0, 0x12, 0, 0, 0, 96, 0]);
        assert!(req[25..].iter().all(|&b| b == 0));
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
