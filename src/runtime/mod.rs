//! The actor/learner runtime's building blocks: versioned weight publication
//! ([`weights`]) and the durable per-stage trajectory store ([`store`]).

pub mod store;
pub mod weights;
