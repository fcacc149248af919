//! The composition root: the experiment config (every table and the stage
//! list, validated at load), `--set` overrides, the base student, and the
//! runner that walks the stages in a resumable run folder. The only module
//! that knows the whole config.

pub mod config;
pub mod overrides;
pub mod runner;
pub mod student;

pub use config::{Config, QUICKSTART};
pub use runner::{RunOutcome, run};
