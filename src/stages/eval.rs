//! The evaluation stage: earlier stages' models scored on SynthClinic's test
//! split, greedy and with selection rules over N samples, the PRM (if one is
//! named) measured against the world's step labels, and the teacher judging
//! when asked.

use super::{Stage, StageCtx, StageOutput};
use crate::eval::{self, EvalConfig};
use crate::infra::io::{write_json, write_jsonl};
use crate::infra::monitor::{Metrics, TensorBoard};
use crate::infra::results::Group;
use anyhow::{Context, Result};
use medzero_envs::synthclinic::{Case, SynthClinic, case::required_lab_values};
use medzero_policies::Policy;
use medzero_rewards::Prm;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EvalStage {
    pub name: Option<String>,
    /// Stages whose models are scored, in table order.
    pub models: Vec<String>,
    /// A PRM stage whose model scores samples for the PRM selection rules.
    pub prm: Option<String>,
    pub eval: EvalConfig,
}

impl Stage for EvalStage {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn refs(&self) -> Vec<&str> {
        self.models
            .iter()
            .chain(&self.prm)
            .map(String::as_str)
            .collect()
    }

    fn validate(&self) -> Result<()> {
        if self.models.is_empty() {
            anyhow::bail!("`models` must name at least one stage to score");
        }
        self.eval.validate()?;
        if self.prm.is_none()
            && self.eval.samples > 0
            && let Some(rule) = self.eval.rules.iter().find(|r| r.needs_prm())
        {
            anyhow::bail!("selection rule {rule} needs a PRM: name a meds3_prm stage in `prm`");
        }
        Ok(())
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let prm = match &self.prm {
            Some(stage) => Some(Prm::load(&ctx.model(stage)?.dir, ctx.run.device)?),
            None => None,
        };
        let judge = if self.eval.judge {
            Some(ctx.services.teacher()?)
        } else {
            None
        };
        let mut rows = Vec::new();
        let seen = training_lab_values(ctx.world);
        for name in &self.models {
            let m = ctx.model(name)?;
            let policy = Policy::load(&m.dir, ctx.run.device, None)?;
            let mut rng = ChaCha8Rng::seed_from_u64(ctx.run.seed);
            let t = Instant::now();
            let r = eval::evaluate(
                &policy,
                &ctx.world.test,
                &ctx.run.template,
                &self.eval,
                eval::Graders {
                    prm: prm.as_ref(),
                    labeller: Some(ctx.truth),
                    judge: judge.as_deref(),
                },
                &mut rng,
            )
            .with_context(|| format!("scoring {name}"))?;
            // Each model's figures in its own TensorBoard run under the
            // stage, under the same tags, so models overlay.
            let mut tb = TensorBoard::create(&ctx.dir.join(name))?;
            if let Some(j) = &r.judge {
                tb.scalar("eval/judge_accuracy", 0, j.accuracy);
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
                    tb.scalar(&format!("eval/prm_step_{k}"), 0, v);
                }
                eprintln!(
                    "{name}: PRM {} against the world's step labels: accuracy {:.1}%, AUROC {:.3} over {} steps ({:.1}% correct)",
                    self.prm.as_deref().unwrap_or_default(),
                    100.0 * q.accuracy,
                    q.auroc,
                    q.steps,
                    100.0 * q.correct_frac
                );
                write_json(&ctx.dir.join(format!("prm_quality-{name}.json")), q)?;
            }
            tb.scalar("eval/greedy_accuracy", 0, r.greedy_accuracy);
            for (rule, acc) in &r.selection_accuracy {
                tb.scalar(&format!("eval/{rule}"), 0, *acc);
            }
            write_jsonl(
                &ctx.dir.join(format!("predictions-{name}.jsonl")),
                &r.predictions,
            )?;
            let groups = lab_value_groups(ctx.world, &seen, &r.predictions);
            for (group, g) in &groups {
                tb.scalar(
                    &format!("eval/{group}/greedy_accuracy"),
                    0,
                    g.greedy_accuracy,
                );
                eprintln!(
                    "{name}: {group}: {:.1}% greedy on {} questions",
                    100.0 * g.greedy_accuracy,
                    g.n
                );
            }
            tb.flush()?;
            let mut row = r.into_row(
                name,
                m.training_tokens,
                m.wall_s + t.elapsed().as_secs_f64(),
            );
            row.groups = groups;
            rows.push(row);
        }
        Ok(StageOutput { rows, model: None })
    }
}

/// Greedy accuracy split by whether every lab value the answer needs is
/// printed in some training question: with a vocabulary of whole values, an
/// unseen value is an id training never taught, so this split shows what
/// the tokenizer costs.
fn lab_value_groups(
    world: &SynthClinic,
    seen: &BTreeSet<String>,
    predictions: &[eval::Prediction],
) -> BTreeMap<String, Group> {
    let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (p, pred) in world.test.iter().zip(predictions) {
        let Some(case) = Case::from_problem(p) else {
            continue;
        };
        let all_seen = required_lab_values(&world.kb, &case)
            .iter()
            .all(|v| seen.contains(v));
        let group = if all_seen {
            "lab_values_seen"
        } else {
            "lab_values_unseen"
        };
        let e = counts.entry(group.to_string()).or_default();
        e.0 += pred.correct as usize;
        e.1 += 1;
    }
    counts
        .into_iter()
        .map(|(k, (hits, n))| {
            (
                k,
                Group {
                    n,
                    greedy_accuracy: hits as f64 / n as f64,
                },
            )
        })
        .collect()
}

/// Every lab value, as printed, of the training questions.
fn training_lab_values(world: &SynthClinic) -> BTreeSet<String> {
    world
        .train
        .iter()
        .filter_map(Case::from_problem)
        .flat_map(|c| {
            c.labs
                .iter()
                .map(|&(lab, v)| world.kb.labs[lab].fmt(v))
                .collect::<Vec<_>>()
        })
        .collect()
}
