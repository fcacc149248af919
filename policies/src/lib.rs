//! medzero-policies: the models behind actors and the learner, on libtorch.
//!
//! - [`llama`]: the Llama/Qwen2 decoder family, HF configs in and out;
//! - [`weights`]: HF safetensors loading (with exact mismatch errors) and saving;
//! - [`tokenizer`]: HF `tokenizer.json`, and SynthClinic's word-level one;
//! - [`kv_cache`], [`generate`]: batched cached generation, sampling, prefix forking;
//! - [`policy`]: the handle actors and the learner use;
//! - [`prm`]: the process reward model's 2-class head;
//! - [`optim`]: AdamW with exportable state, LR schedules, gradient clipping;
//! - [`device`]: the stamp every figure carries.

pub mod device;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod optim;
pub mod policy;
pub mod prm;
pub mod tokenizer;
pub mod weights;

pub use generate::{Finish, Generation, SamplingParams};
pub use llama::{DType, DecoderConfig};
pub use policy::{Policy, PolicyError};
