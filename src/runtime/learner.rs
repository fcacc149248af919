//! The learner side of an online stage, and the loop that runs a whole stage:
//! actors generate with the newest weights while the learner stores every
//! trajectory, trains a pluggable [`Objective`] on them and publishes weights.
//!
//! Nothing is lost or duplicated across a crash because the store is the
//! record of truth. The learner appends each trajectory before training on
//! it, in arrival order; a checkpoint records how many stored trajectories
//! the learner has consumed (trained on, or dropped as stale or unusable).
//! A resumed stage re-feeds the stored ones past that point and hands out
//! only the problems whose trajectories are not all stored; an id already
//! stored is never appended twice.
//!
//! Modes: `async` trains as soon as a batch is ready and publishes every
//! `publish_every` steps, so actors run ahead by a bounded policy lag.
//! `sync` runs rounds: the actors do every problem of the round with the
//! same weights, then the learner trains on the round's trajectories in
//! problem order, publishes and opens the next round. Each problem draws from
//! its own random stream, so a sync round's data does not depend on which
//! actor did what. `deterministic` is `sync` with one actor.

use super::actor::{self, ActorMsg, Model, Rollout, Stats};
use super::parallel;
use super::queue::TrajectoryQueue;
use super::remote::{self, RemoteActor};
use super::service::{self, ServiceConfig};
use super::source::ProblemSource;
use super::store::{STORE_FILE, TrajectoryStore, read_trajectories};
use super::weights::{PolicySnapshot, WeightSlot};
use crate::infra::checkpoint::{Checkpoints, TrainerState};
use crate::infra::monitor::Metrics;
use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use medzero_dist::Group;
use medzero_envs::{Problem, Trajectory};
use medzero_policies::Policy;
use medzero_policies::optim::{AdamW, AdamWConfig, Schedule, ScheduleKind};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Rounds with one actor: the same seed gives the same results.
    Deterministic,
    /// Rounds: generate with fixed weights, then train.
    Sync,
    /// Generation and training overlap.
    Async,
}

/// Where actors' models live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Each actor owns a policy copy and decodes its own batches.
    PerActor,
    /// One inference service holds the only copy and batches every actor's
    /// decode steps together; actors are threads without a model.
    Shared,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub mode: Mode,
    pub placement: Placement,
    /// `shared`: decode steps between admissions of waiting requests into
    /// the service's batch.
    pub merge_every: usize,
    /// Actor threads (`deterministic` uses one).
    pub actors: usize,
    /// libtorch intra-op threads per actor, or of the service with `shared`
    /// placement, whose actors hold no model (0: libtorch's default).
    pub actor_threads: usize,
    /// libtorch intra-op threads of the learner (0: leave as set by `run.threads`).
    pub learner_threads: usize,
    /// Rollouts (one problem's trajectories each) the queue holds before
    /// actors wait for the learner.
    pub queue_capacity: usize,
    /// Problems per round in `sync` and `deterministic` modes.
    pub round_size: usize,
    /// `async`: optimizer steps between weight publications.
    pub publish_every: usize,
    /// `async`: trajectories made by a policy more than this many versions
    /// behind the learner are dropped (and counted).
    pub max_policy_lag: u64,
    /// Fault injection for tests: the first attempt at every problem whose
    /// index is a multiple of this panics inside its actor (0: off).
    pub inject_panic_every: usize,
    /// With several processes (torchrun): ranks 1.. only generate, one
    /// actor each with its own policy copy, and rank 0 runs the learner and
    /// no actor of its own (see `runtime::remote`).
    pub actor_ranks: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            mode: Mode::Deterministic,
            placement: Placement::PerActor,
            merge_every: ServiceConfig::default().merge_every,
            actors: 2,
            actor_threads: 1,
            learner_threads: 0,
            queue_capacity: 64,
            round_size: 128,
            publish_every: 1,
            max_policy_lag: 4,
            inject_panic_every: 0,
            actor_ranks: false,
        }
    }
}

impl RuntimeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.actors == 0 || self.queue_capacity == 0 || self.round_size == 0 {
            bail!("runtime: actors, queue_capacity and round_size must be positive");
        }
        if self.publish_every == 0 || self.merge_every == 0 {
            bail!("runtime: publish_every and merge_every must be positive");
        }
        // Far more than any machine has; far fewer than would exhaust stacks.
        if self.actors > 256 || self.actor_threads > 1024 || self.learner_threads > 1024 {
            bail!("runtime: at most 256 actors and 1024 threads per actor or learner");
        }
        if self.actor_ranks && self.placement == Placement::Shared {
            bail!(
                "runtime: actor_ranks hold their own policy copies; use placement = \"per_actor\""
            );
        }
        Ok(())
    }

    fn actor_count(&self) -> usize {
        match self.mode {
            Mode::Deterministic => 1,
            _ => self.actors,
        }
    }
}

/// The learner's optimizer: AdamW, linear warmup then a constant rate (an
/// online stage does not know its step count in advance).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerConfig {
    /// Usable trajectories per optimizer step.
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub warmup_steps: usize,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    /// `async`: optimizer steps between checkpoints (sync modes checkpoint
    /// every round).
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub log_every: usize,
}

impl Default for LearnerConfig {
    fn default() -> Self {
        LearnerConfig {
            batch_size: 16,
            lr: 2e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            checkpoint_every: 20,
            keep_checkpoints: 2,
            log_every: 1,
        }
    }
}

impl LearnerConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("batch_size must be at least 1");
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

/// What the learner trains on the trajectories: SFT, PRM, DPO...
pub trait Objective {
    /// Whether `t` is training data (e.g. only verified-correct attempts).
    fn accepts(&self, t: &Trajectory) -> bool;
    /// The loss of `batch[shard]` as its share of the whole batch's loss,
    /// to be minimised: normalised by the whole batch's counts, so the
    /// losses, gradients and metrics of the shards that data-parallel ranks
    /// take of one batch sum to the batch's own (one process passes the
    /// whole batch). The learner runs backward, clipping and the step.
    fn loss(
        &mut self,
        policy: &Policy,
        batch: &[Trajectory],
        shard: std::ops::Range<usize>,
    ) -> Result<ObjectiveLoss>;
    /// Optimizer steps taken on each batch (TRL's `num_iterations`, μ): the
    /// batch's recorded log-probs stay the old policy's throughout.
    fn iterations(&self) -> usize {
        1
    }
}

pub struct ObjectiveLoss {
    pub loss: Tensor,
    /// Tokens the loss covers (for throughput).
    pub tokens: u64,
    /// The objective's own metrics, logged under `train/`: shares of the
    /// batch's values, as the loss is.
    pub metrics: Vec<(&'static str, f64)>,
}

/// One online stage's inputs.
pub struct Online<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    pub problems: &'a [Problem],
    pub rollout: &'a dyn Rollout,
    pub objective: &'a mut dyn Objective,
    /// The learner's policy, holding the stage's initial weights.
    pub policy: &'a Policy,
    /// Makes an actor's policy copy (its weights are then overwritten).
    pub build_actor_policy: &'a (dyn Fn() -> Result<Policy> + Sync),
    pub runtime: &'a RuntimeConfig,
    pub learner: &'a LearnerConfig,
    pub seed: u64,
    pub metrics: &'a mut dyn Metrics,
    pub stop: &'a AtomicBool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OnlineReport {
    pub steps: usize,
    pub policy_version: u64,
    /// Trajectories in the store at the end.
    pub trajectories: usize,
    /// Tokens the learner trained on.
    pub learner_tokens: u64,
    pub counters: Counters,
    /// Checkpointed learner step this run resumed from.
    pub resumed_from: Option<usize>,
    pub wall_s: f64,
    /// `shared` placement: what the inference service did in this run.
    pub service: Option<service::ServiceStats>,
}

/// Totals kept in the checkpoint, so they survive a resume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub rollouts: u64,
    pub generated_tokens: u64,
    /// Trajectories used for training.
    pub trained: u64,
    /// Dropped for exceeding `max_policy_lag`.
    pub dropped_stale: u64,
    /// Not accepted by the objective.
    pub rejected: u64,
    /// Rollouts delivered again for ids already stored.
    pub duplicates: u64,
    pub panics: u64,
    pub failed: u64,
    /// Trajectories the reward could not grade (scored 0).
    pub reward_failures: u64,
    /// Trajectories in the store when these counts were taken: a resume
    /// counts the rollouts of those stored after it.
    pub stored: u64,
}

/// Runs (or resumes) an online stage to its end, or until `stop` is set,
/// when it checkpoints and returns an error saying how to resume.
pub fn run(s: Online) -> Result<OnlineReport> {
    s.runtime.validate()?;
    s.learner.validate()?;
    if s.runtime.learner_threads > 0 {
        tch::set_num_threads(s.runtime.learner_threads as i32);
    }
    let ranks = medzero_dist::world().filter(|_| s.runtime.actor_ranks);
    if s.runtime.actor_ranks && ranks.is_none() {
        bail!(
            "{}: runtime.actor_ranks needs several processes (WORLD_SIZE > 1, e.g. torchrun)",
            s.name
        );
    }
    if let Some(g) = ranks.filter(|g| g.rank() > 0) {
        // An actor rank: serve rank 0's rollouts, end on its final weights.
        remote::serve(g, s.policy, s.rollout, s.problems, s.seed)?;
        return Ok(OnlineReport::default());
    }
    // Without actor ranks, every rank of a distributed run learns: its
    // actors do its share of each round's problems, rank 0 stores the
    // round, and each batch trains data parallel ([`Learner::exchange`]).
    let dp = medzero_dist::world().filter(|_| !s.runtime.actor_ranks);
    if dp.is_some() && s.runtime.mode == Mode::Async {
        bail!(
            "{}: runtime.mode = \"async\" cannot train data parallel (the ranks would take \
             different steps); use \"sync\" or \"deterministic\", or runtime.actor_ranks",
            s.name
        );
    }
    let started = Instant::now();
    let adam = s.learner.adamw()?;
    let mut opt = AdamW::new(s.policy.named_parameters(), adam, AdamW::default_decay)?;
    // Rank 0 alone keeps the record (checkpoints and the store); the other
    // data-parallel ranks start from what it broadcasts.
    let (mut start, record) = match dp {
        Some(g) if g.rank() > 0 => (Start::default(), None),
        _ => {
            let (start, record) = open(&s, &mut opt)?;
            (start, Some(record))
        }
    };
    if let Some(g) = dp {
        start.state = parallel::start_from_rank0(g, &mut opt, start.state)?;
        start = parallel::broadcast_json(g, &start)?;
    }
    let Start {
        state,
        counters,
        resumed_from,
        pending,
        todo,
    } = start;
    let already = s.problems.len() - todo.len();
    // This rank's problems: every `world`-th, so each round splits evenly.
    let todo: Vec<usize> = todo
        .into_iter()
        .filter(|&i| dp.is_none_or(|g| i % g.world() == g.rank()))
        .collect();
    let index_of: HashMap<String, usize> = s
        .problems
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id.clone(), i))
        .collect();

    let sync = s.runtime.mode != Mode::Async;
    let round_size = if sync {
        s.runtime.round_size
    } else {
        s.problems.len().max(1)
    };
    let source = ProblemSource::new(todo.clone(), (state.epoch + 1) * round_size);
    let queue = TrajectoryQueue::new(s.runtime.queue_capacity);
    let slot = WeightSlot::new(PolicySnapshot::capture(s.policy, state.policy_version));
    let n_actors = ranks.map_or(s.runtime.actor_count(), |g| g.world() - 1);
    let stats: Vec<Stats> = (0..n_actors).map(|_| Stats::default()).collect();
    let alive = AtomicUsize::new(n_actors);
    let shared = actor::Shared {
        problems: s.problems,
        source: &source,
        queue: &queue,
        slot: &slot,
        rollout: s.rollout,
        seed: s.seed,
        stage: s.name,
        threads: s.runtime.actor_threads,
        inject_panic_every: s.runtime.inject_panic_every,
    };

    let mut learner = Learner {
        name: s.name,
        cfg: s.learner,
        runtime: s.runtime,
        policy: s.policy,
        objective: s.objective,
        opt,
        record,
        group: dp,
        round: Vec::new(),
        metrics: s.metrics,
        state,
        counters,
        pending: pending.into(),
        accepted_pending: 0,
        slot: &slot,
        index_of,
        stats: &stats,
        panics_before: 0,
        panics_elsewhere: 0,
        lags: Vec::new(),
        elapsed_before: 0.0,
        started,
        monitor: Monitor::new(s.problems.len(), already),
    };
    learner.elapsed_before = learner.state.elapsed_s;
    learner.panics_before = learner.counters.panics;
    learner.count_accepted();

    let served = s.runtime.placement == Placement::Shared;
    if served && !s.rollout.servable() {
        bail!(
            "{}: this stage's rollout needs a model per actor; set runtime.placement = \"per_actor\"",
            s.name
        );
    }
    let (client, inbox) = if served {
        let (c, i) = service::channel(
            &s.policy.tokenizer,
            s.policy.config().max_position_embeddings,
        );
        (Some(c), Some(i))
    } else {
        (None, None)
    };
    let mut service_stats = None;
    let outcome = std::thread::scope(|scope| {
        let service = inbox.map(|inbox| {
            let (slot, build) = (&slot, s.build_actor_policy);
            let threads = s.runtime.actor_threads;
            let cfg = ServiceConfig {
                merge_every: s.runtime.merge_every,
            };
            std::thread::Builder::new()
                .name("inference".into())
                .spawn_scoped(scope, move || {
                    if threads > 0 {
                        tch::set_num_threads(threads as i32);
                    }
                    let policy = build()?;
                    slot.current().apply(&policy)?;
                    service::serve(&policy, inbox, Some(slot), cfg)
                })
                .expect("spawning the inference service")
        });
        let handles: Vec<_> = stats
            .iter()
            .enumerate()
            .map(|(id, st)| {
                let (shared, alive) = (&shared, &alive);
                let model = match (&client, ranks) {
                    (_, Some(g)) => Model::Remote(Box::new(RemoteActor::new(g, id + 1))),
                    (Some(c), None) => Model::Served(c.clone()),
                    (None, None) => Model::Own(s.build_actor_policy),
                };
                std::thread::Builder::new()
                    .name(format!("actor-{id}"))
                    .spawn_scoped(scope, move || {
                        let r = actor::run(id, shared, st, model);
                        alive.fetch_sub(1, Ordering::AcqRel);
                        r
                    })
                    .expect("spawning an actor thread")
            })
            .collect();
        // The service stops once the actors' clients are gone.
        drop(client);
        let result = learner.drive(&source, &queue, &todo, round_size, &alive, s.stop);
        learner.tick(&queue, true);
        source.stop();
        queue.close();
        let mut actor_errors = Vec::new();
        for (id, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => actor_errors.push(format!("actor-{id}: {e:#}")),
                Err(_) => actor_errors.push(format!("actor-{id} panicked outside a rollout")),
            }
        }
        // Without its service no actor generated anything since it failed:
        // the stage fails, whatever the learner made of the failed problems.
        if let Some(h) = service {
            let failed = match h.join() {
                Ok(Ok(stats)) => {
                    service_stats = Some(stats);
                    None
                }
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some("it panicked".into()),
            };
            if let Some(why) = failed {
                bail!(
                    "{}: the inference service stopped: {why}; rerun the same command to resume",
                    s.name
                );
            }
        }
        match result {
            Err(e) if !actor_errors.is_empty() => {
                Err(e.context(format!("actors failed: {}", actor_errors.join("; "))))
            }
            r => r,
        }
    });
    learner.monitor.bar.finish_and_clear();
    let stopped = outcome?;
    if let Some(record) = &mut learner.record {
        record.store.sync()?;
    }
    if let Some(g) = ranks.filter(|_| !stopped) {
        for rank in 1..g.world() {
            RemoteActor::new(g, rank).finish(s.policy)?;
        }
    }
    let report = OnlineReport {
        steps: learner.state.step,
        policy_version: learner.state.policy_version,
        trajectories: learner
            .record
            .as_ref()
            .map_or(learner.counters.stored as usize, |r| r.store.len()),
        learner_tokens: learner.state.tokens_seen,
        counters: learner.counters.clone(),
        resumed_from,
        wall_s: learner.elapsed_before + started.elapsed().as_secs_f64(),
        service: service_stats,
    };
    if stopped {
        bail!(
            "{}: stopped by a signal at learner step {} (policy version {}, {} trajectories stored); \
             the checkpoint is saved, rerun the same command to resume",
            s.name,
            report.steps,
            report.policy_version,
            report.trajectories
        );
    }
    Ok(report)
}

/// Where an online stage starts: rank 0's record of earlier runs.
#[derive(Default, Serialize, Deserialize)]
struct Start {
    state: TrainerState,
    counters: Counters,
    resumed_from: Option<usize>,
    /// Stored trajectories not yet consumed, in store order.
    pending: Vec<Trajectory>,
    /// Problems whose trajectories are not all stored.
    todo: Vec<usize>,
}

/// What rank 0 keeps on disk: the checkpoints and the trajectory store.
struct Record {
    ckpts: Checkpoints,
    store: TrajectoryStore,
}

/// Restores the stage's latest checkpoint (into `opt` and the policy) and
/// reads its store: what is consumed, pending, and still to generate.
fn open(s: &Online, opt: &mut AdamW) -> Result<(Start, Record)> {
    let ckpt_dir = s.dir.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir)?;
    let ckpts = Checkpoints::new(&ckpt_dir, s.learner.keep_checkpoints);
    let mut state = TrainerState::default();
    let mut counters = Counters::default();
    let mut resumed_from = None;
    if let Some((path, restored)) = ckpts.restore_latest(s.policy, opt)? {
        state = restored;
        counters = serde_json::from_value(state.extra.clone()).unwrap_or_default();
        resumed_from = Some(state.step);
        eprintln!(
            "{}: resuming from {} (step {}, policy version {})",
            s.name,
            path.display(),
            state.step,
            state.policy_version
        );
    }

    let store_path = s.dir.join(STORE_FILE);
    let store = TrajectoryStore::open(&store_path)?;
    if let Some(bytes) = store.recovered_partial() {
        eprintln!(
            "{}: cut a torn last line ({bytes} bytes) from {}",
            s.name,
            store_path.display()
        );
    }
    let stored = read_trajectories(&store_path, false)?;
    // Rollouts delivered after the last checkpoint are in the store but not
    // in its counts (a problem's trajectories are stored together). Without
    // a checkpoint, stored trajectories were fed from outside: no rollouts.
    if let Some(after) = stored
        .get(counters.stored as usize..)
        .filter(|_| resumed_from.is_some())
    {
        let problems: HashSet<&str> = after.iter().map(|t| t.problem_id.as_str()).collect();
        counters.rollouts += problems.len() as u64;
        counters.generated_tokens += after.iter().map(|t| t.tokens.len() as u64).sum::<u64>();
        counters.stored = stored.len() as u64;
    }
    if state.position > stored.len() {
        bail!(
            "{}: the checkpoint says {} trajectories were consumed but {} holds {}; \
             the store was truncated or replaced: restore it, or delete {} to redo the stage",
            s.name,
            state.position,
            store_path.display(),
            stored.len(),
            s.dir.display()
        );
    }
    let have: HashSet<&str> = stored.iter().map(|t| t.id.as_str()).collect();
    let todo: Vec<usize> = (0..s.problems.len())
        .filter(|&i| {
            !s.rollout
                .ids(&s.problems[i])
                .iter()
                .all(|id| have.contains(id.as_str()))
        })
        .collect();
    let pending = stored.into_iter().skip(state.position).collect();
    let start = Start {
        state,
        counters,
        resumed_from,
        pending,
        todo,
    };
    Ok((start, Record { ckpts, store }))
}

struct Learner<'a> {
    name: &'a str,
    cfg: &'a LearnerConfig,
    runtime: &'a RuntimeConfig,
    policy: &'a Policy,
    objective: &'a mut dyn Objective,
    opt: AdamW,
    /// Rank 0's (or the one process's); none on the other data-parallel ranks.
    record: Option<Record>,
    /// The data-parallel ranks, when this is one of several.
    group: Option<&'a Group>,
    /// Data parallel: what this rank's actors delivered in the current round.
    round: Vec<ActorMsg>,
    metrics: &'a mut dyn Metrics,
    state: TrainerState,
    counters: Counters,
    /// Stored trajectories not yet consumed, in store order (a suffix of the store).
    pending: VecDeque<Trajectory>,
    accepted_pending: usize,
    slot: &'a WeightSlot,
    index_of: HashMap<String, usize>,
    stats: &'a [Stats],
    /// Panics counted by earlier runs of this stage.
    panics_before: u64,
    /// Data parallel: panics on the other ranks' actors in this run.
    panics_elsewhere: u64,
    /// Policy lag of each trajectory trained on since the last log.
    lags: Vec<u64>,
    elapsed_before: f64,
    started: Instant,
    monitor: Monitor,
}

impl Learner<'_> {
    /// The learner's loop; returns whether it stopped on a signal.
    #[allow(clippy::too_many_arguments)]
    fn drive(
        &mut self,
        source: &ProblemSource,
        queue: &TrajectoryQueue<ActorMsg>,
        todo: &[usize],
        round_size: usize,
        alive: &AtomicUsize,
        stop: &AtomicBool,
    ) -> Result<bool> {
        let sync = self.runtime.mode != Mode::Async;
        let total = self.index_of.len();
        let mut remaining = todo.len();
        // Sync: problems of the current round not yet reported.
        let in_round = |round: usize| {
            todo.iter()
                .filter(|&&i| i >= round * round_size && i < (round + 1) * round_size)
                .count()
        };
        let mut outstanding = if sync { in_round(self.state.epoch) } else { 0 };
        loop {
            if stop.load(Ordering::SeqCst) {
                source.stop();
                queue.close();
                while !queue.is_drained() {
                    for msg in queue.pop_batch(256, Duration::from_millis(10)) {
                        self.arrive(msg)?;
                    }
                }
                self.checkpoint()?;
                return Ok(true);
            }
            for msg in queue.pop_batch(256, Duration::from_millis(20)) {
                remaining -= 1;
                outstanding = outstanding.saturating_sub(1);
                self.arrive(msg)?;
            }
            if sync {
                if outstanding == 0 && self.state.epoch * round_size < total {
                    self.finish_round()?;
                    if self.state.epoch * round_size >= total {
                        return Ok(false);
                    }
                    outstanding = in_round(self.state.epoch);
                    source.open_until((self.state.epoch + 1) * round_size);
                }
            } else {
                while self.accepted_pending >= self.cfg.batch_size
                    || (remaining == 0 && !self.pending.is_empty())
                {
                    let before = self.state.step;
                    if !self.step(false)? {
                        continue;
                    }
                    // A batch may take several optimizer steps: act when a
                    // multiple was crossed.
                    let crossed = |every: usize| before / every != self.state.step / every;
                    let (publish, save) = (
                        crossed(self.runtime.publish_every),
                        crossed(self.cfg.checkpoint_every.max(1)),
                    );
                    if publish {
                        self.publish();
                    }
                    if save {
                        self.checkpoint()?;
                    }
                }
                if remaining == 0 {
                    self.publish();
                    self.checkpoint()?;
                    return Ok(false);
                }
            }
            self.tick(queue, false);
            if remaining > 0 && alive.load(Ordering::Acquire) == 0 && queue.is_empty() {
                bail!(
                    "{}: every actor has exited with {remaining} problems left",
                    self.name
                );
            }
        }
    }

    /// What an actor delivered: stored at once by one process; held for the
    /// round's end by a data-parallel rank (a round stopped before its end
    /// is regenerated on resume, from the same streams).
    fn arrive(&mut self, msg: ActorMsg) -> Result<()> {
        if self.group.is_some() {
            self.round.push(msg);
            return Ok(());
        }
        self.receive(msg)
    }

    /// Stores what an actor delivered and queues it for training.
    fn receive(&mut self, msg: ActorMsg) -> Result<()> {
        let Some(record) = self.record.as_mut() else {
            bail!("{}: only rank 0 stores trajectories", self.name);
        };
        match msg {
            ActorMsg::Done {
                trajectories,
                generated_tokens,
                reward_failures,
                ..
            } => {
                self.counters.rollouts += 1;
                self.counters.generated_tokens += generated_tokens;
                self.counters.reward_failures += reward_failures;
                self.monitor.finished += 1;
                for t in trajectories {
                    if !record.store.append(&t)? {
                        self.counters.duplicates += 1;
                        continue;
                    }
                    if self.objective.accepts(&t) {
                        self.accepted_pending += 1;
                    }
                    self.pending.push_back(t);
                }
            }
            ActorMsg::Failed {
                problem_id, error, ..
            } => {
                self.counters.failed += 1;
                self.monitor.finished += 1;
                eprintln!(
                    "{}: problem {problem_id} failed and is skipped in this run (a rerun tries it again): {error}",
                    self.name
                );
            }
        }
        Ok(())
    }

    /// Data parallel, at a round's end: every rank's deliveries go to rank
    /// 0, which stores them in problem order (the order one actor delivers
    /// them in) and counts them; its pending trajectories and counts come
    /// back to every rank, so all ranks form the same batches.
    fn exchange(&mut self) -> Result<()> {
        let Some(g) = self.group else {
            return Ok(());
        };
        let mine = (std::mem::take(&mut self.round), self.local_panics());
        let (counters, pending, finished, panics) =
            parallel::exchange_json(g, mine, |all: Vec<(Vec<ActorMsg>, u64)>| {
                let panics: Vec<u64> = all.iter().map(|(_, p)| *p).collect();
                let mut msgs: Vec<ActorMsg> = all.into_iter().flat_map(|(m, _)| m).collect();
                msgs.sort_by_key(|m| m.item().index);
                for msg in msgs {
                    self.receive(msg)?;
                }
                if let Some(record) = &self.record {
                    self.counters.stored = record.store.len() as u64;
                }
                Ok((
                    self.counters.clone(),
                    self.pending.clone(),
                    self.monitor.finished,
                    panics,
                ))
            })?;
        self.panics_elsewhere = panics.iter().sum::<u64>() - panics[g.rank()];
        self.counters = counters;
        self.pending = pending;
        self.monitor.finished = finished;
        self.count_accepted();
        self.count_panics();
        Ok(())
    }

    fn count_accepted(&mut self) {
        self.accepted_pending = self
            .pending
            .iter()
            .filter(|t| self.objective.accepts(t))
            .count();
    }

    /// Trains on a complete round in problem order, publishes and checkpoints.
    fn finish_round(&mut self) -> Result<()> {
        self.exchange()?;
        let index_of = &self.index_of;
        self.pending.make_contiguous().sort_by(|a, b| {
            (index_of.get(&a.problem_id), &a.id).cmp(&(index_of.get(&b.problem_id), &b.id))
        });
        while !self.pending.is_empty() {
            self.step(true)?;
        }
        self.state.epoch += 1;
        self.publish();
        self.checkpoint()
    }

    /// The objective's optimizer steps on the next batch of usable
    /// trajectories; returns false if there were none.
    fn step(&mut self, sync: bool) -> Result<bool> {
        let mut batch = Vec::with_capacity(self.cfg.batch_size);
        let mut lags = Vec::new();
        while batch.len() < self.cfg.batch_size {
            let Some(t) = self.pending.pop_front() else {
                break;
            };
            self.state.position += 1;
            let accepted = self.objective.accepts(&t);
            if accepted {
                self.accepted_pending -= 1;
            }
            let lag = self.state.policy_version.saturating_sub(t.policy_version);
            if !sync && lag > self.runtime.max_policy_lag {
                self.counters.dropped_stale += 1;
            } else if !accepted {
                self.counters.rejected += 1;
            } else {
                lags.push(lag);
                batch.push(t);
            }
        }
        if batch.is_empty() {
            return Ok(false);
        }
        self.counters.trained += batch.len() as u64;
        self.lags.extend(&lags);
        let iterations = self.objective.iterations();
        for i in 1..=iterations {
            self.optimize(&batch, i == iterations)?;
        }
        Ok(true)
    }

    /// One optimizer step on `batch`, logged; the batch's policy lags are
    /// logged with each of its steps and cleared after its `last`.
    fn optimize(&mut self, batch: &[Trajectory], last: bool) -> Result<()> {
        let t0 = Instant::now();
        // Each data-parallel rank its shard, the sums taken before clipping;
        // a batch smaller than the world is taken whole by every rank
        // (identical, nothing to sum).
        let split = self.group.filter(|g| batch.len() >= g.world());
        let shard = parallel::shard_range(batch.len(), split);
        let out = self.objective.loss(self.policy, batch, shard)?;
        out.loss.backward();
        let (mut loss, mut tokens, mut metrics) =
            (out.loss.double_value(&[]), out.tokens, out.metrics);
        if let Some(g) = split {
            parallel::sum_step(g, &self.opt, &mut loss, &mut tokens, &mut metrics)?;
        }
        let grad_norm = if self.cfg.max_grad_norm > 0.0 {
            self.opt.clip_grad_norm(self.cfg.max_grad_norm)
        } else {
            self.opt.grad_norm()
        };
        let schedule = Schedule {
            kind: ScheduleKind::Constant,
            warmup_steps: self.cfg.warmup_steps,
            total_steps: 0,
        };
        let lr = schedule.lr(self.cfg.lr, self.state.step);
        crate::infra::ensure_finite(self.name, self.state.step + 1, loss, grad_norm, lr)?;
        self.opt.step(lr);
        self.opt.zero_grad();
        self.state.step += 1;
        self.state.tokens_seen += tokens;

        let step = self.state.step as u64;
        if self.state.step.is_multiple_of(self.cfg.log_every.max(1)) {
            let m = &mut *self.metrics;
            m.scalar("train/loss", step, loss);
            m.scalar("train/learning_rate", step, lr);
            m.scalar("train/grad_norm", step, grad_norm);
            for (k, v) in &metrics {
                m.scalar(&format!("train/{k}"), step, *v);
            }
            let lags = if last {
                std::mem::take(&mut self.lags)
            } else {
                self.lags.clone()
            };
            let avg = lags.iter().sum::<u64>() as f64 / lags.len().max(1) as f64;
            m.scalar("train/version_diff_avg", step, avg);
            m.scalar(
                "train/version_diff_max",
                step,
                lags.iter().copied().max().unwrap_or(0) as f64,
            );
            m.scalar(
                "train/version_diff_min",
                step,
                lags.iter().copied().min().unwrap_or(0) as f64,
            );
            m.scalar(
                "perf/learner_tokens_per_s",
                step,
                tokens as f64 / t0.elapsed().as_secs_f64(),
            );
        }
        Ok(())
    }

    /// A new policy version for the actors: copied under no_grad after the
    /// optimizer step, swapped in atomically.
    fn publish(&mut self) {
        self.state.policy_version += 1;
        self.slot.publish(PolicySnapshot::capture(
            self.policy,
            self.state.policy_version,
        ));
    }

    fn tick(&mut self, queue: &TrajectoryQueue<ActorMsg>, force: bool) {
        self.count_panics();
        self.monitor.tick(
            self.metrics,
            &self.state,
            &self.counters,
            queue,
            self.stats,
            force,
        );
    }

    fn count_panics(&mut self) {
        self.counters.panics = self.panics_before + self.panics_elsewhere + self.local_panics();
    }

    /// Panics of this process's actors in this run.
    fn local_panics(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.panics.load(Ordering::Relaxed))
            .sum()
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.count_panics();
        let Some(record) = self.record.as_mut() else {
            return Ok(());
        };
        // Store first: the checkpoint must never count records the disk may lose.
        record.store.sync()?;
        self.state.elapsed_s = self.elapsed_before + self.started.elapsed().as_secs_f64();
        self.counters.stored = record.store.len() as u64;
        self.state.extra = serde_json::to_value(&self.counters)?;
        record
            .ckpts
            .save(self.policy, &self.opt, &self.state)
            .with_context(|| format!("{}: saving a checkpoint", self.name))?;
        Ok(())
    }
}

/// Throughput, lag and queue metrics, and the terminal status line.
struct Monitor {
    bar: ProgressBar,
    total: usize,
    finished: usize,
    last: Instant,
    last_rollouts: u64,
    last_tokens: u64,
    last_idle_ns: u64,
    last_wait_ns: u64,
    ticks: u64,
}

impl Monitor {
    fn new(total: usize, finished: usize) -> Self {
        let bar = crate::infra::progress::bar(total as u64, "online", "problems")
            .with_position(finished as u64);
        Monitor {
            bar,
            total,
            finished,
            last: Instant::now(),
            last_rollouts: 0,
            last_tokens: 0,
            last_idle_ns: 0,
            last_wait_ns: 0,
            ticks: 0,
        }
    }

    /// At most once a second (or when `force`d): rates since the last tick.
    fn tick(
        &mut self,
        metrics: &mut dyn Metrics,
        state: &TrainerState,
        counters: &Counters,
        queue: &TrajectoryQueue<ActorMsg>,
        stats: &[Stats],
        force: bool,
    ) {
        self.bar.set_position(self.finished.min(self.total) as u64);
        let dt = self.last.elapsed().as_secs_f64();
        if dt < 1.0 && !force {
            return;
        }
        let sum = |f: fn(&actor::ActorStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
        let rollouts = sum(|s| s.rollouts.load(Ordering::Relaxed));
        let tokens = sum(|s| s.tokens.load(Ordering::Relaxed));
        let idle = sum(|s| s.idle_ns.load(Ordering::Relaxed));
        let wait = queue.stats().pop_wait_ns;
        let rollouts_per_s = (rollouts - self.last_rollouts) as f64 / dt;
        let tokens_per_s = (tokens - self.last_tokens) as f64 / dt;
        let idle_frac = (idle - self.last_idle_ns) as f64 / 1e9 / dt / stats.len().max(1) as f64;
        let wait_frac = (wait - self.last_wait_ns) as f64 / 1e9 / dt;
        let versions = stats.iter().map(|s| s.version.load(Ordering::Relaxed));
        let oldest = versions.min().unwrap_or(state.policy_version);
        let step = self.ticks;
        self.ticks += 1;
        metrics.scalar("perf/rollouts_per_s", step, rollouts_per_s);
        metrics.scalar("perf/tokens_per_s", step, tokens_per_s);
        metrics.scalar("queue/depth", step, queue.len() as f64);
        metrics.scalar("queue/dropped_stale", step, counters.dropped_stale as f64);
        metrics.scalar("actor/idle_frac", step, idle_frac.min(1.0));
        metrics.scalar("actor/panics", step, counters.panics as f64);
        metrics.scalar("learner/wait_frac", step, wait_frac.min(1.0));
        metrics.scalar("learner/step", step, state.step as f64);
        self.bar.set_message(format!(
            "| step {} v{} | {:.1} rollouts/s {:.0} tok/s | actors at v{} | queue {} | stale {} | panics {}",
            state.step,
            state.policy_version,
            rollouts_per_s,
            tokens_per_s,
            oldest,
            queue.len(),
            counters.dropped_stale,
            counters.panics,
        ));
        self.last = Instant::now();
        self.last_rollouts = rollouts;
        self.last_tokens = tokens;
        self.last_idle_ns = idle;
        self.last_wait_ns = wait;
    }
}
