//! The process reward model as a scorer: a policy folder saved with its
//! 2-class head (MedS3's PRM), giving P(correct) at the end of each step of
//! a chain. The step boundaries are found by encoding each prefix, so they
//! are exact for any tokenizer that encodes a prefix as a prefix of the whole.

use crate::StepLabeller;
use medzero_envs::{Problem, ROOT_TEXT, Step};
use medzero_policies::prm::ValueHead;
use medzero_policies::tokenizer::{PromptTemplate, TokenizerError};
use medzero_policies::{Policy, PolicyError};
use std::path::Path;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum PrmError {
    #[error("loading the PRM in {dir}: {source}")]
    Load { dir: String, source: PolicyError },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Token ids of `prompt` + the root sentence and `steps` (each "Step k: ..."),
/// and the position of each step's last token.
pub fn encode_steps(
    policy: &Policy,
    prompt: &str,
    steps: &[String],
) -> Result<(Vec<i64>, Vec<i64>), TokenizerError> {
    let mut text = format!("{prompt}{ROOT_TEXT}");
    let mut ends = Vec::with_capacity(steps.len());
    for (k, s) in steps.iter().enumerate() {
        text.push_str(&format!("\n\nStep {}: {s}", k + 1));
        let n = policy.tokenizer.encode(&text)?.len() as i64;
        ends.push(n - 1);
    }
    Ok((policy.tokenizer.encode(&text)?, ends))
}

/// A PRM: a policy folder saved with its head.
pub struct Prm {
    pub policy: Policy,
    pub head: ValueHead,
}

impl Prm {
    pub fn load(dir: &Path, device: tch::Device) -> Result<Prm, PrmError> {
        let (policy, head) =
            Policy::load_with_head(dir, device, None).map_err(|source| PrmError::Load {
                dir: dir.display().to_string(),
                source,
            })?;
        Ok(Prm { policy, head })
    }

    /// P(correct) at the end of each step of each chain (after `prompt`),
    /// batched.
    pub fn score(&self, prompt: &str, chains: &[Vec<String>]) -> Result<Vec<Vec<f64>>, PrmError> {
        let mut ids = Vec::with_capacity(chains.len());
        let mut ends = Vec::with_capacity(chains.len());
        for c in chains {
            let (i, e) = encode_steps(&self.policy, prompt, c)?;
            ids.push(i);
            ends.push(e);
        }
        let k = ends.iter().map(Vec::len).max().unwrap_or(0);
        if k == 0 {
            return Ok(vec![Vec::new(); chains.len()]);
        }
        let (ids_t, mask) =
            medzero_policies::generate::pad_right(&ids, self.policy.tokenizer.pad_id());
        let positions: Vec<i64> = ends
            .iter()
            .flat_map(|e| (0..k).map(move |j| *e.get(j).unwrap_or(&0)))
            .collect();
        let positions = Tensor::from_slice(&positions).view([chains.len() as i64, k as i64]);
        let scores = tch::no_grad(|| self.head.scores(&self.policy, &ids_t, &mask, &positions));
        let flat = Vec::<f32>::try_from(&scores.flatten(0, -1))?;
        Ok(ends
            .iter()
            .enumerate()
            .map(|(i, e)| (0..e.len()).map(|j| flat[i * k + j] as f64).collect())
            .collect())
    }
}

/// A PRM as a step labeller: a step is right when its score is at least
/// `threshold`.
pub struct PrmLabeller<'a> {
    pub prm: &'a Prm,
    /// How the PRM's prompts were rendered in training.
    pub template: PromptTemplate,
    pub threshold: f64,
}

impl StepLabeller for PrmLabeller<'_> {
    fn label_steps(&self, problem: &Problem, steps: &[Step]) -> Option<Vec<bool>> {
        let texts: Vec<String> = steps.iter().map(|s| s.text.clone()).collect();
        let prompt = self.template.render(&problem.prompt_text());
        let scores = self.prm.score(&prompt, &[texts]).ok()?;
        Some(scores[0].iter().map(|&s| s >= self.threshold).collect())
    }
}
