//! Checksums of a model or checkpoint folder: `manifest.json` lists the
//! SHA-256 of every file the folder was written with, so a file corrupted
//! or changed after the fact (its header intact, its bytes not) is found
//! when the folder is loaded, not stages later as a wrong number.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file a folder lists its files' checksums in.
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a checksum manifest")]
    Unreadable(PathBuf),
    #[error("{file}: missing, but {manifest} lists it: the folder is incomplete")]
    Missing { file: PathBuf, manifest: PathBuf },
    #[error(
        "{file}: its checksum does not match {manifest}: the file is corrupted or was changed \
         after it was written"
    )]
    Mismatch { file: PathBuf, manifest: PathBuf },
}

/// SHA-256 of each file a folder holds, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub sha256: BTreeMap<String, String>,
}

impl Manifest {
    /// The checksums of every plain file in `dir` but the manifest itself
    /// (and hidden temporaries).
    pub fn of(dir: &Path) -> Result<Manifest, ManifestError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ManifestError::Io { path, source }
        };
        let mut sha256 = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if path.is_file() && name != MANIFEST && !name.starts_with('.') {
                sha256.insert(name, sha256_file(&path)?);
            }
        }
        Ok(Manifest { sha256 })
    }

    /// Writes the manifest of `dir` into it (whole: temp file, fsync, rename).
    pub fn write(dir: &Path) -> Result<(), ManifestError> {
        let path = dir.join(MANIFEST);
        let json =
            serde_json::to_string_pretty(&Manifest::of(dir)?).expect("a manifest serialises");
        medzero_envs::atomic::write(&path, json.as_bytes())
            .map_err(|source| ManifestError::Io { path, source })
    }

    /// Checks every file `dir`'s manifest lists; a folder without one
    /// (written by another tool, e.g. transformers) passes.
    pub fn verify(dir: &Path) -> Result<(), ManifestError> {
        let manifest = dir.join(MANIFEST);
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            return Ok(());
        };
        let want: Manifest =
            serde_json::from_str(&text).map_err(|_| ManifestError::Unreadable(manifest.clone()))?;
        for (name, sum) in &want.sha256 {
            let file = dir.join(name);
            if !file.exists() {
                return Err(ManifestError::Missing {
                    file,
                    manifest: manifest.clone(),
                });
            }
            if &sha256_file(&file)? != sum {
                return Err(ManifestError::Mismatch {
                    file,
                    manifest: manifest.clone(),
                });
            }
        }
        Ok(())
    }
}

fn sha256_file(path: &Path) -> Result<String, ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io)?;
    Ok(format!("{:x}", hasher.finalize()))
}
