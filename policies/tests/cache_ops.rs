//! Rows of generation state give, after every operation, what a fresh
//! prefill of the ids they hold gives: selecting rows, appending ragged
//! tokens, decoding, and syncing to a target that diverges from the cache.

use medzero_policies::generate::streams;
use medzero_policies::llama::DecoderConfig;
use medzero_policies::tokenizer::Tokenizer;
use medzero_policies::{Policy, Rows, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn tiny() -> Policy {
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let tok = Tokenizer::word_level([words.join(" ").as_str()], 1);
    let cfg = DecoderConfig::tiny_qwen2(tok.vocab_size() as i64, tok.eos_id());
    Policy::new_random(&cfg, tok, tch::Device::Cpu, 5).unwrap()
}

/// Every row's position is its length and its logits are a fresh prefill's.
fn assert_fresh(policy: &Policy, rows: &Rows, what: &str) {
    for i in 0..rows.len() {
        let ids = rows.ids(i).to_vec();
        assert_eq!(rows.position(i), ids.len() as i64, "{what}: row {i}");
        let fresh = policy.prefill(&[ids], 0).unwrap();
        let diff = (rows.logits(i) - fresh.logits(0))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-4, "{what}: row {i} differs by {diff}");
    }
}

#[test]
fn selected_and_extended_rows_match_a_full_prefill() {
    let policy = tiny();
    let prompts = vec![vec![5, 9, 11, 7], vec![6, 8, 10, 12, 14, 16]];
    let rows = policy.prefill(&prompts, 0).unwrap();
    assert_fresh(&policy, &rows, "prefill");
    // Rows in reverse order, repeated, then ragged extensions (one row none).
    let mut grown = rows.select(&[1, 0, 1], 2);
    policy
        .extend(&mut grown, &[vec![20, 21, 22], vec![23], vec![]])
        .unwrap();
    assert_eq!(grown.ids(0), [6, 8, 10, 12, 14, 16, 20, 21, 22]);
    assert_eq!(grown.ids(1), [5, 9, 11, 7, 23]);
    assert_eq!(grown.ids(2), prompts[1]);
    assert_fresh(&policy, &grown, "extend");
    // The source rows are untouched.
    assert_eq!(rows.ids(0), prompts[0]);
    assert_fresh(&policy, &rows, "source after select");
}

#[test]
fn decoded_rows_hold_every_sampled_token_but_the_last() {
    let policy = tiny();
    let prompts = vec![vec![5, 9, 11, 7], vec![6, 8]];
    let mut rows = policy.prefill(&prompts, 0).unwrap();
    let params = SamplingParams {
        max_new_tokens: 6,
        temperature: 1.0,
        ..SamplingParams::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let outs = policy.decode(&mut rows, &params, &mut streams(&mut rng, 2));
    for (i, g) in outs.iter().enumerate() {
        let mut held = prompts[i].clone();
        held.extend(&g.tokens[..g.tokens.len() - 1]);
        assert_eq!(rows.ids(i), held, "row {i}");
    }
    // The logits are those the last token was drawn from.
    assert_fresh(&policy, &rows, "decode");
    for (i, g) in outs.iter().enumerate() {
        let last = *g.tokens.last().unwrap();
        let lp = rows.logits(i).log_softmax(-1, tch::Kind::Float);
        let expect = lp.double_value(&[last]);
        let got = *g.logprobs.last().unwrap() as f64;
        assert!((expect - got).abs() < 1e-5, "row {i}: {expect} vs {got}");
    }
    // Greedy continuation after feeding the last tokens equals generating
    // from scratch on the whole sequences.
    let lasts: Vec<Vec<i64>> = outs
        .iter()
        .map(|g| vec![*g.tokens.last().unwrap()])
        .collect();
    policy.extend(&mut rows, &lasts).unwrap();
    assert_fresh(&policy, &rows, "decode + extend");
    let whole: Vec<Vec<i64>> = (0..2).map(|i| rows.ids(i).to_vec()).collect();
    let greedy = SamplingParams::greedy(8);
    let continued = policy.decode(&mut rows, &greedy, &mut streams(&mut rng, 2));
    let fresh = policy.generate(&whole, &greedy, &mut rng).unwrap();
    for i in 0..2 {
        assert_eq!(continued[i].tokens, fresh[i].tokens, "row {i}");
    }
}

#[test]
fn sync_cuts_back_to_the_common_prefix_and_reruns_the_rest() {
    let policy = tiny();
    let mut rows = policy
        .prefill(&[vec![5, 9, 11, 7, 13], vec![6, 8, 10], vec![4, 4]], 0)
        .unwrap()
        .select(&[0, 1, 2], 0);
    let targets = vec![
        // Diverges after 3 tokens, then goes on.
        Some(vec![5, 9, 11, 30, 31, 32]),
        // Extends the row.
        Some(vec![6, 8, 10, 12]),
        // Left alone.
        None,
    ];
    let report = policy.sync(&mut rows, &targets).unwrap();
    assert_eq!(report.rewound, 1);
    assert_eq!(report.fed, 3 + 1);
    assert_eq!(rows.ids(0), [5, 9, 11, 30, 31, 32]);
    assert_eq!(rows.ids(1), [6, 8, 10, 12]);
    assert_eq!(rows.ids(2), [4, 4]);
    assert_fresh(&policy, &rows, "sync");
    // A target that is a strict prefix of what a row holds: its last token
    // is re-run so the logits follow it.
    let report = policy
        .sync(&mut rows, &[Some(vec![5, 9]), None, None])
        .unwrap();
    assert_eq!((report.rewound, report.fed), (1, 1));
    assert_eq!(rows.ids(0), [5, 9]);
    assert_fresh(&policy, &rows, "sync to a prefix");
    // Syncing to what a row holds runs nothing.
    let held: Vec<Option<Vec<i64>>> = (0..3).map(|i| Some(rows.ids(i).to_vec())).collect();
    assert_eq!(policy.sync(&mut rows, &held).unwrap().fed, 0);
}

#[test]
fn a_rows_samples_do_not_depend_on_its_batch() {
    let policy = tiny();
    let params = SamplingParams {
        max_new_tokens: 10,
        temperature: 1.0,
        ..SamplingParams::default()
    };
    let (a, b) = (vec![5, 9, 11, 7], vec![6, 8, 10, 12, 14, 16]);
    let together = policy
        .generate(
            &[a.clone(), b.clone()],
            &params,
            &mut ChaCha8Rng::seed_from_u64(4),
        )
        .unwrap();
    let alone = policy
        .generate(
            std::slice::from_ref(&a),
            &params,
            &mut ChaCha8Rng::seed_from_u64(4),
        )
        .unwrap();
    assert_eq!(together[0].tokens, alone[0].tokens);
    // The uncached reference samples the same tokens from the same seed.
    let uncached = policy
        .generate_uncached(&[a, b], &params, &mut ChaCha8Rng::seed_from_u64(4))
        .unwrap();
    assert_eq!(uncached[0].tokens, together[0].tokens);
    assert_eq!(uncached[1].tokens, together[1].tokens);
}

#[test]
fn an_empty_prompt_is_an_error_not_a_panic() {
    let policy = tiny();
    let err = policy
        .generate(
            &[vec![5], vec![]],
            &SamplingParams::greedy(4),
            &mut ChaCha8Rng::seed_from_u64(0),
        )
        .unwrap_err();
    assert!(err.to_string().contains("prompt 1 is empty"), "{err}");
}

/// Scoring continuations of one shared context from its cached row gives the
/// log-probs (and greedy flags) of scoring each full sequence from scratch.
#[test]
fn continuations_scored_from_a_cached_context_match_full_sequences() {
    let policy = tiny();
    let context: Vec<i64> = vec![5, 9, 11, 7, 13, 6];
    let continuations: Vec<Vec<i64>> = vec![vec![8], vec![10, 12, 14], vec![16, 5], vec![7]];
    let cached = policy
        .continuation_logprobs(&context, &continuations)
        .unwrap();
    let full: Vec<(Vec<f64>, bool)> = continuations
        .iter()
        .map(|c| full_sequence_logprobs(&policy, &context, c))
        .collect();
    assert_eq!(cached.len(), full.len());
    for (k, ((a, ga), (b, gb))) in cached.iter().zip(&full).enumerate() {
        assert_eq!(a.len(), b.len(), "continuation {k}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "continuation {k}: {x} vs {y}");
        }
        assert_eq!(ga, gb, "continuation {k}: greedy flag");
    }
    // The greedy continuation is flagged as such.
    let rows = policy.prefill(std::slice::from_ref(&context), 0).unwrap();
    let top = rows.logits(0).argmax(-1, false).int64_value(&[]);
    let r = policy
        .continuation_logprobs(&context, &[vec![top]])
        .unwrap();
    assert!(r[0].1, "the argmax token is the greedy continuation");
}

/// The plain path: the whole sequence `context + c` through the model, no
/// cache; the log-prob of each of `c`'s tokens and whether all are argmax.
fn full_sequence_logprobs(policy: &Policy, context: &[i64], c: &[i64]) -> (Vec<f64>, bool) {
    let seq: Vec<i64> = context.iter().chain(c).copied().collect();
    let ids = tch::Tensor::from_slice(&seq).unsqueeze(0);
    let logp = policy
        .logits(&ids, &ids.ones_like())
        .get(0)
        .log_softmax(-1, tch::Kind::Float);
    let mut out = Vec::new();
    let mut greedy = true;
    for (j, &token) in c.iter().enumerate() {
        let row = logp.get((context.len() + j - 1) as i64);
        out.push(row.double_value(&[token]));
        greedy &= row.argmax(-1, false).int64_value(&[]) == token;
    }
    (out, greedy)
}
