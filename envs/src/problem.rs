//! Core records shared by every crate: what a question is, what a reasoning
//! step is, and what an attempt at a question produced.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One answer option, e.g. `B. Ceftriaxone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    pub letter: String,
    pub text: String,
}

/// The gold answer: an option letter for multiple choice, or free text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gold {
    Option(String),
    Text(String),
}

/// A question to be answered, from any source (SynthClinic or a loader).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub id: String,
    /// The stem, without the options.
    pub question: String,
    /// Ordered options; empty for free-text questions.
    #[serde(default)]
    pub options: Vec<Choice>,
    pub gold: Gold,
    /// Task type: `diagnosis` / `next_test` / `treatment` for SynthClinic,
    /// the release's `eval.type` (e.g. `step1`, `Physiology`) for real data.
    #[serde(default)]
    pub task: String,
    /// Where it came from (`synthclinic`, `MedQA.json`, ...).
    #[serde(default)]
    pub source: String,
    /// Anything else the source carries (SynthClinic: the hidden case).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl Problem {
    /// The question as a model sees it: stem, then one `LETTER. text` line per option.
    pub fn prompt_text(&self) -> String {
        let mut s = self.question.clone();
        for c in &self.options {
            s.push('\n');
            s.push_str(&c.letter);
            s.push_str(". ");
            s.push_str(&c.text);
        }
        s
    }

    pub fn option(&self, letter: &str) -> Option<&Choice> {
        self.options.iter().find(|c| c.letter == letter)
    }

    /// The gold answer's text: the option's text for a letter, else the text.
    pub fn gold_text(&self) -> Option<&str> {
        match &self.gold {
            Gold::Option(l) => self.option(l).map(|c| c.text.as_str()),
            Gold::Text(t) => Some(t),
        }
    }
}

/// MedS3's step actions. A step containing "The answer is" finishes a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Reason,
    Finish,
    Reflect,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub text: String,
    pub kind: StepKind,
}

impl Step {
    /// Classifies by MedS3's rule: "The answer is" makes a Finish step.
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let kind = if text.starts_with("But wait") {
            StepKind::Reflect
        } else if crate::verify::extract_answer(&text).is_some() {
            StepKind::Finish
        } else {
            StepKind::Reason
        };
        Step { text, kind }
    }
}

/// Renders steps in MedS3's format: "Step k: ..." joined by blank lines.
pub fn render_chain(steps: &[Step]) -> String {
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| format!("Step {}: {}", i + 1, s.text))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Step 0 of every reasoning chain in MedS3's format: the sentence a chain
/// opens with, and the root of its search trees.
pub const ROOT_TEXT: &str = "Let's break down this problem step by step.";

/// A chain as the student writes it: [`ROOT_TEXT`], then the steps as
/// [`render_chain`] writes them (the root alone for no steps).
pub fn chain_text(steps: &[Step]) -> String {
    if steps.is_empty() {
        ROOT_TEXT.to_string()
    } else {
        format!("{ROOT_TEXT}\n\n{}", render_chain(steps))
    }
}

/// The step texts of a response the student wrote, after its root sentence.
pub fn response_steps(text: &str) -> Vec<String> {
    let body = text.trim_start().strip_prefix(ROOT_TEXT).unwrap_or(text);
    parse_chain(body).into_iter().map(|s| s.text).collect()
}

/// Splits a response into steps at lines starting "Step k:" (the inverse of
/// [`render_chain`]); a response without such lines is one step.
pub fn parse_chain(text: &str) -> Vec<Step> {
    let mut steps: Vec<String> = Vec::new();
    for line in text.lines() {
        match strip_step_marker(line) {
            Some(rest) => steps.push(rest.to_string()),
            None => match steps.last_mut() {
                Some(s) => {
                    s.push('\n');
                    s.push_str(line);
                }
                None => steps.push(line.to_string()),
            },
        }
    }
    steps
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .map(Step::new)
        .collect()
}

/// The text after a leading "Step k:" marker.
fn strip_step_marker(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("Step ")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    rest[digits..].strip_prefix(':')
}

/// Who made a trajectory and how.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Provenance {
    /// `actor-3`, `teacher:oracle`, `mcts`, ...
    pub producer: String,
    /// Pipeline stage that produced it.
    #[serde(default)]
    pub stage: String,
    /// Whether the producer saw the gold answer (REFERENCE 3: say so).
    #[serde(default)]
    pub saw_gold: bool,
}

/// One attempt at a problem, as it flows from actors to the learner and to disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// Unique within a stage; used to drop duplicates on resume.
    pub id: String,
    pub problem_id: String,
    pub steps: Vec<Step>,
    /// The answer extracted from the last step, if any.
    pub answer: Option<String>,
    pub reward: f32,
    /// Per-step values (MCTS values, PRM scores); empty when not computed.
    #[serde(default)]
    pub values: Vec<f32>,
    /// The advantage of each of `tokens`, for policy-gradient stages:
    /// computed from the completion's group when it was drawn (one value
    /// repeated for an outcome advantage, per step for a process one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advantages: Vec<f32>,
    pub policy_version: u64,
    pub provenance: Provenance,
    /// The generated completion's token ids, when a policy made it: learners
    /// train on exactly these rather than on a re-tokenisation of the text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<i64>,
    /// Each of `tokens`' log-probability under the policy that sampled it
    /// (the behaviour policy of importance weighting).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<f32>,
    /// What a particular rollout records beyond the chain (an MCTS tree's
    /// pos/neg leaves, a teacher's correction...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub meta: serde_json::Value,
}
