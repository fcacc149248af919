//! medzero-envs: the problems medzero trains on and how answers are checked.
//!
//! - [`problem`]: `Problem`, `Step`, `Trajectory`, shared by every crate;
//! - [`verify`]: strict answer extraction and checking (REFERENCE 1);
//! - [`loaders`]: the real benchmark formats, with file:record errors;
//! - [`synthclinic`]: a seeded clinical-reasoning world with an oracle teacher.

pub mod atomic;
pub mod loaders;
pub mod problem;
pub mod synthclinic;
pub mod verify;

pub use problem::{
    Choice, Gold, Problem, Provenance, ROOT_TEXT, Step, StepKind, Trajectory, chain_text,
    parse_chain, render_chain, response_steps,
};
