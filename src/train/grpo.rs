//! GRPO's policy-gradient loss (arXiv 2402.03300) and the variants TRL 1.16
//! ships as `loss_type`: `grpo` (each completion's token mean, then the mean
//! over completions), `bnpo` (the token mean over the batch), `dr_grpo`
//! (Dr. GRPO, arXiv 2503.20783: the token sum over completions times the
//! generation budget) and `dapo` (DAPO, arXiv 2503.14476: the token mean
//! over the optimizer step's batch; with one micro-batch per step, as the
//! learner takes, it equals `bnpo`, as in TRL).
//!
//! Per completion token: ρ = exp(ℓ − ℓ_old) and
//! loss = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), where A is the
//! completion's advantage (computed from its group when it was sampled,
//! [`crate::rollout::grpo`]) and ℓ_old the log-prob under the policy that
//! sampled it; without recorded log-probs, ℓ_old = stop-gradient(ℓ) (TRL's
//! on-policy step: ρ = 1 in value, ∇ℓ in gradient). Log-probs are of the
//! model's own distribution (temperature 1), those the actors record.
//! TRL's KL term is not built (its default `beta` is 0).

use crate::runtime::learner::{Objective, ObjectiveLoss};
use crate::train::sft::{encode_prompts, token_nll};
use anyhow::{Result, bail};
use medzero_envs::{Problem, Trajectory};
use medzero_policies::Policy;
use medzero_policies::generate::pad_right_to;
use medzero_policies::tokenizer::PromptTemplate;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    Grpo,
    Bnpo,
    DrGrpo,
    /// TRL's default.
    #[default]
    Dapo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    pub loss_type: LossType,
    /// ε_low of the clipped ratio (TRL's `epsilon`).
    pub epsilon: f64,
    /// ε_high (DAPO's clip-higher; absent: `epsilon`).
    pub epsilon_high: Option<f64>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            loss_type: LossType::Dapo,
            epsilon: 0.2,
            epsilon_high: None,
        }
    }
}

impl GrpoConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("epsilon", Some(self.epsilon)),
            ("epsilon_high", self.epsilon_high),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                bail!("{name} must be a finite number >= 0, got {v}");
            }
        }
        if self.epsilon >= 1.0 {
            bail!(
                "epsilon must be below 1 (the ratio's lower clip is 1 - epsilon), got {}",
                self.epsilon
            );
        }
        Ok(())
    }
}

/// One completion to train on: its prompt and completion ids, advantage and
/// the sampling policy's log-prob of each completion token (empty: unknown).
pub struct Sample<'a> {
    pub prompt: &'a [i64],
    pub completion: &'a [i64],
    pub advantage: f32,
    pub old_logprobs: &'a [f32],
}

/// The loss of a batch and what TRL logs beside it.
pub struct GrpoLoss {
    pub loss: Tensor,
    pub completion_tokens: f64,
    /// Share of completion tokens whose ratio was clipped (TRL's
    /// `clip_ratio/region_mean`).
    pub clip_fraction: f64,
}

/// The GRPO loss of `batch`; `max_completion` is Dr. GRPO's normaliser (the
/// generation budget, TRL's `max_completion_length`).
pub fn loss(
    policy: &Policy,
    batch: &[Sample],
    cfg: &GrpoConfig,
    max_completion: usize,
) -> Result<GrpoLoss> {
    if batch.is_empty() {
        bail!("grpo: an empty batch");
    }
    let device = policy.device();
    for s in batch {
        if s.prompt.is_empty() || s.completion.is_empty() {
            bail!("grpo: a sample with an empty prompt or completion");
        }
    }
    let seqs: Vec<Vec<i64>> = batch
        .iter()
        .map(|s| [s.prompt, s.completion].concat())
        .collect();
    let (ids, mask) = pad_right_to(&seqs, policy.tokenizer.pad_id(), 16);
    let (rows, width) = (batch.len() as i64, ids.size()[1] - 1);
    // Per position t (predicting token t + 1): whether it is a completion
    // token, and ℓ_old there: the recorded log-prob where the completion has
    // them all, else sg(ℓ).
    let cells = (rows * width) as usize;
    let (mut target, mut known, mut recorded) =
        (vec![0f32; cells], vec![0f32; cells], vec![0f32; cells]);
    for (r, s) in batch.iter().enumerate() {
        let at = r * width as usize + s.prompt.len() - 1;
        let span = at..at + s.completion.len();
        target[span.clone()].fill(1.0);
        if s.old_logprobs.len() == s.completion.len() {
            known[span.clone()].fill(1.0);
            recorded[span].copy_from_slice(s.old_logprobs);
        }
    }
    let grid = |v: &[f32]| Tensor::from_slice(v).view([rows, width]).to_device(device);
    let (m, known, recorded) = (grid(&target), grid(&known), grid(&recorded));
    let logp = -token_nll(policy, &ids.to_device(device), &mask.to_device(device));
    let old_logp: Tensor = &known * &recorded + (1.0 - &known) * logp.detach();
    let ratio = (&logp - &old_logp).exp();
    let adv: Vec<f32> = batch.iter().map(|s| s.advantage).collect();
    let adv = Tensor::from_slice(&adv).view([rows, 1]).to_device(device);
    let (lo, hi) = (
        1.0 - cfg.epsilon,
        1.0 + cfg.epsilon_high.unwrap_or(cfg.epsilon),
    );
    let clipped = ratio.clamp(lo, hi);
    let per_token = -(&ratio * &adv).minimum(&(&clipped * &adv));
    let masked = &per_token * &m;
    let tokens = m.sum(Kind::Float);
    let loss = match cfg.loss_type {
        LossType::Grpo => {
            let per_seq = masked.sum_dim_intlist(1, false, Kind::Float)
                / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
            per_seq.mean(Kind::Float)
        }
        LossType::Bnpo | LossType::Dapo => masked.sum(Kind::Float) / tokens.clamp_min(1.0),
        LossType::DrGrpo => masked.sum(Kind::Float) / (rows as f64 * max_completion as f64),
    };
    let n = batch.iter().map(|s| s.completion.len()).sum::<usize>() as f64;
    let ratio = ratio.detach();
    let out_of_range = (ratio.lt(lo).logical_or(&ratio.gt(hi)).to_kind(Kind::Float) * &m)
        .sum(Kind::Float)
        .double_value(&[]);
    Ok(GrpoLoss {
        loss,
        completion_tokens: n,
        clip_fraction: out_of_range / n.max(1.0),
    })
}

/// GRPO on the trajectories of an online stage: each carries the advantage
/// its group gave it when it was sampled, its completion ids and their
/// log-probs under the sampling policy.
pub struct GrpoObjective {
    pub cfg: GrpoConfig,
    /// Encoded prompt of each problem, by problem id.
    pub prompts: HashMap<String, Vec<i64>>,
    pub max_completion: usize,
}

impl GrpoObjective {
    pub fn new(
        policy: &Policy,
        problems: &[Problem],
        template: PromptTemplate,
        cfg: GrpoConfig,
        max_completion: usize,
    ) -> Result<GrpoObjective> {
        Ok(GrpoObjective {
            cfg,
            prompts: encode_prompts(policy, problems, template)?,
            max_completion,
        })
    }
}

impl Objective for GrpoObjective {
    fn accepts(&self, t: &Trajectory) -> bool {
        t.advantage.is_some() && !t.tokens.is_empty() && self.prompts.contains_key(&t.problem_id)
    }

    fn loss(&mut self, policy: &Policy, batch: &[Trajectory]) -> Result<ObjectiveLoss> {
        let samples: Vec<Sample> = batch
            .iter()
            .map(|t| Sample {
                prompt: &self.prompts[&t.problem_id],
                completion: &t.tokens,
                advantage: t.advantage.unwrap_or(0.0),
                old_logprobs: &t.logprobs,
            })
            .collect();
        let out = loss(policy, &samples, &self.cfg, self.max_completion)?;
        let n = batch.len() as f64;
        let reward = batch.iter().map(|t| t.reward as f64).sum::<f64>() / n;
        let abs_adv = samples
            .iter()
            .map(|s| s.advantage.abs() as f64)
            .sum::<f64>()
            / n;
        let tokens = samples
            .iter()
            .map(|s| (s.prompt.len() + s.completion.len()) as u64)
            .sum();
        Ok(ObjectiveLoss {
            loss: out.loss,
            tokens,
            metrics: vec![
                ("reward_mean", reward),
                ("advantage_abs_mean", abs_adv),
                ("clip_fraction", out.clip_fraction),
                ("completion_tokens", out.completion_tokens),
            ],
        })
    }
}
