//! medzero-rewards: what a trajectory is worth. The trait is the boundary the
//! runtime scores through; the rule verifier is the default for option
//! questions (strict matching, REFERENCE 1).

use medzero_envs::{Problem, verify};

/// Scores a finished response to a problem, as the student wrote it (a
/// reward that reads steps parses them itself).
pub trait Reward: Send + Sync {
    fn name(&self) -> &str;
    fn score(&self, problem: &Problem, response: &str) -> f32;
}

/// A reward chosen at run time (the rule verifier or a judge) behind a box.
impl<R: Reward + ?Sized> Reward for Box<R> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn score(&self, problem: &Problem, response: &str) -> f32 {
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
    fn score(&self, problem: &Problem, response: &str) -> f32 {
        if verify::verify(problem, response).correct {
            1.0
        } else {
            0.0
        }
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
            assert_eq!(RuleVerifier.score(&p, response), want, "{response:?}");
        }
    }
}
