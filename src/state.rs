//! The guest's state carried from a stopping daemon to the next (an
//! upgrade): per LUN, what the guest set with MODE SELECT (WCE, D_SENSE),
//! its pending unit attentions and a flush failure, and the LUN's IMAGE
//! argument (a LUN added through the API is added again). Without it a restart
//! would silently turn a write cache the guest switched off back on (its
//! writes would no longer be durable at completion, as it was told), and
//! flushes after an earlier failure would succeed again.
//!
//! The stopping daemon writes the state file (`--state-file`, by default
//! the socket path with `.state` appended) after its requests are
//! quiesced, while a VMM is connected; the next daemon reads it at start,
//! applies it to the LUNs that are the same (same LUN number and NAA), and
//! removes it, so it is used once. A file that cannot be read or parsed is
//! a warning, never a failure to start.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::config::LunSpec;
use crate::scsi::{GuestState, Target, UnitAttention};
use std::collections::BTreeMap;

/// The file's contents.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StateFile {
    /// The format's version (1).
    version: u32,
    luns: Vec<LunState>,
}

/// One LUN's state, and what identifies the unit it belongs to.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LunState {
    lun: u16,
    /// The unit's NAA designator: the state is applied only to the same
    /// unit.
    naa: u64,
    #[serde(flatten)]
    guest: GuestState,
    /// The LUN's IMAGE argument, so that a LUN added through the API is
    /// there again in the next daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spec: Option<LunSpec>,
}

const VERSION: u32 = 1;

/// The state file next to `socket`: its path with `.state` appended.
pub fn default_path(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".state");
    PathBuf::from(path)
}

/// Writes the guest's state of every LUN of `target` to `path`: a new file
/// written whole, synced, then renamed over `path`, so a reader never sees
/// half of it.
pub fn save(path: &Path, target: &Target, specs: &BTreeMap<u16, LunSpec>) -> io::Result<usize> {
    let luns: Vec<LunState> = target
        .units()
        .into_iter()
        .map(|(lun, unit)| LunState {
            lun,
            naa: unit.identity().naa,
            guest: unit.guest_state(),
            spec: specs.get(&lun).cloned(),
        })
        .collect();
    let count = luns.len();
    let text = serde_json::to_string(&StateFile {
        version: VERSION,
        luns,
    })
    .map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A new file of the daemon's own, never one found there: a leftover
    // (or a symbolic link someone put there) is removed first — unlink
    // does not follow links — and the new one created exclusively, not
    // following a link, readable by the daemon's user only.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| count)
}

/// Most bytes of a state file read back (16384 LUNs take well under 2 MiB).
const MAX_STATE_BYTES: u64 = 16 << 20;

/// The state file's text: a regular file of at most [`MAX_STATE_BYTES`],
/// opened without following a symbolic link and without blocking (a FIFO
/// there cannot hold start-up up).
fn read_state(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_STATE_BYTES {
        return Err(io::Error::other(format!(
            "{} bytes, more than a state file holds",
            meta.len()
        )));
    }
    let mut text = String::new();
    file.take(MAX_STATE_BYTES).read_to_string(&mut text)?;
    Ok(text)
}

/// The images of the LUNs the state file at `path` would add again (none
/// if it cannot be read): the sandbox lets the daemon open them.
pub fn image_paths(path: &Path) -> Vec<PathBuf> {
    read_state(path)
        .ok()
        .and_then(|text| serde_json::from_str::<StateFile>(&text).ok())
        .map(|state| {
            state
                .luns
                .into_iter()
                .filter_map(|lun| lun.spec.map(|spec| spec.path))
                .collect()
        })
        .unwrap_or_default()
}

/// Applies the state in `path`, if there is one, then removes the file:
/// a LUN the daemon before had and this one has not (added through the
/// API) is added with `add` (its IMAGE argument, with start-up's checks),
/// and the LUNs that are the same units take their guest's state over.
/// Returns how many did.
pub fn restore(
    path: &Path,
    target: &Target,
    add: &dyn Fn(u16, LunSpec) -> Result<(), String>,
) -> usize {
    let text = match read_state(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
        Err(e) => {
            warn!(
                "state file {}: cannot read it ({e}): the guest's state starts afresh",
                path.display()
            );
            return 0;
        }
    };
    // Used once, whatever it holds.
    if let Err(e) = std::fs::remove_file(path) {
        warn!("state file {}: cannot remove it: {e}", path.display());
    }
    let state: StateFile = match serde_json::from_str(&text) {
        Ok(state) => state,
        Err(e) => {
            warn!(
                "state file {}: not a state file ({e}): the guest's state starts afresh",
                path.display()
            );
            return 0;
        }
    };
    if state.version != VERSION {
        warn!(
            "state file {}: version {}, not {VERSION}: the guest's state starts afresh",
            path.display(),
            state.version
        );
        return 0;
    }
    let mut added = false;
    for lun in &state.luns {
        if target.has_unit(lun.lun) {
            continue;
        }
        let Some(spec) = lun.spec.clone() else {
            continue;
        };
        let image = spec.display().to_string();
        match add(lun.lun, spec) {
            Ok(()) => {
                added = true;
                info!(
                    "state file {}: LUN {} ({image}) added again",
                    path.display(),
                    lun.lun
                );
            }
            Err(e) => warn!(
                "state file {}: LUN {} ({image}) cannot be added again: {e}",
                path.display(),
                lun.lun
            ),
        }
    }
    if added {
        // The guest already has these LUNs: the additions' REPORTED LUNS
        // DATA HAS CHANGED is not news (what was pending comes back below).
        for (_, unit) in target.units() {
            unit.attention().clear(UnitAttention::ReportedLunsChanged);
        }
    }
    let mut restored = 0;
    for lun in &state.luns {
        match target.unit(lun.lun) {
            Some(unit) if unit.identity().naa == lun.naa => {
                unit.restore_guest_state(&lun.guest);
                restored += 1;
            }
            _ => info!(
                "state file {}: LUN {} is another unit now: its state is not restored",
                path.display(),
                lun.lun
            ),
        }
    }
    info!(
        "restored the guest's state of {restored} LUN(s) from {}",
        path.display()
    );
    restored
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::inquiry::Identity;
    use crate::scsi::{Disk, DiskConfig, UnitAttention};
    use crate::storage::MemImage;

    fn no_add(_: u16, _: LunSpec) -> Result<(), String> {
        Err("no LUN is added here".into())
    }

    fn target(naa_base: u64) -> Target {
        let disks = (0..2u16)
            .map(|lun| {
                let mut identity = Identity::derived("/mem", lun);
                identity.naa = naa_base + u64::from(lun);
                let config = DiskConfig {
                    block_size: 512,
                    identity,
                    solid_state: false,
                    discard: true,
                };
                Disk::new(Box::new(MemImage::new(vec![0; 4096], false)), config).unwrap()
            })
            .collect();
        Target::new(disks)
    }

    #[test]
    fn the_state_goes_to_the_same_units_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path(&dir.path().join("vus.sock"));
        assert_eq!(path, dir.path().join("vus.sock.state"));
        let before = target(0x5000_0000_0000_0000);
        let lun1 = before.unit(1).unwrap();
        lun1.restore_guest_state(&GuestState {
            write_cache: false,
            descriptor_sense: true,
            unit_attentions: 0,
            flush_failed: true,
        });
        lun1.attention().establish(UnitAttention::CapacityChanged);
        assert_eq!(save(&path, &before, &BTreeMap::new()).unwrap(), 2);

        let after = target(0x5000_0000_0000_0000);
        assert_eq!(restore(&path, &after, &no_add), 2);
        assert!(!path.exists(), "used once");
        assert_eq!(
            after.unit(1).unwrap().guest_state(),
            GuestState {
                write_cache: false,
                descriptor_sense: true,
                unit_attentions: UnitAttention::CapacityChanged as u8,
                flush_failed: true,
            }
        );
        // LUN 0 had the defaults.
        assert_eq!(
            after.unit(0).unwrap().guest_state(),
            GuestState {
                write_cache: true,
                descriptor_sense: false,
                unit_attentions: 0,
                flush_failed: false,
            }
        );
        // Other units at those LUNs (another NAA): nothing taken over.
        save(&path, &before, &BTreeMap::new()).unwrap();
        let other = target(0x6000_0000_0000_0000);
        assert_eq!(restore(&path, &other, &no_add), 0);
        assert!(other.unit(1).unwrap().guest_state().write_cache);
    }

    /// A symbolic link planted where the temporary file goes is replaced,
    /// never written through; a FIFO at the state path does not block.
    #[test]
    fn the_state_file_is_never_written_or_read_through_a_link_or_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.state");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("s.state.tmp")).unwrap();
        save(&path, &target(1), &BTreeMap::new()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_file());
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert_eq!(
            restore(&path, &target(1), &no_add),
            0,
            "read through a link"
        );
        let fifo = dir.path().join("f.state");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; creates a FIFO in our directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(restore(&fifo, &target(1), &no_add), 0);
    }

    #[test]
    fn a_bad_state_file_is_a_warning_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.state");
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(restore(&path, &target(1), &no_add), 0);
        assert!(!path.exists());
        std::fs::write(&path, r#"{"version": 2, "luns": []}"#).unwrap();
        assert_eq!(restore(&path, &target(1), &no_add), 0);
        assert_eq!(
            restore(&dir.path().join("missing.state"), &target(1), &no_add),
            0
        );
    }
}
