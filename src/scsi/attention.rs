//! Unit attention conditions (SAM-5 §5.14) a logical unit holds for its
//! initiator, and the rules that report and clear them.
//!
//! A vhost-user device has a single I_T nexus (the guest's virtio-scsi
//! driver), so a condition is per logical unit. The conditions kept:
//!
//! | condition | ASC/ASCQ | established by |
//! | --- | --- | --- |
//! | BUS DEVICE RESET FUNCTION OCCURRED | 29h/03h | LOGICAL UNIT RESET (SAM-5 §7.7) |
//! | I_T NEXUS LOSS OCCURRED | 29h/07h | I_T NEXUS RESET (SAM-5 §7.8) |
//! | CAPACITY DATA HAS CHANGED | 2Ah/09h | a resize (SBC-3 §4.6) |
//! | REPORTED LUNS DATA HAS CHANGED | 3Fh/0Eh | a LUN added or removed, on the others (SPC-4 §6.33) |
//!
//! With UA_INTLCK_CTRL 00b (the control mode page this target reports),
//! SAM-5 §5.14 says: a command other than INQUIRY, REPORT LUNS and REQUEST
//! SENSE ends in CHECK CONDITION with UNIT ATTENTION and the condition it
//! reports is cleared; INQUIRY neither reports nor clears; REPORT LUNS
//! reports none and clears REPORTED LUNS DATA HAS CHANGED (SPC-4 §6.33;
//! this target clears it on every LUN, since the one nexus has the
//! inventory again); REQUEST SENSE returns the condition as its sense data
//! and clears it (SPC-4 §6.39). Several pending conditions are reported one
//! per command, the resets first.
//!
//! The conditions are bits of one atomic byte, so the I/O path's check
//! is a single relaxed load that finds zero.

use std::sync::atomic::{AtomicU8, Ordering};

use super::sense::{self, Sense};

/// A unit attention condition; the discriminant is its bit, lower bits
/// reported first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum UnitAttention {
    /// 29h/03h, after a LOGICAL UNIT RESET.
    LogicalUnitReset = 1 << 0,
    /// 29h/07h, after an I_T NEXUS RESET.
    NexusLoss = 1 << 1,
    /// 2Ah/09h, after the capacity changed.
    CapacityChanged = 1 << 2,
    /// 3Fh/0Eh, after a LUN was added or removed.
    ReportedLunsChanged = 1 << 3,
}

impl UnitAttention {
    const ALL: [UnitAttention; 4] = [
        UnitAttention::LogicalUnitReset,
        UnitAttention::NexusLoss,
        UnitAttention::CapacityChanged,
        UnitAttention::ReportedLunsChanged,
    ];

    /// The sense key, ASC and ASCQ reporting it (SPC-4 Annex D).
    pub fn sense(self) -> Sense {
        match self {
            UnitAttention::LogicalUnitReset => sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED,
            UnitAttention::NexusLoss => sense::I_T_NEXUS_LOSS_OCCURRED,
            UnitAttention::CapacityChanged => sense::CAPACITY_DATA_HAS_CHANGED,
            UnitAttention::ReportedLunsChanged => sense::REPORTED_LUNS_DATA_HAS_CHANGED,
        }
    }

    fn from_bit(bit: u8) -> Option<UnitAttention> {
        UnitAttention::ALL.into_iter().find(|ua| *ua as u8 == bit)
    }
}

/// How a command is affected by pending unit attention conditions
/// (SAM-5 §5.14), by its operation code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Treatment {
    /// INQUIRY: neither reported nor cleared.
    Exempt,
    /// REPORT LUNS: none reported; REPORTED LUNS DATA HAS CHANGED cleared.
    ReportLuns,
    /// REQUEST SENSE: the condition is its sense data, and cleared.
    RequestSense,
    /// Anything else: terminated with the condition, which is cleared.
    Reported,
}

const INQUIRY: u8 = 0x12;
const REPORT_LUNS: u8 = 0xa0;
const REQUEST_SENSE: u8 = 0x03;

fn treatment(opcode: u8) -> Treatment {
    match opcode {
        INQUIRY => Treatment::Exempt,
        REPORT_LUNS => Treatment::ReportLuns,
        REQUEST_SENSE => Treatment::RequestSense,
        _ => Treatment::Reported,
    }
}

/// The unit attention conditions pending on one logical unit.
#[derive(Debug, Default)]
pub struct UnitAttentions {
    pending: AtomicU8,
}

impl UnitAttentions {
    /// Establishes `condition` (once: a condition already pending is not
    /// queued twice).
    pub fn establish(&self, condition: UnitAttention) {
        self.pending.fetch_or(condition as u8, Ordering::AcqRel);
    }

    /// Clears `condition` if pending.
    pub fn clear(&self, condition: UnitAttention) {
        self.pending.fetch_and(!(condition as u8), Ordering::AcqRel);
    }

    /// Whether any condition is pending (one relaxed load).
    #[inline]
    pub fn any(&self) -> bool {
        self.pending.load(Ordering::Relaxed) != 0
    }

    /// The conditions pending, reporting order first.
    #[cfg(test)]
    fn pending(&self) -> Vec<UnitAttention> {
        let bits = self.pending.load(Ordering::Acquire);
        UnitAttention::ALL
            .into_iter()
            .filter(|ua| bits & *ua as u8 != 0)
            .collect()
    }

    /// The pending conditions as their bits (for a state carried over to
    /// the next daemon).
    pub fn bits(&self) -> u8 {
        self.pending.load(Ordering::Acquire)
    }

    /// Establishes the conditions of `bits` (from [`UnitAttentions::bits`];
    /// unknown bits are ignored).
    pub fn establish_bits(&self, bits: u8) {
        let known = UnitAttention::ALL.iter().fold(0, |all, ua| all | *ua as u8);
        self.pending.fetch_or(bits & known, Ordering::AcqRel);
    }

    /// Takes the first pending condition, if any.
    fn take(&self) -> Option<UnitAttention> {
        let before = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                (bits != 0).then(|| bits & (bits - 1))
            })
            .ok()?;
        UnitAttention::from_bit(before & before.wrapping_neg())
    }

    /// What a command with operation code `opcode` meets: the condition
    /// that terminates it, or that REQUEST SENSE returns, taken off the
    /// pending ones. REPORT LUNS is answered with `None` and its clearing
    /// left to the target ([`UnitAttentions::clear`] on every unit).
    pub fn check(&self, opcode: u8) -> Option<UnitAttention> {
        if !self.any() {
            return None;
        }
        match treatment(opcode) {
            Treatment::Exempt | Treatment::ReportLuns => None,
            Treatment::RequestSense | Treatment::Reported => self.take(),
        }
    }

    /// Whether a command with `opcode` is terminated by a pending
    /// condition (and not REQUEST SENSE, which returns it as data).
    pub fn terminates(opcode: u8) -> bool {
        treatment(opcode) == Treatment::Reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::sense::SenseKey;

    #[test]
    fn the_sense_codes_are_spc4_annex_d() {
        let codes: Vec<(SenseKey, u8, u8)> = UnitAttention::ALL
            .into_iter()
            .map(|ua| (ua.sense().key, ua.sense().asc, ua.sense().ascq))
            .collect();
        assert_eq!(
            codes,
            [
                (SenseKey::UnitAttention, 0x29, 0x03),
                (SenseKey::UnitAttention, 0x29, 0x07),
                (SenseKey::UnitAttention, 0x2a, 0x09),
                (SenseKey::UnitAttention, 0x3f, 0x0e),
            ]
        );
    }

    #[test]
    fn one_condition_per_command_resets_first_each_cleared_once_reported() {
        let uas = UnitAttentions::default();
        uas.establish(UnitAttention::ReportedLunsChanged);
        uas.establish(UnitAttention::CapacityChanged);
        uas.establish(UnitAttention::NexusLoss);
        uas.establish(UnitAttention::CapacityChanged);
        // TEST UNIT READY (00h), READ(10) (28h), WRITE(10) (2Ah).
        assert_eq!(uas.check(0x00), Some(UnitAttention::NexusLoss));
        assert_eq!(uas.check(0x28), Some(UnitAttention::CapacityChanged));
        assert_eq!(uas.check(0x2a), Some(UnitAttention::ReportedLunsChanged));
        assert_eq!(uas.check(0x00), None);
        assert!(!uas.any());
    }

    #[test]
    fn inquiry_and_report_luns_neither_report_nor_clear() {
        let uas = UnitAttentions::default();
        uas.establish(UnitAttention::CapacityChanged);
        assert_eq!(uas.check(0x12), None);
        assert_eq!(uas.check(0xa0), None);
        assert_eq!(uas.pending(), [UnitAttention::CapacityChanged]);
        // REQUEST SENSE returns it, and it is gone.
        assert_eq!(uas.check(0x03), Some(UnitAttention::CapacityChanged));
        assert!(uas.pending().is_empty());
    }

    #[test]
    fn which_commands_a_condition_terminates() {
        assert!(!UnitAttentions::terminates(0x12));
        assert!(!UnitAttentions::terminates(0xa0));
        assert!(!UnitAttentions::terminates(0x03));
        for opcode in [0x00, 0x08, 0x28, 0x2a, 0x35, 0x25, 0x9e, 0x1a, 0x42] {
            assert!(UnitAttentions::terminates(opcode), "{opcode:#04x}");
        }
    }

    #[test]
    fn clear_removes_only_its_condition() {
        let uas = UnitAttentions::default();
        uas.establish(UnitAttention::ReportedLunsChanged);
        uas.establish(UnitAttention::LogicalUnitReset);
        uas.clear(UnitAttention::ReportedLunsChanged);
        assert_eq!(uas.pending(), [UnitAttention::LogicalUnitReset]);
    }
}
