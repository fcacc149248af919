//! Rejection-sampling fine-tuning (Med-Shicheng's reasoning stage, also known
//! as expert iteration) as an online stage: actors sample N answers per
//! training problem with the current policy, the rule verifier keeps the
//! correct ones, and the learner fine-tunes on them while actors go on.

use crate::experiment::{StageCtx, StageResult, TrainedModel};
use crate::runtime::learner::{self, LearnerConfig, Online, RuntimeConfig};
use crate::sampling::{Sampler, SamplingConfig};
use crate::sft::TrajectorySft;
use anyhow::{Result, bail};
use medzero_policies::Policy;
use medzero_rewards::{Reward, RuleVerifier};
use serde::{Deserialize, Serialize};

/// What scores a sampled answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// Strict rule verification against the gold option (REFERENCE 1).
    #[default]
    Rule,
    /// The run's teacher as LLM-as-judge (1 = correct), for free-text
    /// answers a rule cannot check.
    Judge,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RejectionSamplingStage {
    pub name: Option<String>,
    /// The stage whose model the actors and the learner start from.
    pub init: String,
    /// Training problems used, from the start of the train split (0: all).
    pub problems: usize,
    pub sampling: SamplingConfig,
    pub reward: RewardKind,
    /// Trajectories with at least this reward are trained on.
    pub min_reward: f32,
    /// Truncated importance weighting of each token's loss (0: off).
    pub importance_clip: f64,
    /// Sequences are cut to this many tokens.
    pub max_len: usize,
    pub runtime: RuntimeConfig,
    pub learner: LearnerConfig,
}

impl Default for RejectionSamplingStage {
    fn default() -> Self {
        RejectionSamplingStage {
            name: None,
            init: String::new(),
            problems: 0,
            sampling: SamplingConfig::default(),
            reward: RewardKind::Rule,
            min_reward: 1.0,
            importance_clip: 0.0,
            max_len: 512,
            runtime: RuntimeConfig::default(),
            learner: LearnerConfig::default(),
        }
    }
}

impl RejectionSamplingStage {
    pub fn validate(&self) -> Result<()> {
        if self.init.is_empty() {
            bail!("rejection_sampling: `init` must name the stage whose model it starts from");
        }
        if self.sampling.samples == 0 || self.sampling.max_new_tokens == 0 {
            bail!(
                "rejection_sampling: sampling.samples and sampling.max_new_tokens must be positive"
            );
        }
        self.runtime.validate()?;
        self.learner.validate()
    }
}

pub fn run(ctx: &mut StageCtx, name: &str, stage: &RejectionSamplingStage) -> Result<StageResult> {
    let init = ctx.model(&stage.init)?;
    let device = ctx.device;
    let policy = Policy::load(&init.dir, device, None)?;
    let template = ctx.cfg.student.template;
    let train = &ctx.world.train;
    let problems = if stage.problems > 0 && stage.problems < train.len() {
        &train[..stage.problems]
    } else {
        &train[..]
    };
    let mut objective = TrajectorySft::new(
        &policy,
        problems,
        template,
        stage.min_reward,
        stage.importance_clip,
        stage.max_len,
    )?;
    let judge = match stage.reward {
        RewardKind::Judge => Some(crate::experiment::teacher(ctx.cfg, ctx.world)?),
        RewardKind::Rule => None,
    };
    let reward: Box<dyn Reward + '_> = match &judge {
        Some(t) => Box::new(crate::teacher::JudgeReward(t.as_ref())),
        None => Box::new(RuleVerifier),
    };
    let rollout = Sampler {
        cfg: stage.sampling.clone(),
        template,
        reward,
    };
    let init_dir = init.dir.clone();
    let build = move || Ok(Policy::load(&init_dir, device, None)?);
    let report = learner::run(Online {
        name,
        dir: ctx.dir,
        problems,
        rollout: &rollout,
        objective: &mut objective,
        policy: &policy,
        build_actor_policy: &build,
        runtime: &stage.runtime,
        learner: &stage.learner,
        seed: ctx.cfg.run.seed,
        metrics: ctx.metrics,
        stop: ctx.stop,
    })?;
    let model_dir = ctx.dir.join("model");
    policy.save(&model_dir)?;
    let c = &report.counters;
    eprintln!(
        "{name}: {} rollouts, {} trajectories ({} trained, {} rejected, {} stale), {} learner steps, \
         policy v{}, {} panics, {} failed, {:.1}s",
        c.rollouts,
        report.trajectories,
        c.trained,
        c.rejected,
        c.dropped_stale,
        report.steps,
        report.policy_version,
        c.panics,
        c.failed,
        report.wall_s
    );
    std::fs::write(
        ctx.dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(StageResult {
        rows: Vec::new(),
        model: Some(TrainedModel {
            dir: model_dir,
            training_tokens: init.training_tokens + report.learner_tokens,
            wall_s: report.wall_s,
        }),
    })
}
