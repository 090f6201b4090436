//! The man pages and shell completions in contrib/ are those the clap
//! definitions generate now: a flag added or its help changed without
//! running the generator (`cargo run --example gen-docs`) fails here.

#[path = "../../examples/gen-docs/files.rs"]
mod files;

use std::path::Path;

/// The command that writes the files into contrib/ (examples/gen-docs).
const REGENERATE: &str = "cargo run --example gen-docs";

#[test]
fn generated_docs_are_current() {
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let mut stale = Vec::new();
    let generated = files::files();
    // Both programs, each a man page and three completion scripts.
    assert_eq!(generated.len(), 8);
    for (path, contents) in generated {
        match std::fs::read(contrib.join(&path)) {
            Ok(checked_in) if checked_in == contents => {}
            Ok(_) => stale.push(format!("contrib/{path} differs")),
            Err(e) => stale.push(format!("contrib/{path}: {e}")),
        }
    }
    assert!(
        stale.is_empty(),
        "generated documentation out of date ({}); regenerate it with `{}` and commit the result",
        stale.join(", "),
        REGENERATE
    );
}
