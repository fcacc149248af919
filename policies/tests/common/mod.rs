//! Helpers shared by the policies integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

pub const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The Python the peers run in.
pub fn python() -> PathBuf {
    medzero_policies::peer::python()
}

/// Runs `tests/support/<script>` with the venv's Python; panics with its
/// stderr on failure. Returns stdout.
pub fn run_py(script: &str, args: &[&str]) -> Vec<u8> {
    let py = python();
    let out = Command::new(&py)
        .arg(Path::new(REPO).join("tests/support").join(script))
        .args(args)
        .env("PYTHONHASHSEED", "0")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (run `make setup`)", py.display()));
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
