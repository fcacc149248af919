//! The fine-tuning stages every pipeline starts with: the base student reads
//! the textbook (`pretrain`), then learns from the configured teacher either
//! its answers alone (`distill_answers`, the classic-KD baseline) or its
//! reasoning chains in MedS3's step format (`distill_chains`, the cold start
//! the reasoning methods share).

use super::{Stage, StageCtx, StageOutput, fine_tune};
use crate::teacher::{Teacher, TeacherError};
use crate::train::TrainConfig;
use crate::train::sft::Example;
use anyhow::{Context, Result, bail};
use medzero_envs::{Problem, chain_text};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;

/// A stage that fine-tunes a model and leaves it in `stages/<k>-<name>/model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainStage {
    pub name: Option<String>,
    /// The stage whose model this one starts from (none: the base student).
    pub init: Option<String>,
    pub sft: TrainConfig,
}

impl TrainStage {
    fn refs(&self) -> Vec<&str> {
        self.init.iter().map(String::as_str).collect()
    }

    fn validate(&self) -> Result<()> {
        self.sft.validate().context("sft")
    }
}

/// What a fine-tuning stage learns from: the one thing its kinds differ in.
pub trait Data: Send + Sync {
    fn examples(ctx: &mut StageCtx) -> Result<Vec<Example>>;
}

/// A [`TrainStage`] on the examples `D` builds; its TOML table is the
/// `TrainStage`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Distill<D> {
    pub stage: TrainStage,
    #[serde(skip)]
    data: PhantomData<D>,
}

impl<D: Data> Stage for Distill<D> {
    fn name(&self) -> Option<&str> {
        self.stage.name.as_deref()
    }
    fn refs(&self) -> Vec<&str> {
        self.stage.refs()
    }
    fn validate(&self) -> Result<()> {
        self.stage.validate()
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let data = D::examples(ctx)?;
        fine_tune(ctx, self.stage.init.as_deref(), &self.stage.sft, data)
    }
}

/// Domain-foundation pretraining: each textbook line learned in full.
pub type Pretrain = Distill<Textbook>;
/// SFT on the teacher's answer to each training question, no reasoning.
pub type DistillAnswers = Distill<TeacherAnswers>;
/// SFT on the teacher's chain for each training question.
pub type DistillChains = Distill<TeacherChains>;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Textbook;
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TeacherAnswers;
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TeacherChains;

impl Data for Textbook {
    fn examples(ctx: &mut StageCtx) -> Result<Vec<Example>> {
        Ok(ctx
            .world
            .textbook
            .iter()
            .map(|l| Example {
                prompt: String::new(),
                completion: l.clone(),
                ..Default::default()
            })
            .collect())
    }
}

impl Data for TeacherAnswers {
    /// The option the teacher picks, by its text (a bare letter would also
    /// ask the student to bind letters to options).
    fn examples(ctx: &mut StageCtx) -> Result<Vec<Example>> {
        teacher_examples(ctx, |t, p| Ok(format!("The answer is {}.", t.answer(p)?)))
    }
}

impl Data for TeacherChains {
    /// The root sentence, then "Step k: ..." ending with the teacher's answer
    /// (wrong on the teacher's wrong items, as a real teacher's would be).
    fn examples(ctx: &mut StageCtx) -> Result<Vec<Example>> {
        teacher_examples(ctx, |t, p| Ok(chain_text(&t.correct(p, &[])?)))
    }
}

/// One example per training question the teacher answers: its prompt, and
/// `completion` from the teacher. A malformed reply skips its question
/// (counted); any other teacher failure stops the stage.
fn teacher_examples(
    ctx: &mut StageCtx,
    completion: impl Fn(&dyn Teacher, &Problem) -> Result<String, TeacherError> + Sync,
) -> Result<Vec<Example>> {
    let teacher = ctx.services.teacher()?;
    let template = ctx.run.template.clone();
    let name = ctx.name;
    let replies: Vec<Result<Example, String>> =
        ctx.world
            .train
            .par_iter()
            .map(|p| match completion(teacher.as_ref(), p) {
                Ok(c) => Ok(Ok(Example {
                    prompt: template.render(&p.prompt_text()),
                    completion: c,
                    ..Default::default()
                })),
                Err(e) if e.is_malformed() => Ok(Err(e.to_string())),
                Err(e) => Err(anyhow::Error::new(e)
                    .context(format!("{name}: the teacher failed on {}", p.id))),
            })
            .collect::<Result<_>>()?;
    let (data, failed): (Vec<_>, Vec<_>) = replies.into_iter().partition(Result::is_ok);
    let data: Vec<Example> = data.into_iter().flatten().collect();
    let first = failed.first().cloned().and_then(Result::err);
    if data.is_empty() {
        bail!(
            "{name}: the teacher answered no training question ({} malformed replies, e.g. {})",
            failed.len(),
            first.unwrap_or_default()
        );
    }
    if let Some(e) = first {
        eprintln!(
            "{name}: teacher {} gave {} malformed replies (e.g. {e}); those questions are skipped",
            teacher.name(),
            failed.len()
        );
    }
    ctx.metrics
        .scalar("teacher/failures", 0, failed.len() as f64);
    Ok(data)
}
