//! The offline training loop every learner objective shares (SFT, PRM, DPO,
//! KTO): epochs over a fixed data set in a seeded order, gradient
//! accumulation, clipping, AdamW with warmup + schedule, TensorBoard metrics,
//! and checkpoints that resume bit-identically on CPU. What differs between
//! objectives is only the loss of a micro-batch ([`BatchLoss`]).
//!
//! The objectives: [`sft`], [`prm`] (MedS3's process reward model), [`dpo`]
//! (the DPO family) and [`kto`]; the online policy-gradient losses [`grpo`]
//! and [`rloo`] run on the actor/learner runtime instead.

pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod prm;
pub mod rloo;
pub mod sft;

use crate::infra::checkpoint::{Checkpoints, TrainerState};
use crate::infra::monitor::Metrics;
use crate::runtime::parallel;
use anyhow::{Result, bail};
use medzero_policies::Policy;
use medzero_policies::optim::{AdamW, AdamWConfig, Schedule, ScheduleKind};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::Tensor;

/// The offline optimiser, schedule and checkpointing of every training
/// stage (the `sft` table of SFT and PRM stages, `optim` of preference
/// stages), as TRL's `TrainingArguments` serve all its trainers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
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

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
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

impl TrainConfig {
    /// Every field in range; the caller names the table (`sft`, `optim`).
    pub fn validate(&self) -> Result<()> {
        positive("epochs", self.epochs)?;
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.max_len < 2 {
            bail!("max_len must be at least 2, got {}", self.max_len);
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("warmup_ratio must be in [0, 1), got {}", self.warmup_ratio);
        }
        self.adamw().map(drop)
    }

    fn adamw(&self) -> Result<AdamWConfig> {
        crate::infra::adamw(
            self.lr,
            self.beta1,
            self.beta2,
            self.weight_decay,
            self.max_grad_norm,
        )
    }
}

/// `v` is a finite number above 0.
pub fn positive(name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        bail!("{name} must be a finite number > 0, got {v}")
    }
}

/// One micro-batch's share of an optimizer step.
pub struct MicroLoss {
    /// The micro-batch's share of the step's loss: the shares of a step's
    /// micro-batches sum to the loss of the whole step as one batch.
    pub loss: Tensor,
    /// Tokens run through the model (for throughput).
    pub tokens: u64,
    /// The objective's metrics over this micro-batch, as means; the step's
    /// value is their mean weighted by micro-batch size.
    pub metrics: Vec<(&'static str, f64)>,
}

/// The loss an objective computes on a micro-batch of data items.
pub trait BatchLoss {
    /// Items in the data set.
    fn items(&self) -> usize;
    /// The loss of `micro` (indices into the data) within an optimizer step
    /// over `step` (every index of the step, `micro` among them).
    fn micro_loss(&mut self, policy: &Policy, step: &[usize], micro: &[usize])
    -> Result<MicroLoss>;
    /// After each optimizer step `step` (1-based): e.g. a reference sync.
    fn after_step(&mut self, _policy: &Policy, _step: usize) -> Result<()> {
        Ok(())
    }
    /// Extra state a checkpoint folder must hold to resume (e.g. a synced
    /// reference model), written into `dir` before it is renamed into place.
    fn save_state(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    fn restore_state(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

pub struct TrainReport {
    pub steps: usize,
    pub tokens: u64,
    pub final_loss: f64,
    pub resumed_from: Option<usize>,
    pub wall_s: f64,
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

/// Optimizer steps `cfg` takes over `n` items.
pub fn total_steps(cfg: &TrainConfig, n: usize) -> usize {
    ((cfg.epochs * n as f64) / (cfg.batch_size * cfg.grad_accum) as f64).ceil() as usize
}

/// Where and under what name a training run writes.
pub struct TrainRun<'a> {
    pub seed: u64,
    /// Checkpoints go to `dir/checkpoints`.
    pub dir: &'a Path,
    /// Names the run in messages and progress (its metrics are `train/*`, in
    /// the stage's own TensorBoard run).
    pub tag: &'a str,
    pub metrics: &'a mut dyn Metrics,
    /// Set by SIGINT/SIGTERM: checkpoint and return.
    pub stop: &'a AtomicBool,
}

/// Trains `policy` on `objective`'s data, checkpointing into
/// `run.dir/checkpoints`; resumes from the latest checkpoint there. Stops
/// (after a checkpoint) with an error when `run.stop` is set, and without
/// stepping when the loss or the gradient norm is not finite.
pub fn train(
    policy: &Policy,
    objective: &mut dyn BatchLoss,
    cfg: &TrainConfig,
    run: TrainRun,
) -> Result<TrainReport> {
    let TrainRun {
        seed,
        dir,
        tag,
        metrics,
        stop,
    } = run;
    cfg.validate()?;
    let n = objective.items();
    if n == 0 {
        bail!("{tag}: no training examples");
    }
    let per_step = cfg.batch_size * cfg.grad_accum;
    // With several processes (torchrun), each takes a shard of every step.
    let group = medzero_dist::world();
    parallel::check_divides(per_step, group, tag)?;
    let total_steps = total_steps(cfg, n);
    let schedule = Schedule {
        kind: cfg.schedule,
        warmup_steps: (cfg.warmup_ratio * total_steps as f64).round() as usize,
        total_steps,
    };
    let adam = cfg.adamw()?;
    let mut opt = AdamW::new(policy.named_parameters(), adam, AdamW::default_decay)?;
    let ckpts = Checkpoints::new(&dir.join("checkpoints"), cfg.keep_checkpoints);
    std::fs::create_dir_all(dir.join("checkpoints"))?;
    let mut state = TrainerState::default();
    let mut resumed_from = None;
    if let Some((path, restored)) = ckpts.restore_latest(policy, &mut opt)? {
        state = restored;
        objective.restore_state(&path)?;
        resumed_from = Some(state.step);
        eprintln!(
            "{tag}: resuming from {} (step {}/{total_steps})",
            path.display(),
            state.step
        );
    }
    if let Some(g) = group {
        state = parallel::start_from_rank0(g, &mut opt, state)?;
    }

    let bar = crate::infra::progress::bar(total_steps as u64, tag, "steps")
        .with_position(state.step as u64);
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut order = epoch_order(n, seed, state.epoch);
    let mut last_loss = f64::NAN;
    while state.step < total_steps {
        let t0 = Instant::now();
        // The step's items, continuing across epoch boundaries.
        let mut picked = Vec::with_capacity(per_step);
        while picked.len() < per_step {
            if state.position == order.len() {
                state.epoch += 1;
                state.position = 0;
                order = epoch_order(n, seed, state.epoch);
            }
            picked.push(order[state.position]);
            state.position += 1;
        }
        let mut loss_sum = 0.0;
        let mut tokens = 0u64;
        let mut step_metrics: Vec<(&'static str, f64)> = Vec::new();
        for micro in parallel::shard(&picked, group).chunks(cfg.batch_size) {
            let m = objective.micro_loss(policy, &picked, micro)?;
            m.loss.backward();
            loss_sum += m.loss.double_value(&[]);
            tokens += m.tokens;
            let share = micro.len() as f64 / picked.len() as f64;
            for (k, v) in m.metrics {
                match step_metrics.iter_mut().find(|(name, _)| *name == k) {
                    Some((_, acc)) => *acc += share * v,
                    None => step_metrics.push((k, share * v)),
                }
            }
        }
        if let Some(g) = group {
            parallel::sum_step(g, &opt, &mut loss_sum, &mut tokens, &mut step_metrics)?;
        }
        let grad_norm = if cfg.max_grad_norm > 0.0 {
            opt.clip_grad_norm(cfg.max_grad_norm)
        } else {
            opt.grad_norm()
        };
        let lr = schedule.lr(cfg.lr, state.step);
        if let Err(e) = crate::infra::ensure_finite(tag, state.step + 1, loss_sum, grad_norm, lr) {
            bar.abandon();
            return Err(e);
        }
        opt.step(lr);
        opt.zero_grad();
        state.step += 1;
        state.tokens_seen += tokens;
        last_loss = loss_sum;
        objective.after_step(policy, state.step)?;

        let step = state.step as u64;
        if state.step % cfg.log_every.max(1) == 0 || state.step == total_steps {
            metrics.scalar("train/loss", step, loss_sum);
            metrics.scalar("train/learning_rate", step, lr);
            metrics.scalar("train/grad_norm", step, grad_norm);
            metrics.scalar(
                "train/epoch",
                step,
                state.epoch as f64 + state.position as f64 / n as f64,
            );
            for (k, v) in &step_metrics {
                metrics.scalar(&format!("train/{k}"), step, *v);
            }
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
            ckpts.save_with(policy, &opt, &state, &|d| objective.save_state(d))?;
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
    Ok(TrainReport {
        steps: state.step,
        tokens: state.tokens_seen,
        final_loss: last_loss,
        resumed_from,
        wall_s: elapsed_before + started.elapsed().as_secs_f64(),
    })
}
