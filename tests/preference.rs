//! The DPO family and KTO: loss arithmetic on hand-computed values, KTO's KL
//! pairing, TR-DPO's reference sync across a resume, and pair files.

mod support;

use medzero::infra::monitor::Recorder;
use medzero::train;
use medzero::train::TrainConfig;
use medzero::train::dpo::{Dpo, DpoConfig, DpoLoss, EncodedPair, Pair, Reference, dpo_losses};
use medzero::train::kto::{EncodedKto, rotate_kl};
use medzero_policies::Policy;
use medzero_policies::optim::ScheduleKind;
use std::sync::atomic::AtomicBool;
use tch::Tensor;

fn t(v: &[f32]) -> Tensor {
    Tensor::from_slice(v)
}

fn losses(cfg: &DpoConfig) -> Vec<f64> {
    // Δ = (pc - rc) - (pr - rr) = (-1 - -2) - (-3 - -1) = 3 and (-2 - -1) - (-2 - -2) = -1.
    let l = dpo_losses(
        cfg,
        &t(&[-1.0, -2.0]),
        &t(&[-3.0, -2.0]),
        &t(&[-2.0, -1.0]),
        &t(&[-1.0, -2.0]),
    );
    Vec::<f64>::try_from(&l.to_kind(tch::Kind::Double)).unwrap()
}

fn log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

#[test]
fn dpo_losses_match_the_formulas() {
    let deltas = [3.0, -1.0];
    let beta = 0.1;
    let sigmoid = DpoConfig::default();
    for (got, d) in losses(&sigmoid).iter().zip(deltas) {
        approx::assert_abs_diff_eq!(*got, -log_sigmoid(beta * d), epsilon = 1e-6);
    }
    let e = 0.1;
    let cdpo = DpoConfig {
        label_smoothing: e,
        ..DpoConfig::default()
    };
    for (got, d) in losses(&cdpo).iter().zip(deltas) {
        let want = -(1.0 - e) * log_sigmoid(beta * d) - e * log_sigmoid(-beta * d);
        approx::assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
    let robust = DpoConfig {
        loss: DpoLoss::Robust,
        label_smoothing: e,
        ..DpoConfig::default()
    };
    for (got, d) in losses(&robust).iter().zip(deltas) {
        let want =
            (-(1.0 - e) * log_sigmoid(beta * d) + e * log_sigmoid(-beta * d)) / (1.0 - 2.0 * e);
        approx::assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
    let ipo = DpoConfig {
        loss: DpoLoss::Ipo,
        ..DpoConfig::default()
    };
    for (got, d) in losses(&ipo).iter().zip(deltas) {
        approx::assert_abs_diff_eq!(*got, (d - 1.0 / (2.0 * beta)).powi(2), epsilon = 1e-4);
    }
    let hinge = DpoConfig {
        loss: DpoLoss::Hinge,
        beta: 0.5,
        ..DpoConfig::default()
    };
    for (got, d) in losses(&hinge).iter().zip(deltas) {
        approx::assert_abs_diff_eq!(*got, (1.0 - 0.5 * d).max(0.0), epsilon = 1e-6);
    }
}

#[test]
fn invalid_dpo_settings_are_refused() {
    let bad = [
        DpoConfig {
            beta: 0.0,
            ..DpoConfig::default()
        },
        DpoConfig {
            label_smoothing: 0.5,
            ..DpoConfig::default()
        },
        DpoConfig {
            loss: DpoLoss::Ipo,
            label_smoothing: 0.1,
            ..DpoConfig::default()
        },
        DpoConfig {
            ref_sync_every: 2,
            ..DpoConfig::default()
        },
    ];
    for cfg in bad {
        assert!(cfg.validate().is_err(), "{cfg:?} validated");
    }
}

#[test]
fn kto_kl_pairs_rotate_within_each_batch() {
    let ex = |c: i64| EncodedKto {
        prompt: vec![c],
        completion: vec![c, c],
        desirable: c % 2 == 0,
        kl_completion: Vec::new(),
    };
    let mut v: Vec<EncodedKto> = (1..=5).map(ex).collect();
    rotate_kl(&mut v, 2);
    let kl: Vec<i64> = v.iter().map(|e| e.kl_completion[0]).collect();
    // Groups [1,2] [3,4] [5]: each takes its predecessor's completion.
    assert_eq!(kl, vec![2, 1, 4, 3, 5]);
}

const WORDS: &str = "the patient has fever cough rash answer is flu measles cold step one two";

fn pairs(policy: &Policy) -> Vec<EncodedPair> {
    let texts = [
        (
            "the patient has fever",
            "the answer is flu",
            "the answer is cold",
        ),
        (
            "the patient has rash",
            "the answer is measles",
            "the answer is flu",
        ),
        (
            "the patient has cough",
            "step one the answer is cold",
            "the answer is rash",
        ),
        (
            "the patient has fever rash",
            "the answer is measles",
            "step two cold",
        ),
    ];
    texts
        .iter()
        .map(|(p, c, r)| {
            let pair = Pair {
                prompt: p.to_string(),
                chosen: c.to_string(),
                rejected: r.to_string(),
                chosen_ids: None,
                rejected_ids: None,
                meta: serde_json::Value::Null,
            };
            EncodedPair::encode(policy, &pair, policy.tokenizer.eos_id(), 64).unwrap()
        })
        .collect()
}

fn optim(steps_per_epoch_batch: usize) -> TrainConfig {
    TrainConfig {
        epochs: 2.0,
        batch_size: steps_per_epoch_batch,
        lr: 1e-2,
        warmup_ratio: 0.0,
        schedule: ScheduleKind::Constant,
        weight_decay: 0.0,
        checkpoint_every: 0,
        log_every: 1,
        ..TrainConfig::default()
    }
}

fn tr_dpo(policy: &Policy, seed: u64) -> Dpo {
    let reference = support::tiny_policy(WORDS, seed);
    Dpo {
        cfg: DpoConfig {
            precompute_reference: false,
            ref_sync_every: 2,
            ref_sync_alpha: 0.6,
            ..DpoConfig::default()
        },
        pairs: pairs(policy),
        reference: Reference::Model(Box::new(reference)),
    }
}

fn weights(p: &Policy) -> Vec<Vec<f32>> {
    p.named_parameters()
        .iter()
        .map(|(_, t)| Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap())
        .collect()
}

#[test]
fn tr_dpo_resumes_bit_identically_with_its_synced_reference() {
    let cfg = optim(1);
    // Uninterrupted: 8 steps, the reference synced at steps 2, 4, 6, 8.
    let dir = tempfile::tempdir().unwrap();
    let full = support::tiny_policy(WORDS, 3);
    let mut obj = tr_dpo(&full, 3);
    let mut rec = Recorder::new();
    let r = train::train(
        &full,
        &mut obj,
        &cfg,
        train::TrainRun {
            seed: 7,
            dir: dir.path(),
            tag: "dpo",
            metrics: &mut rec,
            stop: &AtomicBool::new(false),
        },
    )
    .unwrap();
    assert_eq!(r.steps, 8);
    let Reference::Model(synced) = &obj.reference else {
        unreachable!()
    };
    assert_ne!(
        weights(synced),
        weights(&support::tiny_policy(WORDS, 3)),
        "the reference never moved"
    );
    for tag in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert_eq!(rec.scalars(&format!("train/{tag}")).len(), 8, "{tag}");
    }

    // A run of 3 steps (the reference synced at step 2), then resumed to 8:
    // the checkpoint must carry the synced reference, not the initial one.
    let dir2 = tempfile::tempdir().unwrap();
    let a = support::tiny_policy(WORDS, 3);
    let mut obj_a = tr_dpo(&a, 3);
    let short = TrainConfig {
        epochs: 0.75,
        ..cfg.clone()
    };
    let r = train::train(
        &a,
        &mut obj_a,
        &short,
        train::TrainRun {
            seed: 7,
            dir: dir2.path(),
            tag: "dpo",
            metrics: &mut Recorder::new(),
            stop: &AtomicBool::new(false),
        },
    )
    .unwrap();
    assert_eq!(r.steps, 3);
    let b = support::tiny_policy(WORDS, 3);
    let mut obj_b = tr_dpo(&b, 3);
    let r = train::train(
        &b,
        &mut obj_b,
        &cfg,
        train::TrainRun {
            seed: 7,
            dir: dir2.path(),
            tag: "dpo",
            metrics: &mut Recorder::new(),
            stop: &AtomicBool::new(false),
        },
    )
    .unwrap();
    assert_eq!(r.resumed_from, Some(3));
    assert_eq!(weights(&b), weights(&full), "resumed policy differs");
    let Reference::Model(resumed_ref) = &obj_b.reference else {
        unreachable!()
    };
    assert_eq!(
        weights(resumed_ref),
        weights(synced),
        "resumed reference differs"
    );
}

#[test]
fn dpo_training_raises_the_chosen_margin() {
    let policy = support::tiny_policy(WORDS, 5);
    let reference = support::tiny_policy(WORDS, 5);
    let p = pairs(&policy);
    let mut obj = Dpo {
        cfg: DpoConfig::default(),
        reference: Reference::precompute(&reference, &p, 2).unwrap(),
        pairs: p,
    };
    let mut cfg = optim(4);
    cfg.epochs = 20.0;
    let dir = tempfile::tempdir().unwrap();
    let mut rec = Recorder::new();
    train::train(
        &policy,
        &mut obj,
        &cfg,
        train::TrainRun {
            seed: 1,
            dir: dir.path(),
            tag: "dpo",
            metrics: &mut rec,
            stop: &AtomicBool::new(false),
        },
    )
    .unwrap();
    let acc = rec.scalars("train/rewards/accuracies");
    let margins = rec.scalars("train/rewards/margins");
    // Policy = reference at step 1, up to float error: the reference was
    // computed in batches of 2, the policy in one batch of 4.
    assert!(margins[0].1.abs() < 1e-3, "{margins:?}");
    assert_eq!(acc.last().unwrap().1, 1.0, "{acc:?}");
    assert!(margins.last().unwrap().1 > 0.5, "{margins:?}");
}

#[test]
fn a_malformed_pair_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n{\"prompt\":\"a\",\"chosen\":\"b\"}\n",
    )
    .unwrap();
    let err = format!(
        "{:#}",
        medzero::stages::preference::read_pairs(&path).unwrap_err()
    );
    assert!(
        err.contains("pairs.jsonl:2: not a preference pair"),
        "{err}"
    );
    assert!(err.contains("rejected"), "{err}");
}

/// Runs TRL's trainer for one step through `tests/support/trl_parity.py`.
fn trl_step(dir: &std::path::Path, spec: &serde_json::Value) -> serde_json::Value {
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out = dir.join("trl");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/trl_parity.py");
    let run = std::process::Command::new(support::python())
        .arg(&script)
        .arg("--model")
        .arg(dir.join("policy"))
        .arg("--spec")
        .arg(&spec_path)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running python (make setup)");
    assert!(
        run.status.success(),
        "trl_parity.py failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out.join("result.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// One medzero step on TRL's token ids; returns the logged metrics by name.
fn medzero_step(
    dir: &std::path::Path,
    objective: &mut dyn train::BatchLoss,
    policy: &Policy,
    lr: f64,
) -> std::collections::BTreeMap<String, f64> {
    let n = objective.items();
    let cfg = TrainConfig {
        epochs: 1.0,
        batch_size: n,
        lr,
        weight_decay: 0.0,
        warmup_ratio: 0.0,
        schedule: ScheduleKind::Constant,
        max_grad_norm: 1.0,
        checkpoint_every: 0,
        log_every: 1,
        ..TrainConfig::default()
    };
    let mut rec = Recorder::new();
    let r = train::train(
        policy,
        objective,
        &cfg,
        train::TrainRun {
            seed: 0,
            dir: &dir.join("ours"),
            tag: "t",
            metrics: &mut rec,
            stop: &AtomicBool::new(false),
        },
    )
    .unwrap();
    assert_eq!(r.steps, 1);
    rec.records()
        .into_iter()
        .filter_map(|r| match r.value {
            medzero::infra::monitor::Value::Scalar(x) => {
                r.tag.strip_prefix("train/").map(|t| (t.to_string(), x))
            }
            _ => None,
        })
        .collect()
}

/// The parity bar: metrics within 1e-4 (relative above 1), every parameter
/// after the step within 1e-4 of TRL's.
fn assert_matches_trl(
    case: &str,
    trl: &serde_json::Value,
    ours: &std::collections::BTreeMap<String, f64>,
    keys: &[&str],
    policy: &Policy,
    dir: &std::path::Path,
) {
    for k in keys {
        let want = trl["metrics"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("{case}: TRL logged no {k}: {}", trl["metrics"]));
        let got = ours
            .get(*k)
            .copied()
            .unwrap_or_else(|| panic!("{case}: medzero logged no {k}: {ours:?}"));
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{case}: {k}: medzero {got} vs TRL {want}"
        );
    }
    // TRL saves weights and config; the tokenizer is the policy's.
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join("policy").join(f), dir.join("trl/model").join(f)).unwrap();
    }
    let theirs = Policy::load(&dir.join("trl/model"), tch::Device::Cpu, None).unwrap();
    let mut worst = (0.0f64, String::new());
    for ((name, a), (_, b)) in policy
        .named_parameters()
        .iter()
        .zip(theirs.named_parameters())
    {
        let d = (a - b).abs().max().double_value(&[]);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    assert!(
        worst.0 <= 1e-4,
        "{case}: parameter {} differs from TRL's by {}",
        worst.1,
        worst.0
    );
}

const PARITY_WORDS: &str =
    "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20";

/// A policy and a different reference (so log-ratios are not zero at step
/// 1 and the loss itself tells the formulas apart), saved for TRL.
fn parity_models(dir: &std::path::Path) -> (Policy, Policy) {
    support::tiny_policy(PARITY_WORDS, 21)
        .save(&dir.join("policy"))
        .unwrap();
    support::tiny_policy(PARITY_WORDS, 22)
        .save(&dir.join("reference"))
        .unwrap();
    (
        Policy::load(&dir.join("policy"), tch::Device::Cpu, None).unwrap(),
        Policy::load(&dir.join("reference"), tch::Device::Cpu, None).unwrap(),
    )
}

#[test]
fn dpo_family_matches_trl_dpo_trainer_on_one_step() {
    let examples = serde_json::json!([
        {"prompt": "w3 w4 w5", "chosen": " w6 w7", "rejected": " w8"},
        {"prompt": "w9 w10", "chosen": " w11", "rejected": " w12 w13 w14"},
        {"prompt": "w15", "chosen": " w16 w17 w18", "rejected": " w19 w20"},
        {"prompt": "w1 w2 w3 w4", "chosen": " w5", "rejected": " w6"},
    ]);
    let cases = [
        ("sigmoid", DpoLoss::Sigmoid, 0.1, 0.0, 0.0, true),
        ("ipo", DpoLoss::Ipo, 0.1, 0.0, 0.0, false),
        ("robust", DpoLoss::Robust, 0.1, 0.1, 0.0, false),
        // cDPO is not here: TRL 1.16's sigmoid loss ignores label_smoothing
        // (it kept it for `robust` only); medzero's cDPO is pinned by hand above.
        ("robust-0.2", DpoLoss::Robust, 0.3, 0.2, 0.0, true),
        ("hinge", DpoLoss::Hinge, 0.5, 0.0, 0.0, false),
        ("rpo", DpoLoss::Sigmoid, 0.1, 0.0, 1.0, false),
    ];
    let lr = 1e-3;
    for (case, loss, beta, smoothing, rpo, precompute) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (policy, reference) = parity_models(dir);
        let loss_type = match case {
            "rpo" => "sigmoid",
            "robust-0.2" => "robust",
            _ => case,
        };
        let trl = trl_step(
            dir,
            &serde_json::json!({
                "trainer": "dpo", "loss_type": loss_type, "beta": beta, "label_smoothing": smoothing,
                "rpo_alpha": if rpo > 0.0 { Some(rpo) } else { None },
                "lr": lr, "max_grad_norm": 1.0, "examples": examples,
                "ref_model": dir.join("reference"),
            }),
        );
        let pairs: Vec<EncodedPair> = trl["tokenized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| EncodedPair {
                prompt: ids(&t["prompt_ids"]),
                chosen: ids(&t["chosen_ids"]),
                rejected: ids(&t["rejected_ids"]),
            })
            .collect();
        let cfg = DpoConfig {
            loss,
            beta,
            label_smoothing: smoothing,
            rpo_alpha: rpo,
            precompute_reference: precompute,
            ..DpoConfig::default()
        };
        let reference = if precompute {
            Reference::precompute(&reference, &pairs, 2).unwrap()
        } else {
            Reference::Model(Box::new(reference))
        };
        let mut obj = Dpo {
            cfg,
            pairs,
            reference,
        };
        let ours = medzero_step(dir, &mut obj, &policy, lr);
        let keys = vec![
            "loss",
            "grad_norm",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ];
        assert_matches_trl(case, &trl, &ours, &keys, &policy, dir);
        assert!(
            ours["rewards/margins"].abs() > 1e-3,
            "{case}: the reference must differ from the policy"
        );
    }
}

#[test]
fn kto_matches_trl_kto_trainer_on_one_step() {
    let examples = serde_json::json!([
        {"prompt": "w3 w4 w5", "completion": " w6 w7", "label": true},
        {"prompt": "w9 w10", "completion": " w11", "label": false},
        {"prompt": "w15", "completion": " w16 w17 w18", "label": true},
        {"prompt": "w1 w2 w3 w4", "completion": " w5", "label": false},
    ]);
    for (case, beta, wd, wu) in [("kto", 0.1, 1.0, 1.0), ("kto-weighted", 0.5, 1.5, 0.7)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (policy, reference) = parity_models(dir);
        let trl = trl_step(
            dir,
            &serde_json::json!({
                "trainer": "kto", "beta": beta, "desirable_weight": wd, "undesirable_weight": wu,
                "lr": 1e-3, "max_grad_norm": 1.0, "examples": examples,
                "ref_model": dir.join("reference"),
            }),
        );
        let examples: Vec<EncodedKto> = trl["tokenized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| EncodedKto {
                prompt: ids(&t["prompt_ids"]),
                completion: ids(&t["completion_ids"]),
                desirable: t["label"].as_bool().unwrap(),
                kl_completion: ids(&t["kl_completion_ids"]),
            })
            .collect();
        let mut obj = medzero::train::kto::Kto {
            cfg: medzero::train::kto::KtoConfig {
                beta,
                desirable_weight: wd,
                undesirable_weight: wu,
            },
            examples,
            reference,
        };
        let ours = medzero_step(dir, &mut obj, &policy, 1e-3);
        let keys = [
            "loss",
            "grad_norm",
            "kl",
            "rewards/chosen",
            "rewards/rejected",
            "logps/chosen",
            "logps/rejected",
        ];
        assert_matches_trl(case, &trl, &ours, &keys, &policy, dir);
    }
}

#[test]
fn teacher_corrections_keep_the_sound_prefix_and_verify() {
    use medzero::rollout::medcritical::{Corrector, SelfCorrection};
    use medzero::runtime::actor::Rollout;
    use medzero_envs::synthclinic::{OracleConfig, SynthClinic, SynthConfig};
    use rand::SeedableRng;
    let cfg = medzero::experiment::config::Config::parse(
        "[data.synthclinic]\ntrain = 20\ntest = 10\n[student]\nhidden_size = 32\nlayers = 1\nheads = 2\nkv_heads = 1\nintermediate_size = 64\n",
        "t",
        &[],
    )
    .unwrap();
    let world = SynthClinic::generate(&SynthConfig {
        train: 20,
        test: 10,
        ..SynthConfig::default()
    })
    .unwrap();
    let policy =
        medzero::experiment::student::base_student(&cfg, &world, tch::Device::Cpu).unwrap();
    let truth = world.truth();
    let teacher = medzero::teacher::OracleTeacher(world.oracle(OracleConfig::default()));
    let rollout = SelfCorrection {
        sampling: medzero::rollout::sampling::SamplingConfig {
            samples: 3,
            max_new_tokens: 24,
            ..Default::default()
        },
        template: medzero::experiment::student::student_template(&cfg).unwrap(),
        labeller: &truth,
        corrector: Corrector::Teacher,
        teacher: Some(&teacher),
        retries: 1,
    };
    let p = &world.train[0];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let rolled = rollout.rollout(&policy, p, &mut rng).unwrap();
    assert_eq!(rolled.trajectories.len(), 3);
    for t in &rolled.trajectories {
        // The untrained student is wrong; the noiseless teacher corrects it.
        assert_eq!(t.reward, 0.0);
        assert!(t.meta["text"].is_string());
        assert_eq!(t.meta["corrected_by"], "teacher");
        let fixed = t.meta["correction"].as_str().expect("a correction");
        let steps: Vec<medzero_envs::Step> = medzero_envs::response_steps(fixed)
            .into_iter()
            .map(medzero_envs::Step::new)
            .collect();
        assert!(
            truth.label_steps(p, &steps).unwrap().iter().all(|&ok| ok),
            "{fixed}"
        );
        assert!(medzero_envs::verify::verify(p, &steps.last().unwrap().text).correct);
    }
}
