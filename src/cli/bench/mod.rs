//! `medzero bench`: throughput of the hot paths, side by side with HF
//! transformers / PyTorch on the same checkpoint, the same CPU threads and the
//! same shapes, in one run, stamped with device, threads, dtype and versions.

pub mod learner;
pub mod queue;
pub mod search;

use crate::experiment::Config;
use crate::experiment::student::base_student;
use anyhow::{Context, Result, bail};
use learner::{GROUP, LearnerStep, random_prompts};
use medzero_envs::synthclinic::SynthClinic;
use medzero_policies::device::DeviceInfo;
use medzero_policies::llama::DType;
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

const PEER_SCRIPT: &str = include_str!("../../../benches/peer/bench_peer.py");

#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    pub threads: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub batches: Vec<usize>,
    /// Continuations of one prompt in the prefix-reuse benchmark.
    pub samples: usize,
    pub prefix_len: usize,
    pub train_batch: usize,
    pub train_len: usize,
    pub train_steps: usize,
    pub repeats: usize,
    /// Run the transformers / PyTorch side too.
    pub peer: bool,
    /// An HF model folder to benchmark instead of the quickstart student:
    /// decode, prefill reuse, SFT and DPO rows only (the search and runtime
    /// rows run on SynthClinic's student).
    pub model: Option<PathBuf>,
    /// Row groups to run (empty: all): see [`GROUPS`].
    pub only: Vec<String>,
    /// Where medzero's decode, learner, search and service rows run.
    #[serde(skip)]
    pub device: tch::Device,
    pub dtype: DType,
    /// The device's peak dense TFLOP/s at `dtype`, for the learner's MFU.
    pub peak_tflops: Option<f64>,
}

/// The groups that run on a GPU; the rest time CPU-side machinery.
const DEVICE_GROUPS: [&str; 4] = ["decode", "learner", "mcts", "service"];

/// The row groups of the bench, in the order they run.
pub const GROUPS: [&str; 7] = [
    "decode", "learner", "mcts", "service", "queue", "runtime", "dist",
];

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            prompt_len: 64,
            new_tokens: 64,
            batches: vec![1, 32],
            samples: 16,
            prefix_len: 256,
            train_batch: 32,
            train_len: 64,
            train_steps: 5,
            repeats: 3,
            peer: true,
            model: None,
            only: Vec::new(),
            device: tch::Device::Cpu,
            dtype: DType::F32,
            peak_tflops: None,
        }
    }
}

impl BenchConfig {
    fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }

    /// Sizes for a real model (SmolLM2-135M: 100x the quickstart student)
    /// that keep `bench --model` to minutes on two cores.
    pub fn for_model(dir: PathBuf) -> Self {
        BenchConfig {
            prompt_len: 64,
            new_tokens: 32,
            batches: vec![1, 8, 32],
            samples: 8,
            prefix_len: 128,
            train_batch: 8,
            train_len: 128,
            train_steps: 2,
            repeats: 2,
            model: Some(dir),
            ..BenchConfig::default()
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub name: String,
    pub unit: String,
    pub medzero: f64,
    pub peer: Option<f64>,
    /// medzero / peer.
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub stamp: String,
    pub model: String,
    pub dtype: String,
    pub peer_versions: Option<String>,
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "{}\nmodel: {}, dtype {}{}\n\n| benchmark | unit | medzero | peer | ratio |\n|---|---|---|---|---|\n",
            self.stamp,
            self.model,
            self.dtype,
            self.peer_versions
                .as_ref()
                .map(|v| format!(", peer: {v}"))
                .unwrap_or_default()
        );
        for r in &self.rows {
            let peer = r.peer.map(rate).unwrap_or_else(|| "-".into());
            let ratio = r
                .ratio
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into());
            s.push_str(&format!(
                "| {} | {} | {} | {peer} | {ratio} |\n",
                r.name,
                r.unit,
                rate(r.medzero)
            ));
        }
        s
    }
}

/// A rate with three significant digits below 1000, whole numbers above.
fn rate(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// The fastest of `repeats` timed runs after one warm-up, in seconds.
fn best<F: FnMut() -> Result<()>>(repeats: usize, mut f: F) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// What `medzero bench` was asked for.
pub struct Options {
    pub json: bool,
    pub no_peer: bool,
    pub threads: Option<usize>,
    pub model: Option<PathBuf>,
    pub only: Vec<String>,
    pub device: tch::Device,
    pub dtype: DType,
    pub batches: Vec<usize>,
    pub peak_tflops: Option<f64>,
}

/// `medzero bench`: the table (or JSON) on stdout.
pub(super) fn command(o: Options) -> Result<()> {
    let Options {
        json,
        no_peer,
        threads,
        model,
        only,
        ..
    } = o;
    let mut cfg = match model {
        Some(dir) => BenchConfig::for_model(crate::infra::io::resolve_model(&dir)?),
        None => BenchConfig::default(),
    };
    cfg.peer = !no_peer;
    if let Some(g) = only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
        bail!(
            "--only {g}: no such group; the groups are {}",
            GROUPS.join(", ")
        );
    }
    if o.device != tch::Device::Cpu {
        if cfg.peer {
            bail!(
                "--device {:?}: the peer side runs on the CPU only; add --no-peer",
                o.device
            );
        }
        match only.iter().find(|g| !DEVICE_GROUPS.contains(&g.as_str())) {
            Some(g) => bail!(
                "--only {g} times CPU-side machinery; on a GPU the groups are {}",
                DEVICE_GROUPS.join(", ")
            ),
            None if only.is_empty() => bail!(
                "--device {:?}: name the groups to run (--only {})",
                o.device,
                DEVICE_GROUPS.join(" --only ")
            ),
            None => {}
        }
    }
    if o.dtype != DType::F32 && cfg.peer {
        bail!("--dtype bf16: the peer side runs in f32; add --no-peer");
    }
    if let Some(p) = o.peak_tflops
        && !(p.is_finite() && p > 0.0)
    {
        bail!("--peak-tflops must be a number > 0, got {p}");
    }
    if o.batches.contains(&0) {
        bail!("--batches: a batch size must be at least 1");
    }
    if !o.batches.is_empty() {
        cfg.batches = o.batches;
    }
    cfg.device = o.device;
    cfg.dtype = o.dtype;
    cfg.peak_tflops = o.peak_tflops;
    cfg.only = only;
    if let Some(t) = threads {
        if !(1..=1024).contains(&t) {
            bail!("--threads must be between 1 and 1024, got {t}");
        }
        cfg.threads = t;
    }
    // A worker of the `dist` rows (or any bench under torchrun): the learner
    // rows over the process group; rank 0 reports.
    if let Some(launch) = medzero_dist::Launch::from_env()? {
        let timeout = std::time::Duration::from_secs(120);
        medzero_dist::init(medzero_dist::Group::connect(&launch, timeout)?)?;
    }
    let report = run(&cfg)?;
    if medzero_dist::world().is_some_and(|g| g.rank() > 0) {
        return Ok(());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.to_markdown());
    }
    Ok(())
}

pub fn run(cfg: &BenchConfig) -> Result<BenchReport> {
    tch::set_num_threads(cfg.threads as i32);
    // The quickstart's student (the model every CPU experiment trains), or
    // the given folder.
    let mut exp = Config::default();
    exp.student.dtype = cfg.dtype;
    let world = SynthClinic::generate(&exp.data.synthclinic)?;
    let policy = match &cfg.model {
        Some(dir) => Policy::load(dir, cfg.device, Some(cfg.dtype))?,
        None => base_student(&exp, &world, cfg.device)?,
    };
    let c = policy.config();
    let model = format!(
        "{:?} hidden {} x {} layers, {} heads ({} kv), vocab {}, {} parameters",
        c.arch,
        c.hidden_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.vocab_size,
        c.num_parameters()
    );
    let vocab = policy.tokenizer.vocab_size() as i64;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let greedy = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(cfg.new_tokens)
    };
    let mut rows: Vec<BenchRow> = Vec::new();
    let row = |name: String, unit: &str, medzero: f64| BenchRow {
        name,
        unit: unit.into(),
        medzero,
        peer: None,
        ratio: None,
    };

    for &b in cfg.batches.iter().filter(|_| cfg.wants("decode")) {
        let prompts = random_prompts(&mut rng, b, cfg.prompt_len, vocab);
        let mut r = ChaCha8Rng::seed_from_u64(1);
        let secs = best(cfg.repeats, || {
            Ok(policy.generate(&prompts, &greedy, &mut r).map(|_| ())?)
        })?;
        rows.push(row(
            format!("decode batch {b}, KV cache"),
            "tokens/s",
            (b * cfg.new_tokens) as f64 / secs,
        ));
        let secs = best(1, || {
            Ok(policy
                .generate_uncached(&prompts, &greedy, &mut r)
                .map(|_| ())?)
        })?;
        rows.push(row(
            format!("decode batch {b}, no cache"),
            "tokens/s",
            (b * cfg.new_tokens) as f64 / secs,
        ));
    }

    if cfg.wants("decode") {
        // N continuations of one long prompt: prefill once and fork, against
        // prefilling the same prompt N times.
        let prompt = random_prompts(&mut rng, 1, cfg.prefix_len, vocab).remove(0);
        let short = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(16)
        };
        let n = cfg.samples;
        let mut r = ChaCha8Rng::seed_from_u64(2);
        let forked = best(cfg.repeats, || {
            Ok(policy.sample_n(&prompt, n, &short, &mut r).map(|_| ())?)
        })?;
        let copies = vec![prompt.clone(); n];
        let recomputed = best(cfg.repeats, || {
            Ok(policy.generate(&copies, &short, &mut r).map(|_| ())?)
        })?;
        let per_s = |secs: f64| n as f64 / secs;
        // The peer column here is medzero without reuse: transformers has no fork.
        rows.push(BenchRow {
            name: format!(
                "{n} samples of a {}-token prompt, forked prefix (peer: recomputed)",
                cfg.prefix_len
            ),
            unit: "samples/s".into(),
            medzero: per_s(forked),
            peer: Some(per_s(recomputed)),
            ratio: Some(recomputed / forked),
        });
    }

    if cfg.wants("learner") {
        // Learner: one optimizer step (forward, backward, clip, AdamW).
        rows.extend(learner_row(
            LearnerStep::sft(&policy, cfg.train_batch, cfg.train_len)?,
            cfg,
        )?);
        rows.extend(learner_row(
            LearnerStep::dpo(&policy, cfg.train_batch, cfg.train_len)?,
            cfg,
        )?);
    }
    if cfg.model.is_none() && medzero_dist::world().is_none() {
        if cfg.wants("learner") {
            rows.extend(learner_row(
                LearnerStep::grpo(&policy, cfg.train_batch, cfg.train_len)?,
                cfg,
            )?);
        }
        if cfg.wants("mcts") {
            rows.extend(mcts_rows(&policy, &world)?);
        }
        if cfg.wants("service") {
            rows.push(mcts_service_row(&policy, &world)?);
        }
        if cfg.wants("queue") && cfg.device == tch::Device::Cpu {
            rows.extend(queue_rows());
        }
        if cfg.wants("runtime") && cfg.device == tch::Device::Cpu {
            rows.extend(runtime_rows(&policy, &world, cfg)?);
        }
    }

    // Placement compares CPU actors' own copies with one shared service.
    if cfg.wants("service") && medzero_dist::world().is_none() && cfg.device == tch::Device::Cpu {
        rows.extend(placement_rows(&policy, &world, cfg)?);
    }
    if cfg.wants("dist") && medzero_dist::world().is_none() {
        rows.extend(dist_rows(cfg)?);
    }

    let mut peer_versions = None;
    if cfg.peer {
        let peer = run_peer(&policy, cfg)?;
        peer_versions = Some(format!(
            "torch {}, transformers {}, trl {}",
            peer["torch"].as_str().unwrap_or("?"),
            peer["transformers"].as_str().unwrap_or("?"),
            peer["trl"].as_str().unwrap_or("?")
        ));
        for r in rows.iter_mut() {
            let key = if let Some(rest) = r.name.strip_prefix("decode batch ") {
                let (b, kind) = rest.split_once(", ").unwrap_or_default();
                Some(format!(
                    "b{b}-{}",
                    if kind == "KV cache" {
                        "cache"
                    } else {
                        "nocache"
                    }
                ))
            } else {
                None
            };
            let value = match key {
                Some(k) => peer["decode"][&k].as_f64(),
                None if r.name.starts_with("SFT step") => peer["train_tokens_per_s"].as_f64(),
                None if r.name.starts_with("DPO step") => peer["dpo_tokens_per_s"].as_f64(),
                None if r.name.starts_with("GRPO step") => peer["grpo_tokens_per_s"].as_f64(),
                None => continue,
            };
            r.peer = value;
            r.ratio = value.map(|p| r.medzero / p);
        }
    }
    let dtype = cfg.dtype.hf_name().replace("float", "f");
    let stamp = format!("{}, dtype {dtype}", DeviceInfo::current(cfg.device).stamp());
    Ok(BenchReport {
        stamp,
        model,
        dtype,
        peer_versions,
        rows,
    })
}

/// MedS3's tree search on one SynthClinic question with the bench student:
/// nodes/s and generated tokens/s at max_nodes 20, 60 and 200, and prefix
/// reuse on against off (same policy, seed and budgets, so the same tree:
/// the row says whether it was). The untrained student rarely ends a step, so steps and rollouts
/// run to their budgets (24 and 64 tokens): an upper bound on cost per node.
fn mcts_rows(policy: &Policy, world: &SynthClinic) -> Result<Vec<BenchRow>> {
    use crate::rollout::mcts::{self, MctsConfig};
    use crate::rollout::meds3::{PolicySteps, StepGeneration};
    use medzero_policies::tokenizer::PromptTemplate;
    let problem = &world.test[0];
    let run = |max_nodes: usize, reuse: bool| -> Result<(f64, f64, mcts::Tree)> {
        let generation = StepGeneration {
            step_max_tokens: 24,
            rollout_max_tokens: 64,
            prefix_reuse: reuse,
            ..StepGeneration::default()
        };
        let cfg = MctsConfig {
            max_nodes,
            ..MctsConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut model = PolicySteps::new(
            policy,
            &generation,
            PromptTemplate::Plain,
            problem,
            &mut rng,
        );
        let t = Instant::now();
        let tree = mcts::search(problem, &cfg, &mut model, 0)?;
        let secs = t.elapsed().as_secs_f64();
        Ok((
            tree.nodes.len() as f64 / secs,
            model.generated as f64 / secs,
            tree,
        ))
    };
    let mut rows = Vec::new();
    for max_nodes in [20, 60, 200] {
        let (nodes_per_s, tokens_per_s, tree) = run(max_nodes, true)?;
        rows.push(BenchRow {
            name: format!(
                "MCTS max_nodes {max_nodes} ({} nodes), prefix reuse",
                tree.nodes.len()
            ),
            unit: "nodes/s".into(),
            medzero: nodes_per_s,
            peer: None,
            ratio: None,
        });
        rows.push(BenchRow {
            name: format!("MCTS max_nodes {max_nodes}, generated tokens"),
            unit: "tokens/s".into(),
            medzero: tokens_per_s,
            peer: None,
            ratio: None,
        });
        if max_nodes == 60 {
            let (off, off_tokens, off_tree) = run(max_nodes, false)?;
            // Reuse is a pure speed switch: the same seed must give the same tree.
            let same = tree.nodes.len() == off_tree.nodes.len()
                && tree
                    .nodes
                    .iter()
                    .zip(&off_tree.nodes)
                    .all(|(a, b)| a.text == b.text && a.parent == b.parent);
            rows.push(BenchRow {
                name: format!(
                    "MCTS max_nodes 60, prefix reuse on (peer: off, recomputed; {} nodes; same tree: {})",
                    off_tree.nodes.len(),
                    if same { "yes" } else { "NO" }
                ),
                unit: "nodes/s".into(),
                medzero: nodes_per_s,
                peer: Some(off),
                ratio: Some(nodes_per_s / off),
            });
            rows.push(BenchRow {
                name: "MCTS max_nodes 60, generated tokens, reuse on (peer: off)".into(),
                unit: "tokens/s".into(),
                medzero: tokens_per_s,
                peer: Some(off_tokens),
                ratio: Some(tokens_per_s / off_tokens),
            });
        }
    }
    Ok(rows)
}

/// MedS3's search of 8 questions (max_nodes 20, budgets as in
/// [`mcts_rows`]): 8 trees in flight through the inference service against
/// one tree at a time on the policy itself, same streams, so the same trees
/// (the row says whether they were).
fn mcts_service_row(policy: &Policy, world: &SynthClinic) -> Result<BenchRow> {
    const TREES: usize = 8;
    let work = search::Trees::new(world, TREES);
    let t = Instant::now();
    let alone = work.one_at_a_time(policy)?;
    let one_at_a_time = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (together, stats) = work.in_flight(policy)?;
    let in_flight = t.elapsed().as_secs_f64();
    let nodes: usize = alone.iter().map(|t| t.nodes.len()).sum();
    let same = alone == together;
    Ok(BenchRow {
        name: format!(
            "MCTS {TREES} trees in flight via the service (peer: one at a time; {nodes} nodes; \
             mean batch {:.0} rows; same trees: {})",
            stats.mean_batch,
            if same { "yes" } else { "NO" }
        ),
        unit: "nodes/s".into(),
        medzero: nodes as f64 / in_flight,
        peer: Some(nodes as f64 / one_at_a_time),
        ratio: Some(one_at_a_time / in_flight),
    })
}

/// The trajectory queue against `std::sync::mpsc::sync_channel` and a
/// `Mutex<VecDeque>`: 100k boxed 1 KB items, capacity 1024, median of 5 runs.
fn queue_rows() -> Vec<BenchRow> {
    use queue::{bench_mpsc, bench_mutex, bench_throughput};
    const ITEMS: usize = 100_000;
    let median = |f: fn(usize, usize, usize) -> f64, producers: usize| {
        let mut v: Vec<f64> = (0..5).map(|_| f(producers, ITEMS, 1024)).collect();
        v.sort_by(f64::total_cmp);
        v[2]
    };
    let mut rows = Vec::new();
    for producers in [1, 4] {
        let ours = median(bench_throughput, producers);
        for (peer_name, peer) in [
            ("mpsc sync_channel", median(bench_mpsc, producers)),
            ("Mutex<VecDeque>", median(bench_mutex, producers)),
        ] {
            rows.push(BenchRow {
                name: format!("trajectory queue, {producers} producer(s) (peer: {peer_name})"),
                unit: "items/s".into(),
                medzero: ours,
                peer: Some(peer),
                ratio: Some(ours / peer),
            });
        }
    }
    rows
}

/// One online stage on the bench student, timed: seconds and the report.
struct OnlineBench<'a> {
    root: &'a std::path::Path,
    problems: &'a [medzero_envs::Problem],
    build: &'a (dyn Fn() -> Result<Policy> + Sync),
    threads: usize,
}

impl OnlineBench<'_> {
    /// [`run_placed`](Self::run_placed) with an SFT learner on every trajectory.
    fn run_sft(
        &self,
        name: &str,
        rollout: &dyn crate::runtime::Rollout,
        setup: (crate::runtime::Mode, usize, usize),
        placement: crate::runtime::Placement,
    ) -> Result<(f64, crate::runtime::learner::OnlineReport)> {
        let learner_policy = (self.build)()?;
        let mut objective = crate::train::sft::TrajectorySft::new(
            &learner_policy,
            self.problems,
            medzero_policies::tokenizer::PromptTemplate::Plain,
            0.0,
            0.0,
            512,
            1.0,
        )?;
        self.run_placed(
            name,
            rollout,
            &mut objective,
            &learner_policy,
            setup,
            placement,
        )
    }

    fn run_placed(
        &self,
        name: &str,
        rollout: &dyn crate::runtime::Rollout,
        objective: &mut dyn crate::runtime::learner::Objective,
        learner_policy: &Policy,
        (mode, actors, actor_threads): (crate::runtime::Mode, usize, usize),
        placement: crate::runtime::Placement,
    ) -> Result<(f64, crate::runtime::learner::OnlineReport)> {
        use crate::runtime::learner::{self, LearnerConfig, Online, RuntimeConfig};
        let t = Instant::now();
        let report = learner::run(Online {
            name,
            dir: &self.root.join(name),
            problems: self.problems,
            rollout,
            objective,
            policy: learner_policy,
            build_actor_policy: self.build,
            runtime: &RuntimeConfig {
                mode,
                placement,
                actors,
                actor_threads,
                learner_threads: self.threads,
                round_size: 16,
                max_policy_lag: u64::MAX,
                ..RuntimeConfig::default()
            },
            learner: &LearnerConfig {
                batch_size: 16,
                checkpoint_every: 1000,
                ..LearnerConfig::default()
            },
            seed: 0,
            metrics: &mut crate::infra::monitor::Null,
            stop: &std::sync::atomic::AtomicBool::new(false),
        })?;
        Ok((t.elapsed().as_secs_f64(), report))
    }
}

/// An online stage (rejection sampling's rollout: 4 samples of 32 tokens
/// per problem, an SFT learner on every trajectory, sync rounds of 16) with
/// 8 model-less actors on the inference service (2 threads) against 2
/// actors with their own copies (1 thread each): the same cores. The rows
/// say how many policy copies each holds and the service's mean batch and
/// weight-swap latency.
fn placement_rows(
    policy: &Policy,
    world: &SynthClinic,
    cfg: &BenchConfig,
) -> Result<Vec<BenchRow>> {
    use crate::rollout::sampling::{Sampler, SamplingConfig};
    use crate::runtime::{Mode, Placement};
    use medzero_policies::tokenizer::PromptTemplate;
    let root = std::env::temp_dir().join(format!("medzero-bench-placement-{}", std::process::id()));
    let model_dir = root.join("model");
    policy.save(&model_dir)?;
    // A real model decodes ~100x slower: fewer problems keep it to minutes.
    let n = if cfg.model.is_some() { 16 } else { 64 };
    let problems = &world.train[..n.min(world.train.len())];
    let template = PromptTemplate::Plain;
    let rollout = Sampler {
        cfg: SamplingConfig {
            samples: 4,
            max_new_tokens: 32,
            ..SamplingConfig::default()
        },
        template: template.clone(),
        reward: medzero_rewards::RuleVerifier,
    };
    let build = || Ok(Policy::load(&model_dir, tch::Device::Cpu, None)?);
    let bench = OnlineBench {
        root: &root,
        problems,
        build: &build,
        threads: cfg.threads.max(1),
    };
    // Resident memory: the process's peak RSS during each run, above its
    // RSS when the run starts (Linux; the peak is reset before each run).
    let run = |name: &str, actors, threads, placement| -> Result<(f64, _, Option<f64>)> {
        let start = rss::reset_peak();
        let (secs, report) =
            bench.run_sft(name, &rollout, (Mode::Sync, actors, threads), placement)?;
        let grew = start
            .zip(rss::peak())
            .map(|(s, p)| p.saturating_sub(s) as f64 / 1024.0);
        Ok((problems.len() as f64 / secs, report, grew))
    };
    let (own, _, own_rss) = run("per-actor", 2, 1, Placement::PerActor)?;
    let (shared, report, shared_rss) = run("shared", 8, 2, Placement::Shared)?;
    std::fs::remove_dir_all(&root).ok();
    tch::set_num_threads(cfg.threads as i32);
    let s = report.service.unwrap_or_default();
    let bytes: usize = policy
        .named_parameters()
        .iter()
        .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
        .sum();
    let mib = |copies: usize| (copies * bytes) as f64 / (1 << 20) as f64;
    Ok(vec![BenchRow {
        name: format!(
            "online stage, sync, {n} problems: shared service, 8 actors, 1 policy copy of \
             {:.1} MiB (peer: 2 actors with their own, {:.1} MiB); peak RSS growth {} \
             (peer: {}); mean batch {:.1} rows, weight swap {:.1} ms mean / {:.1} ms max",
            mib(1),
            mib(2),
            rss::show(shared_rss),
            rss::show(own_rss),
            s.mean_batch,
            1e3 * s.swap_latency_mean_s,
            1e3 * s.swap_latency_max_s
        ),
        unit: "problems/s".into(),
        medzero: shared,
        peer: Some(own),
        ratio: Some(shared / own),
    }])
}

/// Whole online stages on the bench student: the sampling rollout (4 samples
/// of 32 tokens per problem) through actors, queue, store and an SFT learner
/// training on every trajectory. Compares one actor with all threads against
/// two single-threaded actors, and overlapped (async) against rounds (sync).
/// Then GRPO the same way: groups of 8 samples with their advantages and the
/// GRPO learner, sync against async.
fn runtime_rows(policy: &Policy, world: &SynthClinic, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    use crate::rollout::advantage::{Outcome, ScaleRewards};
    use crate::rollout::grpo::GroupSampler;
    use crate::rollout::sampling::{Sampler, SamplingConfig};
    use crate::runtime::Mode;
    use crate::train::grpo::{GrpoConfig, GrpoObjective, Sampled};
    use medzero_policies::tokenizer::PromptTemplate;

    let root = std::env::temp_dir().join(format!("medzero-bench-{}", std::process::id()));
    let model_dir = root.join("model");
    policy.save(&model_dir)?;
    let problems = &world.train[..64.min(world.train.len())];
    let template = PromptTemplate::Plain;
    let sampler = |samples| Sampler {
        cfg: SamplingConfig {
            samples,
            max_new_tokens: 32,
            ..SamplingConfig::default()
        },
        template: template.clone(),
        reward: medzero_rewards::RuleVerifier,
    };
    let build = || Ok(Policy::load(&model_dir, tch::Device::Cpu, None)?);
    let threads = cfg.threads.max(1);
    let bench = OnlineBench {
        root: &root,
        problems,
        build: &build,
        threads,
    };
    let rollout = sampler(4);
    let setups = [
        ("deterministic", Mode::Deterministic, 1, threads),
        ("sync", Mode::Sync, 2, 1),
        ("async", Mode::Async, 2, 1),
    ];
    let mut rates = Vec::new();
    for (name, mode, actors, actor_threads) in setups {
        let (secs, _) = bench.run_sft(
            name,
            &rollout,
            (mode, actors, actor_threads),
            crate::runtime::Placement::PerActor,
        )?;
        rates.push((
            format!("{name}, {actors} actor(s) x {actor_threads} thread(s)"),
            problems.len() as f64 / secs,
        ));
    }
    let group = GroupSampler {
        sampler: sampler(GROUP),
        advantage: Box::new(Outcome {
            scale: ScaleRewards::Group,
        }),
    };
    let mut grpo_rates = Vec::new();
    for (name, mode) in [("grpo-sync", Mode::Sync), ("grpo-async", Mode::Async)] {
        let learner_policy = build()?;
        let mut objective = GrpoObjective::new(
            &learner_policy,
            problems,
            template.clone(),
            GrpoConfig::default(),
            Sampled {
                max_completion: 32,
                temperature: group.sampler.cfg.temperature,
            },
            None,
        )?;
        let (secs, report) = bench.run_placed(
            name,
            &group,
            &mut objective,
            &learner_policy,
            (mode, 2, 1),
            crate::runtime::Placement::PerActor,
        )?;
        grpo_rates.push(report.counters.trained as f64 / secs);
    }
    std::fs::remove_dir_all(&root).ok();
    tch::set_num_threads(cfg.threads as i32);
    let mut rows: Vec<BenchRow> = rates
        .iter()
        .map(|(name, per_s)| BenchRow {
            name: format!("online stage end to end: {name}"),
            unit: "problems/s".into(),
            medzero: *per_s,
            peer: None,
            ratio: None,
        })
        .collect();
    rows.push(BenchRow {
        name: format!("2 actors x 1 thread (sync) (peer: 1 actor x {threads} threads)"),
        unit: "problems/s".into(),
        medzero: rates[1].1,
        peer: Some(rates[0].1),
        ratio: Some(rates[1].1 / rates[0].1),
    });
    rows.push(BenchRow {
        name: "async (peer: sync), 2 actors".into(),
        unit: "problems/s".into(),
        medzero: rates[2].1,
        peer: Some(rates[1].1),
        ratio: Some(rates[2].1 / rates[1].1),
    });
    rows.push(BenchRow {
        name: format!("GRPO end to end, groups of {GROUP} x 32 tokens, trained: sync, 2 actors"),
        unit: "completions/s".into(),
        medzero: grpo_rates[0],
        peer: None,
        ratio: None,
    });
    rows.push(BenchRow {
        name: "GRPO end to end: async (peer: sync), 2 actors".into(),
        unit: "completions/s".into(),
        medzero: grpo_rates[1],
        peer: Some(grpo_rates[0]),
        ratio: Some(grpo_rates[1] / grpo_rates[0]),
    });
    Ok(rows)
}

/// The learner rows with the batch split over 2 processes of 1 thread
/// each (c10d, Gloo on loopback) beside 1 process of 1 thread, both run as
/// child processes of this binary (`bench --only learner`), the same
/// global batch and model.
fn dist_rows(cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    const WORLD: usize = 2;
    let exe = std::env::current_exe().context("locating the medzero binary")?;
    let args = |cmd: &mut std::process::Command| {
        cmd.args([
            "bench",
            "--only",
            "learner",
            "--no-peer",
            "--json",
            "--threads",
            "1",
        ]);
        if let Some(m) = &cfg.model {
            cmd.arg("--model").arg(m);
        }
        cmd.env_remove("WORLD_SIZE")
            .stderr(std::process::Stdio::inherit());
    };
    let rows_of = |out: std::process::Output, what: &str| -> Result<Vec<BenchRow>> {
        if !out.status.success() {
            bail!("bench: the {what} worker failed ({})", out.status);
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bench: the {what} worker's JSON"))?;
        let rows = report["rows"].as_array().cloned().unwrap_or_default();
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(BenchRow {
                    name: r["name"].as_str()?.to_string(),
                    unit: r["unit"].as_str()?.to_string(),
                    medzero: r["medzero"].as_f64()?,
                    peer: None,
                    ratio: None,
                })
            })
            .collect())
    };
    eprintln!("bench: learner steps in 1 process x 1 thread");
    let mut one = std::process::Command::new(&exe);
    args(&mut one);
    let single = rows_of(one.output()?, "1-process")?;

    eprintln!("bench: learner steps in {WORLD} processes x 1 thread (Gloo, loopback)");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let children: Vec<std::process::Child> = (0..WORLD)
        .map(|rank| {
            let mut cmd = std::process::Command::new(&exe);
            args(&mut cmd);
            cmd.env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", WORLD.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("starting a bench worker")
        })
        .collect::<Result<_>>()?;
    let mut outputs = children
        .into_iter()
        .map(|c| c.wait_with_output().context("waiting for a bench worker"))
        .collect::<Result<Vec<_>>>()?;
    let rank0 = outputs.remove(0);
    if let Some(bad) = outputs.iter().find(|o| !o.status.success()) {
        bail!("bench: a {WORLD}-process worker failed ({})", bad.status);
    }
    let parallel = rows_of(rank0, "rank-0")?;
    Ok(parallel
        .into_iter()
        .filter_map(|p| {
            let base = single.iter().find(|s| s.name == p.name)?;
            Some(BenchRow {
                name: format!(
                    "{}, {WORLD} processes x 1 thread (peer: 1 process x 1 thread)",
                    p.name
                ),
                unit: p.unit,
                medzero: p.medzero,
                peer: Some(base.medzero),
                ratio: Some(p.medzero / base.medzero),
            })
        })
        .collect())
}

/// Tokens/s of `cfg.train_steps` steps, best of `cfg.repeats`; with
/// `cfg.peak_tflops`, a second row: the model FLOPs utilisation, counting
/// 6 x parameters per trained token (forward and backward, no attention
/// term) against that peak.
fn learner_row(mut step: LearnerStep, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let secs = best(cfg.repeats, || {
        for _ in 0..cfg.train_steps {
            step.step()?;
        }
        // CUDA runs asynchronously: the step is done when the device is.
        if let tch::Device::Cuda(i) = cfg.device {
            tch::Cuda::synchronize(i as i64);
        }
        Ok(())
    })?;
    let tokens_per_s = (cfg.train_steps * step.tokens) as f64 / secs;
    let mut rows = vec![BenchRow {
        name: step.name.clone(),
        unit: "tokens/s".into(),
        medzero: tokens_per_s,
        peer: None,
        ratio: None,
    }];
    if let Some(peak) = cfg.peak_tflops {
        let flops = 6.0 * step.parameters() as f64 * tokens_per_s;
        rows.push(BenchRow {
            name: format!("{}: MFU at a {peak} TFLOP/s peak", step.name),
            unit: "%".into(),
            medzero: 100.0 * flops / (peak * 1e12),
            peer: None,
            ratio: None,
        });
    }
    Ok(rows)
}

fn run_peer(policy: &Policy, cfg: &BenchConfig) -> Result<serde_json::Value> {
    let tmp = std::env::temp_dir().join(format!("medzero-bench-{}", std::process::id()));
    let model_dir = match &cfg.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = tmp.join("model");
            policy.save(&dir)?;
            dir
        }
    };
    std::fs::create_dir_all(&tmp)?;
    let script = tmp.join("bench_peer.py");
    std::fs::write(&script, PEER_SCRIPT)?;
    let spec = tmp.join("spec.json");
    std::fs::write(&spec, serde_json::to_string(cfg)?)?;
    let py = medzero_policies::peer::python();
    eprintln!("bench: running the transformers side with {}", py.display());
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg(&model_dir)
        .arg(&spec)
        .output()
        .with_context(|| {
            format!(
                "running {} (run `make setup`, or pass --no-peer)",
                py.display()
            )
        })?;
    let _ = std::fs::remove_dir_all(&tmp);
    if !out.status.success() {
        bail!(
            "the transformers benchmark failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The process's resident memory from `/proc/self/status` (Linux only).
mod rss {
    fn field(name: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Resets the peak (VmHWM) to the current RSS; returns that RSS in KiB.
    pub fn reset_peak() -> Option<u64> {
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
        field("VmRSS:")
    }

    /// The peak RSS since the last reset, KiB.
    pub fn peak() -> Option<u64> {
        field("VmHWM:")
    }

    pub fn show(mib: Option<f64>) -> String {
        mib.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
    }
}
