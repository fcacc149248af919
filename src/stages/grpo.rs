//! GRPO (arXiv 2402.03300) as an online stage: actors draw a group of G
//! samples per training problem with the current policy, the rule verifier
//! scores them and each gets its group advantage; the learner takes
//! clipped policy-gradient steps on them (TRL's loss types) and publishes
//! the new weights back to the actors.

use super::rejection_sampling::{OnlineRun, RewardKind, judge, reward};
use super::{Stage, StageCtx, StageOutput, required};
use crate::rollout::grpo::{GroupSampler, ScaleRewards};
use crate::rollout::sampling::{Sampler, SamplingConfig};
use crate::runtime::{LearnerConfig, RuntimeConfig};
use crate::train::grpo::{GrpoConfig, GrpoObjective};
use anyhow::{Context, Result, bail};
use medzero_policies::Policy;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoStage {
    pub name: Option<String>,
    /// The stage whose model the actors and the learner start from.
    pub init: String,
    /// Training problems used, from the start of the train split (0: all).
    pub problems: usize,
    /// The group: `samples` completions per problem.
    pub sampling: SamplingConfig,
    pub reward: RewardKind,
    pub scale_rewards: ScaleRewards,
    pub grpo: GrpoConfig,
    pub runtime: RuntimeConfig,
    pub learner: LearnerConfig,
}

impl Default for GrpoStage {
    fn default() -> Self {
        GrpoStage {
            name: None,
            init: String::new(),
            problems: 0,
            sampling: SamplingConfig {
                samples: 8,
                ..SamplingConfig::default()
            },
            reward: RewardKind::Rule,
            scale_rewards: ScaleRewards::Group,
            grpo: GrpoConfig::default(),
            runtime: RuntimeConfig::default(),
            learner: LearnerConfig {
                lr: 1e-5,
                ..LearnerConfig::default()
            },
        }
    }
}

impl Stage for GrpoStage {
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
        if self.sampling.samples < 2 {
            bail!(
                "sampling.samples must be at least 2: a group of one has no baseline, got {}",
                self.sampling.samples
            );
        }
        self.grpo.validate().context("grpo")?;
        self.learner.validate().context("learner")
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let init = ctx.model(&self.init)?;
        let policy = Policy::load(&init.dir, ctx.run.device, None)?;
        let problems = ctx.train_problems(self.problems, 0);
        let mut objective = GrpoObjective::new(
            &policy,
            problems,
            ctx.run.template,
            self.grpo.clone(),
            self.sampling.max_new_tokens,
        )?;
        let judge = judge(ctx, self.reward)?;
        let rollout = GroupSampler {
            sampler: Sampler {
                cfg: self.sampling.clone(),
                template: ctx.run.template,
                reward: reward(&judge),
            },
            scale: self.scale_rewards,
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
