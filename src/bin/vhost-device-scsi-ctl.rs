//! vhost-device-scsi-ctl: calls one method of a running daemon's management
//! API (`--api-socket`) and prints its result as JSON. The request and
//! reply are `vhost_device_scsi::api::client`'s, the command line
//! `vhost_device_scsi::api::ctl`'s.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use vhost_device_scsi::api::client;
use vhost_device_scsi::api::ctl::CtlCli as Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let params = match cli.params {
        Some(params) => params,
        None => match client::params(cli.pairs) {
            Ok(params) => params,
            Err(e) => Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, e)
                .exit(),
        },
    };
    let mut params = params;
    if let Ok(cwd) = std::env::current_dir() {
        client::absolute_image(&cli.method, &mut params, &cwd);
    }
    match client::call(&cli.api_socket, &cli.method, &params) {
        Ok(result) => match serde_json::to_string_pretty(&result) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
        Err(e) => fail(&e.to_string()),
    }
}

/// The one line on stderr and exit status 1 of a call that failed.
fn fail(message: &str) -> ExitCode {
    eprintln!("vhost-device-scsi-ctl: error: {message}");
    ExitCode::FAILURE
}
