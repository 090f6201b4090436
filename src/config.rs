//! From the command line to a configured SCSI target: parses every IMAGE
//! argument's options, opens, locks and checks every image, with errors that
//! name the LUN or image and what is wrong with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::cli::Cli;
use crate::fdlimit::{self, FdLimitError};
use crate::scsi::inquiry::Identity;
use crate::scsi::lun::MAX_LUN;
use crate::scsi::{Disk, DiskConfig, DiskError, Target};
use crate::storage::lock::{self, LockError};
use crate::storage::{FileImage, ImageKind, OpenError};
use crate::virtio::backend::FIRST_REQUEST_QUEUE;

mod lun_spec;
pub use lun_spec::{LunSpec, LunSpecError, MAX_IMAGES, MAX_SERIAL_LEN};

/// Logical block size of a LUN without `block-size=`.
pub const BLOCK_SIZE: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("too many images: {0} given, at most {MAX_IMAGES} (LUNs 0-{MAX_LUN})")]
    TooManyImages(usize),
    #[error("LUN {lun} ({}): {source}", .source.image)]
    Option { lun: usize, source: LunSpecError },
    #[error(transparent)]
    FileLimit(#[from] FdLimitError),
    #[error("image {}: {source}", .path.display())]
    Open { path: PathBuf, source: OpenError },
    #[error("image {}: {source}", .path.display())]
    Lock { path: PathBuf, source: LockError },
    #[error("image {}: {source}", .path.display())]
    Disk { path: PathBuf, source: DiskError },
    #[error(
        "image {}: --direct needs a block size that is a multiple of {alignment} bytes \
         (the image's direct I/O alignment), not {block_size}: add ,block-size=4096",
        .path.display()
    )]
    DirectAlignment {
        path: PathBuf,
        block_size: u32,
        alignment: u64,
    },
}

/// Opens the images named on the command line as LUNs 0..N-1. Every
/// IMAGE argument's options, and the open-file limit, are checked before
/// any image is opened.
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
    // Each image keeps a descriptor open: make room for them all, or say
    // so before opening any.
    let queues = FIRST_REQUEST_QUEUE + usize::from(cli.num_queues);
    if let Some(raised) = fdlimit::ensure(specs.len(), queues)? {
        info!(
            "raised the open-file limit from {} to {} for {} images",
            raised.from,
            raised.to,
            specs.len()
        );
    }
    let mut disks: Vec<Disk> = Vec::with_capacity(specs.len());
    let mut seen = SeenIdentities::default();
    for (lun, spec) in specs.iter().enumerate() {
        let read_only = cli.read_only || spec.read_only;
        let (disk, kind, locked) = open_disk(spec, lun as u16, read_only, cli)?;
        seen.add(&specs, lun, disk.identity())?;
        info!(
            "LUN {lun}: {} ({} bytes, {} blocks of {} bytes, {}, {}{}, {}, serial {}, NAA {:#018x})",
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
            if cli.direct { ", O_DIRECT" } else { "" },
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
    let open = if cli.direct {
        FileImage::open_direct
    } else {
        FileImage::open
    };
    let image = open(path, read_only).map_err(|source| ConfigError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let block_size = spec.block_size.unwrap_or(BLOCK_SIZE);
    if let Some(align) = image.direct_alignment() {
        // Every transfer is whole blocks at block offsets: the block size
        // must meet O_DIRECT's offset alignment (buffers are bounced).
        if u64::from(block_size) % align.offset != 0 {
            return Err(ConfigError::DirectAlignment {
                path: path.to_path_buf(),
                block_size,
                alignment: align.offset,
            });
        }
    }
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
        block_size,
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
///
/// Indexed by value, so that checking N LUNs costs O(N), not O(N²): with
/// 16384 LUNs the pairwise comparison took most of the startup time.
#[derive(Debug, Default)]
struct SeenIdentities {
    /// NAA designator → the LUN that has it.
    naa: HashMap<u64, usize>,
    /// Serial number → the LUN that has it.
    serial: HashMap<String, usize>,
}

impl SeenIdentities {
    /// Checks `lun`'s identity against every LUN added before, then adds
    /// it. The error is about the lowest-numbered LUN it clashes with, and
    /// about the WWN if both clash with that LUN.
    fn add(
        &mut self,
        specs: &[LunSpec],
        lun: usize,
        identity: &Identity,
    ) -> Result<(), ConfigError> {
        let same_naa = self.naa.get(&identity.naa).copied();
        let same_serial = self.serial.get(&identity.serial).copied();
        let clash = match (same_naa, same_serial) {
            (Some(n), Some(s)) if s < n => Some((s, "serial", "serial number")),
            (Some(n), _) => Some((n, "wwn", "WWN")),
            (None, Some(s)) => Some((s, "serial", "serial number")),
            (None, None) => None,
        };
        let Some((other, name, what)) = clash else {
            self.naa.insert(identity.naa, lun);
            self.serial.insert(identity.serial.clone(), lun);
            return Ok(());
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
        Err(ConfigError::Option {
            lun: blamed,
            source: LunSpecError {
                image: specs[blamed].path.to_string_lossy().into_owned(),
                option: Some(format!("{name}={value}")),
                reason: format!("LUN {partner} has the same {what}"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(serial: &str, naa: u64) -> Identity {
        let mut identity = Identity::derived("x", 0);
        identity.serial = serial.to_string();
        identity.naa = naa;
        identity
    }

    /// The message of `seen.add` for `lun`'s identity, or None if it fits.
    fn clash(
        seen: &mut SeenIdentities,
        specs: &[LunSpec],
        lun: usize,
        id: Identity,
    ) -> Option<String> {
        seen.add(specs, lun, &id).err().map(|e| e.to_string())
    }

    #[test]
    fn identity_clashes_name_the_lowest_other_lun() {
        let spec = |path: &str, serial: bool, wwn: bool| LunSpec {
            path: path.into(),
            serial: serial.then(|| "S".to_string()),
            wwn: wwn.then_some(0x3000_0000_0000_0001),
            ..LunSpec::default()
        };
        let specs = [
            spec("a", false, false),
            spec("b", false, false),
            spec("c", true, true),
        ];
        let mut seen = SeenIdentities::default();
        assert_eq!(clash(&mut seen, &specs, 0, identity("A", 1)), None);
        assert_eq!(clash(&mut seen, &specs, 1, identity("B", 2)), None);
        // Same serial as LUN 0 and same WWN as LUN 1: LUN 0 is named.
        assert_eq!(
            clash(&mut seen, &specs, 2, identity("A", 2)).as_deref(),
            Some("LUN 2 (c): serial=A: LUN 0 has the same serial number")
        );
        // Same WWN as LUN 0 and same serial as LUN 1: the WWN, LUN 0.
        assert_eq!(
            clash(&mut seen, &specs, 2, identity("B", 1)).as_deref(),
            Some("LUN 2 (c): wwn=0x0000000000000001: LUN 0 has the same WWN")
        );
        // Neither: added.
        assert_eq!(clash(&mut seen, &specs, 2, identity("C", 3)), None);
        assert_eq!(seen.naa.len(), 3);
        assert_eq!(seen.serial.len(), 3);
    }

    #[test]
    fn a_clash_is_blamed_on_the_lun_with_the_option() {
        // LUN 0 has serial=S, LUN 1 derived the same serial (in theory):
        // LUN 0 is to blame.
        let specs = [
            LunSpec {
                path: "a".into(),
                serial: Some("S".into()),
                ..LunSpec::default()
            },
            LunSpec {
                path: "b".into(),
                ..LunSpec::default()
            },
        ];
        let mut seen = SeenIdentities::default();
        assert_eq!(clash(&mut seen, &specs, 0, identity("S", 1)), None);
        assert_eq!(
            clash(&mut seen, &specs, 1, identity("S", 2)).as_deref(),
            Some("LUN 0 (a): serial=S: LUN 1 has the same serial number")
        );
    }
}
