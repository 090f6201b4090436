//! From the command line to a configured SCSI target: opens and checks every
//! image, with errors that name the image and what is wrong with it.

use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::cli::{Cli, MAX_IMAGES};
use crate::scsi::inquiry::Identity;
use crate::scsi::{Disk, DiskConfig, DiskError, Target};
use crate::storage::{FileImage, ImageKind, OpenError};

/// Logical block size of every LUN.
pub const BLOCK_SIZE: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("too many images: {0} given, at most {MAX_IMAGES} (LUNs 0-255)")]
    TooManyImages(usize),
    #[error("image {}: {source}", .path.display())]
    Open { path: PathBuf, source: OpenError },
    #[error("image {}: {source}", .path.display())]
    Disk { path: PathBuf, source: DiskError },
}

/// Opens the images named on the command line as LUNs 0..N-1.
pub fn build_target(cli: &Cli) -> Result<Target, ConfigError> {
    if cli.images.len() > MAX_IMAGES {
        return Err(ConfigError::TooManyImages(cli.images.len()));
    }
    if !cli.read_only {
        warn!("write support is not implemented yet: every image is served read-only");
    }
    let mut disks = Vec::with_capacity(cli.images.len());
    for (lun, path) in cli.images.iter().enumerate() {
        let (disk, kind) = open_disk(path, lun as u16, cli.solid_state)?;
        info!(
            "LUN {lun}: {} ({} bytes, {} blocks of {} bytes, {}, {})",
            path.display(),
            disk.blocks() * u64::from(disk.block_size()),
            disk.blocks(),
            disk.block_size(),
            if disk.read_only() {
                "read-only"
            } else {
                "read-write"
            },
            match kind {
                ImageKind::RegularFile => "regular file",
                ImageKind::BlockDevice => "block device",
            },
        );
        disks.push(disk);
    }
    Ok(Target::new(disks))
}

fn open_disk(path: &Path, lun: u16, solid_state: bool) -> Result<(Disk, ImageKind), ConfigError> {
    let image = FileImage::open(path, true).map_err(|source| ConfigError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // The identity follows the image's canonical path, so that renaming a
    // symlink or changing the working directory does not change it.
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let config = DiskConfig {
        block_size: BLOCK_SIZE,
        identity: Identity::derived(&canonical.to_string_lossy(), lun),
        solid_state,
        discard: false,
    };
    let kind = image.kind();
    let disk = Disk::new(Box::new(image), config).map_err(|source| ConfigError::Disk {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((disk, kind))
}
