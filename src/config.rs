//! From the command line to a configured SCSI target: parses every IMAGE
//! argument's options, opens, locks and checks every image, with errors that
//! name the LUN or image and what is wrong with it.

use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::cli::{Cli, LunSpec, LunSpecError, MAX_IMAGES};
use crate::scsi::inquiry::Identity;
use crate::scsi::{Disk, DiskConfig, DiskError, Target};
use crate::storage::lock::{self, LockError};
use crate::storage::{FileImage, ImageKind, OpenError};

/// Logical block size of a LUN without `block-size=`.
pub const BLOCK_SIZE: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("too many images: {0} given, at most {MAX_IMAGES} (LUNs 0-255)")]
    TooManyImages(usize),
    #[error("LUN {lun} ({}): {source}", .source.image)]
    Option { lun: usize, source: LunSpecError },
    #[error("image {}: {source}", .path.display())]
    Open { path: PathBuf, source: OpenError },
    #[error("image {}: {source}", .path.display())]
    Lock { path: PathBuf, source: LockError },
    #[error("image {}: {source}", .path.display())]
    Disk { path: PathBuf, source: DiskError },
}

/// Opens the images named on the command line as LUNs 0..N-1. Every
/// IMAGE argument's options are checked before any image is opened.
pub fn build_target(cli: &Cli) -> Result<Target, ConfigError> {
    if cli.images.len() > MAX_IMAGES {
        return Err(ConfigError::TooManyImages(cli.images.len()));
    }
    let specs = cli
        .images
        .iter()
        .enumerate()
        .map(|(lun, arg)| LunSpec::parse(arg).map_err(|source| ConfigError::Option { lun, source }))
        .collect::<Result<Vec<_>, _>>()?;
    let mut disks: Vec<Disk> = Vec::with_capacity(specs.len());
    for (lun, spec) in specs.iter().enumerate() {
        let read_only = cli.read_only || spec.read_only;
        let (disk, kind, locked) = open_disk(spec, lun as u16, read_only, cli)?;
        check_unique_identity(&specs, &disks, lun, disk.identity())?;
        info!(
            "LUN {lun}: {} ({} bytes, {} blocks of {} bytes, {}, {}, {}, serial {}, NAA {:#018x})",
            spec.path.display(),
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
            if locked { "locked" } else { "not locked" },
            disk.identity().serial,
            disk.identity().naa,
        );
        disks.push(disk);
    }
    Ok(Target::new(disks))
}

/// Opens, locks and checks one image; also says whether it is locked.
fn open_disk(
    spec: &LunSpec,
    lun: u16,
    read_only: bool,
    cli: &Cli,
) -> Result<(Disk, ImageKind, bool), ConfigError> {
    let path = spec.path.as_path();
    let image = FileImage::open(path, read_only).map_err(|source| ConfigError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // The locks belong to the open file: they last as long as the Disk
    // keeps the image open, which is the daemon's lifetime.
    let locked = match lock::lock_image(image.file(), read_only) {
        Ok(()) => true,
        Err(LockError::Unsupported(e)) => {
            warn!(
                "image {}: served without image locks, so nothing keeps another writer out: {e}",
                path.display()
            );
            false
        }
        Err(source) => {
            return Err(ConfigError::Lock {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let config = DiskConfig {
        block_size: spec.block_size.unwrap_or(BLOCK_SIZE),
        identity: identity(spec, path, lun),
        solid_state: cli.solid_state,
        discard: !cli.no_discard,
    };
    let kind = image.kind();
    let disk = Disk::new(Box::new(image), config).map_err(|source| ConfigError::Disk {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((disk, kind, locked))
}

/// The derived identity with the operator's `serial=` and `wwn=` applied.
fn identity(spec: &LunSpec, path: &Path, lun: u16) -> Identity {
    // The derived identity follows the image's canonical path, so that
    // renaming a symlink or changing the working directory does not change
    // it.
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut identity = Identity::derived(&canonical.to_string_lossy(), lun);
    if let Some(serial) = &spec.serial {
        identity.serial = serial.clone();
    }
    if let Some(wwn) = spec.wwn {
        identity.naa = wwn;
    }
    identity
}

/// Two LUNs with one WWN look like two paths to one disk to a guest's
/// multipath layer, which would mix their data up; one serial is confusing.
/// Derived values never clash, so a clash involves an operator's option:
/// the error names the LUN that has one.
fn check_unique_identity(
    specs: &[LunSpec],
    earlier: &[Disk],
    lun: usize,
    identity: &Identity,
) -> Result<(), ConfigError> {
    for (other, disk) in earlier.iter().enumerate() {
        let clash = if disk.identity().naa == identity.naa {
            Some(("wwn", "WWN"))
        } else if disk.identity().serial == identity.serial {
            Some(("serial", "serial number"))
        } else {
            None
        };
        let Some((name, what)) = clash else {
            continue;
        };
        let has_option = |l: usize| match name {
            "wwn" => specs[l].wwn.is_some(),
            _ => specs[l].serial.is_some(),
        };
        let (blamed, partner) = if has_option(lun) || !has_option(other) {
            (lun, other)
        } else {
            (other, lun)
        };
        let value = match name {
            "wwn" => format!("{:#018x}", identity.naa),
            _ => identity.serial.clone(),
        };
        return Err(ConfigError::Option {
            lun: blamed,
            source: LunSpecError {
                image: specs[blamed].path.to_string_lossy().into_owned(),
                option: Some(format!("{name}={value}")),
                reason: format!("LUN {partner} has the same {what}"),
            },
        });
    }
    Ok(())
}
