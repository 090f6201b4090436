//! vhost-device-scsi: command line → configuration ([`DaemonConfig`]) →
//! start-up → serve.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vhost_device_scsi::cli::Cli;
use vhost_device_scsi::config::{self, DaemonConfig};
use vhost_device_scsi::manage::LunManager;
use vhost_device_scsi::sandbox::{self, SandboxMode};
use vhost_device_scsi::virtio::EventHub;
use vhost_device_scsi::{api, daemon, service, state};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            eprintln!("{}", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    // env_logger behind a per-call-site rate limit for warnings and errors
    // (src/logging.rs): a guest cannot flood the journal.
    if let Err(e) = vhost_device_scsi::logging::init() {
        eprintln!("vhost-device-scsi: error: cannot set up logging: {e}");
        return ExitCode::FAILURE;
    }
    let started = cli
        .into_config()
        .map_err(|e| e.to_string())
        .and_then(|config| run(&config));
    match started {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vhost-device-scsi: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the daemon configured by `config`: every check that looks at
/// the system (io_uring, the socket's group, the images) comes before the
/// socket is bound; then it serves for ever.
fn run(config: &DaemonConfig) -> Result<(), String> {
    // A listening socket handed over (systemd socket activation, or
    // --socket-fd) is claimed before the daemon opens anything itself.
    let inherited = service::inherited_listener(config.socket.fd).map_err(|e| e.to_string())?;
    config.check().map_err(|e| e.to_string())?;
    let options = config.queues;
    let engine = config.io_engine.resolve().map_err(|e| e.to_string())?;
    let access = config.socket.access().map_err(|e| e.to_string())?;
    let api_access = config.socket.api_access().map_err(|e| e.to_string())?;
    // TCP sockets under the sandbox: asked for, or needed by a LUN at
    // start-up or from the state file (the API's lun_add is held to it).
    let carried_over = state::image_paths(&config.state_file());
    let mut config = config.clone();
    config.sandbox_network |= config.luns.iter().any(|l| l.needs_tcp())
        || carried_over
            .iter()
            .any(|p| config::ImageSource::over_tcp(p));
    let config = &config;
    let socket_path = &config.socket.path;
    // libiscsi, for iscsi:// LUNs: loaded while the loader can still read
    // it (Landlock refuses /usr/lib and ld.so.cache). Absent, an iSCSI LUN
    // is refused with the package to install.
    if config.sandbox == SandboxMode::On && config.sandbox_network {
        if let Err(e) = vhost_device_scsi::storage::iscsi::load_library() {
            log::debug!("libiscsi not loaded before the sandbox: {e}");
        }
    }
    // Landlock confines the calling thread and those it starts later: it
    // is applied before the first thread starts — after the local images
    // are open (a lock holder is named only before it), before the network
    // LUNs' own threads (connections, sessions), which parse what servers
    // send.
    let confine = || -> Result<(), String> {
        if config.sandbox != SandboxMode::On {
            return Ok(());
        }
        // Local images only: network LUNs have no path (a Unix socket's
        // connect is not confined).
        let mut images: Vec<_> = config.luns.iter().map(|l| l.path.clone()).collect();
        images.extend(carried_over.iter().cloned());
        images.retain(|p| config::ImageSource::of(p) == config::ImageSource::Local);
        let mut written = vec![socket_path.clone(), config.state_file()];
        written.extend(config.socket.api_socket.clone());
        let paths = sandbox::Paths {
            images,
            allow: config.sandbox_allow.clone(),
            written,
            network: config.sandbox_network,
        };
        let line = sandbox::restrict_paths(&paths).map_err(|e| e.to_string())?;
        log::info!("sandbox: {line}");
        Ok(())
    };
    let target = config::build_target_confined(config, confine).map_err(|e| e.to_string())?;
    // The sockets a stop removes: not one handed over, which outlives the
    // daemon (its supervisor keeps it, and the next daemon serves it).
    let mut sockets = Vec::new();
    if inherited.is_none() {
        sockets.push(socket_path.clone());
    }
    sockets.extend(config.socket.api_socket.clone());
    let target = Arc::new(target);
    let events =
        EventHub::new().map_err(|e| format!("cannot create the event queue's eventfd: {e}"))?;
    // The LUN table's manager: the API's calls, and the LUNs carried over
    // from a daemon stopped before this one.
    let manager = Arc::new(LunManager::new(
        target.clone(),
        config.clone(),
        events.clone(),
    ));
    let serving = Arc::new(daemon::Serving::new(
        target.clone(),
        manager.clone(),
        config.state_file(),
    ));
    daemon::handle_stop_signals(sockets, serving.clone()).map_err(|e| e.to_string())?;
    let listener = match inherited {
        Some(listener) => {
            let bound = service::bound_path(&listener);
            log::info!(
                "serving the socket handed over at descriptor {}{}",
                service::fd_of(&listener),
                bound
                    .as_ref()
                    .map(|p| format!(", bound at {}", p.display()))
                    .unwrap_or_default()
            );
            if bound.as_deref().is_some_and(|p| p != socket_path.as_path()) {
                log::warn!(
                    "the socket handed over is bound at {}, not at --socket-path {}",
                    bound
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    socket_path.display()
                );
            }
            vhost::vhost_user::Listener::from(listener)
        }
        None => daemon::listen(socket_path, &access).map_err(|e| e.to_string())?,
    };
    // Bound now, with the vhost-user socket, before any worker thread runs
    // (binding sets the umask for a moment).
    let api_listener = match &config.socket.api_socket {
        Some(path) => Some(
            daemon::bind_unix(path, &api_access, daemon::SocketRole::Api)
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    log::info!(
        "{} request queues on {} worker thread(s){}",
        options.request_queues,
        options.threads,
        if options.poll.is_zero() {
            String::new()
        } else {
            format!(", polling {} µs", options.poll.as_micros())
        }
    );
    if let (Some(listener), Some(path)) = (api_listener, &config.socket.api_socket) {
        api::serve(listener, manager.clone())
            .map_err(|e| format!("--api-socket {}: cannot serve: {e}", path.display()))?;
        log::info!("management API on {}", path.display());
    }
    // The guest's state a daemon stopped before this one left behind, taken
    // over (and its file removed) only once nothing can fail any more.
    state::restore(&config.state_file(), &target, &|lun, spec| {
        manager.restore_lun(lun, spec).map_err(|e| e.to_string())
    });
    // Every thread there is and will be makes only the allowlist's calls.
    match config.sandbox {
        SandboxMode::On => {
            sandbox::apply_seccomp(config.sandbox_network).map_err(|e| e.to_string())?;
            log::info!(
                "sandbox: seccomp allows {} system calls{}; any other ends the daemon with a line on stderr",
                sandbox::ALLOWED.len()
                    + if config.sandbox_network {
                        sandbox::NETWORK_ALLOWED.len()
                    } else {
                        0
                    },
                if config.sandbox_network {
                    ", sockets of AF_UNIX, AF_INET and AF_INET6 (AF_NETLINK fails with EAFNOSUPPORT)"
                } else {
                    ", sockets of AF_UNIX only"
                }
            );
        }
        SandboxMode::Off => {
            log::info!("sandbox: off (--sandbox off): neither Landlock nor seccomp")
        }
    }
    // Ready: the socket is bound and listening (a VMM's connect succeeds
    // from now on), and the images are open and checked.
    service::notify(&format!(
        "READY=1\nSTATUS=listening on {}",
        socket_path.display()
    ));
    daemon::serve(
        target,
        options,
        engine,
        events,
        serving,
        listener,
        socket_path,
    )
}

/// clap's message up to its first blank line (before the usage text), as
/// one line: "error: the following required arguments were not provided:
/// --socket-path <PATH>".
fn one_line(message: &str) -> String {
    let parts: Vec<&str> = message
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    if parts.is_empty() {
        "error: invalid arguments".to_string()
    } else {
        parts.join(" ")
    }
}
