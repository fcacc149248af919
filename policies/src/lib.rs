//! medzero-policies: the models behind actors and the learner, on libtorch.
//!
//! So far it holds what every figure medzero prints must be stamped with: the
//! device, threads, dtype and library versions ([`device`]). Transformer LMs,
//! tokenizers, KV-cache generation and the PRM head come with the policies
//! issue.

pub mod device;
