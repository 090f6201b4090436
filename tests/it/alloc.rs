//! The test binary's allocator: the system allocator, counting per thread
//! what the current thread allocates. Tests that assert on allocations
//! (`virtqueue`: a READ or WRITE allocates nothing; `bounds`: the peak of
//! live heap bytes per command) run the request path on their own thread,
//! so the counts are theirs alone while other tests run in parallel in the
//! same process — a global counter would count those tests too.
//!
//! What one thread frees counts against that thread, whoever allocated it:
//! live bytes can go below where a measurement started (memory allocated
//! before it and freed during it), so they are signed, and a peak is taken
//! relative to the level at the start, as a single global counter did when
//! the measured thread was the only one (`bounds` checked it: the same
//! peaks, byte for byte).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts, then forwards to [`System`].
struct CountingAllocator;

#[derive(Clone, Copy)]
struct Counts {
    /// Allocations (a reallocation counts as one, as the default
    /// `GlobalAlloc::realloc`, an alloc and a dealloc, would).
    allocations: u64,
    /// Bytes allocated minus bytes freed.
    live: i64,
    /// The highest `live` since the last [`reset_peak`].
    peak: i64,
}

thread_local! {
    static COUNTS: Cell<Counts> = const {
        Cell::new(Counts {
            allocations: 0,
            live: 0,
            peak: 0,
        })
    };
}

/// Applies `f` to this thread's counts; does nothing while the thread's
/// locals are being torn down.
fn update(f: impl FnOnce(&mut Counts)) {
    let _ = COUNTS.try_with(|c| {
        let mut counts = c.get();
        f(&mut counts);
        c.set(counts);
    });
}

fn grow(counts: &mut Counts, bytes: usize) {
    counts.live += bytes as i64;
    counts.peak = counts.peak.max(counts.live);
}

// SAFETY: forwards every call to the system allocator; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            update(|c| {
                c.allocations += 1;
                grow(c, layout.size());
            });
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        update(|c| c.live -= layout.size() as i64);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            update(|c| {
                c.allocations += 1;
                // Old and new blocks may both be live during the move.
                grow(c, new_size);
                c.live -= layout.size() as i64;
            });
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn counts() -> Counts {
    COUNTS.with(Cell::get)
}

/// Heap allocations the current thread has made so far.
pub fn allocations() -> u64 {
    counts().allocations
}

/// Starts a peak measurement on the current thread; returns the level it
/// starts from, for [`peak_since`].
pub fn reset_peak() -> i64 {
    let mut start = 0;
    update(|c| {
        c.peak = c.live;
        start = c.live;
    });
    start
}

/// The most live heap bytes the current thread held above `start` since
/// [`reset_peak`] returned it.
pub fn peak_since(start: i64) -> usize {
    usize::try_from(counts().peak - start).unwrap_or(0)
}
