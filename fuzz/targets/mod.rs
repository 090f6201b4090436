//! Fuzz targets shared by the cargo-fuzz wrappers (`fuzz/fuzz_targets/`,
//! libFuzzer, nightly) and the stable driver (`tests/fuzz.rs`), which both
//! include this directory with `#[path]`. Each target is a plain
//! `fn run(&[u8])` that panics when an invariant breaks; each also has an
//! encoder and a structured generator for the stable driver and the seed
//! corpus. Only the crate's public API is used.

pub mod cdb;
pub mod oracle;
pub mod request;

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vhost_device_scsi::storage::{Extent, IoBufs, IoBufsMut, MemImage, Storage};

/// Outcome counters of the current thread's executions, so a run can show
/// which paths its inputs reached.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub counts: [u64; 16],
}

thread_local! {
    static STATS: std::cell::Cell<Stats> = std::cell::Cell::new(Stats::default());
}

/// Counts one event `i` (below 16).
pub fn count(i: usize) {
    STATS.with(|s| {
        let mut v = s.get();
        v.counts[i % 16] += 1;
        s.set(v);
    });
}

/// The counters named by `names` (index order), as `name n` pairs.
pub fn stats(names: &[&str]) -> String {
    let v = STATS.with(|s| s.get());
    names
        .iter()
        .zip(v.counts)
        .filter(|(n, _)| !n.is_empty())
        .map(|(n, c)| format!("{n} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a fuzz input front to back; past the end every read gives zeroes,
/// so any byte string decodes.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn le(&mut self, n: usize) -> u64 {
        self.bytes(n)
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }

    pub fn u8(&mut self) -> u8 {
        self.le(1) as u8
    }

    pub fn u16(&mut self) -> u16 {
        self.le(2) as u16
    }

    pub fn u24(&mut self) -> u32 {
        self.le(3) as u32
    }

    pub fn u32(&mut self) -> u32 {
        self.le(4) as u32
    }

    pub fn u64(&mut self) -> u64 {
        self.le(8)
    }
}

/// Builds an input in the layout [`Input`] reads.
#[derive(Default)]
pub struct Encoder(pub Vec<u8>);

impl Encoder {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u24(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes()[..3]);
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// xorshift64*: the generators' and the stable driver's randomness.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Deterministic image contents.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A [`Storage`] over a [`MemImage`] that checks every access: reads,
/// writes, zeroing and extent queries must lie inside the image, nothing
/// may write a read-only image (the logical unit must refuse first), and it
/// counts the calls that change the image.
pub struct Checked {
    pub image: Arc<MemImage>,
    pub changes: Arc<AtomicUsize>,
    name: &'static str,
}

impl Checked {
    pub fn new(image: Arc<MemImage>, name: &'static str) -> Self {
        Checked {
            image,
            changes: Arc::new(AtomicUsize::new(0)),
            name,
        }
    }

    /// What a test keeps of a storage it hands to a disk.
    pub fn handle(&self) -> Handle {
        Handle {
            image: self.image.clone(),
            changes: self.changes.clone(),
        }
    }

    fn check(&self, what: &str, offset: u64, len: u64) {
        let size = self.image.size();
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= size),
            "{}: {what} of {len} bytes at {offset} outside the {size}-byte image",
            self.name
        );
    }

    fn change(&self, what: &str, offset: u64, len: u64) {
        assert!(
            !self.image.read_only(),
            "{}: {what} of {len} bytes at {offset} reached read-only storage",
            self.name
        );
        self.check(what, offset, len);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The image and change counter behind a [`Checked`].
#[derive(Clone)]
pub struct Handle {
    pub image: Arc<MemImage>,
    pub changes: Arc<AtomicUsize>,
}

impl Storage for Checked {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        self.image.read_only()
    }

    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        self.check("read", offset, bufs.len() as u64);
        self.image.read_vectored_at(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64, durable: bool) -> io::Result<()> {
        self.change("write", offset, bufs.len() as u64);
        self.image.write_vectored_at(bufs, offset, durable)
    }

    fn flush(&self) -> io::Result<()> {
        self.image.flush()
    }

    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        self.change("zeroing", offset, len);
        self.image.write_zeroes(offset, len, deallocate)
    }

    fn extent(&self, offset: u64) -> io::Result<Extent> {
        assert!(
            offset < self.image.size(),
            "{}: extent query at {offset}, at or past the end",
            self.name
        );
        self.image.extent(offset)
    }
}

/// Sense keys.
pub mod key {
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const MISCOMPARE: u8 = 0x0e;
}

/// Every (key, ASC, ASCQ) the target may report (SPC-4 Annex D), written
/// out here rather than taken from the crate.
const KNOWN_SENSE: [(u8, u8, u8); 13] = [
    (key::ILLEGAL_REQUEST, 0x20, 0x00), // INVALID COMMAND OPERATION CODE
    (key::ILLEGAL_REQUEST, 0x21, 0x00), // LBA OUT OF RANGE
    (key::ILLEGAL_REQUEST, 0x24, 0x00), // INVALID FIELD IN CDB
    (key::ILLEGAL_REQUEST, 0x25, 0x00), // LOGICAL UNIT NOT SUPPORTED
    (key::ILLEGAL_REQUEST, 0x39, 0x00), // SAVING PARAMETERS NOT SUPPORTED
    (key::ILLEGAL_REQUEST, 0x1a, 0x00), // PARAMETER LIST LENGTH ERROR
    (key::ILLEGAL_REQUEST, 0x26, 0x00), // INVALID FIELD IN PARAMETER LIST
    (key::ILLEGAL_REQUEST, 0x0e, 0x03), // INVALID FIELD IN COMMAND INFORMATION UNIT
    (key::DATA_PROTECT, 0x27, 0x00),    // WRITE PROTECTED
    (key::DATA_PROTECT, 0x27, 0x07),    // SPACE ALLOCATION FAILED WRITE PROTECT
    (key::MEDIUM_ERROR, 0x11, 0x00),    // UNRECOVERED READ ERROR
    (key::MEDIUM_ERROR, 0x0c, 0x00),    // WRITE ERROR
    (key::MISCOMPARE, 0x1d, 0x00),      // MISCOMPARE DURING VERIFY OPERATION
];

/// What is known about the command a sense came from.
pub struct SenseContext {
    /// CDB length the operation code implies (field pointers into the CDB
    /// must stay inside it).
    pub cdb_len: usize,
    /// Bytes of parameter data the command had (field pointers into the
    /// parameter list must stay inside it).
    pub param_len: usize,
    /// The descriptor format the logical unit is in (D_SENSE).
    pub descriptor: bool,
}

/// The parts of a well-formed sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    pub information: Option<u64>,
}

/// Checks that `sense` is well-formed current-error sense data (SPC-4
/// §4.5.2 descriptor or §4.5.3 fixed format) in the format the unit is in,
/// with a known key/ASC/ASCQ, a field pointer only for INVALID FIELD (and
/// pointing inside the CDB or parameter list), and INFORMATION only for a
/// miscompare. Panics otherwise.
pub fn check_sense(sense: &[u8], ctx: &SenseContext) -> Parsed {
    assert!(!sense.is_empty(), "empty sense data");
    let (parsed, field) = if ctx.descriptor {
        check_descriptor_sense(sense)
    } else {
        check_fixed_sense(sense)
    };
    assert!(
        KNOWN_SENSE.contains(&(parsed.key, parsed.asc, parsed.ascq)),
        "unknown sense {sense:02x?}"
    );
    match field {
        Some(sks) => {
            assert!(
                parsed.key == key::ILLEGAL_REQUEST && matches!(parsed.asc, 0x24 | 0x26),
                "field pointer without INVALID FIELD: {sense:02x?}"
            );
            let in_cdb = sks[0] & 0x40 != 0;
            assert_eq!(in_cdb, parsed.asc == 0x24, "C/D bit: {sense:02x?}");
            assert_eq!(sks[0] & 0x30, 0, "reserved bits: {sense:02x?}");
            let byte = usize::from(u16::from_be_bytes([sks[1], sks[2]]));
            let limit = if in_cdb { ctx.cdb_len } else { ctx.param_len };
            assert!(
                byte < limit,
                "field pointer {byte} outside the {limit}-byte {}: {sense:02x?}",
                if in_cdb { "CDB" } else { "parameter list" }
            );
        }
        None => assert!(
            !(parsed.key == key::ILLEGAL_REQUEST && parsed.asc == 0x24),
            "INVALID FIELD IN CDB without a field pointer: {sense:02x?}"
        ),
    }
    if parsed.information.is_some() {
        assert_eq!(parsed.key, key::MISCOMPARE, "INFORMATION: {sense:02x?}");
    }
    parsed
}

fn check_fixed_sense(sense: &[u8]) -> (Parsed, Option<[u8; 3]>) {
    assert_eq!(sense.len(), 18, "fixed sense length: {sense:02x?}");
    assert_eq!(
        sense[0] & 0x7f,
        0x70,
        "fixed-format response code: {sense:02x?}"
    );
    assert_eq!(
        usize::from(sense[7]),
        sense.len() - 8,
        "ADDITIONAL SENSE LENGTH"
    );
    assert_eq!(sense[2] & 0xf0, 0, "FILEMARK/EOM/ILI: {sense:02x?}");
    let information = (sense[0] & 0x80 != 0).then(|| {
        u64::from(u32::from_be_bytes(
            sense[3..7].try_into().unwrap_or_default(),
        ))
    });
    let sks = [sense[15], sense[16], sense[17]];
    let field = if sks[0] & 0x80 != 0 {
        Some(sks)
    } else {
        assert_eq!(sks, [0, 0, 0], "sense-key specific bytes without SKSV");
        None
    };
    let parsed = Parsed {
        key: sense[2] & 0x0f,
        asc: sense[12],
        ascq: sense[13],
        information,
    };
    (parsed, field)
}

fn check_descriptor_sense(sense: &[u8]) -> (Parsed, Option<[u8; 3]>) {
    assert!(sense.len() >= 8, "descriptor sense too short: {sense:02x?}");
    assert_eq!(
        sense[0], 0x72,
        "descriptor-format response code: {sense:02x?}"
    );
    assert_eq!(
        usize::from(sense[7]),
        sense.len() - 8,
        "ADDITIONAL SENSE LENGTH"
    );
    let mut information = None;
    let mut field = None;
    let mut rest = &sense[8..];
    while !rest.is_empty() {
        assert!(rest.len() >= 2, "truncated descriptor: {sense:02x?}");
        let len = 2 + usize::from(rest[1]);
        assert!(
            rest.len() >= len,
            "descriptor overruns the sense: {sense:02x?}"
        );
        let d = &rest[..len];
        match d[0] {
            // Information (SPC-4 §4.5.2.2): VALID set, 8-byte INFORMATION.
            0x00 => {
                assert_eq!(&d[1..4], &[0x0a, 0x80, 0x00], "{sense:02x?}");
                assert!(information.is_none(), "two information descriptors");
                information = Some(u64::from_be_bytes(d[4..12].try_into().unwrap_or_default()));
            }
            // Sense-key specific (SPC-4 §4.5.2.3).
            0x02 => {
                assert_eq!(&d[1..4], &[0x06, 0x00, 0x00], "{sense:02x?}");
                assert!(field.is_none(), "two sense-key specific descriptors");
                assert!(d[4] & 0x80 != 0, "SKSV clear: {sense:02x?}");
                field = Some([d[4], d[5], d[6]]);
            }
            other => panic!("unexpected sense descriptor type {other:#x}: {sense:02x?}"),
        }
        rest = &rest[len..];
    }
    let parsed = Parsed {
        key: sense[1] & 0x0f,
        asc: sense[2],
        ascq: sense[3],
        information,
    };
    (parsed, field)
}

/// A byte range `[start, end)`, for overlap tests.
pub fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}
