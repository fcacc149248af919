//! GRPO (arXiv 2402.03300) as an online stage: actors draw a group per
//! training problem with the current policy (G samples, or G leaves of one
//! MedS3 search tree), the rule verifier scores them and each token gets its
//! advantage (outcome, PRM process rewards or tree values); the learner
//! takes clipped policy-gradient steps on them (TRL's loss types) and
//! publishes the new weights back to the actors.

use super::rejection_sampling::{OnlineRun, RewardKind, judge, reward};
use super::{Stage, StageCtx, StageOutput, required};
use crate::rollout::advantage::{
    Advantage, Copies, Outcome, ProcessPrm, ScaleRewards, TreeAdvantage, TreeValues,
};
use crate::rollout::grpo::{GroupSampler, TreeGroup};
use crate::rollout::mcts::MctsConfig;
use crate::rollout::meds3::{MctsRollout, StepGeneration};
use crate::rollout::sampling::{Sampler, SamplingConfig};
use crate::runtime::{LearnerConfig, Rollout, RuntimeConfig};
use crate::train::grpo::{GrpoConfig, GrpoObjective, Sampled};
use anyhow::{Context, Result, bail};
use medzero_policies::Policy;
use medzero_rewards::Prm;
use serde::{Deserialize, Serialize};

/// What a token's advantage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageKind {
    /// The group-normalised reward on every token.
    #[default]
    Outcome,
    /// DeepSeekMath's process supervision with the PRM of stage `prm`.
    Prm,
    /// V(step) − V(parent) over the leaves of one search tree per problem.
    Mcts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoStage {
    pub name: Option<String>,
    /// The stage whose model the actors and the learner start from.
    pub init: String,
    /// Training problems used, from the start of the train split (0: all).
    pub problems: usize,
    /// The group: `samples` completions per problem (tree leaves with
    /// `advantage = "mcts"`); the other fields set sampling.
    pub sampling: SamplingConfig,
    pub reward: RewardKind,
    pub scale_rewards: ScaleRewards,
    pub advantage: AdvantageKind,
    /// The `meds3_prm` stage whose PRM scores steps (`advantage = "prm"`).
    pub prm: Option<String>,
    /// The search of `advantage = "mcts"`, and its step advantage.
    pub mcts: MctsConfig,
    pub tree_advantage: TreeAdvantage,
    pub generation: StepGeneration,
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
            advantage: AdvantageKind::Outcome,
            prm: None,
            mcts: MctsConfig::default(),
            tree_advantage: TreeAdvantage::Local,
            generation: StepGeneration::default(),
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
        std::iter::once(self.init.as_str())
            .chain(self.prm.as_deref())
            .collect()
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
        match (self.advantage, &self.prm) {
            (AdvantageKind::Prm, None) => {
                bail!("advantage = \"prm\" needs `prm`, the meds3_prm stage whose PRM scores steps")
            }
            (AdvantageKind::Outcome | AdvantageKind::Mcts, Some(p)) => bail!(
                "`prm = {p:?}` is only read with advantage = \"prm\", not {:?}",
                self.advantage
            ),
            _ => {}
        }
        if self.advantage == AdvantageKind::Mcts {
            if self.reward != RewardKind::Rule {
                bail!(
                    "advantage = \"mcts\" scores leaves with the rule verifier: reward must be \"rule\""
                );
            }
            self.mcts.validate().context("mcts")?;
            self.generation.validate().context("generation")?;
        }
        self.grpo.validate().context("grpo")?;
        self.learner.validate().context("learner")
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let init = ctx.model(&self.init)?;
        let policy = Policy::load(&init.dir, ctx.run.device, None)?;
        let problems = ctx.train_problems(self.problems, 0);
        let reference = (self.grpo.beta > 0.0)
            .then(|| Policy::load(&init.dir, ctx.run.device, None))
            .transpose()?;
        // A tree's leaves come from steps expanded at the search's
        // temperature; they carry no log-probs, so only the gradient's
        // distribution depends on it.
        let sampled = match self.advantage {
            AdvantageKind::Mcts => Sampled {
                max_completion: self.generation.rollout_max_tokens,
                temperature: self.generation.temperature,
            },
            _ => Sampled {
                max_completion: self.sampling.max_new_tokens,
                temperature: self.sampling.temperature,
            },
        };
        let mut objective = GrpoObjective::new(
            &policy,
            problems,
            ctx.run.template.clone(),
            self.grpo.clone(),
            sampled,
            reference,
        )?;
        let advantage: Box<dyn Advantage> = match self.advantage {
            AdvantageKind::Outcome => Box::new(Outcome {
                scale: self.scale_rewards,
            }),
            AdvantageKind::Prm => {
                let dir = ctx.model(self.prm.as_deref().unwrap_or_default())?.dir;
                Box::new(ProcessPrm {
                    prms: Copies::load(self.runtime.actors, || {
                        Ok(Prm::load(&dir, ctx.run.device)?)
                    })?,
                    template: ctx.run.template.clone(),
                    scale: self.scale_rewards,
                })
            }
            AdvantageKind::Mcts => Box::new(TreeValues {
                kind: self.tree_advantage,
            }),
        };
        let judge = judge(ctx, self.reward)?;
        let rollout: Box<dyn Rollout + '_> = match self.advantage {
            AdvantageKind::Mcts => Box::new(TreeGroup {
                search: MctsRollout {
                    mcts: self.mcts.clone(),
                    generation: self.generation.clone(),
                    template: ctx.run.template.clone(),
                    iteration: 0,
                },
                group: self.sampling.samples,
                advantage,
            }),
            _ => Box::new(GroupSampler {
                sampler: Sampler {
                    cfg: self.sampling.clone(),
                    template: ctx.run.template.clone(),
                    reward: reward(&judge),
                },
                advantage,
            }),
        };
        let run = OnlineRun {
            init: &init,
            policy: &policy,
            runtime: &self.runtime,
            learner: &self.learner,
        };
        run.train(ctx, problems, rollout.as_ref(), &mut objective)
    }
}
