//! The daemon's integration tests, one binary linked once: each module was
//! a test binary of its own. Shared: the daemon process and a driver over
//! its socket (`common`, over the `vhost-scsi-frontend` crate, whose test
//! kit holds the CDB builders, sense assertions and fixtures) and the
//! binary's counting allocator (`alloc`, per thread, so the tests that
//! count allocations are not disturbed by the others running beside them).
//!
//! Two test binaries stay apart: `tests/fuzz.rs`, whose two targets spend
//! a wall-clock budget (FUZZ_SECONDS) side by side and whose watchdog
//! aborts the process on a hang, and `tests/guest.rs`, which boots QEMU
//! (`cargo test -- --skip guest_` leaves it out).

mod alloc;
mod common;

mod api;
mod bounds;
mod daemon;
mod docs;
mod durability;
mod emulator;
mod faults;
mod hostile;
mod hotplug;
mod inflight;
mod nbd;
mod network;
mod passthrough;
mod sandbox;
mod scale;
mod service;
mod virtqueue;
