//! Rollouts: what an actor does with one problem, behind the runtime's
//! [`Rollout`](crate::runtime::Rollout) boundary. [`sampling`]: N
//! completions scored by a reward (RFT, MedThink and MedCritical attempts,
//! preference pairs); [`mcts`]: MedS3's step-level tree search, independent
//! of the model; [`meds3`]: that search driven by a policy with KV reuse
//! down the tree; [`medcritical`]: attempts with their self-corrections;
//! [`grpo`]: a group of samples or of one tree's leaves, with the per-token
//! advantages of [`advantage`]; [`rloo`]: RLOO's leave-one-out advantage.

pub mod advantage;
pub mod grpo;
pub mod mcts;
pub mod medcritical;
pub mod meds3;
pub mod rloo;
pub mod sampling;
