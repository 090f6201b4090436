//! iSCSI passthrough: a logical unit of a remote iSCSI target, reached
//! through libiscsi (loaded at run time, `ffi.rs`), to which the SCSI
//! layer forwards every command as it is ([`RemoteOp::Scsi`]).
//!
//! - `uri.rs`: `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN`;
//! - `options.rs`: initiator name, CHAP credentials and where the password
//!   comes from, timeout, header digest;
//! - `ffi.rs`: the libiscsi functions used, resolved with `libloading`;
//! - `session.rs`: the thread that owns the libiscsi context of a unit,
//!   its poll loop, reconnection, and how every command completes once.
//!
//! Under a sandbox: every login (the first, and each after a drop) runs on
//! the session thread and makes `socket(AF_INET or AF_INET6)`, and, inside
//! libiscsi's `getaddrinfo` of the numeric portal, glibc's
//! `socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)` (AI_ADDRCONFIG; if that
//! socket is refused with an error, getaddrinfo goes on without it). No
//! file is opened after the first context (`/dev/urandom`, once per
//! process). The library itself is opened at the first unit, or by
//! [`load_library`]: after Landlock, the dynamic loader cannot read it.

mod ffi;
mod options;
mod session;
mod uri;

pub use options::{
    default_initiator_name, Credentials, HeaderDigest, IscsiOptions, PasswordSource, Secret,
    DEFAULT_TIMEOUT, INITIATOR_PREFIX,
};
pub use session::TASK_ABORTED;
pub use uri::{redact, IscsiUri, DEFAULT_PORT};

use std::ffi::CString;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::remote::{
    DataDirection, RemoteCompletion, RemoteOp, RemoteResult, RemoteStorage, ScsiOutcome,
    TaskManagement, TaskManagementResponse,
};
use super::{Extent, IoBufs, IoBufsMut, PinnedBufs, Storage};
use session::{Command, Data, Done, Session, SessionConfig};

/// Why a unit could not be opened; one line, naming the URI (without its
/// password).
#[derive(Debug, thiserror::Error)]
#[error("{uri}: {reason}")]
pub struct IscsiError {
    uri: String,
    reason: IscsiErrorKind,
}

impl IscsiError {
    pub fn kind(&self) -> &IscsiErrorKind {
        &self.reason
    }
}

/// What went wrong opening a unit.
#[derive(Debug, thiserror::Error)]
pub enum IscsiErrorKind {
    #[error("{0}")]
    Uri(String),
    /// libiscsi could not be loaded.
    #[error("{0}")]
    Library(String),
    #[error("{0}")]
    Credentials(String),
    #[error("cannot resolve {host}: {detail}")]
    Resolve { host: String, detail: String },
    /// Connection or login refused (authentication, unknown target, ...).
    #[error("login failed: {0}")]
    Login(String),
    /// READ CAPACITY did not work.
    #[error("{0}")]
    Capacity(String),
}

/// Loads libiscsi now (it is loaded at the first [`IscsiLun::open`]
/// otherwise): for a daemon that may open iSCSI units after its sandbox is
/// applied, when the dynamic loader can no longer read the library, its
/// dependencies or /etc/ld.so.cache. Errors as [`IscsiErrorKind::Library`]'s.
pub fn load_library() -> Result<(), String> {
    ffi::Libiscsi::get().map(|_| ()).map_err(|e| e.to_string())
}

/// A remote logical unit, logged in.
pub struct IscsiLun {
    label: String,
    session: Session,
    size: u64,
    block_size: u32,
    read_only: bool,
    timeout: Duration,
}

impl std::fmt::Debug for IscsiLun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiLun")
            .field("uri", &self.label)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .finish()
    }
}

impl IscsiLun {
    /// Loads libiscsi, resolves the host, logs in (waiting at most
    /// `options.timeout`) and reads the capacity. The host name is
    /// resolved here only: later logins go to the same numeric address
    /// (the daemon may be sandboxed away from /etc by then).
    pub fn open(uri: &str, options: &IscsiOptions) -> Result<IscsiLun, IscsiError> {
        let parsed = IscsiUri::parse(uri).map_err(|e| IscsiError {
            uri: uri::redact(uri),
            reason: IscsiErrorKind::Uri(e),
        })?;
        let label = parsed.to_string();
        let err = |reason| IscsiError {
            uri: label.clone(),
            reason,
        };
        let lib = ffi::Libiscsi::get().map_err(|e| err(IscsiErrorKind::Library(e.to_string())))?;
        let chap = options
            .credentials(&parsed)
            .map_err(|e| err(IscsiErrorKind::Credentials(e)))?;
        let address = resolve(&parsed.host, parsed.port).map_err(|detail| {
            err(IscsiErrorKind::Resolve {
                host: parsed.host.clone(),
                detail,
            })
        })?;
        let cstring = |what: &str, s: &str| {
            CString::new(s)
                .map_err(|_| err(IscsiErrorKind::Uri(format!("a NUL byte in the {what}"))))
        };
        let initiator = options
            .initiator_name
            .clone()
            .unwrap_or_else(default_initiator_name);
        let config = SessionConfig {
            label: label.clone(),
            portal: cstring("address", &address.to_string())?,
            target: cstring("target name", &parsed.target)?,
            lun: parsed.lun,
            initiator: cstring("initiator name", &initiator)?,
            chap: match chap {
                Some(c) => Some((
                    cstring("user", &c.user)?,
                    cstring("password", &c.password.0)?,
                )),
                None => None,
            },
            header_digest: match options.header_digest {
                HeaderDigest::None => ffi::ISCSI_HEADER_DIGEST_NONE,
                HeaderDigest::NoneCrc32c => ffi::ISCSI_HEADER_DIGEST_NONE_CRC32C,
                HeaderDigest::Crc32cNone => ffi::ISCSI_HEADER_DIGEST_CRC32C_NONE,
                HeaderDigest::Crc32c => ffi::ISCSI_HEADER_DIGEST_CRC32C,
            },
            timeout: Duration::from_secs(options.timeout_secs()),
            isid: random_isid(),
        };
        let session = Session::start(lib, config).map_err(|e| err(IscsiErrorKind::Login(e)))?;
        let timeout = Duration::from_secs(options.timeout_secs());
        let (size, block_size) =
            read_capacity(&session, timeout).map_err(|e| err(IscsiErrorKind::Capacity(e)))?;
        Ok(IscsiLun {
            label,
            session,
            size,
            block_size,
            read_only: options.read_only,
            timeout,
        })
    }

    /// The logical block length the unit reported at open.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The URI without its password.
    pub fn uri(&self) -> &str {
        &self.label
    }
}

/// A random ISID (24 bits and a 16-bit qualifier), per unit: std's
/// randomly keyed hasher over the time and the process, as libiscsi's own
/// (`rand()`) is no better.
fn random_isid() -> (u32, u32) {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    let r = h.finish();
    ((r & 0xff_ffff) as u32, ((r >> 24) & 0xffff) as u32)
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let mut addrs = (host, port).to_socket_addrs().map_err(|e| e.to_string())?;
    addrs.next().ok_or_else(|| "no address".to_string())
}

/// READ CAPACITY (16) at open, retried past unit attentions (a fresh
/// session's POWER ON/RESET); READ CAPACITY (10) if (16) is refused.
fn read_capacity(session: &Session, timeout: Duration) -> Result<(u64, u32), String> {
    let describe = |outcome: &ScsiOutcome| {
        let s = outcome.sense();
        match s.first().map(|b| b & 0x7f) {
            Some(0x70 | 0x71) if s.len() >= 14 => format!(
                "status {:#04x}, sense key {:#x}, ASC/ASCQ {:02x}/{:02x}",
                outcome.status,
                s[2] & 0xf,
                s[12],
                s[13]
            ),
            Some(0x72 | 0x73) if s.len() >= 4 => format!(
                "status {:#04x}, sense key {:#x}, ASC/ASCQ {:02x}/{:02x}",
                outcome.status,
                s[1] & 0xf,
                s[2],
                s[3]
            ),
            _ => format!("status {:#04x}", outcome.status),
        }
    };
    let mut use16 = true;
    for _ in 0..6 {
        let (cdb, len): (Vec<u8>, usize) = if use16 {
            (
                vec![0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                32,
            )
        } else {
            (vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8)
        };
        let (result, buf) =
            session.command_sync(&cdb, DataDirection::FromDevice, vec![0; len], timeout);
        let outcome = result.map_err(|e| format!("READ CAPACITY: {e}"))?;
        match outcome.status {
            0 if use16 && outcome.transferred >= 12 => {
                let last = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
                let block = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
                return capacity(last, block);
            }
            0 if !use16 && outcome.transferred >= 8 => {
                let last = u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
                let block = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes"));
                return capacity(u64::from(last), block);
            }
            2 if sense_key(&outcome) == 0x6 => continue, // UNIT ATTENTION
            2 if use16 && sense_key(&outcome) == 0x5 => use16 = false,
            _ => return Err(format!("READ CAPACITY: {}", describe(&outcome))),
        }
    }
    Err("READ CAPACITY: unit attentions do not stop".to_string())
}

/// The sense key of `o`'s sense data, either format (0: none).
fn sense_key(o: &ScsiOutcome) -> u8 {
    let s = o.sense();
    match s.first().map(|b| b & 0x7f) {
        Some(0x70 | 0x71) if s.len() > 2 => s[2] & 0xf,
        Some(0x72 | 0x73) if s.len() > 1 => s[1] & 0xf,
        _ => 0,
    }
}

fn capacity(last_lba: u64, block: u32) -> Result<(u64, u32), String> {
    if block == 0 {
        return Err("READ CAPACITY: block length 0".to_string());
    }
    last_lba
        .checked_add(1)
        .and_then(|n| n.checked_mul(u64::from(block)))
        .map(|size| (size, block))
        .ok_or_else(|| "READ CAPACITY: the size overflows".to_string())
}

/// Fixed-format sense: ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
const INVALID_OPCODE_SENSE: [u8; 18] = [
    0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0x00, 0, 0, 0, 0,
];

impl RemoteStorage for IscsiLun {
    /// Forwards `RemoteOp::Scsi`. A CDB longer than 16 bytes (libiscsi
    /// 1.19 sends no additional header segment) is answered here with
    /// CHECK CONDITION, ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE,
    /// without reaching the remote. Read, Write and Flush (NBD's) are
    /// answered with an `Unsupported` error.
    fn submit(&self, op: RemoteOp, bufs: PinnedBufs, completion: RemoteCompletion) {
        let RemoteOp::Scsi {
            cdb,
            direction,
            len,
            tag,
        } = op
        else {
            drop(bufs);
            completion.complete(RemoteResult::Io(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an iSCSI passthrough unit takes SCSI commands only",
            ))));
            return;
        };
        if cdb.as_slice().len() > ffi::SCSI_CDB_MAX_SIZE {
            drop(bufs);
            completion.complete(RemoteResult::Scsi(Ok(ScsiOutcome::new(
                2,
                &INVALID_OPCODE_SENSE,
                0,
            ))));
            return;
        }
        let held: usize = bufs.iovecs().iter().map(|v| v.iov_len).sum();
        if direction != DataDirection::None && held < len || len > i32::MAX as usize {
            drop(bufs);
            completion.complete(RemoteResult::Scsi(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the data buffer is shorter than the command's length",
            ))));
            return;
        }
        self.session.submit(Command {
            cdb,
            direction,
            len,
            tag: Some(tag),
            data: Data::Pinned(bufs),
            deadline: Instant::now() + self.timeout,
            done: Done::Remote(completion),
        });
    }

    fn task_management(&self, tmf: TaskManagement, timeout: Duration) -> TaskManagementResponse {
        self.session.task_management(tmf, timeout)
    }
}

fn not_forwarded() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "an iSCSI passthrough unit is accessed through SCSI commands only",
    )
}

/// The byte-level methods are never called for a passthrough unit (the
/// SCSI layer forwards every command through [`Storage::remote`]): they
/// return an `Unsupported` error.
impl Storage for IscsiLun {
    /// (last LBA + 1) × block length, from READ CAPACITY at open.
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&self, _bufs: &mut IoBufsMut<'_>, _offset: u64) -> io::Result<()> {
        Err(not_forwarded())
    }

    fn write_vectored_at(
        &self,
        _bufs: &IoBufs<'_>,
        _offset: u64,
        _durable: bool,
    ) -> io::Result<()> {
        Err(not_forwarded())
    }

    /// SYNCHRONIZE CACHE(10) of the whole unit (SBC-3 §5.24: LBA 0,
    /// NUMBER OF LOGICAL BLOCKS 0, to the end), past unit attentions, at
    /// most the timeout each: the daemon's own flush when a LUN is removed
    /// or the VM migrates away (the guest's SYNCHRONIZE CACHE is forwarded
    /// like any command).
    fn flush(&self) -> io::Result<()> {
        const SYNCHRONIZE_CACHE_10: [u8; 10] = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for _ in 0..4 {
            let (result, _) = self.session.command_sync(
                &SYNCHRONIZE_CACHE_10,
                DataDirection::None,
                Vec::new(),
                self.timeout,
            );
            let outcome = result?;
            match outcome.status {
                0 => return Ok(()),
                2 if sense_key(&outcome) == 0x6 => continue, // UNIT ATTENTION
                status => {
                    return Err(io::Error::other(format!(
                        "SYNCHRONIZE CACHE: status {status:#04x}, sense key {:#x}",
                        sense_key(&outcome)
                    )))
                }
            }
        }
        Err(io::Error::other(
            "SYNCHRONIZE CACHE: unit attentions do not stop",
        ))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _deallocate: bool) -> io::Result<()> {
        Err(not_forwarded())
    }

    fn extent(&self, _offset: u64) -> io::Result<Extent> {
        Err(not_forwarded())
    }

    fn remote(&self) -> Option<&dyn RemoteStorage> {
        Some(self)
    }

    fn scsi_passthrough(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_name_the_uri_without_the_password() {
        let e = IscsiLun::open("iscsi://u%hunter2@h/iqn.x/99999", &IscsiOptions::default())
            .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("iscsi://u@h/iqn.x/99999: LUN"), "{s}");
        assert!(!s.contains("hunter2"));
        assert!(matches!(e.kind(), IscsiErrorKind::Uri(_)));
    }

    #[test]
    fn a_missing_library_names_the_uri_and_the_package() {
        let Err(load) = ffi::Libiscsi::load("libiscsi-missing.so.7") else {
            panic!("loaded a library that does not exist");
        };
        let e = IscsiError {
            uri: IscsiUri::parse("iscsi://127.0.0.1/iqn.x/1")
                .unwrap()
                .to_string(),
            reason: IscsiErrorKind::Library(load.to_string()),
        };
        assert_eq!(
            e.to_string(),
            "iscsi://127.0.0.1/iqn.x/1: libiscsi-missing.so.7 not found (install the libiscsi7 package)"
        );
    }

    #[test]
    fn capacity_is_blocks_times_length() {
        assert_eq!(capacity(2047, 512), Ok((1 << 20, 512)));
        assert!(capacity(u64::MAX, 512).is_err());
        assert!(capacity(7, 0).is_err());
    }
}
