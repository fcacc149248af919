//! GRPO and RLOO against TRL 1.16's own GRPOTrainer and RLOOTrainer: one
//! optimizer step on the same checkpoint, prompts, completions and rewards
//! (TRL's generation bypassed by `tests/support/grpo_peer.py`), for each
//! loss type, reward scaling, KL setting and ratio level. Advantages, the
//! loss, the gradient norm, TRL's metrics and every updated parameter must
//! agree. Then the stages end to end through the CLI.

mod support;

use medzero::rollout::advantage::{ScaleRewards, normalise, steps};
use medzero::rollout::rloo as rloo_actor;
use medzero::train::grpo::{self, GrpoConfig, ImportanceLevel, LossType, Sample};
use medzero::train::rloo::{self, RlooConfig};
use medzero_envs::{Trajectory, response_steps};
use medzero_policies::Policy;
use medzero_policies::optim::{AdamW, AdamWConfig};
use medzero_policies::tokenizer::PromptTemplate;
use std::path::Path;

const WORDS: &str = "the patient has fever cough rash pain and the answer is flu cold measles";
const LR: f64 = 1e-3;

/// TRL's run of `spec`, with its post-clip gradients of every step.
fn peer(dir: &Path, spec: &serde_json::Value) -> serde_json::Value {
    let mut spec = spec.clone();
    spec["dump_grads"] = serde_json::json!(true);
    let path = dir.join("spec.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/grpo_peer.py");
    let run = std::process::Command::new(support::python())
        .arg(&script)
        .arg(&path)
        .output()
        .expect("running python (make setup)");
    assert!(
        run.status.success(),
        "grpo_peer.py failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Two prompts of different lengths, four completions each (some ending
/// with EOS, one truncated), rewards with spread in both groups.
fn batch(eos: i64) -> (Vec<Vec<i64>>, Vec<Vec<i64>>, Vec<f32>) {
    let prompts = vec![vec![3, 4, 5], vec![6, 7, 8, 9, 10]];
    let completions = vec![
        vec![11, 12, eos],
        vec![13, 14, 15, 16, eos],
        vec![12, 12],
        vec![17, eos],
        vec![14, 15, 16, 17, 11, 12],
        vec![11, eos],
        vec![16, 13, 12, eos],
        vec![15, 15, 15],
    ];
    let rewards = vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5];
    (prompts, completions, rewards)
}

/// Adam's epsilon (torch's and TRL's default, and ours).
const ADAM_EPS: f64 = 1e-8;

/// A tensor's elements, flat, as f64.
fn values(t: &tch::Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.flatten(0, -1).to_kind(tch::Kind::Double)).unwrap()
}

/// Our post-clip gradient of each parameter by name (zeros where none).
fn grads(policy: &Policy) -> Vec<(String, Vec<f64>)> {
    policy
        .named_parameters()
        .into_iter()
        .map(|(name, p)| {
            let g = p.grad();
            let g = if g.defined() {
                values(&g)
            } else {
                vec![0.0; p.numel()]
            };
            (name, g)
        })
        .collect()
}

/// One step's post-clip gradients against TRL's: each element within 1e-4
/// of the largest in its tensor (float32 sums in another order).
fn assert_grads_match(ours: &[(String, Vec<f64>)], trl_step: &serde_json::Value, what: &str) {
    let theirs = trl_step["grads_post_clip"]
        .as_object()
        .expect("TRL dumped no gradients");
    for (name, g) in ours {
        let Some(t) = theirs.get(name) else {
            assert!(
                name.contains("lm_head"),
                "{what}: TRL has no grad of {name}"
            );
            continue;
        };
        let t = floats(t);
        assert_eq!(g.len(), t.len(), "{what}: {name} sizes");
        let scale = t.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let worst = g
            .iter()
            .zip(&t)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale + 1e-10,
            "{what}: gradient of {name} differs by {worst} (largest {scale})"
        );
    }
}

/// Every parameter after the steps equals TRL's. AdamW moves a weight by
/// lr * m / (sqrt(v) + eps): where a weight's gradients are far above eps
/// that is about lr times a sign, so the weights must agree to 1% of one
/// step. Where every gradient of a weight is within 100 eps of zero, eps
/// turns float rounding of that gradient (checked by `assert_grads_match`)
/// into a visible share of a step; there the weights need only agree to
/// the steps' bound, one lr each.
fn assert_params_match(policy: &Policy, trl: &serde_json::Value, what: &str) {
    let params = trl["params"].as_object().unwrap();
    let steps = trl["steps"].as_array().unwrap();
    let mut worst = 0.0f64;
    let mut loose = 0usize;
    for (name, p) in policy.named_parameters() {
        let Some(theirs) = params.get(&name) else {
            // A tied lm_head is the embedding: compared under its name.
            assert!(name.contains("lm_head"), "{what}: TRL has no {name}");
            continue;
        };
        let ours = values(&p);
        let mut largest_grad = vec![0.0f64; ours.len()];
        for step in steps {
            let g = floats(&step["grads_post_clip"][&name]);
            for (m, x) in largest_grad.iter_mut().zip(g) {
                *m = m.max(x.abs());
            }
        }
        for ((a, b), g) in ours.iter().zip(floats(theirs)).zip(largest_grad) {
            let diff = (a - b).abs();
            if g >= 100.0 * ADAM_EPS {
                worst = worst.max(diff);
            } else {
                loose += 1;
                assert!(
                    diff <= LR * steps.len() as f64,
                    "{what}: {name} moved {diff} from TRL's, more than its steps allow"
                );
            }
        }
    }
    assert!(
        worst < LR * 1e-2,
        "{what}: parameters differ by up to {worst} ({loose} weights with gradients near eps aside)"
    );
}

struct Step {
    loss: f64,
    norm: f64,
    grads: Vec<(String, Vec<f64>)>,
    out: grpo::GrpoLoss,
}

/// Each completion's advantage on every one of its tokens.
fn per_token(completions: &[Vec<i64>], adv: &[f32]) -> Vec<Vec<f32>> {
    completions
        .iter()
        .zip(adv)
        .map(|(c, &a)| vec![a; c.len()])
        .collect()
}

/// The batch as samples (completion i answers prompt i / 4), with the
/// recorded log-probs `old` (none: empty) and completions not ending in
/// `masked_without` left out.
fn samples<'a>(
    prompts: &'a [Vec<i64>],
    completions: &'a [Vec<i64>],
    adv: &'a [Vec<f32>],
    old: &'a [Vec<f32>],
    masked_without: Option<i64>,
) -> Vec<Sample<'a>> {
    completions
        .iter()
        .enumerate()
        .map(|(i, c)| Sample {
            prompt: &prompts[i / 4],
            completion: c,
            advantages: &adv[i],
            old_logprobs: old.get(i).map_or(&[], Vec::as_slice),
            masked: masked_without.is_some_and(|eos| c.last() != Some(&eos)),
        })
        .collect()
}

/// AdamW at the test's learning rate, TRL's betas and no weight decay.
fn adamw(policy: &Policy) -> AdamW {
    let adam = AdamWConfig {
        lr: LR,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    AdamW::new(policy.named_parameters(), adam, AdamW::default_decay).unwrap()
}

/// The policy (saved as `model`) and a reference unlike it (as `ref`), so
/// the KL term and its gradient are not zero.
fn policy_and_reference(dir: &Path) -> (Policy, Policy) {
    let policy = support::tiny_policy(WORDS, 3);
    policy.save(&dir.join("model")).unwrap();
    let reference = support::tiny_policy(WORDS, 4);
    reference.save(&dir.join("ref")).unwrap();
    (policy, reference)
}

/// The trainer settings every comparison shares (the test's learning rate,
/// constant, no weight decay, clipping at 1, temperature 1), with `own`.
fn trl_config(own: serde_json::Value) -> serde_json::Value {
    let mut config = serde_json::json!({
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_completion_length": 8,
        "temperature": 1.0,
    });
    for (k, v) in own.as_object().unwrap() {
        config[k] = v.clone();
    }
    config
}

fn medzero_step(
    policy: &Policy,
    reference: Option<&Policy>,
    prompts: &[Vec<i64>],
    completions: &[Vec<i64>],
    adv: &[f32],
    cfg: &GrpoConfig,
    temperature: f64,
) -> Step {
    let eos = policy.tokenizer.eos_id();
    let adv = per_token(completions, adv);
    let masked = cfg.mask_truncated_completions.then_some(eos);
    let samples = samples(prompts, completions, &adv, &[], masked);
    let mut opt = adamw(policy);
    let sampled = grpo::Sampled {
        max_completion: 8,
        temperature,
    };
    let out = grpo::loss(policy, reference, &samples, cfg, sampled).unwrap();
    let loss = out.loss.double_value(&[]);
    out.loss.backward();
    let norm = opt.clip_grad_norm(1.0);
    let grads = grads(policy);
    opt.step(LR);
    Step {
        loss,
        norm,
        grads,
        out,
    }
}

struct Case {
    loss_type: LossType,
    scale: ScaleRewards,
    beta: f64,
    bias_correction: bool,
    level: ImportanceLevel,
    mask_truncated: bool,
    temperature: f64,
}

impl Case {
    fn trl_names(&self) -> (&'static str, &'static str, &'static str) {
        let loss = match self.loss_type {
            LossType::Grpo => "grpo",
            LossType::Bnpo => "bnpo",
            LossType::DrGrpo => "dr_grpo",
            LossType::Dapo => "dapo",
        };
        let scale = match self.scale {
            ScaleRewards::Group => "group",
            ScaleRewards::None => "none",
        };
        let level = match self.level {
            ImportanceLevel::Token => "token",
            ImportanceLevel::Sequence => "sequence",
        };
        (loss, scale, level)
    }
}

fn case(loss_type: LossType, scale: ScaleRewards) -> Case {
    Case {
        loss_type,
        scale,
        beta: 0.0,
        bias_correction: true,
        level: ImportanceLevel::Token,
        mask_truncated: false,
        temperature: 1.0,
    }
}

/// Each loss type; the KL term to a reference unlike the policy, with and
/// without TRL's bias correction; GSPO's sequence-level ratio; truncated
/// completions masked out (DAPO's overlong filtering); a sampling
/// temperature of 0.7, which divides the logits of policy and reference.
#[test]
fn one_step_matches_trl_grpo_trainer() {
    let cases = [
        case(LossType::Grpo, ScaleRewards::Group),
        case(LossType::Bnpo, ScaleRewards::Group),
        case(LossType::DrGrpo, ScaleRewards::None),
        case(LossType::Dapo, ScaleRewards::Group),
        Case {
            beta: 0.04,
            ..case(LossType::Dapo, ScaleRewards::Group)
        },
        Case {
            beta: 0.04,
            bias_correction: false,
            ..case(LossType::Grpo, ScaleRewards::Group)
        },
        Case {
            level: ImportanceLevel::Sequence,
            ..case(LossType::Grpo, ScaleRewards::Group)
        },
        Case {
            mask_truncated: true,
            ..case(LossType::Dapo, ScaleRewards::Group)
        },
        Case {
            mask_truncated: true,
            ..case(LossType::Grpo, ScaleRewards::Group)
        },
        Case {
            temperature: 0.7,
            beta: 0.04,
            ..case(LossType::Dapo, ScaleRewards::Group)
        },
        Case {
            temperature: 0.7,
            ..case(LossType::Grpo, ScaleRewards::Group)
        },
    ];
    for c in cases {
        let tmp = tempfile::tempdir().unwrap();
        let policy = support::tiny_policy(WORDS, 3);
        let eos = policy.tokenizer.eos_id();
        policy.save(&tmp.path().join("model")).unwrap();
        // The reference differs from the policy, so the KL term and its
        // gradient are not zero.
        let reference = (c.beta > 0.0).then(|| {
            let r = support::tiny_policy(WORDS, 4);
            r.save(&tmp.path().join("ref")).unwrap();
            r
        });
        let (prompts, completions, rewards) = batch(eos);
        let (trl_loss, trl_scale, trl_level) = c.trl_names();
        let mut spec = serde_json::json!({
            "model_dir": tmp.path().join("model"),
            "trainer": "grpo",
            "config": trl_config(serde_json::json!({
                "loss_type": trl_loss,
                "scale_rewards": trl_scale,
                "beta": c.beta,
                "use_bias_correction_kl": c.bias_correction,
                "importance_sampling_level": trl_level,
                "mask_truncated_completions": c.mask_truncated,
                "epsilon": 0.2,
                "temperature": c.temperature,
            })),
            "prompts": prompts,
            "completions": completions,
            "rewards": rewards,
            "eos_token_id": eos,
            "shuffle_batch": false,
            "dump_token_level": false,
        });
        if reference.is_some() {
            spec["ref_model_dir"] = serde_json::json!(tmp.path().join("ref"));
        }
        let trl = peer(tmp.path(), &spec);
        let what = format!(
            "{trl_loss}, scale_rewards {trl_scale}, beta {}, bias correction {}, {trl_level} level, \
             truncated masked {}, temperature {}",
            c.beta, c.bias_correction, c.mask_truncated, c.temperature
        );

        let adv: Vec<f32> = rewards
            .chunks(4)
            .flat_map(|g| normalise(g, c.scale))
            .collect();
        for (a, b) in adv.iter().zip(floats(&trl["advantages"])) {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "{what}: advantage {a} vs TRL {b}"
            );
        }
        let cfg = GrpoConfig {
            loss_type: c.loss_type,
            beta: c.beta,
            use_bias_correction_kl: c.bias_correction,
            importance_sampling_level: c.level,
            mask_truncated_completions: c.mask_truncated,
            ..GrpoConfig::default()
        };
        let step = medzero_step(
            &policy,
            reference.as_ref(),
            &prompts,
            &completions,
            &adv,
            &cfg,
            c.temperature,
        );
        let close = |name: &str, ours: f64, tol: f64| {
            let theirs = trl[name]
                .as_f64()
                .unwrap_or_else(|| panic!("TRL logged no {name}"));
            assert!(
                (ours - theirs).abs() < tol * theirs.abs().max(1.0),
                "{what}: {name} {ours} vs TRL {theirs}"
            );
        };
        close("loss", step.loss, 1e-5);
        close("grad_norm", step.norm, 1e-4);
        close("entropy", step.out.entropy, 1e-5);
        close("clip_ratio/low_mean", step.out.clip_low, 1e-6);
        close("clip_ratio/high_mean", step.out.clip_high, 1e-6);
        close("clip_ratio/region_mean", step.out.clip_region, 1e-6);
        if c.beta > 0.0 {
            close("kl", step.out.kl.unwrap(), 1e-5);
        }
        assert_grads_match(&step.grads, &trl["steps"][0], &what);
        assert_params_match(&policy, &trl, &what);
    }
}

/// RLOO against TRL 1.16's RLOOTrainer: one step on the same checkpoint,
/// prompts, completions and rewards, without and with the KL in the reward
/// (to a reference unlike the policy), with the advantages standardised
/// over the batch, and at a sampling temperature of 0.7.
#[test]
fn one_step_matches_trl_rloo_trainer() {
    for (beta, normalize, temperature) in [
        (0.0, false, 1.0),
        (0.05, false, 1.0),
        (0.05, true, 1.0),
        (0.05, false, 0.7),
    ] {
        let what =
            format!("beta {beta}, normalize_advantages {normalize}, temperature {temperature}");
        let tmp = tempfile::tempdir().unwrap();
        let (policy, reference) = policy_and_reference(tmp.path());
        let eos = policy.tokenizer.eos_id();
        let (prompts, completions, rewards) = batch(eos);
        let mut spec = serde_json::json!({
            "model_dir": tmp.path().join("model"),
            "trainer": "rloo",
            "config": trl_config(serde_json::json!({
                "beta": beta,
                "epsilon": 0.2,
                "normalize_advantages": normalize,
                "temperature": temperature,
            })),
            "prompts": prompts,
            "completions": completions,
            "rewards": rewards,
            "eos_token_id": eos,
            "shuffle_batch": false,
            "dump_token_level": false,
        });
        if beta > 0.0 {
            spec["ref_model_dir"] = serde_json::json!(tmp.path().join("ref"));
        }
        let trl = peer(tmp.path(), &spec);

        // The sampling policy's log-probs are the policy's own (one step,
        // on-policy): Σ_t ℓ_old per completion.
        let mut adv = Vec::new();
        let mut kl_sum = 0.0;
        for (p, group) in prompts.iter().zip(completions.chunks(4)) {
            let refs: Vec<&[i64]> = group.iter().map(Vec::as_slice).collect();
            let old: Vec<Vec<f32>> = group
                .iter()
                .map(|c| vec![policy_logp(&policy, p, c, temperature)])
                .collect();
            let old: Vec<&[f32]> = old.iter().map(Vec::as_slice).collect();
            let kl = rloo_actor::sequence_kl(&reference, p, &refs, &old, temperature).unwrap();
            kl_sum += kl.iter().map(|&k| k as f64).sum::<f64>();
            let r = &rewards[adv.len()..adv.len() + 4];
            adv.extend(rloo_actor::advantages(r, &kl, beta));
        }
        if normalize {
            // TRL standardises over the batch as GRPO does over a group.
            adv = normalise(&adv, ScaleRewards::Group);
        }
        for (a, b) in adv.iter().zip(floats(&trl["advantages"])) {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "{what}: advantage {a} vs TRL {b}"
            );
        }
        if beta > 0.0 {
            // The learner's `kl` metric: the actors' summed KLs per completion token.
            let tokens: usize = completions.iter().map(Vec::len).sum();
            let theirs = trl["kl"].as_f64().expect("TRL logged no kl");
            let ours = kl_sum / tokens as f64;
            assert!(
                (ours - theirs).abs() < 1e-5,
                "{what}: kl {ours} vs TRL {theirs}"
            );
        }
        let adv = per_token(&completions, &adv);
        let samples = samples(&prompts, &completions, &adv, &[], None);
        let mut opt = adamw(&policy);
        let out = rloo::loss(
            &policy,
            &samples,
            &RlooConfig {
                beta,
                ..RlooConfig::default()
            },
            temperature,
        )
        .unwrap();
        let loss = out.loss.double_value(&[]);
        out.loss.backward();
        let norm = opt.clip_grad_norm(1.0);
        assert_grads_match(&grads(&policy), &trl["steps"][0], &what);
        opt.step(LR);
        let close = |name: &str, ours: f64, tol: f64| {
            let theirs = trl[name]
                .as_f64()
                .unwrap_or_else(|| panic!("TRL logged no {name}"));
            assert!(
                (ours - theirs).abs() < tol * theirs.abs().max(1.0),
                "{what}: {name} {ours} vs TRL {theirs}"
            );
        };
        close("loss", loss, 1e-5);
        close("grad_norm", norm, 1e-4);
        close("entropy", out.entropy, 1e-5);
        close("clip_ratio/region_mean", out.clip_region, 1e-6);
        assert_params_match(&policy, &trl, &what);
    }
}

/// The policy's log-prob of each token of `completion` after `prompt`.
fn token_logps(policy: &Policy, prompt: &[i64], completion: &[i64]) -> Vec<f32> {
    let ids: Vec<i64> = [prompt, completion].concat();
    let n = ids.len() as i64;
    let t = tch::Tensor::from_slice(&ids).view([1, n]);
    let mask = tch::Tensor::ones([1, n], (tch::Kind::Int64, tch::Device::Cpu));
    let logp = tch::no_grad(|| {
        policy
            .logits(&t, &mask)
            .log_softmax(-1, tch::Kind::Float)
            .narrow(1, prompt.len() as i64 - 1, completion.len() as i64)
            .gather(
                2,
                &tch::Tensor::from_slice(completion).view([1, -1, 1]),
                false,
            )
            .flatten(0, -1)
    });
    Vec::<f32>::try_from(&logp).unwrap()
}

/// TRL's `num_iterations` (μ): the learner takes μ optimizer steps on one
/// batch, every one against the log-probs recorded when it was sampled, so
/// from the second step on the ratio moves off 1 and clipping bites (a small
/// epsilon makes sure it does). Each step's loss, grad norm and clip ratios,
/// and the parameters after the last, must equal TRL's, for GRPO (two loss
/// types, with and without the KL term) and RLOO.
#[test]
fn several_iterations_per_batch_match_trl() {
    struct Iter {
        trainer: &'static str,
        loss_type: LossType,
        beta: f64,
        mu: usize,
    }
    let cases = [
        Iter {
            trainer: "grpo",
            loss_type: LossType::Dapo,
            beta: 0.0,
            mu: 2,
        },
        Iter {
            trainer: "grpo",
            loss_type: LossType::Grpo,
            beta: 0.04,
            mu: 3,
        },
        Iter {
            trainer: "rloo",
            loss_type: LossType::Dapo,
            beta: 0.05,
            mu: 2,
        },
    ];
    let epsilon = 0.002;
    let mut clipped = 0.0;
    for c in cases {
        let what = format!(
            "{} {:?}, beta {}, num_iterations {}",
            c.trainer, c.loss_type, c.beta, c.mu
        );
        let tmp = tempfile::tempdir().unwrap();
        let (policy, reference) = policy_and_reference(tmp.path());
        let eos = policy.tokenizer.eos_id();
        let (prompts, completions, rewards) = batch(eos);
        let mut config = trl_config(serde_json::json!({
            "beta": c.beta,
            "epsilon": epsilon,
            "num_iterations": c.mu,
        }));
        if c.trainer == "grpo" {
            config["loss_type"] = serde_json::json!(match c.loss_type {
                LossType::Grpo => "grpo",
                _ => "dapo",
            });
        } else {
            config["normalize_advantages"] = serde_json::json!(false);
        }
        let mut spec = serde_json::json!({
            "model_dir": tmp.path().join("model"),
            "trainer": c.trainer,
            "config": config,
            "prompts": prompts,
            "completions": completions,
            "rewards": rewards,
            "eos_token_id": eos,
            "num_steps": c.mu,
            "shuffle_batch": false,
            "dump_token_level": false,
        });
        if c.beta > 0.0 {
            spec["ref_model_dir"] = serde_json::json!(tmp.path().join("ref"));
        }
        let trl = peer(tmp.path(), &spec);

        // What the actors record when they sample: each token's log-prob
        // under the policy before any step.
        let old: Vec<Vec<f32>> = completions
            .iter()
            .enumerate()
            .map(|(i, comp)| token_logps(&policy, &prompts[i / 4], comp))
            .collect();
        let adv: Vec<f32> = if c.trainer == "grpo" {
            rewards
                .chunks(4)
                .flat_map(|g| normalise(g, ScaleRewards::Group))
                .collect()
        } else {
            let mut adv = Vec::new();
            for (g, (p, group)) in prompts.iter().zip(completions.chunks(4)).enumerate() {
                let refs: Vec<&[i64]> = group.iter().map(Vec::as_slice).collect();
                let sums: Vec<Vec<f32>> = old[g * 4..g * 4 + 4]
                    .iter()
                    .map(|o| vec![o.iter().sum()])
                    .collect();
                let sums: Vec<&[f32]> = sums.iter().map(Vec::as_slice).collect();
                let kl = rloo_actor::sequence_kl(&reference, p, &refs, &sums, 1.0).unwrap();
                adv.extend(rloo_actor::advantages(
                    &rewards[g * 4..g * 4 + 4],
                    &kl,
                    c.beta,
                ));
            }
            adv
        };
        let adv = per_token(&completions, &adv);
        let samples = samples(&prompts, &completions, &adv, &old, None);
        let mut opt = adamw(&policy);
        let grpo_cfg = GrpoConfig {
            loss_type: c.loss_type,
            epsilon,
            beta: c.beta,
            num_iterations: c.mu,
            ..GrpoConfig::default()
        };
        let rloo_cfg = RlooConfig {
            epsilon,
            beta: c.beta,
            num_iterations: c.mu,
            ..RlooConfig::default()
        };
        let steps = trl["steps"].as_array().unwrap();
        assert_eq!(steps.len(), c.mu, "{what}: TRL took {} steps", steps.len());
        for (k, theirs) in steps.iter().enumerate() {
            let (loss, clip_region) = if c.trainer == "grpo" {
                let sampled = grpo::Sampled {
                    max_completion: 8,
                    temperature: 1.0,
                };
                let out =
                    grpo::loss(&policy, Some(&reference), &samples, &grpo_cfg, sampled).unwrap();
                (out.loss, out.clip_region)
            } else {
                let out = rloo::loss(&policy, &samples, &rloo_cfg, 1.0).unwrap();
                (out.loss, out.clip_region)
            };
            let value = loss.double_value(&[]);
            loss.backward();
            let norm = opt.clip_grad_norm(1.0);
            assert_grads_match(&grads(&policy), theirs, &format!("{what}, step {}", k + 1));
            opt.step(LR);
            opt.zero_grad();
            let logged = &theirs["logged"];
            let close = |name: &str, ours: f64, theirs: f64, tol: f64| {
                assert!(
                    (ours - theirs).abs() < tol * theirs.abs().max(1.0),
                    "{what}, step {}: {name} {ours} vs TRL {theirs}",
                    k + 1
                );
            };
            close("loss", value, theirs["loss"].as_f64().unwrap(), 1e-5);
            close(
                "grad_norm",
                norm,
                logged["grad_norm"].as_f64().unwrap(),
                1e-4,
            );
            close(
                "clip_ratio/region_mean",
                clip_region,
                logged["clip_ratio/region_mean"].as_f64().unwrap(),
                1e-6,
            );
            clipped += clip_region;
        }
        assert_params_match(&policy, &trl, &what);
    }
    assert!(
        clipped > 0.0,
        "no step clipped a ratio: the old log-probs were never tested"
    );
}

/// Σ over `completion` of the policy's log-prob of each token after
/// `prompt`, at `temperature`.
fn policy_logp(policy: &Policy, prompt: &[i64], completion: &[i64], temperature: f64) -> f32 {
    let ids: Vec<i64> = [prompt, completion].concat();
    let n = ids.len() as i64;
    let marks: Vec<f32> = (0..ids.len())
        .map(|i| (i >= prompt.len()) as u8 as f32)
        .collect();
    let t = tch::Tensor::from_slice(&ids).view([1, n]);
    let mask = tch::Tensor::ones([1, n], (tch::Kind::Int64, tch::Device::Cpu));
    let m = tch::Tensor::from_slice(&marks).view([1, n]);
    tch::no_grad(|| policy.tempered_sequence_logprobs(&t, &mask, &m, temperature))
        .double_value(&[0]) as f32
}

/// The `grpo` stage end to end through the CLI on a tiny world, with the KL
/// term to the frozen init and two iterations per batch: it trains on every sample of every group,
/// changes the weights, the same seed gives the same weights, and a run
/// killed with SIGKILL mid-stage resumes to exactly those weights.
#[test]
fn the_grpo_stage_trains_is_reproducible_and_resumes_after_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[run]
name = "g"
threads = 1
{}
[[stages]]
kind = "distill_chains"
name = "chains"
[stages.sft]
epochs = 150
batch_size = 8
lr = 3e-3
warmup_ratio = 0.0
checkpoint_every = 0

[[stages]]
kind = "grpo"
init = "chains"
[stages.sampling]
samples = 4
temperature = 0.8
max_new_tokens = 320
[stages.grpo]
beta = 0.04
num_iterations = 2
[stages.runtime]
round_size = 2
[stages.learner]
batch_size = 8
lr = 1e-3
"#,
        support::TINY_WORLD
    );
    let config = support::write_config(tmp.path(), &text);
    let stage = |name: &str| tmp.path().join("runs").join(name).join("stages/1-grpo");
    let weights = |name: &str| {
        let run = tmp.path().join("runs").join(name);
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(stage(name).join("report.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(report["trajectories"], 32, "{report}");
        assert_eq!(report["counters"]["trained"], 32, "{report}");
        // Two optimizer steps on each of the four batches.
        assert_eq!(report["steps"], 8, "{report}");
        let read =
            |stage: &str| std::fs::read(run.join(stage).join("model/model.safetensors")).unwrap();
        let (before, after) = (read("stages/0-chains"), read("stages/1-grpo"));
        assert!(before != after, "GRPO left the weights as they were");
        after
    };
    let run = |name: &str| {
        let o = support::medzero(&["run", &config, "--set", &format!("run.name={name}")]);
        assert!(o.status.success(), "{}", support::stderr(&o));
        support::stderr(&o)
    };
    run("a");
    run("b");
    assert_eq!(weights("a"), weights("b"), "same seed, other weights");

    // SIGKILL once two of the four rounds are stored and checkpointed.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_medzero"))
        .args(["run", &config, "--set", "run.name=k"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let state = stage("k").join("checkpoints/latest");
    loop {
        let stored = std::fs::read_to_string(stage("k").join("trajectories.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if stored >= 16 && state.exists() {
            break;
        }
        assert!(start.elapsed().as_secs() < 120, "the stage never got going");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !stage("k").join("result.json").exists(),
        "the kill came after the stage finished; nothing was tested"
    );
    let err = run("k");
    assert!(err.contains("resuming from"), "{err}");
    assert_eq!(weights("k"), weights("a"), "resumed weights differ");
}

/// The trajectories a stage stored, grouped by problem in order.
fn stored_groups(stage: &Path) -> Vec<Vec<Trajectory>> {
    let text = std::fs::read_to_string(stage.join("trajectories.jsonl")).unwrap();
    let mut groups: Vec<Vec<Trajectory>> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let t: Trajectory = serde_json::from_str(line).unwrap();
        match groups.last_mut() {
            Some(g) if g[0].problem_id == t.problem_id => g.push(t),
            _ => groups.push(vec![t]),
        }
    }
    groups
}

/// Process advantages through the CLI on a tiny world: a search, a PRM on
/// it, then GRPO with the PRM's step scores and GRPO on the trees' leaves.
/// Each stored completion's advantages must be exactly what its group's
/// step scores or tree values give, token by token, with the steps found
/// in the ids matching the steps the PRM reads from the text.
#[test]
fn process_advantages_are_the_prm_scores_and_tree_values_of_each_step() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[run]
name = "p"
threads = 1
{}
[[stages]]
kind = "distill_chains"
name = "chains"
[stages.sft]
epochs = 60
batch_size = 8
lr = 3e-3
warmup_ratio = 0.0
checkpoint_every = 0

[[stages]]
kind = "meds3_search"
name = "mcts"
init = "chains"
[stages.mcts]
max_nodes = 8
rollout_budget = 4
min_rollouts = 2
[stages.generation]
step_max_tokens = 32
rollout_max_tokens = 96

[[stages]]
kind = "meds3_prm"
name = "prm"
init = "chains"
data = ["mcts"]
balance = false
[stages.sft]
epochs = 2
batch_size = 8

[[stages]]
kind = "grpo"
name = "grpo-prm"
init = "chains"
advantage = "prm"
prm = "prm"
[stages.sampling]
samples = 4
max_new_tokens = 96
[stages.learner]
batch_size = 8
lr = 1e-4

[[stages]]
kind = "grpo"
name = "grpo-mcts"
init = "chains"
advantage = "mcts"
[stages.sampling]
samples = 4
[stages.mcts]
max_nodes = 8
rollout_budget = 4
min_rollouts = 2
[stages.generation]
step_max_tokens = 32
rollout_max_tokens = 96
[stages.learner]
batch_size = 8
lr = 1e-4

[[stages]]
kind = "grpo"
name = "grpo-treerl"
init = "chains"
advantage = "mcts"
tree_advantage = "treerl"
[stages.sampling]
samples = 4
[stages.mcts]
max_nodes = 8
rollout_budget = 4
min_rollouts = 2
[stages.generation]
step_max_tokens = 32
rollout_max_tokens = 96
[stages.learner]
batch_size = 8
lr = 1e-4
"#,
        support::TINY_WORLD
    );
    let config = support::write_config(tmp.path(), &text);
    let o = support::medzero(&["run", &config]);
    assert!(o.status.success(), "{}", support::stderr(&o));
    let run = tmp.path().join("runs/p/stages");
    let student = Policy::load(&run.join("0-chains/model"), tch::Device::Cpu, None).unwrap();
    let tok = &student.tokenizer;

    // PRM: the pooled step scores of a group, normalised, summed from each
    // token's step on.
    let mut prm_steps = 0;
    for group in stored_groups(&run.join("3-grpo-prm")) {
        let pooled: Vec<f32> = group.iter().flat_map(|t| t.values.clone()).collect();
        let mut norm = normalise(&pooled, ScaleRewards::Group).into_iter();
        for t in &group {
            let s = steps(tok, &t.tokens).unwrap();
            let text = tok.decode(&t.tokens).unwrap();
            assert_eq!(
                s.texts,
                response_steps(&text),
                "{}: steps in ids vs text",
                t.id
            );
            prm_steps += s.texts.len();
            let step_adv: Vec<f32> = norm.by_ref().take(s.texts.len()).collect();
            for (i, (&k, &a)) in s.of_token.iter().zip(&t.advantages).enumerate() {
                let want: f32 = step_adv[k.saturating_sub(1).min(step_adv.len())..]
                    .iter()
                    .sum();
                assert!(
                    (a - want).abs() < 1e-5,
                    "{}: token {i} (step {k}): {a} vs {want}",
                    t.id
                );
            }
        }
    }
    assert!(prm_steps > 0, "no completion had a step");

    // Tree: each step's value minus its parent's; the opening sentence 0.
    let mut leaves = 0;
    for group in stored_groups(&run.join("4-grpo-mcts")) {
        for t in group.iter().filter(|t| !t.tokens.is_empty()) {
            leaves += 1;
            let root = t.meta["root_value"].as_f64().unwrap() as f32;
            let ends: Vec<usize> = serde_json::from_value(t.meta["ends"].clone()).unwrap();
            assert_eq!(ends.len(), t.values.len() + 1, "{}", t.id);
            assert_eq!(
                *ends.last().unwrap() + 1,
                t.tokens.len(),
                "{}: the end of turn",
                t.id
            );
            assert_eq!(
                *t.tokens.last().unwrap(),
                tok.end_of_turn_id(&PromptTemplate::Plain)
            );
            // The ids of the opening sentence and of each step decode to them.
            assert!(
                tok.decode(&t.tokens[..ends[0]])
                    .unwrap()
                    .starts_with("Let's"),
                "{}",
                t.id
            );
            for (i, &a) in t.advantages.iter().enumerate() {
                let node = ends.iter().filter(|&&e| e <= i).count().min(t.values.len());
                let want = match node {
                    0 => 0.0,
                    1 => t.values[0] - root,
                    k => t.values[k - 1] - t.values[k - 2],
                };
                assert!(
                    (a - want).abs() < 1e-6,
                    "{}: token {i} (node {node}): {a} vs {want}",
                    t.id
                );
            }
        }
    }
    assert!(leaves > 0, "no tree had a finished leaf");

    // TreeRL: (V - V(root) + V - V(parent)) / sqrt(|L|), V the share of
    // correct leaves under a node.
    let mut checked = 0;
    for t in stored_groups(&run.join("5-grpo-treerl"))
        .iter()
        .flatten()
        .filter(|t| !t.tokens.is_empty())
    {
        let meta = &t.meta;
        let ends: Vec<usize> = serde_json::from_value(meta["ends"].clone()).unwrap();
        let acc: Vec<f64> = serde_json::from_value(meta["accuracy"].clone()).unwrap();
        let n: Vec<f64> = serde_json::from_value(meta["leaves"].clone()).unwrap();
        let root = meta["root_accuracy"].as_f64().unwrap();
        assert!(
            acc.iter().chain([&root]).all(|a| (0.0..=1.0).contains(a)),
            "{}",
            t.id
        );
        // The leaf's own accuracy is its reward.
        assert_eq!(*acc.last().unwrap() as f32, t.reward, "{}", t.id);
        for (i, &a) in t.advantages.iter().enumerate() {
            let k = ends.iter().filter(|&&e| e <= i).count().min(acc.len());
            let want = match k {
                0 => 0.0,
                k => {
                    let parent = if k == 1 { root } else { acc[k - 2] };
                    ((acc[k - 1] - root) + (acc[k - 1] - parent)) / n[k - 1].sqrt()
                }
            };
            assert!(
                (a as f64 - want).abs() < 1e-5,
                "{}: token {i}: {a} vs {want}",
                t.id
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
    for stage in ["3-grpo-prm", "4-grpo-mcts", "5-grpo-treerl"] {
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join(stage).join("report.json")).unwrap(),
        )
        .unwrap();
        assert!(
            report["counters"]["trained"].as_u64().unwrap() > 0,
            "{stage}: {report}"
        );
    }
}

/// The `rloo` stage through the CLI on a tiny world, with the KL in the
/// reward: every sample is trained on, the weights move, and the same seed
/// gives the same weights.
#[test]
fn the_rloo_stage_trains_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[run]
name = "r"
threads = 1
{}
[[stages]]
kind = "distill_chains"
name = "chains"
[stages.sft]
epochs = 150
batch_size = 8
lr = 3e-3
warmup_ratio = 0.0
checkpoint_every = 0

[[stages]]
kind = "rloo"
init = "chains"
[stages.sampling]
samples = 4
temperature = 0.8
max_new_tokens = 320
[stages.rloo]
beta = 0.05
normalize_advantages = true
[stages.learner]
batch_size = 8
lr = 1e-3
"#,
        support::TINY_WORLD
    );
    let config = support::write_config(tmp.path(), &text);
    let weights = |name: &str| {
        let o = support::medzero(&["run", &config, "--set", &format!("run.name={name}")]);
        assert!(o.status.success(), "{}", support::stderr(&o));
        let run = tmp.path().join("runs").join(name);
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("stages/1-rloo/report.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(report["counters"]["trained"], 32, "{report}");
        let groups = stored_groups(&run.join("stages/1-rloo"));
        assert!(
            groups
                .iter()
                .flatten()
                .any(|t| t.advantages.iter().any(|&a| a != 0.0)),
            "every advantage is 0: nothing was learned from"
        );
        assert!(
            groups
                .iter()
                .flatten()
                .all(|t| t.meta["kl"].as_f64().is_some()),
            "a completion does not carry its KL for the learner's metric"
        );
        let read =
            |stage: &str| std::fs::read(run.join(stage).join("model/model.safetensors")).unwrap();
        let (before, after) = (read("stages/0-chains"), read("stages/1-rloo"));
        assert!(before != after, "RLOO left the weights as they were");
        after
    };
    assert_eq!(weights("a"), weights("b"), "same seed, other weights");
}

/// DAPO's dynamic sampling: with `drop_tied_groups`, a completion whose
/// every advantage is 0 (its group's rewards all tie) is not trained on,
/// so the learner's batch fills with the next ones.
#[test]
fn tied_groups_are_dropped_only_when_asked() {
    use medzero::runtime::learner::Objective;
    let objective = |drop_tied_groups| grpo::GrpoObjective {
        cfg: GrpoConfig {
            drop_tied_groups,
            ..GrpoConfig::default()
        },
        prompts: [("p".to_string(), vec![3, 4])].into_iter().collect(),
        sampled: grpo::Sampled {
            max_completion: 8,
            temperature: 1.0,
        },
        reference: None,
        end_of_turn: 2,
    };
    let trajectory = |advantages: Vec<f32>| Trajectory {
        id: "p/s000".into(),
        problem_id: "p".into(),
        steps: Vec::new(),
        answer: None,
        reward: 1.0,
        values: Vec::new(),
        advantages,
        policy_version: 0,
        provenance: Default::default(),
        tokens: vec![5, 6, 2],
        logprobs: Vec::new(),
        meta: serde_json::Value::Null,
    };
    let (tied, signal) = (trajectory(vec![0.0; 3]), trajectory(vec![0.5; 3]));
    assert!(objective(false).accepts(&tied));
    assert!(!objective(true).accepts(&tied));
    assert!(objective(true).accepts(&signal));
    // Advantages that do not cover the tokens are never trained on.
    assert!(!objective(false).accepts(&trajectory(vec![0.5; 2])));
}
