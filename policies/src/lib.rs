//! medzero-policies: the models behind actors and the learner, on libtorch.
//!
//! - [`llama`]: the Llama/Qwen2 decoder family, HF configs in and out;
//! - [`weights`]: HF safetensors loading (with exact mismatch errors) and saving;
//! - [`manifest`]: checksums of the folders medzero writes, verified on load;
//! - [`tokenizer`]: HF `tokenizer.json`, and SynthClinic's word-level one;
//! - [`chat_template`]: a model's own Jinja chat template, as HF renders it;
//! - [`rows`], [`generate`]: batched cached generation over rows that hold
//!   their exact token ids, sampling with a random stream per row, prefix forking;
//! - [`engine`]: continuous batching of many decode requests on one model copy;
//! - [`policy`]: the handle actors and the learner use;
//! - [`prm`]: the process reward model's 2-class head;
//! - [`optim`]: AdamW with exportable state, LR schedules, gradient clipping;
//! - [`device`]: where computation runs, and the stamp every figure carries;
//! - [`peer`]: the Python interpreter the parity peers run in.

pub mod chat_template;
pub mod device;
pub mod engine;
pub mod generate;
mod kv_cache;
pub mod llama;
pub mod manifest;
pub mod optim;
pub mod peer;
pub mod policy;
pub mod prm;
pub mod rows;
pub mod tokenizer;
pub mod weights;

pub use generate::{Finish, Generation, SamplingParams};
pub use llama::{DType, DecoderConfig};
pub use policy::{Policy, PolicyError};
pub use rows::{Rows, SyncReport};
