//! Direct preference optimisation and its family, as TRL's DPOTrainer
//! computes them (REFERENCE 5): sigmoid DPO with cDPO label smoothing,
//! robust DPO, IPO, hinge, and RPO's NLL term; the reference frozen or its
//! log-probs precomputed; TR-DPO's reference sync. Sequence log-probs are
//! sums over completion tokens (IPO: means). Metrics carry TRL's names.

use crate::train::{BatchLoss, MicroLoss};
use anyhow::{Context, Result, bail};
use medzero_policies::Policy;
use medzero_policies::generate::pad_right_to;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// -log σ(β Δ), with cDPO's label smoothing ε: -(1-ε) log σ(β Δ) - ε log σ(-β Δ).
    Sigmoid,
    /// Robust DPO: (-(1-ε) log σ(β Δ) + ε log σ(-β Δ)) / (1 - 2ε).
    Robust,
    /// IPO: (Δ - 1/(2β))², on length-normalised log-probs.
    Ipo,
    /// SLiC's hinge: max(0, 1 - β Δ).
    Hinge,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    pub loss: DpoLoss,
    pub beta: f64,
    /// ε of cDPO (sigmoid) and robust DPO, in [0, 0.5).
    pub label_smoothing: f64,
    /// RPO: adds α × the chosen completions' token-mean NLL (0: off).
    pub rpo_alpha: f64,
    /// Reference log-probs computed once before training; otherwise a frozen
    /// reference model runs beside the policy on every batch.
    pub precompute_reference: bool,
    /// TR-DPO: every this many steps, ref = α·policy + (1-α)·ref (0: off;
    /// needs `precompute_reference = false`).
    pub ref_sync_every: usize,
    pub ref_sync_alpha: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            rpo_alpha: 0.0,
            precompute_reference: true,
            ref_sync_every: 0,
            ref_sync_alpha: 0.6,
        }
    }
}

impl DpoConfig {
    pub fn validate(&self) -> Result<()> {
        if self.beta.is_nan() || self.beta <= 0.0 {
            bail!("dpo.beta must be positive, got {}", self.beta);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!(
                "dpo.label_smoothing must be in [0, 0.5), got {}",
                self.label_smoothing
            );
        }
        if self.label_smoothing > 0.0 && !matches!(self.loss, DpoLoss::Sigmoid | DpoLoss::Robust) {
            bail!("dpo.label_smoothing applies to the sigmoid and robust losses only");
        }
        if self.rpo_alpha < 0.0 {
            bail!("dpo.rpo_alpha must be >= 0");
        }
        if self.ref_sync_every > 0 {
            if self.precompute_reference {
                bail!(
                    "dpo.ref_sync_every needs a live reference model: set dpo.precompute_reference = false"
                );
            }
            if !(0.0..=1.0).contains(&self.ref_sync_alpha) {
                bail!("dpo.ref_sync_alpha must be in [0, 1]");
            }
        }
        Ok(())
    }
}

/// A preference pair as text, the JSONL record of a pair file. A side the
/// student sampled also carries the token ids it sampled (`chosen_ids`,
/// `rejected_ids`, end of turn excluded): the learner trains on those, not
/// on a re-tokenisation of the text, which need not give them back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_ids: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_ids: Option<Vec<i64>>,
    /// Where the pair came from (problem, builder, who wrote the chosen side).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub meta: serde_json::Value,
}

/// A pair as token ids: the completions end with the end-of-turn token.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPair {
    pub prompt: Vec<i64>,
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
}

impl EncodedPair {
    /// `pair` tokenised; completions end with `end` and are cut so the whole
    /// sequence fits `max_len` (an empty completion is an error).
    pub fn encode(policy: &Policy, pair: &Pair, end: i64, max_len: usize) -> Result<EncodedPair> {
        let prompt = policy.tokenizer.encode(&pair.prompt)?;
        Ok(EncodedPair {
            chosen: encode_completion(
                policy,
                prompt.len(),
                &pair.chosen,
                pair.chosen_ids.as_deref(),
                end,
                max_len,
            )?,
            rejected: encode_completion(
                policy,
                prompt.len(),
                &pair.rejected,
                pair.rejected_ids.as_deref(),
                end,
                max_len,
            )?,
            prompt,
        })
    }
}

/// A completion's tokens and `end`, cut so that they fit after a
/// `prompt_len`-token prompt within `max_len`; an error when the prompt
/// leaves no room. The tokens are `ids` when the completion was sampled
/// (they must decode to `text`: a record whose text was edited is refused,
/// not trained on ids that say something else), else `text` tokenised.
pub(crate) fn encode_completion(
    policy: &Policy,
    prompt_len: usize,
    text: &str,
    ids: Option<&[i64]>,
    end: i64,
    max_len: usize,
) -> Result<Vec<i64>> {
    let mut c = match ids {
        Some(ids) => {
            let decoded = policy.tokenizer.decode(ids)?;
            if decoded != text {
                bail!(
                    "a completion's token ids decode to {decoded:?}, not to its text {text:?}; \
                     drop the ids to train on the text"
                );
            }
            ids.to_vec()
        }
        None => policy.tokenizer.encode(text)?,
    };
    c.push(end);
    c.truncate(max_len.saturating_sub(prompt_len));
    if c.is_empty() {
        bail!("the prompt alone ({prompt_len} tokens) fills max_len {max_len}");
    }
    Ok(c)
}

/// Prompt + completion rows and their completion masks, right-padded.
pub(crate) fn completion_batch(
    rows: &[(&[i64], &[i64])],
    pad: i64,
) -> (Tensor, Tensor, Tensor, Vec<f64>) {
    let ids: Vec<Vec<i64>> = rows.iter().map(|(p, c)| [*p, *c].concat()).collect();
    let marks: Vec<Vec<i64>> = rows
        .iter()
        .map(|(p, c)| [vec![0; p.len()], vec![1; c.len()]].concat())
        .collect();
    let lens = rows.iter().map(|(_, c)| c.len() as f64).collect();
    let (ids, mask) = pad_right_to(&ids, pad, 16);
    let (marks, _) = pad_right_to(&marks, 0, 16);
    (ids, mask, marks, lens)
}

/// Summed completion log-probs of each row under `policy`, and the tokens run.
pub(crate) fn row_logprobs(policy: &Policy, rows: &[(&[i64], &[i64])]) -> (Tensor, Vec<f64>, u64) {
    let (ids, mask, marks, lens) = completion_batch(rows, policy.tokenizer.pad_id());
    let tokens = mask.sum(Kind::Int64).int64_value(&[]) as u64;
    (policy.sequence_logprobs(&ids, &mask, &marks), lens, tokens)
}

/// Where the reference log-probs come from.
pub enum Reference {
    /// (chosen, rejected) summed log-probs of every pair, computed once.
    Precomputed(Vec<(f64, f64)>),
    /// A frozen model run on every batch (and synced under TR-DPO).
    Model(Box<Policy>),
}

impl Reference {
    /// Precomputes the reference log-probs of `pairs` under `reference`.
    pub fn precompute(
        reference: &Policy,
        pairs: &[EncodedPair],
        batch: usize,
    ) -> Result<Reference> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(batch.max(1)) {
            let (c, r) = tch::no_grad(|| pair_logprobs(reference, chunk));
            let c = Vec::<f64>::try_from(&c.0.to_kind(Kind::Double))?;
            let r = Vec::<f64>::try_from(&r.0.to_kind(Kind::Double))?;
            out.extend(c.into_iter().zip(r));
        }
        Ok(Reference::Precomputed(out))
    }
}

/// Summed log-probs of the chosen and rejected sides (one forward over 2B
/// rows), with completion lengths; the token count rides on the chosen side.
type Side = (Tensor, Vec<f64>, u64);
fn pair_logprobs(policy: &Policy, pairs: &[EncodedPair]) -> (Side, Side) {
    let rows: Vec<(&[i64], &[i64])> = pairs
        .iter()
        .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
        .chain(
            pairs
                .iter()
                .map(|p| (p.prompt.as_slice(), p.rejected.as_slice())),
        )
        .collect();
    let (lp, lens, tokens) = row_logprobs(policy, &rows);
    let b = pairs.len() as i64;
    (
        (lp.narrow(0, 0, b), lens[..pairs.len()].to_vec(), tokens),
        (lp.narrow(0, b, b), lens[pairs.len()..].to_vec(), 0),
    )
}

/// The DPO family as a [`BatchLoss`] over encoded pairs.
pub struct Dpo {
    pub cfg: DpoConfig,
    pub pairs: Vec<EncodedPair>,
    pub reference: Reference,
}

/// The per-pair losses from policy and reference sequence log-probs
/// (IPO's already length-normalised).
pub fn dpo_losses(
    cfg: &DpoConfig,
    policy_c: &Tensor,
    policy_r: &Tensor,
    ref_c: &Tensor,
    ref_r: &Tensor,
) -> Tensor {
    let delta = (policy_c - ref_c) - (policy_r - ref_r);
    let (beta, e) = (cfg.beta, cfg.label_smoothing);
    match cfg.loss {
        DpoLoss::Sigmoid => {
            -(&delta * beta).log_sigmoid() * (1.0 - e) - (&delta * -beta).log_sigmoid() * e
        }
        DpoLoss::Robust => {
            (-(&delta * beta).log_sigmoid() * (1.0 - e) + (&delta * -beta).log_sigmoid() * e)
                / (1.0 - 2.0 * e)
        }
        DpoLoss::Ipo => (&delta - 1.0 / (2.0 * beta)).square(),
        DpoLoss::Hinge => (-(&delta * beta) + 1.0).relu(),
    }
}

impl BatchLoss for Dpo {
    fn items(&self) -> usize {
        self.pairs.len()
    }

    fn micro_loss(
        &mut self,
        policy: &Policy,
        step: &[usize],
        micro: &[usize],
    ) -> Result<MicroLoss> {
        let pairs: Vec<EncodedPair> = micro.iter().map(|&i| self.pairs[i].clone()).collect();
        let device = policy.device();
        let ((pc, lens_c, tokens), (pr, lens_r, _)) = pair_logprobs(policy, &pairs);
        let (rc, rr) = match &self.reference {
            Reference::Precomputed(v) => {
                let c: Vec<f32> = micro.iter().map(|&i| v[i].0 as f32).collect();
                let r: Vec<f32> = micro.iter().map(|&i| v[i].1 as f32).collect();
                (
                    Tensor::from_slice(&c).to_device(device),
                    Tensor::from_slice(&r).to_device(device),
                )
            }
            Reference::Model(m) => {
                let ((c, _, _), (r, _, _)) = tch::no_grad(|| pair_logprobs(m, &pairs));
                (c.to_device(device), r.to_device(device))
            }
        };
        // The loss sees IPO's per-token means; rewards and logps stay sums,
        // as TRL logs them.
        let losses = if self.cfg.loss == DpoLoss::Ipo {
            let len = |l: &[f64]| {
                Tensor::from_slice(&l.iter().map(|&x| x.max(1.0) as f32).collect::<Vec<_>>())
                    .to_device(device)
            };
            let (lc, lr) = (len(&lens_c), len(&lens_r));
            dpo_losses(
                &self.cfg,
                &(&pc / &lc),
                &(&pr / &lr),
                &(&rc / &lc),
                &(&rr / &lr),
            )
        } else {
            dpo_losses(&self.cfg, &pc, &pr, &rc, &rr)
        };
        let beta = self.cfg.beta;
        let chosen = (pc.detach() - &rc) * beta;
        let rejected = (pr.detach() - &rr) * beta;
        let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
        let mut loss = losses.mean(Kind::Float);
        let mut metrics = vec![
            ("rewards/chosen", mean(&chosen)),
            ("rewards/rejected", mean(&rejected)),
            (
                "rewards/accuracies",
                mean(&chosen.gt_tensor(&rejected).to_kind(Kind::Float)),
            ),
            ("rewards/margins", mean(&(&chosen - &rejected))),
            ("logps/chosen", mean(&pc.detach())),
            ("logps/rejected", mean(&pr.detach())),
        ];
        if self.cfg.rpo_alpha > 0.0 {
            // TRL's NLL: a mean over every chosen completion token of the batch.
            let chosen_tokens: f64 = lens_c.iter().sum();
            let nll = -pc.sum(Kind::Float) / chosen_tokens.max(1.0);
            metrics.push(("nll_loss", nll.double_value(&[])));
            loss += nll * self.cfg.rpo_alpha;
        }
        Ok(MicroLoss {
            loss: loss * (micro.len() as f64 / step.len() as f64),
            tokens,
            metrics,
        })
    }

    fn after_step(&mut self, policy: &Policy, step: usize) -> Result<()> {
        let every = self.cfg.ref_sync_every;
        if every == 0 || !step.is_multiple_of(every) {
            return Ok(());
        }
        let Reference::Model(reference) = &self.reference else {
            return Ok(());
        };
        let alpha = self.cfg.ref_sync_alpha;
        let live = policy.named_parameters();
        tch::no_grad(|| {
            for ((name, mut r), (pname, p)) in reference.named_parameters().into_iter().zip(&live) {
                debug_assert_eq!(&name, pname);
                let mixed = p.detach() * alpha + &r * (1.0 - alpha);
                r.copy_(&mixed);
            }
        });
        Ok(())
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        if let Reference::Model(m) = &self.reference
            && self.cfg.ref_sync_every > 0
        {
            m.save(&dir.join("reference"))
                .context("saving the TR-DPO reference")?;
        }
        Ok(())
    }

    fn restore_state(&mut self, dir: &Path) -> Result<()> {
        if let Reference::Model(m) = &self.reference
            && self.cfg.ref_sync_every > 0
        {
            let path = dir.join("reference");
            medzero_policies::weights::load(
                &path,
                &m.vs.variables(),
                m.config().tie_word_embeddings,
            )
            .with_context(|| format!("loading the TR-DPO reference from {}", path.display()))?;
        }
        Ok(())
    }
}
