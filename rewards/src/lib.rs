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

/// 1 when the chain's final answer verifies strictly against the gold, else
/// 0. The final answer is read from the whole chain, as evaluation and the
/// judge read a reply, so a chain is right for RFT exactly when it is right
/// in the results table.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleVerifier;

impl Reward for RuleVerifier {
    fn name(&self) -> &str {
        "rule"
    }
    fn score(&self, problem: &Problem, steps: &[Step]) -> f32 {
        let text = medzero_envs::render_chain(steps);
        if verify::verify(problem, &text).correct {
            1.0
        } else {
            0.0
        }
    }
}
