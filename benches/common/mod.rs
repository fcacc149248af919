//! The quickstart student's shape with random weights, for the benches.

use medzero_policies::Policy;
use medzero_policies::llama::DecoderConfig;
use medzero_policies::tokenizer::Tokenizer;

/// Hidden 128, 4 layers, 4 heads (2 kv) of 32, MLP 256, context 1024.
pub fn student(tok: Tokenizer) -> Policy {
    let mut cfg = DecoderConfig::tiny_qwen2(tok.vocab_size() as i64, tok.eos_id());
    (
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
    ) = (128, 4, 4, 2);
    cfg.head_dim = 32;
    cfg.intermediate_size = 256;
    cfg.max_position_embeddings = 1024;
    Policy::new_random(&cfg, tok, tch::Device::Cpu, 0).unwrap()
}
