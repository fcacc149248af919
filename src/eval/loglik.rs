//! Multiple-choice evaluation by option log-likelihood, as
//! lm-evaluation-harness scores its `multiple_choice` tasks: each option is
//! a continuation of the question's context; `acc` picks the option with
//! the highest summed log-probability, `acc_norm` the highest per character
//! of the option's text (lm-eval's `len(choice)`; its docs call it byte
//! length, which is the same for ASCII options).
//!
//! The context is the question with its options, then `Answer:`, rendered
//! with the model's template; the continuation is a space and the option's
//! text (`Choices::Text`) or its letter (`Choices::Letter`). Tokens are split
//! as lm-eval splits them: the context encoded alone, the continuation as
//! what `encode(context + continuation)` holds past it.

use anyhow::{Context, Result, bail};
use medzero_envs::Problem;
use medzero_policies::Policy;
use medzero_policies::tokenizer::PromptTemplate;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What each option's continuation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Choices {
    /// `" " + option text` (acc_norm differs from acc).
    Text,
    /// `" " + letter` (acc_norm equals acc).
    Letter,
}

/// One question's scores, as a line of a predictions file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoglikPrediction {
    pub id: String,
    pub prompt: String,
    /// Summed log-probability of each option's continuation, in option order.
    pub logliks: Vec<f64>,
    /// Each continuation's length in characters (acc_norm's divisor).
    pub lengths: Vec<usize>,
    /// Whether each continuation is the model's greedy continuation.
    pub is_greedy: Vec<bool>,
    pub answer: String,
    pub answer_norm: String,
    pub gold: String,
    pub correct: bool,
    pub correct_norm: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoglikReport {
    pub n: usize,
    pub acc: f64,
    pub acc_norm: f64,
    /// acc per task type (`eval.type`).
    pub per_task: BTreeMap<String, f64>,
    #[serde(skip)]
    pub predictions: Vec<LoglikPrediction>,
}

/// The context (prompt text) and the continuations of `p`'s options.
pub fn context_and_continuations(
    p: &Problem,
    template: &PromptTemplate,
    choices: Choices,
) -> (String, Vec<String>) {
    let context = template.render(&format!("{}\nAnswer:", p.prompt_text()));
    let continuations = p
        .options
        .iter()
        .map(|c| match choices {
            Choices::Text => format!(" {}", c.text),
            Choices::Letter => format!(" {}", c.letter),
        })
        .collect();
    (context, continuations)
}

/// Token ids of `context` alone and of each continuation after it, split as
/// lm-eval splits them.
pub fn encode_pairs(
    policy: &Policy,
    context: &str,
    continuations: &[String],
) -> Result<Vec<(Vec<i64>, Vec<i64>)>> {
    let ctx = policy.tokenizer.encode(context)?;
    continuations
        .iter()
        .map(|c| {
            let whole = policy.tokenizer.encode(&format!("{context}{c}"))?;
            if whole.len() <= ctx.len() {
                bail!("option {c:?} adds no token after the context");
            }
            Ok((ctx.clone(), whole[ctx.len()..].to_vec()))
        })
        .collect()
}

/// Summed log-probability of each continuation and whether it is greedy.
/// The context runs through the model once, its cached row shared by the
/// options (a test checks this equals scoring each full sequence).
pub fn option_logliks(
    policy: &Policy,
    context: &str,
    continuations: &[String],
) -> Result<Vec<(f64, bool)>> {
    let pairs = encode_pairs(policy, context, continuations)?;
    let ctx = pairs.first().map(|(c, _)| c.clone()).unwrap_or_default();
    let conts: Vec<Vec<i64>> = pairs.into_iter().map(|(_, k)| k).collect();
    Ok(policy
        .continuation_logprobs(&ctx, &conts)?
        .into_iter()
        .map(|(lp, greedy)| (lp.iter().sum(), greedy))
        .collect())
}

/// Scores `policy` on the multiple-choice `problems` (those without options
/// are an error: they have nothing to choose from).
pub fn evaluate(
    policy: &Policy,
    problems: &[Problem],
    template: &PromptTemplate,
    choices: Choices,
    mut progress: impl FnMut(usize),
) -> Result<LoglikReport> {
    let mut predictions = Vec::with_capacity(problems.len());
    let mut by_task: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in problems {
        if p.options.len() < 2 {
            bail!(
                "{}: question {} has {} options; mcq-loglik needs at least two",
                p.source,
                p.id,
                p.options.len()
            );
        }
        let Some(gold) = super::gold_letter(p) else {
            bail!("{}: question {} has no gold option letter", p.source, p.id);
        };
        let (context, continuations) = context_and_continuations(p, template, choices);
        let scored = option_logliks(policy, &context, &continuations)
            .with_context(|| format!("scoring the options of {}", p.id))?;
        let lengths: Vec<usize> = continuations
            .iter()
            .map(|c| c.trim_start_matches(' ').chars().count().max(1))
            .collect();
        let best = |score: &dyn Fn(usize) -> f64| {
            (0..scored.len())
                .max_by(|&a, &b| score(a).total_cmp(&score(b)).then(b.cmp(&a)))
                .expect("at least two options")
        };
        let pick = best(&|i| scored[i].0);
        let pick_norm = best(&|i| scored[i].0 / lengths[i] as f64);
        let answer = p.options[pick].letter.clone();
        let answer_norm = p.options[pick_norm].letter.clone();
        let correct = answer == gold;
        let correct_norm = answer_norm == gold;
        let e = by_task.entry(p.task.clone()).or_default();
        e.0 += correct as usize;
        e.1 += 1;
        predictions.push(LoglikPrediction {
            id: p.id.clone(),
            prompt: context,
            logliks: scored.iter().map(|s| s.0).collect(),
            lengths,
            is_greedy: scored.iter().map(|s| s.1).collect(),
            answer,
            answer_norm,
            gold: gold.to_string(),
            correct,
            correct_norm,
        });
        progress(1);
    }
    let n = predictions.len();
    let rate = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    Ok(LoglikReport {
        n,
        acc: rate(predictions.iter().filter(|p| p.correct).count()),
        acc_norm: rate(predictions.iter().filter(|p| p.correct_norm).count()),
        per_task: by_task
            .into_iter()
            .map(|(t, (k, m))| (t, k as f64 / m as f64))
            .collect(),
        predictions,
    })
}
