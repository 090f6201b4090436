//! vhost-device-scsi: a vhost-user SCSI target serving raw disk images.
//!
//! A VMM (QEMU's `vhost-user-scsi-pci`) connects to the daemon's Unix socket
//! and hands it the queues of a virtio-scsi device; the daemon answers the
//! guest's SCSI commands from image files or block devices, one LUN per
//! image. The binary (`src/main.rs`) is a thin shell over this library:
//! command line ([`cli`]) → [`config::DaemonConfig`] → start-up
//! ([`config::build_target`] opens, locks and checks every image) →
//! [`daemon::serve`], one VMM connection after another.
//!
//! # Three layers, one direction
//!
//! Calls go down, never up: nothing below the transport sees a virtio type,
//! nothing in storage a SCSI one. Each layer has its own error type.
//!
//! - [`virtio`], the transport: vhost-user and virtio-scsi (virtio 1.2
//!   §5.6), descriptor chains over guest memory, the request, control and
//!   event queues, the configuration space. [`virtio::ScsiBackend`] is the
//!   device `vhost-user-backend` runs.
//! - [`scsi`], the SCSI target (SPC-4, SBC-3): a LUN address, CDB bytes and
//!   two data buffers behind the [`scsi::DataIn`] and [`scsi::DataOut`]
//!   traits go in, a [`scsi::Completion`] (status and sense) comes out.
//!   [`scsi::Target`] maps LUNs to [`scsi::Disk`]s, SBC direct-access
//!   logical units. Tests drive it with byte vectors ([`scsi::VecDataIn`]).
//! - [`storage`], where the blocks live: the [`storage::Storage`] trait,
//!   implemented by [`storage::FileImage`] (a regular file or block device,
//!   positional vectored I/O) and [`storage::MemImage`] (memory, for tests
//!   and fuzzing); the memory a transfer moves bytes into or out of as
//!   [`storage::IoBufsMut`] and [`storage::IoBufs`], piece lists that carry
//!   their lifetime and can only be built from byte slices or guest memory
//!   slices; and the I/O engines behind one completion-based interface
//!   (`storage::Engine`): a request (a transfer with its memory, or a
//!   flush) is submitted with a token and either done in the call or
//!   reaped later, with an eventfd signalled. `SyncEngine` does it in the
//!   call; `UringEngine` keeps up to 128 requests in flight per request
//!   queue ([`storage::IoEngine`] says which one a daemon uses).
//!
//! # Changing LUNs at run time
//!
//! With `--api-socket`, [`api`] serves JSON-RPC 2.0 (`lun_add`,
//! `lun_remove`, `lun_resize`, `lun_list`, `stats`, `version`) to the
//! operator's `vhost-device-scsi-ctl`; [`manage::LunManager`] carries the
//! calls out: it changes the [`scsi::Target`]'s LUN table (swapped
//! atomically, so commands never wait for it), and the guest is told by
//! unit attentions and by the events [`virtio::EventHub`] hands to the
//! worker thread that serves the event queue.
//!
//! The other side of the socket — a vhost-user virtio-scsi driver
//! negotiating like QEMU, the hostile frontend, the test kit and the load
//! generator `vhost-scsi-bench` — is a crate of its own,
//! `vhost-scsi-frontend` (`frontend/` in the repository), which the
//! integration tests use; the daemon ships none of it.
//!
//! # One request
//!
//! 1. The guest kicks a request queue; `vhost-user-backend`'s worker thread
//!    calls [`ScsiBackend::process_queue`](virtio::ScsiBackend::process_queue),
//!    which pops the available chains in a pass bounded in time.
//! 2. `split_chain` turns a chain into bounds-checked slices of guest
//!    memory; `start_command` reads the request header and CDB from them
//!    and hands the command to the target.
//! 3. READ, WRITE and SYNCHRONIZE CACHE are planned by the target
//!    (`Target::prepare`: range, protection, buffer size, FUA write-back)
//!    into storage work, which the transport hands over to the queue's
//!    engine, or to the storage's remote backend for NBD (`QueueIo`,
//!    holding the unit's `TransferAccess` until the result is in); so is
//!    every command to a passthrough unit (iSCSI), forwarded as it is.
//!    The result becomes status and sense in `Target::finish_work`. Every
//!    other command runs in [`scsi::Target::execute`].
//! 4. The response is written and the chain returned to the used ring, at
//!    once or when the engine's result is reaped. The guest is signalled
//!    every few chains and at the end of the pass, as EVENT_IDX asks.
//!
//! # Durability
//!
//! The logical unit decides, the storage carries out. [`scsi::Disk`] owns
//! the write cache state and the sticky flush error (a failed durable write
//! or flush fails every later flush, since the kernel reports a write-back
//! error only once), and asks for a durable write for FUA or with the write
//! cache off. [`storage::FileImage`] makes it durable with
//! `pwritev2(RWF_DSYNC)` (or a write and `fdatasync` where that is refused),
//! the io_uring engine with a WRITEV carrying `RWF_DSYNC`; SYNCHRONIZE CACHE
//! is a [`storage::Storage::flush`] (an FSYNC request on the ring with
//! io_uring).
//!
//! # Further reading
//!
//! In the repository: ARCHITECTURE.md (the modules, the path of a request
//! step by step, the design decisions) and docs/, one topic a page, listed
//! in docs/README.md: docs/usage.md for operators, docs/durability.md,
//! docs/io-uring.md, docs/hostile-guests.md and others in depth.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fdlimit;
pub mod logging;
pub mod manage;
pub mod sandbox;
pub mod scsi;
pub mod service;
pub mod state;
pub mod storage;
pub mod virtio;
