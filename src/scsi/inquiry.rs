//! INQUIRY data (SPC-4 §6.6): standard data and the vital product data pages
//! this target implements, each describing only what is really implemented.

use super::error::{CommandError, CommandResult};

/// Peripheral device type: direct access block device (SPC-4 table 141).
pub(crate) const TYPE_DISK: u8 = 0x00;
/// Peripheral device type: well known logical unit.
pub(crate) const TYPE_WELL_KNOWN_LU: u8 = 0x1e;
/// Byte 0 for a LUN with no logical unit behind it: peripheral qualifier 011b,
/// device type 1Fh (SPC-4 §6.6.2).
pub(crate) const NO_LOGICAL_UNIT: u8 = 0x7f;

/// VPD page codes.
pub mod page {
    pub(crate) const SUPPORTED_PAGES: u8 = 0x00;
    pub(crate) const UNIT_SERIAL_NUMBER: u8 = 0x80;
    pub(crate) const DEVICE_IDENTIFICATION: u8 = 0x83;
    pub(crate) const BLOCK_LIMITS: u8 = 0xb0;
    pub(crate) const BLOCK_DEVICE_CHARACTERISTICS: u8 = 0xb1;
    pub(crate) const LOGICAL_BLOCK_PROVISIONING: u8 = 0xb2;
}

const SUPPORTED_VPD_PAGES: [u8; 6] = [
    page::SUPPORTED_PAGES,
    page::UNIT_SERIAL_NUMBER,
    page::DEVICE_IDENTIFICATION,
    page::BLOCK_LIMITS,
    page::BLOCK_DEVICE_CHARACTERISTICS,
    page::LOGICAL_BLOCK_PROVISIONING,
];

/// Identification strings and designators of a logical unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// T10 vendor identification, 8 ASCII bytes, space padded.
    pub vendor: [u8; 8],
    /// Product identification, 16 ASCII bytes, space padded.
    pub product: [u8; 16],
    /// Product revision level, 4 ASCII bytes.
    pub revision: [u8; 4],
    /// Unit serial number (printable ASCII).
    pub serial: String,
    /// NAA designator, 8 bytes (NAA 3 locally assigned or NAA 5/6 given by
    /// the operator).
    pub naa: u64,
}

pub const VENDOR: &str = "RUSTVMM";
pub const PRODUCT: &str = "VHOST-SCSI DISK";

/// Pads or cuts `s` to exactly `N` bytes with spaces.
pub fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    for (dst, src) in out.iter_mut().zip(s.bytes()) {
        *dst = src;
    }
    out
}

impl Identity {
    /// The default identity of the logical unit at `lun` serving the image
    /// at `canonical_path`: the same path and LUN give the same serial
    /// number and NAA designator across daemon restarts, and different LUNs
    /// never share them.
    pub fn derived(canonical_path: &str, lun: u16) -> Identity {
        let hash = fnv1a64(format!("{lun}:{canonical_path}").as_bytes());
        // NAA 3h: locally assigned, 60 bits of value (SPC-4 §7.8.6.6.2).
        let naa = (0x3u64 << 60) | (hash & 0x0fff_ffff_ffff_ffff);
        Identity {
            vendor: padded(VENDOR),
            product: padded(PRODUCT),
            revision: revision(env!("CARGO_PKG_VERSION")),
            serial: format!("{:016X}", hash),
            naa,
        }
    }
}

/// Product revision from a crate version: "major.minor", as 4 bytes
/// ("0.1.0" → "0.1 ").
fn revision(version: &str) -> [u8; 4] {
    let major_minor: Vec<&str> = version.split('.').take(2).collect();
    padded(&major_minor.join("."))
}

/// FNV-1a, 64 bit: a stable hash (unlike std's, which may change between
/// releases) for identifiers that must survive restarts and upgrades.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Standard INQUIRY data (SPC-4 §6.6.2, table 140) for a direct-access
/// logical unit (`byte0` = peripheral qualifier and device type).
pub fn standard(byte0: u8, identity: &Identity) -> Vec<u8> {
    let mut d = vec![0u8; 74];
    d[0] = byte0;
    d[2] = 0x06; // VERSION: SPC-4
    d[3] = 0x02; // RESPONSE DATA FORMAT 2
    d[4] = (d.len() - 5) as u8; // ADDITIONAL LENGTH
    d[7] = 0x02; // CMDQUE: the task set is managed by the device server
    d[8..16].copy_from_slice(&identity.vendor);
    d[16..32].copy_from_slice(&identity.product);
    d[32..36].copy_from_slice(&identity.revision);
    // Version descriptors (SPC-4 table 144): SAM-5, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// What the VPD pages report about a disk.
#[derive(Clone, Debug)]
pub struct VpdParams<'a> {
    pub identity: &'a Identity,
    /// Logical blocks per physical block, as a power of two.
    pub physical_exponent: u8,
    pub max_transfer_blocks: u32,
    pub solid_state: bool,
    pub max_compare_and_write_blocks: u8,
    pub max_write_same_blocks: u32,
    /// Zero where UNMAP is not offered.
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    /// UNMAP, WRITE SAME with UNMAP and GET LBA STATUS are offered; unmapped
    /// blocks read as zeroes.
    pub thin_provisioning: bool,
}

/// A VPD page (SPC-4 §7.8), or INVALID FIELD IN CDB for one not supported.
pub fn vpd(page_code: u8, p: &VpdParams) -> CommandResult<Vec<u8>> {
    let body = match page_code {
        page::SUPPORTED_PAGES => SUPPORTED_VPD_PAGES.to_vec(),
        page::UNIT_SERIAL_NUMBER => p.identity.serial.as_bytes().to_vec(),
        page::DEVICE_IDENTIFICATION => device_identification(p.identity),
        page::BLOCK_LIMITS => block_limits(p),
        page::BLOCK_DEVICE_CHARACTERISTICS => {
            // SBC-3 §6.5.2: MEDIUM ROTATION RATE 0001h = non-rotating,
            // 0000h = not reported.
            let mut b = vec![0u8; 0x3c];
            b[1] = u8::from(p.solid_state);
            b
        }
        page::LOGICAL_BLOCK_PROVISIONING => {
            // SBC-3 §6.5.4: LBPU, LBPWS, LBPWS10 and LBPRZ (holes read as
            // zeroes), provisioning type 2 (thin); or nothing at all.
            let mut b = vec![0u8; 4];
            if p.thin_provisioning {
                b[1] = 0x80 | 0x40 | 0x20 | 0x04;
                b[2] = 0x02;
            }
            b
        }
        _ => return Err(CommandError::field(2)),
    };
    let mut out = Vec::with_capacity(4 + body.len());
    out.push(TYPE_DISK);
    out.push(page_code);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// A VPD page of a well-known logical unit (SPC-4 §8.1): the Supported VPD
/// Pages page (00h) listing 00h and 83h, and the Device Identification
/// page (83h) with no designation descriptor — a well-known logical unit
/// has no logical unit name (SPC-4 §7.8.6.1 asks one of every logical
/// unit but well-known ones), and this target has no target port or
/// target device name to report. Any other page is INVALID FIELD IN CDB.
pub(crate) fn well_known_vpd(page_code: u8) -> CommandResult<Vec<u8>> {
    let body: &[u8] = match page_code {
        page::SUPPORTED_PAGES => &[page::SUPPORTED_PAGES, page::DEVICE_IDENTIFICATION],
        page::DEVICE_IDENTIFICATION => &[],
        _ => return Err(CommandError::field(2)),
    };
    let mut out = Vec::with_capacity(4 + body.len());
    out.push(TYPE_WELL_KNOWN_LU);
    out.push(page_code);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Device identification designators (SPC-4 §7.8.6): the NAA designator and
/// a T10 vendor ID designator, both associated with the logical unit.
fn device_identification(id: &Identity) -> Vec<u8> {
    let mut b = Vec::new();
    // NAA: code set 1 (binary), association 0 (LU), designator type 3.
    b.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
    b.extend_from_slice(&id.naa.to_be_bytes());
    // T10 vendor ID: code set 2 (ASCII), designator type 1: vendor
    // identification followed by the serial number.
    let t10_len = id.vendor.len() + id.serial.len();
    b.extend_from_slice(&[0x02, 0x01, 0x00, t10_len as u8]);
    b.extend_from_slice(&id.vendor);
    b.extend_from_slice(id.serial.as_bytes());
    b
}

/// Block limits (SBC-3 §6.5.3, table 197).
fn block_limits(p: &VpdParams) -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    // WSNZ: WRITE SAME with zero blocks is refused.
    b[0] = 0x01;
    b[1] = p.max_compare_and_write_blocks;
    // OPTIMAL TRANSFER LENGTH GRANULARITY: one physical block.
    let granularity = 1u16 << p.physical_exponent;
    b[2..4].copy_from_slice(&granularity.to_be_bytes());
    b[4..8].copy_from_slice(&p.max_transfer_blocks.to_be_bytes());
    b[16..20].copy_from_slice(&p.max_unmap_blocks.to_be_bytes());
    b[20..24].copy_from_slice(&p.max_unmap_descriptors.to_be_bytes());
    if p.thin_provisioning {
        // OPTIMAL UNMAP GRANULARITY: one physical block; UGAVALID with
        // alignment 0.
        b[24..28].copy_from_slice(&u32::from(granularity).to_be_bytes());
        b[28] = 0x80;
    }
    b[32..40].copy_from_slice(&u64::from(p.max_write_same_blocks).to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(id: &Identity) -> VpdParams<'_> {
        VpdParams {
            identity: id,
            physical_exponent: 3,
            max_transfer_blocks: 65535,
            solid_state: true,
            max_compare_and_write_blocks: 64,
            max_write_same_blocks: 1 << 21,
            max_unmap_blocks: 1 << 21,
            max_unmap_descriptors: 64,
            thin_provisioning: true,
        }
    }

    #[test]
    fn identity_is_stable_and_unique_per_lun() {
        let a = Identity::derived("/img/a.raw", 0);
        assert_eq!(a, Identity::derived("/img/a.raw", 0));
        let b = Identity::derived("/img/a.raw", 1);
        assert_ne!(a.naa, b.naa);
        assert_ne!(a.serial, b.serial);
        assert_eq!(a.naa >> 60, 3);
        assert_eq!(a.serial.len(), 16);
        // The value must not change between releases: pin it.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn standard_data() {
        let id = Identity::derived("/x", 0);
        let d = standard(TYPE_DISK, &id);
        assert_eq!(d[4] as usize, d.len() - 5);
        assert_eq!(&d[8..16], b"RUSTVMM ");
        assert_eq!(&d[16..32], b"VHOST-SCSI DISK ");
        assert_eq!(d[7] & 0x02, 0x02);
        assert_eq!(&revision("0.1.0"), b"0.1 ");
        assert_eq!(&revision("12.34.5"), b"12.3");
    }

    #[test]
    fn vpd_pages() {
        let id = Identity::derived("/x", 0);
        let p = params(&id);
        let sup = vpd(0x00, &p).unwrap();
        assert_eq!(&sup[4..], &SUPPORTED_VPD_PAGES);
        // Every listed page is served.
        for code in SUPPORTED_VPD_PAGES {
            let page = vpd(code, &p).unwrap();
            assert_eq!(page[1], code);
            assert_eq!(
                u16::from_be_bytes([page[2], page[3]]) as usize,
                page.len() - 4
            );
        }
        let serial = vpd(0x80, &p).unwrap();
        assert_eq!(&serial[4..], id.serial.as_bytes());
        let ident = vpd(0x83, &p).unwrap();
        assert_eq!(&ident[4..8], &[1, 3, 0, 8]);
        assert_eq!(&ident[8..16], &id.naa.to_be_bytes());
        let limits = vpd(0xb0, &p).unwrap();
        assert_eq!(u16::from_be_bytes([limits[6], limits[7]]), 8);
        assert_eq!(u32::from_be_bytes(limits[8..12].try_into().unwrap()), 65535);
        assert_eq!(limits[4] & 1, 1, "WSNZ");
        assert_eq!(limits[5], 64);
        assert_eq!(
            u32::from_be_bytes(limits[20..24].try_into().unwrap()),
            1 << 21
        );
        assert_eq!(u32::from_be_bytes(limits[24..28].try_into().unwrap()), 64);
        assert_eq!(
            u64::from_be_bytes(limits[36..44].try_into().unwrap()),
            1 << 21
        );
        let lbp = vpd(0xb2, &p).unwrap();
        assert_eq!(&lbp[4..8], &[0, 0xe4, 0x02, 0]);
        let chars = vpd(0xb1, &p).unwrap();
        assert_eq!(&chars[4..6], &[0, 1]);
        assert!(matches!(
            vpd(0x89, &p),
            Err(CommandError::InvalidField { byte: 2, bit: None })
        ));
    }
}
