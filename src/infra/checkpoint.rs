//! Training checkpoints: the model in HF layout, the optimizer's moments and
//! the trainer's position, written so a crash at any instant leaves either
//! the previous checkpoint or the new one, never half of one:
//!
//! ```text
//! checkpoints/step-000120/  config.json model.safetensors tokenizer.json optimizer.safetensors trainer_state.json
//! checkpoints/latest        "step-000120", replaced atomically once the folder is complete
//! ```
//!
//! The folder is written under a temporary name, every file fsynced, its
//! checksums recorded (`manifest.json`), then renamed into place; `latest`
//! moves last; older checkpoints are pruned. A resume takes the newest
//! checkpoint whose files match their checksums and whose weights and
//! optimizer moments are finite, and says so when it has to fall back.

use anyhow::{Context, Result, bail};
use medzero_envs::atomic;
use medzero_policies::Policy;
use medzero_policies::manifest::Manifest;
use medzero_policies::optim::AdamW;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a learner stands; enough to continue bit-identically.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Data position: epoch, and index into that epoch's order (the order
    /// itself is a pure function of the seed and the epoch).
    pub epoch: usize,
    pub position: usize,
    /// Weight versions published (the learner's policy version).
    pub policy_version: u64,
    pub tokens_seen: u64,
    /// Wall time spent training before this checkpoint.
    pub elapsed_s: f64,
    /// Whatever else a loop must carry across a resume (an online stage's counters).
    #[serde(default)]
    pub extra: serde_json::Value,
}

pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

impl Checkpoints {
    pub fn new(dir: &Path, keep: usize) -> Self {
        Checkpoints {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
        }
    }

    /// The newest complete checkpoint, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let marker = self.dir.join("latest");
        if !marker.exists() {
            return Ok(None);
        }
        let name = std::fs::read_to_string(&marker)
            .with_context(|| format!("reading {}", marker.display()))?;
        let path = self.dir.join(name.trim());
        if !path.join("trainer_state.json").exists() {
            bail!(
                "{} points at {}, which is incomplete; remove the marker to start this stage over",
                marker.display(),
                path.display()
            );
        }
        Ok(Some(path))
    }

    pub fn save(&self, policy: &Policy, opt: &AdamW, state: &TrainerState) -> Result<PathBuf> {
        self.save_with(policy, opt, state, &|_| Ok(()))
    }

    /// [`Checkpoints::save`], with `extra` writing more state into the
    /// folder before it is renamed into place.
    pub fn save_with(
        &self,
        policy: &Policy,
        opt: &AdamW,
        state: &TrainerState,
        extra: &dyn Fn(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        // A second save at the same step (a stop right after a checkpoint)
        // gets its own folder: replacing the one `latest` names would leave a
        // window in which `latest` points at nothing.
        let mut name = format!("step-{:06}", state.step);
        for k in 1.. {
            if !self.dir.join(&name).exists() {
                break;
            }
            name = format!("step-{:06}.{k:03}", state.step);
        }
        let tmp = self.dir.join(format!(".tmp-{name}"));
        let dest = self.dir.join(&name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        // One manifest for the whole folder, written last.
        policy
            .save_files(&tmp)
            .with_context(|| format!("saving weights to {}", tmp.display()))?;
        opt.save(&tmp.join("optimizer.safetensors"))
            .context("saving optimizer state")?;
        atomic::write(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )?;
        extra(&tmp)?;
        Manifest::write(&tmp)?;
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        atomic::write(&self.dir.join("latest"), name.as_bytes())?;
        self.prune(&name)?;
        Ok(dest)
    }

    /// The newest usable checkpoint, restored into `policy` and `opt`: its
    /// folder and trainer state, or `None` when the stage has none. A
    /// checkpoint whose files fail their checksums, or whose weights or
    /// optimizer moments are not finite, is skipped with a warning naming
    /// what is wrong, for the one before it; when checkpoints exist but none
    /// is usable, that is an error, never a silent start from scratch.
    pub fn restore_latest(
        &self,
        policy: &Policy,
        opt: &mut AdamW,
    ) -> Result<Option<(PathBuf, TrainerState)>> {
        let Some(latest) = self.latest()? else {
            return Ok(None);
        };
        let mut candidates = vec![latest.clone()];
        let mut older: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p != &latest
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect();
        older.sort();
        candidates.extend(older.into_iter().rev());
        let mut problems = Vec::new();
        for path in candidates {
            match self.restore(&path, policy, opt) {
                Ok(state) => {
                    if !problems.is_empty() {
                        eprintln!(
                            "resuming from {} instead: {}",
                            path.display(),
                            problems.join("; ")
                        );
                    }
                    return Ok(Some((path, state)));
                }
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        bail!(
            "no usable checkpoint in {}: {}; delete the folder to start this stage over",
            self.dir.display(),
            problems.join("; ")
        )
    }

    /// Loads weights and optimizer state into `policy`/`opt` and returns the
    /// trainer state, after checking the folder's checksums and that what it
    /// loaded is finite.
    fn restore(&self, path: &Path, policy: &Policy, opt: &mut AdamW) -> Result<TrainerState> {
        Manifest::verify(path)?;
        medzero_policies::weights::load(
            path,
            &policy.vs.variables(),
            policy.config().tie_word_embeddings,
        )
        .with_context(|| format!("loading checkpoint {}", path.display()))?;
        if let Some(t) = policy.first_non_finite() {
            bail!("{}: weight {t} is not finite", path.display());
        }
        opt.load(&path.join("optimizer.safetensors"))
            .context("loading optimizer state")?;
        if let Some(t) = opt.first_non_finite() {
            bail!("{}: optimizer state {t} is not finite", path.display());
        }
        let text = std::fs::read_to_string(path.join("trainer_state.json"))?;
        serde_json::from_str(&text)
            .with_context(|| format!("reading {}/trainer_state.json", path.display()))
    }

    /// Removes all but the newest `keep` checkpoints (and stale temporaries).
    fn prune(&self, newest: &str) -> Result<()> {
        let mut steps: Vec<String> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.starts_with("step-") || n.starts_with(".tmp-step-"))
            .collect();
        steps.sort();
        let complete: Vec<&String> = steps.iter().filter(|n| n.starts_with("step-")).collect();
        let cut = complete.len().saturating_sub(self.keep);
        for old in complete
            .into_iter()
            .take(cut)
            .chain(steps.iter().filter(|n| n.starts_with(".tmp-")))
        {
            if old != newest {
                std::fs::remove_dir_all(self.dir.join(old))?;
            }
        }
        Ok(())
    }
}
