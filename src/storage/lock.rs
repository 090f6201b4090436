//! Image locks that QEMU understands (QEMU's `block/file-posix.c`).
//!
//! QEMU publishes what each user of an image does with it as byte-range
//! locks on the image file itself. A user takes a shared (read) lock on byte
//! `100 + n` for each block-layer permission `n` it holds, and on byte
//! `200 + n` for each permission it refuses to share with others. Before it
//! relies on them, it probes (with a write-lock test) that nobody else has
//! locked `200 + n` for a permission `n` it holds, or `100 + n` for a
//! permission it refuses to share. Every lock is a shared lock, so locks
//! never conflict with each other; only the probes find conflicts.
//!
//! The locks are open file description (OFD) locks (`F_OFD_SETLK`): they
//! belong to the open file, not to the process, and live exactly as long as
//! the file stays open. Two opens of one image conflict even within a single
//! process, which is also what makes them testable in-process.
//!
//! The daemon takes the same bytes, so QEMU, `qemu-img`, `qemu-io`,
//! `qemu-storage-daemon` and other instances of this daemon all see it, and
//! it sees them.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

/// QEMU's `RAW_LOCK_PERM_BASE`: byte `100 + n` is locked by every user
/// holding permission `n`.
pub const PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte `200 + n` is locked by every user
/// that does not share permission `n` with others.
pub const SHARED_BASE: i64 = 200;

/// The QEMU block permissions (`BLK_PERM_*`) the daemon deals in, by bit
/// number. The others are WRITE_UNCHANGED (2), RESIZE (3) and, before QEMU
/// 6.2, GRAPH_MOD (4); the daemon neither holds nor refuses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// `BLK_PERM_CONSISTENT_READ` (0x01): reads see consistent data.
    ConsistentRead = 0,
    /// `BLK_PERM_WRITE` (0x02): writes that may change the data.
    Write = 1,
}

impl Perm {
    /// The name QEMU's messages use (`bdrv_perm_names`).
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
        }
    }

    /// The byte locked by users holding this permission.
    pub fn held_byte(self) -> i64 {
        PERM_BASE + self as i64
    }

    /// The byte locked by users refusing to share this permission.
    pub fn unshared_byte(self) -> i64 {
        SHARED_BASE + self as i64
    }
}

/// What a LUN holds and what it refuses to share, as QEMU's device models
/// do (`blkconf_apply_backend_options`): a device holds CONSISTENT_READ, and
/// WRITE unless it is read-only, and shares WRITE with nobody (QEMU's
/// `share-rw=off`, its default) whether it writes or not.
fn permissions(read_only: bool) -> (&'static [Perm], &'static [Perm]) {
    const UNSHARED: &[Perm] = &[Perm::Write];
    if read_only {
        (&[Perm::ConsistentRead], UNSHARED)
    } else {
        (&[Perm::ConsistentRead, Perm::Write], UNSHARED)
    }
}

/// Why another user of an image stands in the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// It holds a permission this LUN refuses to share (its `100 + n` byte).
    Holds(Perm),
    /// It refuses to share a permission this LUN needs (its `200 + n` byte).
    Refuses(Perm),
}

impl Conflict {
    fn byte(self) -> i64 {
        match self {
            Conflict::Holds(p) => p.held_byte(),
            Conflict::Refuses(p) => p.unshared_byte(),
        }
    }

    /// The conflict a lock on `byte` stands for.
    fn at(byte: i64) -> Conflict {
        let perm = if byte % 100 == 0 {
            Perm::ConsistentRead
        } else {
            Perm::Write
        };
        if byte >= SHARED_BASE {
            Conflict::Refuses(perm)
        } else {
            Conflict::Holds(perm)
        }
    }

    fn summary(self) -> &'static str {
        match self {
            Conflict::Holds(Perm::Write) => "it is being written",
            Conflict::Holds(Perm::ConsistentRead) => "it is being read",
            Conflict::Refuses(Perm::Write) => "it refuses writers",
            Conflict::Refuses(Perm::ConsistentRead) => "it refuses readers",
        }
    }

    fn detail(self) -> String {
        match self {
            Conflict::Holds(p) => format!(
                "lock byte {} (QEMU's \"{}\" permission) is taken; an image has at most one writer",
                self.byte(),
                p.name()
            ),
            Conflict::Refuses(Perm::Write) => format!(
                "lock byte {} (QEMU's unshared \"write\") is taken; \
                 serve the image read-only (-r or ,ro) to share it with other readers",
                self.byte()
            ),
            Conflict::Refuses(p) => format!(
                "lock byte {} (QEMU's unshared \"{}\") is taken",
                self.byte(),
                p.name()
            ),
        }
    }
}

/// Who holds a conflicting lock, as far as can be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Another process; `name` is its `comm`, when readable.
    Process { pid: i32, name: Option<String> },
    /// Another open of the same image in this process: another LUN.
    ThisProcess,
    /// Not found out: OFD locks carry no pid, and the holder may be in
    /// another pid namespace or out of reach of `/proc`.
    Unknown,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Process {
                pid,
                name: Some(name),
            } => write!(f, "{name}, pid {pid}"),
            Holder::Process { pid, name: None } => write!(f, "process {pid}"),
            Holder::ThisProcess => f.write_str("another LUN of this daemon"),
            Holder::Unknown => f.write_str("another process"),
        }
    }
}

/// Where an open image stands with its locks.
///
/// QEMU opens the images of a VM that is to receive a live migration
/// (`-incoming`) inactive (`BDRV_O_INACTIVE`): opened, but holding no
/// permission and so no lock byte, while the source still runs the VM on
/// them. At the end of the migration the source inactivates its images
/// (`bdrv_inactivate_all`, releasing its locks) and the destination
/// activates its own (`bdrv_activate_all`, taking them); a failed or
/// cancelled migration activates the source's images again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageLocks {
    /// Inactive: opened and checked, no lock byte held.
    Inactive,
    /// Active, with the locks `lock_image` takes.
    Held,
    /// Active without locks: the file system cannot lock (NFS without a
    /// lock manager, ...), which is a warning, not an error; or storage
    /// that has no locks at all (memory).
    Unsupported,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another user's locks forbid what this LUN would do.
    #[error("locked by {holder} ({}): {}", .conflict.summary(), .conflict.detail())]
    Conflict { holder: Holder, conflict: Conflict },
    /// The file system or kernel cannot lock (no OFD locks, NFS without a
    /// lock manager, ...).
    #[error("cannot take image locks: {0}")]
    Unsupported(io::Error),
}

/// Takes QEMU's locks on `file` for a LUN that writes (`read_only` false)
/// or only reads, and checks that no other user's locks forbid that. On
/// error no lock of this call is left behind. The locks are released when
/// `file` is closed.
///
/// Like QEMU, this locks first and checks afterwards: two processes that
/// start at the same moment then both see each other's locks and both
/// fail, where checking first could let both succeed.
pub fn lock_image(file: &File, read_only: bool) -> Result<(), LockError> {
    let (held, unshared) = permissions(read_only);
    let bytes = lock_bytes(read_only);
    let fd = file.as_raw_fd();
    for (taken, &byte) in bytes.iter().enumerate() {
        if let Err(err) = set_lock(fd, byte, libc::F_RDLCK) {
            release(fd, &bytes[..taken]);
            return Err(match err.raw_os_error() {
                // Someone holds a write lock there: not QEMU, which only
                // takes shared locks, but it is in the way all the same.
                Some(libc::EAGAIN | libc::EACCES) => LockError::Conflict {
                    holder: holder(file, byte, probe(fd, byte).ok().flatten()),
                    conflict: Conflict::at(byte),
                },
                _ => LockError::Unsupported(err),
            });
        }
    }
    // Users of the permissions this LUN refuses to share first: that one is
    // the more telling conflict when a writer refuses writers too.
    let conflicts = unshared
        .iter()
        .map(|&p| Conflict::Holds(p))
        .chain(held.iter().map(|&p| Conflict::Refuses(p)));
    for conflict in conflicts {
        match probe(fd, conflict.byte()) {
            Ok(None) => {}
            Ok(Some(pid)) => {
                release(fd, &bytes);
                return Err(LockError::Conflict {
                    holder: holder(file, conflict.byte(), Some(pid)),
                    conflict,
                });
            }
            Err(err) => {
                release(fd, &bytes);
                return Err(LockError::Unsupported(err));
            }
        }
    }
    Ok(())
}

/// Releases every lock [`lock_image`] takes on `file` for a LUN that
/// writes or only reads, keeping the file open: what QEMU does to an
/// image it inactivates (`blk_root_inactivate` in block/block-backend.c
/// sets the backend's permissions to none and shares all, and
/// file-posix.c then unlocks the bytes). Bytes `file` does not hold are
/// left alone, so this is harmless on an image that holds none. Other
/// opens of the image (another LUN on it) keep theirs: OFD locks belong
/// to the open file description.
pub fn unlock_image(file: &File, read_only: bool) {
    release(file.as_raw_fd(), &lock_bytes(read_only));
}

/// The bytes a LUN locks: `100 + n` for each permission it holds, then
/// `200 + n` for each it refuses to share.
fn lock_bytes(read_only: bool) -> Vec<i64> {
    let (held, unshared) = permissions(read_only);
    held.iter()
        .map(|p| p.held_byte())
        .chain(unshared.iter().map(|p| p.unshared_byte()))
        .collect()
}

// These locks go through libc, not rustix: rustix's `fcntl_lock` takes
// only classic process-owned locks (F_SETLK/F_SETLKW) on the whole file
// (l_start 0, l_len 0), and has neither OFD locks (F_OFD_SETLK) nor a lock
// test (F_OFD_GETLK) reporting the holder's pid, nor one-byte ranges.

/// A one-byte `struct flock` at `byte`.
fn flock(byte: i64, kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero
    // bytes are a valid value (and l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Takes (or with `F_UNLCK` drops) an OFD lock on one byte, never waiting.
fn set_lock(fd: libc::c_int, byte: i64, kind: libc::c_int) -> io::Result<()> {
    let fl = flock(byte, kind);
    loop {
        // SAFETY: F_OFD_SETLK reads one `struct flock`, which `fl` is and
        // which outlives the call; `fd` is open (borrowed from a File).
        let rc = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn release(fd: libc::c_int, bytes: &[i64]) {
    for &byte in bytes {
        // Dropping a lock cannot conflict; a failure would leave a shared
        // lock that goes away with the file anyway.
        let _ = set_lock(fd, byte, libc::F_UNLCK);
    }
}

/// Whether another open file holds any lock on `byte` (a write-lock probe,
/// as QEMU's `qemu_lock_fd_test`); if so, the `l_pid` the kernel reports:
/// the owner's pid for a classic POSIX lock, -1 for an OFD lock.
fn probe(fd: libc::c_int, byte: i64) -> io::Result<Option<i32>> {
    let mut fl = flock(byte, libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and rewrites one `struct flock`, which `fl`
    // is, exclusively borrowed for the call; `fd` is open.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_pid))
}

/// Names the holder of a conflicting lock on `byte` of `file`: from the pid
/// `F_OFD_GETLK` reported when it is a real one, otherwise by looking for
/// the lock in the `lock:` lines of `/proc/*/fdinfo/*`.
fn holder(file: &File, byte: i64, reported_pid: Option<i32>) -> Holder {
    let own_pid = std::process::id() as i32;
    let pid = match reported_pid {
        Some(pid) if pid > 0 => Some(pid),
        _ => find_ofd_holder(file, byte, own_pid),
    };
    match pid {
        None => Holder::Unknown,
        Some(pid) if pid == own_pid => Holder::ThisProcess,
        Some(pid) => Holder::Process {
            pid,
            name: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        },
    }
}

/// Best effort: the pid of a process with an open file, other than `file`
/// itself, that holds a lock covering `byte` of the same inode. Processes
/// whose `/proc` entries are not readable are skipped.
fn find_ofd_holder(file: &File, byte: i64, own_pid: i32) -> Option<i32> {
    let meta = file.metadata().ok()?;
    // The kernel names the file "MAJOR:MINOR:INODE", device numbers in hex
    // (fs/locks.c, lock_get_status).
    let dev = meta.dev() as libc::dev_t;
    let key = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let own_fd = file.as_raw_fd().to_string();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd_entry in fds.flatten() {
            if pid == own_pid && fd_entry.file_name().to_str() == Some(own_fd.as_str()) {
                continue;
            }
            let Ok(info) = std::fs::read_to_string(fd_entry.path()) else {
                continue;
            };
            if info
                .lines()
                .filter_map(|line| line.strip_prefix("lock:"))
                .any(|lock| lock_covers(lock, &key, byte))
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Whether a lock line ("1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101")
/// is on the file `key` and covers `byte`.
fn lock_covers(line: &str, key: &str, byte: i64) -> bool {
    let mut fields = line.split_whitespace().skip_while(|f| *f != key).skip(1);
    let start = fields.next().and_then(|s| s.parse::<i64>().ok());
    let end = fields.next().and_then(|s| match s {
        "EOF" => Some(i64::MAX),
        s => s.parse::<i64>().ok(),
    });
    matches!((start, end), (Some(start), Some(end)) if start <= byte && byte <= end)
}

/// The bytes in 100..=104 and 200..=204 that some open file other than
/// `probe_file` has locked: what another user of the image would find.
#[cfg(test)]
pub(crate) fn locked_bytes(probe_file: &File) -> Vec<i64> {
    (100..=104)
        .chain(200..=204)
        .filter(|&b| probe(probe_file.as_raw_fd(), b).unwrap().is_some())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    fn conflict(result: Result<(), LockError>) -> (Holder, Conflict) {
        match result {
            Err(LockError::Conflict { holder, conflict }) => (holder, conflict),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn takes_qemus_bytes() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let observer = open(tmp.path());
        let writer = open(tmp.path());
        lock_image(&writer, false).unwrap();
        assert_eq!(locked_bytes(&observer), [100, 101, 201]);
        drop(writer);
        assert_eq!(locked_bytes(&observer), [] as [i64; 0]);
        let reader = open(tmp.path());
        lock_image(&reader, true).unwrap();
        assert_eq!(locked_bytes(&observer), [100, 201]);
    }

    /// `unlock_image` releases exactly what `lock_image` took, keeping
    /// the file open; another open's locks on the image stay.
    #[test]
    fn unlock_releases_the_bytes_of_this_open_only() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let observer = open(tmp.path());
        let writer = open(tmp.path());
        lock_image(&writer, false).unwrap();
        unlock_image(&writer, false);
        assert_eq!(locked_bytes(&observer), [] as [i64; 0]);
        // Another writer may now lock; the first one, still open, is
        // refused, naming it.
        let second = open(tmp.path());
        lock_image(&second, false).unwrap();
        let (holder, conflict) = conflict(lock_image(&writer, false));
        assert_eq!(conflict, Conflict::Holds(Perm::Write));
        assert_eq!(holder, Holder::ThisProcess);
        drop(second);
        // Two readers: one unlocking leaves the other's bytes.
        let a = open(tmp.path());
        let b = open(tmp.path());
        lock_image(&a, true).unwrap();
        lock_image(&b, true).unwrap();
        unlock_image(&a, true);
        assert_eq!(locked_bytes(&observer), [100, 201]);
        unlock_image(&a, true);
        assert_eq!(locked_bytes(&observer), [100, 201], "b's locks stay");
        drop(b);
        assert_eq!(locked_bytes(&observer), [] as [i64; 0]);
    }

    #[test]
    fn two_writers_conflict() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let first = open(tmp.path());
        lock_image(&first, false).unwrap();
        let second = open(tmp.path());
        let (holder, conflict) = conflict(lock_image(&second, false));
        assert_eq!(conflict, Conflict::Holds(Perm::Write));
        // Found through /proc: the other open file is in this process.
        assert_eq!(holder, Holder::ThisProcess);
        // The failed attempt left nothing behind, and the first writer gone,
        // the second may lock.
        drop(first);
        let observer = open(tmp.path());
        assert_eq!(locked_bytes(&observer), [] as [i64; 0]);
        lock_image(&second, false).unwrap();
    }

    #[test]
    fn readers_share_and_keep_writers_out() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let a = open(tmp.path());
        let b = open(tmp.path());
        lock_image(&a, true).unwrap();
        lock_image(&b, true).unwrap();
        let writer = open(tmp.path());
        let (_, conflict) = conflict(lock_image(&writer, false));
        assert_eq!(conflict, Conflict::Refuses(Perm::Write));
        drop(a);
        assert!(lock_image(&writer, false).is_err(), "b still reads");
        drop(b);
        lock_image(&writer, false).unwrap();
    }

    #[test]
    fn a_writer_keeps_readers_out() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let writer = open(tmp.path());
        lock_image(&writer, false).unwrap();
        let reader = open(tmp.path());
        let (_, conflict) = conflict(lock_image(&reader, true));
        assert_eq!(conflict, Conflict::Holds(Perm::Write));
    }

    #[test]
    fn a_classic_posix_lock_names_its_pid() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let other = open(tmp.path());
        // A traditional (process-owned) write lock on byte 101, as a
        // non-QEMU program might take; it conflicts with OFD locks.
        let fl = flock(101, libc::F_WRLCK);
        // libc: rustix's fcntl_lock cannot lock one byte.
        // SAFETY: F_SETLK reads one `struct flock`; `other` is open.
        let rc = unsafe { libc::fcntl(other.as_raw_fd(), libc::F_SETLK, &fl) };
        assert_eq!(rc, 0);
        let f = open(tmp.path());
        let (holder, conflict) = conflict(lock_image(&f, true));
        // The SETLK of byte 100 works; the write lock is found by the probe
        // of 101 with the owner's pid, this very process.
        assert_eq!(conflict, Conflict::Holds(Perm::Write));
        assert_eq!(holder, Holder::ThisProcess);
    }

    #[test]
    fn messages() {
        let e = LockError::Conflict {
            holder: Holder::Unknown,
            conflict: Conflict::Holds(Perm::Write),
        };
        assert_eq!(
            e.to_string(),
            "locked by another process (it is being written): lock byte 101 \
             (QEMU's \"write\" permission) is taken; an image has at most one writer"
        );
        let e = LockError::Conflict {
            holder: Holder::Process {
                pid: 42,
                name: Some("qemu-system-x86".into()),
            },
            conflict: Conflict::Refuses(Perm::Write),
        };
        assert!(e
            .to_string()
            .starts_with("locked by qemu-system-x86, pid 42 (it refuses writers): lock byte 201"));
        assert_eq!(
            Holder::Process { pid: 7, name: None }.to_string(),
            "process 7"
        );
    }

    #[test]
    fn lock_lines() {
        let key = "fe:00:1234";
        assert!(lock_covers(
            "\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101",
            key,
            101
        ));
        assert!(!lock_covers(
            "\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 100",
            key,
            101
        ));
        assert!(!lock_covers(
            "\t1: OFDLCK ADVISORY  READ -1 fe:00:12345 100 101",
            key,
            101
        ));
        assert!(lock_covers(
            "\t2: POSIX  ADVISORY  WRITE 77 fe:00:1234 0 EOF",
            key,
            201
        ));
        assert!(!lock_covers("garbage", key, 101));
    }
}
