//! KTO (Ethayarajh et al.), as TRL's KTOTrainer computes it: unpaired
//! desirable and undesirable completions, each judged against a batch
//! estimate of KL(policy || reference) taken on mismatched prompt/completion
//! pairs. The alignment stage of the Med-Shicheng curriculum.

use crate::train::dpo::row_logprobs;
use crate::train::{BatchLoss, MicroLoss};
use anyhow::{Context, Result, bail};
use medzero_policies::Policy;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtoConfig {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

impl KtoConfig {
    pub fn validate(&self) -> Result<()> {
        if self.beta.is_nan()
            || self.beta <= 0.0
            || self.desirable_weight < 0.0
            || self.undesirable_weight < 0.0
        {
            bail!("kto: beta must be positive and the weights non-negative");
        }
        Ok(())
    }
}

/// One unpaired example as text, the JSONL record of a KTO data file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KtoExample {
    pub prompt: String,
    pub completion: String,
    /// The token ids sampled, when the student wrote it (see `Pair`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_ids: Option<Vec<i64>>,
    pub desirable: bool,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub meta: serde_json::Value,
}

/// An example as token ids, with the mismatched completion its KL term uses.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedKto {
    pub prompt: Vec<i64>,
    pub completion: Vec<i64>,
    pub desirable: bool,
    pub kl_completion: Vec<i64>,
}

/// Tokenises `examples` (completions end with `end`, cut to fit `max_len`)
/// and pairs each prompt with the completion of the example before it in
/// its group of `batch` (TRL's KL data set: completions rotated by one
/// within each preprocessing batch).
pub fn encode(
    policy: &Policy,
    examples: &[KtoExample],
    end: i64,
    max_len: usize,
    batch: usize,
) -> Result<Vec<EncodedKto>> {
    let mut out: Vec<EncodedKto> = Vec::with_capacity(examples.len());
    for e in examples {
        let prompt = policy.tokenizer.encode(&e.prompt)?;
        let completion = crate::train::dpo::encode_completion(
            policy,
            prompt.len(),
            &e.completion,
            e.completion_ids.as_deref(),
            end,
            max_len,
        )
        .context("kto")?;
        out.push(EncodedKto {
            prompt,
            completion,
            desirable: e.desirable,
            kl_completion: Vec::new(),
        });
    }
    rotate_kl(&mut out, batch);
    Ok(out)
}

/// Gives each example the completion of its predecessor within groups of
/// `batch` (the first takes the group's last).
pub fn rotate_kl(examples: &mut [EncodedKto], batch: usize) {
    for group in examples.chunks_mut(batch.max(1)) {
        let completions: Vec<Vec<i64>> = group.iter().map(|e| e.completion.clone()).collect();
        let n = group.len();
        for (k, e) in group.iter_mut().enumerate() {
            e.kl_completion = completions[(k + n - 1) % n].clone();
        }
    }
}

/// KTO as a [`BatchLoss`]; the reference is a frozen model.
pub struct Kto {
    pub cfg: KtoConfig,
    pub examples: Vec<EncodedKto>,
    pub reference: Policy,
}

impl BatchLoss for Kto {
    fn items(&self) -> usize {
        self.examples.len()
    }

    fn micro_loss(
        &mut self,
        policy: &Policy,
        step: &[usize],
        micro: &[usize],
    ) -> Result<MicroLoss> {
        let ex: Vec<&EncodedKto> = micro.iter().map(|&i| &self.examples[i]).collect();
        let rows: Vec<(&[i64], &[i64])> = ex
            .iter()
            .map(|e| (e.prompt.as_slice(), e.completion.as_slice()))
            .collect();
        let kl_rows: Vec<(&[i64], &[i64])> = ex
            .iter()
            .map(|e| (e.prompt.as_slice(), e.kl_completion.as_slice()))
            .collect();
        let device = policy.device();
        let (logps, _, tokens) = row_logprobs(policy, &rows);
        let (ref_logps, kl) = tch::no_grad(|| {
            let (policy_kl, _, _) = row_logprobs(policy, &kl_rows);
            let (ref_kl, _, _) = row_logprobs(&self.reference, &kl_rows);
            let (ref_logps, _, _) = row_logprobs(&self.reference, &rows);
            let kl = (policy_kl - ref_kl.to_device(device))
                .mean(Kind::Float)
                .clamp_min(0.0);
            (ref_logps.to_device(device), kl)
        });
        let desirable: Vec<bool> = ex.iter().map(|e| e.desirable).collect();
        let mask = Tensor::from_slice(&desirable).to_device(device);
        let ratio = &logps - &ref_logps;
        let beta = self.cfg.beta;
        let chosen_losses: Tensor = -((&ratio - &kl) * beta).sigmoid() + 1.0;
        let rejected_losses: Tensor = -((&kl - &ratio) * beta).sigmoid() + 1.0;
        let losses = chosen_losses.where_self(&mask, &rejected_losses);
        let weights = Tensor::from_slice(
            &desirable
                .iter()
                .map(|&d| {
                    if d {
                        self.cfg.desirable_weight
                    } else {
                        self.cfg.undesirable_weight
                    }
                } as f32)
                .collect::<Vec<_>>(),
        )
        .to_device(device);
        let loss = (losses * weights).mean(Kind::Float);
        let rewards = ratio.detach() * beta;
        let mean_where = |t: &Tensor, want: bool| {
            let picked: Vec<f64> = Vec::<f64>::try_from(&t.to_kind(Kind::Double))
                .unwrap_or_default()
                .into_iter()
                .zip(&desirable)
                .filter(|(_, d)| **d == want)
                .map(|(v, _)| v)
                .collect();
            picked.iter().sum::<f64>() / picked.len().max(1) as f64
        };
        let metrics = vec![
            ("kl", kl.double_value(&[])),
            ("rewards/chosen", mean_where(&rewards, true)),
            ("rewards/rejected", mean_where(&rewards, false)),
            ("logps/chosen", mean_where(&logps.detach(), true)),
            ("logps/rejected", mean_where(&logps.detach(), false)),
        ];
        Ok(MicroLoss {
            loss: loss * (micro.len() as f64 / step.len() as f64),
            tokens,
            metrics,
        })
    }
}
