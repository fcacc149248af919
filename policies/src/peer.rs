//! Where the Python peers run (transformers, TRL, TensorBoard: the parity
//! tests and `medzero bench` compare against them): `MEDZERO_PYTHON`, else
//! the venv `make setup` links into the repository (`.medzero/py`), else the
//! per-user cache's (`$MEDZERO_CACHE`, default `~/.cache/medzero`); and where
//! the real model `make setup` builds lies.

use std::path::{Path, PathBuf};

/// The repository this crate was built from.
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The real model `make setup` builds (SmolLM2-135M-Instruct, an HF folder):
/// linked into the repository (`.medzero/models`), else in the per-user cache.
pub fn smollm2() -> PathBuf {
    let name = "SmolLM2-135M-Instruct";
    let linked = Path::new(REPO).join(".medzero/models").join(name);
    if linked.exists() {
        return linked;
    }
    cache().join("models").join(name)
}

pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MEDZERO_PYTHON") {
        return p.into();
    }
    let linked = Path::new(REPO).join(".medzero/py/bin/python");
    if linked.exists() {
        return linked;
    }
    cache().join("py/bin/python")
}

fn cache() -> PathBuf {
    std::env::var_os("MEDZERO_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/medzero"),
        PathBuf::from,
    )
}
