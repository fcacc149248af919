//! Files a run reads and writes: JSONL records (a malformed line is named
//! by its number), model folders written whole (with the checksum manifest
//! `Policy::save` writes), and model paths (a model folder, or a run
//! folder's last trained model).

use anyhow::{Context, Result};
use medzero_envs::atomic;
use medzero_policies::Policy;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Reads a JSONL file of `what` records, naming the line of a malformed one.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not {what}", path.display(), i + 1))
        })
        .collect()
}

/// Writes records as JSONL, atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut lines = String::new();
    for r in records {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    atomic::write(path, lines.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Writes a value as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    atomic::write(path, serde_json::to_string_pretty(value)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Saves `policy` into `dir` as a whole: into a temporary sibling, then
/// renamed into place (an older `dir` is replaced), so `dir` is either
/// absent or complete.
pub fn save_model(policy: &Policy, dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    policy
        .save(&tmp)
        .with_context(|| format!("saving a model into {}", tmp.display()))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming into {}", dir.display()))?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A model folder as given, or the last trained model of a run folder: the
/// model of the last finished stage, in the run's stage order, that trained
/// one (as its `result.json` records it).
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").exists() {
        return Ok(path.to_path_buf());
    }
    let stages = path.join("stages");
    let mut found: Vec<(usize, PathBuf)> = Vec::new();
    let entries = std::fs::read_dir(&stages).with_context(|| {
        format!(
            "{} is neither a model folder (no config.json) nor a run folder (no stages/)",
            path.display()
        )
    })?;
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(k) = name.split('-').next().and_then(|k| k.parse::<usize>().ok()) else {
            continue;
        };
        let result = e.path().join("result.json");
        let Ok(text) = std::fs::read_to_string(&result) else {
            continue; // not finished
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a stage result", result.display()))?;
        if let Some(dir) = v["model"]["dir"].as_str() {
            // Recorded as the run saw it (perhaps relative to another
            // folder): the part below the stage's own folder is what counts.
            let recorded = Path::new(dir);
            let below: PathBuf = recorded
                .components()
                .skip_while(|c| c.as_os_str() != name.as_str())
                .skip(1)
                .collect();
            let model = if below.as_os_str().is_empty() {
                recorded.to_path_buf()
            } else {
                e.path().join(below)
            };
            found.push((k, model));
        }
    }
    found.sort();
    found
        .pop()
        .map(|(_, m)| m)
        .with_context(|| format!("run {} has no trained model yet", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last trained stage by the run's order, not by folder name (a
    /// name sort puts 10- before 9-), found below its own folder even when
    /// the run recorded it under another path, and skipping unfinished
    /// stages and stages that train nothing.
    #[test]
    fn a_run_folder_means_its_last_trained_stage() {
        let run = tempfile::tempdir().unwrap();
        let stage = |name: &str, model: Option<&str>| {
            let dir = run.path().join("stages").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let model = model.map(|m| format!("/elsewhere/runs/r/stages/{name}/{m}"));
            let result = serde_json::json!({"rows": [], "model": model.map(|d| serde_json::json!({"dir": d}))});
            std::fs::write(dir.join("result.json"), result.to_string()).unwrap();
        };
        stage("9-medcritical", Some("round-1/model"));
        stage("10-rft", Some("model"));
        stage("11-curriculum", Some("round-1/model"));
        stage("12-eval", None);
        std::fs::create_dir_all(run.path().join("stages/13-unfinished")).unwrap();
        assert_eq!(
            resolve_model(run.path()).unwrap(),
            run.path().join("stages/11-curriculum/round-1/model")
        );
    }
}
