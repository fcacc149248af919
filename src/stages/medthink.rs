//! MedThink (arXiv 2605.08094) as two stages. `medthink_knowledge`: the teacher
//! screens the training questions (optional) and answers each kept one with
//! the knowledge points behind its answer; the student is fine-tuned on that.
//! `medthink_correction`: the stage-1 student answers the training set; for
//! each question it gets wrong the teacher writes a reasoning chain linking
//! the knowledge to the answer, appended to the stage-1 target, and the
//! student is fine-tuned again on the merged set. Each stage leaves its data
//! in ShareGPT form (`sharegpt.jsonl`) in its folder.

use super::{Stage, StageCtx, StageOutput, fine_tune, required};
use crate::infra::io::{read_jsonl, write_jsonl};
use crate::rollout::sampling::{Sampler, SamplingConfig};
use crate::runtime::RuntimeConfig;
use crate::runtime::collect::{Collect, collect};
use crate::teacher::TeacherError;
use crate::train::TrainConfig;
use crate::train::sft::Example;
use anyhow::{Context, Result, bail};
use medzero_envs::{Problem, render_chain};
use medzero_rewards::RuleVerifier;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const SHAREGPT_FILE: &str = "sharegpt.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnowledgeStage {
    pub name: Option<String>,
    /// The stage whose model is fine-tuned (none: the base student).
    pub init: Option<String>,
    /// Drop the questions the teacher doubts (its screening).
    pub screening: bool,
    pub sft: TrainConfig,
}

impl Default for KnowledgeStage {
    fn default() -> Self {
        KnowledgeStage {
            name: None,
            init: None,
            screening: true,
            sft: TrainConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorrectionStage {
    pub name: Option<String>,
    /// The `medthink_knowledge` stage: its model answers, its data is merged.
    pub knowledge: String,
    /// How the student answers (greedy by default).
    pub sampling: SamplingConfig,
    pub runtime: RuntimeConfig,
    pub sft: TrainConfig,
}

impl Default for CorrectionStage {
    fn default() -> Self {
        CorrectionStage {
            name: None,
            knowledge: String::new(),
            sampling: SamplingConfig {
                samples: 1,
                temperature: 0.0,
                max_new_tokens: 160,
                ..SamplingConfig::default()
            },
            runtime: RuntimeConfig::default(),
            sft: TrainConfig::default(),
        }
    }
}

/// One ShareGPT record, MedThink's release format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareGpt {
    pub id: String,
    pub conversations: Vec<Turn>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

impl ShareGpt {
    fn new(p: &Problem, answer: String) -> ShareGpt {
        ShareGpt {
            id: p.id.clone(),
            conversations: vec![
                Turn {
                    from: "user".into(),
                    value: p.prompt_text(),
                },
                Turn {
                    from: "assistant".into(),
                    value: answer,
                },
            ],
        }
    }

    fn answer(&self) -> &str {
        self.conversations
            .last()
            .map(|t| t.value.as_str())
            .unwrap_or_default()
    }
}

fn read_sharegpt(path: &Path) -> Result<Vec<ShareGpt>> {
    read_jsonl(path, "a ShareGPT record")
}

fn examples(ctx: &StageCtx, records: &[ShareGpt]) -> Vec<Example> {
    let template = ctx.run.template.clone();
    records
        .iter()
        .map(|r| Example {
            prompt: template.render(&r.conversations[0].value),
            completion: r.answer().to_string(),
            ..Default::default()
        })
        .collect()
}

enum Answer {
    Kept(String),
    Screened,
    Malformed(String),
}

/// ", e.g. <the first malformed reply>" when any reply was malformed: a
/// count alone does not say what the teacher got wrong.
fn malformed_summary(failed: &[String]) -> String {
    failed
        .first()
        .map(|e| format!(", e.g. {e}"))
        .unwrap_or_default()
}

/// Stage 1: screening and knowledge explanations, then SFT.
impl Stage for KnowledgeStage {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn refs(&self) -> Vec<&str> {
        self.init.iter().map(String::as_str).collect()
    }

    fn validate(&self) -> Result<()> {
        self.sft.validate().context("sft")
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let (stage, name) = (self, ctx.name);
        let path = ctx.dir.join(SHAREGPT_FILE);
        let records = if path.exists() {
            read_sharegpt(&path)?
        } else {
            let teacher = ctx.services.teacher()?;
            // A malformed reply skips its question; any other failure stops the
            // stage at once (rayon's Result collect short-circuits), so a dead
            // server costs one item's retries, not every item's.
            let answers: Vec<Answer> = ctx
                .world
                .train
                .par_iter()
                .map(|p| {
                    let asked = (|| -> Result<Answer, TeacherError> {
                        if stage.screening && !teacher.screen(p)? {
                            return Ok(Answer::Screened);
                        }
                        teacher.explain(p).map(Answer::Kept)
                    })();
                    match asked {
                        Ok(a) => Ok(a),
                        Err(e) if e.is_malformed() => Ok(Answer::Malformed(e.to_string())),
                        Err(e) => Err(anyhow::Error::new(e)
                            .context(format!("{name}: the teacher failed on {}", p.id))),
                    }
                })
                .collect::<Result<_>>()?;
            let (mut records, mut screened, mut failed) = (Vec::new(), 0, Vec::new());
            for (p, a) in ctx.world.train.iter().zip(answers) {
                match a {
                    Answer::Kept(answer) => records.push(ShareGpt::new(p, answer)),
                    Answer::Screened => screened += 1,
                    Answer::Malformed(e) => failed.push(e),
                }
            }
            let failures = malformed_summary(&failed);
            if records.is_empty() {
                bail!(
                    "{name}: the teacher answered no training question ({} failed{failures}, {screened} screened out)",
                    failed.len()
                );
            }
            eprintln!(
                "{name}: teacher {} kept {} of {} questions ({screened} screened out, {} failed{failures})",
                teacher.name(),
                records.len(),
                ctx.world.train.len(),
                failed.len()
            );
            ctx.metrics
                .scalar("teacher/screened_out", 0, screened as f64);
            ctx.metrics
                .scalar("teacher/failures", 0, failed.len() as f64);
            write_jsonl(&path, &records)?;
            records
        };
        let data = examples(ctx, &records);
        fine_tune(ctx, stage.init.as_deref(), &stage.sft, data)
    }
}

/// Stage 2: the stage-1 student's attempts, the teacher's corrections of the
/// wrong ones, then SFT from the stage-1 model on the merged set.
impl Stage for CorrectionStage {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn refs(&self) -> Vec<&str> {
        vec![self.knowledge.as_str()]
    }

    fn runtime(&self) -> Option<&RuntimeConfig> {
        Some(&self.runtime)
    }

    fn servable(&self) -> bool {
        true
    }

    fn validate(&self) -> Result<()> {
        required("knowledge", &self.knowledge)?;
        self.sampling.validate().context("sampling")?;
        self.sft.validate().context("sft")
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let (stage, name) = (self, ctx.name);
        let knowledge = ctx.model(&stage.knowledge)?;
        let path = ctx.dir.join(SHAREGPT_FILE);
        let merged = if path.exists() {
            read_sharegpt(&path)?
        } else {
            let first = read_sharegpt(&ctx.stage_dir(&stage.knowledge)?.join(SHAREGPT_FILE))?;
            let by_id: HashMap<&str, &Problem> =
                ctx.world.train.iter().map(|p| (p.id.as_str(), p)).collect();
            let problems: Vec<Problem> = first
                .iter()
                .map(|r| {
                    by_id
                        .get(r.id.as_str())
                        .map(|p| (*p).clone())
                        .with_context(|| {
                            format!(
                                "{}: {} is no training question of this run",
                                stage.knowledge, r.id
                            )
                        })
                })
                .collect::<Result<_>>()?;
            let rollout = Sampler {
                cfg: stage.sampling.clone(),
                template: ctx.run.template.clone(),
                reward: RuleVerifier,
            };
            let dir = ctx.dir.join("attempts");
            std::fs::create_dir_all(&dir)?;
            let tag = format!("{name}/attempts");
            let (stored, _) = collect(Collect {
                name: &tag,
                dir: &dir,
                model_dir: &knowledge.dir,
                device: ctx.run.device,
                problems: &problems,
                rollout: &rollout,
                runtime: &stage.runtime,
                seed: ctx.run.seed,
                metrics: &mut *ctx.metrics,
                stop: ctx.stop,
            })?;
            let mut wrong: HashMap<&str, bool> = HashMap::new();
            for t in &stored {
                *wrong.entry(t.problem_id.as_str()).or_insert(false) |= t.reward < 1.0;
            }
            let teacher = ctx.services.teacher()?;
            let merged: Vec<Option<ShareGpt>> = first
                .par_iter()
                .zip(&problems)
                .map(|(r, p)| {
                    if !wrong.get(p.id.as_str()).copied().unwrap_or(false) {
                        return Ok(Some(r.clone()));
                    }
                    match teacher.correct(p, &[]) {
                        Ok(chain) => Ok(Some(ShareGpt::new(
                            p,
                            format!("{}\n\n{}", r.answer(), render_chain(&chain)),
                        ))),
                        Err(e) if e.is_malformed() => Ok(None),
                        Err(e) => Err(anyhow::Error::new(e)
                            .context(format!("{name}: the teacher failed on {}", p.id))),
                    }
                })
                .collect::<Result<_>>()?;
            let failed = merged.iter().filter(|m| m.is_none()).count();
            // A question the teacher could not correct keeps its stage-1 target.
            let out: Vec<ShareGpt> = merged
                .into_iter()
                .zip(&first)
                .map(|(m, r)| m.unwrap_or_else(|| r.clone()))
                .collect();
            let n_wrong = wrong.values().filter(|w| **w).count();
            eprintln!(
                "{name}: the student got {n_wrong} of {} questions wrong; {} corrected ({failed} teacher failures)",
                problems.len(),
                n_wrong - failed
            );
            ctx.metrics.scalar("data/wrong_attempts", 0, n_wrong as f64);
            write_jsonl(&path, &out)?;
            out
        };
        let data = examples(ctx, &merged);
        fine_tune(ctx, Some(&stage.knowledge), &stage.sft, data)
    }
}
