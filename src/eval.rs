//! Evaluation of a policy on a problem set with the strict verifier: greedy
//! accuracy, mean accuracy of N samples, and self-consistency (vote-sc@N).

use anyhow::Result;
use medzero_envs::{Problem, verify};
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, SamplingParams};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Samples per question for vote-sc@N and sampled accuracy (0: greedy only).
    pub samples: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Questions scored (0: all).
    pub limit: usize,
    /// Prompts per generation batch.
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            samples: 0,
            temperature: 0.7,
            top_p: 0.95,
            max_new_tokens: 48,
            limit: 0,
            batch_size: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub n: usize,
    pub greedy_accuracy: f64,
    /// Mean accuracy of single samples (when samples > 0).
    pub sample_accuracy: Option<f64>,
    /// `vote-sc@N` and any other selection rule, by name.
    pub selection_accuracy: BTreeMap<String, f64>,
    pub per_task: BTreeMap<String, f64>,
    /// Tokens generated (greedy and samples).
    pub generated_tokens: u64,
}

/// Majority vote over the options the responses resolve to; ties go to the
/// answer seen first (MedS3's `Counter.most_common` order). Unresolvable
/// responses do not vote.
pub fn vote(problem: &Problem, responses: &[String]) -> Option<String> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for r in responses {
        let Some(choice) = verify::verify(problem, r).chosen else {
            continue;
        };
        match counts.iter_mut().find(|(c, _)| *c == choice) {
            Some(e) => e.1 += 1,
            None => counts.push((choice, 1)),
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(c, _)| c)
}

pub fn evaluate(
    policy: &Policy,
    problems: &[Problem],
    template: PromptTemplate,
    cfg: &EvalConfig,
    rng: &mut ChaCha8Rng,
) -> Result<EvalReport> {
    let problems = if cfg.limit > 0 && cfg.limit < problems.len() {
        &problems[..cfg.limit]
    } else {
        problems
    };
    let stop_token_ids = vec![policy.tokenizer.end_of_turn_id(template)];
    let greedy = SamplingParams {
        max_new_tokens: cfg.max_new_tokens,
        stop_token_ids: stop_token_ids.clone(),
        ..SamplingParams::greedy(0)
    };
    let sampled = SamplingParams {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        stop_token_ids,
        ..SamplingParams::default()
    };
    let mut hits = 0usize;
    let mut sample_hits = 0usize;
    let mut vote_hits = 0usize;
    let mut tokens = 0u64;
    let mut by_task: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for chunk in problems.chunks(cfg.batch_size.max(1)) {
        let prompts: Vec<Vec<i64>> = chunk
            .iter()
            .map(|p| policy.tokenizer.encode(&template.render(&p.prompt_text())))
            .collect::<Result<_, _>>()?;
        let outs = policy.generate(&prompts, &greedy, rng)?;
        for (p, g) in chunk.iter().zip(&outs) {
            tokens += g.tokens.len() as u64;
            let ok = verify::verify(p, &g.text).correct;
            hits += ok as usize;
            let e = by_task.entry(p.task.clone()).or_default();
            e.0 += ok as usize;
            e.1 += 1;
        }
        if cfg.samples > 0 {
            // All N samples of a prompt share its prefill through a forked cache.
            for (p, prompt) in chunk.iter().zip(&prompts) {
                let outs = policy.sample_n(prompt, cfg.samples, &sampled, rng)?;
                let texts: Vec<String> = outs.iter().map(|g| g.text.clone()).collect();
                tokens += outs.iter().map(|g| g.tokens.len() as u64).sum::<u64>();
                sample_hits += texts
                    .iter()
                    .filter(|t| verify::verify(p, t).correct)
                    .count();
                let winner = vote(p, &texts);
                vote_hits += (winner.as_deref() == gold_letter(p)) as usize;
            }
        }
    }
    let n = problems.len().max(1) as f64;
    let mut selection_accuracy = BTreeMap::new();
    if cfg.samples > 0 {
        selection_accuracy.insert(format!("vote-sc@{}", cfg.samples), vote_hits as f64 / n);
    }
    Ok(EvalReport {
        n: problems.len(),
        greedy_accuracy: hits as f64 / n,
        sample_accuracy: (cfg.samples > 0).then(|| sample_hits as f64 / (n * cfg.samples as f64)),
        selection_accuracy,
        per_task: by_task
            .into_iter()
            .map(|(t, (h, c))| (t, h as f64 / c as f64))
            .collect(),
        generated_tokens: tokens,
    })
}

fn gold_letter(p: &Problem) -> Option<&str> {
    match &p.gold {
        medzero_envs::Gold::Option(l) => Some(l),
        medzero_envs::Gold::Text(_) => None,
    }
}
