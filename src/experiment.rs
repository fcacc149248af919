//! Runs an experiment: a run folder, the SynthClinic data, then each stage in
//! order. Each finished stage leaves `result.json` in its folder, so a rerun
//! of the same run name skips it and goes on where the last run stopped.

use crate::baselines::{self, Answerer};
use crate::config::{Config, Stage};
use crate::monitor::{Metrics, TensorBoard};
use crate::results::{Results, Row};
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use medzero_envs::synthclinic::SynthClinic;
use medzero_envs::{Problem, atomic, loaders};
use medzero_policies::device::DeviceInfo;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a run left behind.
pub struct RunOutcome {
    pub dir: PathBuf,
    pub results: Results,
    /// Stages skipped because an earlier run finished them.
    pub resumed_stages: usize,
}

/// Everything a stage may read.
pub struct StageCtx<'a> {
    pub cfg: &'a Config,
    pub world: &'a SynthClinic,
    pub metrics: &'a mut dyn Metrics,
    pub dir: &'a Path,
}

pub fn run(cfg: &Config, fresh: bool) -> Result<RunOutcome> {
    let dir = cfg.run.out_dir.join(&cfg.run.name);
    let resolved = cfg.to_toml();
    let config_path = dir.join("config.toml");
    if fresh && dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing {} for --fresh", dir.display()))?;
    }
    if config_path.exists() {
        let old = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        if old != resolved {
            let diff = config_diff(&old, &resolved);
            bail!(
                "run {} exists with a different config (differs at: {}); resume it with the same config, \
                 pick another run.name, or pass --fresh to start over",
                dir.display(),
                diff.join(", ")
            );
        }
        eprintln!("medzero: resuming run {}", dir.display());
    }
    atomic::write(&config_path, resolved.as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))?;
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    let stamp = DeviceInfo::current(tch::Device::Cpu).stamp();

    let world = SynthClinic::generate(&cfg.data.synthclinic)?;
    let data_dir = dir.join("data");
    if !data_dir.join("test.jsonl").exists() {
        world.write_dir(&data_dir)?;
    }
    let mut tb = TensorBoard::create(&dir)
        .with_context(|| format!("creating TensorBoard events in {}", dir.display()))?;

    let mut rows = Vec::new();
    let mut resumed = 0;
    let bar = ProgressBar::new(cfg.stages.len() as u64)
        .with_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .expect("template"),
        )
        .with_prefix("stages");
    for (k, stage) in cfg.stages.iter().enumerate() {
        let stage_dir = dir.join("stages").join(format!("{k}-{}", stage.name()));
        let result_path = stage_dir.join("result.json");
        bar.set_message(stage.name().to_string());
        if result_path.exists() {
            let text = std::fs::read_to_string(&result_path)?;
            let done: Vec<Row> = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", result_path.display()))?;
            rows.extend(done);
            resumed += 1;
            bar.inc(1);
            continue;
        }
        std::fs::create_dir_all(&stage_dir)?;
        let mut ctx = StageCtx {
            cfg,
            world: &world,
            metrics: &mut tb,
            dir: &stage_dir,
        };
        let stage_rows = match stage {
            Stage::Baselines(_) => run_baselines(&mut ctx)?,
        };
        ctx.metrics.flush().context("writing TensorBoard events")?;
        let json = serde_json::to_string_pretty(&stage_rows)?;
        atomic::write(&result_path, json.as_bytes())?;
        rows.extend(stage_rows);
        bar.inc(1);
    }
    bar.finish_and_clear();
    tb.flush().context("writing TensorBoard events")?;

    let results = Results {
        run: cfg.run.name.clone(),
        seed: cfg.run.seed,
        stamp,
        rows,
    };
    atomic::write(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    atomic::write(&dir.join("results.md"), results.to_markdown().as_bytes())?;
    Ok(RunOutcome {
        dir,
        results,
        resumed_stages: resumed,
    })
}

/// Dotted paths at which two TOML documents differ.
fn config_diff(a: &str, b: &str) -> Vec<String> {
    fn walk(a: Option<&toml::Value>, b: Option<&toml::Value>, path: String, out: &mut Vec<String>) {
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(x.get(k), y.get(k), p, out);
                }
            }
            (x, y) if x != y => out.push(path),
            _ => {}
        }
    }
    let (Ok(a), Ok(b)) = (
        toml::from_str::<toml::Value>(a),
        toml::from_str::<toml::Value>(b),
    ) else {
        return vec!["(unreadable config.toml)".into()];
    };
    let mut out = Vec::new();
    walk(Some(&a), Some(&b), String::new(), &mut out);
    out
}

fn run_baselines(ctx: &mut StageCtx) -> Result<Vec<Row>> {
    let oracle = ctx.world.oracle(ctx.cfg.teacher.oracle.clone());
    let seed = ctx.cfg.run.seed;
    let mut sets: Vec<(String, Vec<Problem>, bool)> =
        vec![("synthclinic-test".into(), ctx.world.test.clone(), true)];
    for f in &ctx.cfg.data.eval_files {
        let problems = loaders::load_problems(f)?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        sets.push((name, problems, false));
    }
    let mut rows = Vec::new();
    for (set, problems, synthetic) in &sets {
        let mut answerers: Vec<Box<dyn Answerer + '_>> = vec![
            Box::new(baselines::RandomOption::new(seed)),
            Box::new(baselines::MostFrequentLetter::fit(&ctx.world.train)),
            Box::new(baselines::WordOverlap),
        ];
        if *synthetic {
            answerers.push(Box::new(baselines::Teacher(&oracle)));
            answerers.push(Box::new(baselines::GoldChain(&oracle)));
        }
        for a in answerers.iter_mut() {
            let t = Instant::now();
            let s = baselines::score(a.as_mut(), problems);
            let method = a.name();
            ctx.metrics
                .scalar(&format!("baselines/{set}/{method}"), 0, s.accuracy);
            rows.push(Row {
                method,
                eval_set: set.clone(),
                greedy_accuracy: s.accuracy,
                selection_accuracy: Default::default(),
                per_task: if *synthetic {
                    s.per_task
                } else {
                    Default::default()
                },
                n: s.n,
                training_tokens: 0,
                wall_s: t.elapsed().as_secs_f64(),
            });
        }
    }
    let lengths: Vec<f64> = ctx
        .world
        .test
        .iter()
        .filter_map(|p| oracle.gold_chain(p).ok())
        .map(|c| c.len() as f64)
        .collect();
    ctx.metrics.histogram("data/gold_chain_steps", 0, &lengths);
    if let Some(p) = ctx.world.test.first() {
        let chain = oracle
            .gold_chain(p)
            .map(|s| medzero_envs::render_chain(&s))
            .unwrap_or_default();
        ctx.metrics.text(
            "data/sample",
            0,
            &format!("{}\n\n{}", p.prompt_text(), chain),
        );
    }
    Ok(rows)
}
