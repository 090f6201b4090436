//! `vhost-device-scsi-ctl`'s command line: the clap definitions, here in
//! the library rather than in the binary so that the man page and shell
//! completions can be generated from them (examples/gen-docs) as the
//! daemon's are from [`crate::cli::Cli`].

use std::path::PathBuf;

use clap::Parser;
use serde_json::{Map, Value};

use super::client;

/// Calls one method of a running vhost-device-scsi's management API and
/// prints its result as JSON.
#[derive(Debug, Parser)]
#[command(name = "vhost-device-scsi-ctl", version, about, long_about = None)]
pub struct CtlCli {
    /// The daemon's API socket (its --api-socket).
    #[arg(short = 's', long = "api-socket", value_name = "PATH")]
    pub api_socket: PathBuf,

    /// The parameters as one JSON object, instead of KEY=VALUE arguments.
    #[arg(long = "params", value_name = "JSON", conflicts_with = "pairs",
          value_parser = client::parse_params_json)]
    pub params: Option<Map<String, Value>>,

    /// lun_add, lun_remove, lun_resize, lun_list, stats or version.
    #[arg(value_name = "METHOD")]
    pub method: String,

    /// Parameters: integers become numbers, true and false booleans,
    /// anything else a string (e.g. image=/var/lib/img/d1.raw,ro lun=3).
    /// size is in bytes, or with a K, M, G or T suffix (powers of 1024).
    #[arg(value_name = "KEY=VALUE", value_parser = client::parse_param)]
    pub pairs: Vec<(String, Value)>,
}
