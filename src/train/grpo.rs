//! GRPO's policy-gradient loss (arXiv 2402.03300) and the variants TRL 1.16
//! ships as `loss_type`: `grpo` (each completion's token mean, then the mean
//! over completions), `bnpo` (the token mean over the batch), `dr_grpo`
//! (Dr. GRPO, arXiv 2503.20783: the token sum over completions times the
//! generation budget) and `dapo` (DAPO, arXiv 2503.14476: the token mean
//! over the optimizer step's batch; with one micro-batch per step, as the
//! learner takes, it equals `bnpo`, as in TRL).
//!
//! Per completion token: ρ = exp(ℓ − ℓ_old) (or, GSPO's sequence level,
//! arXiv 2507.18071, exp of the completion's mean log-ratio) and
//! loss = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·KL, where A is the
//! token's advantage (computed from its group when it was sampled,
//! [`crate::rollout::advantage`]) and ℓ_old the log-prob under the policy that
//! sampled it; without recorded log-probs, ℓ_old = stop-gradient(ℓ) (TRL's
//! on-policy step: ρ = 1 in value, ∇ℓ in gradient). Log-probs, the
//! reference's and the entropy are of the distribution at the sampling
//! temperature (logits divided by it), as TRL computes them and as the
//! actors record them, so samples at temperature 0.7 are on-policy.
//! KL is the k3 estimate exp(ℓ_ref − ℓ) − (ℓ_ref − ℓ) − 1 to a frozen
//! reference, times ρ when `use_bias_correction_kl` (TRL's default:
//! DeepSeek-V3.2's unbiased reverse-KL gradient).

use crate::runtime::learner::{Objective, ObjectiveLoss};
use crate::train::sft::{encode_prompts, logits_nll};
use anyhow::{Result, bail};
use medzero_envs::{Problem, Trajectory};
use medzero_policies::Policy;
use medzero_policies::generate::{pad_right_to, temper};
use medzero_policies::tokenizer::PromptTemplate;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::Range;
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

/// Where the importance ratio is taken (TRL's `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceLevel {
    #[default]
    Token,
    /// GSPO: one ratio per completion, exp of its mean token log-ratio.
    Sequence,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    pub loss_type: LossType,
    /// ε_low of the clipped ratio (TRL's `epsilon`).
    pub epsilon: f64,
    /// ε_high (DAPO's clip-higher; absent: `epsilon`).
    pub epsilon_high: Option<f64>,
    /// Weight of the KL term to the frozen initial model (0: no reference
    /// model is loaded, TRL's default).
    pub beta: f64,
    /// Multiply the KL term by the importance ratio (TRL's default).
    pub use_bias_correction_kl: bool,
    pub importance_sampling_level: ImportanceLevel,
    /// Leave completions cut at the generation budget out of the loss
    /// (DAPO's overlong filtering, TRL's `mask_truncated_completions`).
    pub mask_truncated_completions: bool,
    /// Train only on completions with some advantage: a group whose rewards
    /// all tie has none, and the learner's batch fills with the next
    /// completions instead (DAPO's dynamic sampling).
    pub drop_tied_groups: bool,
    /// Optimizer steps on each learner batch (TRL's `num_iterations`, μ),
    /// all against the log-probs recorded when it was sampled.
    pub num_iterations: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            loss_type: LossType::Dapo,
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.0,
            use_bias_correction_kl: true,
            importance_sampling_level: ImportanceLevel::Token,
            mask_truncated_completions: false,
            drop_tied_groups: false,
            num_iterations: 1,
        }
    }
}

impl GrpoConfig {
    pub fn validate(&self) -> Result<()> {
        validate_iterations(self.num_iterations)?;
        validate_clip(self.epsilon, self.epsilon_high, self.beta)
    }

    fn clip_range(&self) -> (f64, f64) {
        (
            1.0 - self.epsilon,
            1.0 + self.epsilon_high.unwrap_or(self.epsilon),
        )
    }
}

pub(crate) fn validate_iterations(n: usize) -> Result<()> {
    if n == 0 {
        bail!("num_iterations must be at least 1 (optimizer steps per batch), got 0");
    }
    Ok(())
}

/// The clip range and KL weight every clipped policy-gradient loss has.
pub(crate) fn validate_clip(epsilon: f64, epsilon_high: Option<f64>, beta: f64) -> Result<()> {
    for (name, v) in [
        ("epsilon", Some(epsilon)),
        ("epsilon_high", epsilon_high),
        ("beta", Some(beta)),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && v >= 0.0)
        {
            bail!("{name} must be a finite number >= 0, got {v}");
        }
    }
    if epsilon >= 1.0 {
        bail!("epsilon must be below 1 (the ratio's lower clip is 1 - epsilon), got {epsilon}");
    }
    Ok(())
}

/// One completion to train on: its prompt and completion ids, the advantage
/// of each completion token, and the sampling policy's log-prob of each
/// (empty: unknown).
pub struct Sample<'a> {
    pub prompt: &'a [i64],
    pub completion: &'a [i64],
    pub advantages: &'a [f32],
    pub old_logprobs: &'a [f32],
    /// Left out of the loss, its normaliser and the metrics (a truncated
    /// completion under `mask_truncated_completions`).
    pub masked: bool,
}

/// A batch laid out as [B, W] grids over next-token positions: ℓ under the
/// policy, ℓ_old, the completion mask and the advantages. Shared with RLOO.
pub(crate) struct Scored {
    pub ids: Tensor,
    pub mask: Tensor,
    pub logp: Tensor,
    pub old_logp: Tensor,
    /// 1 at each completion token's position.
    pub m: Tensor,
    pub adv: Tensor,
    /// The policy's entropy summed over the completion tokens `m` marks
    /// (TRL's `entropy` once divided by the batch's token count).
    pub entropy_sum: f64,
}

pub(crate) fn score(policy: &Policy, batch: &[Sample], temperature: f64) -> Result<Scored> {
    if batch.is_empty() {
        bail!("policy gradient: an empty batch");
    }
    for s in batch {
        if s.prompt.is_empty() || s.completion.is_empty() {
            bail!("policy gradient: a sample with an empty prompt or completion");
        }
        if s.advantages.len() != s.completion.len() {
            bail!(
                "policy gradient: {} advantages for {} completion tokens",
                s.advantages.len(),
                s.completion.len()
            );
        }
    }
    let device = policy.device();
    let seqs: Vec<Vec<i64>> = batch
        .iter()
        .map(|s| [s.prompt, s.completion].concat())
        .collect();
    let (ids, mask) = pad_right_to(&seqs, policy.tokenizer.pad_id(), 16);
    let (rows, width) = (batch.len() as i64, ids.size()[1] - 1);
    // Per position t (predicting token t + 1): whether it is a completion
    // token, its advantage, and ℓ_old there: the recorded log-prob where the
    // completion has them all, else sg(ℓ).
    let cells = (rows * width) as usize;
    let mut grids = [
        vec![0f32; cells],
        vec![0f32; cells],
        vec![0f32; cells],
        vec![0f32; cells],
    ];
    let [target, known, recorded, adv] = &mut grids;
    for (r, s) in batch.iter().enumerate() {
        let at = r * width as usize + s.prompt.len() - 1;
        let span = at..at + s.completion.len();
        target[span.clone()].fill(!s.masked as u8 as f32);
        adv[span.clone()].copy_from_slice(s.advantages);
        if s.old_logprobs.len() == s.completion.len() {
            known[span.clone()].fill(1.0);
            recorded[span].copy_from_slice(s.old_logprobs);
        }
    }
    let grid = |v: &[f32]| Tensor::from_slice(v).view([rows, width]).to_device(device);
    let [m, known, recorded, adv] = grids.map(|g| grid(&g));
    let (ids, mask) = (ids.to_device(device), mask.to_device(device));
    let logits = temper(&policy.logits(&ids, &mask).narrow(1, 0, width), temperature);
    let log_probs = logits.log_softmax(-1, Kind::Float);
    let labels = ids.narrow(1, 1, width);
    let logp = log_probs
        .gather(2, &labels.unsqueeze(-1), false)
        .squeeze_dim(-1);
    let entropy_sum = tch::no_grad(|| {
        let h = -(log_probs.exp() * &log_probs).sum_dim_intlist(-1, false, Kind::Float);
        (h * &m).sum(Kind::Float).double_value(&[])
    });
    let old_logp: Tensor = &known * &recorded + (1.0 - &known) * logp.detach();
    Ok(Scored {
        ids,
        mask,
        logp,
        old_logp,
        m,
        adv,
        entropy_sum,
    })
}

/// ℓ_ref of every position of `s`'s grid under the frozen `reference`, at
/// `temperature`.
pub(crate) fn reference_logp(reference: &Policy, s: &Scored, temperature: f64) -> Tensor {
    tch::no_grad(|| {
        let (ids, mask) = (
            s.ids.to_device(reference.device()),
            s.mask.to_device(reference.device()),
        );
        let logits = temper(&reference.logits(&ids, &mask), temperature);
        (-logits_nll(&logits, &ids)).to_device(s.logp.device())
    })
}

/// How the completions were sampled, as the loss needs it: the generation
/// budget (Dr. GRPO's normaliser, TRL's `max_completion_length`) and the
/// temperature whose distribution the log-probs are of (TRL's
/// `temperature`, dividing the logits of policy and reference alike).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub max_completion: usize,
    pub temperature: f64,
}

/// The loss of a batch and what TRL logs beside it.
pub struct GrpoLoss {
    pub loss: Tensor,
    pub completion_tokens: f64,
    /// Shares of completion tokens whose ratio was clipped: below 1 − ε with A < 0, above 1 + ε_high with A > 0,
    /// either (TRL's `clip_ratio/low_mean`, `high_mean`, `region_mean`).
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
    /// Mean KL estimate over completion tokens (with a reference).
    pub kl: Option<f64>,
    pub entropy: f64,
}

/// The GRPO loss of `batch`, whose completions were `sampled` so;
/// `reference` is needed when `cfg.beta` > 0.
pub fn loss(
    policy: &Policy,
    reference: Option<&Policy>,
    batch: &[Sample],
    cfg: &GrpoConfig,
    sampled: Sampled,
) -> Result<GrpoLoss> {
    shard_loss(policy, reference, batch, 0..batch.len(), cfg, sampled)
}

/// The share of [`loss`] of `batch` that `batch[shard]` carries: its terms
/// over the whole batch's normaliser (completions, completion tokens), so
/// the shards of a batch give, summed, its loss, gradient and metrics.
pub fn shard_loss(
    policy: &Policy,
    reference: Option<&Policy>,
    batch: &[Sample],
    shard: Range<usize>,
    cfg: &GrpoConfig,
    sampled: Sampled,
) -> Result<GrpoLoss> {
    let rows = batch.len() as f64;
    let trained: usize = batch
        .iter()
        .filter(|s| !s.masked)
        .map(|s| s.completion.len())
        .sum();
    let tokens = trained.max(1) as f64;
    let part = &batch[shard];
    let s = score(policy, part, sampled.temperature)?;
    let (m, adv) = (&s.m, &s.adv);
    let log_ratio = &s.logp - &s.old_logp;
    let log_w = match cfg.importance_sampling_level {
        ImportanceLevel::Token => log_ratio,
        ImportanceLevel::Sequence => {
            (log_ratio * m).sum_dim_intlist(1, true, Kind::Float)
                / m.sum_dim_intlist(1, true, Kind::Float).clamp_min(1.0)
        }
    };
    let ratio = log_w.exp();
    let (lo, hi) = cfg.clip_range();
    let clipped = ratio.clamp(lo, hi);
    let policy_term = -(&ratio * adv).minimum(&(&clipped * adv));
    // The mean over the batch's completion tokens of a per-token quantity.
    let token_mean = |x: &Tensor| (x * m).sum(Kind::Float).double_value(&[]) / tokens;
    let (per_token, kl_mean) = if cfg.beta > 0.0 {
        let Some(reference) = reference else {
            bail!("grpo: beta = {} needs a reference model", cfg.beta);
        };
        let d = reference_logp(reference, &s, sampled.temperature) - &s.logp;
        let k3 = d.exp() - &d - 1.0;
        let kl = if cfg.use_bias_correction_kl {
            k3 * &ratio
        } else {
            k3
        };
        let mean = token_mean(&kl.detach());
        (policy_term + cfg.beta * kl, Some(mean))
    } else {
        (policy_term, None)
    };
    let masked = &per_token * m;
    let loss = match cfg.loss_type {
        LossType::Grpo => {
            let per_seq = masked.sum_dim_intlist(1, false, Kind::Float)
                / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
            per_seq.sum(Kind::Float) / rows
        }
        LossType::Bnpo | LossType::Dapo => masked.sum(Kind::Float) / tokens,
        LossType::DrGrpo => masked.sum(Kind::Float) / (rows * sampled.max_completion as f64),
    };
    let ratio = ratio.detach();
    let low = ratio.lt(lo).logical_and(&adv.lt(0.0)).to_kind(Kind::Float);
    let high = ratio.gt(hi).logical_and(&adv.gt(0.0)).to_kind(Kind::Float);
    let region = low.logical_or(&high).to_kind(Kind::Float);
    let n = part.iter().map(|s| s.completion.len()).sum::<usize>() as f64;
    Ok(GrpoLoss {
        loss,
        completion_tokens: n,
        clip_low: token_mean(&low),
        clip_high: token_mean(&high),
        clip_region: token_mean(&region),
        kl: kl_mean,
        entropy: s.entropy_sum / tokens,
    })
}

/// GRPO on the trajectories of an online stage: each carries the advantages
/// its group gave it when it was sampled, its completion ids and their
/// log-probs under the sampling policy.
pub struct GrpoObjective {
    pub cfg: GrpoConfig,
    /// Encoded prompt of each problem, by problem id.
    pub prompts: HashMap<String, Vec<i64>>,
    pub sampled: Sampled,
    /// The frozen initial model of the KL term (with `beta` > 0).
    pub reference: Option<Policy>,
    /// A completion not ending with it was cut at `sampled.max_completion`.
    pub end_of_turn: i64,
}

impl GrpoObjective {
    pub fn new(
        policy: &Policy,
        problems: &[Problem],
        template: PromptTemplate,
        cfg: GrpoConfig,
        sampled: Sampled,
        reference: Option<Policy>,
    ) -> Result<GrpoObjective> {
        if cfg.beta > 0.0 && reference.is_none() {
            bail!("grpo: beta = {} needs a reference model", cfg.beta);
        }
        Ok(GrpoObjective {
            cfg,
            prompts: encode_prompts(policy, problems, &template)?,
            sampled,
            reference,
            end_of_turn: policy.tokenizer.end_of_turn_id(&template),
        })
    }
}

/// One completion per trajectory, with the advantages and old log-probs it
/// carries; `truncated_out` masks those not ending with `end_of_turn`.
pub(crate) fn samples<'a>(
    prompts: &'a HashMap<String, Vec<i64>>,
    batch: &'a [Trajectory],
    truncated_out: Option<i64>,
) -> Vec<Sample<'a>> {
    batch
        .iter()
        .map(|t| Sample {
            prompt: &prompts[&t.problem_id],
            completion: &t.tokens,
            advantages: &t.advantages,
            old_logprobs: &t.logprobs,
            masked: truncated_out.is_some_and(|eot| t.tokens.last() != Some(&eot)),
        })
        .collect()
}

/// Whether an online policy-gradient objective can train on `t`.
pub(crate) fn trainable(prompts: &HashMap<String, Vec<i64>>, t: &Trajectory) -> bool {
    !t.tokens.is_empty()
        && t.advantages.len() == t.tokens.len()
        && prompts.contains_key(&t.problem_id)
}

/// TRL's batch metrics of the completions themselves: `reward`,
/// `reward_std` (the mean over groups of the group's std) and
/// `frac_reward_zero_std`, over the groups the batch holds, and the
/// completions' `mean_length` and `clipped_ratio` (cut at the budget). Each
/// is the whole batch's value times `shard`'s part of the batch, so the
/// ranks' shares of a batch sum to it.
pub(crate) fn completion_metrics(
    batch: &[Trajectory],
    shard: &Range<usize>,
    end_of_turn: i64,
) -> Vec<(&'static str, f64)> {
    let n = batch.len() as f64;
    let part = shard.len() as f64 / n;
    let mut groups: HashMap<&str, Vec<f64>> = HashMap::new();
    for t in batch {
        groups
            .entry(t.problem_id.as_str())
            .or_default()
            .push(t.reward as f64);
    }
    let stds: Vec<f64> = groups
        .values()
        .map(|r| {
            let mean = r.iter().sum::<f64>() / r.len() as f64;
            let var =
                r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (r.len().max(2) - 1) as f64;
            var.sqrt()
        })
        .collect();
    let g = stds.len() as f64;
    [
        (
            "reward",
            batch.iter().map(|t| t.reward as f64).sum::<f64>() / n,
        ),
        ("reward_std", stds.iter().sum::<f64>() / g),
        (
            "frac_reward_zero_std",
            stds.iter().filter(|&&s| s == 0.0).count() as f64 / g,
        ),
        (
            "completions/mean_length",
            batch.iter().map(|t| t.tokens.len() as f64).sum::<f64>() / n,
        ),
        (
            "completions/clipped_ratio",
            batch
                .iter()
                .filter(|t| t.tokens.last() != Some(&end_of_turn))
                .count() as f64
                / n,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k, v * part))
    .collect()
}

impl Objective for GrpoObjective {
    fn accepts(&self, t: &Trajectory) -> bool {
        trainable(&self.prompts, t)
            && !(self.cfg.drop_tied_groups && t.advantages.iter().all(|&a| a == 0.0))
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
        let masking = self.cfg.mask_truncated_completions;
        let samples = samples(&self.prompts, batch, masking.then_some(self.end_of_turn));
        let out = shard_loss(
            policy,
            self.reference.as_ref(),
            &samples,
            shard.clone(),
            &self.cfg,
            self.sampled,
        )?;
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
            ("completion_tokens", out.completion_tokens),
        ]);
        if let Some(kl) = out.kl {
            metrics.push(("kl", kl));
        }
        Ok(ObjectiveLoss {
            loss: out.loss,
            tokens,
            metrics,
        })
    }
}
