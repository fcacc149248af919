//! MedThink (REFERENCE 2) as two stages. `medthink_knowledge`: the teacher
//! screens the training questions (optional) and answers each kept one with
//! the knowledge points behind its answer; the student is fine-tuned on that.
//! `medthink_correction`: the stage-1 student answers the training set; for
//! each question it gets wrong the teacher writes a reasoning chain linking
//! the knowledge to the answer, appended to the stage-1 target, and the
//! student is fine-tuned again on the merged set. Each stage leaves its data
//! in ShareGPT form (`sharegpt.jsonl`) in its folder.

use crate::config::TrainStage;
use crate::experiment::{StageCtx, StageResult};
use crate::runtime::learner::RuntimeConfig;
use crate::sampling::{Sampler, SamplingConfig};
use crate::sft::{Example, SftConfig};
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
    /// The stage whose model is fine-tuned (empty: the base student).
    pub init: String,
    /// Drop the questions the teacher doubts (its screening).
    pub screening: bool,
    pub sft: SftConfig,
}

impl Default for KnowledgeStage {
    fn default() -> Self {
        KnowledgeStage {
            name: None,
            init: String::new(),
            screening: true,
            sft: SftConfig::default(),
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
    pub sft: SftConfig,
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
            sft: SftConfig::default(),
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
    crate::experiment::read_jsonl(path, "a ShareGPT record")
}

fn examples(ctx: &StageCtx, records: &[ShareGpt]) -> Vec<Example> {
    let template = ctx.cfg.student.template;
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

/// Stage 1: screening and knowledge explanations, then SFT.
pub fn run_knowledge(
    ctx: &mut StageCtx,
    name: &str,
    stage: &KnowledgeStage,
) -> Result<StageResult> {
    let path = ctx.dir.join(SHAREGPT_FILE);
    let records = if path.exists() {
        read_sharegpt(&path)?
    } else {
        let teacher = crate::experiment::teacher(ctx.cfg, ctx.world)?;
        // A malformed reply skips its question; any other failure stops the
        // stage at once (rayon's Result collect short-circuits), so a dead
        // server costs one item's retries, not every item's.
        let answers: Vec<Answer> = ctx
            .world
            .train
            .par_iter()
            .map(|p| {
                let asked = (|| {
                    if stage.screening && !teacher.screen(p)? {
                        return Ok(Answer::Screened);
                    }
                    teacher.explain(p).map(Answer::Kept)
                })();
                match asked {
                    Err(e) if crate::teacher::is_malformed(&e) => {
                        Ok(Answer::Malformed(format!("{e:#}")))
                    }
                    Err(e) => Err(e.context(format!("{name}: the teacher failed on {}", p.id))),
                    ok => ok,
                }
            })
            .collect::<Result<_>>()?;
        let (mut records, mut screened, mut failed) = (Vec::new(), 0, 0);
        for (p, a) in ctx.world.train.iter().zip(answers) {
            match a {
                Answer::Kept(answer) => records.push(ShareGpt::new(p, answer)),
                Answer::Screened => screened += 1,
                Answer::Malformed(e) => {
                    failed += 1;
                    eprintln!("{name}: {e}");
                }
            }
        }
        if records.is_empty() {
            bail!(
                "{name}: the teacher answered no training question ({failed} failed, {screened} screened out)"
            );
        }
        eprintln!(
            "{name}: teacher {} kept {} of {} questions ({screened} screened out, {failed} failed)",
            teacher.name(),
            records.len(),
            ctx.world.train.len()
        );
        ctx.metrics
            .scalar(&format!("{name}/screened_out"), 0, screened as f64);
        ctx.metrics
            .scalar(&format!("{name}/teacher_failures"), 0, failed as f64);
        crate::experiment::write_jsonl(&path, &records)?;
        records
    };
    let data = examples(ctx, &records);
    let t = TrainStage {
        name: Some(name.to_string()),
        init: stage.init.clone(),
        sft: stage.sft.clone(),
    };
    crate::experiment::train_stage(ctx, name, &t, data)
}

/// Stage 2: the stage-1 student's attempts, the teacher's corrections of the
/// wrong ones, then SFT from the stage-1 model on the merged set.
pub fn run_correction(
    ctx: &mut StageCtx,
    name: &str,
    stage: &CorrectionStage,
) -> Result<StageResult> {
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
            template: ctx.cfg.student.template,
            reward: RuleVerifier,
        };
        let dir = ctx.dir.join("attempts");
        std::fs::create_dir_all(&dir)?;
        let tag = format!("{name}/attempts");
        let stored = crate::preference::attempts(
            ctx,
            &rollout,
            &tag,
            &dir,
            &knowledge.dir,
            &problems,
            &stage.runtime,
            ctx.cfg.run.seed,
        )?;
        let mut wrong: HashMap<&str, bool> = HashMap::new();
        for t in &stored {
            *wrong.entry(t.problem_id.as_str()).or_insert(false) |= t.reward < 1.0;
        }
        let teacher = crate::experiment::teacher(ctx.cfg, ctx.world)?;
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
                    Err(e) if crate::teacher::is_malformed(&e) => {
                        eprintln!("{name}: {e:#}");
                        Ok(None)
                    }
                    Err(e) => Err(e.context(format!("{name}: the teacher failed on {}", p.id))),
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
        ctx.metrics
            .scalar(&format!("{name}/wrong_attempts"), 0, n_wrong as f64);
        crate::experiment::write_jsonl(&path, &out)?;
        out
    };
    let data = examples(ctx, &merged);
    let t = TrainStage {
        name: Some(name.to_string()),
        init: stage.knowledge.clone(),
        sft: stage.sft.clone(),
    };
    crate::experiment::train_stage(ctx, name, &t, data)
}
