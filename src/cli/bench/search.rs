//! The search workload `medzero bench` (the service group) and
//! `benches/generation.rs` both time: MedS3 trees over SynthClinic test
//! questions, searched one at a time on the policy or all in flight through
//! the inference service, each problem on its own random stream.

use crate::rollout::mcts::{MctsConfig, Tree};
use crate::rollout::meds3::{MctsRollout, StepGeneration};
use crate::runtime::actor::problem_rng;
use crate::runtime::service::{ServiceConfig, ServiceStats};
use anyhow::Result;
use medzero_envs::Problem;
use medzero_envs::synthclinic::SynthClinic;
use medzero_policies::Policy;
use medzero_policies::tokenizer::PromptTemplate;

/// `trees` searches of at most 20 nodes, steps of up to 24 tokens and
/// rollouts of up to 64 (an untrained student runs every one to its budget).
pub struct Trees<'w> {
    pub rollout: MctsRollout,
    pub problems: Vec<&'w Problem>,
}

impl<'w> Trees<'w> {
    pub fn new(world: &'w SynthClinic, trees: usize) -> Self {
        Trees {
            rollout: MctsRollout {
                mcts: MctsConfig {
                    max_nodes: 20,
                    ..MctsConfig::default()
                },
                generation: StepGeneration {
                    step_max_tokens: 24,
                    rollout_max_tokens: 64,
                    ..StepGeneration::default()
                },
                template: PromptTemplate::Plain,
                iteration: 0,
            },
            problems: world.test.iter().cycle().take(trees).collect(),
        }
    }

    /// Every tree searched on `policy`, one after another.
    pub fn one_at_a_time(&self, policy: &Policy) -> Result<Vec<Tree>> {
        self.problems
            .iter()
            .enumerate()
            .map(|(i, p)| Ok(self.rollout.search(policy, p, &mut problem_rng(0, i))?.0))
            .collect()
    }

    /// Every tree in flight at once through one service on `policy`.
    pub fn in_flight(&self, policy: &Policy) -> Result<(Vec<Tree>, ServiceStats)> {
        let rngs = (0..self.problems.len())
            .map(|i| problem_rng(0, i))
            .collect();
        let (searched, stats) = self.rollout.search_many(
            policy,
            &self.problems,
            rngs,
            self.problems.len(),
            ServiceConfig::default(),
        )?;
        Ok((searched.into_iter().map(|s| s.tree).collect(), stats))
    }
}
