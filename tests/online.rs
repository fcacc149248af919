//! The actor/learner runtime end to end, through the CLI: an online stage
//! (rejection sampling on a tiny student) killed with SIGKILL or stopped
//! with SIGTERM resumes with no trajectory lost or duplicated and ends where
//! an uninterrupted run ends; deterministic mode reproduces bit for bit;
//! injected actor panics are counted and the run goes on.

mod support;
use serde_json::Value as Json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::stderr;

const PROBLEMS: usize = 120;
const SAMPLES: usize = 2;

/// A textbook-pretrained tiny student, then rejection sampling on every
/// training problem; `min_reward = 0` trains on every attempt, so the tiny
/// model (which cannot answer yet) still drives the learner.
const CONFIG: &str = r#"
[run]
name = "o"
threads = 1
[data.synthclinic]
train = 120
test = 20
[student]
hidden_size = 32
layers = 2
heads = 2
kv_heads = 1
intermediate_size = 64
[[stages]]
kind = "pretrain"
name = "base"
[stages.sft]
epochs = 1
batch_size = 8
lr = 3e-3
[[stages]]
kind = "rejection_sampling"
name = "rs"
init = "base"
min_reward = 0.0
[stages.sampling]
samples = 2
max_new_tokens = 12
[stages.runtime]
round_size = 10
[stages.learner]
batch_size = 8
lr = 1e-3
"#;

struct Run {
    _dir: tempfile::TempDir,
    cfg: String,
    stage: PathBuf,
}

/// A run folder in a fresh temporary folder, with `edit` applied to [`CONFIG`].
fn setup(edit: impl Fn(&str) -> String) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("exp.toml");
    let text = edit(CONFIG).replace(
        "[run]",
        &format!("[run]\nout_dir = \"{}\"", dir.path().join("runs").display()),
    );
    std::fs::write(&cfg, text).unwrap();
    Run {
        stage: dir.path().join("runs/o/stages/1-rs"),
        cfg: cfg.display().to_string(),
        _dir: dir,
    }
}

fn medzero_run(cfg: &str, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_medzero"))
        .args(["run", cfg])
        .args(extra)
        .output()
        .unwrap()
}

fn run_to_end(r: &Run, extra: &[&str]) -> String {
    let o = medzero_run(&r.cfg, extra);
    assert!(o.status.success(), "{}", stderr(&o));
    stderr(&o)
}

fn store_ids(stage: &Path) -> Vec<String> {
    std::fs::read_to_string(stage.join("trajectories.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let t: Json = serde_json::from_str(l).unwrap();
            t["id"].as_str().unwrap().to_string()
        })
        .collect()
}

fn report(stage: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(stage.join("report.json")).unwrap()).unwrap()
}

fn latest_state(stage: &Path) -> Json {
    let ckpts = stage.join("checkpoints");
    let name = std::fs::read_to_string(ckpts.join("latest")).unwrap();
    serde_json::from_str(
        &std::fs::read_to_string(ckpts.join(name.trim()).join("trainer_state.json")).unwrap(),
    )
    .unwrap()
}

/// Every problem's every sample stored exactly once.
fn assert_complete_and_unique(stage: &Path) {
    let ids = store_ids(stage);
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a trajectory id is stored twice");
    assert_eq!(ids.len(), PROBLEMS * SAMPLES, "trajectories lost");
}

/// Starts the run and waits until its online stage has stored `lines`
/// trajectories and checkpointed past step 0, without having finished.
fn start_and_wait(r: &Run, lines: usize) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_medzero"))
        .args(["run", &r.cfg])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = r.stage.join("trajectories.jsonl");
    let start = Instant::now();
    loop {
        let stored = std::fs::read_to_string(&store)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if stored >= lines && r.stage.join("checkpoints/latest").exists() {
            return child;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the stage never got going"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn deterministic_mode_reproduces_bit_for_bit_and_survives_sigkill_and_sigterm() {
    let model = |r: &Run| std::fs::read(r.stage.join("model/model.safetensors")).unwrap();
    let store = |r: &Run| std::fs::read(r.stage.join("trajectories.jsonl")).unwrap();

    let first = setup(str::to_string);
    run_to_end(&first, &[]);
    assert_complete_and_unique(&first.stage);
    let rep = report(&first.stage);
    // 12 rounds of 10 problems, each trained in batches of 8 of its 20 trajectories.
    assert_eq!(rep["steps"], 36, "{rep}");
    assert_eq!(rep["policy_version"], 12, "{rep}");
    assert_eq!(rep["counters"]["trained"], 240, "{rep}");

    let second = setup(str::to_string);
    run_to_end(&second, &[]);
    assert_eq!(
        model(&second),
        model(&first),
        "same seed, different weights"
    );
    assert_eq!(
        store(&second),
        store(&first),
        "same seed, different trajectories"
    );

    // SIGKILL mid-stage; meanwhile a second process on the same run is refused.
    let killed = setup(str::to_string);
    let mut child = start_and_wait(&killed, 100);
    let o = medzero_run(&killed.cfg, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("in use by another medzero process"),
        "{}",
        stderr(&o)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.stage.join("result.json").exists());
    let before = latest_state(&killed.stage);
    let err = run_to_end(&killed, &[]);
    assert!(err.contains("rs: resuming from"), "{err}");
    let after = latest_state(&killed.stage);
    assert!(
        after["step"].as_u64() > before["step"].as_u64()
            && after["policy_version"].as_u64() > before["policy_version"].as_u64(),
        "learner step / policy version did not continue: {before} -> {after}"
    );
    assert_complete_and_unique(&killed.stage);
    assert_eq!(model(&killed), model(&first), "resumed weights differ");
    assert_eq!(store(&killed), store(&first), "resumed trajectories differ");
    // The counts cover both processes, as one uninterrupted run counts.
    let (resumed, whole) = (report(&killed.stage), report(&first.stage));
    for c in ["rollouts", "generated_tokens", "trained", "rejected"] {
        assert_eq!(
            resumed["counters"][c], whole["counters"][c],
            "{c}: {resumed} vs {whole}"
        );
    }

    // SIGTERM: a graceful stop with a checkpoint, then resume.
    let stopped = setup(str::to_string);
    let child = start_and_wait(&stopped, 100);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "a stopped run must not report success");
    assert!(!stopped.stage.join("result.json").exists());
    let err = run_to_end(&stopped, &[]);
    assert!(err.contains("rs: resuming from"), "{err}");
    assert_complete_and_unique(&stopped.stage);
    assert_eq!(model(&stopped), model(&first), "resumed weights differ");
    assert_eq!(
        store(&stopped),
        store(&first),
        "resumed trajectories differ"
    );
}

#[test]
fn async_actors_survive_injected_panics_and_lag_is_bounded() {
    let r = setup(|c| {
        c.replace(
            "[stages.runtime]\n",
            "[stages.runtime]\nmode = \"async\"\nactors = 2\nmax_policy_lag = 1\ninject_panic_every = 7\n",
        )
        .replace("[run]\n", "[run]\ndeterministic = false\n")
    });
    let err = run_to_end(&r, &[]);
    assert!(err.contains("panicked (attempt 1/3)"), "{err}");
    assert!(err.contains("re-queueing the problem"), "{err}");
    assert_complete_and_unique(&r.stage);
    let rep = report(&r.stage);
    let c = &rep["counters"];
    // Problems 0, 7, ..., 119 panic on their first attempt only.
    assert_eq!(c["panics"], PROBLEMS.div_ceil(7) as u64, "{rep}");
    assert_eq!(c["failed"], 0, "{rep}");
    assert_eq!(c["rollouts"], PROBLEMS as u64, "{rep}");
    assert_eq!(
        c["trained"].as_u64().unwrap() + c["dropped_stale"].as_u64().unwrap(),
        (PROBLEMS * SAMPLES) as u64,
        "{rep}"
    );
    assert!(rep["steps"].as_u64().unwrap() > 0, "{rep}");

    // Each stage writes its own TensorBoard run (its folder), under the same
    // tag names, and no run holds another stage's points.
    let tb = support::tb_read(&r.stage);
    let base = support::tb_read(&r._dir.path().join("runs/o/stages/0-base"));
    for tag in [
        "train/version_diff_avg",
        "train/version_diff_max",
        "perf/rollouts_per_s",
        "perf/tokens_per_s",
        "perf/learner_tokens_per_s",
        "queue/depth",
        "queue/dropped_stale",
        "actor/idle_frac",
        "learner/wait_frac",
    ] {
        assert!(
            tb["scalars"].get(tag).is_some(),
            "{tag} missing from the online stage's TensorBoard run"
        );
        if tag != "perf/learner_tokens_per_s" {
            assert!(
                base["scalars"].get(tag).is_none(),
                "{tag} in the SFT stage's run"
            );
        }
    }
    // The stage's settings are in its HParams tab.
    assert_eq!(base["hparams"]["kind"], "pretrain", "{}", base["hparams"]);
    assert!(
        base["hparams"]["sft.lr"].as_f64().is_some(),
        "{}",
        base["hparams"]
    );
    assert_eq!(tb["hparams"]["name"], "rs", "{}", tb["hparams"]);
    for tag in ["train/loss", "perf/learner_tokens_per_s"] {
        assert!(
            base["scalars"].get(tag).is_some(),
            "{tag} missing from the SFT stage's run"
        );
    }
    let run = support::tb_read(&r._dir.path().join("runs/o"));
    assert!(
        run["scalars"].as_object().is_none_or(|m| m.is_empty()),
        "the run folder holds no stage's points: {run}"
    );
    let max_lag = tb["scalars"]["train/version_diff_max"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        max_lag <= 1.0,
        "trained on data past max_policy_lag: {max_lag}"
    );
}

#[test]
fn a_stage_takes_trajectories_fed_from_outside() {
    let r = setup(str::to_string);
    std::fs::create_dir_all(&r.stage).unwrap();
    let outside: String = (0..SAMPLES)
        .map(|k| {
            serde_json::json!({
                "id": format!("synthclinic-train-00000/s{k:03}"),
                "problem_id": "synthclinic-train-00000",
                "steps": [{"text": "The answer is A.", "kind": "finish"}],
                "answer": "A",
                "reward": 1.0,
                "policy_version": 0,
                "provenance": {"producer": "hand"}
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(r.stage.join("trajectories.jsonl"), &outside).unwrap();
    run_to_end(&r, &[]);
    let rep = report(&r.stage);
    // Problem 0 was already answered: the actors did the others only, and the
    // learner trained on all of them.
    assert_eq!(rep["counters"]["rollouts"], (PROBLEMS - 1) as u64, "{rep}");
    assert_eq!(
        rep["counters"]["trained"],
        (PROBLEMS * SAMPLES) as u64,
        "{rep}"
    );
    assert_complete_and_unique(&r.stage);
    let stored = std::fs::read_to_string(r.stage.join("trajectories.jsonl")).unwrap();
    assert!(
        stored.starts_with(&outside),
        "outside records were rewritten"
    );
}

/// `runtime.placement = "shared"` is a speed switch: in sync mode two actors
/// generating through one inference service (which takes each round's
/// weights between decode steps) store the trajectories two actors with
/// their own copies store, stamped with the same versions, and the learner
/// ends with the same weights.
#[test]
fn shared_placement_stores_and_trains_what_per_actor_copies_do() {
    let run = |placement: &str| {
        let r = setup(|c| {
            c.replace(
                "[stages.runtime]\n",
                &format!(
                    "[stages.runtime]\nmode = \"sync\"\nactors = 2\nplacement = \"{placement}\"\n"
                ),
            )
            .replace("[run]\n", "[run]\ndeterministic = false\n")
        });
        run_to_end(&r, &[]);
        assert_complete_and_unique(&r.stage);
        let mut stored: Vec<Json> = std::fs::read_to_string(r.stage.join("trajectories.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let t: Json = serde_json::from_str(l).unwrap();
                serde_json::json!([t["id"], t["tokens"], t["reward"], t["policy_version"]])
            })
            .collect();
        stored.sort_by_key(|t| t[0].as_str().unwrap().to_string());
        let model = std::fs::read(r.stage.join("model/model.safetensors")).unwrap();
        (stored, model, report(&r.stage), r)
    };
    let (own, own_model, _, _r1) = run("per_actor");
    let (served, served_model, rep, _r2) = run("shared");
    assert_eq!(served, own, "the service generated other trajectories");
    assert!(
        served_model == own_model,
        "the service's run trained other weights"
    );
    let service = &rep["service"];
    assert!(service["decode_requests"].as_u64() > Some(0), "{rep}");
    // Rounds 2 to 12 each start with a swap; round 1 runs on the loaded
    // weights, and the last publication serves no request.
    assert_eq!(service["weight_swaps"], 11, "{rep}");
}
