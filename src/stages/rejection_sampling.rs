//! Rejection-sampling fine-tuning (Med-Shicheng's reasoning stage, also known
//! as expert iteration) as an online stage: actors sample N answers per
//! training problem with the current policy, the rule verifier keeps the
//! correct ones, and the learner fine-tunes on them while actors go on.

use super::{Accept, Stage, StageCtx, StageOutput, TrainedModel, required};
use crate::infra::io::write_json;
use crate::rollout::sampling::{Sampler, SamplingConfig};
use crate::runtime::learner::{self, Objective, Online};
use crate::runtime::{LearnerConfig, Rollout, RuntimeConfig};
use crate::teacher::{JudgeReward, Teacher};
use crate::train::sft::TrajectorySft;
use anyhow::{Context, Result, bail};
use medzero_envs::Problem;
use medzero_policies::Policy;
use medzero_rewards::{Reward, RuleVerifier, SoundVerifier};
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
    /// Whether the reward is the outcome's (`reward`) or the process's.
    pub accept: Accept,
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
            accept: Accept::Outcome,
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

    fn servable(&self) -> bool {
        true
    }

    fn validate(&self) -> Result<()> {
        required("init", &self.init)?;
        self.sampling.validate().context("sampling")?;
        if self.accept == Accept::Sound && self.reward == RewardKind::Judge {
            bail!(
                "accept = \"sound\" checks every step with the world's labels, not a judge: \
                 set reward = \"rule\" or accept = \"outcome\""
            );
        }
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
        let init = ctx.model(&self.init)?;
        let policy = Policy::load(&init.dir, ctx.run.device, None)?;
        let problems = ctx.train_problems(self.problems, 0);
        let mut objective = TrajectorySft::new(
            &policy,
            problems,
            ctx.run.template.clone(),
            self.min_reward,
            self.importance_clip,
            self.max_len,
            self.sampling.temperature,
        )?;
        let judge = judge(ctx, self.reward)?;
        let reward: Box<dyn Reward + '_> = match self.accept {
            Accept::Outcome => reward(&judge),
            Accept::Sound => Box::new(SoundVerifier(ctx.truth.clone())),
        };
        let rollout = Sampler {
            cfg: self.sampling.clone(),
            template: ctx.run.template.clone(),
            reward,
        };
        let run = OnlineRun {
            init: &init,
            policy: &policy,
            runtime: &self.runtime,
            learner: &self.learner,
        };
        run.train(ctx, problems, &rollout, &mut objective)
    }
}

/// The teacher a `judge` reward asks (none for the rule verifier).
pub(super) fn judge(ctx: &StageCtx, kind: RewardKind) -> Result<Option<Box<dyn Teacher>>> {
    Ok(match kind {
        RewardKind::Judge => Some(ctx.services.teacher()?),
        RewardKind::Rule => None,
    })
}

/// The rule verifier, or `judge` as LLM-as-judge.
pub(super) fn reward(judge: &Option<Box<dyn Teacher>>) -> Box<dyn Reward + '_> {
    match judge {
        Some(t) => Box::new(JudgeReward(t.as_ref())),
        None => Box::new(RuleVerifier),
    }
}

/// An online stage that trains `policy` (loaded from `init`) while actors
/// generate: the runtime loop, its report, and the saved model.
pub(super) struct OnlineRun<'a> {
    pub init: &'a TrainedModel,
    pub policy: &'a Policy,
    pub runtime: &'a RuntimeConfig,
    pub learner: &'a LearnerConfig,
}

impl OnlineRun<'_> {
    pub fn train(
        &self,
        ctx: &mut StageCtx,
        problems: &[Problem],
        rollout: &dyn Rollout,
        objective: &mut dyn Objective,
    ) -> Result<StageOutput> {
        let name = ctx.name;
        let (init_dir, device) = (self.init.dir.clone(), ctx.run.device);
        let build = move || Ok(Policy::load(&init_dir, device, None)?);
        let report = learner::run(Online {
            name,
            dir: ctx.dir,
            problems,
            rollout,
            objective,
            policy: self.policy,
            build_actor_policy: &build,
            runtime: self.runtime,
            learner: self.learner,
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
            self.policy,
            self.init.training_tokens + report.learner_tokens,
            report.wall_s,
        )?;
        Ok(StageOutput {
            rows: Vec::new(),
            model: Some(model),
        })
    }
}
