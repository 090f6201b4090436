//! Logical unit numbers on the wire (SAM-5 §4.6): decoding the first level
//! of an 8-byte LUN field and encoding LUNs for REPORT LUNS.

/// Highest LUN expressible with flat space addressing (14 bits).
pub(crate) const MAX_LUN: u16 = 0x3fff;

/// The REPORT LUNS well-known logical unit (SAM-5 §4.6.12, W-LUN C101h).
const REPORT_LUNS_WLUN: [u8; 2] = [0xc1, 0x01];

/// What an 8-byte LUN field addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LunAddress {
    /// An ordinary logical unit number.
    Lun(u16),
    /// The REPORT LUNS well-known logical unit.
    ReportLunsWlun,
    /// An address method or level this target does not use; no logical unit
    /// is there.
    Unsupported,
}

impl LunAddress {
    /// Decodes a single-level LUN. Both peripheral device addressing
    /// (method 00b, bus 0: `00 LL`, used by Windows' vioscsi) and flat space
    /// addressing (method 01b: `4H LL`, used by Linux and SeaBIOS) are
    /// accepted; the lower levels must be zero.
    pub fn decode(lun: &[u8; 8]) -> LunAddress {
        if lun[2..].iter().any(|&b| b != 0) {
            return LunAddress::Unsupported;
        }
        match lun[0] >> 6 {
            0b00 if lun[0] == 0 => LunAddress::Lun(u16::from(lun[1])),
            0b01 => LunAddress::Lun(u16::from(lun[0] & 0x3f) << 8 | u16::from(lun[1])),
            0b11 if lun[..2] == REPORT_LUNS_WLUN => LunAddress::ReportLunsWlun,
            _ => LunAddress::Unsupported,
        }
    }

    /// Encodes for a REPORT LUNS entry: peripheral device addressing below
    /// 256, flat space addressing above (as Linux's int_to_scsilun does).
    pub fn encode(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        match self {
            LunAddress::Lun(n) if n < 256 => out[1] = n as u8,
            LunAddress::Lun(n) => {
                out[0] = 0x40 | ((n >> 8) as u8 & 0x3f);
                out[1] = n as u8;
            }
            LunAddress::ReportLunsWlun => out[..2].copy_from_slice(&REPORT_LUNS_WLUN),
            LunAddress::Unsupported => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lun(b0: u8, b1: u8) -> [u8; 8] {
        [b0, b1, 0, 0, 0, 0, 0, 0]
    }

    #[test]
    fn decodes_both_methods() {
        assert_eq!(LunAddress::decode(&lun(0x00, 5)), LunAddress::Lun(5));
        assert_eq!(LunAddress::decode(&lun(0x40, 5)), LunAddress::Lun(5));
        assert_eq!(
            LunAddress::decode(&lun(0x7f, 0xff)),
            LunAddress::Lun(MAX_LUN)
        );
        assert_eq!(
            LunAddress::decode(&lun(0xc1, 0x01)),
            LunAddress::ReportLunsWlun
        );
    }

    #[test]
    fn rejects_other_methods_and_levels() {
        // Peripheral addressing with a bus number, extended/logical unit
        // addressing, another well-known LUN, a second level.
        assert_eq!(LunAddress::decode(&lun(0x01, 0)), LunAddress::Unsupported);
        assert_eq!(LunAddress::decode(&lun(0x80, 0)), LunAddress::Unsupported);
        assert_eq!(
            LunAddress::decode(&lun(0xc1, 0x02)),
            LunAddress::Unsupported
        );
        let mut two_level = lun(0x40, 1);
        two_level[3] = 1;
        assert_eq!(LunAddress::decode(&two_level), LunAddress::Unsupported);
    }

    #[test]
    fn encode_round_trips() {
        for n in [0u16, 1, 255, 256, 1000, MAX_LUN] {
            let a = LunAddress::Lun(n);
            assert_eq!(LunAddress::decode(&a.encode()), a);
        }
        assert_eq!(LunAddress::Lun(7).encode(), lun(0, 7));
        assert_eq!(LunAddress::Lun(256).encode(), lun(0x41, 0));
    }
}
