//! The actor/learner runtime: actor threads with their own policy copies
//! ([`actor`]) take problems from a lock-free [`source`] and hand
//! trajectories through a bounded lock-free [`queue`] to the [`learner`],
//! which stores them durably ([`store`]), trains and publishes versioned
//! weights ([`weights`]) that actors adopt between rollouts. The inference
//! [`service`] instead serves many rollouts from one model copy, batching
//! their decode steps.

pub mod actor;
pub mod collect;
pub mod learner;
pub mod parallel;
pub mod queue;
pub mod remote;
pub mod service;
pub mod source;
pub mod store;
pub mod weights;

pub use actor::{Rolled, Rollout};
pub use learner::{LearnerConfig, Mode, Objective, ObjectiveLoss, Placement, RuntimeConfig};
