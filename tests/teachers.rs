//! The local-model teacher and the LLM-as-judge in evaluation, on a tiny
//! SynthClinic world: a small model memorises the gold chains of 8 training
//! questions, then serves as the teacher of a MedThink stage and as the judge.

mod support;

use medzero::experiment::config::Config;
use medzero::rollout::sampling::{Sampler, SamplingConfig};
use medzero::runtime::actor::Rollout;
use medzero::teacher::{
    JudgeReward, LocalTeacher, LocalTeacherConfig, OracleTeacher, Teacher, Verdict,
};
use medzero_envs::synthclinic::{OracleConfig, SynthClinic};
use medzero_envs::verify;
use medzero_policies::tokenizer::PromptTemplate;
use medzero_rewards::{Reward, RuleVerifier};
use rand::SeedableRng;
use serde_json::Value;
use std::path::{Path, PathBuf};
use support::{medzero, stderr, stdout, write_config};

const WORLD: &str = support::TINY_WORLD;

/// The teacher model: gold-chain SFT until memorised; returns its run folder.
fn teacher_run(dir: &Path) -> PathBuf {
    support::memorised_chains(dir, "teacher")
}

fn world() -> SynthClinic {
    let cfg = Config::parse(WORLD, "test", &[]).unwrap();
    SynthClinic::generate(&cfg.data.synthclinic).unwrap()
}

fn local(model: &Path, agreement: f64) -> LocalTeacher {
    let cfg = LocalTeacherConfig {
        model: model.to_path_buf(),
        screen_agreement: agreement,
        ..Default::default()
    };
    LocalTeacher::load(&cfg, PromptTemplate::Plain, tch::Device::Cpu).unwrap()
}

#[test]
fn a_local_model_teaches_screens_corrects_and_judges() {
    let tmp = tempfile::tempdir().unwrap();
    let run = teacher_run(tmp.path());
    let world = world();
    let teacher = local(&run, 0.75);
    let mut right = 0;
    for p in &world.train {
        let explained = teacher.explain(p).unwrap();
        let chain = teacher.correct(p, &[]).unwrap();
        let chain_text = medzero_envs::render_chain(&chain);
        // One greedy answer behind every request.
        let first = explained.lines().next().unwrap();
        let answer = first.strip_prefix("Answer: ").unwrap();
        assert_eq!(
            verify::verify(p, &chain_text).chosen,
            medzero_envs::verify::resolve_option(&p.options, answer),
            "{explained}\n---\n{chain_text}"
        );
        assert!(explained.contains("\n1. "), "{explained}");
        // The judge holds a reply to the teacher's own answer.
        assert_eq!(teacher.judge(p, &chain_text).unwrap(), Verdict::Correct);
        let other = p
            .options
            .iter()
            .find(|c| Some(c.letter.as_str()) != verify::verify(p, &chain_text).chosen.as_deref())
            .unwrap();
        assert_eq!(
            teacher
                .judge(p, &format!("The answer is {}.", other.text))
                .unwrap(),
            Verdict::Wrong
        );
        right += verify::verify(p, &chain_text).correct as usize;
    }
    assert!(right >= 6, "the teacher learned {right} of 8 chains");

    // Screening: every sample must agree at 1.0, none need to at 0.0; the
    // same seed screens the same way.
    let all = local(&run, 0.0);
    let strict = local(&run, 1.0);
    let strict_again = local(&run, 1.0);
    let kept: Vec<bool> = world
        .train
        .iter()
        .map(|p| strict.screen(p).unwrap())
        .collect();
    for (p, k) in world.train.iter().zip(&kept) {
        assert!(all.screen(p).unwrap());
        assert_eq!(strict_again.screen(p).unwrap(), *k);
    }

    // The judge as the reward of sampled answers: an oracle judge without
    // noise scores as the rule does; one wrong on every item inverts it.
    let model =
        medzero_policies::Policy::load(&run.join("stages/0-chains/model"), tch::Device::Cpu, None)
            .unwrap();
    for noise in [0.0, 1.0] {
        let oracle = OracleTeacher(world.oracle(OracleConfig {
            noise,
            ..Default::default()
        }));
        let sampler = Sampler {
            cfg: SamplingConfig {
                samples: 4,
                max_new_tokens: 320,
                ..Default::default()
            },
            template: PromptTemplate::Plain,
            reward: Box::new(JudgeReward(&oracle)) as Box<dyn Reward>,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut both = [0, 0];
        for p in &world.train {
            for t in sampler.rollout(&model, p, &mut rng).unwrap().trajectories {
                let text = model.tokenizer.decode(&t.tokens).unwrap();
                let rule = RuleVerifier.score(p, &text).unwrap();
                assert_eq!(t.reward, if noise == 0.0 { rule } else { 1.0 - rule });
                both[rule as usize] += 1;
            }
        }
        assert!(both[1] > 0, "{both:?}");
    }

    // An untrained model names no option: a malformed reply, not a crash.
    let raw = tmp.path().join("raw");
    let trained =
        medzero_policies::Policy::load(&run.join("stages/0-chains/model"), tch::Device::Cpu, None)
            .unwrap();
    medzero_policies::Policy::new_random(
        trained.config(),
        trained.tokenizer.clone(),
        tch::Device::Cpu,
        7,
    )
    .unwrap()
    .save(&raw)
    .unwrap();
    let e = local(&raw, 0.75).explain(&world.train[0]).unwrap_err();
    assert!(e.is_malformed(), "{e:#}");
}

#[test]
fn medthink_runs_on_a_local_teacher_and_eval_judges_with_the_oracle() {
    let tmp = tempfile::tempdir().unwrap();
    let run = teacher_run(tmp.path());
    let student = tmp.path().join("student");
    std::fs::create_dir_all(&student).unwrap();
    let text = format!(
        r#"[run]
name = "mt"
threads = 1
{WORLD}
[teacher]
kind = "local"
[teacher.local]
model = "{model}"
[[stages]]
kind = "medthink_knowledge"
name = "medthink-1"
[stages.sft]
epochs = 1
batch_size = 4
[[stages]]
kind = "eval"
models = ["medthink-1"]
[stages.eval]
judge = true
max_new_tokens = 16
"#,
        model = run.display()
    );
    let config = write_config(&student, &text);
    let o = medzero(&["run", &config]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stage = student.join("runs/mt/stages/0-medthink-1");
    let records: Vec<Value> = std::fs::read_to_string(stage.join("sharegpt.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!records.is_empty() && records.len() <= 8);
    for r in &records {
        let v = r["conversations"][1]["value"].as_str().unwrap();
        assert!(v.starts_with("Answer: ") && v.contains("\n1. "), "{v}");
    }
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(student.join("runs/mt/results.json")).unwrap(),
    )
    .unwrap();
    let row = &results["rows"][0];
    assert!(row["judge_accuracy"].is_number(), "{row}");

    // `medzero eval --judge`: the oracle without noise agrees with the
    // strict rule on every answer; with noise 0.5 it cannot.
    let data = student.join("runs/mt/data/test.jsonl");
    for (noise, agrees) in [(0.0, true), (0.5, false)] {
        let judge = tmp.path().join(format!("judge-{noise}.toml"));
        std::fs::write(
            &judge,
            format!("{WORLD}\n[teacher.oracle]\nnoise = {noise}\n"),
        )
        .unwrap();
        let o = medzero(&[
            "eval",
            &run.display().to_string(),
            "--data",
            &data.display().to_string(),
            "--max-new-tokens",
            "160",
            "--judge",
            &judge.display().to_string(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        let j = &v["report"]["judge"];
        assert_eq!(j["judge"], "oracle");
        assert_eq!(j["failures"], 0);
        let agreement = j["agreement"].as_f64().unwrap();
        assert_eq!(agreement == 1.0, agrees, "{v}");
        if agrees {
            assert_eq!(j["accuracy"], v["report"]["greedy_accuracy"]);
        }
    }
}
