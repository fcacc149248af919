//! SynthClinic: a seeded clinical-reasoning world. A knowledge base of labs,
//! findings, layered mechanisms and diseases; MedQA-style cases that need
//! several hops to answer; a textbook with some facts withheld; gold chains
//! whose every step can be checked; and an oracle teacher. The same seed and
//! knobs give byte-identical output.

pub mod case;
pub mod chain;
pub mod corpus;
pub mod kb;
pub mod oracle;

pub use case::{Case, Task};
pub use kb::Kb;
pub use oracle::{Explanation, GroundTruth, Oracle, OracleConfig};

use crate::problem::Problem;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// The knobs of the world and of its questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    pub seed: u64,
    pub train: usize,
    pub test: usize,
    pub diseases: usize,
    /// Mechanisms per level.
    pub mechanisms: usize,
    /// Mechanism levels between findings and diseases (multi-hop depth).
    pub hops: usize,
    /// Lab analytes in the KB (at most 16).
    pub labs: usize,
    /// Symptoms and signs in the KB (at most 54).
    pub clinical_findings: usize,
    /// Typical (non-required) findings per disease.
    pub typical_findings: usize,
    /// Chance each typical finding is shown in a case ("findings shown").
    pub typical_shown: f64,
    /// Unrelated findings added to each case.
    pub noise_findings: usize,
    /// Normal lab values added to each case.
    pub normal_labs: usize,
    /// Options per question (2 to 8).
    pub options: usize,
    /// Chance a distractor shares findings with the answer.
    pub distractor_similarity: f64,
    /// Share of KB facts left out of the textbook.
    pub withheld_fraction: f64,
    /// Phrasings of each fact in the textbook (1 to 3).
    pub corpus_phrasings: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            train: 600,
            test: 200,
            diseases: 24,
            mechanisms: 24,
            hops: 1,
            labs: 10,
            clinical_findings: 30,
            typical_findings: 2,
            typical_shown: 0.5,
            noise_findings: 2,
            normal_labs: 1,
            options: 4,
            distractor_similarity: 0.75,
            withheld_fraction: 0.2,
            corpus_phrasings: 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("synthclinic: {0}")]
    Invalid(String),
    #[error("synthclinic: writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl SynthConfig {
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |m: String| Err(SynthError::Invalid(m));
        let frac = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                bad(format!("{name} must be in [0, 1], got {v}"))
            }
        };
        frac("typical_shown", self.typical_shown)?;
        frac("distractor_similarity", self.distractor_similarity)?;
        frac("withheld_fraction", self.withheld_fraction)?;
        if !(1..=3).contains(&self.hops) {
            return bad(format!("hops must be 1, 2 or 3, got {}", self.hops));
        }
        if !(2..=8).contains(&self.options) {
            return bad(format!(
                "options must be between 2 and 8, got {}",
                self.options
            ));
        }
        if !(1..=16).contains(&self.labs) {
            return bad(format!("labs must be between 1 and 16, got {}", self.labs));
        }
        if !(4..=54).contains(&self.clinical_findings) {
            return bad(format!(
                "clinical_findings must be between 4 and 54, got {}",
                self.clinical_findings
            ));
        }
        if !(1..=3).contains(&self.corpus_phrasings) {
            return bad(format!(
                "corpus_phrasings must be 1, 2 or 3, got {}",
                self.corpus_phrasings
            ));
        }
        if self.diseases < self.options * 2 {
            return bad(format!(
                "diseases ({}) must be at least twice options ({}) so distractors can be drawn",
                self.diseases, self.options
            ));
        }
        let n_findings = self.clinical_findings + 2 * self.labs;
        let max_pairs = |n: usize| n * n.saturating_sub(1) / 2;
        let max_mech = max_pairs(n_findings).min(296 / self.hops);
        if self.mechanisms < 2 || self.mechanisms > max_mech {
            return bad(format!(
                "mechanisms must be between 2 and {max_mech} with hops = {}",
                self.hops
            ));
        }
        if self.diseases > max_pairs(self.mechanisms) || self.diseases > 720 {
            return bad(format!(
                "diseases ({}) exceed what {} top-level mechanisms can pair into (at most {})",
                self.diseases,
                self.mechanisms,
                max_pairs(self.mechanisms).min(720)
            ));
        }
        if self.train + self.test == 0 {
            return bad("train + test must be positive".into());
        }
        Ok(())
    }
}

/// A generated world with its questions and textbook.
#[derive(Debug, Clone)]
pub struct SynthClinic {
    pub config: SynthConfig,
    pub kb: Kb,
    pub train: Vec<Problem>,
    pub test: Vec<Problem>,
    pub textbook: Vec<String>,
    /// Fact ids left out of the textbook.
    pub withheld: Vec<String>,
}

impl SynthClinic {
    pub fn generate(config: &SynthConfig) -> Result<Self, SynthError> {
        config.validate()?;
        // Separate streams per part, so adding a test item never changes the KB.
        let stream = |k: u64| {
            let mut r = ChaCha8Rng::seed_from_u64(config.seed);
            r.set_stream(k);
            r
        };
        let kb = kb::generate(config, &mut stream(1)).map_err(SynthError::Invalid)?;
        let mut rng = stream(2);
        let mut seen = BTreeSet::new();
        let mut problems = Vec::with_capacity(config.train + config.test);
        let mut attempts = 0usize;
        while problems.len() < config.train + config.test {
            attempts += 1;
            if attempts > 50 * (config.train + config.test) + 1000 {
                return Err(SynthError::Invalid(format!(
                    "could only make {} distinct questions; raise diseases, noise_findings or typical_findings",
                    problems.len()
                )));
            }
            let split = if problems.len() < config.train {
                "train"
            } else {
                "test"
            };
            let idx = if split == "train" {
                problems.len()
            } else {
                problems.len() - config.train
            };
            let p = case::generate(
                config,
                &kb,
                &mut rng,
                format!("synthclinic-{split}-{idx:05}"),
            );
            // Distinct questions, so no test item repeats a training item.
            if seen.insert(p.prompt_text()) {
                problems.push(p);
            }
        }
        let test = problems.split_off(config.train);
        let facts = corpus::facts(&kb);
        let mut rng = stream(3);
        let withheld = corpus::withheld(config, &facts, &mut rng);
        let textbook = corpus::textbook(config, &facts, &withheld, &mut rng);
        Ok(SynthClinic {
            config: config.clone(),
            kb,
            train: problems,
            test,
            textbook,
            withheld,
        })
    }

    pub fn oracle(&self, cfg: OracleConfig) -> Oracle {
        Oracle::new(std::sync::Arc::new(self.kb.clone()), cfg)
    }

    /// The world's noise-free truth (gold chains, step labels).
    pub fn truth(&self) -> GroundTruth {
        GroundTruth::new(std::sync::Arc::new(self.kb.clone()))
    }

    /// Writes `config.json`, `kb.json`, `train.jsonl`, `test.jsonl`,
    /// `textbook.txt` and `gold_chains.jsonl` (train, rendered steps) into `dir`.
    pub fn write_dir(&self, dir: &Path) -> Result<(), SynthError> {
        let write = |name: &str, body: String| -> Result<(), SynthError> {
            let path = dir.join(name);
            crate::atomic::write(&path, body.as_bytes()).map_err(|source| SynthError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        let pretty = |v: serde_json::Value| serde_json::to_string_pretty(&v).expect("json") + "\n";
        write(
            "config.json",
            pretty(serde_json::to_value(&self.config).expect("config serialises")),
        )?;
        write(
            "kb.json",
            pretty(serde_json::to_value(&self.kb).expect("kb serialises")),
        )?;
        let lines = |ps: &[Problem]| {
            ps.iter()
                .map(|p| serde_json::to_string(p).expect("problem serialises") + "\n")
                .collect::<String>()
        };
        write("train.jsonl", lines(&self.train))?;
        write("test.jsonl", lines(&self.test))?;
        write(
            "textbook.txt",
            self.textbook.iter().map(|l| format!("{l}\n")).collect(),
        )?;
        let truth = self.truth();
        let mut chains = String::new();
        for p in &self.train {
            let steps = truth
                .gold_chain(p)
                .expect("synthclinic problems carry a case");
            let row = serde_json::json!({"id": p.id, "chain": crate::render_chain(&steps)});
            chains.push_str(&(row.to_string() + "\n"));
        }
        write("gold_chains.jsonl", chains)
    }
}
