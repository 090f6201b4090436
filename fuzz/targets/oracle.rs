//! The data oracle of the `cdb` target: a model of every LUN's image and
//! what SBC-3 / SPC-4 say the block commands must do to it.
//!
//! Each command is decoded here, from the CDB layouts of SBC-3 §5 (not by
//! the crate's parser), before it runs; [`Plan::check`] then judges the
//! completion against the model and updates it:
//!
//! - a READ(6/10/12/16) that completes GOOD returns exactly the model's
//!   bytes; a *well-formed* one in range (see [`Plan::well_formed`]) must be
//!   GOOD, or MEDIUM ERROR where the storage double injects read errors;
//! - a GOOD WRITE(6/10/12/16) / WRITE AND VERIFY puts its data-out into the
//!   model, WRITE SAME replicates its one block (zeroes with NDOB; with
//!   LBPRZ=1 unmapped blocks read as zeroes, so UNMAP=1 changes nothing in
//!   what is read back), UNMAP zeroes its ranges, COMPARE AND WRITE writes
//!   only when its verify data equals the model, else MISCOMPARE with the
//!   offset of the first differing byte (SBC-3 §5.3) and no change;
//! - a write-class command that would write blocks of a write-protected unit
//!   never completes GOOD, and a well-formed one must end in DATA PROTECT,
//!   WRITE PROTECTED (SBC-3, write protection); CDB validation may come first for one
//!   that is not well-formed (SPC-4 leaves the order open). UNMAP is an
//!   exception: a unit that is not thin provisioned (LBPU=0; the daemon
//!   offers thin provisioning only on writable units with discard on) does
//!   not support it, so INVALID COMMAND OPERATION CODE is right too;
//! - a well-formed command in range never ends in ILLEGAL REQUEST;
//! - a GOOD block command whose range is out of range is a failure (LBA OUT
//!   OF RANGE is required);
//! - after any command that changed an image or the model, the image's
//!   stored bytes equal the model's, byte for byte.
//!
//! What the model knows of the storage double ([`LunSpec`]): reads touching
//! the error blocks fail (MEDIUM ERROR, UNRECOVERED READ ERROR); on a LUN
//! whose flushes fail, or whose sparse tail takes no data, a durable write
//! may end in MEDIUM ERROR, WRITE ERROR (the model does not track WCE, so
//! it accepts that for any write there), after which the command's range is
//! taken from the image (a failed write may have written part of it); a
//! write into the sparse tail fails with SPACE ALLOCATION FAILED WRITE
//! PROTECT.

use std::borrow::Cow;
use std::ops::Range;

use super::cdb::{initial_contents, LunSpec, LUNS};
use super::{count, key, overlaps, Handle, Parsed};

// Operation codes and CDB lengths: the test kit's, written out from SBC-3
// and SPC-4 rather than taken from the crate.
use vhost_scsi_frontend::cdb::length as group_length;
use vhost_scsi_frontend::cdb::op::{
    COMPARE_AND_WRITE, READ_10, READ_12, READ_16, READ_6, UNMAP, WRITE_10, WRITE_12, WRITE_16,
    WRITE_6, WRITE_AND_VERIFY_10, WRITE_AND_VERIFY_12, WRITE_AND_VERIFY_16, WRITE_SAME_10,
    WRITE_SAME_16,
};

/// MAXIMUM COMPARE AND WRITE LENGTH the units report (block limits VPD):
/// any length up to it must be accepted.
const MAX_COMPARE_AND_WRITE_BLOCKS: u64 = 64;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT the units report.
const MAX_UNMAP_DESCRIPTORS: usize = 64;

/// The stored bytes of every LUN as they should be.
pub struct Model {
    luns: Vec<Cow<'static, [u8]>>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            luns: (0..LUNS.len())
                .map(|n| Cow::Borrowed(initial_contents(n)))
                .collect(),
        }
    }
}

impl Model {
    /// `len` bytes at `offset` of LUN `n` (the sparse tail reads as zero).
    fn read(&self, n: usize, offset: u64, len: usize) -> Vec<u8> {
        let data = &self.luns[n];
        let start = (offset as usize).min(data.len());
        let end = (offset as usize + len).min(data.len());
        let mut v = data[start..end].to_vec();
        v.resize(len, 0);
        v
    }

    /// Writes `bytes` at `offset` of LUN `n`; the part in the sparse tail
    /// must be zeroes (the tail holds nothing else).
    fn write(&mut self, n: usize, offset: u64, bytes: &[u8], what: &dyn Fn() -> String) {
        let data = self.luns[n].to_mut();
        let start = offset as usize;
        let stored = data.len().saturating_sub(start).min(bytes.len());
        if stored > 0 {
            data[start..start + stored].copy_from_slice(&bytes[..stored]);
        }
        assert!(
            bytes[stored..].iter().all(|&b| b == 0),
            "GOOD, but data went to the sparse tail that cannot hold it: {}",
            what()
        );
    }

    /// Takes bytes `range` of LUN `n` from the image (after a failed write
    /// that may have written part of them).
    fn resync(&mut self, n: usize, image: &[u8], range: Range<u64>) {
        let data = self.luns[n].to_mut();
        let end = (range.end as usize).min(data.len());
        let start = (range.start as usize).min(end);
        data[start..end].copy_from_slice(&image[start..end]);
    }
}

/// How a command ended, as the oracle compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Good,
    TooSmall,
    Sense(u8, u8, u8),
}

const WRITE_PROTECTED: Outcome = Outcome::Sense(key::DATA_PROTECT, 0x27, 0x00);
const NO_SPACE: Outcome = Outcome::Sense(key::DATA_PROTECT, 0x27, 0x07);
const READ_ERROR: Outcome = Outcome::Sense(key::MEDIUM_ERROR, 0x11, 0x00);
const WRITE_ERROR: Outcome = Outcome::Sense(key::MEDIUM_ERROR, 0x0c, 0x00);
const MISCOMPARE: Outcome = Outcome::Sense(key::MISCOMPARE, 0x1d, 0x00);
const INVALID_OPCODE: Outcome = Outcome::Sense(key::ILLEGAL_REQUEST, 0x20, 0x00);

/// A block command as SBC-3 defines it.
#[derive(Clone, Debug)]
enum Op {
    Read,
    /// WRITE (`bytchk` None) or WRITE AND VERIFY.
    Write {
        bytchk: Option<u8>,
    },
    /// WRITE SAME; `blocks` 0 means "to the last LBA" (SBC-3 §5.42).
    WriteSame {
        unmap: bool,
        ndob: bool,
    },
    /// UNMAP with its descriptors (LBA, blocks) as decoded leniently.
    Unmap {
        ranges: Vec<(u64, u64)>,
    },
    CompareAndWrite,
    /// Anything else: the oracle has nothing to say about it.
    Other,
}

/// What the oracle expects of one command, worked out before it runs.
pub struct Plan {
    op: Op,
    lun: Option<usize>,
    lba: u64,
    blocks: u64,
    /// Every field as SBC-3 defines it, none the unit may refuse: a
    /// complete CDB (bytes past its end read as zero), reserved bits,
    /// protection fields, group number and control byte zero, lengths
    /// within the unit's limits, a data-out that fits the command. Such a
    /// command in range must not end in ILLEGAL REQUEST.
    pub well_formed: bool,
    /// Outcomes allowed for a well-formed command (empty: not decided).
    allowed: Vec<Outcome>,
}

fn byte(cdb: &[u8], i: usize) -> u8 {
    cdb.get(i).copied().unwrap_or(0)
}

fn be(cdb: &[u8], start: usize, len: usize) -> u64 {
    (start..start + len).fold(0, |acc, i| (acc << 8) | u64::from(byte(cdb, i)))
}

/// LBA, transfer length and the GROUP NUMBER byte of a 10/12/16-byte
/// block command (SBC-3 §5).
fn range_fields(cdb: &[u8], len: usize) -> (u64, u64, u8) {
    match len {
        10 => (be(cdb, 2, 4), be(cdb, 7, 2), byte(cdb, 6)),
        12 => (be(cdb, 2, 4), be(cdb, 6, 4), byte(cdb, 10)),
        _ => (be(cdb, 2, 8), be(cdb, 10, 4), byte(cdb, 14)),
    }
}

/// Thin provisioned (LBPME=1, LBPU=1, LBPWS=1, LBPRZ=1): writable with
/// discard configured.
fn thin(spec: &LunSpec) -> bool {
    spec.discard && !spec.read_only
}

impl Plan {
    /// Decodes `cdb` for LUN `lun` (None: no logical unit) with `data_out`
    /// and a `data_in`-byte buffer, against the model as it is now.
    pub fn new(
        model: &Model,
        lun: Option<usize>,
        cdb: &[u8],
        data_out: &[u8],
        data_in: usize,
    ) -> Plan {
        let mut plan = Plan {
            op: Op::Other,
            lun,
            lba: 0,
            blocks: 0,
            well_formed: false,
            allowed: Vec::new(),
        };
        let Some(n) = lun else {
            return plan;
        };
        let spec = &LUNS[n];
        let op = byte(cdb, 0);
        let len = group_length(op);
        // Byte 1 bits DPO (4) and FUA (3) are the only ones a READ or WRITE
        // may set here (RDPROTECT/WRPROTECT need protection information,
        // which the units do not have; FUA_NV and bit 0 are obsolete).
        let plain =
            |mask: u8| cdb.len() >= len && byte(cdb, len - 1) == 0 && byte(cdb, 1) & !mask == 0;
        let bs = u64::from(spec.block_size);
        let capacity = spec.size / bs;
        let (lba, blocks, mut well_formed) = match op {
            READ_6 | WRITE_6 => {
                plan.op = if op == READ_6 {
                    Op::Read
                } else {
                    Op::Write { bytchk: None }
                };
                // SBC-3 §5.12, §5.35: TRANSFER LENGTH 0 is 256 blocks.
                let blocks = match byte(cdb, 4) {
                    0 => 256,
                    b => u64::from(b),
                };
                let lba = be(cdb, 1, 3) & 0x1f_ffff;
                (lba, blocks, plain(0x1f))
            }
            READ_10 | READ_12 | READ_16 | WRITE_10 | WRITE_12 | WRITE_16 => {
                plan.op = if matches!(op, READ_10 | READ_12 | READ_16) {
                    Op::Read
                } else {
                    Op::Write { bytchk: None }
                };
                let (lba, blocks, group) = range_fields(cdb, len);
                (lba, blocks, plain(0x18) && group == 0)
            }
            WRITE_AND_VERIFY_10 | WRITE_AND_VERIFY_12 | WRITE_AND_VERIFY_16 => {
                // SBC-3 §5.38: byte 1 WRPROTECT, DPO, BYTCHK (bits 2-1:
                // 00b verify the medium, 01b compare with the data-out).
                let bytchk = (byte(cdb, 1) >> 1) & 3;
                plan.op = Op::Write {
                    bytchk: Some(bytchk),
                };
                let (lba, blocks, group) = range_fields(cdb, len);
                (lba, blocks, plain(0x16) && group == 0 && bytchk <= 1)
            }
            WRITE_SAME_10 | WRITE_SAME_16 => {
                // SBC-3 §5.41, §5.42: byte 1 WRPROTECT, ANCHOR, UNMAP (bit
                // 3), NDOB (bit 0, WRITE SAME(16) only).
                let unmap = byte(cdb, 1) & 0x08 != 0;
                let ndob = op == WRITE_SAME_16 && byte(cdb, 1) & 0x01 != 0;
                plan.op = Op::WriteSame { unmap, ndob };
                let (lba, blocks, group) = range_fields(cdb, len);
                let mask = if op == WRITE_SAME_16 { 0x09 } else { 0x08 };
                let data_ok = if ndob {
                    data_out.is_empty()
                } else {
                    data_out.len() as u64 == bs
                };
                // NUMBER OF LOGICAL BLOCKS 0 is refused with WSNZ=1 (which
                // the units report), so only 1 or more is well-formed;
                // UNMAP=1 needs LBPWS=1.
                let ok =
                    plain(mask) && group == 0 && blocks > 0 && data_ok && (!unmap || thin(spec));
                (lba, blocks, ok)
            }
            UNMAP => {
                let (ranges, ok) = unmap_list(cdb, data_out, capacity);
                plan.op = Op::Unmap { ranges };
                // SBC-3 §5.28: byte 1 ANCHOR, bytes 2-5 reserved.
                (0, 0, ok && plain(0) && be(cdb, 2, 5) == 0)
            }
            COMPARE_AND_WRITE => {
                plan.op = Op::CompareAndWrite;
                // SBC-3 §5.3: byte 1 WRPROTECT, DPO, FUA, FUA_NV; bytes
                // 10-12 reserved; NUMBER OF LOGICAL BLOCKS in byte 13.
                let blocks = u64::from(byte(cdb, 13));
                let ok = plain(0x18)
                    && be(cdb, 10, 3) == 0
                    && byte(cdb, 14) == 0
                    && blocks <= MAX_COMPARE_AND_WRITE_BLOCKS;
                (be(cdb, 2, 8), blocks, ok)
            }
            _ => return plan,
        };
        plan.lba = lba;
        plan.blocks = blocks;
        let in_range = lba.checked_add(blocks).is_some_and(|end| end <= capacity);
        well_formed &= in_range;
        plan.well_formed = well_formed;
        if !well_formed {
            return plan;
        }
        let fua = byte(cdb, 1) & 0x08 != 0;
        let bytes = blocks * bs;
        let offset = lba * bs;
        let touches = |r: &Range<u64>| overlaps(&(lba..lba + blocks), r);
        let read_error = blocks > 0 && touches(&spec.read_errors);
        let tail = blocks > 0 && offset + bytes > spec.stored as u64;
        // Durable writes (FUA, WCE=0, WRITE AND VERIFY) may fail here.
        let flaky = spec.failing_flushes || (spec.stored as u64) < spec.size;
        let mut allowed = Vec::new();
        match &plan.op {
            Op::Read => {
                if (data_in as u64) < bytes {
                    allowed.push(Outcome::TooSmall);
                } else {
                    allowed.push(if read_error {
                        READ_ERROR
                    } else {
                        Outcome::Good
                    });
                    if flaky && fua {
                        // SBC-3 §5.11: cached writes are flushed first.
                        allowed.push(WRITE_ERROR);
                    }
                }
            }
            Op::Write { bytchk } => {
                if spec.read_only {
                    allowed.push(WRITE_PROTECTED);
                    if blocks == 0 {
                        allowed.push(Outcome::Good);
                    }
                    if (data_out.len() as u64) < bytes {
                        allowed.push(Outcome::TooSmall);
                    }
                } else if (data_out.len() as u64) < bytes {
                    allowed.push(Outcome::TooSmall);
                } else if blocks == 0 {
                    allowed.push(Outcome::Good);
                } else {
                    if tail {
                        allowed.push(NO_SPACE);
                    } else if bytchk.is_some() && read_error {
                        allowed.push(READ_ERROR);
                    } else {
                        allowed.push(Outcome::Good);
                    }
                    if flaky {
                        allowed.push(WRITE_ERROR);
                    }
                }
            }
            Op::WriteSame { unmap, ndob } => {
                if spec.read_only {
                    allowed.push(WRITE_PROTECTED);
                } else {
                    let zeroes = *ndob || data_out.iter().all(|&b| b == 0);
                    if tail {
                        // Unmapping zeroes needs no space; anything else
                        // does, which the sparse tail has not.
                        allowed.push(NO_SPACE);
                        if *unmap && zeroes {
                            allowed.push(Outcome::Good);
                        }
                    } else {
                        allowed.push(Outcome::Good);
                    }
                    if flaky {
                        allowed.push(WRITE_ERROR);
                    }
                }
            }
            Op::Unmap { ranges } => {
                if !thin(spec) {
                    // LBPU=0: UNMAP is not supported (SPC-4 §4.3.5.1).
                    allowed.push(INVALID_OPCODE);
                    if spec.read_only {
                        allowed.push(WRITE_PROTECTED);
                        if ranges.iter().all(|r| r.1 == 0) {
                            allowed.push(Outcome::Good);
                        }
                    }
                } else {
                    allowed.push(Outcome::Good);
                    if flaky {
                        allowed.push(WRITE_ERROR);
                    }
                }
            }
            Op::CompareAndWrite => {
                if spec.read_only {
                    allowed.push(WRITE_PROTECTED);
                    if blocks == 0 {
                        allowed.push(Outcome::Good);
                    } else if (data_out.len() as u64) < 2 * bytes {
                        allowed.push(Outcome::TooSmall);
                    }
                } else if blocks == 0 {
                    allowed.push(Outcome::Good);
                } else if (data_out.len() as u64) < 2 * bytes {
                    allowed.push(Outcome::TooSmall);
                } else {
                    let medium = model.read(n, offset, bytes as usize);
                    if read_error {
                        allowed.push(READ_ERROR);
                    } else if medium[..] != data_out[..bytes as usize] {
                        allowed.push(MISCOMPARE);
                    } else if tail {
                        allowed.push(NO_SPACE);
                    } else {
                        allowed.push(Outcome::Good);
                    }
                    if flaky {
                        allowed.push(WRITE_ERROR);
                    }
                }
            }
            Op::Other => {}
        }
        plan.allowed = allowed;
        plan
    }

    fn range(&self, bs: u64, capacity: u64) -> Option<Range<u64>> {
        let end = self.lba.checked_add(self.blocks)?;
        (end <= capacity).then(|| self.lba * bs..end * bs)
    }

    /// Judges the command's `outcome` (with the sense's INFORMATION) and
    /// its data-in, updates the model and compares the images with it.
    /// `changed[n]`: the storage of LUN `n` saw a change call.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &self,
        model: &mut Model,
        handles: &[Handle],
        changed: &[bool],
        outcome: Outcome,
        sense: Option<&Parsed>,
        data_in: &[u8],
        data_out: &[u8],
        what: &dyn Fn() -> String,
    ) {
        for (m, &c) in changed.iter().enumerate() {
            assert!(!c || self.lun == Some(m), "LUN {m} changed by {}", what());
        }
        let Some(n) = self.lun else {
            return;
        };
        if !self.allowed.is_empty() {
            count(7);
            assert!(
                self.allowed.contains(&outcome),
                "{outcome:?} where only {:?} are right: {}",
                self.allowed,
                what()
            );
        } else if self.well_formed {
            assert!(
                !matches!(outcome, Outcome::Sense(key::ILLEGAL_REQUEST, ..)),
                "ILLEGAL REQUEST for a well-formed command: {}",
                what()
            );
        }
        let spec = &LUNS[n];
        let bs = u64::from(spec.block_size);
        let capacity = spec.size / bs;
        let good = outcome == Outcome::Good;
        let mut model_changed = false;
        let mut resync: Option<Range<u64>> = None;
        let range = self.range(bs, capacity);
        let writes = match &self.op {
            Op::Other => false,
            Op::Read => {
                if good && self.blocks > 0 {
                    let r = range
                        .clone()
                        .unwrap_or_else(|| panic!("GOOD for a READ out of range: {}", what()));
                    let expected = model.read(n, r.start, (r.end - r.start) as usize);
                    assert!(
                        data_in == &expected[..],
                        "READ returned other data than the image holds ({} bytes, expected {}; first difference at {:?}): {}",
                        data_in.len(),
                        expected.len(),
                        data_in.iter().zip(&expected).position(|(a, b)| a != b),
                        what()
                    );
                }
                false
            }
            Op::Write { bytchk } => {
                if good && self.blocks > 0 {
                    let r = range
                        .clone()
                        .unwrap_or_else(|| panic!("GOOD for a write out of range: {}", what()));
                    let len = (r.end - r.start) as usize;
                    assert!(
                        data_out.len() >= len,
                        "GOOD for a write with a short data-out: {}",
                        what()
                    );
                    if matches!(bytchk, None | Some(0 | 1)) {
                        model.write(n, r.start, &data_out[..len], what);
                        model_changed = true;
                    } else {
                        resync = Some(r);
                    }
                } else if !good {
                    resync = range.clone();
                }
                self.blocks > 0
            }
            Op::WriteSame { unmap, ndob } => {
                // NUMBER OF LOGICAL BLOCKS 0: through the last LBA.
                let r = if self.blocks == 0 {
                    (self.lba < capacity).then(|| self.lba * bs..capacity * bs)
                } else {
                    range.clone()
                };
                if good {
                    let r = r.unwrap_or_else(|| {
                        panic!("GOOD for a WRITE SAME out of range: {}", what())
                    });
                    assert!(
                        !*unmap || thin(spec),
                        "GOOD for WRITE SAME with UNMAP where LBPWS=0: {}",
                        what()
                    );
                    let block = if *ndob {
                        vec![0; bs as usize]
                    } else {
                        assert!(
                            data_out.len() as u64 >= bs,
                            "GOOD for WRITE SAME without a data-out block: {}",
                            what()
                        );
                        data_out[..bs as usize].to_vec()
                    };
                    let mut offset = r.start;
                    while offset < r.end {
                        model.write(n, offset, &block, what);
                        offset += bs;
                    }
                    model_changed = true;
                } else {
                    resync = r;
                }
                true
            }
            Op::Unmap { ranges } => {
                let any = ranges.iter().any(|r| r.1 > 0);
                if good && self.well_formed {
                    for &(lba, blocks) in ranges {
                        let len = (blocks * bs) as usize;
                        model.write(n, lba * bs, &vec![0; len], what);
                    }
                    model_changed = any;
                } else if good || changed[n] {
                    // Not decided how the unit reads the parameter list:
                    // UNMAP only ever zeroes (LBPRZ=1).
                    let old = &model.luns[n];
                    handles[n].image.with_data(|image| {
                        let bad = (0..image.len()).find(|&i| image[i] != old[i] && image[i] != 0);
                        if let Some(i) = bad {
                            panic!("UNMAP wrote {:#04x} at byte {i}: {}", image[i], what());
                        }
                    });
                    resync = Some(0..spec.size);
                }
                any
            }
            Op::CompareAndWrite => {
                let r = range.clone();
                if good && self.blocks > 0 {
                    let r = r.unwrap_or_else(|| {
                        panic!("GOOD for COMPARE AND WRITE out of range: {}", what())
                    });
                    let len = (r.end - r.start) as usize;
                    assert!(
                        data_out.len() >= 2 * len,
                        "GOOD for COMPARE AND WRITE with a short data-out: {}",
                        what()
                    );
                    let medium = model.read(n, r.start, len);
                    assert!(
                        medium[..] == data_out[..len],
                        "GOOD for COMPARE AND WRITE whose verify data differs: {}",
                        what()
                    );
                    model.write(n, r.start, &data_out[len..2 * len], what);
                    model_changed = true;
                } else if outcome == MISCOMPARE {
                    let r = r.unwrap_or_else(|| panic!("MISCOMPARE out of range: {}", what()));
                    let len = (r.end - r.start) as usize;
                    let medium = model.read(n, r.start, len);
                    let at = medium
                        .iter()
                        .zip(data_out)
                        .position(|(a, b)| a != b)
                        .unwrap_or_else(|| {
                            panic!("MISCOMPARE, but the verify data matches: {}", what())
                        });
                    // SBC-3 §5.3: INFORMATION is the offset in the data-out
                    // of the first byte that differs.
                    let info = sense.and_then(|s| s.information);
                    assert_eq!(info, Some(at as u64), "MISCOMPARE INFORMATION: {}", what());
                } else if !good {
                    resync = r;
                }
                self.blocks > 0
            }
        };
        if spec.read_only && writes {
            assert!(
                !good,
                "GOOD for a write to a write-protected unit: {}",
                what()
            );
        }
        // ILLEGAL REQUEST, WRITE PROTECTED, a buffer too small and a
        // COMPARE AND WRITE miscompare change nothing; the rest of the
        // failures of a write-class command may have written its range.
        let unchanged = matches!(
            outcome,
            Outcome::TooSmall | Outcome::Sense(key::ILLEGAL_REQUEST, ..)
        ) || outcome == WRITE_PROTECTED
            || (outcome == MISCOMPARE && matches!(self.op, Op::CompareAndWrite));
        if !unchanged {
            if let Some(r) = resync {
                if changed[n] {
                    handles[n]
                        .image
                        .with_data(|image| model.resync(n, image, r));
                }
            }
        }
        if changed[n] || model_changed {
            count(8);
            let expected = &model.luns[n];
            let differs = handles[n].image.with_data(|image| {
                (image != &expected[..])
                    .then(|| image.iter().zip(expected.iter()).position(|(a, b)| a != b))
            });
            if let Some(at) = differs {
                panic!(
                    "LUN {n}: image differs from the model at byte {at:?} (LBA {:?}) after {outcome:?}: {}",
                    at.map(|a| a as u64 / bs),
                    what()
                );
            }
        }
    }
}

/// The ranges of an UNMAP parameter list (SBC-3 §5.28.2) and whether the
/// list is well-formed: PARAMETER LIST LENGTH 0 (nothing to do) or at least
/// 8, all of it in the data-out, UNMAP DATA LENGTH and UNMAP BLOCK
/// DESCRIPTOR DATA LENGTH consistent with it, whole descriptors, at most
/// the reported maximum of them, reserved bytes zero, every range on the
/// medium. Descriptors are taken leniently (as many whole ones as the
/// lengths and data-out allow) whether well-formed or not.
fn unmap_list(cdb: &[u8], data_out: &[u8], capacity: u64) -> (Vec<(u64, u64)>, bool) {
    let param_len = be(cdb, 7, 2) as usize;
    if param_len == 0 {
        return (Vec::new(), true);
    }
    let list = &data_out[..param_len.min(data_out.len())];
    if list.len() < 8 {
        return (Vec::new(), false);
    }
    let data_len = be(list, 0, 2) as usize;
    let desc_len = be(list, 2, 2) as usize;
    let count = desc_len.min(list.len() - 8) / 16;
    let ranges: Vec<(u64, u64)> = list[8..8 + 16 * count]
        .chunks_exact(16)
        .map(|d| (be(d, 0, 8), be(d, 8, 4)))
        .collect();
    let ok = list.len() == param_len
        && data_len == param_len - 2
        && desc_len == param_len - 8
        && desc_len % 16 == 0
        && count <= MAX_UNMAP_DESCRIPTORS
        && be(list, 4, 4) == 0
        && list[8..].chunks_exact(16).all(|d| be(d, 12, 4) == 0)
        && ranges
            .iter()
            .all(|&(lba, n)| lba.checked_add(n).is_some_and(|e| e <= capacity));
    (ranges, ok)
}
