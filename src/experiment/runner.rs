//! Runs an experiment: a run folder, the SynthClinic data, then each stage in
//! order. Each finished stage leaves `result.json` in its folder, so a rerun
//! of the same run name skips it and goes on where the last run stopped.
//!
//! A rerun must agree with the run folder's config on everything that has
//! happened: the run, data, teacher and student tables, and every finished
//! stage. Stages that have not finished may change, be added or be removed,
//! so fixing a bad value in a later stage needs no `--fresh`.

use super::config::Config;
use super::overrides::config_diff;
use super::student::base_student;
use crate::infra::monitor::{HParam, TensorBoard};
use crate::infra::results::Results;
use crate::stages::{Earlier, RunSettings, Services, StageCtx, StageOutput};
use crate::teacher::Teacher;
use anyhow::{Context, Result, bail};
use medzero_envs::atomic;
use medzero_envs::synthclinic::SynthClinic;
use medzero_policies::Policy;
use medzero_policies::device::DeviceInfo;
use medzero_policies::tokenizer::PromptTemplate;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// What a run left behind.
pub struct RunOutcome {
    pub dir: PathBuf,
    pub results: Results,
    /// Stages skipped because an earlier run finished them.
    pub resumed_stages: usize,
}

/// The runner's services to its stages.
struct RunServices<'a> {
    cfg: &'a Config,
    world: &'a SynthClinic,
    device: tch::Device,
    template: PromptTemplate,
}

impl Services for RunServices<'_> {
    fn base_student(&self) -> Result<Policy> {
        base_student(self.cfg, self.world, self.device)
    }

    fn teacher(&self) -> Result<Box<dyn Teacher>> {
        self.cfg
            .teacher
            .build(self.world, self.template.clone(), self.device)
    }

    fn eval_files(&self) -> &[PathBuf] {
        &self.cfg.data.eval_files
    }
}

/// The subfolder of a run folder holding ranks 1.. of a distributed run.
const RANKS: &str = "ranks";

/// The folder of stage `k`.
fn stage_folder(dir: &Path, k: usize, name: &str) -> PathBuf {
    dir.join("stages").join(format!("{k}-{name}"))
}

pub fn run(cfg: &Config, fresh: bool, stop: &AtomicBool) -> Result<RunOutcome> {
    let group = medzero_dist::world();
    let mut dir = cfg.run.out_dir.join(&cfg.run.name);
    // Rank 0 owns the run folder; the other ranks of a distributed run
    // keep their own copies of what they compute in `ranks/<r>` inside it.
    if let Some(g) = group.filter(|g| g.rank() > 0) {
        dir = dir.join(RANKS).join(g.rank().to_string());
    }
    let resolved = cfg.to_toml();
    let config_path = dir.join("config.toml");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = lock_run(&dir)?;
    if fresh {
        // Everything but the lock this process holds.
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name();
            if name == Some(std::ffi::OsStr::new(".lock"))
                || (group.is_some() && name == Some(std::ffi::OsStr::new(RANKS)))
            {
                continue;
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("removing {}", path.display()))?;
        }
    }
    if config_path.exists() {
        let old = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        // Resolved again by this build, so a setting added since (at its
        // default) is no change; one since removed still shows.
        let old = Config::parse(&old, &config_path.display().to_string(), &[])
            .map(|c| c.to_toml())
            .unwrap_or(old);
        check_resume(&dir, &old, &resolved)?;
        eprintln!("medzero: resuming run {}", dir.display());
    }
    atomic::write(&config_path, resolved.as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))?;
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    let device = cfg.run.device()?;
    let stamp = DeviceInfo::current(device).stamp();

    let world = SynthClinic::generate(&cfg.data.synthclinic)?;
    let truth = world.truth();
    let data_dir = dir.join("data");
    if !data_dir.join("test.jsonl").exists() {
        world.write_dir(&data_dir)?;
    }
    let template = super::student::student_template(cfg)?;
    let settings = RunSettings {
        seed: cfg.run.seed,
        device,
        template: template.clone(),
    };
    let services = RunServices {
        template,
        cfg,
        world: &world,
        device,
    };

    let mut rows = Vec::new();
    let mut earlier = Earlier::default();
    let mut resumed = 0;
    let bar = crate::infra::progress::bar(cfg.stages.len() as u64, "stages", "stages");
    for (k, spec) in cfg.stages.iter().enumerate() {
        let name = spec.name();
        let stage_dir = stage_folder(&dir, k, name);
        let result_path = stage_dir.join("result.json");
        bar.set_message(name.to_string());
        if let Some(g) = group {
            same_stage_everywhere(g, k, name, result_path.exists())?;
        }
        let result: StageOutput = if result_path.exists() {
            let text = std::fs::read_to_string(&result_path)?;
            resumed += 1;
            serde_json::from_str(&text)
                .with_context(|| format!("reading {}", result_path.display()))?
        } else {
            std::fs::create_dir_all(&stage_dir)?;
            // One TensorBoard run per stage (its folder), so stages share
            // tag names and their curves overlay instead of mixing.
            let mut tb = TensorBoard::create(&stage_dir).with_context(|| {
                format!("creating TensorBoard events in {}", stage_dir.display())
            })?;
            // The stage's settings in the HParams tab, beside the run's seed.
            let mut hparams = BTreeMap::new();
            HParam::flatten("", &serde_json::to_value(spec)?, &mut hparams);
            hparams.insert("run.seed".into(), HParam::Number(cfg.run.seed as f64));
            tb.hparams(&hparams);
            let mut ctx = StageCtx {
                name,
                dir: &stage_dir,
                run: &settings,
                world: &world,
                truth: &truth,
                earlier: &earlier,
                services: &services,
                metrics: &mut tb,
                stop,
            };
            let result = spec
                .stage()
                .run(&mut ctx)
                .with_context(|| format!("stage {k} ({name:?})"))?;
            ctx.metrics.flush().context("writing TensorBoard events")?;
            crate::infra::io::write_json(&result_path, &result)?;
            result
        };
        rows.extend(result.rows);
        earlier.dirs.insert(name.to_string(), stage_dir);
        if let Some(m) = result.model {
            earlier.models.insert(name.to_string(), m);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let claims = cfg.claims.iter().map(|c| c.check(&rows)).collect();
    let results = Results {
        run: cfg.run.name.clone(),
        seed: cfg.run.seed,
        stamp,
        rows,
        claims,
    };
    crate::infra::io::write_json(&dir.join("results.json"), &results)?;
    atomic::write(&dir.join("results.md"), results.to_markdown().as_bytes())?;
    Ok(RunOutcome {
        dir,
        results,
        resumed_stages: resumed,
    })
}

/// A distributed run's ranks resume in step: stage `k` is finished on all
/// of them or on none (each rank skips finished stages by itself).
fn same_stage_everywhere(g: &medzero_dist::Group, k: usize, name: &str, done: bool) -> Result<()> {
    let mut finished = [done as u8 as f64];
    crate::runtime::parallel::allreduce_values(g, &mut finished)?;
    let finished = finished[0] as usize;
    if finished != 0 && finished != g.world() {
        bail!(
            "stage {k} ({name:?}) is finished on {finished} of {} ranks: the ranks' folders are \
             out of step (rank 0's run folder and its ranks/ subfolders); rerun with --fresh",
            g.world()
        );
    }
    Ok(())
}

/// Refuses a resume whose config differs from the run folder's where the
/// run has already acted on it: anything outside `stages`, and any stage that
/// has finished. A stage that started but did not finish may change (say, a
/// value fixed after it failed); it resumes from what it wrote, and is named.
fn check_resume(dir: &Path, old: &str, new: &str) -> Result<()> {
    let old_cfg: Option<toml::Value> = toml::from_str(old).ok();
    let folder = |k: usize| {
        let stage = old_cfg.as_ref()?.get("stages")?.get(k)?;
        let name = stage.get("name").or_else(|| stage.get("kind"))?.as_str()?;
        Some(stage_folder(dir, k, name))
    };
    let mut blocking = Vec::new();
    let mut changed_unfinished = std::collections::BTreeSet::new();
    for path in config_diff(old, new) {
        let mut parts = path.split('.');
        let stage = match (parts.next(), parts.next().map(str::parse::<usize>)) {
            (Some("stages"), Some(Ok(k))) => Some(k),
            _ => None,
        };
        // Claims are read only when the run ends: they may change any time.
        if path == "claims" || path.starts_with("claims.") {
            continue;
        }
        match stage.map(|k| (k, folder(k))) {
            // A stage the old config did not have, or that never finished.
            Some((_, None)) => {}
            Some((k, Some(f))) if !f.join("result.json").exists() => {
                if std::fs::read_dir(&f).is_ok_and(|mut d| d.next().is_some()) {
                    changed_unfinished.insert((k, f));
                }
            }
            _ => blocking.push(path),
        }
    }
    if !blocking.is_empty() {
        bail!(
            "run {} exists with a different config (differs at: {}); finished stages and the \
             run, data, teacher and student tables must stay as they were. Resume it with the \
             same config, pick another run.name, or pass --fresh to start over",
            dir.display(),
            blocking.join(", ")
        );
    }
    for (k, f) in changed_unfinished {
        eprintln!(
            "medzero: stage {k}'s settings changed since it started; it resumes from what it \
             wrote in {} (delete that folder to redo the stage from scratch)",
            f.display()
        );
    }
    Ok(())
}

/// Holds the run folder for this process: two processes writing one run
/// would interleave stores and checkpoints. The kernel drops the lock when
/// the process ends, however it ends, so a killed run leaves nothing stale.
fn lock_run(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "run {} is in use by another medzero process; wait for it to end (or stop it) before resuming",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}
