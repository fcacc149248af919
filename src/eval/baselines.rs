//! Reference points for every table: what answering without a model gets
//! (SynthClinic must keep these near chance, or it rewards shortcuts), and
//! what the teacher and its gold chains get (the ceiling).

use crate::teacher::Teacher;
use medzero_envs::synthclinic::GroundTruth;
use medzero_envs::{Gold, Problem, render_chain, verify};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// A way to answer a question without a policy.
pub trait Answerer {
    fn name(&self) -> String;
    /// The full response text (checked by the strict verifier).
    fn respond(&mut self, p: &Problem) -> String;
}

/// Always the letter most often gold in the training set.
pub struct MostFrequentLetter(String);

impl MostFrequentLetter {
    pub fn fit(train: &[Problem]) -> Self {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for p in train {
            if let Gold::Option(l) = &p.gold {
                *counts.entry(l).or_default() += 1;
            }
        }
        // Ties go to the earliest letter (BTreeMap order, max_by keeps the last max).
        let best = counts
            .iter()
            .rev()
            .max_by_key(|(_, n)| **n)
            .map(|(l, _)| l.to_string());
        MostFrequentLetter(best.unwrap_or_else(|| "A".into()))
    }
}

impl Answerer for MostFrequentLetter {
    fn name(&self) -> String {
        "most-frequent-letter".into()
    }
    fn respond(&mut self, _: &Problem) -> String {
        format!("The answer is {}.", self.0)
    }
}

/// The option sharing the most words with the question (first on ties).
pub struct WordOverlap;

fn words(s: &str) -> BTreeSet<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2)
        .map(str::to_lowercase)
        .collect()
}

impl Answerer for WordOverlap {
    fn name(&self) -> String {
        "word-overlap".into()
    }
    fn respond(&mut self, p: &Problem) -> String {
        let q = words(&p.question);
        let best = p
            .options
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| {
                (
                    words(&c.text).intersection(&q).count(),
                    std::cmp::Reverse(*i),
                )
            })
            .map(|(_, c)| c.letter.clone())
            .unwrap_or_default();
        format!("The answer is {best}.")
    }
}

/// A uniformly random option, seeded.
pub struct RandomOption(ChaCha8Rng);

impl RandomOption {
    pub fn new(seed: u64) -> Self {
        RandomOption(ChaCha8Rng::seed_from_u64(seed))
    }
}

impl Answerer for RandomOption {
    fn name(&self) -> String {
        "random-option".into()
    }
    fn respond(&mut self, p: &Problem) -> String {
        if p.options.is_empty() {
            return String::new();
        }
        let i = self.0.random_range(0..p.options.len());
        format!("The answer is {}.", p.options[i].letter)
    }
}

/// The configured teacher's answers (the oracle's are wrong on its noisy
/// items); a question it fails on counts as wrong.
pub struct TeacherAnswers<'a>(pub &'a dyn Teacher);

impl Answerer for TeacherAnswers<'_> {
    fn name(&self) -> String {
        "teacher".into()
    }
    fn respond(&mut self, p: &Problem) -> String {
        match self.0.answer(p) {
            Ok(text) => format!("The answer is {text}."),
            Err(_) => String::new(),
        }
    }
}

/// The world's gold chain, rendered as a student would write it.
pub struct GoldChain<'a>(pub &'a GroundTruth);

impl Answerer for GoldChain<'_> {
    fn name(&self) -> String {
        "gold-chain".into()
    }
    fn respond(&mut self, p: &Problem) -> String {
        self.0
            .gold_chain(p)
            .map(|s| render_chain(&s))
            .unwrap_or_default()
    }
}

/// Accuracy overall and per task type under the strict verifier.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Score {
    pub accuracy: f64,
    pub n: usize,
    pub per_task: BTreeMap<String, f64>,
}

pub fn score(answerer: &mut dyn Answerer, problems: &[Problem]) -> Score {
    let mut by_task: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut hits = 0;
    for p in problems {
        let ok = verify::verify(p, &answerer.respond(p)).correct;
        hits += ok as usize;
        let e = by_task.entry(p.task.clone()).or_default();
        e.0 += ok as usize;
        e.1 += 1;
    }
    Score {
        accuracy: hits as f64 / problems.len().max(1) as f64,
        n: problems.len(),
        per_task: by_task
            .into_iter()
            .map(|(t, (h, n))| (t, h as f64 / n as f64))
            .collect(),
    }
}
