//! medzero-rewards: what a trajectory is worth. The trait is the boundary the
//! runtime scores through; the rule verifier is the default for option
//! questions (strict matching, REFERENCE 1).

use medzero_envs::{Problem, Step, verify};

/// Scores a finished chain of steps for a problem.
pub trait Reward: Send + Sync {
    fn name(&self) -> &str;
    fn score(&self, problem: &Problem, steps: &[Step]) -> f32;
}

/// A reward chosen at run time (the rule verifier or a judge) behind a box.
impl<R: Reward + ?Sized> Reward for Box<R> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn score(&self, problem: &Problem, steps: &[Step]) -> f32 {
        (**self).score(problem, steps)
    }
}

/// 1 when the last step's answer verifies strictly against the gold, else 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleVerifier;

impl Reward for RuleVerifier {
    fn name(&self) -> &str {
        "rule"
    }
    fn score(&self, problem: &Problem, steps: &[Step]) -> f32 {
        match steps.last() {
            Some(s) if verify::verify(problem, &s.text).correct => 1.0,
            _ => 0.0,
        }
    }
}
