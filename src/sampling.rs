//! The sampling rollout: N completions of a problem's prompt from one prefill
//! (the samples fork its KV cache), each split into steps and scored by a
//! reward. The student attempts of rejection sampling, MedThink and
//! MedCritical are this rollout.

use crate::runtime::actor::{Rolled, Rollout};
use anyhow::Result;
use medzero_envs::{Problem, Provenance, Trajectory, parse_chain, verify};
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, SamplingParams};
use medzero_rewards::Reward;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Completions per problem.
    pub samples: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub max_new_tokens: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            samples: 4,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 48,
        }
    }
}

pub struct Sampler<R: Reward> {
    pub cfg: SamplingConfig,
    pub template: PromptTemplate,
    pub reward: R,
}

impl<R: Reward> Rollout for Sampler<R> {
    fn ids(&self, problem: &Problem) -> Vec<String> {
        (0..self.cfg.samples)
            .map(|k| format!("{}/s{k:03}", problem.id))
            .collect()
    }

    fn rollout(&self, policy: &Policy, problem: &Problem, rng: &mut ChaCha8Rng) -> Result<Rolled> {
        let params = SamplingParams {
            max_new_tokens: self.cfg.max_new_tokens,
            temperature: self.cfg.temperature,
            top_p: self.cfg.top_p,
            top_k: self.cfg.top_k,
            stop_token_ids: vec![policy.tokenizer.end_of_turn_id(self.template)],
            ..SamplingParams::default()
        };
        let prompt = policy
            .tokenizer
            .encode(&self.template.render(&problem.prompt_text()))?;
        let outs = policy.sample_n(&prompt, self.cfg.samples, &params, rng)?;
        let generated_tokens = outs.iter().map(|g| g.tokens.len() as u64).sum();
        let trajectories = self
            .ids(problem)
            .into_iter()
            .zip(outs)
            .map(|(id, g)| {
                let steps = parse_chain(&g.text);
                Trajectory {
                    id,
                    problem_id: problem.id.clone(),
                    answer: verify::extract_answer(&g.text),
                    reward: self.reward.score(problem, &g.text),
                    steps,
                    values: Vec::new(),
                    policy_version: 0,
                    provenance: Provenance::default(),
                    tokens: g.tokens,
                    logprobs: g.logprobs,
                    meta: serde_json::Value::Null,
                }
            })
            .collect();
        Ok(Rolled {
            trajectories,
            generated_tokens,
        })
    }
}
