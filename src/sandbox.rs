//! The daemon's sandbox (`--sandbox on`, the default): once its images
//! and sockets are open, the daemon confines itself, so that a guest or
//! VMM that found a hole in it gets little more than the daemon's own
//! work.
//!
//! - **Landlock** ([`restrict_paths`]), where the kernel has it (best
//!   effort: any ABI, nothing on a kernel without it): files may be opened
//!   only beneath the directories of the images (a block device: the device
//!   file itself), of `--sandbox-allow`, and, with creating, removing and
//!   renaming files and binding sockets, of the sockets and the state file;
//!   `/proc` may be read (the names of image lock holders). Landlock
//!   confines the calling thread and the threads it starts later, so it is
//!   applied before the daemon starts its first thread.
//! - **seccomp** ([`apply_seccomp`], through rust-vmm's `seccompiler`): an
//!   allowlist of the system calls the daemon makes ([`ALLOWED`]), on every
//!   thread (TSYNC). Any other call traps: a SIGSYS handler writes one line,
//!   `vhost-device-scsi: sandbox: system call 59 (execve) is not allowed;
//!   exiting`, to stderr and exits with status [`KILLED_EXIT_CODE`].

use std::ffi::c_int;
use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, BitFlags, LandlockStatus, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// `--sandbox`: confine the daemon once it has started (`on`, the
/// default), or not at all (`off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// Landlock (where the kernel has it) and the seccomp allowlist.
    #[default]
    On,
    /// Nothing is applied.
    Off,
}

/// What a forbidden system call exits with (after its line on stderr).
pub const KILLED_EXIT_CODE: i32 = 159;

/// The sandbox could not be applied: the daemon does not run unconfined
/// when it was asked to confine itself.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: --sandbox-allow {}: {source}", path.display())]
    Allow {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox: cannot set up Landlock: {0}")]
    Landlock(String),
    #[error("sandbox: cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("sandbox: cannot build the seccomp filter: {0}")]
    Filter(String),
    #[error("sandbox: cannot apply the seccomp filter: {0}")]
    Seccomp(String),
}

/// The paths the daemon may use after [`restrict_paths`].
#[derive(Clone, Debug, Default)]
pub struct Paths {
    /// The images (startup's, and the state file's LUNs): read and write
    /// beneath each one's directory, or the block device itself.
    pub images: Vec<PathBuf>,
    /// `--sandbox-allow`: images the API may add beneath them.
    pub allow: Vec<PathBuf>,
    /// Files the daemon creates, renames or removes (the sockets, the
    /// state file): their directories.
    pub written: Vec<PathBuf>,
    /// Network LUNs are served: the files glibc reads to resolve a host
    /// name ([`NAME_RESOLUTION_FILES`]) and `/dev/urandom` (libiscsi)
    /// may be read.
    pub network: bool,
}

/// What glibc's `getaddrinfo` reads (the `files` and `dns` sources, built
/// into glibc since 2.34): a network LUN named by host name resolves it at
/// every connection, from threads the sandbox confines.
pub const NAME_RESOLUTION_FILES: &[&str] = &[
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/dev/urandom",
];

/// Rights on an image file, wherever it is.
fn image_file_access(abi: ABI) -> BitFlags<AccessFs> {
    (AccessFs::from_file(abi) & !AccessFs::Execute) & !AccessFs::ResolveUnix
}

/// Rights beneath a directory of images.
fn image_dir_access(abi: ABI) -> BitFlags<AccessFs> {
    image_file_access(abi) | AccessFs::ReadDir
}

/// Rights beneath the directories of the sockets and the state file.
fn written_dir_access(abi: ABI) -> BitFlags<AccessFs> {
    image_dir_access(abi) | AccessFs::MakeReg | AccessFs::MakeSock | AccessFs::RemoveFile
}

/// The parent directory of `path` (`.` for a bare name).
fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Applies the Landlock rules for `paths` to the calling thread (and the
/// threads it starts later). Returns the line to log: the ABI enforced, or
/// that the kernel has no Landlock.
pub fn restrict_paths(paths: &Paths) -> Result<String, SandboxError> {
    let abi = ABI::V10;
    // Connecting to a Unix socket by path ($NOTIFY_SOCKET) stays allowed.
    let handled = AccessFs::from_all(abi) & !AccessFs::ResolveUnix;
    let landlock = |e: &dyn fmt::Display| SandboxError::Landlock(e.to_string());
    let mut ruleset = Ruleset::default()
        .handle_access(handled)
        .map_err(|e| landlock(&e))?
        .create()
        .map_err(|e| landlock(&e))?;
    let mut rules: Vec<(PathBuf, BitFlags<AccessFs>)> = Vec::new();
    for image in &paths.images {
        match std::fs::metadata(image) {
            Ok(m) if m.file_type().is_block_device() || m.file_type().is_char_device() => {
                rules.push((image.clone(), image_file_access(abi)))
            }
            _ => rules.push((parent(image), image_dir_access(abi))),
        }
    }
    for dir in &paths.allow {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => rules.push((dir.clone(), image_dir_access(abi))),
            Ok(_) => {
                return Err(SandboxError::Allow {
                    path: dir.clone(),
                    source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
                })
            }
            Err(source) => {
                return Err(SandboxError::Allow {
                    path: dir.clone(),
                    source,
                })
            }
        }
    }
    for file in &paths.written {
        rules.push((parent(file), written_dir_access(abi)));
    }
    rules.push((
        PathBuf::from("/proc"),
        AccessFs::ReadFile | AccessFs::ReadDir,
    ));
    let mut optional: Vec<(PathBuf, BitFlags<AccessFs>)> = Vec::new();
    if paths.network {
        for file in NAME_RESOLUTION_FILES {
            optional.push((PathBuf::from(file), AccessFs::ReadFile.into()));
        }
    }
    for (path, access) in optional {
        // A host without one of them resolves without it.
        if let Ok(fd) = PathFd::new(&path) {
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|e| landlock(&e))?;
        }
    }
    for (path, access) in rules {
        // A directory that is not there (a state file's, say) is left out:
        // what needs it fails with its own error later.
        let Ok(fd) = PathFd::new(&path) else {
            log::warn!(
                "sandbox: {} cannot be opened: it is left out of the allowed paths",
                path.display()
            );
            continue;
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| landlock(&e))?;
    }
    let status = ruleset.restrict_self().map_err(|e| landlock(&e))?;
    let abi = match status.landlock {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => kernel_abi.unwrap_or(effective_abi as i32),
        LandlockStatus::NotEnabled => {
            return Ok("Landlock is not enabled in this kernel: file access is not confined".into())
        }
        LandlockStatus::NotImplemented => {
            return Ok("Landlock is not available: file access is not confined".into())
        }
    };
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => {
            format!("Landlock ABI {abi}: files only beneath the images', the sockets' and --sandbox-allow directories")
        }
        RulesetStatus::NotEnforced => {
            format!("Landlock ABI {abi}: not enforced: file access is not confined")
        }
    })
}

/// A system call number and its name.
type Syscall = (libc::c_long, &'static str);

/// The system calls the daemon makes once it serves: every thread's
/// (vhost-user connections, workers, the API's clients, the stop signal),
/// glibc's underneath them (thread start, `malloc`), io_uring's, and what
/// start-up's code paths make again at run time (`lun_add`, the state
/// file, sd_notify). `socket` is allowed for `AF_UNIX` only.
#[rustfmt::skip]
pub const ALLOWED: &[Syscall] = &[
    // Files and images.
    (libc::SYS_read, "read"), (libc::SYS_write, "write"),
    (libc::SYS_readv, "readv"), (libc::SYS_writev, "writev"),
    (libc::SYS_pread64, "pread64"), (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_preadv, "preadv"), (libc::SYS_pwritev, "pwritev"),
    (libc::SYS_preadv2, "preadv2"), (libc::SYS_pwritev2, "pwritev2"),
    (libc::SYS_openat, "openat"), (libc::SYS_close, "close"),
    (libc::SYS_fstat, "fstat"), (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_statx, "statx"), (libc::SYS_lseek, "lseek"),
    (libc::SYS_fsync, "fsync"), (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_fallocate, "fallocate"), (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_fadvise64, "fadvise64"), (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_ioctl, "ioctl"), (libc::SYS_flock, "flock"),
    (libc::SYS_getdents64, "getdents64"), (libc::SYS_readlinkat, "readlinkat"),
    (libc::SYS_renameat, "renameat"), (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_unlinkat, "unlinkat"), (libc::SYS_fchmod, "fchmod"),
    (libc::SYS_fchmodat, "fchmodat"), (libc::SYS_fchown, "fchown"),
    (libc::SYS_fchownat, "fchownat"), (libc::SYS_umask, "umask"),
    (libc::SYS_dup, "dup"), (libc::SYS_dup3, "dup3"),
    (libc::SYS_memfd_create, "memfd_create"), (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_getcwd, "getcwd"),
    // Memory.
    (libc::SYS_mmap, "mmap"), (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"), (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_madvise, "madvise"), (libc::SYS_brk, "brk"),
    // io_uring.
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    // Waiting.
    (libc::SYS_epoll_create1, "epoll_create1"), (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_epoll_pwait, "epoll_pwait"), (libc::SYS_epoll_pwait2, "epoll_pwait2"),
    (libc::SYS_ppoll, "ppoll"), (libc::SYS_pselect6, "pselect6"),
    (libc::SYS_futex, "futex"), (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_nanosleep, "nanosleep"), (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_clock_gettime, "clock_gettime"), (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    // Sockets: the vhost-user and API connections, sd_notify.
    (libc::SYS_socket, "socket"), (libc::SYS_connect, "connect"),
    (libc::SYS_accept, "accept"), (libc::SYS_accept4, "accept4"),
    (libc::SYS_sendto, "sendto"), (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendmsg, "sendmsg"), (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_shutdown, "shutdown"), (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_setsockopt, "setsockopt"), (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"), (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    // Threads and signals.
    (libc::SYS_clone, "clone"), (libc::SYS_clone3, "clone3"),
    (libc::SYS_set_robust_list, "set_robust_list"), (libc::SYS_rseq, "rseq"),
    (libc::SYS_set_tid_address, "set_tid_address"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_prctl, "prctl"), (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_rt_sigaction, "rt_sigaction"), (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"), (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_getpid, "getpid"), (libc::SYS_gettid, "gettid"),
    (libc::SYS_getuid, "getuid"), (libc::SYS_geteuid, "geteuid"),
    (libc::SYS_getgid, "getgid"), (libc::SYS_getegid, "getegid"),
    (libc::SYS_exit, "exit"), (libc::SYS_exit_group, "exit_group"),
    (libc::SYS_getrandom, "getrandom"), (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_getrlimit, "getrlimit"), (libc::SYS_uname, "uname"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_open, "open"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_stat, "stat"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_lstat, "lstat"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_poll, "poll"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_epoll_wait, "epoll_wait"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_rename, "rename"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_unlink, "unlink"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_readlink, "readlink"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_dup2, "dup2"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_arch_prctl, "arch_prctl"),
];

/// Allowed besides [`ALLOWED`] with network LUNs: glibc's DNS resolver (a
/// network LUN named by host name).
#[rustfmt::skip]
pub const NETWORK_ALLOWED: &[Syscall] = &[
    (libc::SYS_sendmmsg, "sendmmsg"), (libc::SYS_recvmmsg, "recvmmsg"),
];

/// Calls named in the kill line though not allowed.
#[rustfmt::skip]
const NAMED: &[Syscall] = &[
    (libc::SYS_execve, "execve"), (libc::SYS_execveat, "execveat"),
    (libc::SYS_ptrace, "ptrace"), (libc::SYS_kill, "kill"),
    (libc::SYS_mount, "mount"), (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"), (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"), (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_mkdirat, "mkdirat"), (libc::SYS_symlinkat, "symlinkat"),
    (libc::SYS_linkat, "linkat"), (libc::SYS_chroot, "chroot"),
    (libc::SYS_setuid, "setuid"), (libc::SYS_bpf, "bpf"),
    (libc::SYS_init_module, "init_module"), (libc::SYS_reboot, "reboot"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_fork, "fork"),
    #[cfg(target_arch = "x86_64")] (libc::SYS_vfork, "vfork"),
];

/// The filter: [`ALLOWED`] allowed, `socket` for `AF_UNIX` only (with
/// `network`, also `AF_INET`, `AF_INET6` and `AF_NETLINK`: network LUNs
/// over TCP),
/// anything else trapped.
pub fn filter(network: bool) -> Result<BpfProgram, SandboxError> {
    let arch = target_arch()?;
    // AF_NETLINK passes this filter only to meet [`netlink_refused`],
    // which fails it with an error.
    let families: &[i32] = if network {
        &[
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ]
    } else {
        &[libc::AF_UNIX]
    };
    // One rule per family: the rules of a call are alternatives.
    let unix_only = families
        .iter()
        .map(|&family| socket_family_is(family))
        .collect::<Result<Vec<_>, _>>()?;
    let extra: &[Syscall] = if network { NETWORK_ALLOWED } else { &[] };
    let rules = ALLOWED
        .iter()
        .chain(extra)
        .map(|&(nr, _)| {
            let rule = if nr == libc::SYS_socket {
                unix_only.clone()
            } else {
                vec![]
            };
            (nr, rule)
        })
        .collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(filter_error)?;
    filter.try_into().map_err(filter_error)
}

/// With network LUNs: a second filter that fails `socket(AF_NETLINK, …)`
/// with EAFNOSUPPORT. glibc's `getaddrinfo` with AI_ADDRCONFIG (libiscsi's
/// connect, at every login, even to a numeric portal) opens a
/// NETLINK_ROUTE socket to learn the host's address families, and goes on
/// without it when that fails; trapped, it would end the daemon at the
/// first reconnection. Stacked filters give the most restrictive answer,
/// so [`filter`] lets the call through to this one.
fn netlink_refused() -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(
        [(libc::SYS_socket, vec![socket_family_is(libc::AF_NETLINK)?])]
            .into_iter()
            .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EAFNOSUPPORT as u32),
        target_arch()?,
    )
    .map_err(filter_error)?;
    filter.try_into().map_err(filter_error)
}

fn filter_error(e: seccompiler::BackendError) -> SandboxError {
    SandboxError::Filter(e.to_string())
}

/// The architecture the filters are built for: this one.
fn target_arch() -> Result<seccompiler::TargetArch, SandboxError> {
    std::env::consts::ARCH.try_into().map_err(filter_error)
}

/// A rule matching `socket(family, ...)` (its first argument).
fn socket_family_is(family: i32) -> Result<SeccompRule, SandboxError> {
    let condition =
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, family as u64)
            .map_err(filter_error)?;
    SeccompRule::new(vec![condition]).map_err(filter_error)
}

/// Installs the SIGSYS handler, then the filter on every thread of the
/// process. From here on a call outside [`ALLOWED`] ends the daemon with
/// its line on stderr.
pub fn apply_seccomp(network: bool) -> Result<(), SandboxError> {
    let program = filter(network)?;
    let netlink = if network {
        Some(netlink_refused()?)
    } else {
        None
    };
    install_sigsys_handler().map_err(SandboxError::Handler)?;
    if let Some(netlink) = netlink {
        seccompiler::apply_filter_all_threads(&netlink)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))
}

/// The start of `siginfo_t` for SIGSYS on 64-bit Linux: `si_signo`,
/// `si_errno`, `si_code`, then the union (pointer-aligned) holding
/// `_call_addr`, `_syscall`, `_arch`.
#[repr(C)]
struct SigsysInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    call_addr: *mut libc::c_void,
    syscall: c_int,
    arch: u32,
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed `sigaction` is a valid value (no handler, empty
    // mask) that the fields below complete.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialized; the handler is async-signal-safe
    // (it formats into a stack buffer, then write(2) and _exit(2)).
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kill line for system call `nr`, formatted into `buf` without
/// allocating; returns its length.
fn kill_line(nr: i64, buf: &mut [u8; 160]) -> usize {
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < buf.len() {
                buf[len] = b;
                len += 1;
            }
        }
    };
    put(b"vhost-device-scsi: sandbox: system call ");
    let mut digits = [0u8; 20];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        put(b"-");
    }
    put(&digits[i..]);
    if let Some((_, name)) = NAMED
        .iter()
        .chain(ALLOWED)
        .chain(NETWORK_ALLOWED)
        .find(|(n, _)| *n == nr)
    {
        put(b" (");
        put(name.as_bytes());
        put(b")");
    }
    put(b" is not allowed; exiting\n");
    len
}

extern "C" fn on_sigsys(_signal: c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, whose
    // layout starts as `SigsysInfo` does.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    let mut buf = [0u8; 160];
    let len = kill_line(i64::from(nr), &mut buf);
    // SAFETY: write(2) of a buffer we own, then _exit(2): both
    // async-signal-safe and allowed by the filter.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(KILLED_EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kill_line_names_the_call() {
        let mut buf = [0u8; 160];
        let len = kill_line(libc::SYS_execve, &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            format!(
                "vhost-device-scsi: sandbox: system call {} (execve) is not allowed; exiting\n",
                libc::SYS_execve
            )
        );
        let len = kill_line(99999, &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "vhost-device-scsi: sandbox: system call 99999 is not allowed; exiting\n"
        );
    }

    #[test]
    fn the_filter_compiles_without_duplicates() {
        let mut numbers: Vec<_> = ALLOWED.iter().map(|(n, _)| *n).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), ALLOWED.len());
        assert!(!filter(false).unwrap().is_empty());
        assert!(filter(true).unwrap().len() > filter(false).unwrap().len());
        assert!(!netlink_refused().unwrap().is_empty());
        assert!(!ALLOWED
            .iter()
            .any(|(n, _)| NAMED.iter().any(|(m, _)| m == n)));
    }
}
