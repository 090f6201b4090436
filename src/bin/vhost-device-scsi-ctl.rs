//! vhost-device-scsi-ctl: calls one method of a running daemon's management
//! API (`--api-socket`) and prints its result as JSON. The request and
//! reply are `vhost_device_scsi::api::client`'s; this is the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use serde_json::{Map, Value};
use vhost_device_scsi::api::client;

/// Calls one method of a running vhost-device-scsi's management API and
/// prints its result as JSON.
#[derive(Debug, Parser)]
#[command(name = "vhost-device-scsi-ctl", version, about, long_about = None)]
struct Cli {
    /// The daemon's API socket (its --api-socket).
    #[arg(short = 's', long = "api-socket", value_name = "PATH")]
    api_socket: PathBuf,

    /// The parameters as one JSON object, instead of KEY=VALUE arguments.
    #[arg(long = "params", value_name = "JSON", conflicts_with = "pairs",
          value_parser = client::parse_params_json)]
    params: Option<Map<String, Value>>,

    /// lun_add, lun_remove, lun_resize, lun_list, stats or version.
    #[arg(value_name = "METHOD")]
    method: String,

    /// Parameters: integers become numbers, true and false booleans,
    /// anything else a string (e.g. image=/var/lib/img/d1.raw,ro lun=3).
    /// size is in bytes, or with a K, M, G or T suffix (powers of 1024).
    #[arg(value_name = "KEY=VALUE", value_parser = client::parse_param)]
    pairs: Vec<(String, Value)>,
}

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
