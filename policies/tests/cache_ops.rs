//! Continuing a cached prefix, as MCTS does from a node: growing a row's cache
//! and appending forced tokens gives the logits of running the whole sequence
//! at once, and greedy decoding continues identically.

use medzero_policies::llama::DecoderConfig;
use medzero_policies::tokenizer::Tokenizer;
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn tiny() -> Policy {
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let tok = Tokenizer::word_level([words.join(" ").as_str()], 1);
    let cfg = DecoderConfig::tiny_qwen2(tok.vocab_size() as i64, tok.eos_id());
    Policy::new_random(&cfg, tok, tch::Device::Cpu, 5).unwrap()
}

#[test]
fn grown_and_extended_cache_matches_a_full_prefill() {
    let policy = tiny();
    let prompts = vec![vec![5, 9, 11, 7], vec![6, 8, 10, 12, 14, 16]];
    let forced = vec![vec![20, 21, 22], vec![23, 24, 25]];
    // Reference: the whole sequences through a fresh prefill.
    let whole: Vec<Vec<i64>> = prompts
        .iter()
        .zip(&forced)
        .map(|(p, f)| p.iter().chain(f).copied().collect())
        .collect();
    let (_, reference, _) = policy.prefill(&whole, 8).unwrap();
    // Prefill the prompts with no spare room, take the rows in reverse order
    // into a grown cache, then force the extra tokens in.
    let (cache, _, pos) = policy.prefill(&prompts, 0).unwrap();
    assert_eq!(cache.remaining(), 0);
    let mut grown = cache.select_with_room(&[1, 0], 3 + 8);
    let pos = pos.index_select(0, &tch::Tensor::from_slice(&[1i64, 0]));
    let swapped = vec![forced[1].clone(), forced[0].clone()];
    let (logits, next) = policy.extend(&mut grown, &swapped, &pos);
    let reordered = logits.index_select(0, &tch::Tensor::from_slice(&[1i64, 0]));
    let diff = (&reordered - &reference).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "logits differ by {diff}");
    assert_eq!(Vec::<i64>::try_from(&next).unwrap(), vec![9, 7]);

    // Greedy continuation from the grown cache equals generating from scratch.
    let params = SamplingParams::greedy(8);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let continued = policy.decode(&mut grown, logits, next, &params, &mut rng);
    let fresh = policy.generate(&whole, &params, &mut rng).unwrap();
    assert_eq!(continued[0].tokens, fresh[1].tokens);
    assert_eq!(continued[1].tokens, fresh[0].tokens);
}
