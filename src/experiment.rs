//! Runs an experiment: a run folder, the SynthClinic data, then each stage in
//! order. Each finished stage leaves `result.json` in its folder, so a rerun
//! of the same run name skips it and goes on where the last run stopped.

use crate::baselines::{self, Answerer};
use crate::config::{Config, EvalStage, Stage, TrainStage};
use crate::eval;
use crate::monitor::{Metrics, TensorBoard};
use crate::results::{Results, Row};
use crate::sft::{self, Example};
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use medzero_envs::synthclinic::{Oracle, SynthClinic};
use medzero_envs::{Problem, atomic, loaders, render_chain};
use medzero_policies::Policy;
use medzero_policies::device::DeviceInfo;
use medzero_policies::tokenizer::Tokenizer;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
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
    /// Models trained by earlier stages, by stage name.
    pub models: &'a BTreeMap<String, TrainedModel>,
    /// Set by SIGINT/SIGTERM: stages checkpoint and return.
    pub stop: &'a AtomicBool,
    /// `run.device`: where the stage's models train and generate.
    pub device: tch::Device,
}

/// A model a training stage left behind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainedModel {
    pub dir: PathBuf,
    /// Tokens trained on, counting every stage it descends from.
    pub training_tokens: u64,
    pub wall_s: f64,
}

impl StageCtx<'_> {
    /// The model an earlier stage trained.
    pub fn model(&self, stage: &str) -> Result<TrainedModel> {
        self.models
            .get(stage)
            .cloned()
            .with_context(|| format!("no earlier stage named {stage:?} trained a model"))
    }

    /// The folder of an earlier stage of this run.
    pub fn stage_dir(&self, stage: &str) -> Result<PathBuf> {
        let k = self
            .cfg
            .stages
            .iter()
            .position(|s| s.name() == stage)
            .with_context(|| format!("no stage named {stage:?}"))?;
        Ok(self
            .cfg
            .run
            .out_dir
            .join(&self.cfg.run.name)
            .join("stages")
            .join(format!("{k}-{stage}")))
    }
}

/// What a finished stage records in its `result.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    #[serde(default)]
    pub rows: Vec<Row>,
    #[serde(default)]
    pub model: Option<TrainedModel>,
}

pub fn run(cfg: &Config, fresh: bool, stop: &AtomicBool) -> Result<RunOutcome> {
    let dir = cfg.run.out_dir.join(&cfg.run.name);
    let resolved = cfg.to_toml();
    let config_path = dir.join("config.toml");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = lock_run(&dir)?;
    if fresh {
        // Everything but the lock this process holds.
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.file_name() == Some(std::ffi::OsStr::new(".lock")) {
                continue;
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("removing {} for --fresh", path.display()))?;
        }
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
    let device = cfg.run.device()?;
    let stamp = DeviceInfo::current(device).stamp();

    let world = SynthClinic::generate(&cfg.data.synthclinic)?;
    let data_dir = dir.join("data");
    if !data_dir.join("test.jsonl").exists() {
        world.write_dir(&data_dir)?;
    }
    let mut tb = TensorBoard::create(&dir)
        .with_context(|| format!("creating TensorBoard events in {}", dir.display()))?;

    let mut rows = Vec::new();
    let mut models = BTreeMap::new();
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
        let result = if result_path.exists() {
            let text = std::fs::read_to_string(&result_path)?;
            resumed += 1;
            serde_json::from_str(&text)
                .with_context(|| format!("reading {}", result_path.display()))?
        } else {
            std::fs::create_dir_all(&stage_dir)?;
            let mut ctx = StageCtx {
                cfg,
                world: &world,
                metrics: &mut tb,
                dir: &stage_dir,
                models: &models,
                stop,
                device,
            };
            let result = match stage {
                Stage::Baselines(_) => StageResult {
                    rows: run_baselines(&mut ctx)?,
                    model: None,
                },
                Stage::Pretrain(t) => {
                    train_stage(&mut ctx, stage.name(), t, textbook_examples(&world))?
                }
                Stage::DistillAnswers(t) => {
                    let data = answer_examples(&ctx)?;
                    train_stage(&mut ctx, stage.name(), t, data)?
                }
                Stage::DistillChains(t) => {
                    let data = chain_examples(&ctx)?;
                    train_stage(&mut ctx, stage.name(), t, data)?
                }
                Stage::Meds3Search(m) => crate::meds3::run_search(&mut ctx, stage.name(), m)?,
                Stage::Meds3Policy(m) => {
                    let data = crate::meds3::policy_examples(&ctx, m)?;
                    let t = TrainStage {
                        name: m.name.clone(),
                        init: m.init.clone(),
                        sft: m.sft.clone(),
                    };
                    train_stage(&mut ctx, stage.name(), &t, data)?
                }
                Stage::Meds3Prm(m) => crate::meds3::run_prm(&mut ctx, stage.name(), m)?,
                Stage::RejectionSampling(r) => {
                    crate::rejection_sampling::run(&mut ctx, stage.name(), r)?
                }
                Stage::Dpo(p) => {
                    crate::preference::run(&mut ctx, stage.name(), p, crate::preference::Loss::Dpo)?
                }
                Stage::Kto(p) => {
                    crate::preference::run(&mut ctx, stage.name(), p, crate::preference::Loss::Kto)?
                }
                Stage::MedthinkKnowledge(m) => {
                    crate::medthink::run_knowledge(&mut ctx, stage.name(), m)?
                }
                Stage::MedthinkCorrection(m) => {
                    crate::medthink::run_correction(&mut ctx, stage.name(), m)?
                }
                Stage::Eval(e) => StageResult {
                    rows: run_eval(&mut ctx, e)?,
                    model: None,
                },
            };
            ctx.metrics.flush().context("writing TensorBoard events")?;
            atomic::write(
                &result_path,
                serde_json::to_string_pretty(&result)?.as_bytes(),
            )?;
            result
        };
        rows.extend(result.rows);
        if let Some(m) = result.model {
            models.insert(stage.name().to_string(), m);
        }
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
                judge_accuracy: None,
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

/// The base student: an HF model folder, or a fresh decoder over SynthClinic's
/// word-level vocabulary (every word of the world's texts).
pub fn base_student(cfg: &Config, world: &SynthClinic) -> Result<Policy> {
    let device = cfg.run.device()?;
    if !cfg.student.from.is_empty() {
        return Ok(Policy::load(
            Path::new(&cfg.student.from),
            device,
            Some(cfg.student.dtype),
        )?);
    }
    let oracle = world.oracle(cfg.teacher.oracle.clone());
    let template = cfg.student.template;
    let mut texts: Vec<String> = world.textbook.clone();
    for p in world.train.iter().chain(&world.test) {
        texts.push(template.render(&p.prompt_text()));
        if let Ok(steps) = oracle.gold_chain(p) {
            texts.push(render_chain(&steps));
        }
        if let Ok(e) = oracle.explain(p) {
            texts.push(e.render(p));
        }
        texts.extend(
            p.options
                .iter()
                .map(|c| format!("The answer is {}.", c.text)),
        );
    }
    // MedS3's fixed texts: the root sentence and the Reflect opening.
    texts.push(format!("{} But wait,", crate::mcts::ROOT_TEXT));
    let tokenizer =
        Tokenizer::word_level(texts.iter().map(String::as_str), cfg.student.min_word_count);
    let decoder = cfg
        .student
        .decoder(tokenizer.vocab_size(), tokenizer.eos_id());
    Ok(Policy::new_random(
        &decoder,
        tokenizer,
        device,
        cfg.run.seed,
    )?)
}

/// Reads a JSONL file of `what` records, naming the line of a malformed one.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not {what}", path.display(), i + 1))
        })
        .collect()
}

/// Writes records as JSONL, atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut lines = String::new();
    for r in records {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    Ok(atomic::write(path, lines.as_bytes())?)
}

/// The configured teacher.
pub fn teacher(cfg: &Config, world: &SynthClinic) -> Result<Box<dyn crate::teacher::Teacher>> {
    use crate::config::TeacherKind;
    Ok(match cfg.teacher.kind {
        TeacherKind::Oracle => Box::new(crate::teacher::OracleTeacher(
            world.oracle(cfg.teacher.oracle.clone()),
        )),
        TeacherKind::Http => Box::new(crate::teacher::ChatTeacher(
            crate::http_teacher::HttpTeacher::new(cfg.teacher.http.clone())
                .map_err(|e| anyhow::anyhow!("teacher.http: {e}"))?,
        )),
        TeacherKind::Local => Box::new(crate::teacher::LocalTeacher::load(
            &cfg.teacher.local,
            cfg.student.template,
            cfg.run.device()?,
        )?),
    })
}

/// The run's teacher when `eval.judge` asks for a judge.
pub(crate) fn eval_judge(
    ctx: &StageCtx,
    eval: &eval::EvalConfig,
) -> Result<Option<Box<dyn crate::teacher::Teacher>>> {
    Ok(if eval.judge {
        Some(teacher(ctx.cfg, ctx.world)?)
    } else {
        None
    })
}

/// Each textbook line as a sequence learned in full.
fn textbook_examples(world: &SynthClinic) -> Vec<Example> {
    world
        .textbook
        .iter()
        .map(|l| Example {
            prompt: String::new(),
            completion: l.clone(),
            ..Default::default()
        })
        .collect()
}

/// One example per training question: its prompt, and `completion` from the
/// teacher.
fn teacher_examples(
    ctx: &StageCtx,
    completion: impl Fn(&Oracle, &Problem) -> Result<String>,
) -> Result<Vec<Example>> {
    let oracle = ctx.world.oracle(ctx.cfg.teacher.oracle.clone());
    let template = ctx.cfg.student.template;
    ctx.world
        .train
        .iter()
        .map(|p| {
            Ok(Example {
                prompt: template.render(&p.prompt_text()),
                completion: completion(&oracle, p)?,
                ..Default::default()
            })
        })
        .collect()
}

/// The teacher's answer to each training question, without reasoning: the
/// option it picks by its text (a bare letter would also ask the student to
/// bind letters to options).
fn answer_examples(ctx: &StageCtx) -> Result<Vec<Example>> {
    teacher_examples(ctx, |oracle, p| {
        let e = oracle.explain(p)?;
        let text = p
            .option(&e.letter)
            .map(|c| c.text.as_str())
            .unwrap_or_default();
        Ok(format!("The answer is {text}."))
    })
}

/// The teacher's reasoning on each training question in MedS3's step format:
/// the root sentence, then "Step k: ..." ending with the teacher's answer
/// (wrong on the teacher's noisy items, as a real teacher's would be).
fn chain_examples(ctx: &StageCtx) -> Result<Vec<Example>> {
    teacher_examples(ctx, |oracle, p| {
        let steps = oracle.correct(p, &[])?;
        Ok(format!(
            "{}\n\n{}",
            crate::mcts::ROOT_TEXT,
            render_chain(&steps)
        ))
    })
}

pub(crate) fn train_stage(
    ctx: &mut StageCtx,
    name: &str,
    stage: &TrainStage,
    data: Vec<Example>,
) -> Result<StageResult> {
    let (policy, inherited) = if stage.init.is_empty() {
        (base_student(ctx.cfg, ctx.world)?, 0)
    } else {
        let m = ctx.model(&stage.init)?;
        (Policy::load(&m.dir, ctx.device, None)?, m.training_tokens)
    };
    let data_path = ctx.dir.join("data.jsonl");
    if !data_path.exists() {
        let lines: String = data
            .iter()
            .map(|e| serde_json::to_string(e).expect("example") + "\n")
            .collect();
        atomic::write(&data_path, lines.as_bytes())?;
    }
    let report = sft::train(
        &policy,
        &data,
        &stage.sft,
        ctx.cfg.student.template,
        ctx.cfg.run.seed,
        ctx.dir,
        name,
        ctx.metrics,
        ctx.stop,
    )?;
    let model_dir = ctx.dir.join("model");
    policy.save(&model_dir)?;
    eprintln!(
        "{name}: {} steps, {} tokens, final loss {:.4}, {:.1}s",
        report.steps, report.tokens, report.final_loss, report.wall_s
    );
    Ok(StageResult {
        rows: Vec::new(),
        model: Some(TrainedModel {
            dir: model_dir,
            training_tokens: inherited + report.tokens,
            wall_s: report.wall_s,
        }),
    })
}

fn run_eval(ctx: &mut StageCtx, stage: &EvalStage) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let prm = if stage.prm.is_empty() {
        None
    } else {
        Some(crate::meds3::Prm::load(
            &ctx.model(&stage.prm)?.dir,
            ctx.device,
        )?)
    };
    let oracle = ctx.world.oracle(ctx.cfg.teacher.oracle.clone());
    let labeller = |p: &Problem, steps: &[String]| {
        let steps: Vec<medzero_envs::Step> = steps
            .iter()
            .map(|s| medzero_envs::Step::new(s.clone()))
            .collect();
        oracle.label_steps(p, &steps).ok()
    };
    let judge = eval_judge(ctx, &stage.eval)?;
    for name in &stage.models {
        let m = ctx.model(name)?;
        let policy = Policy::load(&m.dir, ctx.device, None)?;
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.cfg.run.seed);
        let t = Instant::now();
        let r = eval::evaluate(
            &policy,
            &ctx.world.test,
            ctx.cfg.student.template,
            &stage.eval,
            eval::Graders {
                prm: prm.as_ref(),
                labeller: Some(&labeller),
                judge: judge.as_deref(),
            },
            &mut rng,
        )?;
        if let Some(j) = &r.judge {
            ctx.metrics
                .scalar(&format!("eval/{name}/judge_accuracy"), 0, j.accuracy);
            eprintln!(
                "{name}: judge {} calls {:.1}% correct (strict rule {:.1}%), agreeing with the rule on {:.1}%, {} failed judgements",
                j.judge,
                100.0 * j.accuracy,
                100.0 * r.greedy_accuracy,
                100.0 * j.agreement,
                j.failures
            );
        }
        if let Some(q) = &r.prm_quality {
            for (k, v) in [
                ("steps", q.steps as f64),
                ("correct_frac", q.correct_frac),
                ("accuracy", q.accuracy),
                ("auroc", q.auroc),
            ] {
                ctx.metrics
                    .scalar(&format!("eval/{name}/prm_step_{k}"), 0, v);
            }
            eprintln!(
                "{name}: PRM {} against the oracle's step labels: accuracy {:.1}%, AUROC {:.3} over {} steps ({:.1}% correct)",
                stage.prm,
                100.0 * q.accuracy,
                q.auroc,
                q.steps,
                100.0 * q.correct_frac
            );
            atomic::write(
                &ctx.dir.join(format!("prm_quality-{name}.json")),
                serde_json::to_string_pretty(q)?.as_bytes(),
            )?;
        }
        ctx.metrics.scalar(
            &format!("eval/{name}/greedy_accuracy"),
            0,
            r.greedy_accuracy,
        );
        for (rule, acc) in &r.selection_accuracy {
            ctx.metrics.scalar(&format!("eval/{name}/{rule}"), 0, *acc);
        }
        rows.push(Row {
            method: name.clone(),
            eval_set: "synthclinic-test".into(),
            greedy_accuracy: r.greedy_accuracy,
            selection_accuracy: r.selection_accuracy,
            judge_accuracy: r.judge.map(|j| j.accuracy),
            per_task: r.per_task,
            n: r.n,
            training_tokens: m.training_tokens,
            wall_s: m.wall_s + t.elapsed().as_secs_f64(),
        });
    }
    Ok(rows)
}

/// A model folder as given, or the last trained model of a run folder.
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").exists() {
        return Ok(path.to_path_buf());
    }
    let stages = path.join("stages");
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&stages)
        .with_context(|| {
            format!(
                "{} is neither a model folder (no config.json) nor a run folder (no stages/)",
                path.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let k = e
                .file_name()
                .to_string_lossy()
                .split('-')
                .next()?
                .parse::<usize>()
                .ok()?;
            let model = e.path().join("model");
            model.join("config.json").exists().then_some((k, model))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, m)| m)
        .with_context(|| format!("run {} has no trained model yet", path.display()))
}
