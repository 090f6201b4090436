//! MODE SENSE(6)/(10) (SPC-4 §6.11, §6.12): header, block descriptor and the
//! read-write error recovery, caching and control mode pages.

use super::cdb::{ModeSense, PageControl};
use super::error::{CommandError, CommandResult};

pub(crate) const PAGE_RW_ERROR_RECOVERY: u8 = 0x01;
pub(crate) const PAGE_CACHING: u8 = 0x08;
pub(crate) const PAGE_CONTROL: u8 = 0x0a;
pub(crate) const PAGE_ALL: u8 = 0x3f;
const SUBPAGE_ALL: u8 = 0xff;

/// What the mode data describes.
#[derive(Clone, Copy, Debug)]
pub struct ModeParams {
    pub blocks: u64,
    pub block_size: u32,
    pub read_only: bool,
    /// Write cache enabled (caching page WCE).
    pub write_cache: bool,
    /// Descriptor-format sense (control page D_SENSE).
    pub descriptor_sense: bool,
}

/// Values MODE SELECT may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeChanges {
    pub write_cache: bool,
    pub descriptor_sense: bool,
}

/// WCE: byte 2, bit 2 of the caching page (SBC-3 §6.4.5).
const WCE: u8 = 0x04;
/// D_SENSE: byte 2, bit 2 of the control page (SPC-4 §7.5.8).
const D_SENSE: u8 = 0x04;

const PAGE_BUF: usize = 20;

/// One mode page's current values and length, or `None` for a page this
/// device does not have.
fn page(code: u8, p: &ModeParams) -> Option<([u8; PAGE_BUF], usize)> {
    let mut buf = [0u8; PAGE_BUF];
    let len = match code {
        // Read-write error recovery (SBC-3 §6.4.7): AWRE=1, ARRE=1 — the
        // host file system relocates blocks, never the guest.
        PAGE_RW_ERROR_RECOVERY => {
            buf[..4].copy_from_slice(&[PAGE_RW_ERROR_RECOVERY, 0x0a, 0xc0, 0]);
            12
        }
        // Caching (SBC-3 §6.4.5): WCE as configured, read cache enabled.
        PAGE_CACHING => {
            buf[0] = PAGE_CACHING;
            buf[1] = 0x12;
            if p.write_cache {
                buf[2] = WCE;
            }
            20
        }
        // Control (SPC-4 §7.5.8): D_SENSE as configured, GLTSD=1 (no log
        // parameters are saved), unrestricted reordering allowed (QUEUE
        // ALGORITHM MODIFIER 1); bytes 6-7 are obsolete; busy timeout
        // period FFFFh = unlimited.
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
            if p.descriptor_sense {
                buf[2] |= D_SENSE;
            }
            12
        }
        _ => return None,
    };
    Some((buf, len))
}

/// Bits of a page that MODE SELECT may change (its "changeable values").
fn changeable(code: u8) -> [u8; PAGE_BUF] {
    let mut mask = [0u8; PAGE_BUF];
    match code {
        PAGE_CACHING => mask[2] = WCE,
        PAGE_CONTROL => mask[2] = D_SENSE,
        _ => {}
    }
    mask
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
    // Default values: write cache on, fixed-format sense.
    let defaults = ModeParams {
        write_cache: true,
        descriptor_sense: false,
        ..*p
    };
    for &code in pages {
        let Some((current, len)) = page(code, p) else {
            continue;
        };
        match req.pc {
            PageControl::Changeable => {
                let mut mask = changeable(code);
                mask[..2].copy_from_slice(&current[..2]);
                body.extend_from_slice(&mask[..len]);
            }
            PageControl::Default => {
                if let Some((default, _)) = page(code, &defaults) {
                    body.extend_from_slice(&default[..len]);
                }
            }
            _ => body.extend_from_slice(&current[..len]),
        }
    }

    // Device-specific parameter (SBC-3 §6.4.1): WP, and DPOFUA=1 (the DPO
    // and FUA bits are supported).
    let device_specific = if p.read_only { 0x80 } else { 0 } | 0x10;
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

/// Validates MODE SELECT parameter data (SPC-4 §6.9, §7.5) against the
/// current values and returns the values to apply. Only changeable bits may
/// differ; anything else is INVALID FIELD IN PARAMETER LIST pointing at it.
/// Nothing is applied unless every page is valid.
pub fn mode_select(ten: bool, data: &[u8], p: &ModeParams) -> CommandResult<ModeChanges> {
    let mut changes = ModeChanges {
        write_cache: p.write_cache,
        descriptor_sense: p.descriptor_sense,
    };
    let header_len = if ten { 8 } else { 4 };
    if data.is_empty() {
        return Ok(changes);
    }
    if data.len() < header_len {
        return Err(CommandError::ParamListLength);
    }
    // Medium type must be 0 (SBC-3 §6.4.1).
    let medium_type_at = if ten { 2 } else { 1 };
    if data[medium_type_at] != 0 {
        return Err(CommandError::param(medium_type_at));
    }
    let (descriptor_len, long_lba) = if ten {
        (
            usize::from(u16::from_be_bytes([data[6], data[7]])),
            data[4] & 0x01 != 0,
        )
    } else {
        (usize::from(data[3]), false)
    };
    let expected_len = if long_lba { 16 } else { 8 };
    if descriptor_len != 0 && descriptor_len != expected_len {
        return Err(CommandError::param(if ten { 6 } else { 3 }));
    }
    let mut pos = header_len;
    if descriptor_len > 0 {
        let d = data
            .get(pos..pos + descriptor_len)
            .ok_or(CommandError::ParamListLength)?;
        let (blocks, block_len, len_at) = if long_lba {
            (
                u64::from_be_bytes(d[0..8].try_into().unwrap_or_default()),
                u32::from_be_bytes(d[12..16].try_into().unwrap_or_default()),
                12,
            )
        } else {
            (
                u64::from(u32::from_be_bytes(d[0..4].try_into().unwrap_or_default())),
                u32::from_be_bytes([0, d[5], d[6], d[7]]),
                5,
            )
        };
        // The capacity and block size cannot change; zero blocks means
        // "no change" (SBC-3 §6.4.2).
        let current_blocks = if long_lba {
            p.blocks
        } else {
            p.blocks.min(u64::from(u32::MAX))
        };
        if blocks != 0 && blocks != current_blocks {
            return Err(CommandError::param(pos));
        }
        if block_len != p.block_size {
            return Err(CommandError::param(pos + len_at));
        }
        pos += descriptor_len;
    }
    while pos < data.len() {
        let header = data
            .get(pos..pos + 2)
            .ok_or(CommandError::ParamListLength)?;
        // SPF=1: sub-page format; no page here has subpages.
        if header[0] & 0x40 != 0 {
            return Err(CommandError::InvalidParamField {
                byte: u16::try_from(pos).unwrap_or(u16::MAX),
                bit: Some(6),
            });
        }
        let code = header[0] & 0x3f;
        let Some((current, len)) = page(code, p) else {
            return Err(CommandError::param(pos));
        };
        let sent_len = usize::from(header[1]) + 2;
        if sent_len != len {
            return Err(CommandError::param(pos + 1));
        }
        let sent = data
            .get(pos..pos + len)
            .ok_or(CommandError::ParamListLength)?;
        let mask = changeable(code);
        for i in 2..len {
            let diff = (sent[i] ^ current[i]) & !mask[i];
            if diff != 0 {
                return Err(CommandError::InvalidParamField {
                    byte: u16::try_from(pos + i).unwrap_or(u16::MAX),
                    bit: Some(7 - diff.leading_zeros() as u8),
                });
            }
        }
        match code {
            PAGE_CACHING => changes.write_cache = sent[2] & WCE != 0,
            PAGE_CONTROL => changes.descriptor_sense = sent[2] & D_SENSE != 0,
            _ => {}
        }
        pos += len;
    }
    Ok(changes)
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
        descriptor_sense: false,
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
        assert_eq!(d[2], 0x90, "WP and DPOFUA set");
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
    fn changeable_values() {
        let mut r = req(false, PAGE_ALL);
        r.pc = PageControl::Changeable;
        r.dbd = true;
        let d = mode_sense(&r, &PARAMS).unwrap();
        let pages = &d[4..];
        assert_eq!(&pages[..2], &[0x01, 0x0a]);
        assert!(pages[2..12].iter().all(|&b| b == 0));
        // Caching: only WCE; control: only D_SENSE.
        assert_eq!(&pages[12..15], &[0x08, 0x12, 0x04]);
        assert!(pages[15..32].iter().all(|&b| b == 0));
        assert_eq!(&pages[32..35], &[0x0a, 0x0a, 0x04]);
        assert!(pages[35..44].iter().all(|&b| b == 0));
        // Default values: WCE on.
        r.pc = PageControl::Default;
        let d = mode_sense(&r, &PARAMS).unwrap();
        assert_eq!(d[4 + 12 + 2] & 0x04, 0x04);
    }

    /// MODE SELECT(6) data: header without block descriptor, then `pages`.
    fn select6(pages: &[u8]) -> Vec<u8> {
        let mut d = vec![0, 0, 0, 0];
        d.extend_from_slice(pages);
        d
    }

    fn current_page(code: u8, p: &ModeParams) -> Vec<u8> {
        let (buf, len) = page(code, p).unwrap();
        buf[..len].to_vec()
    }

    #[test]
    fn select_changes_wce_and_d_sense() {
        let mut caching = current_page(PAGE_CACHING, &PARAMS);
        caching[2] |= 0x04;
        caching[0] |= 0x80; // PS is ignored
        let mut control = current_page(PAGE_CONTROL, &PARAMS);
        control[2] |= 0x04;
        let mut pages = caching.clone();
        pages.extend_from_slice(&control);
        let c = mode_select(false, &select6(&pages), &PARAMS).unwrap();
        assert!(c.write_cache && c.descriptor_sense);
        // Empty parameter list: no change.
        assert_eq!(
            mode_select(false, &[], &PARAMS).unwrap(),
            ModeChanges {
                write_cache: false,
                descriptor_sense: false
            }
        );
    }

    #[test]
    fn select_rejects_other_changes() {
        let mut caching = current_page(PAGE_CACHING, &PARAMS);
        caching[2] |= 0x01; // RCD is not changeable
        assert!(matches!(
            mode_select(false, &select6(&caching), &PARAMS),
            Err(CommandError::InvalidParamField {
                byte: 6,
                bit: Some(0)
            })
        ));
        // Unknown page, wrong page length, truncated page, subpage format.
        assert!(matches!(
            mode_select(false, &select6(&[0x1c, 0x0a, 0, 0]), &PARAMS),
            Err(CommandError::InvalidParamField { byte: 4, bit: None })
        ));
        let mut short = current_page(PAGE_CONTROL, &PARAMS);
        short[1] = 8;
        assert!(matches!(
            mode_select(false, &select6(&short), &PARAMS),
            Err(CommandError::InvalidParamField { byte: 5, bit: None })
        ));
        let control = current_page(PAGE_CONTROL, &PARAMS);
        assert!(matches!(
            mode_select(false, &select6(&control[..6]), &PARAMS),
            Err(CommandError::ParamListLength)
        ));
        assert!(matches!(
            mode_select(false, &select6(&[0x48, 0x12]), &PARAMS),
            Err(CommandError::InvalidParamField {
                byte: 4,
                bit: Some(6)
            })
        ));
        assert!(matches!(
            mode_select(false, &[0, 0], &PARAMS),
            Err(CommandError::ParamListLength)
        ));
        // Medium type must be zero.
        assert!(matches!(
            mode_select(false, &[0, 1, 0, 0], &PARAMS),
            Err(CommandError::InvalidParamField { byte: 1, bit: None })
        ));
    }

    #[test]
    fn select_block_descriptor() {
        // MODE SELECT(10) with a short descriptor: same block size, zero or
        // the current number of blocks.
        let mut d = vec![0, 0, 0, 0, 0, 0, 0, 8];
        d.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0]);
        assert!(mode_select(true, &d, &PARAMS).is_ok());
        d[8..12].copy_from_slice(&2048u32.to_be_bytes());
        assert!(mode_select(true, &d, &PARAMS).is_ok());
        d[8..12].copy_from_slice(&4096u32.to_be_bytes());
        assert!(matches!(
            mode_select(true, &d, &PARAMS),
            Err(CommandError::InvalidParamField { byte: 8, bit: None })
        ));
        d[8..12].copy_from_slice(&0u32.to_be_bytes());
        d[14] = 0x10; // 4096-byte blocks
        assert!(matches!(
            mode_select(true, &d, &PARAMS),
            Err(CommandError::InvalidParamField {
                byte: 13,
                bit: None
            })
        ));
        // Descriptor length neither 0 nor 8.
        let d = vec![0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0];
        assert!(matches!(
            mode_select(true, &d, &PARAMS),
            Err(CommandError::InvalidParamField { byte: 6, bit: None })
        ));
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
