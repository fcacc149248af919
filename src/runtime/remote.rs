//! Actor ranks: with `runtime.actor_ranks` in a run of several processes,
//! rank 0 runs the learner and ranks 1.. only generate. On rank 0 one actor
//! thread per actor rank ([`RemoteActor`]) takes problems from the source as
//! a local actor does, sends the rank the newest weights when it holds older
//! ones, then the problem, and receives the trajectories; everything else
//! (rounds, lag accounting, the store, resume) is the runtime's as with
//! local actors. The actor rank ([`serve`]) runs the same rollout on the
//! same per-problem random stream, so the trajectories are those a local
//! actor with the same weights makes. Messages are c10d point-to-point
//! sends over the run's Gloo group: a header `[kind, a, b]` of i64, then
//! the weights tensor by tensor, or the reply as JSON bytes.

use super::actor::{RemoteRollouts, Rolled, Rollout, problem_rng};
use super::weights::PolicySnapshot;
use anyhow::{Context, Result, bail};
use medzero_dist::Group;
use medzero_envs::{Problem, Trajectory};
use medzero_policies::Policy;
use serde::{Deserialize, Serialize};
use std::panic::{AssertUnwindSafe, catch_unwind};
use tch::{Kind, Tensor};

const TAG_REQUEST: i32 = 11;
const TAG_WEIGHTS: i32 = 12;
const TAG_REPLY: i32 = 13;

const WEIGHTS: i64 = 1;
const PROBLEM: i64 = 2;
/// The stage's final weights; the actor rank returns after adopting them,
/// so every rank leaves the stage with the learner's model.
const FINAL: i64 = 3;

#[derive(Serialize, Deserialize)]
enum Reply {
    Rolled {
        trajectories: Vec<Trajectory>,
        generated_tokens: u64,
        reward_failures: u64,
    },
    Failed(String),
}

/// Rank 0's side of one actor rank.
pub struct RemoteActor<'g> {
    group: &'g Group,
    rank: usize,
    /// The policy version the rank holds (none before the first send).
    holds: Option<u64>,
}

impl<'g> RemoteActor<'g> {
    pub fn new(group: &'g Group, rank: usize) -> Self {
        RemoteActor {
            group,
            rank,
            holds: None,
        }
    }

    fn header(&self, kind: i64, a: i64, b: i64) -> Result<()> {
        let h = Tensor::from_slice(&[kind, a, b]);
        Ok(self.group.send(&h, self.rank, TAG_REQUEST)?)
    }

    fn send_tensors(&self, tensors: &[(&str, &Tensor)]) -> Result<()> {
        for (_, t) in tensors {
            self.group.send(t, self.rank, TAG_WEIGHTS)?;
        }
        Ok(())
    }

    /// Sends the stage's final weights; the rank's [`serve`] returns.
    pub fn finish(&self, policy: &Policy) -> Result<()> {
        let named = policy.named_parameters();
        self.header(FINAL, 0, named.len() as i64)?;
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        self.send_tensors(&refs)
    }
}

impl RemoteRollouts for RemoteActor<'_> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn sync(&mut self, snapshot: &PolicySnapshot) -> Result<()> {
        if self.holds == Some(snapshot.version) {
            return Ok(());
        }
        let named = snapshot.named();
        self.header(WEIGHTS, snapshot.version as i64, named.len() as i64)?;
        self.send_tensors(&named)?;
        self.holds = Some(snapshot.version);
        Ok(())
    }

    fn rollout(&self, index: usize, attempt: u32) -> Result<Result<Rolled>> {
        self.header(PROBLEM, index as i64, attempt as i64)?;
        let mut len = Tensor::zeros([1], (Kind::Int64, tch::Device::Cpu));
        let wait = Some(self.group.timeout());
        self.group.recv(&mut len, self.rank, TAG_REPLY, wait)?;
        let mut bytes = Tensor::zeros([len.int64_value(&[0])], (Kind::Uint8, tch::Device::Cpu));
        self.group.recv(&mut bytes, self.rank, TAG_REPLY, wait)?;
        let bytes: Vec<u8> = Vec::try_from(&bytes)?;
        let reply: Reply = serde_json::from_slice(&bytes)
            .with_context(|| format!("rank {}'s reply does not parse", self.rank))?;
        Ok(match reply {
            Reply::Rolled {
                trajectories,
                generated_tokens,
                reward_failures,
            } => Ok(Rolled {
                trajectories,
                generated_tokens,
                reward_failures,
            }),
            Reply::Failed(e) => Err(anyhow::anyhow!("on rank {}: {e}", self.rank)),
        })
    }
}

/// An actor rank's stage: serves rank 0's requests with `policy` until the
/// final weights come, which it adopts. Waits for requests as long as rank
/// 0 lives (the learner may train for long between rounds).
pub fn serve(
    group: &Group,
    policy: &Policy,
    rollout: &dyn Rollout,
    problems: &[Problem],
    seed: u64,
) -> Result<()> {
    loop {
        let mut h = Tensor::zeros([3], (Kind::Int64, tch::Device::Cpu));
        group.recv(&mut h, 0, TAG_REQUEST, None)?;
        let h: Vec<i64> = Vec::try_from(&h)?;
        match h[0] {
            WEIGHTS | FINAL => {
                let params = policy.named_parameters();
                if params.len() as i64 != h[2] {
                    bail!(
                        "rank {}: rank 0 sends {} tensors, this policy has {}: the ranks run \
                         different models",
                        group.rank(),
                        h[2],
                        params.len()
                    );
                }
                tch::no_grad(|| -> Result<()> {
                    for (_, t) in &params {
                        group.recv(
                            &mut t.shallow_clone(),
                            0,
                            TAG_WEIGHTS,
                            Some(group.timeout()),
                        )?;
                    }
                    Ok(())
                })?;
                if h[0] == FINAL {
                    return Ok(());
                }
            }
            PROBLEM => {
                let index = h[1] as usize;
                let Some(problem) = problems.get(index) else {
                    bail!(
                        "rank {}: rank 0 asks for problem {index} of {}",
                        group.rank(),
                        problems.len()
                    );
                };
                let mut rng = problem_rng(seed, index);
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    rollout.rollout(policy, problem, &mut rng)
                }));
                let reply = match outcome {
                    Ok(Ok(r)) => Reply::Rolled {
                        trajectories: r.trajectories,
                        generated_tokens: r.generated_tokens,
                        reward_failures: r.reward_failures,
                    },
                    Ok(Err(e)) => Reply::Failed(format!("{e:#}")),
                    Err(_) => Reply::Failed("the rollout panicked".into()),
                };
                let bytes = serde_json::to_vec(&reply)?;
                group.send(&Tensor::from_slice(&[bytes.len() as i64]), 0, TAG_REPLY)?;
                group.send(&Tensor::from_slice(&bytes), 0, TAG_REPLY)?;
            }
            k => bail!("rank {}: unknown request {k} from rank 0", group.rank()),
        }
    }
}
