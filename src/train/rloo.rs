//! RLOO's loss (arXiv 2402.14740, as TRL 1.16's RLOOTrainer): one ratio per
//! completion, ρ = exp(Σ_t ℓ − Σ_t ℓ_old) over its tokens, and
//! loss = mean over completions of −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A),
//! A the completion's leave-one-out advantage (with the KL already in the
//! reward, [`crate::rollout::rloo`]). ℓ_old as in GRPO: the actors' recorded
//! log-probs, else stop-gradient(ℓ). With `normalize_advantages` the
//! advantages are standardised over the learner's batch, which plays TRL's
//! generation batch (TRL takes one optimizer step per generation batch by
//! default, as the learner takes one per batch).

use crate::rollout::advantage::{ScaleRewards, normalise};
use crate::runtime::learner::{Objective, ObjectiveLoss};
use crate::train::grpo::{
    Sample, completion_metrics, samples, score, trainable, validate_clip, validate_iterations,
};
use crate::train::sft::encode_prompts;
use anyhow::Result;
use medzero_envs::{Problem, Trajectory};
use medzero_policies::Policy;
use medzero_policies::tokenizer::PromptTemplate;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::Range;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlooConfig {
    /// ε_low of the clipped ratio (TRL's `epsilon`).
    pub epsilon: f64,
    /// ε_high (absent: `epsilon`).
    pub epsilon_high: Option<f64>,
    /// Weight of the KL to the frozen initial model in the reward (TRL's
    /// default 0.05; 0: no reference model is loaded).
    pub beta: f64,
    /// Optimizer steps on each learner batch (TRL's `num_iterations`).
    pub num_iterations: usize,
    /// Standardise the advantages over the batch: (A − mean) / (std + 1e-4),
    /// std with Bessel's correction (TRL's default: off).
    pub normalize_advantages: bool,
}

impl Default for RlooConfig {
    fn default() -> Self {
        RlooConfig {
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.05,
            num_iterations: 1,
            normalize_advantages: false,
        }
    }
}

impl RlooConfig {
    pub fn validate(&self) -> Result<()> {
        validate_iterations(self.num_iterations)?;
        validate_clip(self.epsilon, self.epsilon_high, self.beta)
    }
}

/// The loss of a batch and what TRL logs beside it.
pub struct RlooLoss {
    pub loss: Tensor,
    /// Shares of completions whose ratio was clipped (TRL's
    /// `clip_ratio/low_mean`, `high_mean`, `region_mean`).
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
    pub entropy: f64,
}

/// The RLOO loss of `batch`, whose log-probs are of the distribution at
/// `temperature` (TRL's `temperature`, as in GRPO).
pub fn loss(
    policy: &Policy,
    batch: &[Sample],
    cfg: &RlooConfig,
    temperature: f64,
) -> Result<RlooLoss> {
    shard_loss(policy, batch, 0..batch.len(), cfg, temperature)
}

/// The share of [`loss`] of `batch` that `batch[shard]` carries: its terms
/// over the whole batch's completions and tokens, so the shards of a batch
/// give, summed, its loss, gradient and metrics.
pub fn shard_loss(
    policy: &Policy,
    batch: &[Sample],
    shard: Range<usize>,
    cfg: &RlooConfig,
    temperature: f64,
) -> Result<RlooLoss> {
    let rows = batch.len() as f64;
    let tokens = batch
        .iter()
        .map(|s| s.completion.len())
        .sum::<usize>()
        .max(1) as f64;
    let s = score(policy, &batch[shard], temperature)?;
    let seq = |x: &Tensor| (x * &s.m).sum_dim_intlist(1, false, Kind::Float);
    let ratio = (seq(&s.logp) - seq(&s.old_logp)).exp();
    // The completion's advantage: its tokens share it.
    let adv = seq(&s.adv) / s.m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
    let (lo, hi) = (
        1.0 - cfg.epsilon,
        1.0 + cfg.epsilon_high.unwrap_or(cfg.epsilon),
    );
    let clipped = ratio.clamp(lo, hi);
    let loss = (-(&ratio * &adv).minimum(&(&clipped * &adv))).sum(Kind::Float) / rows;
    let ratio = ratio.detach();
    let share = |x: &Tensor| x.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]) / rows;
    let low = ratio.lt(lo).logical_and(&adv.lt(0.0));
    let high = ratio.gt(hi).logical_and(&adv.gt(0.0));
    Ok(RlooLoss {
        loss,
        clip_low: share(&low),
        clip_high: share(&high),
        clip_region: share(&low.logical_or(&high)),
        entropy: s.entropy_sum / tokens,
    })
}

/// RLOO on the trajectories of an online stage, each carrying its
/// leave-one-out advantage.
pub struct RlooObjective {
    pub cfg: RlooConfig,
    pub prompts: HashMap<String, Vec<i64>>,
    pub end_of_turn: i64,
    /// The sampling temperature, whose distribution the log-probs are of.
    pub temperature: f64,
}

impl RlooObjective {
    pub fn new(
        policy: &Policy,
        problems: &[Problem],
        template: PromptTemplate,
        cfg: RlooConfig,
        temperature: f64,
    ) -> Result<RlooObjective> {
        Ok(RlooObjective {
            cfg,
            prompts: encode_prompts(policy, problems, &template)?,
            end_of_turn: policy.tokenizer.end_of_turn_id(&template),
            temperature,
        })
    }
}

impl Objective for RlooObjective {
    fn accepts(&self, t: &Trajectory) -> bool {
        trainable(&self.prompts, t)
    }

    fn iterations(&self) -> usize {
        self.cfg.num_iterations
    }

    fn loss(
        &mut self,
        policy: &Policy,
        batch: &[Trajectory],
        shard: Range<usize>,
    ) -> Result<ObjectiveLoss> {
        let mut samples = samples(&self.prompts, batch, None);
        // A completion's tokens share its advantage.
        let standardised: Vec<Vec<f32>> = if self.cfg.normalize_advantages {
            let adv: Vec<f32> = batch.iter().map(|t| t.advantages[0]).collect();
            batch
                .iter()
                .zip(normalise(&adv, ScaleRewards::Group))
                .map(|(t, a)| vec![a; t.tokens.len()])
                .collect()
        } else {
            Vec::new()
        };
        for (s, a) in samples.iter_mut().zip(&standardised) {
            s.advantages = a;
        }
        let out = shard_loss(policy, &samples, shard.clone(), &self.cfg, self.temperature)?;
        let tokens = samples[shard.clone()]
            .iter()
            .map(|s| (s.prompt.len() + s.completion.len()) as u64)
            .sum();
        let mut metrics = completion_metrics(batch, &shard, self.end_of_turn);
        metrics.extend([
            ("clip_ratio/low_mean", out.clip_low),
            ("clip_ratio/high_mean", out.clip_high),
            ("clip_ratio/region_mean", out.clip_region),
            ("entropy", out.entropy),
        ]);
        // TRL's `kl`: Σ(ℓ_old − ℓ_ref) over the batch's completion tokens.
        let kls: Option<Vec<f64>> = batch.iter().map(|t| t.meta["kl"].as_f64()).collect();
        if let Some(kls) = kls {
            let n: usize = batch.iter().map(|t| t.tokens.len()).sum();
            let mine: f64 = kls[shard].iter().sum();
            metrics.push(("kl", mine / n.max(1) as f64));
        }
        Ok(ObjectiveLoss {
            loss: out.loss,
            tokens,
            metrics,
        })
    }
}
