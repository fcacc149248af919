//! A store-only online stage: actors run a rollout over the problems with
//! one model and every trajectory is stored; nothing is trained. The
//! student attempts of MedThink and MedCritical, and MedS3's searches, are
//! collected this way, and resume from the store like any online stage.

use super::learner::{self, LearnerConfig, Objective, ObjectiveLoss, Online, OnlineReport};
use super::parallel;
use super::store::{STORE_FILE, read_trajectories};
use super::{Rollout, RuntimeConfig};
use crate::infra::monitor::Metrics;
use anyhow::{Result, bail};
use medzero_envs::{Problem, Trajectory};
use medzero_policies::Policy;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// Accepts nothing: a collecting stage trains nothing.
struct StoreOnly;

impl Objective for StoreOnly {
    fn accepts(&self, _: &Trajectory) -> bool {
        false
    }
    fn loss(&mut self, _: &Policy, _: &[Trajectory], _: Range<usize>) -> Result<ObjectiveLoss> {
        bail!("a collecting stage trains nothing")
    }
}

/// What to collect.
pub struct Collect<'a> {
    pub name: &'a str,
    /// Where the store (and the runtime's checkpoints) live.
    pub dir: &'a Path,
    /// The model every actor runs.
    pub model_dir: &'a Path,
    pub device: tch::Device,
    pub problems: &'a [Problem],
    pub rollout: &'a dyn Rollout,
    pub runtime: &'a RuntimeConfig,
    pub seed: u64,
    pub metrics: &'a mut dyn Metrics,
    pub stop: &'a AtomicBool,
}

/// Runs (or resumes) the collection; returns every stored trajectory, in
/// store order, and the runtime's report.
pub fn collect(c: Collect) -> Result<(Vec<Trajectory>, OnlineReport)> {
    let (model_dir, device) = (c.model_dir.to_path_buf(), c.device);
    let policy = Policy::load(&model_dir, device, None)?;
    let build = move || Ok(Policy::load(&model_dir, device, None)?);
    let report = learner::run(Online {
        name: c.name,
        dir: c.dir,
        problems: c.problems,
        rollout: c.rollout,
        objective: &mut StoreOnly,
        policy: &policy,
        build_actor_policy: &build,
        runtime: c.runtime,
        learner: &LearnerConfig::default(),
        seed: c.seed,
        metrics: c.metrics,
        stop: c.stop,
    })?;
    // Rank 0 keeps the store; every rank of a distributed run goes on with
    // what it holds (the later stages run on each of them).
    let group = medzero_dist::world();
    let stored = if group.is_some_and(|g| g.rank() > 0) {
        Vec::new()
    } else {
        read_trajectories(&c.dir.join(STORE_FILE), false)?
    };
    let stored = match group {
        Some(g) => parallel::broadcast_json(g, &stored)?,
        None => stored,
    };
    Ok((stored, report))
}
