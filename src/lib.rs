//! medzero: self-play reinforcement learning of small language models on
//! clinical reasoning. This crate holds the runtime and the algorithms that
//! compose the envs, policies and rewards crates; `medzero` is its CLI.
//!
//! Layers, each importing only its own or lower ones (`tests/layers.rs`
//! checks it): [`infra`] <- [`runtime`] <- [`train`], [`rollout`],
//! [`teacher`], [`eval`] <- [`stages`] <- [`experiment`] <- [`cli`].

pub mod cli;
pub mod eval;
pub mod experiment;
pub mod infra;
pub mod rollout;
pub mod runtime;
pub mod stages;
pub mod teacher;
pub mod train;
