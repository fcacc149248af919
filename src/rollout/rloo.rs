//! RLOO's actor side (arXiv 2402.14740, as TRL 1.16's RLOOTrainer): each
//! completion's advantage is its reward against the mean of the other G − 1
//! in its group (the leave-one-out baseline), with the KL to a frozen
//! reference taken out of the reward first: r − β·Σ_t (ℓ_old − ℓ_ref), the
//! first-order estimate summed over the completion, as RLOO's paper does.
//! TRL's optional `normalize_advantages` works over the whole generation
//! batch, which an actor does not hold: the learner does it
//! ([`crate::train::rloo`]). Each completion's summed KL goes with it in
//! `meta.kl`, for the learner's `kl` metric.

use super::advantage::{Advantage, Copies};
use anyhow::{Result, bail};
use medzero_envs::{Problem, Trajectory};
use medzero_policies::Policy;
use medzero_policies::generate::pad_right;
use medzero_policies::tokenizer::PromptTemplate;
use tch::Tensor;

/// Leave-one-out advantages of one group: `rewards[i] − β·kl[i]` against
/// the mean of the others' (`kl` empty: no KL term).
pub fn advantages(rewards: &[f32], kl: &[f32], beta: f64) -> Vec<f32> {
    let g = rewards.len();
    if g < 2 {
        return vec![0.0; g];
    }
    let shaped: Vec<f64> = (0..g)
        .map(|i| rewards[i] as f64 - beta * kl.get(i).copied().unwrap_or(0.0) as f64)
        .collect();
    let total: f64 = shaped.iter().sum();
    shaped
        .iter()
        .map(|&r| (r - (total - r) / (g - 1) as f64) as f32)
        .collect()
}

/// Σ over each completion's tokens of ℓ_old − ℓ_ref: `old` holds the
/// sampling policy's log-prob of each token, `reference` scores them, both
/// at the sampling `temperature`.
pub fn sequence_kl(
    reference: &Policy,
    prompt: &[i64],
    completions: &[&[i64]],
    old: &[&[f32]],
    temperature: f64,
) -> Result<Vec<f32>> {
    let seqs: Vec<Vec<i64>> = completions.iter().map(|c| [prompt, c].concat()).collect();
    let (ids, mask) = pad_right(&seqs, reference.tokenizer.pad_id());
    let (rows, width) = (seqs.len() as i64, ids.size()[1]);
    let mut marks = vec![0f32; (rows * width) as usize];
    for (r, c) in completions.iter().enumerate() {
        let at = r * width as usize + prompt.len();
        marks[at..at + c.len()].fill(1.0);
    }
    let completion = Tensor::from_slice(&marks).view([rows, width]);
    let device = reference.device();
    let ref_logp = tch::no_grad(|| {
        reference.tempered_sequence_logprobs(
            &ids.to_device(device),
            &mask.to_device(device),
            &completion.to_device(device),
            temperature,
        )
    });
    let ref_logp = Vec::<f32>::try_from(&ref_logp.to_device(tch::Device::Cpu))?;
    Ok(old
        .iter()
        .zip(ref_logp)
        .map(|(o, r)| o.iter().sum::<f32>() - r)
        .collect())
}

/// The leave-one-out baseline as an [`Advantage`]: the completion's
/// advantage on every token.
pub struct LeaveOneOut {
    /// The KL term taken out of the reward (none: no KL).
    pub kl: Option<KlPenalty>,
    pub template: PromptTemplate,
}

/// RLOO's KL penalty: its weight, the frozen initial model, and the
/// sampling temperature both log-probs are taken at.
pub struct KlPenalty {
    pub beta: f64,
    pub references: Copies<Policy>,
    pub temperature: f64,
}

impl Advantage for LeaveOneOut {
    fn assign(&self, policy: &Policy, problem: &Problem, group: &mut [Trajectory]) -> Result<()> {
        let rewards: Vec<f32> = group.iter().map(|t| t.reward).collect();
        let (kl, beta) = if let Some(penalty) = &self.kl {
            if let Some(t) = group.iter().find(|t| t.logprobs.len() != t.tokens.len()) {
                bail!(
                    "rloo: {} carries no sampling log-probs for its KL term",
                    t.id
                );
            }
            let prompt = policy
                .tokenizer
                .encode(&self.template.render(&problem.prompt_text()))?;
            let reference = penalty.references.get()?;
            let completions: Vec<&[i64]> = group.iter().map(|t| t.tokens.as_slice()).collect();
            let old: Vec<&[f32]> = group.iter().map(|t| t.logprobs.as_slice()).collect();
            let kl = sequence_kl(&reference, &prompt, &completions, &old, penalty.temperature)?;
            (kl, penalty.beta)
        } else {
            (Vec::new(), 0.0)
        };
        for (i, (t, a)) in group
            .iter_mut()
            .zip(advantages(&rewards, &kl, beta))
            .enumerate()
        {
            t.advantages = vec![a; t.tokens.len()];
            if let Some(&k) = kl.get(i) {
                t.meta = serde_json::json!({ "kl": k });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_leaves_each_completion_out() {
        // Group 1, 0, 0, 1: each against the mean of the other three.
        let a = advantages(&[1.0, 0.0, 0.0, 1.0], &[], 0.0);
        let want = [1.0 - 1.0 / 3.0, -2.0 / 3.0, -2.0 / 3.0, 1.0 - 1.0 / 3.0];
        for (x, w) in a.iter().zip(want) {
            assert!((*x as f64 - w).abs() < 1e-6);
        }
        // The KL comes out of the reward first.
        let a = advantages(&[1.0, 1.0], &[2.0, 0.0], 0.5);
        assert_eq!(a, vec![-1.0, 1.0]);
    }
}
