//! Supervised fine-tuning: next-token cross-entropy on completion tokens only
//! (the prompt is context, not target), AdamW with decoupled weight decay,
//! warmup + schedule, gradient clipping and accumulation, and checkpoints that
//! resume bit-identically on CPU. Pretraining on a corpus is the same loop
//! with empty prompts.

use crate::checkpoint::{Checkpoints, TrainerState};
use crate::monitor::Metrics;
use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use medzero_policies::Policy;
use medzero_policies::generate::pad_right_to;
use medzero_policies::optim::{AdamW, AdamWConfig, Schedule, ScheduleKind};
use medzero_policies::tokenizer::PromptTemplate;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    pub epochs: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub warmup_ratio: f64,
    pub schedule: ScheduleKind,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    /// Sequences are cut to this many tokens (prompt first).
    pub max_len: usize,
    /// Optimizer steps between checkpoints (0: only at the end).
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub log_every: usize,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            epochs: 1.0,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            warmup_ratio: 0.05,
            schedule: ScheduleKind::Cosine,
            max_grad_norm: 1.0,
            max_len: 512,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            log_every: 10,
        }
    }
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        if self.epochs.is_nan()
            || self.epochs <= 0.0
            || self.batch_size == 0
            || self.grad_accum == 0
            || self.max_len < 2
        {
            bail!("sft: epochs, batch_size, grad_accum must be positive and max_len >= 2");
        }
        if self.lr.is_nan() || self.lr <= 0.0 || !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("sft: lr must be positive and warmup_ratio in [0, 1)");
        }
        Ok(())
    }
}

/// One training sequence: `completion` is learned, `prompt` is context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub completion: String,
}

/// Tokens of an example and which of them are targets.
struct Encoded {
    ids: Vec<i64>,
    targets: Vec<i64>,
}

fn encode(policy: &Policy, e: &Example, end: i64, max_len: usize) -> Result<Encoded> {
    let tok = &policy.tokenizer;
    let prompt = tok.encode(&e.prompt)?;
    let mut completion = tok.encode(&e.completion)?;
    completion.push(end);
    let mut ids: Vec<i64> = prompt.iter().chain(&completion).copied().collect();
    let mut targets: Vec<i64> = std::iter::repeat_n(0, prompt.len())
        .chain(std::iter::repeat_n(1, completion.len()))
        .collect();
    ids.truncate(max_len);
    targets.truncate(max_len);
    Ok(Encoded { ids, targets })
}

/// The order of epoch `epoch`: a pure function of the seed, so a resumed run
/// needs only (epoch, position) to continue with the same data.
pub(crate) fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64 + 1);
    order.shuffle(&mut rng);
    order
}

pub struct SftReport {
    pub steps: usize,
    pub tokens: u64,
    pub final_loss: f64,
    pub resumed_from: Option<usize>,
    pub wall_s: f64,
}

/// Trains `policy` on `data`, checkpointing into `dir/checkpoints`; resumes
/// from the latest checkpoint there. Completions end with `template`'s end of
/// turn. `tag` prefixes metric names. Stops (after a checkpoint) with an error
/// when `stop` is set.
#[allow(clippy::too_many_arguments)]
pub fn train(
    policy: &Policy,
    data: &[Example],
    cfg: &SftConfig,
    template: PromptTemplate,
    seed: u64,
    dir: &Path,
    tag: &str,
    metrics: &mut dyn Metrics,
    stop: &AtomicBool,
) -> Result<SftReport> {
    cfg.validate()?;
    if data.is_empty() {
        bail!("{tag}: no training examples");
    }
    let end = policy.tokenizer.end_of_turn_id(template);
    let encoded: Vec<Encoded> = data
        .iter()
        .map(|e| encode(policy, e, end, cfg.max_len))
        .collect::<Result<_>>()?;
    let per_step = cfg.batch_size * cfg.grad_accum;
    let total_steps = ((cfg.epochs * data.len() as f64) / per_step as f64).ceil() as usize;
    let schedule = Schedule {
        kind: cfg.schedule,
        warmup_steps: (cfg.warmup_ratio * total_steps as f64).round() as usize,
        total_steps,
    };
    let adam = AdamWConfig {
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::new(policy.named_parameters(), adam, AdamW::default_decay)?;
    let ckpts = Checkpoints::new(&dir.join("checkpoints"), cfg.keep_checkpoints);
    std::fs::create_dir_all(dir.join("checkpoints"))?;
    let mut state = TrainerState::default();
    let mut resumed_from = None;
    if let Some(path) = ckpts.latest()? {
        state = ckpts.restore(&path, policy, &mut opt)?;
        resumed_from = Some(state.step);
        eprintln!(
            "{tag}: resuming from {} (step {}/{total_steps})",
            path.display(),
            state.step
        );
    }

    let bar = ProgressBar::new(total_steps as u64)
        .with_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg} (eta {eta})")
                .expect("template"),
        )
        .with_prefix(tag.to_string())
        .with_position(state.step as u64);
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut order = epoch_order(data.len(), seed, state.epoch);
    let mut last_loss = f64::NAN;
    while state.step < total_steps {
        let t0 = Instant::now();
        // The step's sequences, continuing across epoch boundaries.
        let mut picked = Vec::with_capacity(per_step);
        while picked.len() < per_step {
            if state.position == order.len() {
                state.epoch += 1;
                state.position = 0;
                order = epoch_order(data.len(), seed, state.epoch);
            }
            picked.push(order[state.position]);
            state.position += 1;
        }
        // Normalise by the step's target tokens, so accumulation equals one big batch.
        let targets: i64 = picked
            .iter()
            .map(|&i| encoded[i].targets[1..].iter().sum::<i64>())
            .sum::<i64>()
            .max(1);
        let mut loss_sum = 0.0;
        let mut tokens = 0u64;
        for micro in picked.chunks(cfg.batch_size) {
            let ids: Vec<Vec<i64>> = micro.iter().map(|&i| encoded[i].ids.clone()).collect();
            let tgt: Vec<Vec<i64>> = micro.iter().map(|&i| encoded[i].targets.clone()).collect();
            let (ids, mask) = pad_right_to(&ids, policy.tokenizer.pad_id(), 16);
            let (tgt, _) = pad_right_to(&tgt, 0, 16);
            tokens += Vec::<i64>::try_from(&mask.sum(Kind::Int64).view([1]))?[0] as u64;
            let loss = completion_nll_sum(policy, &ids, &mask, &tgt) / targets as f64;
            loss.backward();
            loss_sum += loss.double_value(&[]);
        }
        let grad_norm = if cfg.max_grad_norm > 0.0 {
            opt.clip_grad_norm(cfg.max_grad_norm)
        } else {
            f64::NAN
        };
        let lr = schedule.lr(cfg.lr, state.step);
        opt.step(lr);
        opt.zero_grad();
        state.step += 1;
        state.tokens_seen += tokens;
        last_loss = loss_sum;

        let step = state.step as u64;
        if state.step % cfg.log_every.max(1) == 0 || state.step == total_steps {
            metrics.scalar(&format!("{tag}/loss"), step, loss_sum);
            metrics.scalar(&format!("{tag}/learning_rate"), step, lr);
            metrics.scalar(&format!("{tag}/grad_norm"), step, grad_norm);
            metrics.scalar(
                &format!("{tag}/epoch"),
                step,
                state.epoch as f64 + state.position as f64 / data.len() as f64,
            );
            metrics.scalar(
                "perf/learner_tokens_per_s",
                step,
                tokens as f64 / t0.elapsed().as_secs_f64(),
            );
        }
        bar.set_position(step);
        bar.set_message(format!("loss {loss_sum:.3}"));
        let stopping = stop.load(Ordering::SeqCst);
        let due = cfg.checkpoint_every > 0 && state.step % cfg.checkpoint_every == 0;
        if due || stopping || state.step == total_steps {
            state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
            ckpts.save(policy, &opt, &state)?;
        }
        if stopping {
            bar.abandon_with_message("stopped; rerun to resume");
            bail!(
                "{tag}: stopped at step {}/{total_steps} by a signal; the checkpoint is saved, rerun to resume",
                state.step
            );
        }
    }
    bar.finish_and_clear();
    Ok(SftReport {
        steps: state.step,
        tokens: state.tokens_seen,
        final_loss: last_loss,
        resumed_from,
        wall_s: elapsed_before + started.elapsed().as_secs_f64(),
    })
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
fn token_nll(policy: &Policy, ids: &Tensor, mask: &Tensor) -> Tensor {
    let t = ids.size()[1];
    let logits = policy.logits(ids, mask);
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
/// lag of asynchronous actors (IMPALA's truncated importance sampling).
pub struct TrajectorySft {
    /// Encoded prompt of each problem, by problem id.
    pub prompts: std::collections::HashMap<String, Vec<i64>>,
    pub min_reward: f32,
    pub importance_clip: f64,
    pub max_len: usize,
    pub template: PromptTemplate,
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
    ) -> Result<TrajectorySft> {
        let prompts = problems
            .iter()
            .map(|p| {
                let ids = policy
                    .tokenizer
                    .encode(&template.render(&p.prompt_text()))?;
                Ok((p.id.clone(), ids))
            })
            .collect::<Result<_>>()?;
        Ok(TrajectorySft {
            prompts,
            min_reward,
            importance_clip,
            max_len,
            template,
        })
    }
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
    ) -> Result<crate::runtime::learner::ObjectiveLoss> {
        let mut ids = Vec::with_capacity(batch.len());
        let mut targets = Vec::with_capacity(batch.len());
        let mut behaviour = Vec::with_capacity(batch.len());
        let end = policy.tokenizer.end_of_turn_id(self.template);
        for t in batch {
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
            // Behaviour log-probs aligned with token_nll (the entry before
            // each token), and whether they are known: outside data has none,
            // and its ratio is taken as 1.
            let mut beh = vec![(0.0f32, 0.0f32); seq.len()];
            if t.logprobs.len() == completion.len() && !prompt.is_empty() {
                for (k, &lp) in t.logprobs.iter().enumerate() {
                    beh[prompt.len() - 1 + k] = (lp, 1.0);
                }
            }
            seq.truncate(self.max_len);
            tgt.truncate(self.max_len);
            ids.push(seq);
            targets.push(tgt);
            behaviour.push(beh);
        }
        let (ids, mask) = pad_right_to(&ids, policy.tokenizer.pad_id(), 16);
        let (targets, _) = pad_right_to(&targets, 0, 16);
        let device = policy.device();
        let (rows, width) = (batch.len() as i64, ids.size()[1]);
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
        let nll = token_nll(policy, &ids.to_device(device), &mask.to_device(device));
        let m = shifted_targets(&targets, device);
        let n_targets = m.sum(Kind::Float).double_value(&[]).max(1.0);
        let (weights, mean_weight) = if self.importance_clip > 0.0 {
            let measured: Tensor = (-nll.detach() - &beh).exp() * &known;
            let ratio = (measured - &known + 1.0).clamp_max(self.importance_clip);
            let w = &ratio * &m;
            let mean = w.sum(Kind::Float).double_value(&[]) / n_targets;
            (w, mean)
        } else {
            (m.shallow_clone(), 1.0)
        };
        let loss = (&nll * &weights).sum(Kind::Float) / n_targets;
        let tokens = Vec::<i64>::try_from(&mask.sum(Kind::Int64).view([1]))?[0] as u64;
        let reward = batch.iter().map(|t| t.reward as f64).sum::<f64>() / batch.len() as f64;
        Ok(crate::runtime::learner::ObjectiveLoss {
            loss,
            tokens,
            metrics: vec![
                ("importance_weight_mean", mean_weight),
                ("reward_mean", reward),
                ("completion_tokens", n_targets),
            ],
        })
    }
}
