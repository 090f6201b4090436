//! Writes the man pages and shell completions generated from the clap
//! definitions: `cargo run --example gen-docs [-- OUT_DIR]`, into
//! OUT_DIR/man and OUT_DIR/completions; OUT_DIR is the repository's
//! contrib/ by default, where tests/it/docs.rs checks they are current.
//! Run it after changing an option or its help.

use std::path::PathBuf;
use std::process::ExitCode;

mod files;

fn main() -> ExitCode {
    let out = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("contrib"),
    };
    for (path, contents) in files::files() {
        let path = out.join(path);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, contents));
        if let Err(e) = written {
            eprintln!("gen-docs: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}
