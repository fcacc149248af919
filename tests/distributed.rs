//! Data-parallel training over several processes on c10d (Gloo on
//! loopback), launched as users launch it: torchrun, or the ranks' variables
//! set by hand (as srun does). The invariants: N processes train the weights
//! one process trains on the same global batch; a killed rank fails its
//! peers by name within the collective timeout; the rerun resumes, with any
//! world size.

mod support;

use medzero_policies::Policy;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{TINY_WORLD, medzero, stderr, write_config};

/// A run "dp" of the tiny world (8 questions): `run` lines in `[run]`, a
/// chains SFT stage of global batch `batch * accum`, then `more` stages.
fn experiment(dir: &Path, run: &str, sft: (usize, usize, usize), more: &str) -> String {
    let (epochs, batch, accum) = sft;
    let text = format!(
        r#"[run]
name = "dp"
threads = 1
collective_timeout_s = 20
{run}
{TINY_WORLD}
[[stages]]
kind = "distill_chains"
name = "chains"
[stages.sft]
epochs = {epochs}
batch_size = {batch}
grad_accum = {accum}
lr = 3e-3
warmup_ratio = 0.0
checkpoint_every = 10
keep_checkpoints = 100
{more}"#
    );
    write_config(dir, &text)
}

/// The chains stage alone.
fn config(dir: &Path, epochs: usize, batch: usize, accum: usize) -> String {
    experiment(dir, "", (epochs, batch, accum), "")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Rank `rank` of `world` with the variables torchrun would set.
fn rank(config: &str, rank: usize, world: usize, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_medzero"))
        .args(["run", config])
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting medzero")
}

fn model(run: &Path) -> PathBuf {
    run.join("stages/0-chains/model")
}

fn weights(dir: &Path) -> Vec<(String, tch::Tensor)> {
    Policy::load(dir, tch::Device::Cpu, None)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .named_parameters()
}

fn max_abs_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

fn one_process(epochs: usize, batch: usize, accum: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), epochs, batch, accum);
    let o = medzero(&["run", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = dir.path().join("runs/dp");
    (dir, run)
}

/// torchrun with 2 processes: each takes 4 of the step's 8 sequences and the
/// gradients are summed over Gloo. One process with the same micro-batches
/// (4 x 2 accumulated) gives the same weights bit for bit; one process on
/// the whole batch at once (8 x 1) within 1e-6 after 10 steps (the sums
/// inside the forward pass group differently). Both ranks hold the same
/// weights, and only rank 0 writes the run folder's results.
#[test]
fn torchrun_two_processes_train_the_weights_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 10, 8, 1);
    let o = Command::new(support::python())
        .args([
            "-m",
            "torch.distributed.run",
            "--no-python",
            "--nproc-per-node",
            "2",
        ])
        .arg(format!("--master-port={}", free_port()))
        .arg(env!("CARGO_BIN_EXE_medzero"))
        .args(["run", &cfg])
        .env("NO_COLOR", "1")
        .output()
        .expect("running torchrun");
    assert!(o.status.success(), "torchrun: {}", stderr(&o));
    let run = dir.path().join("runs/dp");
    assert!(run.join("results.json").exists());
    let rank1 = run.join("ranks/1");
    assert_eq!(
        max_abs_diff(&model(&run), &model(&rank1)),
        0.0,
        "ranks differ"
    );

    let (_a, accumulated) = one_process(10, 4, 2);
    assert_eq!(
        max_abs_diff(&model(&run), &model(&accumulated)),
        0.0,
        "2 processes differ from 1 process over the same micro-batches"
    );
    let (_b, whole) = one_process(10, 8, 1);
    let diff = max_abs_diff(&model(&run), &model(&whole));
    assert!(
        diff <= 1e-6,
        "2 processes vs 1 on the whole batch: {diff:e}"
    );
}

/// Runs `config` on two ranks and SIGKILLs rank 1 once `ckpts` holds
/// `count` checkpoints: rank 0 must fail within the collective timeout (20
/// s), naming rank 1, without a panic.
fn kill_rank1_after(config: &str, ckpts: &Path, count: usize) {
    let port = free_port();
    let mut r0 = rank(config, 0, 2, port);
    let mut r1 = rank(config, 1, 2, port);
    let started = Instant::now();
    while std::fs::read_dir(ckpts).map_or(0, |d| d.count()) < count {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        assert!(r0.try_wait().unwrap().is_none(), "rank 0 ended early");
        std::thread::sleep(Duration::from_millis(10));
    }
    r1.kill().unwrap();
    let killed = Instant::now();
    r1.wait().unwrap();
    let out = r0.wait_with_output().unwrap();
    let waited = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "rank 0 succeeded without its peer: {err}"
    );
    assert!(waited < Duration::from_secs(30), "rank 0 took {waited:?}");
    assert!(err.contains("rank 1 stopped responding"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// SIGKILL rank 1 after the first checkpoints: rank 0 fails within the
/// collective timeout (20 s) naming rank 1; rerunning the command with one
/// process resumes from rank 0's checkpoint and ends on the weights of an
/// uninterrupted run.
#[test]
fn a_killed_rank_fails_its_peer_by_name_and_the_run_resumes() {
    const EPOCHS: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), EPOCHS, 4, 2);
    let ckpts = dir.path().join("runs/dp/stages/0-chains/checkpoints");
    kill_rank1_after(&cfg, &ckpts, 2);

    let o = medzero(&["run", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
    let (_u, uninterrupted) = one_process(EPOCHS, 4, 2);
    let run = dir.path().join("runs/dp");
    assert_eq!(max_abs_diff(&model(&run), &model(&uninterrupted)), 0.0);
}

/// A rank whose peers never come fails at the rendezvous within the
/// timeout; bad launch variables, asynchronous online learners without
/// actor ranks in a distributed run, and actor ranks in one process are
/// refused at load.
#[test]
fn launch_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, 8, 1);
    let short = format!("{cfg}.short.toml");
    std::fs::write(
        &short,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("collective_timeout_s = 20", "collective_timeout_s = 2"),
    )
    .unwrap();
    let started = Instant::now();
    let alone = rank(&short, 0, 2, free_port()).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&alone.stderr);
    assert!(!alone.status.success());
    assert!(started.elapsed() < Duration::from_secs(15), "{err}");
    assert!(err.contains("rank 0/2: no rendezvous"), "{err}");

    let bad = Command::new(env!("CARGO_BIN_EXE_medzero"))
        .args(["run", &cfg])
        .env("WORLD_SIZE", "2")
        .env("RANK", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "29500")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("RANK = \"2\" is not valid: must be below WORLD_SIZE"));

    let online = online_config(dir.path(), "deterministic = false", "mode = \"async\"");
    let o = rank(&online, 0, 2, free_port()).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("runtime.mode = \"async\" cannot train data parallel over 2 ranks"),
        "{err}"
    );
    let alone = online_config(dir.path(), "", "actor_ranks = true");
    let o = medzero(&["run", &alone]);
    assert!(
        stderr(&o).contains("runtime.actor_ranks needs several processes"),
        "{}",
        stderr(&o)
    );
}

/// The chains (micro-batches of 4, so 2 data-parallel ranks train them
/// bit-identically), then rejection sampling that keeps every sample
/// (min_reward 0), then GRPO (groups of 4), both with `runtime` settings,
/// then `more` stages.
fn online_config_with(dir: &Path, run: &str, runtime: &str, more: &str) -> String {
    let rs = format!(
        r#"
[[stages]]
kind = "rejection_sampling"
name = "rs"
init = "chains"
min_reward = 0.0
[stages.sampling]
samples = 2
max_new_tokens = 16
[stages.learner]
batch_size = 4
[stages.runtime]
round_size = 4
{runtime}

[[stages]]
kind = "grpo"
name = "grpo"
init = "chains"
[stages.sampling]
samples = 4
max_new_tokens = 16
[stages.learner]
batch_size = 8
[stages.runtime]
round_size = 2
{runtime}
{more}"#
    );
    experiment(dir, run, (20, 4, 2), &rs)
}

fn online_config(dir: &Path, run: &str, runtime: &str) -> String {
    online_config_with(dir, run, runtime, "")
}

fn two_ranks(config: &str) {
    let port = free_port();
    let children = [rank(config, 0, 2, port), rank(config, 1, 2, port)];
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rank {r}: {err}");
    }
}

fn report(stage: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(stage.join("report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// One learner rank and one actor rank (deterministic mode), for rejection
/// sampling and for GRPO: the actor rank receives each round's weights,
/// rolls out every problem on its stream and sends the trajectories back;
/// the store holds, byte for byte, what one process with a local actor
/// stores, no trajectory is lost, the learner ends on the same weights, and
/// the actor rank leaves the stage holding them too.
#[test]
fn an_actor_rank_generates_what_a_local_actor_would() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let local = online_config(a.path(), "", "mode = \"deterministic\"");
    let o = medzero(&["run", &local]);
    assert!(o.status.success(), "{}", stderr(&o));
    let remote = online_config(b.path(), "", "mode = \"deterministic\"\nactor_ranks = true");
    two_ranks(&remote);
    let (one, two) = (a.path().join("runs/dp"), b.path().join("runs/dp"));
    for stage in ["stages/1-rs", "stages/2-grpo"] {
        let (s1, s2) = (one.join(stage), two.join(stage));
        let store = |s: &Path| std::fs::read(s.join("trajectories.jsonl")).unwrap();
        assert_eq!(store(&s1), store(&s2), "{stage}: the stores differ");
        let (r1, r2) = (report(&s1), report(&s2));
        assert_eq!(r1["counters"], r2["counters"], "{stage}");
        assert_eq!(r1["steps"], r2["steps"], "{stage}");
        assert!(r2["steps"].as_u64().unwrap() > 0, "{stage}: no step: {r2}");
        assert_eq!(r2["counters"]["rollouts"], 8, "{stage}: {r2}");
        assert_eq!(r2["counters"]["failed"], 0, "{stage}: {r2}");
        let model = |s: &Path| s.join("model");
        assert_eq!(max_abs_diff(&model(&s1), &model(&s2)), 0.0, "{stage}");
        let on_rank1 = two.join("ranks/1").join(stage);
        assert_eq!(max_abs_diff(&model(&s2), &model(&on_rank1)), 0.0, "{stage}");
    }
}

/// Asynchronous with one actor rank and a lag cap of 1: every rollout
/// arrives and is stored (none lost, none failed), and no step trains on
/// data more than one version old.
#[test]
fn an_async_actor_rank_stays_within_the_lag_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = online_config(
        dir.path(),
        "deterministic = false",
        "mode = \"async\"\nactor_ranks = true\nmax_policy_lag = 1",
    );
    two_ranks(&cfg);
    let run = dir.path().join("runs/dp");
    let r = report(&run.join("stages/1-rs"));
    let c = &r["counters"];
    assert_eq!(c["rollouts"], 8, "{r}");
    assert_eq!(c["failed"], 0, "{r}");
    assert_eq!(r["trajectories"], c["stored"], "{r}");
    let tb = support::tb_read(&run.join("stages/1-rs"));
    let lags = tb["scalars"]["train/version_diff_max"]
        .as_array()
        .expect("lags");
    let max = lags
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(max <= 1.0, "trained on data {max} versions old");
}

/// Two data-parallel learners (no actor ranks, deterministic mode): each
/// rank's actor generates every other problem of each round on its own
/// stream, rank 0 stores the round in problem order, and both ranks train
/// their halves of every batch with the gradients summed. Rejection
/// sampling and GRPO store the trajectories one process stores (the same
/// tokens and rewards; log-probs within 1e-5, as the shards' forward passes
/// group sums differently and the weights drift by up to 1e-6), count the
/// same, and end within 1e-6 of its weights, the ranks on identical
/// weights; a MedS3 search split the same way stores the one process's
/// trees, and rank 1 goes on with them too. Only rank 0 keeps a store.
#[test]
fn data_parallel_online_learners_train_what_one_process_trains() {
    let search = r#"
[[stages]]
kind = "meds3_search"
name = "mcts"
init = "chains"
problems = 4
[stages.mcts]
max_nodes = 8
rollout_budget = 4
min_rollouts = 2
[stages.generation]
step_max_tokens = 24
rollout_max_tokens = 64
[stages.runtime]
mode = "deterministic"
"#;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let local = online_config_with(a.path(), "", "mode = \"deterministic\"", search);
    let o = medzero(&["run", &local]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dp = online_config_with(b.path(), "", "mode = \"deterministic\"", search);
    two_ranks(&dp);
    let (one, two) = (a.path().join("runs/dp"), b.path().join("runs/dp"));
    let rank1 = two.join("ranks/1");
    let store = |s: &Path| std::fs::read_to_string(s.join("trajectories.jsonl")).unwrap();
    // Line for line the same records; log-probs within 1e-5, since after
    // the first round they come from weights within 1e-6 of each other.
    let same_lines = |a: &str, b: &str, what: &str| {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
        assert_eq!(a.len(), b.len(), "{what}: line counts");
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            let parse = |l: &str| -> (serde_json::Value, Vec<f64>) {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let lp = v.as_object_mut().and_then(|o| o.remove("logprobs"));
                let lp = lp.map_or(Vec::new(), |l| {
                    l.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect()
                });
                (v, lp)
            };
            let ((vx, lx), (vy, ly)) = (parse(x), parse(y));
            assert_eq!(vx, vy, "{what}: line {} differs", k + 1);
            assert_eq!(lx.len(), ly.len(), "{what}: line {}", k + 1);
            let off = lx
                .iter()
                .zip(&ly)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            assert!(
                off <= 1e-5,
                "{what}: line {}: log-probs differ by {off:e}",
                k + 1
            );
        }
    };
    for stage in ["stages/1-rs", "stages/2-grpo"] {
        let (s1, s2) = (one.join(stage), two.join(stage));
        same_lines(&store(&s1), &store(&s2), stage);
        assert!(
            !rank1.join(stage).join("trajectories.jsonl").exists(),
            "{stage}: rank 1 kept a store"
        );
        let (r1, r2) = (report(&s1), report(&s2));
        assert_eq!(r1["counters"], r2["counters"], "{stage}");
        assert_eq!(r1["steps"], r2["steps"], "{stage}");
        assert!(r2["steps"].as_u64().unwrap() > 0, "{stage}: no step: {r2}");
        assert_eq!(r2["counters"]["rollouts"], 8, "{stage}: {r2}");
        assert_eq!(r2["counters"]["failed"], 0, "{stage}: {r2}");
        assert_eq!(
            report(&rank1.join(stage))["counters"],
            r2["counters"],
            "{stage}"
        );
        let model = |s: &Path| s.join("model");
        let diff = max_abs_diff(&model(&s1), &model(&s2));
        assert!(diff <= 1e-6, "{stage}: 2 learners vs 1: {diff:e}");
        assert_eq!(
            max_abs_diff(&model(&s2), &model(&rank1.join(stage))),
            0.0,
            "{stage}: the ranks' weights differ"
        );
    }
    let search = "stages/3-mcts";
    same_lines(
        &store(&one.join(search)),
        &store(&two.join(search)),
        "the trees",
    );
    let records = |s: &Path| std::fs::read_to_string(s.join(search).join("meds3.jsonl")).unwrap();
    same_lines(&records(&one), &records(&two), "the search records");
    same_lines(&records(&two), &records(&rank1), "rank 1's search records");
}

/// SIGKILL rank 1 of two data-parallel learners in the middle of GRPO
/// (eight one-problem rounds): rank 0 fails within the collective timeout
/// naming rank 1; rerunning with one process resumes from rank 0's last
/// round and ends within 1e-5 of an uninterrupted one-process run.
#[test]
fn a_killed_online_rank_fails_its_peer_and_the_run_resumes() {
    let runtime = "mode = \"deterministic\"\nround_size = 1";
    let cfg_in = |dir: &Path| {
        let text = online_config(dir, "", "mode = \"deterministic\"");
        // GRPO (the last stage) in one-problem rounds of longer completions.
        let body = std::fs::read_to_string(&text).unwrap();
        let at = body.rfind("round_size = 2").expect("grpo's rounds");
        let body = format!(
            "{}{runtime}{}",
            &body[..at],
            &body[at + "round_size = 2".len()..].replacen("mode = \"deterministic\"", "", 1)
        )
        .replacen(
            "max_new_tokens = 16\n[stages.learner]\nbatch_size = 8",
            "max_new_tokens = 48\n[stages.learner]\nbatch_size = 4",
            1,
        );
        std::fs::write(&text, body).unwrap();
        text
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg_in(dir.path());
    let ckpts = dir.path().join("runs/dp/stages/2-grpo/checkpoints");
    kill_rank1_after(&cfg, &ckpts, 1);

    let o = medzero(&["run", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("grpo: resuming from"), "{}", stderr(&o));
    let whole = tempfile::tempdir().unwrap();
    let o = medzero(&["run", &cfg_in(whole.path())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let grpo = |d: &Path| d.join("runs/dp/stages/2-grpo/model");
    let diff = max_abs_diff(&grpo(dir.path()), &grpo(whole.path()));
    assert!(diff <= 1e-5, "resumed vs uninterrupted: {diff:e}");
}
