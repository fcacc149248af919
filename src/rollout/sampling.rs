//! The sampling rollout: N completions of a problem's prompt from one prefill
//! (the samples fork its KV cache), each split into steps and scored by a
//! reward. The student attempts of rejection sampling, MedThink and
//! MedCritical are this rollout.

use crate::runtime::actor::{Rolled, ServedRollout};
use crate::runtime::service::{self, Generate};
use anyhow::{Result, bail};
use medzero_envs::{Problem, Provenance, Trajectory, parse_chain, verify};
use medzero_policies::SamplingParams;
use medzero_policies::tokenizer::PromptTemplate;
use medzero_rewards::{Reward, RewardError};
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
    /// Samples generated at once at most (more are generated in several
    /// batches, with the same results), bounding the cache they hold.
    pub batch_size: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            samples: 4,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 48,
            batch_size: 64,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 || self.max_new_tokens == 0 || self.batch_size == 0 {
            bail!("samples, max_new_tokens and batch_size must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }

    /// Generation settings for these samples, ending at `end_of_turn`.
    pub fn params(&self, end_of_turn: i64) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop_token_ids: vec![end_of_turn],
            ..SamplingParams::default()
        }
    }
}

pub struct Sampler<R: Reward> {
    pub cfg: SamplingConfig,
    pub template: PromptTemplate,
    pub reward: R,
}

impl<R: Reward> ServedRollout for Sampler<R> {
    fn ids(&self, problem: &Problem) -> Vec<String> {
        (0..self.cfg.samples)
            .map(|k| format!("{}/s{k:03}", problem.id))
            .collect()
    }

    fn roll<G: Generate>(
        &self,
        policy: &G,
        problem: &Problem,
        rng: &mut ChaCha8Rng,
    ) -> Result<Rolled> {
        let params = self
            .cfg
            .params(policy.tokenizer().end_of_turn_id(&self.template));
        let prompt = policy
            .tokenizer()
            .encode(&self.template.render(&problem.prompt_text()))?;
        let outs = service::sample_n_batched(
            policy,
            &prompt,
            self.cfg.samples,
            self.cfg.batch_size,
            &params,
            rng,
        )?;
        let generated_tokens = outs.iter().map(|g| g.tokens.len() as u64).sum();
        let mut reward_failures = 0;
        let mut trajectories = Vec::with_capacity(outs.len());
        for (id, g) in self.ids(problem).into_iter().zip(outs) {
            // A grader that could not judge this answer scores it 0 and is
            // counted; one that cannot answer at all stops the stage.
            let reward = match self.reward.score(problem, &g.text) {
                Ok(r) => r,
                Err(RewardError::Malformed(_)) => {
                    reward_failures += 1;
                    0.0
                }
                Err(e) => bail!("{}: scoring {id}: {e}", self.reward.name()),
            };
            trajectories.push(Trajectory {
                id,
                problem_id: problem.id.clone(),
                answer: verify::extract_answer(&g.text),
                reward,
                steps: parse_chain(&g.text),
                values: Vec::new(),
                advantages: Vec::new(),
                policy_version: 0,
                provenance: Provenance::default(),
                tokens: g.tokens,
                logprobs: g.logprobs,
                meta: serde_json::Value::Null,
            });
        }
        Ok(Rolled {
            trajectories,
            generated_tokens,
            reward_failures,
        })
    }
}
