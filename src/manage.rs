//! The LUN manager: what the management API does to the running daemon.
//! It adds, removes and resizes logical units in the target's LUN table
//! while the worker threads serve I/O, establishes the unit attentions
//! (through the target and the disks) and posts the virtio events that
//! tell the guest (through the [`EventHub`]).
//!
//! Management calls are serialized by one mutex; the I/O path never takes
//! it. An added image goes through exactly the checks of start-up
//! (`config::open_disk`): the IMAGE syntax, the open-file limit, opening,
//! locking, the block size, and an identity no other LUN has.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use log::{info, warn};

use crate::api::{ErrorKind, LunInfo, Management, MethodError};
use crate::config::{self, ConfigError, DaemonConfig, ImageSource, LunSpec};
use crate::fdlimit;
use crate::sandbox::SandboxMode;
use crate::scsi::disk::ResizeError;
use crate::scsi::lun::MAX_LUN;
use crate::scsi::target::InsertError;
use crate::scsi::{Disk, Target};
use crate::storage::lock::ImageLocks;
use crate::virtio::backend::FIRST_REQUEST_QUEUE;
use crate::virtio::{DeviceEvent, EventHub};

/// How long `lun_remove` waits for the commands in flight to a removed
/// LUN before it answers that they have not completed.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a management call failed; each message is one line naming what is
/// wrong.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// A parameter is wrong in itself (e.g. a size that is not a whole
    /// number of blocks).
    #[error("{0}")]
    InvalidParams(String),
    #[error("LUN {0}: no such LUN")]
    NoSuchLun(u16),
    #[error("LUN {0}: in use")]
    LunInUse(u16),
    #[error("no free LUN: all {} are in use", u32::from(MAX_LUN) + 1)]
    NoFreeLun,
    /// The image cannot be served: a bad option, cannot be opened, locked,
    /// a bad size, too many open files.
    #[error("{0}")]
    Image(String),
    /// What the LUN's image cannot do (grow a block device, change a
    /// read-only image).
    #[error("{0}")]
    NotSupported(String),
    /// Commands in flight to a removed LUN have not completed in time.
    #[error("LUN {lun}: removed, but commands in flight to it have not completed after {} s; its image is flushed and closed when they do", .waited.as_secs())]
    StillInFlight { lun: u16, waited: Duration },
}

/// Adds, removes and resizes the LUNs of a running daemon.
#[derive(Debug)]
pub struct LunManager {
    target: Arc<Target>,
    /// The start-up configuration: the flags every LUN gets (`--read-only`,
    /// `--direct`, `--no-discard`, `--solid-state`) and the queue count
    /// the open-file limit is computed with.
    config: DaemonConfig,
    events: Arc<EventHub>,
    /// The IMAGE argument of each LUN; held during a whole call, so calls
    /// are serialized.
    specs: Mutex<BTreeMap<u16, LunSpec>>,
    remove_timeout: Duration,
}

impl LunManager {
    /// The manager of `target`, started from `config` (whose LUNs are
    /// the target's LUNs 0..N-1), posting events to `events`.
    pub fn new(target: Arc<Target>, config: DaemonConfig, events: Arc<EventHub>) -> LunManager {
        let specs = config
            .luns
            .iter()
            .enumerate()
            .filter_map(|(lun, spec)| Some((u16::try_from(lun).ok()?, spec.clone())))
            .collect();
        LunManager {
            target,
            config,
            events,
            specs: Mutex::new(specs),
            remove_timeout: REMOVE_TIMEOUT,
        }
    }

    /// Waits at most `timeout` in `lun_remove` (for tests).
    pub fn set_remove_timeout(&mut self, timeout: Duration) {
        self.remove_timeout = timeout;
    }

    fn specs(&self) -> MutexGuard<'_, BTreeMap<u16, LunSpec>> {
        self.specs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens `image` (a command line's IMAGE argument) as LUN `lun`, or the
    /// lowest free LUN; the guest is told (an event, and REPORTED LUNS
    /// DATA HAS CHANGED on the other LUNs).
    pub fn lun_add(&self, image: &str, lun: Option<u16>) -> Result<u16, ManageError> {
        let spec = LunSpec::parse(OsStr::new(image))
            .map_err(|e| ManageError::Image(format!("image {}: {e}", e.image)))?;
        if spec.source() == ImageSource::Local && spec.path.is_relative() {
            return Err(ManageError::InvalidParams(format!(
                "image {}: a relative path: give an absolute one (the daemon's working directory is not the client's)",
                spec.display()
            )));
        }
        if self.config.sandbox == SandboxMode::On
            && !self.config.sandbox_network
            && spec.needs_tcp()
        {
            // The seccomp filter would end the daemon at the socket call.
            return Err(ManageError::Image(format!(
                "image {}: a network LUN over TCP, and the sandbox allows no TCP sockets: \
                 start the daemon with --sandbox-allow-network (or a TCP network LUN)",
                spec.display()
            )));
        }
        let lun = self.add(spec, lun)?;
        self.events.post(DeviceEvent::LunAdded(lun));
        Ok(lun)
    }

    /// Adds LUN `lun` as `spec` says, for a daemon taking over from one
    /// that had it (the state file): as `lun_add`, without telling the
    /// guest, which has it already.
    pub fn restore_lun(&self, lun: u16, spec: LunSpec) -> Result<(), ManageError> {
        self.add(spec, Some(lun)).map(|_| ())
    }

    /// The IMAGE arguments of the LUNs, by LUN.
    pub fn specs_now(&self) -> BTreeMap<u16, LunSpec> {
        self.specs().clone()
    }

    /// Opens `spec` as LUN `lun` (or the lowest free one) with start-up's
    /// checks and puts it in the table.
    fn add(&self, spec: LunSpec, lun: Option<u16>) -> Result<u16, ManageError> {
        let mut specs = self.specs();
        let lun = match lun {
            Some(lun) if lun > MAX_LUN => {
                return Err(ManageError::InvalidParams(format!(
                    "LUN {lun}: beyond the highest LUN, {MAX_LUN}"
                )))
            }
            Some(lun) if self.target.has_unit(lun) => return Err(ManageError::LunInUse(lun)),
            Some(lun) => lun,
            None => self
                .target
                .lowest_free_lun()
                .ok_or(ManageError::NoFreeLun)?,
        };
        let queues = FIRST_REQUEST_QUEUE + self.config.queues.request_queues;
        fdlimit::ensure(specs.len() + 1, queues)
            .map_err(|e| ManageError::Image(format!("image {}: {e}", spec.display())))?;
        let read_only = self.config.read_only || spec.read_only;
        // Opened as the target's images are: inactive (no locks) while
        // the daemon waits for an incoming migration or its VM has
        // migrated away. `insert` makes it so again under the target's
        // lock, should the target change in between.
        let active = self.target.images_active();
        let (disk, kind, _) = config::open_disk(&spec, lun, read_only, &self.config, active)?;
        self.check_identity(&spec, &disk)?;
        let unit = self.target.insert(lun, disk).map_err(|e| match e {
            InsertError::InUse(lun) => ManageError::LunInUse(lun),
            InsertError::TooHigh(_) => ManageError::InvalidParams(e.to_string()),
            InsertError::Activate(e) => ManageError::Image(e.to_string()),
        })?;
        let locks = unit.image_locks().unwrap_or(ImageLocks::Unsupported);
        config::log_lun(&format!("LUN {lun} added"), &spec, &unit, &kind, locks);
        specs.insert(lun, spec);
        Ok(lun)
    }

    /// No two LUNs share a WWN or a serial number (as at start-up).
    fn check_identity(&self, spec: &LunSpec, disk: &Disk) -> Result<(), ManageError> {
        let identity = disk.identity();
        for (lun, unit) in self.target.units() {
            let (what, value) = if unit.identity().naa == identity.naa {
                ("WWN", format!("wwn={:#018x}", identity.naa))
            } else if unit.identity().serial == identity.serial {
                ("serial number", format!("serial={}", identity.serial))
            } else {
                continue;
            };
            return Err(ManageError::Image(format!(
                "image {}: {value}: LUN {lun} has the same {what}",
                spec.display()
            )));
        }
        Ok(())
    }

    /// Takes LUN `lun` away: from now on it answers as an absent LUN; the
    /// guest is told (an event, and REPORTED LUNS DATA HAS CHANGED on the
    /// others). Returns once the commands in flight to it have completed
    /// and its image is closed (and its lock released).
    pub fn lun_remove(&self, lun: u16) -> Result<(), ManageError> {
        let mut specs = self.specs();
        let unit = self.target.remove(lun).ok_or(ManageError::NoSuchLun(lun))?;
        let spec = specs.remove(&lun);
        drop(specs);
        self.events.post(DeviceEvent::LunRemoved(lun));
        // The image is closed here, once flushed (as QEMU flushes a drive
        // it detaches): the unit's last command drops the unit, not the
        // image.
        let storage = unit.storage().clone();
        let (closed, on_close) = sync_channel(1);
        unit.notify_closed(closed);
        drop(unit);
        let image = spec.map(|s| s.display()).unwrap_or_default();
        match on_close.recv_timeout(self.remove_timeout) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let flushed = storage.flush();
                // The image's locks go now, not when the kernel lets go of
                // the file: an io_uring request the kernel has completed
                // may still hold a reference to the open file for a moment
                // after its completion was reaped, and with it the locks,
                // which a lun_add of the same image right after would find.
                storage.deactivate();
                drop(storage);
                if let Err(e) = flushed {
                    warn!("LUN {lun}: removed; flushing image {image} failed: {e}; image closed");
                    return Err(ManageError::Image(format!(
                        "LUN {lun}: removed, but flushing image {image} failed: {e}"
                    )));
                }
                info!("LUN {lun}: removed; image {image} flushed and closed");
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => {
                warn!("LUN {lun}: removed, but commands in flight to it have not completed after {} s; image {image} is flushed and closed when they do", self.remove_timeout.as_secs());
                // The rest in the background: the image is flushed and
                // closed when the last command lets go of the unit.
                let waiter = std::thread::Builder::new()
                    .name(format!("lun{lun}-close"))
                    .spawn(move || {
                        let _ = on_close.recv();
                        let flushed = storage.flush();
                        storage.deactivate();
                        match flushed {
                            Ok(()) => info!("LUN {lun}: image {image} flushed and closed"),
                            Err(e) => {
                                warn!("LUN {lun}: flushing image {image} failed: {e}; image closed")
                            }
                        }
                    });
                if let Err(e) = waiter {
                    warn!("LUN {lun}: cannot start the thread that closes its image ({e}): it is closed, unflushed, when its commands complete");
                }
                Err(ManageError::StillInFlight {
                    lun,
                    waited: self.remove_timeout,
                })
            }
        }
    }

    /// Makes LUN `lun`'s capacity `size` bytes, growing (or, with
    /// `shrink`, shrinking) its image, a regular file, to it; without
    /// `size`, the image's size now (the operator grew the file or block
    /// device). The guest is told if the capacity changed (an event, and
    /// CAPACITY DATA HAS CHANGED on the LUN). Returns the new size.
    pub fn lun_resize(
        &self,
        lun: u16,
        size: Option<u64>,
        shrink: bool,
    ) -> Result<u64, ManageError> {
        let specs = self.specs();
        let unit = self.target.unit(lun).ok_or(ManageError::NoSuchLun(lun))?;
        let image = specs.get(&lun).map(|s| s.display()).unwrap_or_default();
        let block_size = unit.block_size();
        let capacity = unit.blocks() * u64::from(block_size);
        let image_size = unit
            .image_size()
            .map_err(|e| ManageError::Image(format!("image {image}: cannot read its size: {e}")))?;
        let new = size.unwrap_or(image_size);
        if new == 0 {
            return Err(ManageError::InvalidParams(format!(
                "LUN {lun}: a size of 0 bytes: a LUN has at least one block"
            )));
        }
        if new % u64::from(block_size) != 0 {
            let whose = if size.is_some() {
                "size"
            } else {
                "the image's size"
            };
            return Err(ManageError::InvalidParams(format!(
                "LUN {lun}: {whose} {new} is not a multiple of the {block_size}-byte block size"
            )));
        }
        // Shrinking the capacity, or cutting bytes off the image, only
        // when asked for.
        let cuts_image = size.is_some() && new < image_size;
        if (new < capacity || cuts_image) && !shrink {
            return Err(ManageError::InvalidParams(format!(
                "LUN {lun}: {new} bytes is smaller than {} (image {image}): pass \"shrink\": true to shrink it",
                if cuts_image { image_size } else { capacity },
            )));
        }
        let set_len = size.is_some() && new != image_size;
        if set_len && unit.read_only() {
            return Err(ManageError::NotSupported(format!(
                "LUN {lun}: image {image} is read-only: its size is not changed; resize it yourself and call lun_resize without a size"
            )));
        }
        unit.resize(new, set_len).map_err(|e| match e {
            ResizeError::Image(io) if io.kind() == io::ErrorKind::Unsupported => {
                ManageError::NotSupported(format!(
                    "LUN {lun}: image {image} is not a regular file: resize the device and call lun_resize without a size"
                ))
            }
            e => ManageError::Image(format!("image {image}: {e}")),
        })?;
        drop(specs);
        if new != capacity {
            info!("LUN {lun}: resized from {capacity} to {new} bytes (image {image})");
            self.events.post(DeviceEvent::CapacityChanged(lun));
        }
        Ok(new)
    }

    /// Every LUN, in order.
    pub fn lun_list(&self) -> Vec<LunInfo> {
        let specs = self.specs();
        self.target
            .units()
            .into_iter()
            .map(|(lun, unit)| LunInfo {
                lun,
                image: specs.get(&lun).map(|s| s.display()).unwrap_or_default(),
                size: unit.blocks() * u64::from(unit.block_size()),
                block_size: unit.block_size(),
                read_only: unit.read_only(),
                serial: unit.identity().serial.clone(),
                naa: format!("{:#018x}", unit.identity().naa),
            })
            .collect()
    }

    /// The target managed.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }
}

impl From<ConfigError> for ManageError {
    fn from(e: ConfigError) -> ManageError {
        ManageError::Image(e.to_string())
    }
}

impl From<ManageError> for MethodError {
    fn from(e: ManageError) -> MethodError {
        let kind = match &e {
            ManageError::InvalidParams(_) => ErrorKind::InvalidParams,
            ManageError::NoSuchLun(_) => ErrorKind::NoSuchLun,
            ManageError::LunInUse(_) | ManageError::NoFreeLun => ErrorKind::LunInUse,
            ManageError::Image(_) => ErrorKind::Image,
            ManageError::StillInFlight { .. } => ErrorKind::StillInFlight,
            ManageError::NotSupported(_) => ErrorKind::NotSupported,
        };
        MethodError::new(kind, e.to_string())
    }
}

/// The management API's methods, as the LUN manager carries them out.
impl Management for LunManager {
    fn lun_add(&self, image: &str, lun: Option<u16>) -> Result<u16, MethodError> {
        Ok(LunManager::lun_add(self, image, lun)?)
    }

    fn lun_remove(&self, lun: u16) -> Result<(), MethodError> {
        Ok(LunManager::lun_remove(self, lun)?)
    }

    fn lun_resize(&self, lun: u16, size: Option<u64>, shrink: bool) -> Result<u64, MethodError> {
        Ok(LunManager::lun_resize(self, lun, size, shrink)?)
    }

    fn lun_list(&self) -> Vec<LunInfo> {
        LunManager::lun_list(self)
    }

    /// Per LUN, in order: `{"lun": N, "image": PATH, ...the statistics}`.
    fn stats(&self) -> serde_json::Value {
        let specs = self.specs();
        let luns: Vec<serde_json::Value> = self
            .target
            .units()
            .into_iter()
            .map(|(lun, unit)| {
                let mut entry = serde_json::json!({
                    "lun": lun,
                    "image": specs.get(&lun).map(|s| s.display()).unwrap_or_default(),
                });
                if let (Some(entry), Ok(serde_json::Value::Object(stats))) = (
                    entry.as_object_mut(),
                    serde_json::to_value(unit.stats().snapshot()),
                ) {
                    entry.extend(stats);
                }
                entry
            })
            .collect();
        serde_json::Value::Array(luns)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::scsi::inquiry::Identity;
    use crate::scsi::DiskConfig;
    use crate::storage::MemImage;

    fn manager(images: usize) -> LunManager {
        let disks = (0..images)
            .map(|lun| {
                let config = DiskConfig {
                    block_size: 512,
                    identity: Identity::derived("/mem", lun as u16),
                    solid_state: false,
                    discard: true,
                };
                Disk::new(Box::new(MemImage::new(vec![0; 8192], false)), config).unwrap()
            })
            .collect();
        let target = Arc::new(Target::new(disks));
        let config = DaemonConfig::new("/nonexistent/s.sock", Vec::new());
        LunManager::new(target, config, EventHub::new().unwrap())
    }

    /// A command that never completes: `lun_remove` gives up waiting with
    /// its own error, the LUN is gone all the same, and the image is let go
    /// of (closed) once the command is done.
    #[test]
    fn lun_remove_gives_up_waiting_and_the_image_closes_later() {
        let mut manager = manager(2);
        manager.set_remove_timeout(Duration::from_millis(50));
        let in_flight = manager.target().unit(1).unwrap();
        let image = Arc::downgrade(in_flight.storage());
        let err = manager.lun_remove(1).unwrap_err();
        assert!(
            matches!(err, ManageError::StillInFlight { lun: 1, .. }),
            "{err}"
        );
        assert_eq!(MethodError::from(err).code(), -32006);
        assert!(!manager.target().has_unit(1));
        assert!(image.upgrade().is_some(), "closed under a command");
        drop(in_flight);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while image.upgrade().is_some() {
            assert!(std::time::Instant::now() < deadline, "never closed");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lun_remove_waits_for_the_command_in_flight() {
        let manager = Arc::new(manager(2));
        let in_flight = manager.target().unit(1).unwrap();
        let remover = {
            let manager = manager.clone();
            std::thread::spawn(move || manager.lun_remove(1))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!remover.is_finished(), "answered with a command in flight");
        drop(in_flight);
        remover.join().unwrap().unwrap();
    }

    #[test]
    fn a_relative_image_path_is_refused() {
        let manager = manager(1);
        let err = manager.lun_add("disk.raw,ro", None).unwrap_err();
        assert!(matches!(err, ManageError::InvalidParams(_)), "{err}");
        assert!(err.to_string().contains("disk.raw"), "{err}");
    }

    /// While the target is inactive (`--incoming`), `lun_add` opens the
    /// image without locks; it takes them with the others when the
    /// target is activated; `lun_remove` of an inactive LUN closes it.
    #[test]
    fn a_lun_added_while_inactive_activates_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let observer = std::fs::File::open(&path).unwrap();
        let locked = || crate::storage::lock::locked_bytes(&observer);
        let target = Arc::new(Target::new_inactive(Vec::new()));
        let config = DaemonConfig::new("/nonexistent/s.sock", Vec::new());
        let manager = LunManager::new(target.clone(), config, EventHub::new().unwrap());
        let image = path.to_str().unwrap();
        assert_eq!(manager.lun_add(image, Some(3)).unwrap(), 3);
        assert_eq!(locked(), [] as [i64; 0], "added inactive");
        target.activate_images().unwrap();
        assert_eq!(locked(), [100, 101, 201]);
        // Active now: the same image again, read-write, is refused with
        // the lock error, naming the image.
        let err = manager.lun_add(image, None).unwrap_err();
        assert!(matches!(err, ManageError::Image(_)), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("image {image}: locked by")),
            "{err}"
        );
        target.deactivate_images().unwrap();
        assert_eq!(locked(), [] as [i64; 0]);
        assert_eq!(manager.lun_add(&format!("{image},ro"), Some(4)).unwrap(), 4);
        manager.lun_remove(3).unwrap();
        manager.lun_remove(4).unwrap();
        target.activate_images().unwrap();
        assert_eq!(locked(), [] as [i64; 0], "removed LUNs are closed");
    }

    /// Shrinking waits for the unit's transfers in flight before the image
    /// is cut, as COMPARE AND WRITE does.
    #[test]
    fn a_shrink_waits_for_transfers_in_flight() {
        let manager = Arc::new(manager(1));
        let unit = manager.target().unit(0).unwrap();
        let access = unit.try_transfer_access().unwrap();
        let shrink = {
            let manager = manager.clone();
            std::thread::spawn(move || manager.lun_resize(0, Some(4096), true))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!shrink.is_finished(), "cut the image under a transfer");
        // The new capacity already holds for new commands.
        assert_eq!(unit.blocks(), 8);
        drop(access);
        assert_eq!(shrink.join().unwrap().unwrap(), 4096);
        assert_eq!(unit.image_size().unwrap(), 4096);
    }
}
