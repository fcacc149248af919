//! Versioned weight publication from the learner to the actors.
//!
//! The learner captures a [`PolicySnapshot`] after an optimizer step (copies
//! made under no_grad, so the optimizer can step on while actors read) and
//! publishes it into a [`WeightSlot`]: an atomically swapped pointer plus a
//! version counter. Actors compare the counter between rollouts and adopt the
//! newest snapshot with `copy_` into their own model. Neither side ever waits
//! on the other: publishing is a pointer swap, adopting reads an immutable
//! snapshot.

use anyhow::{Result, bail};
use arc_swap::ArcSwap;
use medzero_policies::Policy;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tch::Tensor;

/// A tensor that is never written after construction.
pub struct Frozen(Tensor);

// SAFETY: tch marks Tensor !Sync because methods taking `&self` may mutate in
// place. A `Frozen` tensor is created from a fresh copy and only ever used as
// the source of `copy_`, a read; libtorch allows concurrent reads of a tensor.
unsafe impl Sync for Frozen {}

/// The learner's weights at one version.
pub struct PolicySnapshot {
    pub version: u64,
    /// When the capture began (right after the optimizer step).
    pub captured: Instant,
    tensors: HashMap<String, Frozen>,
}

impl PolicySnapshot {
    /// Copies every variable of `policy` (on its device), detached.
    pub fn capture(policy: &Policy, version: u64) -> PolicySnapshot {
        let captured = Instant::now();
        let tensors = tch::no_grad(|| {
            policy
                .named_parameters()
                .into_iter()
                .map(|(name, t)| (name, Frozen(t.detach().copy())))
                .collect()
        });
        PolicySnapshot {
            version,
            captured,
            tensors,
        }
    }

    /// Writes the snapshot into `policy`'s variables (same names and shapes).
    pub fn apply(&self, policy: &Policy) -> Result<()> {
        let params = policy.named_parameters();
        if params.len() != self.tensors.len() {
            bail!(
                "snapshot v{} has {} tensors, the policy {}",
                self.version,
                self.tensors.len(),
                params.len()
            );
        }
        tch::no_grad(|| {
            for (name, mut dst) in params {
                let Some(src) = self.tensors.get(&name) else {
                    bail!("snapshot v{} lacks {name}", self.version)
                };
                if src.0.size() != dst.size() {
                    bail!(
                        "snapshot v{}: {name} has shape {:?}, the policy {:?}",
                        self.version,
                        src.0.size(),
                        dst.size()
                    );
                }
                dst.copy_(&src.0);
            }
            Ok(())
        })
    }

    /// The tensors by name, in name order (a policy's variable order).
    pub fn named(&self) -> Vec<(&str, &Tensor)> {
        let mut v: Vec<(&str, &Tensor)> = self
            .tensors
            .iter()
            .map(|(n, t)| (n.as_str(), &t.0))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    pub fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.0.numel() * t.0.kind().elt_size_in_bytes())
            .sum()
    }
}

/// Where the learner publishes and actors look.
pub struct WeightSlot {
    current: ArcSwap<PolicySnapshot>,
    version: AtomicU64,
}

impl WeightSlot {
    pub fn new(first: PolicySnapshot) -> WeightSlot {
        let version = AtomicU64::new(first.version);
        WeightSlot {
            current: ArcSwap::from_pointee(first),
            version,
        }
    }

    /// Makes `snapshot` the newest; older versions are dropped once no actor
    /// holds them.
    pub fn publish(&self, snapshot: PolicySnapshot) {
        let v = snapshot.version;
        self.current.store(Arc::new(snapshot));
        self.version.store(v, Ordering::Release);
    }

    /// The newest version number: a single atomic load, cheap to poll.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The newest snapshot.
    pub fn current(&self) -> Arc<PolicySnapshot> {
        self.current.load_full()
    }

    /// The newest snapshot, if newer than `have`.
    pub fn newer_than(&self, have: u64) -> Option<Arc<PolicySnapshot>> {
        if self.version() <= have {
            return None;
        }
        let s = self.current.load_full();
        (s.version > have).then_some(s)
    }
}
