//! MedCritical's self-correction pairs (arXiv 2509.23368): the student answers a
//! training question N times; each wrong attempt becomes the rejected side of
//! a DPO pair whose chosen side corrects it. The corrector is the student
//! itself ("plays against itself": step labels point at the first wrong
//! step, the student re-samples from the sound prefix until it reaches the
//! verified answer by steps labelled sound) or the teacher (its correction
//! keeps the sound prefix and writes the rest). Runs as a rollout of the
//! actor runtime.

use super::sampling::{Sampler, SamplingConfig};
use crate::runtime::{Rolled, Rollout};
use crate::teacher::Teacher;
use anyhow::{Result, bail};
use medzero_envs::{Problem, Step, Trajectory, chain_text, render_chain, response_steps, verify};
use medzero_policies::Policy;
use medzero_policies::tokenizer::PromptTemplate;
use medzero_rewards::{RuleVerifier, StepLabeller};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Corrector {
    /// The fine-tuned student re-samples from the sound prefix.
    #[serde(rename = "self")]
    Student,
    /// The teacher rewrites from the first wrong step.
    Teacher,
}

/// Samples N attempts and writes a [`Correction`] of each wrong one into its
/// trajectory's `meta`.
pub struct SelfCorrection<'a> {
    pub sampling: SamplingConfig,
    pub template: PromptTemplate,
    /// Which steps of an attempt are sound (the world's truth, or a PRM).
    pub labeller: &'a (dyn StepLabeller + Sync),
    pub corrector: Corrector,
    /// The teacher that corrects when `corrector` is `Teacher`.
    pub teacher: Option<&'a dyn Teacher>,
    /// Continuations the student samples from a sound prefix.
    pub retries: usize,
}

impl SelfCorrection<'_> {
    fn labels(&self, problem: &Problem, steps: &[Step]) -> Result<Vec<bool>> {
        match self.labeller.label_steps(problem, steps) {
            Some(l) => Ok(l),
            None => bail!("{}: no step labels for this question", problem.id),
        }
    }

    /// A correction of the wrong attempt `text`, if the corrector finds one:
    /// its text, and the ids the student sampled (the sound prefix as the
    /// model read it, then its continuation) when it wrote it.
    fn correct(
        &self,
        policy: &Policy,
        problem: &Problem,
        prompt: &[i64],
        text: &str,
        rng: &mut ChaCha8Rng,
    ) -> Result<Option<(String, Option<Vec<i64>>)>> {
        let steps: Vec<Step> = response_steps(text).into_iter().map(Step::new).collect();
        match self.corrector {
            Corrector::Teacher => {
                let Some(teacher) = self.teacher else {
                    bail!("corrector = \"teacher\" needs a teacher");
                };
                match teacher.correct(problem, &steps) {
                    Ok(fixed) => Ok(Some((chain_text(&fixed), None))),
                    Err(e) if e.is_malformed() => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Corrector::Student => {
                let labels = self.labels(problem, &steps)?;
                let keep = labels.iter().position(|ok| !ok).unwrap_or(steps.len());
                let sound: Vec<Step> = steps[..keep]
                    .iter()
                    .filter(|s| s.kind != medzero_envs::StepKind::Finish)
                    .cloned()
                    .collect();
                let prefix = format!("{}\n\nStep {}:", chain_text(&sound), sound.len() + 1);
                let prefix_ids = policy.tokenizer.encode(&prefix)?;
                let mut context = prompt.to_vec();
                context.extend(&prefix_ids);
                let mut params = self
                    .sampling
                    .params(policy.tokenizer.end_of_turn_id(&self.template));
                // The retry continues a long prefix: it gets what room the
                // context has left, and none is no retry.
                let room = policy.config().max_position_embeddings as usize;
                params.max_new_tokens = params
                    .max_new_tokens
                    .min(room.saturating_sub(context.len()));
                if params.max_new_tokens == 0 {
                    return Ok(None);
                }
                for g in policy.sample_n(&context, self.retries, &params, rng)? {
                    let mut ids = prefix_ids.clone();
                    ids.extend(g.tokens.iter().filter(|&&t| t != params.stop_token_ids[0]));
                    let full = policy.tokenizer.decode(&ids)?;
                    let body: Vec<Step> =
                        response_steps(&full).into_iter().map(Step::new).collect();
                    // A right answer reached through a wrong step is no
                    // correction: the chosen side must be sound throughout.
                    let verified = body
                        .last()
                        .is_some_and(|last| verify::verify(problem, &last.text).correct);
                    if verified && self.labels(problem, &body)?.iter().all(|&ok| ok) {
                        return Ok(Some((full, Some(ids))));
                    }
                }
                Ok(None)
            }
        }
    }
}

impl Rollout for SelfCorrection<'_> {
    fn ids(&self, problem: &Problem) -> Vec<String> {
        self.sampler().ids(problem)
    }

    fn rollout(&self, policy: &Policy, problem: &Problem, rng: &mut ChaCha8Rng) -> Result<Rolled> {
        let mut rolled = self.sampler().rollout(policy, problem, rng)?;
        let prompt = policy
            .tokenizer
            .encode(&self.template.render(&problem.prompt_text()))?;
        for t in &mut rolled.trajectories {
            let text = attempt_text(policy, t)?;
            let (correction, correction_ids) = if t.reward < 1.0 {
                self.correct(policy, problem, &prompt, &text, rng)?
                    .map_or((None, None), |(c, ids)| (Some(c), ids))
            } else {
                (None, None)
            };
            t.meta = serde_json::to_value(Correction {
                text,
                correction,
                correction_ids,
                corrected_by: self.corrector,
            })?;
        }
        Ok(rolled)
    }
}

/// What a self-correction rollout records with each attempt (its `meta`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Correction {
    /// The attempt as text (its ids are the trajectory's `tokens`).
    pub text: String,
    /// The corrected chain, for a wrong attempt the corrector could fix.
    pub correction: Option<String>,
    /// The ids the student sampled for it (none for a teacher's text).
    #[serde(default)]
    pub correction_ids: Option<Vec<i64>>,
    pub corrected_by: Corrector,
}

impl Correction {
    pub fn of(t: &Trajectory) -> Result<Correction> {
        serde_json::from_value(t.meta.clone()).map_err(|e| {
            anyhow::anyhow!("trajectory {} holds no self-correction record: {e}", t.id)
        })
    }
}

impl SelfCorrection<'_> {
    fn sampler(&self) -> Sampler<RuleVerifier> {
        Sampler {
            cfg: self.sampling.clone(),
            template: self.template.clone(),
            reward: RuleVerifier,
        }
    }
}

/// The ids of a sampled attempt without its end of turn (and any EOS or
/// padding), or `None` for a trajectory that holds text only.
pub fn attempt_ids(policy: &Policy, t: &Trajectory) -> Option<Vec<i64>> {
    if t.tokens.is_empty() {
        return None;
    }
    let tok = &policy.tokenizer;
    let specials = [
        tok.eos_id(),
        tok.pad_id(),
        tok.token_id("<|im_end|>").unwrap_or(-1),
    ];
    Some(
        t.tokens
            .iter()
            .copied()
            .filter(|id| !specials.contains(id))
            .collect(),
    )
}

/// The text of a sampled attempt: its ids ([`attempt_ids`]) decoded.
pub fn attempt_text(policy: &Policy, t: &Trajectory) -> Result<String> {
    match attempt_ids(policy, t) {
        Some(ids) => Ok(policy.tokenizer.decode(&ids)?),
        None => Ok(render_chain(&t.steps)),
    }
}
