//! Command-line interface.

use std::path::PathBuf;

use clap::Parser;

/// Most images one daemon serves (LUNs 0..=255).
pub const MAX_IMAGES: usize = 256;

/// vhost-user SCSI target: serves raw disk images to a virtual machine as
/// SCSI disks on target 0, one LUN per image in command-line order.
#[derive(Debug, Parser)]
#[command(name = "vhost-device-scsi", version, about, long_about = None)]
pub struct Cli {
    /// Unix socket to listen on for the VMM (QEMU's vhost-user-scsi-pci
    /// chardev); a stale socket file there is replaced.
    #[arg(short = 's', long = "socket-path", value_name = "PATH")]
    pub socket_path: PathBuf,

    /// Serve every image read-only: images are opened O_RDONLY and guest
    /// writes fail with DATA PROTECT.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,

    /// Report the disks as solid state (non-rotating) to the guest.
    #[arg(long = "solid-state")]
    pub solid_state: bool,

    /// Raw disk images (regular files or block devices), LUN 0 first; up to
    /// 256.
    #[arg(value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
}
