//! Evaluation of a policy on a problem set with the strict verifier: greedy
//! accuracy, mean accuracy of N samples, and any selection rule over the N
//! samples (vote-sc@N, and with a PRM P-VS@N and the others).

pub mod baselines;
pub mod loglik;
pub mod selection;

use crate::infra::results::{EVAL_SET, Row};
use crate::teacher::{Teacher, Verdict};
use anyhow::{Result, bail};
use medzero_envs::{Problem, Step, response_steps, verify};
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, SamplingParams};
use medzero_rewards::{Prm, StepLabeller};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use selection::{Candidate, Rule};
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
    /// Rows per generation batch: prompts for greedy decoding, samples of
    /// one prompt (N larger than this is sampled in several batches, with
    /// the same results: each sample has its own random stream).
    pub batch_size: usize,
    /// Selection rules scored over the samples (`rule@N` in the table).
    pub rules: Vec<Rule>,
    /// Also have the teacher judge each greedy answer (LLM-as-judge,
    /// `judge_accuracy`); the strict rule verifier still gives the accuracy.
    pub judge: bool,
    /// Worked examples put before each question (few-shot prompting), as
    /// question text (with options) and answer.
    pub shots: Vec<(String, String)>,
}

impl EvalConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "eval.temperature must be a finite number >= 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("eval.top_p must be in (0, 1], got {}", self.top_p);
        }
        if self.max_new_tokens == 0 {
            bail!("eval.max_new_tokens must be at least 1 (no answer can be read from nothing)");
        }
        if self.batch_size == 0 {
            bail!("eval.batch_size must be at least 1");
        }
        if self.samples == 0 && self.rules.iter().any(|r| *r != Rule::VoteSc) {
            let rules: Vec<String> = self.rules.iter().map(|r| r.to_string()).collect();
            bail!(
                "selection rules {} need samples: set eval.samples (--n) above 0",
                rules.join(", ")
            );
        }
        Ok(())
    }
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
            rules: vec![Rule::VoteSc],
            judge: false,
            shots: Vec::new(),
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
    /// The PRM's step scores against ground-truth step labels, when both
    /// were available.
    pub prm_quality: Option<PrmQuality>,
    /// The judge's verdicts on the greedy answers, when one was asked.
    pub judge: Option<JudgeReport>,
    /// What the model answered to each question (greedy), in order.
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
}

/// One greedy answer, as a line of a predictions file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    pub prompt: String,
    pub response: String,
    /// The option letter the strict verifier read, if it read one.
    pub answer: Option<String>,
    pub gold: Option<String>,
    pub correct: bool,
}

impl EvalReport {
    /// The report as `method`'s row of the results table (SynthClinic's test set).
    pub fn into_row(self, method: &str, training_tokens: u64, wall_s: f64) -> Row {
        Row {
            method: method.to_string(),
            eval_set: EVAL_SET.into(),
            greedy_accuracy: self.greedy_accuracy,
            selection_accuracy: self.selection_accuracy,
            judge_accuracy: self.judge.map(|j| j.accuracy),
            // Undefined (NaN) when the labels hold one class only.
            prm_auroc: self
                .prm_quality
                .as_ref()
                .map(|q| q.auroc)
                .filter(|a| a.is_finite()),
            per_task: self.per_task,
            groups: Default::default(),
            n: self.n,
            training_tokens,
            wall_s,
        }
    }
}

/// LLM-as-judge on the greedy answers, held against the strict verifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeReport {
    pub judge: String,
    /// Share judged correct (verdict 1); a failed judgement counts as wrong.
    pub accuracy: f64,
    /// Share where the verdict equals the strict verifier's.
    pub agreement: f64,
    /// Judgements that failed (a malformed reply).
    pub failures: usize,
}

/// What besides the strict verifier scores an evaluation.
#[derive(Default, Clone, Copy)]
pub struct Graders<'a> {
    /// Scores sampled chains for the PRM selection rules.
    pub prm: Option<&'a Prm>,
    /// Ground-truth step labels, to measure the PRM against.
    pub labeller: Option<&'a dyn StepLabeller>,
    /// The teacher that judges greedy answers when `EvalConfig::judge`.
    pub judge: Option<&'a dyn Teacher>,
}

/// How well PRM scores separate correct from wrong steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrmQuality {
    /// Steps scored.
    pub steps: usize,
    /// Share of them labelled correct.
    pub correct_frac: f64,
    /// Score >= 0.5 agrees with the label.
    pub accuracy: f64,
    /// Probability that a correct step outscores a wrong one (ties count half).
    pub auroc: f64,
}

impl PrmQuality {
    pub fn from_pairs(pairs: &[(f64, bool)]) -> Option<PrmQuality> {
        if pairs.is_empty() {
            return None;
        }
        let n = pairs.len() as f64;
        let pos = pairs.iter().filter(|p| p.1).count();
        let accuracy = pairs.iter().filter(|(s, l)| (*s >= 0.5) == *l).count() as f64 / n;
        Some(PrmQuality {
            steps: pairs.len(),
            correct_frac: pos as f64 / n,
            accuracy,
            auroc: auroc(pairs),
        })
    }
}

/// Mann-Whitney AUROC with average ranks for ties; NaN when one class is absent.
pub fn auroc(pairs: &[(f64, bool)]) -> f64 {
    let mut sorted: Vec<(f64, bool)> = pairs.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        // Ranks i+1..=j share their average.
        let avg = (i + 1 + j) as f64 / 2.0;
        rank_sum += avg * sorted[i..j].iter().filter(|p| p.1).count() as f64;
        i = j;
    }
    let pos = sorted.iter().filter(|p| p.1).count() as f64;
    let neg = sorted.len() as f64 - pos;
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Scores `policy` on `problems`: greedy, and with `cfg.samples` samples per
/// question each selection rule of `cfg.rules` (those that need a PRM score
/// the samples' steps with `graders.prm`).
pub fn evaluate(
    policy: &Policy,
    problems: &[Problem],
    template: &PromptTemplate,
    cfg: &EvalConfig,
    graders: Graders,
    rng: &mut ChaCha8Rng,
) -> Result<EvalReport> {
    cfg.validate()?;
    let Graders {
        prm,
        labeller,
        judge,
    } = graders;
    let judge = match (cfg.judge, judge) {
        (true, None) => bail!("eval.judge needs a teacher to judge with"),
        (true, Some(j)) => Some(j),
        (false, _) => None,
    };
    let needs_prm: Vec<String> = cfg
        .rules
        .iter()
        .filter(|r| r.needs_prm())
        .map(|r| r.to_string())
        .collect();
    if cfg.samples > 0 && !needs_prm.is_empty() && prm.is_none() {
        bail!(
            "selection rules {} need a PRM: name a PRM stage in the eval stage's `prm` (or pass --prm DIR)",
            needs_prm.join(", ")
        );
    }
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
    let mut rule_hits = vec![0usize; cfg.rules.len()];
    let mut prm_pairs: Vec<(f64, bool)> = Vec::new();
    let mut tokens = 0u64;
    let mut by_task: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut predictions = Vec::with_capacity(problems.len());
    let (mut judged_ok, mut agree, mut judge_failures) = (0usize, 0usize, 0usize);
    for chunk in problems.chunks(cfg.batch_size.max(1)) {
        let texts: Vec<String> = chunk
            .iter()
            .map(|p| template.render_shots(&cfg.shots, &p.prompt_text()))
            .collect::<Result<_, _>>()?;
        let prompts: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| policy.tokenizer.encode(t))
            .collect::<Result<_, _>>()?;
        let outs = policy.generate(&prompts, &greedy, rng)?;
        // Judged concurrently: an HTTP judge has its own concurrency limit.
        let verdicts: Vec<Option<Verdict>> = match judge {
            Some(j) => chunk
                .par_iter()
                .zip(&outs)
                .map(|(p, g)| match j.judge(p, &g.text) {
                    Ok(v) => Ok(Some(v)),
                    Err(e) if e.is_malformed() => Ok(None),
                    Err(e) => Err(anyhow::Error::new(e).context(format!("judging {}", p.id))),
                })
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        for (i, (p, g)) in chunk.iter().zip(&outs).enumerate() {
            tokens += g.tokens.len() as u64;
            let v = verify::verify(p, &g.text);
            let ok = v.correct;
            hits += ok as usize;
            predictions.push(Prediction {
                id: p.id.clone(),
                prompt: texts[i].clone(),
                response: g.text.clone(),
                answer: v.chosen,
                gold: gold_letter(p).map(str::to_string),
                correct: ok,
            });
            let e = by_task.entry(p.task.clone()).or_default();
            e.0 += ok as usize;
            e.1 += 1;
            if judge.is_some() {
                let v = verdicts[i];
                judged_ok += (v == Some(Verdict::Correct)) as usize;
                agree += ((v == Some(Verdict::Correct)) == ok) as usize;
                judge_failures += v.is_none() as usize;
            }
        }
        if cfg.samples > 0 {
            // All N samples of a prompt share its prefill through a forked cache.
            for (p, prompt) in chunk.iter().zip(&prompts) {
                let outs =
                    policy.sample_n_batched(prompt, cfg.samples, cfg.batch_size, &sampled, rng)?;
                let texts: Vec<String> = outs.iter().map(|g| g.text.clone()).collect();
                tokens += outs.iter().map(|g| g.tokens.len() as u64).sum::<u64>();
                sample_hits += texts
                    .iter()
                    .filter(|t| verify::verify(p, t).correct)
                    .count();
                let scores = match prm {
                    Some(prm) if !needs_prm.is_empty() => {
                        let chains: Vec<Vec<String>> =
                            texts.iter().map(|t| response_steps(t)).collect();
                        let scores = prm.score(&template.render(&p.prompt_text()), &chains)?;
                        if let Some(labeller) = labeller {
                            for (chain, s) in chains.iter().zip(&scores) {
                                let steps: Vec<Step> =
                                    chain.iter().cloned().map(Step::new).collect();
                                if let Some(labels) = labeller.label_steps(p, &steps) {
                                    prm_pairs.extend(s.iter().copied().zip(labels));
                                }
                            }
                        }
                        scores
                    }
                    _ => vec![Vec::new(); texts.len()],
                };
                let candidates: Vec<Candidate> = texts
                    .iter()
                    .zip(scores)
                    .map(|(t, step_scores)| Candidate {
                        answer: verify::verify(p, t).chosen,
                        step_scores,
                    })
                    .collect();
                for (rule, hits) in cfg.rules.iter().zip(rule_hits.iter_mut()) {
                    let winner = selection::select(*rule, &candidates);
                    *hits += (winner.as_deref() == gold_letter(p)) as usize;
                }
            }
        }
    }
    let n = problems.len().max(1) as f64;
    let mut selection_accuracy = BTreeMap::new();
    if cfg.samples > 0 {
        for (rule, hits) in cfg.rules.iter().zip(&rule_hits) {
            selection_accuracy.insert(format!("{rule}@{}", cfg.samples), *hits as f64 / n);
        }
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
        prm_quality: PrmQuality::from_pairs(&prm_pairs),
        judge: judge.map(|j| JudgeReport {
            judge: j.name(),
            accuracy: judged_ok as f64 / n,
            agreement: agree as f64 / n,
            failures: judge_failures,
        }),
        predictions,
    })
}

/// The gold option letter of a multiple-choice question.
pub fn gold_letter(p: &Problem) -> Option<&str> {
    match &p.gold {
        medzero_envs::Gold::Option(l) => Some(l),
        medzero_envs::Gold::Text(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_counts_pairs_and_ties() {
        // Every correct step above every wrong one.
        assert_eq!(auroc(&[(0.9, true), (0.8, true), (0.1, false)]), 1.0);
        assert_eq!(auroc(&[(0.1, true), (0.9, false)]), 0.0);
        // One tie across classes counts half: pairs (0.5+, 0.5-) = 0.5, (0.9+, 0.5-) = 1.
        assert_eq!(auroc(&[(0.5, true), (0.9, true), (0.5, false)]), 0.75);
        assert!(auroc(&[(0.5, true)]).is_nan());
        let q = PrmQuality::from_pairs(&[(0.7, true), (0.4, false), (0.6, false), (0.2, true)])
            .unwrap();
        assert_eq!((q.steps, q.correct_frac, q.accuracy), (4, 0.5, 0.5));
        assert_eq!(q.auroc, 0.5);
    }
}
