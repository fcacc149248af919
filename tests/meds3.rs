//! MedS3 on a real policy: the tree search driven by a tch policy (with and
//! without KV-cache reuse down the tree) is reproducible and well-formed, and
//! the whole pipeline (search, policy SFT, PRM, P-VS evaluation) runs through
//! the CLI on a tiny student.

mod support;
use medzero::rollout::mcts::{self, MctsConfig, Meds3Record};
use medzero::rollout::meds3::{PolicySteps, StepGeneration};
use medzero_envs::synthclinic::{SynthClinic, SynthConfig};
use medzero_policies::tokenizer::PromptTemplate;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use support::stderr;

fn world() -> SynthClinic {
    SynthClinic::generate(&SynthConfig {
        train: 4,
        test: 2,
        ..SynthConfig::default()
    })
    .unwrap()
}

fn search(world: &SynthClinic, reuse: bool, seed: u64) -> (mcts::Tree, u64) {
    let p = &world.train[0];
    let words = format!(
        "{} {} Step 1 2 3 4 5 6 7 8 9 : The answer is But wait,",
        p.prompt_text(),
        mcts::ROOT_TEXT
    );
    let policy = support::tiny_policy(&words, 7);
    let generation = StepGeneration {
        step_max_tokens: 12,
        rollout_max_tokens: 24,
        prefix_reuse: reuse,
        ..StepGeneration::default()
    };
    let cfg = MctsConfig {
        max_nodes: 12,
        rollout_budget: 6,
        min_rollouts: 2,
        ..MctsConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model = PolicySteps::new(&policy, &generation, PromptTemplate::Plain, p, &mut rng);
    let tree = mcts::search(p, &cfg, &mut model, 0).unwrap();
    (tree, model.generated)
}

#[test]
fn search_with_a_policy_is_reproducible_and_well_formed() {
    let w = world();
    for reuse in [true, false] {
        let (a, tokens) = search(&w, reuse, 1);
        let (b, _) = search(&w, reuse, 1);
        assert_eq!(
            a.nodes, b.nodes,
            "same seed, different tree (reuse {reuse})"
        );
        assert!(tokens > 0);
        // max_nodes, plus at most one expansion's overshoot and the forced
        // finishes of the open leaves.
        assert!(a.nodes.len() >= 12, "{} nodes", a.nodes.len());
        for (id, n) in a.nodes.iter().enumerate().skip(1) {
            let parent = n.parent.expect("only the root has no parent");
            assert!(parent < id && a.nodes[parent].children.contains(&id));
            assert_eq!(n.depth, a.nodes[parent].depth + 1);
            assert!(
                !n.text.contains("\n\nStep"),
                "a step holds the next one: {:?}",
                n.text
            );
            assert!((0.0..=1.0).contains(&n.value));
        }
        // Every leaf is finished once the search ends short of 4 correct leaves.
        if a.correct_leaves() < 4 {
            assert!(a.leaves().all(|l| a.nodes[l].finished));
        }
        let record = Meds3Record::from_tree(&w.train[0], &a);
        assert_eq!(
            record.pos.len() + record.neg.len(),
            a.leaves().filter(|&l| a.nodes[l].finished).count()
        );
    }
    let (other, _) = search(&w, true, 2);
    assert_ne!(
        search(&w, true, 1).0.nodes,
        other.nodes,
        "the seed is ignored"
    );
}

/// Base, chain distillation, one search round, policy SFT, PRM and an
/// evaluation with every selection rule, on a tiny student in seconds.
const PIPELINE: &str = r#"
[run]
name = "m"
threads = 1
[data.synthclinic]
train = 40
test = 10
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
[[stages]]
kind = "distill_chains"
name = "chains"
init = "base"
[stages.sft]
epochs = 2
batch_size = 8
lr = 3e-3
[[stages]]
kind = "meds3_search"
name = "mcts"
init = "chains"
problems = 6
[stages.mcts]
max_nodes = 8
rollout_budget = 4
min_rollouts = 2
[stages.generation]
step_max_tokens = 24
rollout_max_tokens = 64
[[stages]]
kind = "meds3_prm"
name = "prm"
init = "chains"
data = ["mcts"]
balance = false
[stages.sft]
epochs = 1
batch_size = 8
[[stages]]
kind = "eval"
models = ["chains"]
prm = "prm"
[stages.eval]
samples = 4
max_new_tokens = 64
rules = ["vote-sc", "prm-max", "prm-minmax", "prm-vote-sum", "p-vs", "bon-mean", "bon-prod"]
[[stages]]
kind = "meds3_prm"
name = "prm-oracle"
init = "chains"
data = ["mcts"]
balance = false
labels = "oracle"
heldout = 0.34
[stages.sft]
epochs = 1
batch_size = 8
"#;

#[test]
fn the_meds3_pipeline_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::write_config(dir.path(), PIPELINE);
    let o = support::medzero(&["run", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = dir.path().join("runs/m");
    let records = mcts::read_records(&run.join("stages/2-mcts/meds3.jsonl")).unwrap();
    assert_eq!(records.len(), 6);
    assert!(
        records
            .iter()
            .all(|r| !(r.pos.is_empty() && r.neg.is_empty()))
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    let row = &results["rows"][0];
    assert_eq!(row["method"], "chains");
    for rule in [
        "vote-sc",
        "prm-max",
        "prm-minmax",
        "prm-vote-sum",
        "p-vs",
        "bon-mean",
        "bon-prod",
    ] {
        let acc = row["selection_accuracy"][format!("{rule}@4")].as_f64();
        assert!(
            acc.is_some_and(|a| (0.0..=1.0).contains(&a)),
            "{rule}: {row}"
        );
    }
    let q: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("stages/4-eval/prm_quality-chains.json")).unwrap(),
    )
    .unwrap();
    assert!(q["steps"].as_u64().unwrap() > 0, "{q}");

    // Each PRM states its target. Its training steps are the searched
    // chains' nodes split at their "Step k:" lines, over the questions not
    // held out (the last 1 of 6 for the default 0.1, the last 2 at 0.34).
    let pieces = |questions: usize| -> u64 {
        records[..questions]
            .iter()
            .flat_map(|r| r.pos.iter().chain(&r.neg))
            .flat_map(|leaf| &leaf.chain)
            .map(|node| medzero_envs::parse_chain(&node.text).len() as u64)
            .sum()
    };
    let target = |stage: &str| -> serde_json::Value {
        let path = run.join("stages").join(stage).join("prm_target.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let soft = target("3-prm");
    assert_eq!(soft["labels"], "soft", "{soft}");
    assert_eq!(soft["heldout_questions"], 1, "{soft}");
    assert_eq!(soft["train"]["steps"].as_u64(), Some(pieces(5)), "{soft}");
    assert!(
        soft["heldout_vs_oracle"]["steps"].as_u64() > Some(0),
        "{soft}"
    );
    let oracle = target("5-prm-oracle");
    assert_eq!(oracle["heldout_questions"], 2, "{oracle}");
    assert_eq!(
        oracle["train"]["steps"].as_u64(),
        Some(pieces(4)),
        "{oracle}"
    );
    // Trained on the world's labels, its labels agree with them exactly.
    assert_eq!(oracle["train"]["accuracy"].as_f64(), Some(1.0), "{oracle}");

    // Claims may be added to a finished run: it resumes every stage and
    // checks them against its rows.
    let claims = r#"
[[claims]]
name = "voting beats greedy"
left = "chains:vote-sc@4"
op = ">="
right = "chains:greedy"
[[claims]]
name = "above a number"
left = "chains:greedy"
op = ">"
right = 1.5
[[claims]]
name = "a figure never computed"
left = "chains:vote-sc@16"
op = ">"
right = 0.0
"#;
    let cfg = support::write_config(dir.path(), &format!("{PIPELINE}{claims}"));
    let o = support::medzero(&["run", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    let claims = results["claims"].as_array().unwrap();
    let row = &results["rows"][0];
    let voting = row["selection_accuracy"]["vote-sc@4"].as_f64().unwrap();
    let greedy = row["greedy_accuracy"].as_f64().unwrap();
    assert_eq!(
        claims[0]["holds"].as_bool(),
        Some(voting >= greedy),
        "{claims:?}"
    );
    assert_eq!(claims[0]["left"].as_f64(), Some(voting));
    assert_eq!(claims[1]["holds"].as_bool(), Some(false), "{claims:?}");
    assert!(claims[2]["holds"].is_null(), "{claims:?}");
    assert_eq!(claims[2]["missing"], "chains has no vote-sc@16");
    let table = std::fs::read_to_string(run.join("results.md")).unwrap();
    assert!(table.contains("| voting beats greedy |"), "{table}");

    // The CLI: PRM rules without a PRM are refused with what to do.
    let model = run.join("stages/1-chains/model");
    let data = run.join("data/test.jsonl");
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let o = support::medzero(&[
        "eval", model, "--data", data, "--n", "2", "--select", "p-vs",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("need a PRM"), "{}", stderr(&o));
    let prm = run.join("stages/3-prm/model");
    let o = support::medzero(&[
        "eval",
        model,
        "--data",
        data,
        "--n",
        "2",
        "--select",
        "vote-sc,p-vs",
        "--prm",
        prm.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = support::stdout(&o);
    assert!(out.contains("p-vs@2") && out.contains("vote-sc@2"), "{out}");
    let o = support::medzero(&[
        "eval", model, "--data", data, "--n", "2", "--select", "p-vz",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("p-vz"), "{}", stderr(&o));
}
