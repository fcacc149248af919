//! medzero-rewards: what a chain is worth, and which of its steps are right.
//!
//! - [`Reward`]: scores a finished chain; fallible, because a judge can fail
//!   to answer, and a failure is counted by the caller, never a silent 0;
//! - [`RuleVerifier`]: strict answer verification, the default for option
//!   questions;
//! - [`StepLabeller`]: per-step correctness, from SynthClinic's noise-free
//!   ground truth or from a process reward model with a threshold;
//! - [`prm`]: the process reward model's scorer (step scores for P-VS and
//!   the other selection rules).

pub mod prm;

use medzero_envs::synthclinic::GroundTruth;
use medzero_envs::{Problem, Step, verify};

pub use prm::{Prm, PrmLabeller};

/// Why a reward gave no score.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// The grader answered, but not in the asked-for form: the item is
    /// skipped and counted.
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// The grader could not answer (a server down after its retries, a bad
    /// key): the stage stops.
    #[error("{0}")]
    Failed(String),
}

/// Scores a finished response to a problem, as the student wrote it (a
/// reward that reads steps parses them itself).
pub trait Reward: Send + Sync {
    fn name(&self) -> &str;
    fn score(&self, problem: &Problem, response: &str) -> Result<f32, RewardError>;
}

/// A reward chosen at run time (the rule verifier or a judge) behind a box.
impl<R: Reward + ?Sized> Reward for Box<R> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn score(&self, problem: &Problem, response: &str) -> Result<f32, RewardError> {
        (**self).score(problem, response)
    }
}

/// 1 when the response's final answer verifies strictly against the gold,
/// else 0: the response read as evaluation and the judge read it, so an
/// answer is right for RFT exactly when it is right in the results table.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleVerifier;

impl Reward for RuleVerifier {
    fn name(&self) -> &str {
        "rule"
    }
    fn score(&self, problem: &Problem, response: &str) -> Result<f32, RewardError> {
        Ok(if verify::verify(problem, response).correct {
            1.0
        } else {
            0.0
        })
    }
}

/// 1 when every step of the response is right by the world's step labels
/// (so its answer follows from its own derivation), else 0: acceptance by
/// process rather than by outcome, which refuses the chains that reach the
/// gold option by luck (about one in four wandering chains on four options).
#[derive(Debug, Clone)]
pub struct SoundVerifier(pub GroundTruth);

impl SoundVerifier {
    /// Whether `steps` is a non-empty chain whose every step is right.
    pub fn sound(&self, problem: &Problem, steps: &[Step]) -> Result<bool, RewardError> {
        let labels = self
            .0
            .label_steps(problem, steps)
            .map_err(|e| RewardError::Failed(e.to_string()))?;
        Ok(!labels.is_empty() && labels.iter().all(|&l| l))
    }
}

impl Reward for SoundVerifier {
    fn name(&self) -> &str {
        "sound"
    }
    fn score(&self, problem: &Problem, response: &str) -> Result<f32, RewardError> {
        let steps: Vec<Step> = medzero_envs::response_steps(response)
            .into_iter()
            .map(Step::new)
            .collect();
        Ok(if self.sound(problem, &steps)? {
            1.0
        } else {
            0.0
        })
    }
}

/// Which steps of a chain are right.
pub trait StepLabeller {
    /// One label per step, or `None` when this labeller cannot judge the
    /// problem (e.g. ground truth asked about a question of another world).
    fn label_steps(&self, problem: &Problem, steps: &[Step]) -> Option<Vec<bool>>;
}

impl StepLabeller for GroundTruth {
    fn label_steps(&self, problem: &Problem, steps: &[Step]) -> Option<Vec<bool>> {
        GroundTruth::label_steps(self, problem, steps).ok()
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use medzero_envs::{Choice, Gold};

    fn problem() -> Problem {
        Problem {
            id: "q".into(),
            question: "Which?".into(),
            options: ["Alpha fever", "Beta syndrome"]
                .iter()
                .zip(["A", "B"])
                .map(|(t, l)| Choice {
                    letter: l.into(),
                    text: t.to_string(),
                })
                .collect(),
            gold: Gold::Option("B".into()),
            task: String::new(),
            source: String::new(),
            metadata: Default::default(),
        }
    }

    /// The sound verifier accepts the gold chain and refuses the same right
    /// answer reached through a wrong step or with no reasoning at all, where
    /// the rule verifier accepts all three.
    #[test]
    fn sound_acceptance_refuses_right_answers_reached_by_luck() {
        use medzero_envs::synthclinic::{SynthClinic, SynthConfig};
        let world = SynthClinic::generate(&SynthConfig {
            train: 20,
            test: 0,
            ..Default::default()
        })
        .unwrap();
        let sound = SoundVerifier(world.truth());
        for p in &world.train {
            let gold = world.truth().gold_chain(p).unwrap();
            let text = medzero_envs::chain_text(&gold);
            assert_eq!(sound.score(p, &text).unwrap(), 1.0, "{text}");
            let answer = gold.last().unwrap().text.clone();
            let mut lucky = gold.clone();
            lucky[0] = Step::new(lucky[0].text.replace(" is ", " is not "));
            let lucky = medzero_envs::chain_text(&lucky);
            for (text, what) in [(lucky, "a wrong first step"), (answer, "no steps")] {
                assert_eq!(RuleVerifier.score(p, &text).unwrap(), 1.0, "{what}");
                assert_eq!(sound.score(p, &text).unwrap(), 0.0, "{what}: {text}");
            }
        }
    }

    #[test]
    fn the_rule_reads_every_answer_format_the_students_write() {
        let p = problem();
        for (response, want) in [
            // MedS3's chains.
            (
                "Let's go.\n\nStep 1: x.\n\nStep 2: The answer is Beta syndrome.",
                1.0,
            ),
            ("Step 1: The answer is Alpha fever.", 0.0),
            // MedThink's explanations: the answer on a line of its own.
            ("Answer: Beta syndrome\n\n1. a fact.\n2. another.", 1.0),
            ("Answer: Alpha fever\n\n1. a fact.", 0.0),
            // An answer in an earlier step is the chain's answer.
            ("Step 1: The answer is Beta syndrome.\n\nStep 2: so.", 1.0),
            ("no answer at all", 0.0),
        ] {
            assert_eq!(
                RuleVerifier.score(&p, response).unwrap(),
                want,
                "{response:?}"
            );
        }
    }
}
