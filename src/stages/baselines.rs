//! The reference rows of every table: chance-level heuristics (SynthClinic
//! must keep them near chance, or it rewards shortcuts), the configured
//! teacher, and the world's gold chains (the ceiling), on SynthClinic's test
//! split and on every real evaluation file.

use super::{Stage, StageCtx, StageOutput};
use crate::eval::baselines::{
    self, Answerer, GoldChain, MostFrequentLetter, RandomOption, TeacherAnswers, WordOverlap,
};
use crate::infra::results::{EVAL_SET, Row};
use anyhow::Result;
use medzero_envs::{Problem, loaders, render_chain};
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BaselinesStage {
    pub name: Option<String>,
}

impl Stage for BaselinesStage {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn validate(&self) -> Result<()> {
        Ok(())
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let teacher = ctx.services.teacher()?;
        let seed = ctx.run.seed;
        let mut sets: Vec<(String, Vec<Problem>, bool)> =
            vec![(EVAL_SET.into(), ctx.world.test.clone(), true)];
        for f in ctx.services.eval_files() {
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
                Box::new(RandomOption::new(seed)),
                Box::new(MostFrequentLetter::fit(&ctx.world.train)),
                Box::new(WordOverlap),
            ];
            if *synthetic {
                answerers.push(Box::new(TeacherAnswers(teacher.as_ref())));
                answerers.push(Box::new(GoldChain(ctx.truth)));
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
                    prm_auroc: None,
                    per_task: if *synthetic {
                        s.per_task
                    } else {
                        Default::default()
                    },
                    groups: Default::default(),
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
            .filter_map(|p| ctx.truth.gold_chain(p).ok())
            .map(|c| c.len() as f64)
            .collect();
        ctx.metrics.histogram("data/gold_chain_steps", 0, &lengths);
        if let Some(p) = ctx.world.test.first() {
            let chain = ctx
                .truth
                .gold_chain(p)
                .map(|s| render_chain(&s))
                .unwrap_or_default();
            ctx.metrics.text(
                "data/sample",
                0,
                &format!("{}\n\n{}", p.prompt_text(), chain),
            );
        }
        Ok(StageOutput { rows, model: None })
    }
}
