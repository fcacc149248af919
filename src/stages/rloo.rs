//! RLOO (arXiv 2402.14740) as an online stage: actors draw G samples per
//! training problem with the current policy, the rule verifier scores them,
//! the KL to the frozen initial model comes out of each reward and each
//! completion gets its leave-one-out advantage; the learner takes clipped
//! sequence-level policy-gradient steps and publishes the new weights.

use super::rejection_sampling::{OnlineRun, RewardKind, judge, reward};
use super::{Stage, StageCtx, StageOutput, required};
use crate::rollout::advantage::Copies;
use crate::rollout::grpo::GroupSampler;
use crate::rollout::rloo::{KlPenalty, LeaveOneOut};
use crate::rollout::sampling::{Sampler, SamplingConfig};
use crate::runtime::{LearnerConfig, RuntimeConfig};
use crate::train::rloo::{RlooConfig, RlooObjective};
use anyhow::{Context, Result, bail};
use medzero_policies::Policy;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlooStage {
    pub name: Option<String>,
    /// The stage whose model the actors and the learner start from (and the
    /// KL's reference).
    pub init: String,
    /// Training problems used, from the start of the train split (0: all).
    pub problems: usize,
    /// The group: `samples` completions per problem.
    pub sampling: SamplingConfig,
    pub reward: RewardKind,
    pub rloo: RlooConfig,
    pub runtime: RuntimeConfig,
    pub learner: LearnerConfig,
}

impl Default for RlooStage {
    fn default() -> Self {
        RlooStage {
            name: None,
            init: String::new(),
            problems: 0,
            sampling: SamplingConfig {
                samples: 8,
                ..SamplingConfig::default()
            },
            reward: RewardKind::Rule,
            rloo: RlooConfig::default(),
            runtime: RuntimeConfig::default(),
            learner: LearnerConfig {
                lr: 1e-5,
                ..LearnerConfig::default()
            },
        }
    }
}

impl Stage for RlooStage {
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
                "sampling.samples must be at least 2: leave-one-out needs another sample, got {}",
                self.sampling.samples
            );
        }
        self.rloo.validate().context("rloo")?;
        self.learner.validate().context("learner")
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let init = ctx.model(&self.init)?;
        let policy = Policy::load(&init.dir, ctx.run.device, None)?;
        let problems = ctx.train_problems(self.problems, 0);
        let mut objective = RlooObjective::new(
            &policy,
            problems,
            ctx.run.template.clone(),
            self.rloo.clone(),
            self.sampling.temperature,
        )?;
        let kl = (self.rloo.beta > 0.0)
            .then(|| {
                anyhow::Ok(KlPenalty {
                    beta: self.rloo.beta,
                    references: Copies::load(self.runtime.actors, || {
                        Ok(Policy::load(&init.dir, ctx.run.device, None)?)
                    })?,
                    temperature: self.sampling.temperature,
                })
            })
            .transpose()?;
        let judge = judge(ctx, self.reward)?;
        let rollout = GroupSampler {
            sampler: Sampler {
                cfg: self.sampling.clone(),
                template: ctx.run.template.clone(),
                reward: reward(&judge),
            },
            advantage: Box::new(LeaveOneOut {
                kl,
                template: ctx.run.template.clone(),
            }),
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
