//! Actor threads run a pluggable [`Rollout`] on problems from the shared
//! [`ProblemSource`], pushing the trajectories into the bounded queue to the
//! learner. An actor either owns a policy copy (`runtime.placement =
//! "per_actor"`), adopting the newest published weights between rollouts,
//! or generates through the inference service (`"shared"`), which holds the
//! one copy and swaps weights itself. A rollout that panics is caught, the
//! actor rebuilt from the current weights and the problem handed back.

use super::queue::TrajectoryQueue;
use super::service::{Client, Generate};
use super::source::{Next, ProblemSource, WorkItem};
use super::weights::{PolicySnapshot, WeightSlot};
use anyhow::{Result, bail};
use crossbeam::utils::{Backoff, CachePadded};
use medzero_envs::{Problem, Trajectory};
use medzero_policies::Policy;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What an actor does with one problem: sampling, MCTS, a teacher
/// correction... Shared by all actors of a stage, so it holds configuration,
/// not per-actor state; the policy and the random stream are the actor's.
pub trait Rollout: Send + Sync {
    /// The ids of the trajectories [`rollout`](Self::rollout) makes for
    /// `problem`, whatever the policy and the random draws: a resumed stage
    /// knows from them which problems are finished.
    fn ids(&self, problem: &Problem) -> Vec<String>;

    /// The trajectories of one problem. The actor stamps each with its policy
    /// version and name afterwards.
    fn rollout(&self, policy: &Policy, problem: &Problem, rng: &mut ChaCha8Rng) -> Result<Rolled>;

    /// Whether [`rollout_served`](Self::rollout_served) is implemented: the
    /// rollout generates only through [`Generate`](super::service::Generate).
    fn servable(&self) -> bool {
        false
    }

    /// [`rollout`](Self::rollout) through the inference service, with the
    /// same trajectories for the same random stream.
    fn rollout_served(
        &self,
        client: &Client,
        problem: &Problem,
        rng: &mut ChaCha8Rng,
    ) -> Result<Rolled> {
        let _ = (client, problem, rng);
        bail!("this rollout needs a model of its own: use runtime.placement = \"per_actor\"")
    }
}

/// A rollout that generates only through [`Generate`], so it runs on an
/// actor's own policy and through the inference service alike, with the same
/// trajectories for the same random stream.
pub trait ServedRollout: Send + Sync {
    /// As [`Rollout::ids`].
    fn ids(&self, problem: &Problem) -> Vec<String>;
    fn roll<G: Generate>(
        &self,
        model: &G,
        problem: &Problem,
        rng: &mut ChaCha8Rng,
    ) -> Result<Rolled>;
}

impl<T: ServedRollout> Rollout for T {
    fn ids(&self, problem: &Problem) -> Vec<String> {
        ServedRollout::ids(self, problem)
    }
    fn rollout(&self, policy: &Policy, problem: &Problem, rng: &mut ChaCha8Rng) -> Result<Rolled> {
        self.roll(policy, problem, rng)
    }
    fn servable(&self) -> bool {
        true
    }
    fn rollout_served(
        &self,
        client: &Client,
        problem: &Problem,
        rng: &mut ChaCha8Rng,
    ) -> Result<Rolled> {
        self.roll(client, problem, rng)
    }
}

/// Where an actor's generations come from.
pub enum Model<'a> {
    /// A policy copy of its own, made by this (any weights: the current
    /// snapshot is copied in).
    Own(&'a (dyn Fn() -> Result<Policy> + Sync)),
    /// The inference service.
    Served(Client<'a>),
    /// Rollouts that run elsewhere, with weights this actor sends there.
    Remote(Box<dyn RemoteRollouts + 'a>),
}

/// An actor's rollouts run by another process (an actor rank of a
/// distributed run: `runtime::remote`).
pub trait RemoteRollouts: Send {
    /// Where they run, for messages.
    fn rank(&self) -> usize;
    /// Makes the far side hold `snapshot`'s weights (a no-op if it does).
    fn sync(&mut self, snapshot: &PolicySnapshot) -> Result<()>;
    /// Problem `index`'s rollout there, on the problem's own random stream:
    /// `Err` when the link fails (the actor stops), `Ok(Err)` when the
    /// rollout did (the problem fails).
    fn rollout(&self, index: usize, attempt: u32) -> Result<Result<Rolled>>;
}

/// What one rollout produced.
pub struct Rolled {
    pub trajectories: Vec<Trajectory>,
    /// Every token generated, kept or not (MCTS generates far more than the
    /// chains it keeps): what `perf/tokens_per_s` counts.
    pub generated_tokens: u64,
    /// Trajectories the reward could not grade (a malformed judge reply):
    /// scored 0 and counted in the stage's report.
    pub reward_failures: u64,
}

/// What actors tell the learner (and data-parallel ranks tell rank 0).
#[derive(Serialize, Deserialize)]
pub enum ActorMsg {
    Done {
        item: WorkItem,
        trajectories: Vec<Trajectory>,
        generated_tokens: u64,
        reward_failures: u64,
    },
    /// The problem will not be done in this run: the rollout returned an
    /// error, or panicked on every attempt.
    Failed {
        item: WorkItem,
        problem_id: String,
        error: String,
    },
}

impl ActorMsg {
    pub fn item(&self) -> WorkItem {
        match self {
            ActorMsg::Done { item, .. } | ActorMsg::Failed { item, .. } => *item,
        }
    }
}

/// One actor's counters, written only by that actor and read by the learner
/// for monitoring. Cache-padded so actors never share a line.
#[derive(Default)]
pub struct ActorStats {
    pub rollouts: AtomicU64,
    /// Tokens generated.
    pub tokens: AtomicU64,
    /// Time spent waiting: for work (a closed round gate) or for room in the queue.
    pub idle_ns: AtomicU64,
    pub panics: AtomicU64,
    /// The policy version the actor holds.
    pub version: AtomicU64,
}

pub type Stats = CachePadded<ActorStats>;

/// Attempts at a problem before it is reported failed.
pub const MAX_ATTEMPTS: u32 = 3;

/// The random stream of one problem: a pure function of the stage seed and
/// the problem's index, so the same problem draws the same numbers whichever
/// actor takes it and however often the stage is resumed.
pub fn problem_rng(seed: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    rng
}

/// Everything an actor thread shares with the others.
pub struct Shared<'a> {
    pub problems: &'a [Problem],
    pub source: &'a ProblemSource,
    pub queue: &'a TrajectoryQueue<ActorMsg>,
    pub slot: &'a WeightSlot,
    pub rollout: &'a dyn Rollout,
    pub seed: u64,
    /// Stage name, for provenance.
    pub stage: &'a str,
    /// libtorch intra-op threads of each actor (0: leave as is).
    pub threads: usize,
    /// Fault injection for tests: the first attempt at every problem whose
    /// index is a multiple of this panics (0: off).
    pub inject_panic_every: usize,
}

/// Runs actor `id` until the source is done or the queue closed.
pub fn run(id: usize, shared: &Shared, stats: &Stats, model: Model) -> Result<()> {
    if shared.threads > 0 {
        // OpenMP's thread count is per calling thread: this sets the actor's own.
        tch::set_num_threads(shared.threads as i32);
    }
    let name = format!("actor-{id}");
    // An own policy is built here (and rebuilt after a panic).
    let (mut live, mut version) = match model {
        Model::Own(build) => {
            let (policy, v) = restart(shared, build)?;
            (Live::Own { policy, build }, v)
        }
        Model::Served(client) => (Live::Served(client), shared.slot.version()),
        Model::Remote(remote) => (Live::Remote(remote), shared.slot.version()),
    };
    stats.version.store(version, Ordering::Relaxed);
    let backoff = Backoff::new();
    loop {
        let item = match shared.source.next() {
            Next::Done => return Ok(()),
            Next::Wait => {
                let t = Instant::now();
                if backoff.is_completed() {
                    std::thread::sleep(Duration::from_micros(200));
                } else {
                    backoff.snooze();
                }
                stats.idle_ns.fetch_add(nanos(t), Ordering::Relaxed);
                continue;
            }
            Next::Item(item) => item,
        };
        backoff.reset();
        // Checked after taking the item: a round's weights are published
        // before its items are released, so this sees them.
        match &mut live {
            Live::Own { policy, .. } => {
                if let Some(s) = shared.slot.newer_than(version) {
                    s.apply(policy)?;
                    version = s.version;
                }
            }
            // The service swaps weights itself; a rollout is stamped with the
            // oldest version that served it (or the current one, if none did).
            Live::Served(client) => {
                client.take_oldest_version();
                version = shared.slot.version();
            }
            Live::Remote(remote) => {
                let snapshot = shared.slot.current();
                remote.sync(&snapshot)?;
                version = snapshot.version;
            }
        }
        stats.version.store(version, Ordering::Relaxed);
        let problem = &shared.problems[item.index];
        let mut rng = problem_rng(shared.seed, item.index);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if shared.inject_panic_every > 0
                && item.index % shared.inject_panic_every == 0
                && item.attempt == 0
            {
                panic!("injected fault (runtime.inject_panic_every)");
            }
            match &live {
                Live::Own { policy, .. } => Ok(shared.rollout.rollout(policy, problem, &mut rng)),
                Live::Served(client) => {
                    Ok(shared.rollout.rollout_served(client, problem, &mut rng))
                }
                // The rank draws from the same stream; a failed link fails
                // the actor (the outer error), a failed rollout the problem.
                Live::Remote(remote) => remote.rollout(item.index, item.attempt),
            }
        }));
        let outcome = match outcome {
            Ok(Err(link)) => {
                let rank = match &live {
                    Live::Remote(r) => r.rank(),
                    _ => 0,
                };
                return Err(link.context(format!("the link to actor rank {rank} failed")));
            }
            Ok(Ok(r)) => Ok(r),
            Err(panic) => Err(panic),
        };
        if let Live::Served(client) = &live
            && let Some(v) = client.take_oldest_version()
        {
            version = v;
        }
        let msg = match outcome {
            Ok(Ok(Rolled {
                mut trajectories,
                generated_tokens,
                reward_failures,
            })) => {
                for t in &mut trajectories {
                    t.policy_version = version;
                    t.provenance.producer = name.clone();
                    t.provenance.stage = shared.stage.to_string();
                }
                stats.rollouts.fetch_add(1, Ordering::Relaxed);
                stats.tokens.fetch_add(generated_tokens, Ordering::Relaxed);
                ActorMsg::Done {
                    item,
                    trajectories,
                    generated_tokens,
                    reward_failures,
                }
            }
            Ok(Err(e)) => ActorMsg::Failed {
                item,
                problem_id: problem.id.clone(),
                error: format!("{e:#}"),
            },
            Err(panic) => {
                let what = panic_message(&panic);
                stats.panics.fetch_add(1, Ordering::Relaxed);
                let retry = item.attempt + 1 < MAX_ATTEMPTS;
                eprintln!(
                    "{name}: rollout of problem {} panicked (attempt {}/{MAX_ATTEMPTS}): {what}; restarting the actor{}",
                    problem.id,
                    item.attempt + 1,
                    if retry {
                        " and re-queueing the problem"
                    } else {
                        ""
                    }
                );
                if let Live::Own { policy, build } = &mut live {
                    (*policy, version) = restart(shared, *build)?;
                    stats.version.store(version, Ordering::Relaxed);
                }
                if retry {
                    shared.source.retry(item);
                    continue;
                }
                ActorMsg::Failed {
                    item,
                    problem_id: problem.id.clone(),
                    error: format!("panicked {MAX_ATTEMPTS} times: {what}"),
                }
            }
        };
        let t = Instant::now();
        let pushed = shared.queue.push(msg);
        stats.idle_ns.fetch_add(nanos(t), Ordering::Relaxed);
        if pushed.is_err() {
            // The learner closed the queue: the stage is stopping.
            return Ok(());
        }
    }
}

/// An actor's model while it runs (one per actor thread, so its size is
/// of no concern).
#[allow(clippy::large_enum_variant)]
enum Live<'a> {
    Own {
        policy: Policy,
        build: &'a (dyn Fn() -> Result<Policy> + Sync),
    },
    Served(Client<'a>),
    Remote(Box<dyn RemoteRollouts + 'a>),
}

/// A fresh policy holding the newest published weights.
fn restart(shared: &Shared, build: &dyn Fn() -> Result<Policy>) -> Result<(Policy, u64)> {
    let policy = build()?;
    let snapshot = shared.slot.current();
    snapshot.apply(&policy)?;
    Ok((policy, snapshot.version))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
