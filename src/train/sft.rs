//! Supervised fine-tuning: next-token cross-entropy on completion tokens only
//! (the prompt is context, not target), AdamW with decoupled weight decay,
//! warmup + schedule, gradient clipping and accumulation, and checkpoints that
//! resume bit-identically on CPU. Pretraining on a corpus is the same loop
//! with empty prompts.

use crate::train::{BatchLoss, MicroLoss, TrainConfig, TrainReport, TrainRun};
use anyhow::{Result, bail};
use medzero_policies::Policy;
use medzero_policies::generate::{pad_right_to, temper, tempers};
use medzero_policies::tokenizer::PromptTemplate;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// One training sequence: `completion` is learned, `prompt` is context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub completion: String,
    /// Byte ranges of `completion` that stay context, not targets (e.g.
    /// MedS3 steps whose value dropped); sorted, disjoint, on char
    /// boundaries. Each piece is tokenized on its own, so ranges should
    /// start and end at word boundaries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub untrained: Vec<std::ops::Range<usize>>,
}

impl Example {
    /// `completion` cut at the `untrained` ranges: (text, learned) pieces.
    fn pieces(&self) -> Result<Vec<(&str, bool)>> {
        let c = &self.completion;
        let mut out = Vec::new();
        let mut at = 0;
        for r in &self.untrained {
            if r.start < at
                || r.end < r.start
                || r.end > c.len()
                || !c.is_char_boundary(r.start)
                || !c.is_char_boundary(r.end)
            {
                bail!(
                    "untrained range {r:?} is not sorted, disjoint and on char boundaries of a {}-byte completion",
                    c.len()
                );
            }
            out.push((&c[at..r.start], true));
            out.push((&c[r.clone()], false));
            at = r.end;
        }
        out.push((&c[at..], true));
        out.retain(|(t, _)| !t.is_empty());
        Ok(out)
    }
}

/// Tokens of an example and which of them are targets.
struct Encoded {
    ids: Vec<i64>,
    targets: Vec<i64>,
}

fn encode(policy: &Policy, e: &Example, end: i64, max_len: usize) -> Result<Encoded> {
    let tok = &policy.tokenizer;
    let mut ids = tok.encode(&e.prompt)?;
    let mut targets = vec![0; ids.len()];
    if e.untrained.is_empty() {
        let completion = tok.encode(&e.completion)?;
        targets.extend(std::iter::repeat_n(1, completion.len()));
        ids.extend(completion);
    } else {
        for (text, learned) in e.pieces()? {
            let piece = tok.encode(text)?;
            targets.extend(std::iter::repeat_n(learned as i64, piece.len()));
            ids.extend(piece);
        }
    }
    ids.push(end);
    targets.push(1);
    // An unknown word is context at most: a model taught to write <unk>
    // would write text that is lost on decoding.
    if let Some(unk) = tok.token_id("<unk>") {
        for (id, t) in ids.iter().zip(targets.iter_mut()) {
            if *id == unk {
                *t = 0;
            }
        }
    }
    ids.truncate(max_len);
    targets.truncate(max_len);
    Ok(Encoded { ids, targets })
}

/// SFT as a [`BatchLoss`]: every micro-batch normalised by the step's target
/// tokens, so accumulation equals one big batch.
struct SftLoss {
    encoded: Vec<Encoded>,
    pad: i64,
}

impl BatchLoss for SftLoss {
    fn items(&self) -> usize {
        self.encoded.len()
    }

    fn micro_loss(
        &mut self,
        policy: &Policy,
        step: &[usize],
        micro: &[usize],
    ) -> Result<MicroLoss> {
        let targets: i64 = step
            .iter()
            .map(|&i| self.encoded[i].targets[1..].iter().sum::<i64>())
            .sum::<i64>()
            .max(1);
        let ids: Vec<Vec<i64>> = micro.iter().map(|&i| self.encoded[i].ids.clone()).collect();
        let tgt: Vec<Vec<i64>> = micro
            .iter()
            .map(|&i| self.encoded[i].targets.clone())
            .collect();
        let (ids, mask) = pad_right_to(&ids, self.pad, 16);
        let (tgt, _) = pad_right_to(&tgt, 0, 16);
        let tokens = Vec::<i64>::try_from(&mask.sum(Kind::Int64).view([1]))?[0] as u64;
        Ok(MicroLoss {
            loss: completion_nll_sum(policy, &ids, &mask, &tgt) / targets as f64,
            tokens,
            metrics: Vec::new(),
        })
    }
}

/// Trains `policy` on `data` (see [`crate::train::train`]); completions end
/// with `template`'s end of turn.
pub fn train(
    policy: &Policy,
    data: &[Example],
    cfg: &TrainConfig,
    template: PromptTemplate,
    run: TrainRun,
) -> Result<TrainReport> {
    let end = policy.tokenizer.end_of_turn_id(&template);
    let encoded: Vec<Encoded> = data
        .iter()
        .map(|e| encode(policy, e, end, cfg.max_len))
        .collect::<Result<_>>()?;
    let mut loss = SftLoss {
        encoded,
        pad: policy.tokenizer.pad_id(),
    };
    crate::train::train(policy, &mut loss, cfg, run)
}

/// Sum over target tokens of -log p(token | prefix); `targets` marks the
/// tokens to predict (their predictions come from the position before).
pub fn completion_nll_sum(
    policy: &Policy,
    ids: &Tensor,
    mask: &Tensor,
    targets: &Tensor,
) -> Tensor {
    let nll = token_nll(policy, ids, mask);
    (nll * shifted_targets(targets, ids.device())).sum(Kind::Float)
}

/// -log p(ids[:, t+1] | ids[:, ..=t]) for every position: [B, T-1].
pub fn token_nll(policy: &Policy, ids: &Tensor, mask: &Tensor) -> Tensor {
    logits_nll(&policy.logits(ids, mask), ids)
}

/// [`token_nll`] from the logits [B, T, V] of `ids`.
pub(crate) fn logits_nll(logits: &Tensor, ids: &Tensor) -> Tensor {
    let t = ids.size()[1];
    let logp = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
    let labels = ids.narrow(1, 1, t - 1).to_device(logp.device());
    -logp.gather(2, &labels.unsqueeze(-1), false).squeeze_dim(-1)
}

/// The target marks aligned with [`token_nll`]'s positions, as f32 on `device`.
fn shifted_targets(targets: &Tensor, device: tch::Device) -> Tensor {
    let t = targets.size()[1];
    targets
        .narrow(1, 1, t - 1)
        .to_device(device)
        .to_kind(Kind::Float)
}

/// SFT on trajectories an online stage produced: the completion tokens the
/// actor generated, after the problem's prompt, for trajectories whose reward
/// reaches `min_reward` (rejection sampling). A trajectory without tokens
/// (written by another tool) is trained on its steps' text, tokenised and
/// ended with the template's end of turn. With `importance_clip` > 0 each
/// token's loss is weighted by the truncated ratio
/// min(p_learner / p_actor, importance_clip), which corrects for the policy
/// lag of asynchronous actors (IMPALA's truncated importance sampling);
/// both probabilities are of the distribution at the sampling temperature,
/// the one the actors record.
pub struct TrajectorySft {
    /// Encoded prompt of each problem, by problem id.
    pub prompts: std::collections::HashMap<String, Vec<i64>>,
    pub min_reward: f32,
    pub importance_clip: f64,
    pub max_len: usize,
    pub template: PromptTemplate,
    pub temperature: f64,
}

impl TrajectorySft {
    /// The objective over `problems`, their prompts rendered by `template`.
    pub fn new(
        policy: &Policy,
        problems: &[medzero_envs::Problem],
        template: PromptTemplate,
        min_reward: f32,
        importance_clip: f64,
        max_len: usize,
        temperature: f64,
    ) -> Result<TrajectorySft> {
        Ok(TrajectorySft {
            prompts: encode_prompts(policy, problems, &template)?,
            min_reward,
            importance_clip,
            max_len,
            template,
            temperature,
        })
    }
}

/// Each problem's prompt, rendered by `template` and encoded, by problem id:
/// what an online objective puts before a trajectory's completion.
pub fn encode_prompts(
    policy: &Policy,
    problems: &[medzero_envs::Problem],
    template: &PromptTemplate,
) -> Result<std::collections::HashMap<String, Vec<i64>>> {
    problems
        .iter()
        .map(|p| {
            let ids = policy
                .tokenizer
                .encode(&template.render(&p.prompt_text()))?;
            Ok((p.id.clone(), ids))
        })
        .collect()
}

impl crate::runtime::learner::Objective for TrajectorySft {
    fn accepts(&self, t: &medzero_envs::Trajectory) -> bool {
        t.reward >= self.min_reward
            && (!t.tokens.is_empty() || !t.steps.is_empty())
            && self.prompts.contains_key(&t.problem_id)
    }

    fn loss(
        &mut self,
        policy: &Policy,
        batch: &[medzero_envs::Trajectory],
        shard: std::ops::Range<usize>,
    ) -> Result<crate::runtime::learner::ObjectiveLoss> {
        let mut ids = Vec::with_capacity(batch.len());
        let mut targets = Vec::with_capacity(batch.len());
        let mut behaviour = Vec::with_capacity(batch.len());
        let end = policy.tokenizer.end_of_turn_id(&self.template);
        // The whole batch's target count normalises every shard's loss.
        let mut whole_targets = 0i64;
        for (k, t) in batch.iter().enumerate() {
            let prompt = &self.prompts[&t.problem_id];
            let completion = if t.tokens.is_empty() {
                let mut c = policy
                    .tokenizer
                    .encode(&medzero_envs::render_chain(&t.steps))?;
                c.push(end);
                c
            } else {
                t.tokens.clone()
            };
            let mut seq: Vec<i64> = prompt.iter().chain(&completion).copied().collect();
            let mut tgt: Vec<i64> = std::iter::repeat_n(0, prompt.len())
                .chain(std::iter::repeat_n(1, completion.len()))
                .collect();
            seq.truncate(self.max_len);
            tgt.truncate(self.max_len);
            // As `shifted_targets` counts them: every target but the first token.
            whole_targets += tgt.iter().skip(1).sum::<i64>();
            if !shard.contains(&k) {
                continue;
            }
            // Behaviour log-probs aligned with token_nll (the entry before
            // each token), and whether they are known: outside data has none,
            // and its ratio is taken as 1.
            let mut beh = vec![(0.0f32, 0.0f32); prompt.len() + completion.len()];
            if t.logprobs.len() == completion.len() && !prompt.is_empty() {
                for (k, &lp) in t.logprobs.iter().enumerate() {
                    beh[prompt.len() - 1 + k] = (lp, 1.0);
                }
            }
            ids.push(seq);
            targets.push(tgt);
            behaviour.push(beh);
        }
        let n_targets = whole_targets.max(1) as f64;
        let (ids, mask) = pad_right_to(&ids, policy.tokenizer.pad_id(), 16);
        let (targets, _) = pad_right_to(&targets, 0, 16);
        let device = policy.device();
        let (rows, width) = (shard.len() as i64, ids.size()[1]);
        let column = |pick: fn(&(f32, f32)) -> f32| {
            let flat: Vec<f32> = behaviour
                .iter()
                .flat_map(|b| (0..width as usize - 1).map(move |j| b.get(j).map_or(0.0, pick)))
                .collect();
            Tensor::from_slice(&flat)
                .view([rows, width - 1])
                .to_device(device)
        };
        let (beh, known) = (column(|b| b.0), column(|b| b.1));
        let ids = ids.to_device(device);
        let logits = policy.logits(&ids, &mask.to_device(device));
        let nll = logits_nll(&logits, &ids);
        let m = shifted_targets(&targets, device);
        let mine = m.sum(Kind::Float).double_value(&[]);
        let (weights, weight_share) = if self.importance_clip > 0.0 {
            let tempered = if tempers(self.temperature) {
                tch::no_grad(|| logits_nll(&temper(&logits, self.temperature), &ids))
            } else {
                nll.detach()
            };
            let measured: Tensor = (-tempered - &beh).exp() * &known;
            let ratio = (measured - &known + 1.0).clamp_max(self.importance_clip);
            let w = &ratio * &m;
            let share = w.sum(Kind::Float).double_value(&[]) / n_targets;
            (w, share)
        } else {
            (m.shallow_clone(), mine / n_targets)
        };
        let loss = (&nll * &weights).sum(Kind::Float) / n_targets;
        let tokens = Vec::<i64>::try_from(&mask.sum(Kind::Int64).view([1]))?[0] as u64;
        let reward = batch[shard].iter().map(|t| t.reward as f64).sum::<f64>() / batch.len() as f64;
        Ok(crate::runtime::learner::ObjectiveLoss {
            loss,
            tokens,
            metrics: vec![
                ("importance_weight_mean", weight_share),
                ("reward_mean", reward),
                ("completion_tokens", mine),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medzero_policies::llama::DecoderConfig;
    use medzero_policies::tokenizer::Tokenizer;

    #[test]
    // One-range lists and a reversed range are what this test feeds on purpose.
    #[allow(clippy::single_range_in_vec_init, clippy::reversed_empty_ranges)]
    fn untrained_ranges_stay_context_and_tokenize_as_the_whole() {
        let tok = Tokenizer::word_level(["Why? Step 1: fever means A.\n\nStep 2: so B."], 1);
        let cfg = DecoderConfig::tiny_qwen2(tok.vocab_size() as i64, tok.eos_id());
        let policy = Policy::new_random(&cfg, tok, tch::Device::Cpu, 0).unwrap();
        let completion = "Step 1: fever means A.\n\nStep 2: so B.";
        let whole = Example {
            prompt: "Why?".into(),
            completion: completion.into(),
            ..Default::default()
        };
        let step2 = completion.find("Step 2").unwrap()..completion.len();
        let masked = Example {
            untrained: vec![step2.clone()],
            ..whole.clone()
        };
        let (a, b) = (
            encode(&policy, &whole, 0, 512).unwrap(),
            encode(&policy, &masked, 0, 512).unwrap(),
        );
        assert_eq!(a.ids, b.ids);
        let n_prompt = policy.tokenizer.encode("Why?").unwrap().len();
        let n_step2 = policy.tokenizer.encode(&completion[step2]).unwrap().len();
        let n = a.ids.len();
        // Prompt: context; step 1: learned; step 2: context; the end token: learned.
        assert!(a.targets[n_prompt..].iter().all(|&t| t == 1));
        assert!(b.targets[..n_prompt].iter().all(|&t| t == 0));
        assert!(b.targets[n_prompt..n - 1 - n_step2].iter().all(|&t| t == 1));
        assert!(b.targets[n - 1 - n_step2..n - 1].iter().all(|&t| t == 0));
        assert_eq!(b.targets[n - 1], 1);

        for bad in [vec![5..3], vec![0..4, 2..6], vec![0..completion.len() + 1]] {
            let e = Example {
                untrained: bad,
                ..whole.clone()
            };
            assert!(encode(&policy, &e, 0, 512).is_err());
        }
    }
}
