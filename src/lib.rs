//! medzero: self-play reinforcement learning of small language models on
//! clinical reasoning. This crate holds the runtime and the algorithms that
//! compose the envs, policies and rewards crates; `medzero` is its CLI.

pub mod baselines;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod dpo;
pub mod eval;
pub mod experiment;
pub mod http_teacher;
pub mod kto;
pub mod mcts;
pub mod medcritical;
pub mod meds3;
pub mod medthink;
pub mod monitor;
pub mod preference;
pub mod rejection_sampling;
pub mod results;
pub mod runtime;
pub mod sampling;
pub mod selection;
pub mod sft;
pub mod signals;
pub mod teacher;
pub mod trainer;
