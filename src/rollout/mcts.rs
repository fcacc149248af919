//! MedS3's step-level Monte Carlo Tree Search (REFERENCE 1), independent of
//! the policy that writes the steps.
//!
//! A [`Tree`] grows from the root step "Let's break down this problem step
//! by step." (step 0). Each iteration of [`search`]:
//!
//! 1. **Select**: from the root, move to the open child with the highest
//!    [`Tree::uct_score`] (the first child wins ties) until reaching a leaf.
//! 2. **Expand** that leaf with one [`StepModel::expand`] call:
//!    - a finished leaf that may still reflect gets one [`Expand::Reflect`] child;
//!    - a leaf whose simulation score is >= `finish_threshold`, or whose depth
//!      is >= `max_depth`, gets one [`Expand::Finish`] child;
//!    - any other leaf gets [`Expand::Reason`]`(max_children)` children.
//! 3. **Evaluate** the new children: a child that states an answer (or was
//!    asked to, by `Finish`) is *finished* and scores its verified reward, 1
//!    or 0; the others are rolled out, all in one [`StepModel::rollouts`]
//!    call, and score `correct / n(depth)` over their completions.
//! 4. **Back-propagate** each new child in turn ([`Tree`] documents the update).
//!
//! It stops when the tree holds `max_nodes` nodes, when `stop_correct_leaves`
//! correct leaves exist, or when no node is open. Then, if fewer than
//! `stop_correct_leaves` correct leaves exist, every unfinished leaf is given
//! a `Finish` child. [`to_record`] writes the tree in MedS3's release format.
//!
//! Answers are checked strictly by [`verify::verify`] (REFERENCE 1, "Answer
//! checking"), for rollouts and finished steps alike.
//!
//! Where REFERENCE leaves room, this module decides (MedS3's public code
//! agrees unless noted):
//! - The root is never rolled out: its `value` and `sim_score` start at 0,
//!   and it never takes the Finish shortcut.
//! - "Completed" nodes are *closed*: a finished leaf (correct or not) unless
//!   it may reflect, or a node whose children are all closed. Closed nodes
//!   are never selected; the search also stops once the root is closed,
//!   which with `reflect` off is exactly "all leaves are finished".
//! - A step from `Expand::Finish` is finished even if it states no answer
//!   (reward 0), so the shortcut, `max_depth` and forced finishing always end
//!   a path. (MedS3's code keeps such a step as a Reason node.) A step from
//!   `Reason` or `Reflect` that states an answer is finished too.
//! - A rollout completion is verified on its own text: the path it continues
//!   states no answer, as a step that does is finished and never rolled out.
//! - Only finished nodes can be correct (`sim_score >= correct_threshold`);
//!   an unfinished leaf with rollout value 1 is not a correct leaf.
//! - Reflect gives ONE child, as REFERENCE says (MedS3's code asks for
//!   `max_children`), to a finished, wrong leaf with value `< reflect_below`
//!   whose path holds no Reflect step yet (one from `Expand::Reflect`, or
//!   any step the model began with "But wait").
//! - Children are added all at once, so the tree may end up to
//!   `max_children - 1` nodes over `max_nodes`; forced finishing then adds
//!   one node per unfinished leaf, in node-id order, one `expand` call each.

use anyhow::{Context, Result, anyhow, bail, ensure};
use medzero_envs::{Gold, Problem, Step, StepKind, render_chain, verify};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The text of step 0, the root of every tree.
pub const ROOT_TEXT: &str = "Let's break down this problem step by step.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MctsConfig {
    /// Children generated when a Reason step is expanded.
    pub max_children: usize,
    /// UCT exploration constant `c` in `v + c * sqrt(ln N_parent / n)`.
    pub c: f64,
    /// UCT score of a child never back-propagated through. The search
    /// back-propagates every child as it is created, so this only matters for
    /// trees built by other means.
    pub unvisited_score: f64,
    /// UCT score of a closed child (a completed subtree, a finished leaf);
    /// closed children are never selected, so it must be below every open
    /// child's score, which is >= 0.
    pub closed_score: f64,
    /// A node whose simulation score is at least this gets a single Finish child.
    pub finish_threshold: f64,
    /// Rollout budget: a node at depth d gets `max(floor(budget / (d + 1)), min_rollouts)`.
    pub rollout_budget: usize,
    /// The least number of rollouts of any node.
    pub min_rollouts: usize,
    /// Stop expanding once the tree holds this many nodes (the root included).
    pub max_nodes: usize,
    /// Stop expanding once this many correct leaves exist; with fewer at the
    /// end, unfinished leaves are forced to finish.
    pub stop_correct_leaves: usize,
    /// A finished leaf is correct if its verified reward is at least this.
    pub correct_threshold: f64,
    /// Enable the later MedS3 Reflect action ("But wait, ..." revisions).
    pub reflect: bool,
    /// A wrong finished leaf whose value is below this may get one Reflect child.
    pub reflect_below: f64,
    /// Safety cap: a leaf at this depth or deeper is expanded with Finish.
    pub max_depth: usize,
    /// Forced finishing only finishes open leaves whose value is at least
    /// this (0: all, as MedS3 does): a leaf whose rollouts never reached the
    /// answer mostly yields a chain that is right by luck, if at all.
    pub finish_min_value: f64,
}

impl Default for MctsConfig {
    fn default() -> Self {
        MctsConfig {
            max_children: 3,
            c: 2.0,
            unvisited_score: 5.0,
            closed_score: -1.0,
            finish_threshold: 0.9,
            rollout_budget: 20,
            min_rollouts: 5,
            max_nodes: 20,
            stop_correct_leaves: 4,
            correct_threshold: 0.9,
            reflect: false,
            reflect_below: 0.5,
            max_depth: 12,
            finish_min_value: 0.0,
        }
    }
}

impl MctsConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("max_children", self.max_children),
            ("min_rollouts", self.min_rollouts),
            ("max_nodes", self.max_nodes),
            ("stop_correct_leaves", self.stop_correct_leaves),
            ("max_depth", self.max_depth),
        ] {
            if v == 0 {
                bail!("mcts.{name} must be at least 1");
            }
        }
        for (name, v) in [
            ("finish_threshold", self.finish_threshold),
            ("correct_threshold", self.correct_threshold),
            ("reflect_below", self.reflect_below),
            ("finish_min_value", self.finish_min_value),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("mcts.{name} must be in [0, 1], got {v}");
            }
        }
        if !(self.c.is_finite() && self.c >= 0.0) {
            bail!("mcts.c must be a finite number >= 0, got {}", self.c);
        }
        if !self.unvisited_score.is_finite() {
            bail!("mcts.unvisited_score must be finite");
        }
        if !(self.closed_score.is_finite() && self.closed_score < 0.0) {
            bail!(
                "mcts.closed_score must be a finite negative number (below every open child's UCT score), got {}",
                self.closed_score
            );
        }
        Ok(())
    }

    /// `n(d) = max(floor(rollout_budget / (d + 1)), min_rollouts)`: deeper
    /// nodes carry more of the solution, so fewer completions suffice.
    pub fn rollouts_at(&self, depth: usize) -> usize {
        (self.rollout_budget / (depth + 1)).max(self.min_rollouts)
    }
}

/// What a [`StepModel::expand`] call must generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expand {
    /// This many candidate next steps.
    Reason(usize),
    /// One step that ends with "The answer is ...".
    Finish,
    /// One revision step, starting "But wait, " (the text returned includes it).
    Reflect,
}

impl Expand {
    fn count(self) -> usize {
        match self {
            Expand::Reason(k) => k,
            Expand::Finish | Expand::Reflect => 1,
        }
    }
}

/// The text generator the search drives: a policy in production, a script
/// in tests. Each method is one batched generation call.
pub trait StepModel {
    /// Candidate next steps continuing the path root..=node
    /// ([`Tree::render_prefix`]), all generated in one batched call: exactly
    /// `k` texts for `Reason(k)`, one for `Finish` and `Reflect`. Texts are
    /// the step alone, without the "Step k:" marker; surrounding whitespace
    /// is trimmed.
    fn expand(&mut self, tree: &Tree, node: NodeId, how: Expand) -> Result<Vec<String>>;

    /// For each `(node, n)`: `n` completions from the end of that node's path
    /// to a final answer, all requests in one batched call. Each completion
    /// is verified on its own text, so it must state the answer ("The answer
    /// is ..."); one that states none counts as wrong. `iteration` is
    /// the self-evolution round (0 = first: the implementer samples direct
    /// answers at temperature 0.6 there, free continuations later).
    fn rollouts(
        &mut self,
        tree: &Tree,
        requests: &[(NodeId, usize)],
        iteration: usize,
    ) -> Result<Vec<Vec<String>>>;
}

pub type NodeId = usize;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub parent: Option<NodeId>,
    pub children: Vec<NodeId>,
    /// The step number: the root is 0, its children are step 1.
    pub depth: usize,
    /// The step text, without its "Step k:" marker.
    pub text: String,
    /// `Step::new`'s classification of `text`.
    pub kind: StepKind,
    /// Back-propagations through this node, its own evaluation counting one.
    pub visits: usize,
    /// The current MCTS value.
    pub value: f64,
    /// The value at creation: the rollout accuracy, or for a finished node its
    /// verified reward 1/0; 0 for the root, which is never rolled out.
    pub sim_score: f64,
    /// States a final answer, or was generated by `Expand::Finish`.
    pub finished: bool,
    /// Finished with `sim_score >= correct_threshold`.
    pub correct: bool,
    /// This node or one of its ancestors is a Reflect step.
    pub reflected: bool,
    /// Never selected again: a finished leaf that may not reflect, or a node
    /// whose children are all closed.
    pub closed: bool,
}

/// A search tree in an arena: node ids are indices into `nodes`, node 0 is
/// the root, and a node's parent always has a smaller id.
///
/// Back-propagation of a newly scored node (`value = sim_score`) counts its
/// own visit (`visits = 1`), then walks its ancestors from the parent up to
/// the root. Each ancestor's visit count goes up by one, and its value `v`
/// (its current value: its own rollout value until it first gets children, 0
/// for a fresh root) becomes `v' = 0.5 * (v + sum_ch(n_ch * v_ch) /
/// sum_ch(n_ch))` over its children, using their current visits and values
/// (a child below on the path has already been updated). The children of one
/// expansion are back-propagated one by one in generation order, as if
/// generated one after another; a child not yet back-propagated has n = 0 and
/// does not count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    /// A tree holding only the root.
    pub fn new() -> Self {
        let root = Step::new(ROOT_TEXT);
        Tree {
            nodes: vec![Node {
                parent: None,
                children: Vec::new(),
                depth: 0,
                text: root.text,
                kind: root.kind,
                visits: 0,
                value: 0.0,
                sim_score: 0.0,
                finished: false,
                correct: false,
                reflected: false,
                closed: false,
            }],
        }
    }

    /// The node ids from the root to `node`, both included. Panics if `node`
    /// is not in the tree.
    pub fn path(&self, node: NodeId) -> Vec<NodeId> {
        let mut path = vec![node];
        let mut cur = self.nodes[node].parent;
        while let Some(id) = cur {
            path.push(id);
            cur = self.nodes[id].parent;
        }
        path.reverse();
        path
    }

    /// The reasoning so far: the root text, then "\n\nStep k: text" for each
    /// step on the path to `node`.
    pub fn render_path(&self, node: NodeId) -> String {
        let mut s = self.nodes[0].text.clone();
        for (k, &id) in self.path(node).iter().enumerate().skip(1) {
            s.push_str(&format!("\n\nStep {k}: {}", self.nodes[id].text));
        }
        s
    }

    /// What a model continues from to write the step after `node`:
    /// `render_path(node) + "\n\nStep {d+1}:"` with d = `node`'s depth, e.g.
    /// "Let's break down this problem step by step.\n\nStep 1: ...\n\nStep 2:".
    /// Generation stops at the next "Step {d+2}:", so one call yields exactly
    /// one step; the trimmed output is the step text. The question comes
    /// before this text in the prompt, which is the model's business.
    ///
    /// For a child c of `node`, `render_path(c)` is this text + " " + c's text,
    /// so every prefix extends its parent's, and a KV cache of the parent's
    /// prefix serves its children.
    pub fn render_prefix(&self, node: NodeId) -> String {
        format!(
            "{}\n\nStep {}:",
            self.render_path(node),
            self.nodes[node].depth + 1
        )
    }

    /// Nodes without children.
    pub fn leaves(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.nodes.len()).filter(|&id| self.nodes[id].children.is_empty())
    }

    /// Correct finished leaves (a correct node never gets children).
    pub fn correct_leaves(&self) -> usize {
        self.nodes.iter().filter(|n| n.correct).count()
    }

    /// The selection score of `child`: `closed_score` if closed,
    /// `unvisited_score` if never visited, else
    /// `value + c * sqrt(ln N_parent / n_child)`. (The root has no parent;
    /// it is never selected and scores its value.)
    pub fn uct_score(&self, child: NodeId, cfg: &MctsConfig) -> f64 {
        let n = &self.nodes[child];
        if n.closed {
            return cfg.closed_score;
        }
        if n.visits == 0 {
            return cfg.unvisited_score;
        }
        let parent_visits = n.parent.map_or(1, |p| self.nodes[p].visits.max(1));
        n.value + cfg.c * ((parent_visits as f64).ln() / n.visits as f64).sqrt()
    }

    /// Whether a finished leaf may get a Reflect child.
    fn may_reflect(&self, node: NodeId, cfg: &MctsConfig) -> bool {
        let n = &self.nodes[node];
        cfg.reflect
            && n.finished
            && !n.correct
            && !n.reflected
            && n.children.is_empty()
            && n.value < cfg.reflect_below
    }

    fn should_stop(&self, cfg: &MctsConfig) -> bool {
        self.nodes.len() >= cfg.max_nodes
            || self.correct_leaves() >= cfg.stop_correct_leaves
            || self.nodes[0].closed
    }

    /// The leaf to expand next, or `None` when no node is open.
    fn select(&self, cfg: &MctsConfig) -> Option<NodeId> {
        let mut node = 0;
        if self.nodes[node].closed {
            return None;
        }
        while !self.nodes[node].children.is_empty() {
            let mut best: Option<(NodeId, f64)> = None;
            for &child in &self.nodes[node].children {
                if self.nodes[child].closed {
                    continue;
                }
                let score = self.uct_score(child, cfg);
                if best.is_none_or(|(_, b)| score > b) {
                    best = Some((child, score));
                }
            }
            node = best?.0;
        }
        Some(node)
    }

    /// How a selected leaf is expanded.
    fn expansion_for(&self, leaf: NodeId, cfg: &MctsConfig) -> Expand {
        let n = &self.nodes[leaf];
        if n.finished {
            // Only a leaf that may reflect is open while finished.
            Expand::Reflect
        } else if n.depth >= cfg.max_depth || (n.depth > 0 && n.sim_score >= cfg.finish_threshold) {
            Expand::Finish
        } else {
            Expand::Reason(cfg.max_children)
        }
    }

    fn add_child(&mut self, parent: NodeId, text: &str, how: Expand) -> NodeId {
        let step = Step::new(text.trim());
        let finished = how == Expand::Finish || verify::extract_answer(&step.text).is_some();
        let reflected = self.nodes[parent].reflected
            || how == Expand::Reflect
            || step.kind == StepKind::Reflect;
        let id = self.nodes.len();
        self.nodes.push(Node {
            parent: Some(parent),
            children: Vec::new(),
            depth: self.nodes[parent].depth + 1,
            text: step.text,
            kind: step.kind,
            visits: 0,
            value: 0.0,
            sim_score: 0.0,
            finished,
            correct: false,
            reflected,
            closed: false,
        });
        self.nodes[parent].children.push(id);
        id
    }

    /// Records a new node's evaluation; its visit is counted when it is
    /// back-propagated.
    fn set_score(&mut self, node: NodeId, score: f64, cfg: &MctsConfig) {
        let n = &mut self.nodes[node];
        n.sim_score = score;
        n.value = score;
        n.correct = n.finished && score >= cfg.correct_threshold;
        let closed = n.finished && !self.may_reflect(node, cfg);
        self.nodes[node].closed = closed;
    }

    /// Counts a newly scored node's visit and updates its ancestors, as the
    /// [`Tree`] docs describe.
    fn backpropagate(&mut self, node: NodeId) {
        self.nodes[node].visits = 1;
        let mut cur = self.nodes[node].parent;
        while let Some(id) = cur {
            let children = &self.nodes[id].children;
            // The child on the path has been visited, so `total` >= 1.
            let (weighted, total) = children.iter().fold((0.0, 0usize), |(w, t), &c| {
                let ch = &self.nodes[c];
                (w + ch.visits as f64 * ch.value, t + ch.visits)
            });
            let closed = children.iter().all(|&c| self.nodes[c].closed);
            let n = &mut self.nodes[id];
            n.visits += 1;
            n.value = 0.5 * (n.value + weighted / total as f64);
            n.closed = closed;
            cur = n.parent;
        }
    }
}

/// Runs MedS3's tree search on `problem` (see the module docs) and returns
/// the final tree. `iteration` is handed to [`StepModel::rollouts`]. Fails
/// on an invalid `cfg`, on a model error, or when the model returns a number
/// of texts other than the one asked for.
pub fn search(
    problem: &Problem,
    cfg: &MctsConfig,
    model: &mut dyn StepModel,
    iteration: usize,
) -> Result<Tree> {
    cfg.validate()?;
    let mut run = Search {
        problem,
        cfg,
        model,
        iteration,
        tree: Tree::new(),
    };
    // Every pass adds at least one node, so `max_nodes` bounds the loop.
    while !run.tree.should_stop(cfg) {
        let Some(leaf) = run.tree.select(cfg) else {
            break;
        };
        run.grow(leaf, run.tree.expansion_for(leaf, cfg))?;
    }
    if run.tree.correct_leaves() < cfg.stop_correct_leaves {
        let open: Vec<NodeId> = run
            .tree
            .leaves()
            .filter(|&id| {
                let n = &run.tree.nodes[id];
                !n.finished && n.value >= cfg.finish_min_value
            })
            .collect();
        for leaf in open {
            run.grow(leaf, Expand::Finish)?;
        }
    }
    Ok(run.tree)
}

/// One search in progress.
struct Search<'a> {
    problem: &'a Problem,
    cfg: &'a MctsConfig,
    model: &'a mut dyn StepModel,
    iteration: usize,
    tree: Tree,
}

impl Search<'_> {
    /// Expands `leaf`, scores the new children and back-propagates them.
    fn grow(&mut self, leaf: NodeId, how: Expand) -> Result<()> {
        let (tree, cfg, problem) = (&mut self.tree, self.cfg, self.problem);
        let texts = self.model.expand(tree, leaf, how)?;
        ensure!(
            texts.len() == how.count(),
            "StepModel::expand({how:?}) on node {leaf} returned {} texts, expected {}",
            texts.len(),
            how.count()
        );
        let children: Vec<NodeId> = texts.iter().map(|t| tree.add_child(leaf, t, how)).collect();

        let mut requests = Vec::new();
        for &c in &children {
            if tree.nodes[c].finished {
                let reward = verify::verify(problem, &tree.nodes[c].text).correct;
                tree.set_score(c, if reward { 1.0 } else { 0.0 }, cfg);
            } else {
                requests.push((c, cfg.rollouts_at(tree.nodes[c].depth)));
            }
        }
        if !requests.is_empty() {
            let outs = self.model.rollouts(tree, &requests, self.iteration)?;
            ensure!(
                outs.len() == requests.len(),
                "StepModel::rollouts returned {} lists for {} requests",
                outs.len(),
                requests.len()
            );
            for (&(c, n), completions) in requests.iter().zip(&outs) {
                ensure!(
                    completions.len() == n,
                    "StepModel::rollouts returned {} completions for node {c}, expected {n}",
                    completions.len()
                );
                let correct = completions
                    .iter()
                    .filter(|t| verify::verify(problem, t).correct)
                    .count();
                tree.set_score(c, correct as f64 / n as f64, cfg);
            }
        }
        for &c in &children {
            tree.backpropagate(c);
        }
        Ok(())
    }
}

/// One step of a chain, written `[step_text, value, sim_score]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    from = "(String, f64, Option<f64>)",
    into = "(String, f64, Option<f64>)"
)]
pub struct Meds3Step {
    pub text: String,
    pub value: f64,
    /// `null` in MedS3's files for steps it never rolled out.
    pub sim_score: Option<f64>,
}

impl From<(String, f64, Option<f64>)> for Meds3Step {
    fn from((text, value, sim_score): (String, f64, Option<f64>)) -> Self {
        Meds3Step {
            text,
            value,
            sim_score,
        }
    }
}

impl From<Meds3Step> for (String, f64, Option<f64>) {
    fn from(s: Meds3Step) -> Self {
        (s.text, s.value, s.sim_score)
    }
}

/// A finished leaf, written `[chain, leaf_value, sim_score]`; `chain` runs
/// from step 1 to the leaf.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    from = "(Vec<Meds3Step>, f64, Option<f64>)",
    into = "(Vec<Meds3Step>, f64, Option<f64>)"
)]
pub struct Meds3Leaf {
    pub chain: Vec<Meds3Step>,
    pub value: f64,
    pub sim_score: Option<f64>,
}

impl From<(Vec<Meds3Step>, f64, Option<f64>)> for Meds3Leaf {
    fn from((chain, value, sim_score): (Vec<Meds3Step>, f64, Option<f64>)) -> Self {
        Meds3Leaf {
            chain,
            value,
            sim_score,
        }
    }
}

impl From<Meds3Leaf> for (Vec<Meds3Step>, f64, Option<f64>) {
    fn from(l: Meds3Leaf) -> Self {
        (l.chain, l.value, l.sim_score)
    }
}

/// One question's search result in MedS3's release format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meds3Record {
    pub id: String,
    /// The question as the model saw it (stem and options).
    pub question: String,
    /// The gold option letter, or the gold text.
    pub answer: String,
    /// Correct finished leaves.
    #[serde(default)]
    pub pos: Vec<Meds3Leaf>,
    /// Wrong finished leaves.
    #[serde(default)]
    pub neg: Vec<Meds3Leaf>,
}

impl Meds3Record {
    pub fn from_tree(problem: &Problem, tree: &Tree) -> Self {
        let leaf = |id: NodeId| {
            let n = &tree.nodes[id];
            let chain = tree.path(id)[1..]
                .iter()
                .map(|&s| Meds3Step {
                    text: tree.nodes[s].text.clone(),
                    value: tree.nodes[s].value,
                    sim_score: Some(tree.nodes[s].sim_score),
                })
                .collect();
            Meds3Leaf {
                chain,
                value: n.value,
                sim_score: Some(n.sim_score),
            }
        };
        let finished = || tree.leaves().filter(|&id| tree.nodes[id].finished);
        Meds3Record {
            id: problem.id.clone(),
            question: problem.prompt_text(),
            answer: match &problem.gold {
                Gold::Option(letter) => letter.clone(),
                Gold::Text(text) => text.clone(),
            },
            pos: finished()
                .filter(|&id| tree.nodes[id].correct)
                .map(leaf)
                .collect(),
            neg: finished()
                .filter(|&id| !tree.nodes[id].correct)
                .map(leaf)
                .collect(),
        }
    }
}

/// `{id, question, answer, pos: [[chain, leaf_value, sim_score], ...], neg: [...]}`
/// for one searched problem, one JSONL line of MedS3's release format.
pub fn to_record(problem: &Problem, tree: &Tree) -> serde_json::Value {
    serde_json::json!(Meds3Record::from_tree(problem, tree))
}

/// Reads a JSONL file of [`Meds3Record`]s, skipping blank lines. MedS3's own
/// files start each chain with the root step; it is dropped so that chains
/// from both sources begin at step 1.
pub fn read_records(path: &Path) -> Result<Vec<Meds3Record>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading MedS3 records from {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut record: Meds3Record = serde_json::from_str(line).map_err(|e| {
            anyhow!(
                "{}:{}: not a MedS3 record {{id, question, answer, pos, neg}}: {e}",
                path.display(),
                i + 1
            )
        })?;
        for leaf in record.pos.iter_mut().chain(record.neg.iter_mut()) {
            if leaf.chain.first().is_some_and(|s| s.text == ROOT_TEXT) {
                leaf.chain.remove(0);
            }
        }
        records.push(record);
    }
    Ok(records)
}

/// The chain as SFT text: "Step 1: ...\n\nStep 2: ...".
pub fn sft_text(chain: &[Meds3Step]) -> String {
    let steps: Vec<Step> = chain.iter().map(|s| Step::new(s.text.clone())).collect();
    render_chain(&steps)
}

/// PRM soft labels: label k is the MCTS value of step k (steps 1..=K).
pub fn soft_labels(chain: &[Meds3Step]) -> Vec<f64> {
    chain.iter().map(|s| s.value).collect()
}

/// Dual-sided PRM labels over steps i = 1..=K (chain index i - 1): `l_1 =
/// v_1`, `l_i = v_i - lambda * (l_{i-1} - v_i)` for i >= 2. A step that
/// lowers the value below the previous label is pushed further down, one that
/// raises it further up. Each label is clamped to [0, 1], as it is a BCE
/// target, and the recursion continues from the clamped label.
pub fn dual_sided_labels(chain: &[Meds3Step], lambda: f64) -> Vec<f64> {
    let mut labels: Vec<f64> = Vec::with_capacity(chain.len());
    for s in chain {
        let l = match labels.last() {
            None => s.value,
            Some(&prev) => s.value - lambda * (prev - s.value),
        };
        labels.push(l.clamp(0.0, 1.0));
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use medzero_envs::Choice;
    use std::io::Write;

    /// A SynthClinic-style diagnosis item; the gold answer is A.
    fn pneumonia() -> Problem {
        let options = [
            ("A", "Community-acquired pneumonia"),
            ("B", "Pulmonary embolism"),
            ("C", "Lung abscess"),
            ("D", "Acute bronchitis"),
        ];
        Problem {
            id: "synthclinic-0007".to_string(),
            question: "A 64-year-old man presents with fever and productive cough. \
                Examination shows crackles over the right lower lobe. Laboratory studies \
                show WBC 15.2 x10^9/L. What is the most likely diagnosis?"
                .to_string(),
            options: options
                .iter()
                .map(|(l, t)| Choice {
                    letter: l.to_string(),
                    text: t.to_string(),
                })
                .collect(),
            gold: Gold::Option("A".to_string()),
            task: "diagnosis".to_string(),
            source: "synthclinic".to_string(),
            metadata: Default::default(),
        }
    }

    const RIGHT: &str = "The answer is A.";
    /// Wrong under strict checking, right under MedS3's public check (the
    /// gold letter "a" appears in "Pulmonary").
    const WRONG: &str = "The answer is B. Pulmonary embolism";

    type ExpandFn = Box<dyn FnMut(&Tree, NodeId, Expand) -> Vec<String>>;

    /// A scripted model. A step's rollouts are right in `round(p * n)` of `n`
    /// completions, `p` read from a "[p=0.5]" tag in its text (else 0).
    struct Script {
        expand: ExpandFn,
        expansions: Vec<(NodeId, Expand)>,
        rollout_calls: Vec<(Vec<(NodeId, usize)>, usize)>,
        /// Return one rollout list too few (to test shape errors).
        short_rollouts: bool,
    }

    impl Script {
        fn new(expand: impl FnMut(&Tree, NodeId, Expand) -> Vec<String> + 'static) -> Self {
            Script {
                expand: Box::new(expand),
                expansions: Vec::new(),
                rollout_calls: Vec::new(),
                short_rollouts: false,
            }
        }
    }

    impl StepModel for Script {
        fn expand(&mut self, tree: &Tree, node: NodeId, how: Expand) -> Result<Vec<String>> {
            self.expansions.push((node, how));
            Ok((self.expand)(tree, node, how))
        }

        fn rollouts(
            &mut self,
            tree: &Tree,
            requests: &[(NodeId, usize)],
            iteration: usize,
        ) -> Result<Vec<Vec<String>>> {
            self.rollout_calls.push((requests.to_vec(), iteration));
            let mut outs: Vec<Vec<String>> = requests
                .iter()
                .map(|&(id, n)| {
                    let p = tree.nodes[id]
                        .text
                        .split("[p=")
                        .nth(1)
                        .and_then(|r| r.split(']').next())
                        .and_then(|p| p.parse::<f64>().ok())
                        .unwrap_or(0.0);
                    let right = (p * n as f64).round() as usize;
                    (0..n)
                        .map(|i| if i < right { RIGHT } else { WRONG }.to_string())
                        .collect()
                })
                .collect();
            if self.short_rollouts {
                outs.pop();
            }
            Ok(outs)
        }
    }

    fn texts(ts: &[&str]) -> Vec<String> {
        ts.iter().map(|t| t.to_string()).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Root children valued 0.5, 0.2, 0.8; every Finish answers A under
    /// node 3 and B elsewhere.
    fn three_reasons(tree: &Tree, node: NodeId, how: Expand) -> Vec<String> {
        match how {
            Expand::Reason(_) if node == 0 => texts(&[
                "Fever with productive cough suggests a lower respiratory infection. [p=0.5]",
                "Pleuritic pain would point to embolism, but none is reported. [p=0.2]",
                "Focal crackles and leukocytosis indicate lobar consolidation. [p=0.8]",
            ]),
            Expand::Reason(k) => vec![format!("Step under {}. [p=0.5]", tree.nodes[node].depth); k],
            Expand::Finish if node == 3 => texts(&[RIGHT]),
            Expand::Finish => texts(&["The answer is B."]),
            Expand::Reflect => texts(&["But wait, reconsider."]),
        }
    }

    #[test]
    fn config_defaults_are_the_papers_and_validate() {
        let cfg = MctsConfig::default();
        assert_eq!(
            (cfg.max_children, cfg.c, cfg.unvisited_score),
            (3, 2.0, 5.0)
        );
        assert_eq!((cfg.closed_score, cfg.finish_threshold), (-1.0, 0.9));
        assert_eq!(
            (cfg.rollout_budget, cfg.min_rollouts, cfg.max_nodes),
            (20, 5, 20)
        );
        assert_eq!((cfg.stop_correct_leaves, cfg.correct_threshold), (4, 0.9));
        assert_eq!(
            (cfg.reflect, cfg.reflect_below, cfg.max_depth),
            (false, 0.5, 12)
        );
        cfg.validate().unwrap();

        let partial: MctsConfig = serde_json::from_str(r#"{"max_nodes": 60}"#).unwrap();
        assert_eq!(partial.max_nodes, 60);
        assert_eq!(partial.max_children, 3);
        assert!(serde_json::from_str::<MctsConfig>(r#"{"max_child": 3}"#).is_err());

        for bad in [
            MctsConfig {
                max_children: 0,
                ..MctsConfig::default()
            },
            MctsConfig {
                finish_threshold: 1.5,
                ..MctsConfig::default()
            },
            MctsConfig {
                closed_score: 0.0,
                ..MctsConfig::default()
            },
            MctsConfig {
                c: f64::NAN,
                ..MctsConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let err = MctsConfig {
            min_rollouts: 0,
            ..MctsConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("mcts.min_rollouts"), "{err}");
    }

    #[test]
    fn rollouts_per_depth() {
        let cfg = MctsConfig::default();
        let n: Vec<usize> = (0..6).map(|d| cfg.rollouts_at(d)).collect();
        assert_eq!(n, [20, 10, 6, 5, 5, 5]);
    }

    /// root -> a -> b, root -> a2, with the values below; b is freshly
    /// scored and not yet back-propagated.
    fn hand_tree() -> Tree {
        let mut t = Tree::new();
        let a = t.add_child(
            0,
            "Crackles localise the process to the right lower lobe.",
            Expand::Reason(2),
        );
        let a2 = t.add_child(0, "Consider a pulmonary embolism.", Expand::Reason(2));
        let b = t.add_child(
            a,
            "Consolidation with fever means pneumonia.",
            Expand::Reason(1),
        );
        for (id, value, visits) in [(0, 0.25, 2), (a, 0.6, 1), (a2, 0.3, 1), (b, 0.2, 0)] {
            t.nodes[id].value = value;
            t.nodes[id].sim_score = value;
            t.nodes[id].visits = visits;
        }
        t
    }

    #[test]
    fn uct_scores() {
        let cfg = MctsConfig::default();
        let mut t = hand_tree();
        t.nodes[0].visits = 10;
        t.nodes[2].visits = 3;
        t.nodes[2].value = 0.5;
        t.nodes[3].visits = 1;
        // 0.5 + 2 * sqrt(ln 10 / 3) = 0.5 + 2 * 0.876087...
        assert!((t.uct_score(2, &cfg) - 2.252_174_5).abs() < 1e-6);
        assert!(close(
            t.uct_score(2, &cfg),
            0.5 + 2.0 * (10f64.ln() / 3.0).sqrt()
        ));
        // A parent visited once gives no exploration bonus.
        assert!(close(t.uct_score(3, &cfg), 0.2));

        let unvisited = t.add_child(0, "Order a chest X-ray.", Expand::Reason(3));
        assert_eq!(t.uct_score(unvisited, &cfg), 5.0);

        let correct = t.add_child(0, RIGHT, Expand::Reason(3));
        t.set_score(correct, 1.0, &cfg);
        assert!(t.nodes[correct].correct && t.nodes[correct].closed);
        assert_eq!(t.uct_score(correct, &cfg), -1.0);

        t.nodes[1].closed = true;
        assert_eq!(t.uct_score(1, &cfg), -1.0);
    }

    #[test]
    fn backpropagation_on_three_levels() {
        let mut t = hand_tree();
        // b (0.2) was just evaluated under a (0.6), whose sibling a2 is 0.3.
        t.backpropagate(3);
        // a: 0.5 * (0.6 + 0.2 / 1) = 0.4, visited twice.
        assert_eq!(t.nodes[1].visits, 2);
        assert!(close(t.nodes[1].value, 0.4));
        // root: 0.5 * (0.25 + (2 * 0.4 + 1 * 0.3) / 3) = 37/120.
        assert_eq!(t.nodes[0].visits, 3);
        assert!(close(t.nodes[0].value, 37.0 / 120.0));

        // A second child of a, valued 1.0.
        let b2 = t.add_child(1, RIGHT, Expand::Reason(1));
        t.set_score(b2, 1.0, &MctsConfig::default());
        t.backpropagate(b2);
        // a: 0.5 * (0.4 + (0.2 + 1.0) / 2) = 0.5.
        assert_eq!(t.nodes[1].visits, 3);
        assert!(close(t.nodes[1].value, 0.5));
        // root: 0.5 * (37/120 + (3 * 0.5 + 0.3) / 4) = 91/240.
        assert_eq!(t.nodes[0].visits, 4);
        assert!(close(t.nodes[0].value, 91.0 / 240.0));
        // Values of the leaves themselves do not move.
        assert!(close(t.nodes[3].value, 0.2) && close(t.nodes[2].value, 0.3));
    }

    #[test]
    fn render_prefix_and_path() {
        let t = hand_tree();
        assert_eq!(t.path(3), [0, 1, 3]);
        assert_eq!(
            t.render_prefix(0),
            "Let's break down this problem step by step.\n\nStep 1:"
        );
        assert_eq!(
            t.render_path(3),
            "Let's break down this problem step by step.\n\n\
             Step 1: Crackles localise the process to the right lower lobe.\n\n\
             Step 2: Consolidation with fever means pneumonia."
        );
        assert_eq!(
            t.render_prefix(3),
            format!("{}\n\nStep 3:", t.render_path(3))
        );
        // A child's path extends its parent's prefix by " " + its text.
        assert_eq!(
            t.render_path(3),
            format!("{} {}", t.render_prefix(1), t.nodes[3].text)
        );
        assert!(t.render_prefix(3).starts_with(&t.render_prefix(1)));
    }

    #[test]
    fn max_nodes_stops_then_unfinished_leaves_are_forced_to_finish() {
        let cfg = MctsConfig {
            max_nodes: 4,
            ..MctsConfig::default()
        };
        let mut model = Script::new(three_reasons);
        let t = search(&pneumonia(), &cfg, &mut model, 1).unwrap();

        // One expansion of the root, its three rollouts in one call of
        // n(1) = 10 each, carrying the iteration.
        assert_eq!(model.rollout_calls, [(vec![(1, 10), (2, 10), (3, 10)], 1)]);
        // Strict checking: WRONG completions do not count.
        let sims: Vec<f64> = (1..=3).map(|i| t.nodes[i].sim_score).collect();
        assert_eq!(sims, [0.5, 0.2, 0.8]);
        // The tree reached max_nodes = 4; 0 correct leaves <= 3, so each
        // unfinished leaf gets one Finish child, in node order.
        assert_eq!(
            model.expansions,
            [
                (0, Expand::Reason(3)),
                (1, Expand::Finish),
                (2, Expand::Finish),
                (3, Expand::Finish)
            ]
        );
        assert_eq!(t.nodes.len(), 7);
        for (leaf, parent, reward) in [(4, 1, 0.0), (5, 2, 0.0), (6, 3, 1.0)] {
            let n = &t.nodes[leaf];
            assert_eq!((n.parent, n.depth, n.finished), (Some(parent), 2, true));
            assert_eq!(
                (n.sim_score, n.value, n.kind),
                (reward, reward, StepKind::Finish)
            );
        }
        assert_eq!(t.correct_leaves(), 1);
        assert!(t.nodes[0].closed);
        // Root: 0 -> 0.25 -> 0.3 -> 0.4 from the three children, then
        // 0.3875 -> 0.34375 -> 73/192 from the forced finishes; each child
        // i: 0.5 * (sim_i + reward_i).
        assert_eq!(t.nodes[0].visits, 6);
        assert!(close(t.nodes[0].value, 73.0 / 192.0));
        let values: Vec<f64> = (1..=3).map(|i| t.nodes[i].value).collect();
        assert!(close(values[0], 0.25) && close(values[1], 0.1) && close(values[2], 0.9));
    }

    #[test]
    fn forced_finishing_skips_leaves_below_finish_min_value() {
        let cfg = MctsConfig {
            max_nodes: 4,
            finish_min_value: 0.3,
            ..MctsConfig::default()
        };
        let mut model = Script::new(three_reasons);
        let t = search(&pneumonia(), &cfg, &mut model, 1).unwrap();
        // Values 0.5, 0.2, 0.8 before finishing: node 2 stays open.
        assert_eq!(
            model.expansions,
            [
                (0, Expand::Reason(3)),
                (1, Expand::Finish),
                (3, Expand::Finish)
            ]
        );
        assert!(!t.nodes[2].finished && t.nodes[2].children.is_empty());
        let bad = MctsConfig {
            finish_min_value: 1.5,
            ..MctsConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn selection_follows_uct() {
        let cfg = MctsConfig {
            max_nodes: 7,
            ..MctsConfig::default()
        };
        let mut model = Script::new(three_reasons);
        let t = search(&pneumonia(), &cfg, &mut model, 0).unwrap();
        // With equal visits the bonus is equal, so the 0.8 child is expanded.
        assert_eq!(model.expansions[1], (3, Expand::Reason(3)));
        // Its children roll out n(2) = 6 times each.
        assert_eq!(model.rollout_calls[1].0, [(4, 6), (5, 6), (6, 6)]);
        // Its own visit, its 3 children, and a forced finish under each.
        assert_eq!(t.nodes[3].visits, 7);
        assert_eq!(t.nodes[3].children.len(), 3);
    }

    #[test]
    fn stops_at_correct_leaves_without_forcing() {
        let mut model = Script::new(|_, node, how| match (node, how) {
            (0, Expand::Reason(_)) => texts(&["Infection is likely. [p=0.3]"; 3]),
            (1, Expand::Reason(_)) => texts(&[RIGHT; 3]),
            (2, Expand::Reason(_)) => texts(&[RIGHT, "The answer is C.", "Check sputum. [p=0.1]"]),
            other => panic!("unexpected expansion {other:?}"),
        });
        let cfg = MctsConfig {
            max_nodes: 100,
            ..MctsConfig::default()
        };
        let t = search(&pneumonia(), &cfg, &mut model, 0).unwrap();
        // Ties in UCT go to the first child: node 1, then node 2 once node 1
        // is closed (all its children correct).
        assert_eq!(
            model.expansions,
            [
                (0, Expand::Reason(3)),
                (1, Expand::Reason(3)),
                (2, Expand::Reason(3))
            ]
        );
        assert!(t.nodes[1].closed);
        assert_eq!(t.correct_leaves(), 4);
        // Only the unfinished child of node 2 was rolled out.
        assert_eq!(model.rollout_calls.len(), 2);
        assert_eq!(model.rollout_calls[1].0, [(9, 6)]);
        // 4 correct leaves: no forced finish, node 3 stays open.
        assert_eq!(t.nodes.len(), 10);
        assert!(t.nodes[3].children.is_empty() && !t.nodes[3].finished);
    }

    #[test]
    fn stops_when_all_leaves_are_finished() {
        let mut model =
            Script::new(|_, _, _| texts(&[RIGHT, "The answer is B.", "The answer is C."]));
        let t = search(&pneumonia(), &MctsConfig::default(), &mut model, 0).unwrap();
        assert_eq!(model.expansions, [(0, Expand::Reason(3))]);
        assert!(model.rollout_calls.is_empty());
        assert_eq!(t.nodes.len(), 4);
        assert!(t.nodes[0].closed);
        assert_eq!(t.correct_leaves(), 1);
        let rewards: Vec<f64> = (1..=3).map(|i| t.nodes[i].sim_score).collect();
        assert_eq!(rewards, [1.0, 0.0, 0.0]);
    }

    #[test]
    fn confident_node_gets_a_single_finish_child() {
        let mut model = Script::new(|_, node, how| match (node, how) {
            (0, Expand::Reason(_)) => texts(&[
                "Lobar crackles with fever are classic for pneumonia. [p=1.0]",
                "Embolism is possible. [p=0.2]",
                "So is bronchitis. [p=0.2]",
            ]),
            (_, Expand::Finish) => {
                texts(&["Community-acquired pneumonia fits best. The answer is A."])
            }
            other => panic!("unexpected expansion {other:?}"),
        });
        let cfg = MctsConfig {
            max_nodes: 5,
            ..MctsConfig::default()
        };
        let t = search(&pneumonia(), &cfg, &mut model, 0).unwrap();
        assert_eq!(t.nodes[1].sim_score, 1.0);
        assert_eq!(model.expansions[1], (1, Expand::Finish));
        assert_eq!(t.nodes[1].children, [4]);
        let finish = &t.nodes[4];
        assert!(finish.finished && finish.correct && finish.closed);
        assert_eq!(finish.depth, 2);
    }

    #[test]
    fn max_depth_forces_finish_even_without_an_answer() {
        let mut model = Script::new(|_, node, how| match (node, how) {
            (0, Expand::Reason(_)) => texts(&["Think about infection. [p=0.2]"; 3]),
            (_, Expand::Finish) => texts(&["I cannot decide."]),
            other => panic!("unexpected expansion {other:?}"),
        });
        let cfg = MctsConfig {
            max_depth: 1,
            max_nodes: 5,
            ..MctsConfig::default()
        };
        let t = search(&pneumonia(), &cfg, &mut model, 0).unwrap();
        assert_eq!(model.expansions[1], (1, Expand::Finish));
        // No answer: a wrong finished leaf, classified Reason by its text.
        let n = &t.nodes[4];
        assert!(n.finished && !n.correct && n.closed);
        assert_eq!((n.kind, n.sim_score), (StepKind::Reason, 0.0));
    }

    #[test]
    fn reflect_at_most_once_per_path() {
        let script = |_: &Tree, node: NodeId, how: Expand| match (node, how) {
            (0, Expand::Reason(_)) => texts(&["The answer is B.", RIGHT, RIGHT]),
            (1, Expand::Reflect) => {
                texts(&["But wait, focal crackles point to consolidation, not a clot. [p=0.4]"])
            }
            (4, Expand::Reason(_)) => texts(&["The answer is B."; 3]),
            other => panic!("unexpected expansion {other:?}"),
        };
        let cfg = MctsConfig {
            reflect: true,
            max_nodes: 100,
            ..MctsConfig::default()
        };
        let mut model = Script::new(script);
        let t = search(&pneumonia(), &cfg, &mut model, 0).unwrap();
        // The wrong answer (value 0 < 0.5) stays open and gets one Reflect
        // child; the wrong answers below that child may not reflect again.
        assert_eq!(
            model.expansions,
            [
                (0, Expand::Reason(3)),
                (1, Expand::Reflect),
                (4, Expand::Reason(3))
            ]
        );
        let reflect = &t.nodes[4];
        assert_eq!(
            (reflect.kind, reflect.reflected, reflect.finished),
            (StepKind::Reflect, true, false)
        );
        // Rolled out at depth 2: round(0.4 * 6) = 2 of 6.
        assert!(close(reflect.sim_score, 2.0 / 6.0));
        for id in 5..=7 {
            let n = &t.nodes[id];
            assert!(n.reflected && n.finished && !n.correct && n.closed);
        }
        assert!(t.nodes[0].closed);
        assert_eq!(t.nodes.len(), 8);

        // Without Reflect the wrong answer is closed at once.
        let mut model = Script::new(script);
        let cfg = MctsConfig {
            max_nodes: 100,
            ..MctsConfig::default()
        };
        let t = search(&pneumonia(), &cfg, &mut model, 0).unwrap();
        assert_eq!(model.expansions, [(0, Expand::Reason(3))]);
        assert!(t.nodes[1].closed);
    }

    #[test]
    fn a_model_returning_the_wrong_shape_is_an_error() {
        let mut model = Script::new(|_, _, _| texts(&["Only one step. [p=0.5]", "And two."]));
        let err = search(&pneumonia(), &MctsConfig::default(), &mut model, 0).unwrap_err();
        assert!(
            err.to_string().contains("returned 2 texts, expected 3"),
            "{err}"
        );

        let mut model = Script::new(three_reasons);
        model.short_rollouts = true;
        let err = search(&pneumonia(), &MctsConfig::default(), &mut model, 0).unwrap_err();
        assert!(err.to_string().contains("2 lists for 3 requests"), "{err}");

        let mut model = Script::new(three_reasons);
        let bad = MctsConfig {
            max_nodes: 0,
            ..MctsConfig::default()
        };
        assert!(search(&pneumonia(), &bad, &mut model, 0).is_err());
        assert!(model.expansions.is_empty());
    }

    #[test]
    fn records_round_trip_through_read_records() {
        let problem = pneumonia();
        let cfg = MctsConfig {
            max_nodes: 4,
            ..MctsConfig::default()
        };
        let t = search(&problem, &cfg, &mut Script::new(three_reasons), 0).unwrap();
        let json = to_record(&problem, &t);

        // The wire format: [[step_text, value, sim_score], ...] chains.
        assert_eq!(json["id"], "synthclinic-0007");
        assert_eq!(json["answer"], "A");
        assert!(
            json["question"]
                .as_str()
                .unwrap()
                .ends_with("\nD. Acute bronchitis")
        );
        assert_eq!(json["pos"].as_array().unwrap().len(), 1);
        assert_eq!(json["neg"].as_array().unwrap().len(), 2);
        let pos = &json["pos"][0];
        assert_eq!(pos[0][0][0], t.nodes[3].text.as_str());
        assert_eq!(pos[0][0][1], 0.9);
        assert_eq!(pos[0][0][2], 0.8);
        assert_eq!(pos[0][1][0], RIGHT);
        assert_eq!((pos[1].as_f64(), pos[2].as_f64()), (Some(1.0), Some(1.0)));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meds3.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "{json}\n\n{json}").unwrap();
        let records = read_records(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0], Meds3Record::from_tree(&problem, &t));
        let chain = &records[0].pos[0].chain;
        assert_eq!(
            sft_text(chain),
            format!("Step 1: {}\n\nStep 2: {RIGHT}", t.nodes[3].text)
        );
        assert_eq!(soft_labels(chain), [0.9, 1.0]);
        let neg_last: Vec<&str> = records[0]
            .neg
            .iter()
            .map(|l| l.chain[1].text.as_str())
            .collect();
        assert_eq!(neg_last, ["The answer is B.", "The answer is B."]);
    }

    #[test]
    fn read_records_reports_file_and_line_and_drops_the_root_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("release.jsonl");
        let meds3_line = r#"{"id": "q1", "question": "Q?", "answer": "A", "pos": [[[["Let's break down this problem step by step.", 0.6, null], ["Pneumonia. The answer is A.", 1.0, 1.0]], 1.0, 1.0]], "neg": []}"#;
        std::fs::write(&path, format!("{meds3_line}\n")).unwrap();
        let records = read_records(&path).unwrap();
        let chain = &records[0].pos[0].chain;
        assert_eq!(chain.len(), 1);
        assert_eq!(chain[0].text, "Pneumonia. The answer is A.");

        std::fs::write(
            &path,
            format!("{meds3_line}\n\n{{\"id\": \"q2\", \"pos\": 3}}\n"),
        )
        .unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("{}:3:", path.display())), "{err}");

        let missing = dir.path().join("missing.jsonl");
        let err = format!("{:#}", read_records(&missing).unwrap_err());
        assert!(err.contains("missing.jsonl"), "{err}");
    }

    #[test]
    fn dual_sided_labels_on_concrete_numbers() {
        let chain = |values: &[f64]| -> Vec<Meds3Step> {
            values
                .iter()
                .map(|&value| Meds3Step {
                    text: "step".to_string(),
                    value,
                    sim_score: Some(value),
                })
                .collect()
        };
        let c = chain(&[0.8, 0.5, 0.6, 0.5]);
        assert_eq!(soft_labels(&c), [0.8, 0.5, 0.6, 0.5]);
        // lambda = 0.5: 0.8; 0.5 - 0.5*(0.8-0.5) = 0.35; 0.6 - 0.5*(0.35-0.6)
        // = 0.725; 0.5 - 0.5*(0.725-0.5) = 0.3875.
        let l = dual_sided_labels(&c, 0.5);
        for (got, want) in l.iter().zip([0.8, 0.35, 0.725, 0.3875]) {
            assert!((got - want).abs() < 1e-12, "{l:?}");
        }
        // lambda = 1 leaves [0, 1]: 0.5 - 0.3 = 0.2; 0.6 + 0.4 = 1.0;
        // 0.2 - 0.8 = -0.6 -> 0, and the recursion goes on from 0.
        let l = dual_sided_labels(&chain(&[0.8, 0.5, 0.6, 0.2, 0.3]), 1.0);
        for (got, want) in l.iter().zip([0.8, 0.2, 1.0, 0.0, 0.6]) {
            assert!((got - want).abs() < 1e-12, "{l:?}");
        }
        // lambda = 0 gives the soft labels.
        assert_eq!(dual_sided_labels(&c, 0.0), soft_labels(&c));
        assert!(dual_sided_labels(&[], 1.0).is_empty());
    }
}
