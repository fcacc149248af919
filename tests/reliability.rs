//! Nothing silent, nothing poisoned: through the CLI, on a tiny world.
//!
//! - a training run that diverges stops at the step it diverged, and saves
//!   nothing past its last good checkpoint;
//! - a checkpoint whose bytes were corrupted, or whose optimizer moments are
//!   not finite, is skipped for the one before it, and the stage still ends
//!   with the weights of an uninterrupted run;
//! - a model folder holding NaN weights is refused when loaded;
//! - every setting of every stage is checked before the first stage runs,
//!   with the stage named, before any run folder is made;
//! - a stage that failed may be fixed and the run resumed without `--fresh`;
//! - a run made by an older build, whose stored config lacks a setting
//!   added since, resumes as long as the setting is at its default;
//! - the CLI turns bad input into a clear error and exit code 1, never a panic.

mod support;

use std::path::{Path, PathBuf};
use support::{medzero, stderr, write_config};

/// A textbook pretraining stage on [`support::TINY_WORLD`], checkpointing
/// every step; `lr` and `extra` (more `[[stages]]`) vary per test.
fn pretrain_config(dir: &Path, lr: &str, extra: &str) -> String {
    let text = format!(
        r#"[run]
name = "r"
threads = 1
{}
[[stages]]
kind = "pretrain"
name = "base"
[stages.sft]
epochs = 0.5
batch_size = 8
lr = {lr}
warmup_ratio = 0.0
checkpoint_every = 1
keep_checkpoints = 3
{extra}"#,
        support::TINY_WORLD
    );
    write_config(dir, &text)
}

fn stage(dir: &Path, folder: &str) -> PathBuf {
    dir.join("runs/r/stages").join(folder)
}

fn assert_clear_failure(o: &std::process::Output, wants: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for w in wants {
        assert!(err.contains(w), "wanted {w:?} in: {err}");
    }
    err
}

#[test]
fn training_that_diverges_stops_at_its_step_and_saves_no_model() {
    let tmp = tempfile::tempdir().unwrap();
    let config = pretrain_config(tmp.path(), "1e30", "");
    let o = medzero(&["run", &config]);
    assert_clear_failure(
        &o,
        &["training diverged at step", "Lower the learning rate"],
    );
    let base = stage(tmp.path(), "0-base");
    assert!(!base.join("model").exists());
    assert!(!base.join("result.json").exists());
    // Every checkpoint it left is of a finite model.
    for e in std::fs::read_dir(base.join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        if p.join("model.safetensors").exists() {
            let policy = medzero_policies::Policy::load(&p, tch::Device::Cpu, None);
            assert!(policy.is_ok(), "{}: {:?}", p.display(), policy.err());
        }
    }
}

/// The newest `step-*` checkpoint folder of `stage`.
fn newest_checkpoint(stage: &Path) -> PathBuf {
    let dir = stage.join("checkpoints");
    let name = std::fs::read_to_string(dir.join("latest")).unwrap();
    dir.join(name.trim())
}

#[test]
fn a_corrupted_or_non_finite_checkpoint_is_skipped_for_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let config = pretrain_config(tmp.path(), "3e-3", "");
    let o = medzero(&["run", &config]);
    assert!(o.status.success(), "{}", stderr(&o));
    let base = stage(tmp.path(), "0-base");
    let finished = std::fs::read(base.join("model/model.safetensors")).unwrap();
    let redo = || {
        std::fs::remove_file(base.join("result.json")).unwrap();
        std::fs::remove_dir_all(base.join("model")).unwrap();
        medzero(&["run", &config])
    };

    // Bytes flipped in the middle of the newest checkpoint's weights (its
    // header intact): the checksum catches it, the one before is used.
    let newest = newest_checkpoint(&base);
    let weights = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&weights, &bytes).unwrap();
    let o = redo();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming from"), "{err}");
    assert!(err.contains("checksum does not match"), "{err}");
    assert_eq!(
        std::fs::read(base.join("model/model.safetensors")).unwrap(),
        finished,
        "resuming from the previous checkpoint must end with the same weights"
    );

    // NaN optimizer moments in a checkpoint written without a manifest (by
    // another tool, or an older medzero): the finiteness check catches them.
    let newest = newest_checkpoint(&base);
    std::fs::remove_file(newest.join("manifest.json")).unwrap();
    nan_into_first_tensor(&newest.join("optimizer.safetensors"));
    let o = redo();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("is not finite"), "{err}");
    assert_eq!(
        std::fs::read(base.join("model/model.safetensors")).unwrap(),
        finished
    );
}

/// Writes NaN over the first value of the first tensor of a safetensors
/// file (f32), leaving its header and metadata as they are.
fn nan_into_first_tensor(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["data_offsets"][0].as_u64().unwrap() as usize)
        .min()
        .unwrap();
    bytes[8 + n + start..8 + n + start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_model_with_nan_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = support::tiny_policy("a b c d", 1);
    tch::no_grad(|| {
        let (_, t) = &policy.named_parameters()[0];
        let _ = t.view(-1).get(0).fill_(f64::NAN);
    });
    let dir = tmp.path().join("nan");
    policy.save(&dir).unwrap();
    let o = medzero(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "a b",
    ]);
    assert_clear_failure(&o, &["holds NaN or infinite values"]);
}

#[test]
fn every_setting_is_checked_before_the_first_stage_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = format!("run.out_dir={}", tmp.path().display());
    let cases: &[(&str, &[&str])] = &[
        (
            "stages.12.eval.temperature=-1",
            &["stage 12", "temperature"],
        ),
        ("stages.12.eval.top_p=5", &["stage 12", "top_p"]),
        (
            "stages.12.eval.max_new_tokens=0",
            &["stage 12", "max_new_tokens"],
        ),
        ("stages.7.sft.lr=0", &["stage 7 (\"meds3\"", "lr"]),
        (
            "stages.11.sampling.temperature=nan",
            &["stage 11", "temperature"],
        ),
        ("stages.6.mcts.max_nodes=0", &["stage 6", "max_nodes"]),
        ("stages.10.learner.lr=-1", &["stage 10", "lr"]),
        ("run.threads=100000", &["run.threads"]),
        // MedCritical's self-corrections need a model per actor.
        (
            "stages.9.runtime.placement=shared",
            &["stage 9", "placement", "per_actor"],
        ),
        (
            "stages.10.runtime.placement=everywhere",
            &["stages[10]", "everywhere", "per_actor"],
        ),
    ];
    for (set, wants) in cases {
        // Failing before the first stage is what makes it fast (a timed
        // assertion would be flaky on a shared machine): nothing is made.
        let o = medzero(&["run", "--set", &out, "--set", set]);
        assert_clear_failure(&o, wants);
        assert!(
            !tmp.path().join("quickstart").exists(),
            "{set}: a run folder was made"
        );
    }
    // A kto stage with a dpo table, and an experiment without stages.
    let text = "[[stages]]\nkind = \"pretrain\"\nname = \"b\"\n[[stages]]\nkind = \"kto\"\ninit = \"b\"\n[stages.dpo]\nbeta = 0.2\n";
    let o = medzero(&["run", &write_config(tmp.path(), text)]);
    assert_clear_failure(&o, &["stage 1", "[stages.kto]"]);
    let o = medzero(&["run", &write_config(tmp.path(), "[run]\nname = \"e\"\n")]);
    assert_clear_failure(&o, &["no stages"]);
}

#[test]
fn a_stage_that_failed_may_be_fixed_and_the_run_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let second = |lr: &str| {
        format!(
            "[[stages]]\nkind = \"pretrain\"\nname = \"more\"\ninit = \"base\"\n[stages.sft]\nepochs = 0.5\nbatch_size = 8\nlr = {lr}\nwarmup_ratio = 0.0\n"
        )
    };
    let config = pretrain_config(tmp.path(), "3e-3", &second("1e30"));
    let o = medzero(&["run", &config]);
    assert_clear_failure(&o, &["training diverged"]);
    let config = pretrain_config(tmp.path(), "3e-3", &second("3e-3"));
    let o = medzero(&["run", &config]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stage(tmp.path(), "1-more").join("model").exists());
    // A finished stage still may not change.
    let config = pretrain_config(tmp.path(), "1e-3", &second("3e-3"));
    let o = medzero(&["run", &config]);
    assert_clear_failure(&o, &["differs at: stages.0.sft.lr"]);
}

#[test]
fn a_setting_added_since_a_run_was_made_does_not_block_its_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let config = pretrain_config(tmp.path(), "3e-3", "");
    let o = medzero(&["run", &config]);
    assert!(o.status.success(), "{}", stderr(&o));
    // What an older build wrote: the resolved config without a setting
    // this build has (at its default).
    let stored = tmp.path().join("runs/r/config.toml");
    let text = std::fs::read_to_string(&stored).unwrap();
    let older: String = text
        .lines()
        .filter(|l| !l.starts_with("keep_checkpoints"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(
        older, text,
        "the stored config has no keep_checkpoints line"
    );
    std::fs::write(&stored, older).unwrap();
    let more = "[[stages]]\nkind = \"pretrain\"\nname = \"more\"\ninit = \"base\"\n[stages.sft]\nepochs = 0.5\nbatch_size = 8\n";
    // keep_checkpoints is 3 here, not its default: that is a change.
    let o = medzero(&["run", &config]);
    assert_clear_failure(&o, &["differs at: stages.0.sft.keep_checkpoints"]);
    // At its default it is none, and the run resumes with a new stage.
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("keep_checkpoints = 3\n", "") + more;
    std::fs::write(&config, text).unwrap();
    let o = medzero(&["run", &config]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stage(tmp.path(), "1-more").join("model").exists());
}

#[test]
fn bad_cli_input_is_a_clear_error_never_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    support::tiny_policy("a b c d", 1).save(&model).unwrap();
    let m = model.to_str().unwrap();
    let data = support::meds3_eval("MedQA.json");
    let data = data.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["generate", "--model", m, "--prompt", ""],
            "--prompt is empty",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--temperature=-1",
            ],
            "temperature",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--temperature",
                "NaN",
            ],
            "temperature",
        ),
        (
            &["generate", "--model", m, "--prompt", "a", "--top-p", "5"],
            "top_p",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--max-new-tokens",
                "0",
            ],
            "max_new_tokens",
        ),
        (
            &["generate", "--model", m, "--prompt", "a", "--device", "gpu"],
            "cpu, cuda, cuda:N or auto",
        ),
        (
            &["generate", "--model", "/nonexistent/model", "--prompt", "a"],
            "/nonexistent/model",
        ),
        (
            &["eval", m, "--data", data, "--select", "p-vs", "--n", "0"],
            "need samples",
        ),
        (
            &["eval", m, "--data", data, "--max-new-tokens", "0"],
            "max_new_tokens",
        ),
        (
            &["eval", m, "--data", "/nonexistent.json"],
            "/nonexistent.json",
        ),
        (&["bench", "--threads", "0"], "--threads"),
        (&["bench", "--threads", "100000"], "--threads"),
        (&["run", "/nonexistent.toml"], "/nonexistent.toml"),
    ];
    for (args, want) in cases {
        let o = medzero(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: wanted {want:?} in {err}");
    }
}

#[test]
fn results_floats_read_back_exactly() {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for _ in 0..10_000 {
        let x: f64 = rng.random::<f64>() * 10f64.powi(rng.random_range(-8..8));
        let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
        assert_eq!(back.to_bits(), x.to_bits(), "{x:e}");
    }
}
