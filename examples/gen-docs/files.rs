//! The generated documentation: the man pages and the bash, zsh and fish
//! completions of `vhost-device-scsi` and `vhost-device-scsi-ctl`, rendered
//! from their clap definitions. Shared by the generator (main.rs here) and
//! by the test that checks the copies in contrib/ are current
//! (tests/it/docs.rs).

use clap::{Command, CommandFactory};
use clap_complete::Shell;
use vhost_device_scsi::api::ctl::CtlCli;
use vhost_device_scsi::cli::Cli;

/// Every generated file: its path under contrib/ and its contents.
pub fn files() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for command in [Cli::command(), CtlCli::command()] {
        let name = command.get_name().to_string();
        let mut page = Vec::new();
        clap_mangen::Man::new(command.clone())
            .render(&mut page)
            .expect("rendering into memory cannot fail");
        files.push((format!("man/{name}.1"), page));
        for (shell, file) in [
            (Shell::Bash, format!("{name}.bash")),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            files.push((format!("completions/{file}"), completion(shell, &command)));
        }
    }
    files
}

fn completion(shell: Shell, command: &Command) -> Vec<u8> {
    let mut command = command.clone();
    let name = command.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    script
}
