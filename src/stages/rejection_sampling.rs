//! Rejection-sampling fine-tuning (Med-Shicheng's reasoning stage, also known
//! as expert iteration) as an online stage: actors sample N answers per
//! training problem with the current policy, the rule verifier keeps the
//! correct ones, and the learner fine-tunes on them while actors go on.

use super::{Stage, StageCtx, StageOutput, required};
use crate::infra::io::write_json;
use crate::rollout::sampling::{Sampler, SamplingConfig};
use crate::runtime::learner::{self, Online};
use crate::runtime::{LearnerConfig, RuntimeConfig};
use crate::teacher::JudgeReward;
use crate::train::sft::TrajectorySft;
use anyhow::{Context, Result, bail};
use medzero_policies::Policy;
use medzero_rewards::{Reward, RuleVerifier};
use serde::{Deserialize, Serialize};

/// What scores a sampled answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// Strict rule verification against the gold option.
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

impl Stage for RejectionSamplingStage {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn refs(&self) -> Vec<&str> {
        vec![self.init.as_str()]
    }

    fn runtime(&self) -> Option<&RuntimeConfig> {
        Some(&self.runtime)
    }

    fn validate(&self) -> Result<()> {
        required("init", &self.init)?;
        self.sampling.validate().context("sampling")?;
        if !(self.importance_clip.is_finite() && self.importance_clip >= 0.0) {
            bail!(
                "importance_clip must be a finite number >= 0, got {}",
                self.importance_clip
            );
        }
        if self.max_len < 2 {
            bail!("max_len must be at least 2, got {}", self.max_len);
        }
        self.learner.validate().context("learner")
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let (stage, name) = (self, ctx.name);
        let init = ctx.model(&stage.init)?;
        let device = ctx.run.device;
        let policy = Policy::load(&init.dir, device, None)?;
        let template = ctx.run.template;
        let problems = ctx.train_problems(stage.problems, 0);
        let mut objective = TrajectorySft::new(
            &policy,
            problems,
            template,
            stage.min_reward,
            stage.importance_clip,
            stage.max_len,
        )?;
        let judge = match stage.reward {
            RewardKind::Judge => Some(ctx.services.teacher()?),
            RewardKind::Rule => None,
        };
        let reward: Box<dyn Reward + '_> = match &judge {
            Some(t) => Box::new(JudgeReward(t.as_ref())),
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
            seed: ctx.run.seed,
            metrics: &mut *ctx.metrics,
            stop: ctx.stop,
        })?;
        let c = &report.counters;
        eprintln!(
            "{name}: {} rollouts, {} trajectories ({} trained, {} rejected, {} stale, {} ungraded), \
             {} learner steps, policy v{}, {} panics, {} failed, {:.1}s",
            c.rollouts,
            report.trajectories,
            c.trained,
            c.rejected,
            c.dropped_stale,
            c.reward_failures,
            report.steps,
            report.policy_version,
            c.panics,
            c.failed,
            report.wall_s
        );
        write_json(&ctx.dir.join("report.json"), &report)?;
        let model = ctx.save_model(
            &policy,
            init.training_tokens + report.learner_tokens,
            report.wall_s,
        )?;
        Ok(StageOutput {
            rows: Vec::new(),
            model: Some(model),
        })
    }
}
