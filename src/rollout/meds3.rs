//! MedS3 (arXiv 2501.12051) as a rollout: the step-level tree search of
//! [`super::mcts`] driven by a tch policy that reuses KV caches down the tree,
//! one search per problem on the actor runtime.
//!
//! Text layout. The policy is prompted with the question (the student's
//! template), then continues from [`Tree::render_prefix`]: the root sentence
//! and "Step k: ..." steps, ending "\n\nStep {d+1}:". A step ends where the
//! model writes the next "Step {d+2}:" marker, or at the end of the turn.
//! A chain-trained student writes the whole text itself, root included.

use super::mcts::{self, Expand, MctsConfig, Meds3Record, NodeId, StepModel, Tree};
use crate::runtime::actor::{Rolled, ServedRollout};
use crate::runtime::service::{self, Generate, ServiceConfig, ServiceStats};
use anyhow::{Context, Result, bail};
use medzero_envs::{Problem, Provenance, Step, Trajectory};
use medzero_policies::generate::streams;
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, SamplingParams, SyncReport};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::Tensor;

/// How the policy writes steps and rollouts inside the search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StepGeneration {
    /// Most tokens of one step.
    pub step_max_tokens: usize,
    /// Most tokens of one rollout (the rest of a chain).
    pub rollout_max_tokens: usize,
    /// Sampling of candidate steps.
    pub temperature: f64,
    pub top_p: f64,
    /// Rollouts of the first self-evolution round (MedS3: 0.6, top_p 0.9).
    pub first_round_temperature: f64,
    /// Rollouts of later rounds (MedS3: 1.0, top_p 0.9).
    pub later_round_temperature: f64,
    pub rollout_top_p: f64,
    /// Continue children from their parent's KV cache (off: recompute every
    /// prefix; for benchmarks).
    pub prefix_reuse: bool,
}

impl Default for StepGeneration {
    fn default() -> Self {
        StepGeneration {
            step_max_tokens: 48,
            rollout_max_tokens: 320,
            temperature: 1.0,
            top_p: 0.9,
            first_round_temperature: 0.6,
            later_round_temperature: 1.0,
            rollout_top_p: 0.9,
            prefix_reuse: true,
        }
    }
}

impl StepGeneration {
    pub fn validate(&self) -> Result<()> {
        if self.step_max_tokens == 0 || self.rollout_max_tokens == 0 {
            bail!("generation.step_max_tokens and rollout_max_tokens must be at least 1");
        }
        for (name, t) in [
            ("temperature", self.temperature),
            ("first_round_temperature", self.first_round_temperature),
            ("later_round_temperature", self.later_round_temperature),
        ] {
            if !(t.is_finite() && t >= 0.0) {
                bail!("generation.{name} must be a finite number >= 0, got {t}");
            }
        }
        for (name, p) in [("top_p", self.top_p), ("rollout_top_p", self.rollout_top_p)] {
            if !(p > 0.0 && p <= 1.0) {
                bail!("generation.{name} must be in (0, 1], got {p}");
            }
        }
        Ok(())
    }
}

/// Where one step ends and the next begins ("\n\nStep k:" without its number).
const STEP_BREAK: &str = "\n\nStep";

/// The rows continuing the children of one expanded node, in child order.
/// A child's row is brought to exactly its text (`sync`) the first time the
/// search continues it, once the tree has its text.
struct Children<R> {
    rows: R,
    synced: Vec<bool>,
}

type Shared<R> = Rc<RefCell<Children<R>>>;

/// [`StepModel`] on a policy, local or behind the inference service. With prefix reuse, the children of a node are
/// the rows of one batch that continue from its cached row, so expanding or
/// rolling out a child never recomputes its prefix; before a row is
/// continued it is synced to the token ids of `prompt + render_prefix(child)`,
/// so the model always continues from exactly the text the tree holds.
pub struct PolicySteps<'a, G: Generate = Policy> {
    policy: &'a G,
    generation: &'a StepGeneration,
    rng: &'a mut ChaCha8Rng,
    /// The question as the student's template renders it.
    prompt: String,
    end_of_turn: i64,
    root: Option<Shared<G::Rows>>,
    /// The rows holding each expanded node's children.
    children: HashMap<NodeId, Shared<G::Rows>>,
    /// Tokens generated so far.
    pub generated: u64,
    /// Rows whose sampled ids were not the ids of their own text (so they
    /// were cut back and re-run), and the tokens re-run.
    pub resynced: SyncReport,
}

impl<'a, G: Generate> PolicySteps<'a, G> {
    pub fn new(
        policy: &'a G,
        generation: &'a StepGeneration,
        template: PromptTemplate,
        problem: &Problem,
        rng: &'a mut ChaCha8Rng,
    ) -> Self {
        PolicySteps {
            policy,
            generation,
            rng,
            prompt: template.render(&problem.prompt_text()),
            end_of_turn: policy.tokenizer().end_of_turn_id(&template),
            root: None,
            children: HashMap::new(),
            generated: 0,
            resynced: SyncReport::default(),
        }
    }

    /// The token ids of the whole text before `node`'s next step.
    fn target(&self, tree: &Tree, node: NodeId) -> Result<Vec<i64>> {
        let text = format!("{}{}", self.prompt, tree.render_prefix(node));
        Ok(self.policy.tokenizer().encode(&text)?)
    }

    /// A fresh prefill of the whole text before `node`'s next step.
    fn prefill(&self, tree: &Tree, node: NodeId) -> Result<Shared<G::Rows>> {
        let rows = self.policy.prefill(&[self.target(tree, node)?], 0)?;
        Ok(Rc::new(RefCell::new(Children {
            rows,
            synced: vec![true],
        })))
    }

    /// The rows continuing `node`, and which row, synced to `node`'s text.
    fn state(&mut self, tree: &Tree, node: NodeId) -> Result<(Shared<G::Rows>, usize)> {
        if !self.generation.prefix_reuse {
            return Ok((self.prefill(tree, node)?, 0));
        }
        let Some(parent) = tree.nodes[node].parent else {
            if self.root.is_none() {
                self.root = Some(self.prefill(tree, node)?);
            }
            return Ok((self.root.clone().expect("set above"), 0));
        };
        let shared = self
            .children
            .get(&parent)
            .with_context(|| format!("node {node}: its parent {parent} was never expanded"))?
            .clone();
        let siblings = &tree.nodes[parent].children;
        let row = siblings
            .iter()
            .position(|&c| c == node)
            .expect("a node is among its parent's children");
        let mut children = shared.borrow_mut();
        if !children.synced[row] {
            // Every open sibling at once: the search continues them next.
            let mut targets = vec![None; siblings.len()];
            for (i, &c) in siblings.iter().enumerate() {
                if !children.synced[i] && (c == node || !tree.nodes[c].finished) {
                    targets[i] = Some(self.target(tree, c)?);
                    children.synced[i] = true;
                }
            }
            let report = self.policy.sync(&mut children.rows, &targets)?;
            self.resynced.rewound += report.rewound;
            self.resynced.fed += report.fed;
        }
        drop(children);
        Ok((shared, row))
    }

    /// The cached row the search continues `node` from: its token ids and
    /// next-token logits [V].
    pub fn cached_row(&mut self, tree: &Tree, node: NodeId) -> Result<CachedRow> {
        let (shared, row) = self.state(tree, node)?;
        let children = shared.borrow();
        let ids = self.policy.ids(&children.rows, row).to_vec();
        Ok(CachedRow {
            position: ids.len() as i64,
            ids,
            logits: self.policy.row_logits(&children.rows, row)?,
        })
    }

    fn check_room(&self, rows: &G::Rows, row: usize, node: NodeId) -> Result<()> {
        let context = self.policy.context();
        if context - (self.policy.ids(rows, row).len() as i64) < 2 {
            bail!(
                "node {node}: the reasoning so far fills the model's context of {context} tokens; \
                 lower mcts.max_depth or the generation budgets"
            );
        }
        Ok(())
    }
}

/// What a node's cached row holds.
pub struct CachedRow {
    pub ids: Vec<i64>,
    /// Where the next token goes.
    pub position: i64,
    /// Next-token logits [V].
    pub logits: Tensor,
}

impl<G: Generate> StepModel for PolicySteps<'_, G> {
    fn expand(&mut self, tree: &Tree, node: NodeId, how: Expand) -> Result<Vec<String>> {
        let (base, row) = self.state(tree, node)?;
        // Finish writes the rest of the chain up to its answer as one node:
        // forcing "The answer is" mid-chain makes a student that names the
        // option in its last step answer out of turn. Reflect opens with
        // MedS3's "But wait," and writes one step.
        let (k, forced, budget, stop) = match how {
            Expand::Reason(k) => (k, "", self.generation.step_max_tokens, true),
            Expand::Finish => (1, "", self.generation.rollout_max_tokens, false),
            Expand::Reflect => (1, "But wait,", self.generation.step_max_tokens, true),
        };
        let forced_ids = self.policy.tokenizer().encode(forced)?;
        let mut rows = {
            let base = base.borrow();
            self.check_room(&base.rows, row, node)?;
            self.policy
                .select(&base.rows, &vec![row; k], forced_ids.len() + budget)?
        };
        if !forced_ids.is_empty() {
            self.policy.extend(&mut rows, &vec![forced_ids; k])?;
        }
        // A step ends where the model starts any next step: models skip or
        // repeat numbers, so the number is not part of the stop string.
        let params = SamplingParams {
            max_new_tokens: budget,
            temperature: self.generation.temperature,
            top_p: self.generation.top_p,
            stop: if stop {
                vec![STEP_BREAK.to_string()]
            } else {
                Vec::new()
            },
            stop_token_ids: vec![self.end_of_turn],
            ..SamplingParams::default()
        };
        let outs = self
            .policy
            .decode(&mut rows, &params, streams(self.rng, k))?;
        self.generated += outs.iter().map(|g| g.tokens.len() as u64).sum::<u64>();
        if self.generation.prefix_reuse {
            self.children.insert(
                node,
                Rc::new(RefCell::new(Children {
                    rows,
                    synced: vec![false; k],
                })),
            );
        }
        Ok(outs
            .into_iter()
            .map(|g| format!("{forced} {}", g.text.trim()).trim().to_string())
            .collect())
    }

    fn rollouts(
        &mut self,
        tree: &Tree,
        requests: &[(NodeId, usize)],
        iteration: usize,
    ) -> Result<Vec<Vec<String>>> {
        let params = SamplingParams {
            max_new_tokens: self.generation.rollout_max_tokens,
            temperature: if iteration == 0 {
                self.generation.first_round_temperature
            } else {
                self.generation.later_round_temperature
            },
            top_p: self.generation.rollout_top_p,
            stop_token_ids: vec![self.end_of_turn],
            ..SamplingParams::default()
        };
        // Each request's random streams, drawn in request order, so a
        // completion does not depend on which requests share its batch.
        let mut streams: Vec<Vec<ChaCha8Rng>> = requests
            .iter()
            .map(|&(_, n)| streams(self.rng, n))
            .collect();
        // Requests continuing rows of one batch (the children of one node)
        // run as one batch; others run one after the other.
        let mut out: Vec<Vec<String>> = vec![Vec::new(); requests.len()];
        // Each batch of rows, with the (request, row) pairs continuing it.
        type Members = Vec<(usize, usize)>;
        let mut groups: Vec<(Shared<G::Rows>, Members)> = Vec::new();
        for (i, &(node, _)) in requests.iter().enumerate() {
            let (rows, row) = self.state(tree, node)?;
            match groups.iter_mut().find(|(r, _)| Rc::ptr_eq(r, &rows)) {
                Some((_, members)) => members.push((i, row)),
                None => groups.push((rows, vec![(i, row)])),
            }
        }
        for (shared, members) in groups {
            let picked: Vec<usize> = members
                .iter()
                .flat_map(|&(i, row)| std::iter::repeat_n(row, requests[i].1))
                .collect();
            if picked.is_empty() {
                continue;
            }
            let mut rows = {
                let base = shared.borrow();
                self.check_room(&base.rows, picked[0], requests[members[0].0].0)?;
                self.policy
                    .select(&base.rows, &picked, params.max_new_tokens)?
            };
            let rngs: Vec<ChaCha8Rng> = members
                .iter()
                .flat_map(|&(i, _)| std::mem::take(&mut streams[i]))
                .collect();
            let outs = self.policy.decode(&mut rows, &params, rngs)?;
            self.generated += outs.iter().map(|g| g.tokens.len() as u64).sum::<u64>();
            let mut texts = outs.into_iter().map(|g| g.text);
            for &(i, _) in &members {
                out[i] = texts.by_ref().take(requests[i].1).collect();
            }
        }
        Ok(out)
    }
}

/// What a search trajectory carries besides its chain (its `meta`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchMeta {
    /// The tree in MedS3's release format.
    pub record: Meds3Record,
    pub nodes: usize,
    pub finished_leaves: usize,
    /// Rows whose sampled ids were not their own text's ids, so the search
    /// cut them back and re-ran them from the text (see `PolicySteps`).
    pub resynced: usize,
    /// "Step k:" markers inside a node's text that do not count on from
    /// the node's own step number (e.g. "Step 2: ... Step 4: ...").
    pub step_skips: usize,
}

impl SearchMeta {
    pub fn of(t: &Trajectory) -> Result<SearchMeta> {
        serde_json::from_value(t.meta.clone())
            .with_context(|| format!("trajectory {} holds no search record", t.id))
    }
}

/// Markers "Step k:" inside node texts (multi-step Finish nodes) whose
/// number is not one more than the step before.
pub fn step_skips(tree: &Tree) -> usize {
    tree.nodes
        .iter()
        .skip(1)
        .map(|n| {
            let mut expect = n.depth + 1;
            let mut skips = 0;
            for k in step_numbers(&n.text) {
                skips += (k != expect) as usize;
                expect = k + 1;
            }
            skips
        })
        .sum()
}

/// The numbers of the "Step k:" markers in a text, in order.
fn step_numbers(text: &str) -> Vec<usize> {
    text.match_indices("Step ")
        .filter_map(|(at, _)| {
            let rest = &text[at + 5..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            rest[digits.len()..]
                .starts_with(':')
                .then(|| digits.parse().ok())
                .flatten()
        })
        .collect()
}

impl MctsRollout {
    /// The search tree of `problem`, and the step model's counts.
    pub fn search<'a, G: Generate>(
        &'a self,
        policy: &'a G,
        problem: &Problem,
        rng: &'a mut ChaCha8Rng,
    ) -> Result<(Tree, PolicySteps<'a, G>)> {
        let mut model = PolicySteps::new(
            policy,
            &self.generation,
            self.template.clone(),
            problem,
            rng,
        );
        let tree = mcts::search(problem, &self.mcts, &mut model, self.iteration)?;
        Ok((tree, model))
    }

    /// The searches of many problems through one inference service on
    /// `policy`: `trees_in_flight` trees advance at once, each on its own
    /// thread with its own random stream, and their decode requests share
    /// one continuously batched forward pass. Problem i's tree is the one
    /// [`search`](Self::search) builds with `rngs[i]`.
    pub fn search_many(
        &self,
        policy: &Policy,
        problems: &[&Problem],
        rngs: Vec<ChaCha8Rng>,
        trees_in_flight: usize,
        cfg: ServiceConfig,
    ) -> Result<(Vec<Searched>, ServiceStats)> {
        assert_eq!(
            rngs.len(),
            problems.len(),
            "search_many: one stream per problem"
        );
        let (client, inbox) =
            service::channel(&policy.tokenizer, policy.config().max_position_embeddings);
        let work: Vec<Mutex<Option<ChaCha8Rng>>> =
            rngs.into_iter().map(|r| Mutex::new(Some(r))).collect();
        let done: Vec<Mutex<Option<Result<Searched>>>> =
            problems.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let stats = std::thread::scope(|s| {
            for _ in 0..trees_in_flight.clamp(1, problems.len().max(1)) {
                let client = client.clone();
                let (work, done, next) = (&work, &done, &next);
                s.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= problems.len() {
                            break;
                        }
                        let mut rng = lock(&work[i]).take().expect("each problem taken once");
                        let searched =
                            self.search(&client, problems[i], &mut rng)
                                .map(|(tree, model)| Searched {
                                    generated: model.generated,
                                    resynced: model.resynced,
                                    tree,
                                });
                        *lock(&done[i]) = Some(searched);
                    }
                });
            }
            drop(client);
            service::serve(policy, inbox, None, cfg)
        })?;
        let trees = done
            .into_iter()
            .map(|d| {
                d.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect("every problem searched")
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((trees, stats))
    }
}

/// One tree of [`MctsRollout::search_many`], with its step model's counts.
pub struct Searched {
    pub tree: Tree,
    pub generated: u64,
    pub resynced: SyncReport,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One search per problem, as an actor rollout: the trajectory holds the
/// tree's MedS3 record ([`SearchMeta`]) and, as its chain, the best correct
/// leaf (or the best leaf).
pub struct MctsRollout {
    pub mcts: MctsConfig,
    pub generation: StepGeneration,
    pub template: PromptTemplate,
    pub iteration: usize,
}

impl ServedRollout for MctsRollout {
    fn ids(&self, problem: &Problem) -> Vec<String> {
        vec![format!("{}/mcts", problem.id)]
    }

    fn roll<G: Generate>(
        &self,
        policy: &G,
        problem: &Problem,
        rng: &mut ChaCha8Rng,
    ) -> Result<Rolled> {
        let (tree, model) = self.search(policy, problem, rng)?;
        let record = Meds3Record::from_tree(problem, &tree);
        let best = record
            .pos
            .iter()
            .chain(&record.neg)
            .max_by(|a, b| a.value.total_cmp(&b.value));
        let steps: Vec<Step> = best
            .map(|l| l.chain.iter().map(|s| Step::new(s.text.clone())).collect())
            .unwrap_or_default();
        let trajectory = Trajectory {
            id: self.ids(problem).remove(0),
            problem_id: problem.id.clone(),
            answer: steps
                .last()
                .and_then(|s| medzero_envs::verify::extract_answer(&s.text)),
            reward: (!record.pos.is_empty()) as u8 as f32,
            values: best
                .map(|l| l.chain.iter().map(|s| s.value as f32).collect())
                .unwrap_or_default(),
            steps,
            advantages: Vec::new(),
            policy_version: 0,
            provenance: Provenance {
                producer: String::new(),
                stage: String::new(),
                saw_gold: true,
            },
            tokens: Vec::new(),
            logprobs: Vec::new(),
            meta: serde_json::to_value(SearchMeta {
                record,
                nodes: tree.nodes.len(),
                resynced: model.resynced.rewound,
                step_skips: step_skips(&tree),
                finished_leaves: tree.leaves().filter(|&l| tree.nodes[l].finished).count(),
            })?,
        };
        Ok(Rolled {
            trajectories: vec![trajectory],
            generated_tokens: model.generated,
            reward_failures: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_number_skips_count_markers_that_do_not_count_on() {
        assert_eq!(step_numbers("a. Step 3: b. Step 4: c"), [3, 4]);
        assert_eq!(step_numbers("Step x: no. Step 12: yes"), [12]);
        let mut tree = Tree::new();
        tree.nodes.push(mcts::Node {
            parent: Some(0),
            depth: 1,
            text: "a.\n\nStep 2: b.\n\nStep 4: c.".into(),
            ..tree.nodes[0].clone()
        });
        assert_eq!(step_skips(&tree), 1);
    }
}
