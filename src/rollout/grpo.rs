//! GRPO's actor side: a problem's group of completions, with the per-token
//! advantages an [`Advantage`] gives them, computed where the whole group is
//! at hand, so a learner batch that splits a group still trains each
//! completion on its own group's baseline. The group is either G samples of
//! the prompt ([`GroupSampler`], arXiv 2402.03300) or G finished leaves of
//! one MedS3 search tree ([`TreeGroup`], TreeRL's tree-sampled group, arXiv
//! 2506.11902).

use super::advantage::{Advantage, TreeLeaf};
use super::mcts::{NodeId, Tree};
use super::meds3::MctsRollout;
use super::sampling::Sampler;
use crate::runtime::actor::{Rolled, Rollout};
use anyhow::{Result, ensure};
use medzero_envs::{Problem, Provenance, Step, Trajectory, verify};
use medzero_policies::Policy;
use medzero_policies::tokenizer::PromptTemplate;
use medzero_rewards::Reward;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// [`Sampler`]'s G samples of a problem, with their advantages.
pub struct GroupSampler<R: Reward> {
    pub sampler: Sampler<R>,
    pub advantage: Box<dyn Advantage>,
}

impl<R: Reward> Rollout for GroupSampler<R> {
    fn ids(&self, problem: &Problem) -> Vec<String> {
        self.sampler.ids(problem)
    }

    fn rollout(&self, policy: &Policy, problem: &Problem, rng: &mut ChaCha8Rng) -> Result<Rolled> {
        let mut rolled = self.sampler.rollout(policy, problem, rng)?;
        self.advantage
            .assign(policy, problem, &mut rolled.trajectories)?;
        Ok(rolled)
    }
}

/// One MedS3 search per problem, whose finished leaves are the group: each
/// leaf's chain is a completion (the ids of the text the search continued
/// from, ended with the end of turn), its reward the verifier's, its values
/// the tree's. `group` leaves are taken, correct and wrong in turn, repeating
/// leaves when the tree has fewer; a tree without a finished leaf gives
/// completions without ids, which no objective trains on.
pub struct TreeGroup {
    pub search: MctsRollout,
    pub group: usize,
    pub advantage: Box<dyn Advantage>,
}

impl TreeGroup {
    /// `group` finished leaves, correct and wrong alternating.
    fn pick(&self, tree: &Tree) -> Vec<NodeId> {
        let finished = |correct: bool| {
            tree.leaves()
                .filter(move |&l| tree.nodes[l].finished && tree.nodes[l].correct == correct)
                .collect::<Vec<_>>()
        };
        let (pos, neg) = (finished(true), finished(false));
        let mut order = Vec::with_capacity(pos.len() + neg.len());
        for k in 0..pos.len().max(neg.len()) {
            order.extend(pos.get(k));
            order.extend(neg.get(k));
        }
        if order.is_empty() {
            return Vec::new();
        }
        (0..self.group).map(|k| order[k % order.len()]).collect()
    }

    fn leaf(
        &self,
        problem: &Problem,
        ids: &mut PathIds,
        under: &[(usize, usize)],
        leaf: NodeId,
        id: String,
    ) -> Result<Trajectory> {
        let tree = ids.tree;
        let prompt_len = ids.prompt.len();
        let full = ids.of(leaf)?.to_vec();
        let mut tokens = full[prompt_len..].to_vec();
        tokens.push(ids.end_of_turn);
        let path = &tree.path(leaf)[1..];
        // Where each node's tokens end: the ids of the text up to it, as the
        // search continued from them.
        let mut ends = vec![ids.of(0)?.len() - prompt_len];
        for &n in path {
            let upto = ids.of(n)?;
            ensure!(
                full.starts_with(upto),
                "{id}: the ids of a chain's prefix are not a prefix of its ids"
            );
            ends.push(upto.len() - prompt_len);
        }
        let values = path.iter().map(|&n| tree.nodes[n].value as f32).collect();
        let share = |(correct, all): (usize, usize)| correct as f64 / all.max(1) as f64;
        let steps: Vec<Step> = path
            .iter()
            .map(|&n| Step::new(tree.nodes[n].text.clone()))
            .collect();
        Ok(Trajectory {
            id,
            problem_id: problem.id.clone(),
            answer: steps.last().and_then(|s| verify::extract_answer(&s.text)),
            reward: tree.nodes[leaf].correct as u8 as f32,
            steps,
            values,
            advantages: Vec::new(),
            policy_version: 0,
            provenance: Provenance {
                producer: String::new(),
                stage: String::new(),
                saw_gold: true,
            },
            tokens,
            logprobs: Vec::new(),
            meta: serde_json::to_value(TreeLeaf {
                root_value: tree.nodes[0].value,
                nodes: tree.nodes.len(),
                ends,
                accuracy: path.iter().map(|&n| share(under[n])).collect(),
                leaves: path.iter().map(|&n| under[n].1).collect(),
                root_accuracy: share(under[0]),
            })?,
        })
    }
}

impl Rollout for TreeGroup {
    fn ids(&self, problem: &Problem) -> Vec<String> {
        (0..self.group)
            .map(|k| format!("{}/t{k:03}", problem.id))
            .collect()
    }

    fn rollout(&self, policy: &Policy, problem: &Problem, rng: &mut ChaCha8Rng) -> Result<Rolled> {
        let (tree, model) = self.search.search(policy, problem, rng)?;
        let generated_tokens = model.generated;
        let picked = self.pick(&tree);
        let under = finished_under(&tree);
        let mut ids = PathIds::new(policy, self.search.template.clone(), problem, &tree)?;
        // A leaf picked twice (a tree with fewer than `group`) is built once.
        let mut made: HashMap<NodeId, Trajectory> = HashMap::new();
        let mut trajectories = Vec::with_capacity(self.group);
        for (k, id) in self.ids(problem).into_iter().enumerate() {
            trajectories.push(match picked.get(k) {
                Some(&leaf) => match made.get(&leaf) {
                    Some(t) => Trajectory { id, ..t.clone() },
                    None => {
                        let t = self.leaf(problem, &mut ids, &under, leaf, id)?;
                        made.insert(leaf, t.clone());
                        t
                    }
                },
                None => Trajectory {
                    id,
                    problem_id: problem.id.clone(),
                    steps: Vec::new(),
                    answer: None,
                    reward: 0.0,
                    values: Vec::new(),
                    advantages: Vec::new(),
                    policy_version: 0,
                    provenance: Provenance::default(),
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    meta: serde_json::Value::Null,
                },
            });
        }
        if !picked.is_empty() {
            self.advantage.assign(policy, problem, &mut trajectories)?;
        }
        Ok(Rolled {
            trajectories,
            generated_tokens,
            reward_failures: 0,
        })
    }
}

/// The ids of the prompt and of `prompt + render_path(node)` per node, each
/// encoded once per tree (leaves share their ancestors).
struct PathIds<'a> {
    policy: &'a Policy,
    tree: &'a Tree,
    problem: &'a str,
    text: String,
    prompt: Vec<i64>,
    end_of_turn: i64,
    of: HashMap<NodeId, Vec<i64>>,
}

impl<'a> PathIds<'a> {
    fn new(
        policy: &'a Policy,
        template: PromptTemplate,
        problem: &'a Problem,
        tree: &'a Tree,
    ) -> Result<Self> {
        let text = template.render(&problem.prompt_text());
        Ok(PathIds {
            prompt: policy.tokenizer.encode(&text)?,
            end_of_turn: policy.tokenizer.end_of_turn_id(&template),
            policy,
            tree,
            problem: &problem.id,
            text,
            of: HashMap::new(),
        })
    }

    fn of(&mut self, node: NodeId) -> Result<&[i64]> {
        if !self.of.contains_key(&node) {
            let ids = self.policy.tokenizer.encode(&format!(
                "{}{}",
                self.text,
                self.tree.render_path(node)
            ))?;
            ensure!(
                ids.starts_with(&self.prompt),
                "{}: the prompt's ids are not a prefix of a chain's",
                self.problem
            );
            self.of.insert(node, ids);
        }
        Ok(&self.of[&node])
    }
}

/// Per node: the correct and all finished leaves in its subtree.
fn finished_under(tree: &Tree) -> Vec<(usize, usize)> {
    let mut under = vec![(0usize, 0usize); tree.nodes.len()];
    // A parent's id is below its children's: one pass from the last node.
    for id in (0..tree.nodes.len()).rev() {
        let n = &tree.nodes[id];
        if n.children.is_empty() && n.finished {
            under[id].0 += n.correct as usize;
            under[id].1 += 1;
        }
        if let Some(p) = n.parent {
            under[p].0 += under[id].0;
            under[p].1 += under[id].1;
        }
    }
    under
}
