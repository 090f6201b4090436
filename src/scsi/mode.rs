//! MODE SENSE(6)/(10) (SPC-4 §6.11, §6.12): header, block descriptor and the
//! read-write error recovery, caching and control mode pages.

use super::cdb::{ModeSense, PageControl};
use super::error::{CommandError, CommandResult};

pub const PAGE_RW_ERROR_RECOVERY: u8 = 0x01;
pub const PAGE_CACHING: u8 = 0x08;
pub const PAGE_CONTROL: u8 = 0x0a;
pub const PAGE_ALL: u8 = 0x3f;
const SUBPAGE_ALL: u8 = 0xff;

/// What the mode data describes.
#[derive(Clone, Copy, Debug)]
pub struct ModeParams {
    pub blocks: u64,
    pub block_size: u32,
    pub read_only: bool,
    /// Write cache enabled (caching page WCE).
    pub write_cache: bool,
}

/// One mode page as (page code, current value, changeable mask); the default
/// value equals the current one since nothing is changeable yet.
fn page(code: u8, p: &ModeParams) -> ([u8; 20], usize) {
    let mut buf = [0u8; 20];
    let len = match code {
        // Read-write error recovery (SBC-3 §6.4.7): AWRE=1, ARRE=1 — the
        // host file system relocates blocks, never the guest.
        PAGE_RW_ERROR_RECOVERY => {
            buf[..12].copy_from_slice(&[
                PAGE_RW_ERROR_RECOVERY,
                0x0a,
                0xc0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ]);
            12
        }
        // Caching (SBC-3 §6.4.5): WCE as configured, read cache enabled.
        PAGE_CACHING => {
            buf[0] = PAGE_CACHING;
            buf[1] = 0x12;
            if p.write_cache {
                buf[2] = 0x04;
            }
            20
        }
        // Control (SPC-4 §7.5.8): fixed-format sense (D_SENSE=0), GLTSD=1
        // (no log parameters are saved), unrestricted reordering allowed
        // (QUEUE ALGORITHM MODIFIER 1), BUSY TIMEOUT PERIOD (bytes 8-9)
        // FFFFh = unlimited. Bytes 6-7 are obsolete (formerly READY AER
        // HOLDOFF PERIOD) and stay zero.
        PAGE_CONTROL => {
            buf[..12].copy_from_slice(&[
                PAGE_CONTROL,
                0x0a,
                0x02,
                0x10,
                0,
                0,
                0,
                0,
                0xff,
                0xff,
                0,
                0,
            ]);
            12
        }
        _ => 0,
    };
    (buf, len)
}

const PAGES: [u8; 3] = [PAGE_RW_ERROR_RECOVERY, PAGE_CACHING, PAGE_CONTROL];

/// Builds the full mode parameter data (before truncation to the
/// allocation length).
pub fn mode_sense(req: &ModeSense, p: &ModeParams) -> CommandResult<Vec<u8>> {
    // SPC-4 §6.11: saved values are not supported.
    if req.pc == PageControl::Saved {
        return Err(CommandError::SavingNotSupported);
    }
    let pages: &[u8] = if req.page == PAGE_ALL {
        &PAGES
    } else if let Some(i) = PAGES.iter().position(|&c| c == req.page) {
        &PAGES[i..=i]
    } else {
        return Err(CommandError::field_bit(2, 5));
    };
    // No page has subpages: only subpage 0 and "all subpages" exist.
    if req.subpage != 0 && req.subpage != SUBPAGE_ALL {
        return Err(CommandError::field(3));
    }

    let mut body = Vec::new();
    if !req.dbd {
        body.extend_from_slice(&block_descriptor(req, p));
    }
    let descriptor_len = body.len();
    for &code in pages {
        let (value, len) = page(code, p);
        match req.pc {
            PageControl::Changeable => {
                // Nothing is changeable: page code and length, then zeroes.
                body.extend_from_slice(&value[..2]);
                body.extend(std::iter::repeat_n(0u8, len - 2));
            }
            _ => body.extend_from_slice(&value[..len]),
        }
    }

    // Device-specific parameter (SBC-3 §6.4.1): WP.
    let device_specific = if p.read_only { 0x80 } else { 0 };
    let mut out = Vec::with_capacity(8 + body.len());
    if req.ten {
        let data_len = (6 + body.len()) as u16;
        out.extend_from_slice(&data_len.to_be_bytes());
        out.push(0); // medium type
        out.push(device_specific);
        out.push(u8::from(req.llbaa && descriptor_len == 16)); // LONGLBA
        out.push(0);
        out.extend_from_slice(&(descriptor_len as u16).to_be_bytes());
    } else {
        out.push((3 + body.len()).min(255) as u8);
        out.push(0);
        out.push(device_specific);
        out.push(descriptor_len as u8);
    }
    out.extend_from_slice(&body);
    Ok(out)
}

/// Short (8-byte) or, for MODE SENSE(10) with LLBAA, long (16-byte) LBA
/// block descriptor (SBC-3 §6.4.2).
fn block_descriptor(req: &ModeSense, p: &ModeParams) -> Vec<u8> {
    if req.ten && req.llbaa {
        let mut d = vec![0u8; 16];
        d[0..8].copy_from_slice(&p.blocks.to_be_bytes());
        d[12..16].copy_from_slice(&p.block_size.to_be_bytes());
        d
    } else {
        let mut d = vec![0u8; 8];
        // Too many blocks for 32 bits: FFFFFFFFh.
        let blocks = u32::try_from(p.blocks).unwrap_or(u32::MAX);
        d[0..4].copy_from_slice(&blocks.to_be_bytes());
        d[5..8].copy_from_slice(&p.block_size.to_be_bytes()[1..4]);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: ModeParams = ModeParams {
        blocks: 2048,
        block_size: 512,
        read_only: true,
        write_cache: false,
    };

    fn req(ten: bool, page: u8) -> ModeSense {
        ModeSense {
            ten,
            dbd: false,
            llbaa: false,
            pc: PageControl::Current,
            page,
            subpage: 0,
            alloc_len: 255,
        }
    }

    #[test]
    fn all_pages_6() {
        let d = mode_sense(&req(false, PAGE_ALL), &PARAMS).unwrap();
        assert_eq!(d[0] as usize, d.len() - 1);
        assert_eq!(d[2], 0x80, "WP set");
        assert_eq!(d[3], 8);
        assert_eq!(&d[4..8], &2048u32.to_be_bytes());
        assert_eq!(&d[9..12], &[0, 2, 0]);
        let pages = &d[12..];
        assert_eq!(pages[0], 0x01);
        assert_eq!(pages[12], 0x08);
        assert_eq!(pages[32], 0x0a);
        // Control page: obsolete bytes 6-7 zero, BUSY TIMEOUT PERIOD FFFFh.
        assert_eq!(&pages[38..42], &[0, 0, 0xff, 0xff]);
        assert_eq!(pages.len(), 12 + 20 + 12);
    }

    #[test]
    fn caching_page_10_dbd() {
        let mut r = req(true, PAGE_CACHING);
        r.dbd = true;
        let d = mode_sense(&r, &PARAMS).unwrap();
        assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
        assert_eq!(&d[6..8], &[0, 0]);
        assert_eq!(d[8], 0x08);
        assert_eq!(d[10] & 0x04, 0, "WCE off");
    }

    #[test]
    fn long_lba_descriptor() {
        let mut r = req(true, PAGE_CONTROL);
        r.llbaa = true;
        let big = ModeParams {
            blocks: 1 << 33,
            ..PARAMS
        };
        let d = mode_sense(&r, &big).unwrap();
        assert_eq!(d[4] & 1, 1);
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
        assert_eq!(&d[8..16], &(1u64 << 33).to_be_bytes());
        // Short descriptor saturates.
        let d = mode_sense(&req(false, PAGE_CONTROL), &big).unwrap();
        assert_eq!(&d[4..8], &[0xff; 4]);
    }

    #[test]
    fn changeable_is_all_zero() {
        let mut r = req(false, PAGE_ALL);
        r.pc = PageControl::Changeable;
        r.dbd = true;
        let d = mode_sense(&r, &PARAMS).unwrap();
        let pages = &d[4..];
        assert_eq!(&pages[..2], &[0x01, 0x0a]);
        assert!(pages[2..12].iter().all(|&b| b == 0));
    }

    #[test]
    fn errors() {
        let mut r = req(false, PAGE_ALL);
        r.pc = PageControl::Saved;
        assert!(matches!(
            mode_sense(&r, &PARAMS),
            Err(CommandError::SavingNotSupported)
        ));
        assert!(matches!(
            mode_sense(&req(false, 0x1c), &PARAMS),
            Err(CommandError::InvalidField {
                byte: 2,
                bit: Some(5)
            })
        ));
        let mut r = req(false, PAGE_CACHING);
        r.subpage = 1;
        assert!(matches!(
            mode_sense(&r, &PARAMS),
            Err(CommandError::InvalidField { byte: 3, bit: None })
        ));
        let mut r = req(false, PAGE_ALL);
        r.subpage = SUBPAGE_ALL;
        assert!(mode_sense(&r, &PARAMS).is_ok());
    }
}
