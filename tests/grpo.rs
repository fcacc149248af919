//! GRPO against TRL 1.16's own GRPOTrainer: one optimizer step on the same
//! checkpoint, prompts, completions and rewards (TRL's generation bypassed by
//! `tests/support/grpo_peer.py`), for each loss type and reward scaling.
//! Advantages, the loss, the gradient norm and every updated parameter must
//! agree.

mod support;

use medzero::rollout::grpo::{ScaleRewards, advantages};
use medzero::train::grpo::{self, GrpoConfig, LossType, Sample};
use medzero_policies::Policy;
use medzero_policies::optim::{AdamW, AdamWConfig};
use std::path::Path;

const WORDS: &str = "the patient has fever cough rash pain and the answer is flu cold measles";
const LR: f64 = 1e-3;

fn peer(dir: &Path, spec: &serde_json::Value) -> serde_json::Value {
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

fn medzero_step(
    policy: &Policy,
    prompts: &[Vec<i64>],
    completions: &[Vec<i64>],
    adv: &[f32],
    cfg: &GrpoConfig,
) -> (f64, f64) {
    let samples: Vec<Sample> = completions
        .iter()
        .enumerate()
        .map(|(i, c)| Sample {
            prompt: &prompts[i / 4],
            completion: c,
            advantage: adv[i],
            old_logprobs: &[],
        })
        .collect();
    let adam = AdamWConfig {
        lr: LR,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(policy.named_parameters(), adam, AdamW::default_decay).unwrap();
    let out = grpo::loss(policy, &samples, cfg, 8).unwrap();
    let loss = out.loss.double_value(&[]);
    out.loss.backward();
    let norm = opt.clip_grad_norm(1.0);
    opt.step(LR);
    (loss, norm)
}

#[test]
fn one_step_matches_trl_grpo_trainer() {
    let cases = [
        (LossType::Grpo, ScaleRewards::Group, "grpo", "group"),
        (LossType::Bnpo, ScaleRewards::Group, "bnpo", "group"),
        (LossType::DrGrpo, ScaleRewards::None, "dr_grpo", "none"),
        (LossType::Dapo, ScaleRewards::Group, "dapo", "group"),
    ];
    for (loss_type, scale, trl_loss, trl_scale) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let policy = support::tiny_policy(WORDS, 3);
        let eos = policy.tokenizer.eos_id();
        policy.save(&tmp.path().join("model")).unwrap();
        let (prompts, completions, rewards) = batch(eos);
        let spec = serde_json::json!({
            "model_dir": tmp.path().join("model"),
            "trainer": "grpo",
            "config": {
                "loss_type": trl_loss,
                "scale_rewards": trl_scale,
                "beta": 0.0,
                "epsilon": 0.2,
                "learning_rate": LR,
                "lr_scheduler_type": "constant",
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "max_completion_length": 8,
                "temperature": 1.0,
            },
            "prompts": prompts,
            "completions": completions,
            "rewards": rewards,
            "eos_token_id": eos,
            "shuffle_batch": false,
            "dump_token_level": false,
        });
        let trl = peer(tmp.path(), &spec);
        let what = format!("{trl_loss}, scale_rewards {trl_scale}");

        let adv: Vec<f32> = rewards
            .chunks(4)
            .flat_map(|g| advantages(g, scale))
            .collect();
        for (a, b) in adv.iter().zip(floats(&trl["advantages"])) {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "{what}: advantage {a} vs TRL {b}"
            );
        }
        let cfg = GrpoConfig {
            loss_type,
            ..GrpoConfig::default()
        };
        let (loss, norm) = medzero_step(&policy, &prompts, &completions, &adv, &cfg);
        let trl_loss_v = trl["loss"].as_f64().unwrap();
        let trl_norm = trl["grad_norm"].as_f64().unwrap();
        assert!(
            (loss - trl_loss_v).abs() < 1e-5,
            "{what}: loss {loss} vs TRL {trl_loss_v}"
        );
        assert!(
            (norm - trl_norm).abs() < 1e-4 * trl_norm.max(1.0),
            "{what}: grad norm {norm} vs TRL {trl_norm}"
        );
        let params = trl["params"].as_object().unwrap();
        let mut worst = 0.0f64;
        for (name, p) in policy.named_parameters() {
            let Some(theirs) = params.get(&name) else {
                // A tied lm_head is the embedding: compared under its name.
                assert!(name.contains("lm_head"), "{what}: TRL has no {name}");
                continue;
            };
            let ours: Vec<f64> =
                Vec::<f64>::try_from(&p.flatten(0, -1).to_kind(tch::Kind::Double)).unwrap();
            for (a, b) in ours.iter().zip(floats(theirs)) {
                worst = worst.max((a - b).abs());
            }
        }
        // AdamW's first step moves each weight by about lr: the parameters
        // agree to 1% of one step.
        assert!(
            worst < LR * 1e-2,
            "{what}: parameters differ by up to {worst}"
        );
    }
}

/// The `grpo` stage end to end through the CLI on a tiny world: it trains
/// on every sample of every group, changes the weights, and the same seed
/// gives the same weights.
#[test]
fn the_grpo_stage_trains_and_is_reproducible() {
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
max_new_tokens = 160
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
            &std::fs::read_to_string(run.join("stages/1-grpo/report.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(report["trajectories"], 32, "{report}");
        assert_eq!(report["counters"]["trained"], 32, "{report}");
        assert!(report["steps"].as_u64().unwrap() >= 4, "{report}");
        let read =
            |stage: &str| std::fs::read(run.join(stage).join("model/model.safetensors")).unwrap();
        let (before, after) = (read("stages/0-chains"), read("stages/1-grpo"));
        assert!(before != after, "GRPO left the weights as they were");
        after
    };
    assert_eq!(weights("a"), weights("b"), "same seed, other weights");
}
