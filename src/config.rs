//! The daemon's configuration as plain data, [`DaemonConfig`], whoever
//! fills it in (clap, in `cli.rs`; tests; later the management API), and
//! the start-up steps that act on it: resolving the socket's group and the
//! I/O engine, and opening, locking and checking every image into a
//! configured SCSI target, with errors that name the LUN or image and what
//! is wrong with it.
//!
//! Nothing here knows clap. The messages still name the command-line flags
//! (`--threads`, `--socket-group`, ...), which is what an operator types.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

use log::info;

use crate::daemon::{SocketAccess, SocketGroup};
use crate::fdlimit::{self, FdLimitError};
use crate::scsi::inquiry::Identity;
use crate::scsi::lun::MAX_LUN;
use crate::scsi::{Disk, DiskConfig, DiskError, Target};
use crate::storage::iscsi::{IscsiError, IscsiLun, IscsiOptions, PasswordSource};
use crate::storage::lock::{ImageLocks, LockError};
use crate::storage::IoEngine;
use crate::storage::{FileImage, ImageKind, NbdError, NbdImage, NbdOptions, OpenError};
use crate::virtio::backend::{QueueOptions, FIRST_REQUEST_QUEUE, MAX_REQUEST_QUEUES};

mod lun_spec;
pub use lun_spec::{redact, ImageSource, LunSpec, LunSpecError, MAX_IMAGES};

/// Logical block size of a LUN without `block-size=`.
pub(crate) const BLOCK_SIZE: u32 = 512;

/// Permissions of the socket unless the operator asks for others: only the
/// daemon's user may connect.
pub(crate) const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Longest busy-poll after a queue runs dry (`--poll-us` at most 1000).
pub(crate) const MAX_POLL: std::time::Duration = std::time::Duration::from_micros(1000);

/// Everything the daemon is started with. [`DaemonConfig::new`] gives the
/// command line's defaults; every field may then be set directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Where to listen, and who may connect.
    pub socket: SocketConfig,
    /// The images, LUN 0 first (at most [`MAX_IMAGES`]).
    pub luns: Vec<LunSpec>,
    /// Serve every LUN read-only (as `ro` on each).
    pub read_only: bool,
    /// Open the images with O_DIRECT.
    pub direct: bool,
    /// Offer UNMAP and WRITE SAME with UNMAP (thin provisioning).
    pub discard: bool,
    /// Report the disks as solid state (non-rotating).
    pub solid_state: bool,
    /// Request queues (1-62), worker threads (1 to request queues) and
    /// busy-polling (up to `MAX_POLL`, 1000 µs).
    pub queues: QueueOptions,
    /// How READ and WRITE transfers are carried out; resolved, with a
    /// probe of io_uring, by [`IoEngineChoice::resolve`] at start-up.
    pub io_engine: IoEngineChoice,
    /// Where a stopping daemon leaves the guest's state for the next
    /// (`--state-file`); `None`: the socket path with `.state` appended.
    pub state_file: Option<PathBuf>,
    /// Open every image inactive, without image locks, for an incoming
    /// live migration (`--incoming`): the target's
    /// [`Target::activate_images`] takes them when the VMM starts the
    /// device.
    pub incoming: bool,
    /// Confine the daemon once it has started (`--sandbox`, `sandbox.rs`).
    pub sandbox: crate::sandbox::SandboxMode,
    /// Directories beneath which the API's `lun_add` may open images
    /// besides the startup images' (`--sandbox-allow`).
    pub sandbox_allow: Vec<PathBuf>,
    /// With the sandbox on, TCP sockets are allowed (network LUNs over
    /// TCP): `--sandbox-allow-network`, or set at start-up when a LUN
    /// needs them.
    pub sandbox_network: bool,
    /// The iSCSI initiator name (`--initiator-name`); `None`: the
    /// default derived from the host name.
    pub initiator_name: Option<String>,
}

/// The listening sockets: the vhost-user socket's path, the management
/// API's, and who may connect to either (resolved into a [`SocketAccess`]
/// by [`SocketConfig::access`] at start-up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketConfig {
    /// The vhost-user socket (`--socket-path`).
    pub path: PathBuf,
    /// A listening socket handed over at this descriptor (`--socket-fd`)
    /// to serve instead of binding `path`.
    pub fd: Option<i32>,
    /// The management API's JSON-RPC socket (`--api-socket`), if any;
    /// never the same path ([`DaemonConfig::check`]).
    pub api_socket: Option<PathBuf>,
    /// Permission bits, 0-0o777.
    pub mode: u32,
    /// The socket's group as the operator named it (a group name or a
    /// numeric gid), if not the daemon's.
    pub group: Option<String>,
    /// The API socket's permission bits (`--api-socket-mode`, default
    /// 0600) and group (`--api-socket-group`): its own, not the vhost-user
    /// socket's, since whoever may connect to it may open any file the
    /// daemon can as a LUN, while the VMM's group only needs the other.
    pub api_mode: u32,
    pub api_group: Option<String>,
}

/// A socket's access: `mode`, and `group` resolved (a group name first,
/// as chown(1) does, then a numeric gid); errors name `flag`.
fn socket_access(
    mode: u32,
    group: Option<&str>,
    flag: &'static str,
) -> Result<SocketAccess, ConfigError> {
    let group = match group {
        None => None,
        Some(name) => {
            let gid = match group_id(name).map_err(|source| ConfigError::GroupLookup {
                flag,
                name: name.to_string(),
                source,
            })? {
                Some(gid) => gid,
                None => name
                    .parse::<u32>()
                    .ok()
                    .filter(|&g| g != u32::MAX)
                    .ok_or_else(|| ConfigError::NoSuchGroup {
                        flag,
                        name: name.to_string(),
                    })?,
            };
            Some(SocketGroup {
                name: name.to_string(),
                gid,
            })
        }
    };
    Ok(SocketAccess { mode, group })
}

/// The I/O engine asked for; [`IoEngineChoice::resolve`] turns it into the
/// [`IoEngine`] to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngineChoice {
    /// io_uring where a probe shows it works, else sync.
    #[default]
    Auto,
    Sync,
    IoUring,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--threads {threads}: more threads than request queues (--num-queues {queues})")]
    Threads { threads: usize, queues: usize },
    #[error("--num-queues {0}: not from 1 to {MAX_REQUEST_QUEUES}")]
    Queues(usize),
    #[error("--threads {0}: not from 1 to {MAX_REQUEST_QUEUES}")]
    ThreadCount(usize),
    #[error("--poll-us {}: not from 0 to 1000", .0.as_micros())]
    Poll(std::time::Duration),
    #[error("--socket-mode {0:04o}: not an octal mode from 0000 to 0777 (e.g. 0660)")]
    SocketMode(u32),
    #[error("--api-socket {}: the same path as --socket-path", .0.display())]
    ApiSocketIsVhostSocket(PathBuf),
    #[error("--api-socket-mode {0:04o}: not an octal mode from 0000 to 0777 (e.g. 0660)")]
    ApiSocketMode(u32),
    #[error("{flag} {name}: cannot look up the group: {source}")]
    GroupLookup {
        flag: &'static str,
        name: String,
        source: io::Error,
    },
    #[error("{flag} {name}: no such group (a group name or a numeric gid)")]
    NoSuchGroup { flag: &'static str, name: String },
    #[error("--io-engine io-uring: io_uring is not usable here: {0}")]
    IoUring(io::Error),
    #[error("too many images: {0} given, at most {MAX_IMAGES} (LUNs 0-{MAX_LUN})")]
    TooManyImages(usize),
    #[error("LUN {lun} ({}): {source}", .source.image)]
    Option { lun: usize, source: LunSpecError },
    #[error(transparent)]
    FileLimit(#[from] FdLimitError),
    #[error("image {}: {source}", .path.display())]
    Open { path: PathBuf, source: OpenError },
    /// The sandbox could not be set up (its message says why).
    #[error("{0}")]
    Sandbox(String),
    /// An NBD export that cannot be served (its message names the URI).
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// An iSCSI unit that cannot be served (its message names the URI,
    /// without a password).
    #[error(transparent)]
    Iscsi(#[from] IscsiError),
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

impl DaemonConfig {
    /// The state file's path: `--state-file`, or the socket path with
    /// `.state` appended.
    pub fn state_file(&self) -> PathBuf {
        self.state_file
            .clone()
            .unwrap_or_else(|| crate::state::default_path(&self.socket.path))
    }

    /// Serving `luns` on `socket_path`, with every other setting as the
    /// command line's default: socket mode 0600 in the daemon's group,
    /// read-write, through the page cache, discard on, rotating, 16 request
    /// queues on one thread without polling, I/O engine `auto`.
    pub fn new(socket_path: impl Into<PathBuf>, luns: Vec<LunSpec>) -> DaemonConfig {
        DaemonConfig {
            socket: SocketConfig::new(socket_path),
            luns,
            read_only: false,
            direct: false,
            discard: true,
            solid_state: false,
            queues: QueueOptions::default(),
            io_engine: IoEngineChoice::Auto,
            state_file: None,
            incoming: false,
            sandbox: crate::sandbox::SandboxMode::On,
            sandbox_allow: Vec::new(),
            sandbox_network: false,
            initiator_name: None,
        }
    }

    /// Checks what can be checked without looking at the system: the
    /// queue settings, the socket mode, the API socket's path (not the
    /// vhost-user socket's) and the number of LUNs.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_queues(&self.queues)?;
        if self.socket.mode > 0o777 {
            return Err(ConfigError::SocketMode(self.socket.mode));
        }
        if self.socket.api_mode > 0o777 {
            return Err(ConfigError::ApiSocketMode(self.socket.api_mode));
        }
        self.socket.check_api_socket()?;
        if self.luns.len() > MAX_IMAGES {
            return Err(ConfigError::TooManyImages(self.luns.len()));
        }
        Ok(())
    }
}

/// Checks the queue settings: 1-62 request queues, 1 to that many worker
/// threads, polling for at most [`MAX_POLL`].
pub(crate) fn check_queues(queues: &QueueOptions) -> Result<(), ConfigError> {
    if !(1..=MAX_REQUEST_QUEUES).contains(&queues.request_queues) {
        return Err(ConfigError::Queues(queues.request_queues));
    }
    if queues.threads == 0 {
        return Err(ConfigError::ThreadCount(queues.threads));
    }
    if queues.threads > queues.request_queues {
        return Err(ConfigError::Threads {
            threads: queues.threads,
            queues: queues.request_queues,
        });
    }
    if queues.poll > MAX_POLL {
        return Err(ConfigError::Poll(queues.poll));
    }
    Ok(())
}

/// Parses `IMAGE[,OPTIONS]` arguments as LUNs 0..N-1; too many of them is an
/// error before any is parsed.
pub(crate) fn parse_luns<A: AsRef<OsStr>>(args: &[A]) -> Result<Vec<LunSpec>, ConfigError> {
    if args.len() > MAX_IMAGES {
        return Err(ConfigError::TooManyImages(args.len()));
    }
    args.iter()
        .enumerate()
        .map(|(lun, arg)| {
            LunSpec::parse(arg.as_ref()).map_err(|source| ConfigError::Option { lun, source })
        })
        .collect()
}

impl SocketConfig {
    /// `path`, no API socket, mode 0600, the daemon's group.
    pub fn new(path: impl Into<PathBuf>) -> SocketConfig {
        SocketConfig {
            path: path.into(),
            fd: None,
            api_socket: None,
            mode: DEFAULT_SOCKET_MODE,
            group: None,
            api_mode: DEFAULT_SOCKET_MODE,
            api_group: None,
        }
    }

    /// Refuses an API socket at the vhost-user socket's path (compared as
    /// written: two spellings of one path are caught when the second
    /// socket finds the first one live).
    pub(crate) fn check_api_socket(&self) -> Result<(), ConfigError> {
        match &self.api_socket {
            Some(api) if *api == self.path => Err(ConfigError::ApiSocketIsVhostSocket(api.clone())),
            _ => Ok(()),
        }
    }

    /// Who may connect to the socket: the group resolved (a group name
    /// first, as chown(1) does, then a numeric gid), or why it is unusable.
    pub fn access(&self) -> Result<SocketAccess, ConfigError> {
        socket_access(self.mode, self.group.as_deref(), "--socket-group")
    }

    /// Who may connect to the API socket, as [`SocketConfig::access`].
    pub fn api_access(&self) -> Result<SocketAccess, ConfigError> {
        socket_access(
            self.api_mode,
            self.api_group.as_deref(),
            "--api-socket-group",
        )
    }
}

/// The gid of group `name` in the group database, or `None` if there is
/// no such group.
fn group_id(name: &str) -> io::Result<Option<u32>> {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 1024];
    loop {
        // libc, not rustix: getgrnam_r is the C library's group database
        // (NSS: /etc/group, LDAP, systemd-userdb...), not a system call;
        // rustix has no such lookup.
        // SAFETY: `group` and `result` are written by getgrnam_r, which
        // keeps its strings in `buf` (valid for `buf.len()` bytes).
        let (rc, found) = unsafe {
            let mut group: libc::group = std::mem::zeroed();
            let mut result: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            );
            (rc, (!result.is_null()).then_some(group.gr_gid))
        };
        match rc {
            0 => return Ok(found),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // No entry: some implementations say so with an errno.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

impl IoEngineChoice {
    /// Every choice, in the order the command line lists them.
    pub(crate) const ALL: [IoEngineChoice; 3] = [
        IoEngineChoice::Auto,
        IoEngineChoice::Sync,
        IoEngineChoice::IoUring,
    ];

    /// The name an operator gives it: `auto`, `sync` or `io-uring`.
    pub fn name(self) -> &'static str {
        match self {
            IoEngineChoice::Auto => "auto",
            IoEngineChoice::Sync => "sync",
            IoEngineChoice::IoUring => "io-uring",
        }
    }

    /// The I/O engine to use: `auto` probes io_uring (logging why it falls
    /// back to sync); an explicit `io-uring` that does not work here is an
    /// error.
    pub fn resolve(self) -> Result<IoEngine, ConfigError> {
        match self {
            IoEngineChoice::Sync => Ok(IoEngine::Sync),
            IoEngineChoice::IoUring => crate::storage::uring::probe()
                .map(|()| IoEngine::IoUring)
                .map_err(ConfigError::IoUring),
            IoEngineChoice::Auto => match crate::storage::uring::probe() {
                Ok(()) => Ok(IoEngine::IoUring),
                Err(e) => {
                    info!("io_uring is not usable here ({e}): using the sync I/O engine");
                    Ok(IoEngine::Sync)
                }
            },
        }
    }
}

impl std::fmt::Display for IoEngineChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Opens the images of `config.luns` as LUNs 0..N-1, locked, or inactive
/// (without locks) with `--incoming`. The number of LUNs and the
/// open-file limit are checked before any image is opened.
pub fn build_target(config: &DaemonConfig) -> Result<Target, ConfigError> {
    build_target_confined(config, || Ok(()))
}

/// [`build_target`], calling `confine` (the sandbox's Landlock) after the
/// local images are open and before the network LUNs are: a conflicting
/// image lock's holder can be named only before Landlock (it keeps the
/// daemon out of other processes' `/proc` entries), while the threads a
/// network LUN starts, which parse what its server sends, are confined
/// only if they start after it.
pub fn build_target_confined(
    config: &DaemonConfig,
    confine: impl FnOnce() -> Result<(), String>,
) -> Result<Target, ConfigError> {
    let specs = &config.luns;
    if specs.len() > MAX_IMAGES {
        return Err(ConfigError::TooManyImages(specs.len()));
    }
    // Each image keeps a descriptor open: make room for them all, or say
    // so before opening any.
    let queues = FIRST_REQUEST_QUEUE + config.queues.request_queues;
    if let Some(raised) = fdlimit::ensure(specs.len(), queues)? {
        info!(
            "raised the open-file limit from {} to {} for {} images",
            raised.from,
            raised.to,
            specs.len()
        );
    }
    let mut opened: Vec<Option<Disk>> = Vec::with_capacity(specs.len());
    let open = |lun: usize, spec: &LunSpec| -> Result<Disk, ConfigError> {
        let read_only = config.read_only || spec.read_only;
        let (disk, kind, locks) = open_disk(spec, lun as u16, read_only, config, !config.incoming)?;
        log_lun(&format!("LUN {lun}"), spec, &disk, &kind, locks);
        Ok(disk)
    };
    for (lun, spec) in specs.iter().enumerate() {
        opened.push(match spec.source() {
            ImageSource::Local => Some(open(lun, spec)?),
            _ => None,
        });
    }
    confine().map_err(ConfigError::Sandbox)?;
    let mut disks: Vec<Disk> = Vec::with_capacity(specs.len());
    let mut seen = SeenIdentities::default();
    for (lun, (spec, disk)) in specs.iter().zip(opened).enumerate() {
        let disk = match disk {
            Some(disk) => disk,
            None => open(lun, spec)?,
        };
        seen.add(specs, lun, disk.identity())?;
        disks.push(disk);
    }
    Ok(if config.incoming {
        Target::new_inactive(disks)
    } else {
        Target::new(disks)
    })
}

/// The log line of a LUN opened (`what`: "LUN 3", "LUN 3 added"; `kind`:
/// what its storage is, [`open_disk`]'s).
pub(crate) fn log_lun(what: &str, spec: &LunSpec, disk: &Disk, kind: &str, locks: ImageLocks) {
    let size = format!(
        "{what}: {} ({} bytes, {} blocks of {} bytes",
        spec.display(),
        disk.blocks() * u64::from(disk.block_size()),
        disk.blocks(),
        disk.block_size(),
    );
    let access = if disk.read_only() {
        "read-only"
    } else {
        "read-write"
    };
    if disk.forwards_commands() {
        // The remote unit's identity is the guest's, not the daemon's.
        let unfiltered = if disk.unfiltered() {
            ", unfiltered"
        } else {
            ""
        };
        info!("{size} at open, {access}, {kind}{unfiltered})");
        return;
    }
    info!(
        "{size}, {access}, {kind}, {}, serial {}, NAA {:#018x})",
        match locks {
            ImageLocks::Held => "locked",
            ImageLocks::Unsupported => "not locked",
            ImageLocks::Inactive => "inactive, not locked until the VMM starts the device",
        },
        disk.identity().serial,
        disk.identity().naa,
    );
}

/// Opens and checks one image, and with `active` locks it (otherwise it
/// is opened inactive: every check but the locks); also says what its
/// storage is (for the log) and where it stands with its locks. A network
/// URI connects (NBD) or logs in (iSCSI); such storage has no locks.
pub(crate) fn open_disk(
    spec: &LunSpec,
    lun: u16,
    read_only: bool,
    config: &DaemonConfig,
    active: bool,
) -> Result<(Disk, String, ImageLocks), ConfigError> {
    match spec.source() {
        ImageSource::Local => open_local(spec, lun, read_only, config, active),
        ImageSource::Nbd => open_nbd(spec, lun, read_only, config),
        ImageSource::Iscsi => open_iscsi(spec, lun, read_only, config),
    }
}

/// [`open_disk`] for an `nbd://` or `nbd+unix://` URI: the daemon's own
/// disk emulation over an NBD client.
fn open_nbd(
    spec: &LunSpec,
    lun: u16,
    read_only: bool,
    config: &DaemonConfig,
) -> Result<(Disk, String, ImageLocks), ConfigError> {
    let uri = spec.path.to_string_lossy();
    let defaults = NbdOptions::default();
    let options = NbdOptions {
        read_only,
        connections: spec.connections.map_or(defaults.connections, usize::from),
        timeout: spec.timeout_or(defaults.timeout),
        ..defaults
    };
    let image = NbdImage::open(&uri, options)?;
    let kind = format!(
        "NBD export, {} connection{}",
        image.connections(),
        if image.connections() == 1 { "" } else { "s" }
    );
    let block_size = spec.block_size.unwrap_or(BLOCK_SIZE);
    let disk = network_disk(Box::new(image), spec, lun, block_size, config)?;
    Ok((disk, kind, ImageLocks::Unsupported))
}

/// The unit of a network LUN over `storage`: its identity derived from the
/// URI without a password (a passthrough unit's is never shown: INQUIRY
/// goes to the remote).
fn network_disk(
    storage: Box<dyn crate::storage::Storage>,
    spec: &LunSpec,
    lun: u16,
    block_size: u32,
    config: &DaemonConfig,
) -> Result<Disk, ConfigError> {
    let disk_config = DiskConfig {
        block_size,
        identity: identity(spec, Path::new(&spec.display()), lun),
        solid_state: config.solid_state,
        discard: config.discard,
    };
    Disk::new(storage, disk_config).map_err(|source| ConfigError::Disk {
        path: PathBuf::from(spec.display()),
        source,
    })
}

/// [`open_disk`] for an `iscsi://` URI: a passthrough unit.
fn open_iscsi(
    spec: &LunSpec,
    lun: u16,
    read_only: bool,
    config: &DaemonConfig,
) -> Result<(Disk, String, ImageLocks), ConfigError> {
    let uri = spec.path.to_string_lossy();
    let defaults = IscsiOptions::default();
    let options = IscsiOptions {
        initiator_name: config.initiator_name.clone(),
        user: spec.user.clone(),
        password: match (&spec.password_file, &spec.password_env) {
            (Some(file), _) => PasswordSource::File(file.clone()),
            (None, Some(var)) => PasswordSource::Env(var.clone()),
            (None, None) => PasswordSource::Uri,
        },
        timeout: spec.timeout_or(defaults.timeout),
        read_only,
        ..defaults
    };
    let unit = IscsiLun::open(&uri, &options)?;
    let block_size = unit.block_size();
    let disk = network_disk(Box::new(unit), spec, lun, block_size, config)?
        .with_unfiltered(spec.unfiltered);
    Ok((
        disk,
        "iSCSI passthrough".to_string(),
        ImageLocks::Unsupported,
    ))
}

/// [`open_disk`] for a regular file or block device.
fn open_local(
    spec: &LunSpec,
    lun: u16,
    read_only: bool,
    config: &DaemonConfig,
    active: bool,
) -> Result<(Disk, String, ImageLocks), ConfigError> {
    let path = spec.path.as_path();
    let open = if config.direct {
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
    // keeps the image open, which is the daemon's lifetime, unless the
    // target is deactivated. A file system that cannot lock is a warning
    // (`FileImage::activate`), not an error.
    let locks = if active {
        image.activate().map_err(|source| ConfigError::Lock {
            path: path.to_path_buf(),
            source,
        })?
    } else {
        ImageLocks::Inactive
    };
    let direct = config.direct;
    let config = DiskConfig {
        block_size,
        identity: identity(spec, path, lun),
        solid_state: config.solid_state,
        discard: config.discard,
    };
    let kind = match image.kind() {
        ImageKind::RegularFile => "regular file",
        ImageKind::BlockDevice => "block device",
    };
    let kind = format!("{kind}{}", if direct { ", O_DIRECT" } else { "" });
    let disk = Disk::new(Box::new(image), config).map_err(|source| ConfigError::Disk {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((disk, kind, locks))
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
                image: specs[blamed].display(),
                option: Some(format!("{name}={value}")),
                reason: format!("LUN {partner} has the same {what}"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of `len` zero bytes in `dir`.
    fn image(dir: &Path, name: &str, len: usize) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        path
    }

    fn lun(path: &Path) -> LunSpec {
        LunSpec {
            path: path.to_path_buf(),
            ..LunSpec::default()
        }
    }

    /// A configuration built field by field, with no command line, gives
    /// the target it describes.
    #[test]
    fn a_config_without_clap_builds_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "a.raw", 8192);
        let b = image(dir.path(), "b.raw", 8192);
        let mut config = DaemonConfig::new(
            dir.path().join("s.sock"),
            vec![
                LunSpec {
                    serial: Some("SERIAL-A".into()),
                    wwn: Some(0x5000_c500_1234_5678),
                    ..lun(&a)
                },
                format!("{},ro,block-size=4096", b.display())
                    .parse()
                    .unwrap(),
            ],
        );
        config.discard = false;
        config.solid_state = true;
        config.io_engine = IoEngineChoice::Sync;
        config.check().unwrap();
        assert_eq!(config.io_engine.resolve().unwrap(), IoEngine::Sync);
        let target = build_target(&config).unwrap();
        let luns: Vec<_> = target.units().into_iter().map(|(_, d)| d).collect();
        assert_eq!(luns.len(), 2);
        assert_eq!(
            (luns[0].read_only(), luns[0].block_size(), luns[0].blocks()),
            (false, 512, 16)
        );
        assert_eq!(luns[0].identity().serial, "SERIAL-A");
        assert_eq!(luns[0].identity().naa, 0x5000_c500_1234_5678);
        assert_eq!(
            (luns[1].read_only(), luns[1].block_size(), luns[1].blocks()),
            (true, 4096, 2)
        );
        assert!(luns.iter().all(|d| !d.discard_enabled()));
        drop((luns, target));

        // The global flags reach every LUN (discard only a writable one).
        config.discard = true;
        let target = build_target(&config).unwrap();
        assert!(target.unit(0).unwrap().discard_enabled());
        assert!(!target.unit(1).unwrap().discard_enabled());
        drop(target);
        config.read_only = true;
        let target = build_target(&config).unwrap();
        assert!(target.units().iter().all(|(_, d)| d.read_only()));
    }

    #[test]
    fn build_target_errors_name_the_lun_or_image() {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "a", 4096);
        let b = image(dir.path(), "b", 4096);
        let missing = dir.path().join("missing.raw");
        let with_serial = |path: &Path| LunSpec {
            serial: Some("S".into()),
            ..lun(path)
        };
        let message = |luns: Vec<LunSpec>| {
            let config = DaemonConfig::new("s.sock", luns);
            build_target(&config).err().unwrap().to_string()
        };
        assert_eq!(
            message(vec![with_serial(&a), with_serial(&b)]),
            format!(
                "LUN 1 ({}): serial=S: LUN 0 has the same serial number",
                b.display()
            )
        );
        assert!(message(vec![lun(&a), lun(&missing)])
            .starts_with(&format!("image {}: ", missing.display())));
        assert_eq!(
            message(vec![lun(&a); MAX_IMAGES + 1]),
            "too many images: 16385 given, at most 16384 (LUNs 0-16383)"
        );
    }

    /// What clap rules out, a configuration built by hand is checked for.
    #[test]
    fn check_rejects_what_the_command_line_cannot_say() {
        let message = |change: &dyn Fn(&mut DaemonConfig)| {
            let mut config = DaemonConfig::new("s.sock", vec![lun(Path::new("a"))]);
            change(&mut config);
            config.check().err().map(|e| e.to_string())
        };
        assert_eq!(message(&|_| {}), None);
        assert_eq!(
            message(&|c| {
                c.queues.request_queues = 2;
                c.queues.threads = 3;
            })
            .as_deref(),
            Some("--threads 3: more threads than request queues (--num-queues 2)")
        );
        assert_eq!(
            message(&|c| c.queues.request_queues = 0).as_deref(),
            Some("--num-queues 0: not from 1 to 62")
        );
        assert_eq!(
            message(&|c| c.queues.request_queues = 63).as_deref(),
            Some("--num-queues 63: not from 1 to 62")
        );
        assert_eq!(
            message(&|c| c.queues.threads = 0).as_deref(),
            Some("--threads 0: not from 1 to 62")
        );
        assert_eq!(
            message(&|c| c.queues.poll = std::time::Duration::from_micros(1001)).as_deref(),
            Some("--poll-us 1001: not from 0 to 1000")
        );
        assert_eq!(
            message(&|c| c.socket.mode = 0o1777).as_deref(),
            Some("--socket-mode 1777: not an octal mode from 0000 to 0777 (e.g. 0660)")
        );
        assert_eq!(
            message(&|c| c.socket.api_socket = Some("s.sock".into())).as_deref(),
            Some("--api-socket s.sock: the same path as --socket-path")
        );
        assert_eq!(
            message(&|c| c.socket.api_socket = Some("api.sock".into())),
            None
        );
        assert_eq!(
            message(&|c| c.luns = vec![lun(Path::new("a")); MAX_IMAGES + 1]).as_deref(),
            Some("too many images: 16385 given, at most 16384 (LUNs 0-16383)")
        );
    }

    #[test]
    fn parse_luns_numbers_the_luns() {
        let luns = parse_luns(&["a", "b,,c,ro"]).unwrap();
        assert_eq!(luns[0], lun(Path::new("a")));
        assert_eq!(
            (luns[1].path.as_path(), luns[1].read_only),
            (Path::new("b,c"), true)
        );
        assert_eq!(
            parse_luns(&["a", "b", "c,block-size=1"])
                .unwrap_err()
                .to_string(),
            "LUN 2 (c): block-size=1: must be 512 or 4096"
        );
        // Too many is said before any argument is parsed.
        assert_eq!(
            parse_luns(&vec![",bad"; MAX_IMAGES + 1])
                .unwrap_err()
                .to_string(),
            "too many images: 16385 given, at most 16384 (LUNs 0-16383)"
        );
        assert!(parse_luns::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn io_engine_choices() {
        let names: Vec<String> = IoEngineChoice::ALL.iter().map(|c| c.to_string()).collect();
        assert_eq!(names, ["auto", "sync", "io-uring"]);
        assert_eq!(IoEngineChoice::default(), IoEngineChoice::Auto);
        assert_eq!(IoEngineChoice::Sync.resolve().unwrap(), IoEngine::Sync);
        // The probe decides what the other two give.
        match crate::storage::uring::probe() {
            Ok(()) => {
                assert_eq!(IoEngineChoice::Auto.resolve().unwrap(), IoEngine::IoUring);
                assert_eq!(
                    IoEngineChoice::IoUring.resolve().unwrap(),
                    IoEngine::IoUring
                );
            }
            Err(_) => {
                assert_eq!(IoEngineChoice::Auto.resolve().unwrap(), IoEngine::Sync);
                let e = IoEngineChoice::IoUring.resolve().unwrap_err().to_string();
                assert!(
                    e.starts_with("--io-engine io-uring: io_uring is not usable here: "),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn socket_access_resolves_the_group() {
        let mut socket = SocketConfig::new("s.sock");
        assert_eq!(
            socket.access().unwrap(),
            SocketAccess {
                mode: 0o600,
                group: None
            }
        );
        socket.mode = 0o660;
        socket.group = Some("0".into());
        assert_eq!(
            socket.access().unwrap(),
            SocketAccess {
                mode: 0o660,
                group: Some(SocketGroup {
                    name: "0".into(),
                    gid: 0
                })
            }
        );
        for (group, message) in [
            (
                "no-such-group-x",
                "--socket-group no-such-group-x: no such group (a group name or a numeric gid)",
            ),
            (
                "4294967295",
                "--socket-group 4294967295: no such group (a group name or a numeric gid)",
            ),
        ] {
            socket.group = Some(group.into());
            assert_eq!(socket.access().unwrap_err().to_string(), message);
        }
    }

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
