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

// Sense keys and the check of a sense's form: the test kit's
// (vhost_scsi_frontend::sense), shared with the daemon's tests.
pub use vhost_scsi_frontend::sense::{check_sense, key, Parsed, SenseContext};

/// A byte range `[start, end)`, for overlap tests.
pub fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}
