//! Helpers shared by the policies integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

pub const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The venv's interpreter linked by `make setup`, else the user-cache install.
pub fn python() -> PathBuf {
    let linked = Path::new(REPO).join(".medzero/py/bin/python");
    if linked.exists() {
        return linked;
    }
    let cache = std::env::var_os("MEDZERO_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/medzero"),
        PathBuf::from,
    );
    cache.join("py/bin/python")
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
