//! The oracle teacher: a teacher that knows the KB. It answers with numbered
//! knowledge points (MedThink), screens items, labels every step of any chain
//! (ground truth for judging a PRM), finds a chain's first wrong step and
//! rewrites the chain from there. A noise knob makes it wrong on a fixed share
//! of items, as a real LLM teacher is.

use super::case::Case;
use super::chain::{Claim, chain_to, gold_chain, label_steps, parse_claim};
use super::corpus::facts_for;
use super::kb::Kb;
use crate::problem::{Problem, Step};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OracleConfig {
    /// Share of items on which the teacher is confidently wrong.
    pub noise: f64,
    /// Share of its wrong items the teacher's screening flags.
    pub screen_recall: f64,
    /// Share of its right items the screening flags anyway.
    pub screen_false_alarm: f64,
    pub seed: u64,
}

impl Default for OracleConfig {
    fn default() -> Self {
        OracleConfig {
            noise: 0.0,
            screen_recall: 0.8,
            screen_false_alarm: 0.05,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the oracle teacher only knows SynthClinic problems; `{0}` carries no SynthClinic case")]
pub struct NotSynthClinic(pub String);

/// MedThink's teacher reply: an answer and the knowledge behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub letter: String,
    pub knowledge: Vec<String>,
}

impl Explanation {
    /// The ShareGPT assistant turn: `Answer: <option text>` then numbered
    /// knowledge points (by text, not letter: a small student learns to
    /// copy a conclusion, not to bind it to a letter).
    pub fn render(&self, problem: &Problem) -> String {
        let text = problem
            .option(&self.letter)
            .map(|c| c.text.as_str())
            .unwrap_or("");
        let mut s = format!("Answer: {text}\n");
        for (i, k) in self.knowledge.iter().enumerate() {
            s.push_str(&format!("\n{}. {}", i + 1, k));
        }
        s
    }
}

#[derive(Debug, Clone)]
pub struct Oracle {
    kb: Arc<Kb>,
    cfg: OracleConfig,
}

/// SynthClinic's truth, free of any teacher's noise: the gold chain of each
/// question and the correctness of any step. What evaluation and
/// self-correction check against, whichever teacher a run uses.
#[derive(Debug, Clone)]
pub struct GroundTruth {
    kb: Arc<Kb>,
}

impl GroundTruth {
    pub fn new(kb: Arc<Kb>) -> Self {
        GroundTruth { kb }
    }

    fn case(&self, p: &Problem) -> Result<Case, NotSynthClinic> {
        Case::from_problem(p).ok_or_else(|| NotSynthClinic(p.id.clone()))
    }

    /// The correct chain.
    pub fn gold_chain(&self, p: &Problem) -> Result<Vec<Step>, NotSynthClinic> {
        Ok(gold_chain(&self.kb, &self.case(p)?, &p.question))
    }

    /// Whether each step is correct.
    pub fn label_steps(&self, p: &Problem, steps: &[Step]) -> Result<Vec<bool>, NotSynthClinic> {
        Ok(label_steps(&self.kb, &self.case(p)?, p, steps))
    }

    pub fn first_wrong_step(
        &self,
        p: &Problem,
        steps: &[Step],
    ) -> Result<Option<usize>, NotSynthClinic> {
        Ok(self.label_steps(p, steps)?.iter().position(|ok| !ok))
    }
}

/// A stable per-item coin in [0, 1) that does not depend on call order:
/// FNV-1a over the bytes, then splitmix64's finaliser, because FNV alone
/// leaves the high bits nearly equal for ids that differ in their last digit.
fn coin(seed: u64, salt: &str, id: &str) -> f64 {
    let mut h: u64 = 0xcbf29ce484222325 ^ seed;
    for b in salt.bytes().chain([0]).chain(id.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d049bb133111eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

impl Oracle {
    pub fn new(kb: Arc<Kb>, cfg: OracleConfig) -> Self {
        Oracle { kb, cfg }
    }

    pub fn kb(&self) -> &Kb {
        &self.kb
    }

    /// The truth this teacher's knowledge comes from (noise-free).
    pub fn truth(&self) -> GroundTruth {
        GroundTruth::new(self.kb.clone())
    }

    fn case(&self, p: &Problem) -> Result<Case, NotSynthClinic> {
        Case::from_problem(p).ok_or_else(|| NotSynthClinic(p.id.clone()))
    }

    /// Whether the teacher is wrong on this item (fixed per item and seed).
    pub fn is_noisy(&self, p: &Problem) -> bool {
        coin(self.cfg.seed, "noise", &p.id) < self.cfg.noise
    }

    /// The disease the teacher believes in: the truth, or on a noisy item the
    /// first distractor in a per-item order.
    fn believed(&self, p: &Problem, case: &Case) -> usize {
        if !self.is_noisy(p) {
            return case.disease;
        }
        let mut wrong: Vec<usize> = case
            .option_diseases
            .iter()
            .copied()
            .filter(|&d| d != case.disease)
            .collect();
        wrong.sort_by(|a, b| {
            coin(self.cfg.seed, &format!("pick{a}"), &p.id).total_cmp(&coin(
                self.cfg.seed,
                &format!("pick{b}"),
                &p.id,
            ))
        });
        wrong.first().copied().unwrap_or(case.disease)
    }

    fn letter_of(&self, p: &Problem, case: &Case, disease: usize) -> String {
        let i = case
            .option_diseases
            .iter()
            .position(|&d| d == disease)
            .unwrap_or(0);
        p.options[i].letter.clone()
    }

    pub fn explain(&self, p: &Problem) -> Result<Explanation, NotSynthClinic> {
        let case = self.case(p)?;
        let d = self.believed(p, &case);
        Ok(Explanation {
            letter: self.letter_of(p, &case, d),
            knowledge: facts_for(&self.kb, d, case.task),
        })
    }

    /// True to keep the item: false when the teacher doubts its own answer.
    pub fn screen(&self, p: &Problem) -> Result<bool, NotSynthClinic> {
        self.case(p)?;
        let flag = coin(self.cfg.seed, "screen", &p.id);
        let rate = if self.is_noisy(p) {
            self.cfg.screen_recall
        } else {
            self.cfg.screen_false_alarm
        };
        Ok(flag >= rate)
    }

    /// The chain the teacher writes: the gold chain, or on a noisy item the
    /// same readings and derivations with the believed distractor drawn
    /// from the true disease's mechanisms (a false step screening can catch)
    /// and everything after it following from that.
    pub fn chain(&self, p: &Problem) -> Result<Vec<Step>, NotSynthClinic> {
        let case = self.case(p)?;
        Ok(chain_to(
            &self.kb,
            &case,
            &p.question,
            self.believed(p, &case),
        ))
    }

    /// Keeps the chain up to its first wrong step and continues with the
    /// teacher's own chain, skipping steps already written (a lab already
    /// read, whatever value the chain copied for it). A chain with no wrong
    /// step but no answer is completed the same way.
    pub fn correct(&self, p: &Problem, steps: &[Step]) -> Result<Vec<Step>, NotSynthClinic> {
        let case = self.case(p)?;
        let labels = label_steps(&self.kb, &case, p, steps);
        let keep = labels.iter().position(|ok| !ok).unwrap_or(steps.len());
        let mut out: Vec<Step> = steps[..keep]
            .iter()
            .filter(|s| s.kind != crate::StepKind::Finish)
            .cloned()
            .collect();
        let teacher = chain_to(&self.kb, &case, &p.question, self.believed(p, &case));
        let lab = |text: &str| match parse_claim(&self.kb, text) {
            Some(Claim::Lab { lab, .. }) => Some(lab),
            _ => None,
        };
        for s in teacher {
            let written = out
                .iter()
                .any(|o| o.text == s.text || lab(&s.text).is_some_and(|l| lab(&o.text) == Some(l)));
            if !written {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// The judge's verdict (MedThink's release writes 1 = correct, 2 =
    /// wrong): whether `response` is right, inverted on the noisy items.
    pub fn judge(&self, p: &Problem, response: &str) -> bool {
        crate::verify::verify(p, response).correct ^ self.is_noisy(p)
    }
}
