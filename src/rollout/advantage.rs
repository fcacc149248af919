//! Advantages behind one trait: each turns a problem's group of completions
//! into one advantage per completion token, so the loss takes a [B, T] grid
//! whatever made it.
//!
//! - [`Outcome`]: the group-normalised reward broadcast to every token
//!   (GRPO, arXiv 2402.03300; TRL's `scale_rewards`).
//! - [`ProcessPrm`]: DeepSeekMath's process supervision (arXiv 2402.03300,
//!   4.1.3): each step's PRM score, normalised over all the group's steps,
//!   and a token's advantage the sum of the normalised scores of the steps
//!   ending at or after it.
//! - [`TreeValues`]: for completions that are leaves of one search tree,
//!   each step's advantage is V(step) − V(parent) from the tree's values
//!   (TreeRL's local advantage, arXiv 2506.11902), or TreeRL's global plus
//!   local advantage over the square root of the step's leaves.
//!
//! For sampled completions the steps are found in the ids themselves: a
//! token belongs to a step from the token that writes the "S" of its
//! "Step k:" line on (tokens of the opening sentence are step 0).

use anyhow::{Context, Result, bail, ensure};
use medzero_envs::{Problem, ROOT_TEXT, Trajectory};
use medzero_policies::Policy;
use medzero_policies::tokenizer::{PromptTemplate, Tokenizer};
use medzero_rewards::Prm;
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, MutexGuard};

/// How rewards are scaled against their group (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// (r − mean) / (std + 1e-4), std with Bessel's correction, as TRL.
    #[default]
    Group,
    /// r − mean (Dr. GRPO, arXiv 2503.20783: no per-question difficulty bias).
    None,
}

/// Each of `values` against them all: (v − mean) / (std + 1e-4) or v − mean.
pub fn normalise(values: &[f32], scale: ScaleRewards) -> Vec<f32> {
    let g = values.len();
    if g == 0 {
        return Vec::new();
    }
    let mean = values.iter().map(|&r| r as f64).sum::<f64>() / g as f64;
    let denom = match scale {
        ScaleRewards::None => 1.0,
        ScaleRewards::Group => {
            let var = values
                .iter()
                .map(|&r| (r as f64 - mean).powi(2))
                .sum::<f64>()
                / (g.max(2) - 1) as f64;
            var.sqrt() + 1e-4
        }
    };
    values
        .iter()
        .map(|&r| ((r as f64 - mean) / denom) as f32)
        .collect()
}

/// Copies of a model an advantage scores with, one per actor (a tensor may
/// not be shared between threads): an actor takes the first free one.
pub struct Copies<T> {
    copies: Vec<Mutex<T>>,
}

impl<T> Copies<T> {
    /// `n` (at least one) copies made by `load`.
    pub fn load(n: usize, mut load: impl FnMut() -> Result<T>) -> Result<Copies<T>> {
        let copies = (0..n.max(1))
            .map(|_| Ok(Mutex::new(load()?)))
            .collect::<Result<_>>()?;
        Ok(Copies { copies })
    }

    /// A free copy, else the first once it is free.
    pub fn get(&self) -> Result<MutexGuard<'_, T>> {
        self.copies
            .iter()
            .find_map(|c| c.try_lock().ok())
            .map_or_else(|| self.copies[0].lock(), Ok)
            .map_err(|_| anyhow::anyhow!("a model copy was poisoned by a panic"))
    }
}

/// Turns one problem's group into per-token advantages.
pub trait Advantage: Send + Sync {
    /// Sets `advantages` (one per token of `tokens`) on every trajectory of
    /// `group`, all of `problem`, sampled by `policy`.
    fn assign(&self, policy: &Policy, problem: &Problem, group: &mut [Trajectory]) -> Result<()>;
}

/// The group-normalised reward on every token.
pub struct Outcome {
    pub scale: ScaleRewards,
}

impl Advantage for Outcome {
    fn assign(&self, _: &Policy, _: &Problem, group: &mut [Trajectory]) -> Result<()> {
        let rewards: Vec<f32> = group.iter().map(|t| t.reward).collect();
        for (t, a) in group.iter_mut().zip(normalise(&rewards, self.scale)) {
            t.advantages = vec![a; t.tokens.len()];
        }
        Ok(())
    }
}

/// A completion cut at its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Steps {
    /// The step of each token: 0 before the first marker, k in step k.
    pub of_token: Vec<usize>,
    /// The text of steps 1..=K, after their markers, trimmed.
    pub texts: Vec<String>,
}

/// The byte offsets of the "S" of each line-leading "Step k:" marker.
fn marker_starts(text: &str) -> Vec<usize> {
    let mut at = 0;
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        let lead = line.len() - line.trim_start().len();
        let rest = &line[lead..];
        if let Some(r) = rest.strip_prefix("Step ") {
            let digits = r.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && r[digits..].starts_with(':') {
                out.push(at + lead);
            }
        }
        at += line.len();
    }
    out
}

/// Cuts `completion` into the steps [`medzero_envs::response_steps`] reads
/// from its text: after the opening sentence, text before the first
/// "Step k:" line is a step, and empty steps are dropped (their tokens join
/// the next step). Decoding is prefix-stable for the tokenizers here (a
/// prefix of the ids decodes to a prefix of the text), which is checked.
pub fn steps(tokenizer: &Tokenizer, completion: &[i64]) -> Result<Steps> {
    let text = tokenizer.decode(completion)?;
    let starts = marker_starts(&text);
    // Segment 0 runs to the first marker, segment j from marker j on.
    let bounds: Vec<usize> = std::iter::once(0).chain(starts.iter().copied()).collect();
    let bodies: Vec<String> = bounds
        .iter()
        .enumerate()
        .map(|(j, &from)| {
            let body = &text[from..bounds.get(j + 1).copied().unwrap_or(text.len())];
            let body = if j == 0 {
                let b = body.trim_start();
                b.strip_prefix(ROOT_TEXT).unwrap_or(b)
            } else {
                body.split_once(':').map_or("", |(_, rest)| rest)
            };
            body.trim().to_string()
        })
        .collect();
    // The step number of each segment: an empty one takes the next
    // non-empty step's (the last step's at the end; step 0 at the start).
    let mut number = vec![0usize; bodies.len()];
    let mut next: Option<usize> = None;
    let total = bodies.iter().filter(|b| !b.is_empty()).count();
    let mut before = total;
    for j in (0..bodies.len()).rev() {
        if !bodies[j].is_empty() {
            number[j] = before;
            next = Some(before);
            before -= 1;
        } else {
            number[j] = if j == 0 { 0 } else { next.unwrap_or(total) };
        }
    }
    let mut of_token = Vec::with_capacity(completion.len());
    for i in 0..completion.len() {
        let prefix = tokenizer.decode(&completion[..=i])?;
        ensure!(
            text.starts_with(&prefix),
            "the tokenizer does not decode a prefix of ids to a prefix of the text, \
             so steps cannot be found in ids"
        );
        of_token.push(number[starts.iter().filter(|&&s| s < prefix.len()).count()]);
    }
    let texts = bodies.into_iter().filter(|b| !b.is_empty()).collect();
    Ok(Steps { of_token, texts })
}

/// Per-step advantages `step_adv` (steps 1..=K) as DeepSeekMath's process
/// advantages: a token in step k gets the sum over steps j >= k (step-0
/// tokens the sum over all).
fn suffix_sums(of_token: &[usize], step_adv: &[f32]) -> Vec<f32> {
    let mut suffix = vec![0f32; step_adv.len() + 1];
    for k in (0..step_adv.len()).rev() {
        suffix[k] = suffix[k + 1] + step_adv[k];
    }
    of_token
        .iter()
        .map(|&s| suffix[s.saturating_sub(1).min(step_adv.len())])
        .collect()
}

/// DeepSeekMath's process supervision with a trained PRM.
pub struct ProcessPrm {
    pub prms: Copies<Prm>,
    /// How the PRM's prompts were rendered in training.
    pub template: PromptTemplate,
    pub scale: ScaleRewards,
}

impl Advantage for ProcessPrm {
    fn assign(&self, policy: &Policy, problem: &Problem, group: &mut [Trajectory]) -> Result<()> {
        let cut: Vec<Steps> = group
            .iter()
            .map(|t| steps(&policy.tokenizer, &t.tokens))
            .collect::<Result<_>>()?;
        let prompt = self.template.render(&problem.prompt_text());
        let chains: Vec<Vec<String>> = cut.iter().map(|s| s.texts.clone()).collect();
        let scores = self
            .prms
            .get()?
            .score(&prompt, &chains)
            .with_context(|| format!("PRM scores of {}'s group", problem.id))?;
        let pooled: Vec<f32> = scores.iter().flatten().map(|&s| s as f32).collect();
        let mut normalised = normalise(&pooled, self.scale).into_iter();
        for ((t, s), sc) in group.iter_mut().zip(&cut).zip(&scores) {
            let step_adv: Vec<f32> = normalised.by_ref().take(sc.len()).collect();
            t.values = sc.iter().map(|&v| v as f32).collect();
            t.advantages = suffix_sums(&s.of_token, &step_adv);
        }
        Ok(())
    }
}

/// What a tree-leaf trajectory carries for [`TreeValues`] (its `meta`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeLeaf {
    /// V(root): the parent value of step 1.
    pub root_value: f64,
    /// Nodes of the tree the leaf came from.
    pub nodes: usize,
    /// Where the tokens of the opening sentence (0) and of each step of the
    /// path (1..) end; the end of turn after the last belongs to the last.
    pub ends: Vec<usize>,
    /// Per step of the path: the share of correct leaves among the finished
    /// leaves under it, and their number (TreeRL's V and |L|).
    pub accuracy: Vec<f64>,
    pub leaves: Vec<usize>,
    /// The share of correct leaves in the whole tree.
    pub root_accuracy: f64,
}

/// Which tree advantage a step gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TreeAdvantage {
    /// V(step) − V(parent) with the search's MCTS values.
    #[default]
    Local,
    /// TreeRL's (G + L) / sqrt(|L(step)|) with V the share of correct leaves
    /// under a node: G = V(step) − V(root), L = V(step) − V(parent), |L| the
    /// finished leaves under the step (arXiv 2506.11902).
    Treerl,
}

/// Step advantages from the tree, for leaves of one search tree whose
/// `values` hold the MCTS value of each node on the leaf's path. The tree
/// node of each token is known exactly from where each node's text ends
/// (no step is looked for in the ids); the opening sentence gets 0. A
/// step's advantage is its own, not a suffix sum: tree values look ahead.
pub struct TreeValues {
    pub kind: TreeAdvantage,
}

impl TreeValues {
    fn step_advantages(&self, t: &Trajectory, leaf: &TreeLeaf) -> Vec<f32> {
        match self.kind {
            TreeAdvantage::Local => {
                let mut parent = leaf.root_value as f32;
                t.values
                    .iter()
                    .map(|&v| {
                        let a = v - parent;
                        parent = v;
                        a
                    })
                    .collect()
            }
            TreeAdvantage::Treerl => {
                let mut parent = leaf.root_accuracy;
                leaf.accuracy
                    .iter()
                    .zip(&leaf.leaves)
                    .map(|(&v, &n)| {
                        let a =
                            ((v - leaf.root_accuracy) + (v - parent)) / (n.max(1) as f64).sqrt();
                        parent = v;
                        a as f32
                    })
                    .collect()
            }
        }
    }
}

impl Advantage for TreeValues {
    fn assign(&self, _: &Policy, _: &Problem, group: &mut [Trajectory]) -> Result<()> {
        for t in group.iter_mut() {
            if t.tokens.is_empty() {
                continue;
            }
            let leaf: TreeLeaf = serde_json::from_value(t.meta.clone())
                .with_context(|| format!("{}: not a search-tree leaf", t.id))?;
            let steps = t.values.len();
            if leaf.ends.len() != steps + 1
                || leaf.accuracy.len() != steps
                || leaf.leaves.len() != steps
            {
                bail!(
                    "{}: {} node ends, {} accuracies and {} leaf counts for {} tree values",
                    t.id,
                    leaf.ends.len(),
                    leaf.accuracy.len(),
                    leaf.leaves.len(),
                    steps
                );
            }
            let step_adv = self.step_advantages(t, &leaf);
            t.advantages = (0..t.tokens.len())
                .map(|i| match leaf.ends.iter().filter(|&&e| e <= i).count() {
                    0 => 0.0,
                    k => step_adv[(k - 1).min(steps - 1)],
                })
                .collect();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_is_trl_group_scaling() {
        // TRL: mean 0.5, Bessel std sqrt(1/3), epsilon 1e-4 on the std.
        let a = normalise(&[1.0, 0.0, 1.0, 0.0], ScaleRewards::Group);
        let want = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
        assert!((a[0] as f64 - want).abs() < 1e-6 && (a[1] as f64 + want).abs() < 1e-6);
        assert_eq!(normalise(&[1.0, 1.0], ScaleRewards::Group), vec![0.0, 0.0]);
        assert_eq!(normalise(&[1.0, 0.0], ScaleRewards::None), vec![0.5, -0.5]);
    }

    #[test]
    fn markers_are_found_at_line_starts_only() {
        let text = "Let's go.\n\nStep 1: a\n\nStep 2: b (see Step 3: c)\n  Step 10: d\nStep x: e";
        let at = marker_starts(text);
        assert_eq!(at.len(), 3);
        assert!(text[at[0]..].starts_with("Step 1:"));
        assert!(text[at[2]..].starts_with("Step 10:"));
    }

    #[test]
    fn suffix_sums_are_deepseekmath_process_advantages() {
        // Tokens in steps 0, 1, 1, 2, 3 with step advantages 1, -2, 4.
        let a = suffix_sums(&[0, 1, 1, 2, 3], &[1.0, -2.0, 4.0]);
        assert_eq!(a, vec![3.0, 3.0, 3.0, 2.0, 4.0]);
        assert_eq!(suffix_sums(&[0, 0], &[]), vec![0.0, 0.0]);
    }
}
