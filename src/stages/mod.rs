//! The stage boundary. An experiment is a list of stages; each is a serde
//! payload (its TOML table) implementing [`Stage`]: what earlier stages it
//! reads, how it validates itself at load, and how it runs. A stage sees the
//! run only through its [`StageCtx`]: run-wide settings, the world and its
//! ground truth, earlier stages' models and folders, and [`Services`] (the
//! base student, the configured teacher, the real evaluation files), so no
//! stage depends on the experiment config or the runner. [`registry`] is
//! the one list of stage kinds.
//!
//! Stages by paper: [`meds3`] (search, policy SFT, PRM), [`medthink`]
//! (knowledge, correction), [`preference`] (MedCritical's self-iterated DPO
//! and the curriculum's KTO), [`rejection_sampling`] (the curriculum's RFT);
//! shared ones: [`baselines`], [`distill`] (pretraining, answer-only and
//! chain distillation), [`eval`].

pub mod baselines;
pub mod distill;
pub mod eval;
pub mod grpo;
pub mod meds3;
pub mod medthink;
pub mod preference;
pub mod registry;
pub mod rejection_sampling;
pub mod rloo;

use crate::infra::monitor::Metrics;
use crate::infra::results::Row;
use crate::runtime::RuntimeConfig;
use crate::teacher::Teacher;
use crate::train::sft::{self, Example};
use crate::train::{TrainConfig, TrainRun};
use anyhow::{Context, Result, bail};
use medzero_envs::synthclinic::{GroundTruth, SynthClinic};
use medzero_envs::{Problem, Step};
use medzero_policies::Policy;
use medzero_policies::tokenizer::PromptTemplate;
use medzero_rewards::SoundVerifier;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

pub use registry::StageSpec;

/// One kind of stage.
pub trait Stage {
    /// The name the stage sets (`name = ...`); its kind otherwise.
    fn name(&self) -> Option<&str>;
    /// Earlier stages it reads (their models or files): each must name an
    /// earlier stage of the run.
    fn refs(&self) -> Vec<&str> {
        Vec::new()
    }
    /// The actor runtime it runs, if any (a deterministic run allows no
    /// asynchronous one).
    fn runtime(&self) -> Option<&RuntimeConfig> {
        None
    }
    /// Whether its rollout generates only through the inference service's
    /// interface, so `runtime.placement = "shared"` can serve it.
    fn servable(&self) -> bool {
        false
    }
    /// Every setting in range: called once at load, before any stage runs,
    /// so `run` can trust its settings.
    fn validate(&self) -> Result<()>;
    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput>;
}

/// Run-wide settings.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub seed: u64,
    /// Where models train and generate.
    pub device: tch::Device,
    /// How the student's prompts are rendered.
    pub template: PromptTemplate,
}

/// What the runner provides besides settings, built on demand.
pub trait Services {
    /// A fresh base student (`[student]`).
    fn base_student(&self) -> Result<Policy>;
    /// The configured teacher (`[teacher]`).
    fn teacher(&self) -> Result<Box<dyn Teacher>>;
    /// Real benchmark files scored besides SynthClinic's test split.
    fn eval_files(&self) -> &[PathBuf];
}

/// A model a training stage left behind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainedModel {
    pub dir: PathBuf,
    /// Tokens trained on, counting every stage it descends from.
    pub training_tokens: u64,
    pub wall_s: f64,
}

/// What a finished stage records in its `result.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageOutput {
    #[serde(default)]
    pub rows: Vec<Row>,
    #[serde(default)]
    pub model: Option<TrainedModel>,
}

/// The run's earlier stages: their folders and the models they trained.
#[derive(Debug, Default)]
pub struct Earlier {
    pub dirs: BTreeMap<String, PathBuf>,
    pub models: BTreeMap<String, TrainedModel>,
}

/// Everything a stage may read.
pub struct StageCtx<'a> {
    pub name: &'a str,
    /// The stage's folder, `stages/<k>-<name>/`.
    pub dir: &'a Path,
    pub run: &'a RunSettings,
    pub world: &'a SynthClinic,
    /// The world's noise-free truth, whichever teacher the run uses.
    pub truth: &'a GroundTruth,
    pub earlier: &'a Earlier,
    pub services: &'a dyn Services,
    pub metrics: &'a mut dyn Metrics,
    /// Set by SIGINT/SIGTERM: stages checkpoint and return.
    pub stop: &'a AtomicBool,
}

impl<'a> StageCtx<'a> {
    /// The model an earlier stage trained.
    pub fn model(&self, stage: &str) -> Result<TrainedModel> {
        self.earlier
            .models
            .get(stage)
            .cloned()
            .with_context(|| format!("no earlier stage named {stage:?} trained a model"))
    }

    /// The folder of an earlier stage.
    pub fn stage_dir(&self, stage: &str) -> Result<&Path> {
        self.earlier
            .dirs
            .get(stage)
            .map(PathBuf::as_path)
            .with_context(|| format!("no earlier stage named {stage:?}"))
    }

    /// The training questions `offset..offset + limit` (limit 0: all the
    /// rest), clamped to the train split.
    pub fn train_problems(&self, limit: usize, offset: usize) -> &'a [Problem] {
        let train: &'a [Problem] = &self.world.train;
        let start = offset.min(train.len());
        let end = if limit == 0 {
            train.len()
        } else {
            (start + limit).min(train.len())
        };
        &train[start..end]
    }

    /// The policy a stage starts from: an earlier stage's model, or a fresh
    /// base student; and the tokens it was trained on.
    pub fn start_from(&self, init: Option<&str>) -> Result<(Policy, u64)> {
        match init {
            None => Ok((self.services.base_student()?, 0)),
            Some(stage) => {
                let m = self.model(stage)?;
                Ok((
                    Policy::load(&m.dir, self.run.device, None)?,
                    m.training_tokens,
                ))
            }
        }
    }

    /// The arguments of a training run in this stage's folder.
    pub fn train_run(&mut self) -> TrainRun<'_> {
        TrainRun {
            seed: self.run.seed,
            dir: self.dir,
            tag: self.name,
            metrics: &mut *self.metrics,
            stop: self.stop,
        }
    }

    /// Saves the stage's final model into `model/` as a whole: written into a
    /// temporary folder, fsynced, then renamed, so a folder named `model`
    /// is always complete. Returns the model's record.
    pub fn save_model(
        &self,
        policy: &Policy,
        training_tokens: u64,
        wall_s: f64,
    ) -> Result<TrainedModel> {
        let dir = self.dir.join("model");
        crate::infra::io::save_model(policy, &dir)?;
        Ok(TrainedModel {
            dir,
            training_tokens,
            wall_s,
        })
    }
}

/// SFT from `init` (an earlier stage's model, or the base student) on
/// `data`, which is kept in the stage folder (`data.jsonl`); the fine-tuning
/// stages (pretraining, distillation, MedS3's policy, MedThink) share it.
pub fn fine_tune(
    ctx: &mut StageCtx,
    init: Option<&str>,
    cfg: &TrainConfig,
    data: Vec<Example>,
) -> Result<StageOutput> {
    if data.is_empty() {
        bail!("{}: no training examples", ctx.name);
    }
    let (policy, inherited) = ctx.start_from(init)?;
    let data_path = ctx.dir.join("data.jsonl");
    if !data_path.exists() {
        crate::infra::io::write_jsonl(&data_path, &data)?;
    }
    let template = ctx.run.template.clone();
    let report = sft::train(&policy, &data, cfg, template, ctx.train_run())?;
    eprintln!(
        "{}: {} steps, {} tokens, final loss {:.4}, {:.1}s",
        ctx.name, report.steps, report.tokens, report.final_loss, report.wall_s
    );
    let model = ctx.save_model(&policy, inherited + report.tokens, report.wall_s)?;
    Ok(StageOutput {
        rows: Vec::new(),
        model: Some(model),
    })
}

/// Which sampled chains are kept for training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accept {
    /// On the final answer alone (the papers' rule; keeps lucky chains).
    #[default]
    Outcome,
    /// Every step right by the world's step labels (SynthClinic only).
    Sound,
}

impl Accept {
    /// Whether a chain of `steps` (root sentence stripped) is kept.
    pub fn keeps(self, truth: &GroundTruth, problem: &Problem, steps: &[String]) -> bool {
        match self {
            Accept::Outcome => true,
            Accept::Sound => {
                let steps: Vec<Step> = steps.iter().cloned().map(Step::new).collect();
                SoundVerifier(truth.clone())
                    .sound(problem, &steps)
                    .unwrap_or(false)
            }
        }
    }
}

/// A required reference to an earlier stage: non-empty.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        bail!("`{field}` must name an earlier stage");
    }
    Ok(value)
}
