//! The invariant data-parallel online learners rest on: the shards that
//! ranks take of one batch give, summed, the loss, every gradient and every
//! metric of the whole batch in one process, for each online objective
//! (rejection sampling's SFT, GRPO with each loss type, the KL term, GSPO's
//! ratio and masking of truncated completions, RLOO with standardised
//! advantages, some at a sampling temperature of 0.7), with shards of
//! unequal sizes.

mod support;
use medzero::runtime::learner::Objective;
use medzero::train::grpo::{GrpoConfig, GrpoObjective, ImportanceLevel, LossType, Sampled};
use medzero::train::rloo::{RlooConfig, RlooObjective};
use medzero::train::sft::TrajectorySft;
use medzero_envs::{Step, Trajectory};
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::ops::Range;

const WORDS: &str = "fever cough rash the answer is a b c d step 1 2 3 . :";
const PROMPTS: [&str; 2] = ["fever cough rash", "rash the answer"];

fn prompts(policy: &Policy) -> HashMap<String, Vec<i64>> {
    PROMPTS
        .iter()
        .enumerate()
        .map(|(k, p)| (format!("p{k}"), policy.tokenizer.encode(p).unwrap()))
        .collect()
}

/// Seven completions of two prompts, of unequal lengths, some ending with
/// the end of turn and some cut; recorded log-probs moved off the policy's
/// so ratios leave 1 and clip, advantages that vary by token, rewards that
/// vary by group, and each completion's KL for RLOO's metric.
fn batch(policy: &Policy) -> Vec<Trajectory> {
    let eot = policy.tokenizer.end_of_turn_id(&PromptTemplate::Plain);
    let prompts = prompts(policy);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut out = Vec::new();
    for (p, n) in [("p0", 4), ("p1", 3)] {
        let params = SamplingParams {
            max_new_tokens: 6 + 2 * out.len(),
            temperature: 1.0,
            ..SamplingParams::default()
        };
        for (k, g) in policy
            .sample_n(&prompts[p], n, &params, &mut rng)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            let i = out.len();
            let mut tokens = g.tokens;
            if i % 2 == 0 {
                *tokens.last_mut().unwrap() = eot;
            }
            let logprobs: Vec<f32> = g
                .logprobs
                .iter()
                .enumerate()
                .map(|(j, lp)| lp + 0.4 * ((i * 7 + j) as f32).sin())
                .collect();
            let advantages: Vec<f32> = (0..tokens.len())
                .map(|j| ((i + 2 * j) as f32 * 0.9).cos())
                .collect();
            out.push(Trajectory {
                id: format!("{p}/s{k}"),
                problem_id: p.into(),
                steps: vec![Step::new(g.text)],
                answer: None,
                reward: ((i * 3) % 4) as f32 / 3.0,
                values: Vec::new(),
                advantages,
                policy_version: 0,
                provenance: Default::default(),
                tokens,
                logprobs,
                meta: serde_json::json!({ "kl": 0.01 * i as f64 }),
            });
        }
    }
    out
}

/// The loss, metrics and gradients of `shards` of `batch`, summed.
fn summed(
    objective: &mut dyn Objective,
    policy: &Policy,
    batch: &[Trajectory],
    shards: &[Range<usize>],
) -> (f64, HashMap<&'static str, f64>, Vec<tch::Tensor>) {
    let params = policy.named_parameters();
    for (_, p) in &params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let (mut loss, mut metrics) = (0.0, HashMap::new());
    for shard in shards {
        let out = objective.loss(policy, batch, shard.clone()).unwrap();
        out.loss.backward();
        loss += out.loss.double_value(&[]);
        for (k, v) in out.metrics {
            *metrics.entry(k).or_insert(0.0) += v;
        }
    }
    let grads = params.iter().map(|(_, p)| p.grad().copy()).collect();
    (loss, metrics, grads)
}

fn assert_shards_sum_to_the_batch(name: &str, objective: &mut dyn Objective, policy: &Policy) {
    let batch = batch(policy);
    assert!(batch.iter().all(|t| objective.accepts(t)), "{name}");
    let whole = 0..batch.len();
    let (loss, metrics, grads) = summed(objective, policy, &batch, std::slice::from_ref(&whole));
    let (l2, m2, g2) = summed(objective, policy, &batch, &[0..2, 2..5, 5..7]);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + a.abs());
    assert!(close(loss, l2), "{name}: loss {loss} vs shards {l2}");
    assert!(loss.abs() > 1e-6, "{name}: a zero loss tests nothing");
    assert_eq!(metrics.len(), m2.len(), "{name}");
    for (k, v) in &metrics {
        assert!(close(*v, m2[k]), "{name}: {k} {v} vs shards {}", m2[k]);
    }
    let mut largest = 0.0f64;
    for (a, b) in grads.iter().zip(&g2) {
        let scale = a.abs().max().double_value(&[]);
        largest = largest.max(scale);
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-6 * (1.0 + scale),
            "{name}: gradient differs by {diff:e}"
        );
    }
    assert!(largest > 0.0, "{name}: no gradient");
}

#[test]
fn rejection_sampling_shards_sum_to_the_batch() {
    let policy = support::tiny_policy(WORDS, 1);
    for (clip, max_len, temperature) in [(0.0, 64, 1.0), (1.5, 64, 0.7), (0.0, 9, 1.0)] {
        let mut o = TrajectorySft {
            prompts: prompts(&policy),
            min_reward: 0.0,
            importance_clip: clip,
            max_len,
            template: PromptTemplate::Plain,
            temperature,
        };
        assert_shards_sum_to_the_batch(
            &format!("sft clip {clip} max_len {max_len}"),
            &mut o,
            &policy,
        );
    }
}

#[test]
fn grpo_shards_sum_to_the_batch() {
    let policy = support::tiny_policy(WORDS, 1);
    let eot = policy.tokenizer.end_of_turn_id(&PromptTemplate::Plain);
    let mut cases: Vec<GrpoConfig> = [
        LossType::Grpo,
        LossType::Bnpo,
        LossType::DrGrpo,
        LossType::Dapo,
    ]
    .into_iter()
    .map(|loss_type| GrpoConfig {
        loss_type,
        ..GrpoConfig::default()
    })
    .collect();
    cases.push(GrpoConfig {
        beta: 0.04,
        epsilon_high: Some(0.28),
        ..GrpoConfig::default()
    });
    cases.push(GrpoConfig {
        loss_type: LossType::Grpo,
        importance_sampling_level: ImportanceLevel::Sequence,
        mask_truncated_completions: true,
        ..GrpoConfig::default()
    });
    for cfg in cases {
        let name = format!("grpo {cfg:?}");
        let reference = (cfg.beta > 0.0).then(|| support::tiny_policy(WORDS, 2));
        // The KL case also samples at 0.7, tempering policy and reference.
        let temperature = if cfg.beta > 0.0 { 0.7 } else { 1.0 };
        let mut o = GrpoObjective {
            cfg,
            prompts: prompts(&policy),
            sampled: Sampled {
                max_completion: 16,
                temperature,
            },
            reference,
            end_of_turn: eot,
        };
        assert_shards_sum_to_the_batch(&name, &mut o, &policy);
    }
}

#[test]
fn rloo_shards_sum_to_the_batch() {
    let policy = support::tiny_policy(WORDS, 1);
    let eot = policy.tokenizer.end_of_turn_id(&PromptTemplate::Plain);
    for normalize_advantages in [false, true] {
        let mut o = RlooObjective {
            cfg: RlooConfig {
                normalize_advantages,
                epsilon: 0.1,
                ..RlooConfig::default()
            },
            prompts: prompts(&policy),
            end_of_turn: eot,
            temperature: 0.7,
        };
        assert_shards_sum_to_the_batch(
            &format!("rloo normalize {normalize_advantages}"),
            &mut o,
            &policy,
        );
    }
}
