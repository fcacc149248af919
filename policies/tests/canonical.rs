//! Sampling from a word-level policy is canonical: whatever an untrained
//! model draws, the text of prompt + completion encodes back to exactly the
//! ids that were sampled, so a learner that re-encodes text sees the tokens
//! the actor sampled, and a cached row equals a fresh prefill of its text.

use medzero_policies::llama::DecoderConfig;
use medzero_policies::tokenizer::Tokenizer;
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn every_sampled_sequence_encodes_back_to_its_ids() {
    let text = "Step 1: Serum sodium of 150 mmol/L is above the reference range of \
                135-145 mmol/L, indicating high serum sodium.\n\nStep 2: The answer is \
                Valnard syndrome (B).";
    let tok = Tokenizer::word_level([text], 1);
    let cfg = DecoderConfig::tiny_qwen2(tok.vocab_size() as i64, tok.eos_id());
    let policy = Policy::new_random(&cfg, tok, tch::Device::Cpu, 3).unwrap();
    let tok = &policy.tokenizer;
    let prompts: Vec<Vec<i64>> = ["Step 1: Serum", "Step 2: range of 135-", "Step 2:\n"]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect();
    // Hot sampling from random weights draws from nearly the whole vocabulary.
    let params = SamplingParams {
        max_new_tokens: 40,
        temperature: 3.0,
        ..SamplingParams::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut checked, mut pairs) = (0, 0);
    for round in 0..8 {
        let outs = if round % 2 == 0 {
            policy.generate(&prompts, &params, &mut rng).unwrap()
        } else {
            policy
                .generate_uncached(&prompts, &params, &mut rng)
                .unwrap()
        };
        for (prompt, g) in prompts.iter().zip(&outs) {
            let sampled: Vec<i64> = g
                .tokens
                .iter()
                .copied()
                .filter(|&t| t != tok.eos_id())
                .collect();
            let ids: Vec<i64> = prompt.iter().chain(&sampled).copied().collect();
            let text = tok.decode(&ids).unwrap();
            assert_eq!(tok.encode(&text).unwrap(), ids, "{text:?}");
            checked += 1;
            pairs += sampled.len();
        }
    }
    assert!(
        checked == 24 && pairs > 400,
        "{checked} sequences, {pairs} tokens"
    );
}
