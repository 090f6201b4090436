//! The sandbox (`--sandbox`, `src/sandbox.rs`): a system call outside the
//! seccomp allowlist ends the process with its line on stderr, and with
//! Landlock the management API's `lun_add` opens images only beneath the
//! startup images' directories and `--sandbox-allow`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{skipped, Daemon};

const CTL: &str = env!("CARGO_BIN_EXE_vhost-device-scsi-ctl");
/// Set in the child process the filter tests start: what it must do.
const CHILD: &str = "VHOST_SCSI_SANDBOX_CHILD";

/// In a child process (this test binary run again for `test`), the
/// daemon's filter applied, then `what`: returns the child's output.
fn in_filtered_child(test: &str, what: &str) -> Output {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, what);
    output_within(command, Duration::from_secs(20))
}

/// `command`'s output, once it has exited; killed, and the test failed,
/// if it is still running after `limit`.
fn output_within(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// What the child does once filtered: a call the daemon never makes, or
/// one it does.
fn child(what: &str) -> ! {
    // "net:" first: the filter of a daemon with network LUNs over TCP.
    let (network, what) = match what.strip_prefix("net:") {
        Some(rest) => (true, rest),
        None => (false, what),
    };
    vhost_device_scsi::sandbox::apply_seccomp(network).unwrap();
    eprintln!("filter applied");
    // SAFETY: plain system calls with constant arguments; none touches
    // this process's memory.
    let ret = unsafe {
        match what {
            // A path that does not exist: ENOENT if it were allowed.
            "execve" => libc::syscall(
                libc::SYS_execve,
                c"/nonexistent/vhost-device-scsi-sandbox".as_ptr(),
                std::ptr::null::<*const libc::c_char>(),
                std::ptr::null::<*const libc::c_char>(),
            ),
            "inet" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as libc::c_long,
            "inet6" => libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0) as libc::c_long,
            "packet" => libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) as libc::c_long,
            "netlink" => {
                libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) as libc::c_long
            }
            "unix" => libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as libc::c_long,
            // On no descriptor: EBADF if it is allowed.
            "sendmmsg" => libc::syscall(
                libc::SYS_sendmmsg,
                -1,
                std::ptr::null::<libc::mmsghdr>(),
                0,
                0,
            ),
            _ => panic!("unknown child action {what}"),
        }
    };
    eprintln!("returned {ret}");
    std::process::exit(0)
}

/// The child's stderr, and its exit code.
fn outcome(out: &Output) -> (String, Option<i32>) {
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

#[test]
fn sandbox_a_call_outside_the_allowlist_ends_the_process_with_one_line() {
    let name = "sandbox::sandbox_a_call_outside_the_allowlist_ends_the_process_with_one_line";
    if let Ok(what) = std::env::var(CHILD) {
        child(&what);
    }
    // execve: no argument filter, just not on the list.
    let (stderr, code) = outcome(&in_filtered_child(name, "execve"));
    assert!(stderr.contains("filter applied"), "{stderr}");
    let line = format!(
        "vhost-device-scsi: sandbox: system call {} (execve) is not allowed; exiting\n",
        libc::SYS_execve
    );
    assert!(stderr.ends_with(&line), "{stderr}");
    assert!(!stderr.contains("returned"), "{stderr}");
    assert_eq!(code, Some(vhost_device_scsi::sandbox::KILLED_EXIT_CODE));
    // socket: allowed for AF_UNIX (sd_notify) only.
    let (stderr, code) = outcome(&in_filtered_child(name, "inet"));
    let line = format!(
        "vhost-device-scsi: sandbox: system call {} (socket) is not allowed; exiting\n",
        libc::SYS_socket
    );
    assert!(stderr.ends_with(&line), "{stderr}");
    assert_eq!(code, Some(vhost_device_scsi::sandbox::KILLED_EXIT_CODE));
    let (stderr, code) = outcome(&in_filtered_child(name, "unix"));
    assert!(stderr.contains("filter applied"), "{stderr}");
    assert!(stderr.contains("returned "), "{stderr}");
    assert!(!stderr.contains("returned -1"), "{stderr}");
    assert!(!stderr.contains("not allowed"), "{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    // With network LUNs over TCP: AF_INET and AF_INET6 too, nothing else.
    for family in ["net:inet", "net:inet6", "net:unix"] {
        let (stderr, code) = outcome(&in_filtered_child(name, family));
        assert!(stderr.contains("returned "), "{family}: {stderr}");
        assert!(!stderr.contains("returned -1"), "{family}: {stderr}");
        assert_eq!(code, Some(0), "{family}: {stderr}");
    }
    // sendmmsg (glibc's DNS resolver): only with network LUNs.
    let (stderr, code) = outcome(&in_filtered_child(name, "sendmmsg"));
    assert!(stderr.contains("(sendmmsg) is not allowed"), "{stderr}");
    assert_eq!(code, Some(vhost_device_scsi::sandbox::KILLED_EXIT_CODE));
    let (stderr, code) = outcome(&in_filtered_child(name, "net:sendmmsg"));
    assert!(stderr.contains("returned -1"), "{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    let (stderr, code) = outcome(&in_filtered_child(name, "net:packet"));
    assert!(stderr.ends_with(&line), "{stderr}");
    assert_eq!(code, Some(vhost_device_scsi::sandbox::KILLED_EXIT_CODE));
    // AF_NETLINK (glibc's getaddrinfo under libiscsi's login): refused
    // with an error the caller goes on after, never a socket.
    let (stderr, code) = outcome(&in_filtered_child(name, "net:netlink"));
    assert!(stderr.contains("returned -1"), "{stderr}");
    assert!(!stderr.contains("not allowed"), "{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
}

/// The kernel's Landlock ABI, if it has Landlock.
fn landlock_abi() -> Option<i64> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) reads no memory.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (abi > 0).then_some(abi)
}

/// `lun_add image=PATH` through vhost-device-scsi-ctl: its stdout, or its
/// stderr when it fails (retried while the API socket is not served yet:
/// the daemon binds it after the vhost-user socket).
fn lun_add(api: &Path, image: &Path) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new(CTL)
            .arg("--api-socket")
            .arg(api)
            .arg("lun_add")
            .arg(format!("image={}", image.display()))
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if out.status.success() {
            return Ok(text(&out.stdout));
        }
        let stderr = text(&out.stderr);
        if !stderr.contains("cannot connect") || Instant::now() >= deadline {
            return Err(stderr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sandbox_lun_add_opens_images_only_where_allowed() {
    if landlock_abi().is_none() {
        skipped("the kernel has no Landlock");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sub = |name: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).unwrap();
        path
    };
    let (run, images, allowed, elsewhere) =
        (sub("run"), sub("images"), sub("allowed"), sub("elsewhere"));
    let image = |dir: &Path, name: &str| {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        path
    };
    let first = image(&images, "first.img");
    let beside = image(&images, "beside.img");
    let in_allowed = image(&allowed, "allowed.img");
    let outside = image(&elsewhere, "outside.img");
    let api = run.join("api.sock");
    let start = |sandbox: &[&str]| {
        let mut args = vec!["--api-socket", api.to_str().unwrap()];
        args.extend_from_slice(sandbox);
        args.push(first.to_str().unwrap());
        Daemon::start(&run.join("vhost.sock"), &args)
    };

    let mut daemon = start(&["--sandbox-allow", allowed.to_str().unwrap()]);
    let denied = lun_add(&api, &outside).unwrap_err();
    assert_eq!(
        denied,
        format!(
            "vhost-device-scsi-ctl: error: image {}: permission denied (code -32003)\n",
            outside.display()
        )
    );
    lun_add(&api, &beside).unwrap();
    lun_add(&api, &in_allowed).unwrap();
    assert!(
        daemon.process.try_wait().unwrap().is_none(),
        "the daemon exited"
    );
    daemon.kill();
    drop(daemon);

    // Without --sandbox-allow the directory is out of reach; with the
    // sandbox off everything the daemon's user may open is in.
    let mut daemon = start(&[]);
    lun_add(&api, &in_allowed).unwrap_err();
    daemon.kill();
    drop(daemon);
    let _daemon = start(&["--sandbox", "off"]);
    lun_add(&api, &outside).unwrap();
    lun_add(&api, &in_allowed).unwrap();
}

#[test]
fn sandbox_allow_must_be_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let missing = dir.path().join("missing");
    let mut command = Command::new(crate::common::BIN);
    command
        .arg("-s")
        .arg(dir.path().join("vhost.sock"))
        .arg("--sandbox-allow")
        .arg(&missing)
        .arg(&image)
        .env("RUST_LOG", "warn");
    let out = output_within(command, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "vhost-device-scsi: error: sandbox: --sandbox-allow {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
}
