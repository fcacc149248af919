//! The actor/learner runtime's building blocks: versioned weight publication
//! ([`weights`]).

pub mod weights;
