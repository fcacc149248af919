//! The SFT objective on trajectories: truncated importance weights are exactly
//! 1 when the learner still is the behaviour policy, scale and cap the loss as
//! documented once it has moved, and trajectories without tokens (outside
//! data) train on their tokenised steps.

mod support;
use medzero::runtime::learner::Objective;
use medzero::train::sft::TrajectorySft;
use medzero_envs::{Provenance, Step, Trajectory};
use medzero_policies::Policy;
use medzero_policies::SamplingParams;
use medzero_policies::optim::{AdamW, AdamWConfig};
use medzero_policies::tokenizer::PromptTemplate;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

const WORDS: &str = "fever cough rash the answer is a b c d step 1 2 3 . :";

fn objective(policy: &Policy, clip: f64) -> TrajectorySft {
    let prompt = policy.tokenizer.encode("fever cough rash").unwrap();
    TrajectorySft {
        prompts: HashMap::from([("p".to_string(), prompt)]),
        min_reward: 0.0,
        importance_clip: clip,
        max_len: 64,
        template: PromptTemplate::Plain,
        temperature: 1.0,
    }
}

/// Four sampled completions of the problem's prompt, with their log-probs.
fn sampled(policy: &Policy) -> Vec<Trajectory> {
    let prompt = policy.tokenizer.encode("fever cough rash").unwrap();
    let params = SamplingParams {
        max_new_tokens: 8,
        temperature: 1.0,
        ..SamplingParams::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    policy
        .sample_n(&prompt, 4, &params, &mut rng)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(k, g)| Trajectory {
            id: format!("p/s{k}"),
            problem_id: "p".into(),
            steps: vec![Step::new(g.text)],
            answer: None,
            reward: 1.0,
            values: Vec::new(),
            advantages: Vec::new(),
            policy_version: 0,
            provenance: Provenance::default(),
            tokens: g.tokens,
            logprobs: g.logprobs,
            meta: serde_json::Value::Null,
        })
        .collect()
}

fn loss(o: &mut TrajectorySft, policy: &Policy, batch: &[Trajectory]) -> (f64, f64) {
    let out = o.loss(policy, batch, 0..batch.len()).unwrap();
    let weight = out
        .metrics
        .iter()
        .find(|(k, _)| *k == "importance_weight_mean")
        .unwrap()
        .1;
    (out.loss.double_value(&[]), weight)
}

#[test]
fn importance_weights_are_one_on_policy_and_truncated_off_policy() {
    let policy = support::tiny_policy(WORDS, 1);
    let batch = sampled(&policy);
    let (plain, w) = loss(&mut objective(&policy, 0.0), &policy, &batch);
    assert_eq!(w, 1.0);
    let (weighted, w) = loss(&mut objective(&policy, 1e9), &policy, &batch);
    assert!((w - 1.0).abs() < 1e-5, "on-policy mean ratio {w}");
    assert!(
        (weighted - plain).abs() < 1e-5 * plain,
        "{weighted} vs {plain}"
    );
    // A cap below 1 scales every on-policy token's loss by the cap.
    let (capped, w) = loss(&mut objective(&policy, 0.5), &policy, &batch);
    assert!((w - 0.5).abs() < 1e-6, "{w}");
    assert!(
        (capped - 0.5 * plain).abs() < 1e-5 * plain,
        "{capped} vs {plain}"
    );

    // Move the learner away from the behaviour policy: ratios leave 1, and
    // no weight exceeds the cap.
    let mut opt = AdamW::new(
        policy.named_parameters(),
        AdamWConfig {
            lr: 0.05,
            ..Default::default()
        },
        AdamW::default_decay,
    )
    .unwrap();
    objective(&policy, 0.0)
        .loss(&policy, &batch, 0..batch.len())
        .unwrap()
        .loss
        .backward();
    opt.step(0.05);
    let (_, w) = loss(&mut objective(&policy, 1e9), &policy, &batch);
    assert!(
        (w - 1.0).abs() > 1e-3,
        "ratios stayed at 1 after a step: {w}"
    );
    let (_, w) = loss(&mut objective(&policy, 1.0), &policy, &batch);
    assert!(w <= 1.0 + 1e-6, "a weight above the cap: mean {w}");
}

#[test]
fn trajectories_without_tokens_train_on_their_steps() {
    let policy = support::tiny_policy(WORDS, 2);
    let steps = vec![Step::new("fever"), Step::new("the answer is b .")];
    let outside = Trajectory {
        id: "p/x".into(),
        problem_id: "p".into(),
        steps: steps.clone(),
        answer: Some("b".into()),
        reward: 1.0,
        values: Vec::new(),
        advantages: Vec::new(),
        policy_version: 0,
        provenance: Provenance::default(),
        tokens: Vec::new(),
        logprobs: Vec::new(),
        meta: serde_json::Value::Null,
    };
    let mut tokens = policy
        .tokenizer
        .encode(&medzero_envs::render_chain(&steps))
        .unwrap();
    tokens.push(policy.tokenizer.end_of_turn_id(&PromptTemplate::Plain));
    let generated = Trajectory {
        tokens,
        ..outside.clone()
    };
    let mut o = objective(&policy, 2.0);
    assert!(o.accepts(&outside));
    let a = loss(&mut o, &policy, std::slice::from_ref(&outside));
    let b = loss(&mut o, &policy, std::slice::from_ref(&generated));
    assert_eq!(a, b, "tokenised steps and the same tokens must train alike");
    assert_eq!(a.1, 1.0, "unknown behaviour log-probs weigh 1");
    let unknown_problem = Trajectory {
        problem_id: "q".into(),
        ..outside
    };
    assert!(!o.accepts(&unknown_problem));
}
