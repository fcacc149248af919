//! Parity with HF transformers, the implementation users trust: a tiny random
//! Qwen2 and Llama made by transformers, loaded by medzero; logits on a padded
//! batch, greedy generation with and without cache and from a forked prefix,
//! and medzero's saved checkpoint loaded back by transformers.

mod common;
use common::run_py;
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::{Device, Kind, Tensor};

struct Peer {
    logits: Vec<Vec<Vec<f64>>>,
    greedy: Vec<i64>,
}

fn peer(model: &Path, batch: &[Vec<i64>], prompt: &[i64], new: usize) -> Peer {
    let req = model.with_extension("request.json");
    let body = serde_json::json!({"batch": batch, "prompt": prompt, "new_tokens": new});
    std::fs::write(&req, body.to_string()).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&run_py(
        "hf_parity.py",
        &["run", model.to_str().unwrap(), req.to_str().unwrap()],
    ))
    .unwrap();
    Peer {
        logits: serde_json::from_value(v["logits"].clone()).unwrap(),
        greedy: serde_json::from_value(v["greedy"].clone()).unwrap(),
    }
}

/// Largest |medzero - HF| over the real (unpadded) positions.
fn max_diff(ours: &Tensor, theirs: &[Vec<Vec<f64>>]) -> f64 {
    let mut worst = 0f64;
    for (b, rows) in theirs.iter().enumerate() {
        for (t, row) in rows.iter().enumerate() {
            let mine = Vec::<f64>::try_from(ours.get(b as i64).get(t as i64).to_kind(Kind::Double))
                .unwrap();
            for (x, y) in mine.iter().zip(row) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    worst
}

fn check(arch: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(arch);
    run_py("hf_parity.py", &["make", arch, dir.to_str().unwrap()]);
    let policy = Policy::load(&dir, Device::Cpu, None).unwrap();

    // A right-padded batch of unequal lengths.
    let batch: Vec<Vec<i64>> = vec![(2..14).collect(), vec![50, 51, 52, 53, 54], vec![90, 3, 17]];
    let prompt: Vec<i64> = vec![5, 6, 7, 8];
    let new = 32;
    let hf = peer(&dir, &batch, &prompt, new);
    let (ids, mask) = medzero_policies::generate::pad_right(&batch, 0);
    let logits = tch::no_grad(|| policy.logits(&ids, &mask));
    let d = max_diff(&logits, &hf.logits);
    assert!(d < 1e-4, "{arch}: logits differ from transformers by {d}");

    // Greedy: cached, uncached and from a forked prefix all equal HF's tokens.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let params = SamplingParams::greedy(new);
    let cached = policy
        .generate(std::slice::from_ref(&prompt), &params, &mut rng)
        .unwrap()
        .remove(0);
    let uncached = policy
        .generate_uncached(std::slice::from_ref(&prompt), &params, &mut rng)
        .unwrap()
        .remove(0);
    let eos = policy.tokenizer.eos_id();
    let expect: Vec<i64> = match hf.greedy.iter().position(|&t| t == eos) {
        Some(i) => hf.greedy[..=i].to_vec(),
        None => hf.greedy.clone(),
    };
    assert!(
        expect.len() >= 16,
        "{arch}: HF's greedy run hit EOS too early to be a test: {:?}",
        hf.greedy
    );
    assert_eq!(
        cached.tokens, expect,
        "{arch}: cached greedy differs from transformers"
    );
    assert_eq!(
        uncached.tokens, expect,
        "{arch}: uncached greedy differs from transformers"
    );
    let rows = policy.prefill(std::slice::from_ref(&prompt), 0).unwrap();
    let mut forked = rows.select(&[0, 0, 0], new);
    let mut streams = medzero_policies::generate::streams(&mut rng, 3);
    let forks = policy.decode(&mut forked, &params, &mut streams);
    for f in &forks {
        assert_eq!(
            f.tokens, expect,
            "{arch}: a forked prefix decodes differently"
        );
    }
    // A batch mixing prompt lengths (left padding) decodes each row as alone.
    let other: Vec<i64> = vec![40, 41];
    let both = policy
        .generate(&[prompt.clone(), other.clone()], &params, &mut rng)
        .unwrap();
    let alone = policy
        .generate(std::slice::from_ref(&other), &params, &mut rng)
        .unwrap()
        .remove(0);
    assert_eq!(both[0].tokens, expect, "{arch}: batching changed row 0");
    assert_eq!(
        both[1].tokens, alone.tokens,
        "{arch}: batching changed row 1"
    );
    // Log-probs reported by generation are the model's (temperature 1).
    let full: Vec<i64> = prompt.iter().chain(&cached.tokens).copied().collect();
    let (fi, fm) = medzero_policies::generate::pad_right(std::slice::from_ref(&full), 0);
    let mut comp = vec![0i64; full.len()];
    comp[prompt.len()..].iter_mut().for_each(|c| *c = 1);
    let seq_lp = tch::no_grad(|| {
        policy.sequence_logprobs(&fi, &fm, &Tensor::from_slice(&comp).view([1, -1]))
    });
    let sum: f32 = cached.logprobs.iter().sum();
    assert!(
        (seq_lp.double_value(&[0]) - sum as f64).abs() < 1e-3,
        "{arch}: {} vs {sum}",
        seq_lp.double_value(&[0])
    );

    // medzero's checkpoint loads in transformers with the same logits.
    let saved = tmp.path().join(format!("{arch}-saved"));
    policy.save(&saved).unwrap();
    let again = peer(&saved, &batch, &prompt, 4);
    let d = max_diff(&logits, &again.logits);
    assert!(
        d < 1e-4,
        "{arch}: transformers reads medzero's checkpoint with logits off by {d}"
    );
}

#[test]
fn qwen2_matches_transformers() {
    check("qwen2");
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}
