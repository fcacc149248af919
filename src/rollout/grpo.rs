//! GRPO's actor side: G samples of a problem form its group, and each
//! completion's advantage is its reward against the group's (arXiv
//! 2402.03300), computed where the whole group is at hand, so a learner
//! batch that splits a group still trains each completion on its own
//! group's baseline.

use super::sampling::Sampler;
use crate::runtime::actor::{Rolled, Rollout};
use anyhow::Result;
use medzero_envs::Problem;
use medzero_policies::Policy;
use medzero_rewards::Reward;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How a group's rewards become advantages (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// (r − mean) / (std + 1e-4), std with Bessel's correction, as TRL.
    #[default]
    Group,
    /// r − mean (Dr. GRPO, arXiv 2503.20783: no per-question difficulty bias).
    None,
}

/// Each reward against its group's: `rewards` is one group.
pub fn advantages(rewards: &[f32], scale: ScaleRewards) -> Vec<f32> {
    let g = rewards.len();
    if g == 0 {
        return Vec::new();
    }
    let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / g as f64;
    let denom = match scale {
        ScaleRewards::None => 1.0,
        ScaleRewards::Group => {
            let var = rewards
                .iter()
                .map(|&r| (r as f64 - mean).powi(2))
                .sum::<f64>()
                / (g.max(2) - 1) as f64;
            var.sqrt() + 1e-4
        }
    };
    rewards
        .iter()
        .map(|&r| ((r as f64 - mean) / denom) as f32)
        .collect()
}

/// [`Sampler`]'s G samples of a problem, each with its group advantage.
pub struct GroupSampler<R: Reward> {
    pub sampler: Sampler<R>,
    pub scale: ScaleRewards,
}

impl<R: Reward> Rollout for GroupSampler<R> {
    fn ids(&self, problem: &Problem) -> Vec<String> {
        self.sampler.ids(problem)
    }

    fn rollout(&self, policy: &Policy, problem: &Problem, rng: &mut ChaCha8Rng) -> Result<Rolled> {
        let mut rolled = self.sampler.rollout(policy, problem, rng)?;
        let rewards: Vec<f32> = rolled.trajectories.iter().map(|t| t.reward).collect();
        for (t, a) in rolled
            .trajectories
            .iter_mut()
            .zip(advantages(&rewards, self.scale))
        {
            t.advantage = Some(a);
        }
        Ok(rolled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_trl_group_scaled() {
        // TRL: mean 0.5, Bessel std sqrt(1/3), epsilon 1e-4 on the std.
        let a = advantages(&[1.0, 0.0, 1.0, 0.0], ScaleRewards::Group);
        let want = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
        assert!((a[0] as f64 - want).abs() < 1e-6 && (a[1] as f64 + want).abs() < 1e-6);
        assert_eq!(advantages(&[1.0, 1.0], ScaleRewards::Group), vec![0.0, 0.0]);
        assert_eq!(advantages(&[1.0, 0.0], ScaleRewards::None), vec![0.5, -0.5]);
    }
}
