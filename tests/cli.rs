//! The `medzero` binary as a person uses it: data generation, inspection of
//! the real benchmark files, the default experiment and its resume, and the
//! errors bad input gets.

mod support;
use support::{meds3_eval, medzero, stderr, stdout, tb_read};

/// The quickstart shrunk to seconds: a tiny student, one epoch per stage.
/// The quickstart shrunk to seconds: a small world and student, one epoch
/// per SFT stage except the chains (which the searched and sampled methods
/// need to find some correct answers), a few questions searched and
/// sampled, short generations. Stage indices follow experiments/quickstart.toml.
const TINY: &[&str] = &[
    // Tests run side by side on two cores: one libtorch thread per run.
    "run.threads=1",
    "data.synthclinic.train=200",
    "data.synthclinic.diseases=8",
    "student.hidden_size=64",
    "student.layers=2",
    "student.heads=2",
    "student.kv_heads=1",
    "student.intermediate_size=128",
    "stages.1.sft.epochs=1",
    "stages.2.sft.epochs=1",
    "stages.3.sft.epochs=20",
    "stages.3.sft.batch_size=8",
    "stages.3.sft.lr=3e-3",
    "stages.4.sft.epochs=1",
    "stages.5.sft.epochs=1",
    "stages.5.sampling.max_new_tokens=32",
    "stages.6.problems=8",
    "stages.6.mcts.max_nodes=6",
    "stages.6.generation.rollout_max_tokens=64",
    // Sampled steps of so small a model go astray at the paper's temperatures.
    "stages.6.generation.temperature=0.3",
    "stages.6.generation.first_round_temperature=0.3",
    "stages.7.sft.epochs=1",
    "stages.8.sft.epochs=1",
    "stages.9.problems=12",
    "stages.9.corrector=teacher",
    "stages.9.sampling.max_new_tokens=64",
    "stages.9.eval.max_new_tokens=64",
    "stages.10.problems=12",
    "stages.10.sampling.max_new_tokens=64",
    "stages.11.problems=24",
    "stages.11.sampling.samples=8",
    // Long enough for a whole chain (about 175 tokens with its lab
    // readings), so the curriculum's samples include right and wrong ones.
    "stages.11.sampling.max_new_tokens=256",
    "stages.11.eval.max_new_tokens=64",
    "stages.12.eval.samples=2",
    "stages.12.eval.limit=20",
    "stages.12.eval.max_new_tokens=64",
];

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn synthclinic_cli_is_byte_identical_per_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = |name: &str, seed: &str| {
        let dir = tmp.path().join(name);
        let o = medzero(&[
            "data",
            "synthclinic",
            "--out",
            dir.to_str().unwrap(),
            "--seed",
            seed,
            "--train",
            "120",
            "--test",
            "40",
            "--hops",
            "2",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("wrote 120 train and 40 test questions"),
            "{}",
            stdout(&o)
        );
        files(&dir)
    };
    let (a, b, c) = (out("a", "11"), out("b", "11"), out("c", "12"));
    assert_eq!(a, b);
    assert_eq!(a.len(), 6);
    assert!(a.iter().zip(&c).all(|(x, y)| x.1 != y.1));

    let o = medzero(&[
        "data",
        "synthclinic",
        "--out",
        tmp.path().join("d").to_str().unwrap(),
        "--set",
        "diseasez=30",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("did you mean `diseases`?"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn inspect_reads_every_real_file_with_exact_counts() {
    for (file, records, options) in [
        ("MedQA.json", 1273, "5"),
        ("MedMCQA.json", 4183, "4"),
        ("pubmedqa.json", 500, "3"),
        ("bioasq.json", 618, "2"),
    ] {
        let o = medzero(&[
            "data",
            "inspect",
            meds3_eval(file).to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["format"], "meds3", "{file}");
        assert_eq!(v["records"], records, "{file}");
        assert!(
            v["stats"]["option_counts"][options].as_u64().unwrap() > 0,
            "{file}: {}",
            v["stats"]
        );
        let o = medzero(&["data", "inspect", meds3_eval(file).to_str().unwrap()]);
        assert!(
            stdout(&o).contains(&format!("records:  {records}")),
            "{}",
            stdout(&o)
        );
    }
}

#[test]
fn inspect_names_file_and_record_of_bad_data() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(meds3_eval("bioasq.json")).unwrap();
    let cut = tmp.path().join("bioasq-cut.json");
    std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
    let o = medzero(&["data", "inspect", cut.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("bioasq-cut.json:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let missing = medzero(&[
        "data",
        "inspect",
        tmp.path().join("nope.json").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("nope.json"),
        "{}",
        stderr(&missing)
    );
    let bad_fmt = medzero(&["data", "inspect", cut.to_str().unwrap(), "--format", "csv"]);
    assert!(
        stderr(&bad_fmt).contains("known formats"),
        "{}",
        stderr(&bad_fmt)
    );
}

#[test]
fn quickstart_runs_writes_results_and_events_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = format!("run.out_dir={}", tmp.path().display());
    let mut args = vec![
        "run",
        "--set",
        &out_dir,
        "--set",
        "data.synthclinic.test=100",
    ];
    args.extend(TINY.iter().flat_map(|s| ["--set", s]));
    let o = medzero(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = tmp.path().join("quickstart");
    for f in [
        "config.toml",
        "results.json",
        "results.md",
        "data/train.jsonl",
        "stages/0-baselines/result.json",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["seed"], 0);
    let rows = results["rows"].as_array().unwrap();
    let acc = |m: &str| {
        rows.iter().find(|r| r["method"] == m).unwrap()["greedy_accuracy"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(acc("gold-chain"), 1.0);
    assert!(
        acc("teacher") > 0.8 && acc("teacher") < 1.0,
        "teacher with noise 0.1: {}",
        acc("teacher")
    );
    assert!(acc("random-option") < 0.4);
    assert!(rows.iter().all(|r| r["selection_accuracy"].is_object()));

    // The stage's own TensorBoard run (its folder).
    let tb = tb_read(&run.join("stages/0-baselines"));
    let teacher = &tb["scalars"]["baselines/synthclinic-test/teacher"];
    assert_eq!(teacher[0][0], 0);
    assert!((teacher[0][1].as_f64().unwrap() - acc("teacher")).abs() < 1e-6);
    assert!(tb["histograms"]["data/gold_chain_steps"].is_array(), "{tb}");

    // Same command again: resumes, skips the finished stage, same table.
    let again = medzero(&args);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("resuming run"),
        "{}",
        stderr(&again)
    );
    let results2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["rows"], results2["rows"]);

    // A changed config does not silently mix into the old run.
    let mut changed = args.clone();
    // (A knob that leaves training alone, so the fresh run below cannot
    // fail for want of correct answers under another seed.)
    changed.extend(["--set", "stages.12.eval.limit=10"]);
    let o = medzero(&changed);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("differs at: stages"), "{}", stderr(&o));
    changed.push("--fresh");
    assert!(medzero(&changed).status.success());
}

#[test]
fn same_seed_same_table() {
    let tmp = tempfile::tempdir().unwrap();
    let table = |name: &str| {
        let out_dir = format!("run.out_dir={}", tmp.path().display());
        let run_name = format!("run.name={name}");
        let mut args = vec![
            "run",
            "--set",
            &out_dir,
            "--set",
            &run_name,
            "--set",
            "data.synthclinic.test=100",
        ];
        args.extend(TINY.iter().flat_map(|s| ["--set", s]));
        let o = medzero(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(name).join("results.json")).unwrap(),
        )
        .unwrap();
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["method"].clone(),
                    r["greedy_accuracy"].clone(),
                    r["per_task"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(table("a"), table("b"));

    // Resume at every stage boundary: a stage run alone in a fresh process
    // (all stages before it finished by an earlier one) ends with the very
    // weights it had when it ran after them in one process.
    let (a, b) = (tmp.path().join("a/stages"), tmp.path().join("b/stages"));
    let mut folders: Vec<(usize, String)> = std::fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| Some((n.split('-').next()?.parse().ok()?, n)))
        .collect();
    folders.sort();
    let mut checked = 0;
    for (_, folder) in &folders {
        let result: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(b.join(folder).join("result.json")).unwrap(),
        )
        .unwrap();
        let Some(dir) = result["model"]["dir"].as_str() else {
            continue;
        };
        let below = dir
            .split(&format!("/{folder}/"))
            .nth(1)
            .unwrap()
            .to_string();
        std::fs::remove_dir_all(b.join(folder)).unwrap();
        table("b");
        let weights = |root: &std::path::Path| {
            std::fs::read(root.join(folder).join(&below).join("model.safetensors")).unwrap()
        };
        assert!(
            weights(&a) == weights(&b),
            "stage {folder}: resumed alone, other weights"
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} stages checked");
}

#[test]
fn config_errors_are_clear_and_exit_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("exp.toml");
    std::fs::write(
        &cfg,
        "[run]\nname = \"x\"\n\n[data.synthclinic]\nhopz = 2\n",
    )
    .unwrap();
    let o = medzero(&["run", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("exp.toml") && err.contains("did you mean `hops`?"),
        "{err}"
    );
    let o = medzero(&["run", tmp.path().join("missing.toml").to_str().unwrap()]);
    assert!(
        stderr(&o).contains("reading config") && stderr(&o).contains("missing.toml"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&cfg, "[run\n").unwrap();
    let o = medzero(&["run", cfg.to_str().unwrap()]);
    assert!(stderr(&o).contains("not valid TOML"), "{}", stderr(&o));
    let o = medzero(&["generate", "--model", "no-such-model", "--prompt", "hi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no-such-model/config.json") && !stderr(&o).contains("panicked"),
        "{}",
        stderr(&o)
    );
    let o = medzero(&["eval", "no-such-run", "--data", "x.json"]);
    assert!(
        stderr(&o).contains("neither a model folder"),
        "{}",
        stderr(&o)
    );
    let o = medzero(&["run", "--set", "data.eval_files=[\"nope.json\"]"]);
    assert!(
        stderr(&o).contains("nope.json does not exist"),
        "{}",
        stderr(&o)
    );
}
