//! MedS3 (arXiv 2501.12051) on medzero: the step-level tree search of
//! [`crate::mcts`] driven by a tch policy that reuses KV caches down the tree,
//! run as an actor rollout; policy SFT on the trees' correct chains; the
//! process reward model trained on step values; and PRM-scored samples for
//! P-VS and the other selection rules.
//!
//! Text layout. The policy is prompted with the question (the student's
//! template), then continues from [`Tree::render_prefix`]: the root sentence
//! and "Step k: ..." steps, ending "\n\nStep {d+1}:". A step ends where the
//! model writes the next "Step {d+2}:" marker, or at the end of the turn.
//! A chain-trained student writes the whole text itself, root included.

use crate::experiment::{StageCtx, StageResult, TrainedModel};
use crate::mcts::{self, Expand, MctsConfig, Meds3Record, NodeId, ROOT_TEXT, StepModel, Tree};
use crate::runtime::actor::{Rolled, Rollout};
use crate::runtime::learner::{
    self, LearnerConfig, Objective, ObjectiveLoss, Online, RuntimeConfig,
};
use crate::sft::SftConfig;
use anyhow::{Context, Result, bail};
use medzero_envs::{Problem, Provenance, Step, Trajectory, atomic};
use medzero_policies::generate::streams;
use medzero_policies::prm::ValueHead;
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, Rows, SamplingParams, SyncReport};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
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
            rollout_max_tokens: 160,
            temperature: 1.0,
            top_p: 0.9,
            first_round_temperature: 0.6,
            later_round_temperature: 1.0,
            rollout_top_p: 0.9,
            prefix_reuse: true,
        }
    }
}

/// Where one step ends and the next begins ("\n\nStep k:" without its number).
const STEP_BREAK: &str = "\n\nStep";

/// The rows continuing the children of one expanded node, in child order.
/// A child's row is brought to exactly its text (`sync`) the first time the
/// search continues it, once the tree has its text.
struct Children {
    rows: Rows,
    synced: Vec<bool>,
}

type Shared = Rc<RefCell<Children>>;

/// [`StepModel`] on a policy. With prefix reuse, the children of a node are
/// the rows of one batch that continue from its cached row, so expanding or
/// rolling out a child never recomputes its prefix; before a row is
/// continued it is synced to the token ids of `prompt + render_prefix(child)`,
/// so the model always continues from exactly the text the tree holds.
pub struct PolicySteps<'a> {
    policy: &'a Policy,
    generation: &'a StepGeneration,
    rng: &'a mut ChaCha8Rng,
    /// The question as the student's template renders it.
    prompt: String,
    end_of_turn: i64,
    root: Option<Shared>,
    /// The rows holding each expanded node's children.
    children: HashMap<NodeId, Shared>,
    /// Tokens generated so far.
    pub generated: u64,
    /// Rows whose sampled ids were not the ids of their own text (so they
    /// were cut back and re-run), and the tokens re-run.
    pub resynced: SyncReport,
}

impl<'a> PolicySteps<'a> {
    pub fn new(
        policy: &'a Policy,
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
            end_of_turn: policy.tokenizer.end_of_turn_id(template),
            root: None,
            children: HashMap::new(),
            generated: 0,
            resynced: SyncReport::default(),
        }
    }

    /// The token ids of the whole text before `node`'s next step.
    fn target(&self, tree: &Tree, node: NodeId) -> Result<Vec<i64>> {
        let text = format!("{}{}", self.prompt, tree.render_prefix(node));
        Ok(self.policy.tokenizer.encode(&text)?)
    }

    /// A fresh prefill of the whole text before `node`'s next step.
    fn prefill(&self, tree: &Tree, node: NodeId) -> Result<Shared> {
        let rows = self.policy.prefill(&[self.target(tree, node)?], 0)?;
        Ok(Rc::new(RefCell::new(Children {
            rows,
            synced: vec![true],
        })))
    }

    /// The rows continuing `node`, and which row, synced to `node`'s text.
    fn state(&mut self, tree: &Tree, node: NodeId) -> Result<(Shared, usize)> {
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
        Ok(CachedRow {
            ids: children.rows.ids(row).to_vec(),
            position: children.rows.position(row),
            logits: children.rows.logits(row),
        })
    }

    fn check_room(&self, rows: &Rows, row: usize, node: NodeId) -> Result<()> {
        let context = self.policy.config().max_position_embeddings;
        if context - rows.position(row) < 2 {
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

impl StepModel for PolicySteps<'_> {
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
        let forced_ids = self.policy.tokenizer.encode(forced)?;
        let mut rows = {
            let base = base.borrow();
            self.check_room(&base.rows, row, node)?;
            base.rows.select(&vec![row; k], forced_ids.len() + budget)
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
        let mut streams = streams(self.rng, k);
        let outs = self.policy.decode(&mut rows, &params, &mut streams);
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
        let mut groups: Vec<(Shared, Vec<(usize, usize)>)> = Vec::new();
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
                base.rows.select(&picked, params.max_new_tokens)
            };
            let mut rngs: Vec<ChaCha8Rng> = members
                .iter()
                .flat_map(|&(i, _)| std::mem::take(&mut streams[i]))
                .collect();
            let outs = self.policy.decode(&mut rows, &params, &mut rngs);
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

/// One search per problem, as an actor rollout: the trajectory holds the
/// tree's MedS3 record ([`SearchMeta`]) and, as its chain, the best correct
/// leaf (or the best leaf).
pub struct MctsRollout {
    pub mcts: MctsConfig,
    pub generation: StepGeneration,
    pub template: PromptTemplate,
    pub iteration: usize,
}

impl Rollout for MctsRollout {
    fn ids(&self, problem: &Problem) -> Vec<String> {
        vec![format!("{}/mcts", problem.id)]
    }

    fn rollout(&self, policy: &Policy, problem: &Problem, rng: &mut ChaCha8Rng) -> Result<Rolled> {
        let mut model = PolicySteps::new(policy, &self.generation, self.template, problem, rng);
        let tree = mcts::search(problem, &self.mcts, &mut model, self.iteration)?;
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
        })
    }
}

/// A search stage's problems, searched once each; nothing is trained.
pub(crate) struct StoreOnly;

impl Objective for StoreOnly {
    fn accepts(&self, _: &Trajectory) -> bool {
        false
    }
    fn loss(&mut self, _: &Policy, _: &[Trajectory]) -> Result<ObjectiveLoss> {
        bail!("a search stage trains nothing")
    }
}

/// The file a search stage leaves: MedS3's release format, one JSON record
/// per line, in problem order.
pub const RECORDS_FILE: &str = "meds3.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SearchStage {
    pub name: Option<String>,
    /// The stage whose model searches.
    pub init: String,
    /// Training problems searched, from the start of the train split (0: all).
    pub problems: usize,
    /// Skip this many training problems first (disjoint rounds).
    pub offset: usize,
    /// Self-evolution round (0 = first): picks the rollout temperature.
    pub iteration: usize,
    pub mcts: MctsConfig,
    pub generation: StepGeneration,
    pub runtime: RuntimeConfig,
}

pub fn run_search(ctx: &mut StageCtx, name: &str, stage: &SearchStage) -> Result<StageResult> {
    stage.mcts.validate()?;
    let init = ctx.model(&stage.init)?;
    let device = ctx.device;
    let policy = Policy::load(&init.dir, device, None)?;
    let train = &ctx.world.train;
    let start = stage.offset.min(train.len());
    let end = if stage.problems == 0 {
        train.len()
    } else {
        (start + stage.problems).min(train.len())
    };
    let problems = &train[start..end];
    let rollout = MctsRollout {
        mcts: stage.mcts.clone(),
        generation: stage.generation.clone(),
        template: ctx.cfg.student.template,
        iteration: stage.iteration,
    };
    let init_dir = init.dir.clone();
    let build = move || Ok(Policy::load(&init_dir, device, None)?);
    let report = learner::run(Online {
        name,
        dir: ctx.dir,
        problems,
        rollout: &rollout,
        objective: &mut StoreOnly,
        policy: &policy,
        build_actor_policy: &build,
        runtime: &stage.runtime,
        learner: &LearnerConfig::default(),
        seed: ctx.cfg.run.seed,
        metrics: ctx.metrics,
        stop: ctx.stop,
    })?;
    // The records in problem order, whatever order the actors finished in.
    let stored =
        crate::runtime::store::read_trajectories(&ctx.dir.join("trajectories.jsonl"), false)?;
    let by_problem: HashMap<&str, &Trajectory> =
        stored.iter().map(|t| (t.problem_id.as_str(), t)).collect();
    let mut lines = String::new();
    let mut health = SearchHealth::default();
    for p in problems {
        let Some(t) = by_problem.get(p.id.as_str()) else {
            continue; // failed in this run; a rerun tries it again
        };
        let meta = SearchMeta::of(t)?;
        health.add(&meta);
        lines.push_str(&serde_json::to_string(&meta.record)?);
        lines.push('\n');
    }
    atomic::write(&ctx.dir.join(RECORDS_FILE), lines.as_bytes())?;
    health.wall_s = report.wall_s;
    health.generated_tokens = report.counters.generated_tokens;
    atomic::write(
        &ctx.dir.join("search.json"),
        serde_json::to_string_pretty(&health)?.as_bytes(),
    )?;
    let n = health.trees.max(1) as f64;
    ctx.metrics
        .scalar(&format!("{name}/solved_frac"), 0, health.solved as f64 / n);
    ctx.metrics.scalar(
        &format!("{name}/nodes_per_tree"),
        0,
        health.nodes as f64 / n,
    );
    ctx.metrics.scalar(
        &format!("{name}/leaf_accuracy"),
        0,
        health.pos as f64 / health.finished_leaves.max(1) as f64,
    );
    eprintln!("{name}: {}", health.summary());
    Ok(StageResult {
        rows: Vec::new(),
        model: None,
    })
}

/// A search stage's totals, left in its folder as `search.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchHealth {
    pub trees: usize,
    /// Trees with at least one correct leaf.
    pub solved: usize,
    pub pos: usize,
    pub neg: usize,
    pub nodes: usize,
    pub finished_leaves: usize,
    pub resynced: usize,
    pub step_skips: usize,
    pub generated_tokens: u64,
    pub wall_s: f64,
}

impl SearchHealth {
    fn add(&mut self, m: &SearchMeta) {
        self.trees += 1;
        self.solved += !m.record.pos.is_empty() as usize;
        self.pos += m.record.pos.len();
        self.neg += m.record.neg.len();
        self.nodes += m.nodes;
        self.finished_leaves += m.finished_leaves;
        self.resynced += m.resynced;
        self.step_skips += m.step_skips;
    }

    fn summary(&self) -> String {
        let n = self.trees.max(1) as f64;
        format!(
            "{} trees, {} with a correct leaf, {} pos / {} neg chains ({:.1}% of finished leaves \
             correct), {:.1} nodes per tree, {} step-number skips, {} rows re-run from their text, \
             {} tokens generated, {:.1}s",
            self.trees,
            self.solved,
            self.pos,
            self.neg,
            100.0 * self.pos as f64 / self.finished_leaves.max(1) as f64,
            self.nodes as f64 / n,
            self.step_skips,
            self.resynced,
            self.generated_tokens,
            self.wall_s
        )
    }
}

/// The records of the named search stages, in stage order, each with its
/// training problem.
pub(crate) fn records<'w>(
    ctx: &StageCtx<'w>,
    stages: &[String],
) -> Result<Vec<(&'w Problem, Meds3Record)>> {
    let questions: HashMap<&str, &Problem> =
        ctx.world.train.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut out = Vec::new();
    for s in stages {
        let path = ctx.stage_dir(s)?.join(RECORDS_FILE);
        for r in mcts::read_records(&path)? {
            let Some(&p) = questions.get(r.id.as_str()) else {
                bail!(
                    "{}: record {} is not a training problem of this run's world",
                    path.display(),
                    r.id
                )
            };
            out.push((p, r));
        }
    }
    Ok(out)
}

/// Policy SFT on the correct chains of one or more search stages (MedS3's
/// self-evolution trains round k+1 on the union of rounds 1..=k).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyStage {
    pub name: Option<String>,
    pub init: String,
    /// Search stages whose `pos` chains are trained on.
    pub data: Vec<String>,
    /// Keep steps whose MCTS value fell below the previous step's as
    /// context, not targets: a correct chain can pass through a step that
    /// made the answer less likely, and the student should not learn it.
    pub mask_dropped_steps: bool,
    pub sft: SftConfig,
}

pub fn policy_examples(ctx: &StageCtx, stage: &PolicyStage) -> Result<Vec<crate::sft::Example>> {
    let template = ctx.cfg.student.template;
    let mut examples = Vec::new();
    for (p, r) in records(ctx, &stage.data)? {
        for leaf in &r.pos {
            let (completion, untrained) = chain_text_masked(&leaf.chain);
            examples.push(crate::sft::Example {
                prompt: template.render(&p.prompt_text()),
                completion,
                untrained: if stage.mask_dropped_steps {
                    untrained
                } else {
                    Vec::new()
                },
            });
        }
    }
    if examples.is_empty() {
        bail!(
            "the searches {:?} found no correct chain to train on",
            stage.data
        );
    }
    Ok(examples)
}

/// What the student writes for a chain: the root sentence, then the steps.
pub fn chain_text(chain: &[mcts::Meds3Step]) -> String {
    format!("{ROOT_TEXT}\n\n{}", mcts::sft_text(chain))
}

/// [`chain_text`] with the byte range of each step (its `Step k:` marker
/// and text) whose value is below the previous step's.
pub fn chain_text_masked(chain: &[mcts::Meds3Step]) -> (String, Vec<std::ops::Range<usize>>) {
    let mut text = format!("{ROOT_TEXT}\n\n");
    let mut dropped = Vec::new();
    for (i, s) in chain.iter().enumerate() {
        if i > 0 {
            text.push_str("\n\n");
        }
        let start = text.len();
        text.push_str(&format!("Step {}: {}", i + 1, s.text));
        if i > 0 && s.value < chain[i - 1].value {
            dropped.push(start..text.len());
        }
    }
    (text, dropped)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrmLabels {
    /// The MCTS value of each step (MedS3 v1).
    Soft,
    /// `l_i = v_i - lambda (l_{i-1} - v_i)` (the later version).
    DualSided,
}

/// PRM training on the search stages' pos and neg chains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrmStage {
    pub name: Option<String>,
    /// The backbone (a policy stage); the head starts fresh.
    pub init: String,
    pub data: Vec<String>,
    pub labels: PrmLabels,
    pub lambda: f64,
    /// Use min(#pos, #neg) chains of each kind per question, as MedS3 does;
    /// off: every chain.
    pub balance: bool,
    pub sft: SftConfig,
}

impl Default for PrmStage {
    fn default() -> Self {
        PrmStage {
            name: None,
            init: String::new(),
            data: Vec::new(),
            labels: PrmLabels::Soft,
            lambda: 1.0,
            balance: true,
            sft: SftConfig::default(),
        }
    }
}

/// One PRM training sequence: token ids, the last token of each step, and
/// each step's label.
pub struct PrmExample {
    pub ids: Vec<i64>,
    pub step_ends: Vec<i64>,
    pub labels: Vec<f64>,
}

/// Token ids of `prompt` + the root and `steps`, and the position of each
/// step's last token (encoding each prefix, so the positions are exact for
/// any tokenizer that encodes a prefix as a prefix of the whole).
pub fn encode_steps(
    policy: &Policy,
    prompt: &str,
    steps: &[String],
) -> Result<(Vec<i64>, Vec<i64>)> {
    let mut text = format!("{prompt}{ROOT_TEXT}");
    let mut ends = Vec::with_capacity(steps.len());
    for (k, s) in steps.iter().enumerate() {
        text.push_str(&format!("\n\nStep {}: {s}", k + 1));
        let n = policy.tokenizer.encode(&text)?.len() as i64;
        ends.push(n - 1);
    }
    Ok((policy.tokenizer.encode(&text)?, ends))
}

fn prm_examples(ctx: &StageCtx, stage: &PrmStage, policy: &Policy) -> Result<Vec<PrmExample>> {
    let template = ctx.cfg.student.template;
    let mut out = Vec::new();
    for (p, r) in records(ctx, &stage.data)? {
        let keep = if stage.balance {
            r.pos.len().min(r.neg.len())
        } else {
            usize::MAX
        };
        for leaf in r.pos.iter().take(keep).chain(r.neg.iter().take(keep)) {
            let steps: Vec<String> = leaf.chain.iter().map(|s| s.text.clone()).collect();
            let (ids, step_ends) =
                encode_steps(policy, &template.render(&p.prompt_text()), &steps)?;
            let labels = match stage.labels {
                PrmLabels::Soft => mcts::soft_labels(&leaf.chain),
                PrmLabels::DualSided => mcts::dual_sided_labels(&leaf.chain, stage.lambda),
            };
            out.push(PrmExample {
                ids,
                step_ends,
                labels,
            });
        }
    }
    if out.is_empty() {
        bail!(
            "the searches {:?} left no PRM data{}",
            stage.data,
            if stage.balance {
                " (balance = true keeps only questions with both correct and wrong chains)"
            } else {
                ""
            }
        );
    }
    Ok(out)
}

pub fn run_prm(ctx: &mut StageCtx, name: &str, stage: &PrmStage) -> Result<StageResult> {
    let init = ctx.model(&stage.init)?;
    let policy = Policy::load(&init.dir, ctx.device, None)?;
    tch::manual_seed(ctx.cfg.run.seed as i64);
    let head = policy.add_value_head();
    let data = prm_examples(ctx, stage, &policy)?;
    let mut loss = PrmLoss {
        head: &head,
        data,
        pad: policy.tokenizer.pad_id(),
    };
    let report = crate::trainer::train(
        &policy,
        &mut loss,
        &stage.sft,
        ctx.cfg.run.seed,
        ctx.dir,
        name,
        ctx.metrics,
        ctx.stop,
    )?;
    let model_dir = ctx.dir.join("model");
    policy.save(&model_dir)?;
    Ok(StageResult {
        rows: Vec::new(),
        model: Some(TrainedModel {
            dir: model_dir,
            training_tokens: init.training_tokens + report.tokens,
            wall_s: report.wall_s,
        }),
    })
}

/// Soft-label cross-entropy on the head, the backbone trained with it; a
/// step's micro-batches weigh by their share of the step.
struct PrmLoss<'a> {
    head: &'a ValueHead,
    data: Vec<PrmExample>,
    pad: i64,
}

impl crate::trainer::BatchLoss for PrmLoss<'_> {
    fn items(&self) -> usize {
        self.data.len()
    }

    fn micro_loss(
        &mut self,
        policy: &Policy,
        step: &[usize],
        micro: &[usize],
    ) -> Result<crate::trainer::MicroLoss> {
        let picked: Vec<&PrmExample> = micro.iter().map(|&i| &self.data[i]).collect();
        let ids: Vec<Vec<i64>> = picked.iter().map(|e| e.ids.clone()).collect();
        let (ids, mask) = medzero_policies::generate::pad_right_to(&ids, self.pad, 16);
        let k = picked
            .iter()
            .map(|e| e.step_ends.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut positions = Vec::with_capacity(picked.len() * k);
        let mut labels = Vec::with_capacity(picked.len() * k);
        let mut label_mask = Vec::with_capacity(picked.len() * k);
        for e in &picked {
            for j in 0..k {
                positions.push(*e.step_ends.get(j).unwrap_or(&0));
                labels.push(*e.labels.get(j).unwrap_or(&0.0) as f32);
                label_mask.push((j < e.step_ends.len()) as u8 as f32);
            }
        }
        let shape = [picked.len() as i64, k as i64];
        let loss = self.head.loss(
            policy,
            &ids,
            &mask,
            &Tensor::from_slice(&positions).view(shape),
            &Tensor::from_slice(&labels).view(shape),
            &Tensor::from_slice(&label_mask).view(shape),
        );
        Ok(crate::trainer::MicroLoss {
            loss: loss * (micro.len() as f64 / step.len() as f64),
            tokens: mask.sum(tch::Kind::Int64).int64_value(&[]) as u64,
            metrics: Vec::new(),
        })
    }
}

/// A PRM: a policy folder saved with its head.
pub struct Prm {
    pub policy: Policy,
    pub head: ValueHead,
}

impl Prm {
    pub fn load(dir: &Path, device: tch::Device) -> Result<Prm> {
        let (policy, head) = Policy::load_with_head(dir, device, None)
            .with_context(|| format!("loading the PRM in {}", dir.display()))?;
        Ok(Prm { policy, head })
    }

    /// P(correct) at the end of each step of each chain (after `prompt`),
    /// batched.
    pub fn score(&self, prompt: &str, chains: &[Vec<String>]) -> Result<Vec<Vec<f64>>> {
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

/// The steps a sampled response holds, after the root sentence.
pub fn response_steps(text: &str) -> Vec<String> {
    let body = text.trim_start().strip_prefix(ROOT_TEXT).unwrap_or(text);
    medzero_envs::parse_chain(body)
        .into_iter()
        .map(|s| s.text)
        .collect()
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

    #[test]
    fn masked_chain_text_marks_exactly_the_steps_whose_value_fell() {
        let chain: Vec<mcts::Meds3Step> = [("a", 0.5), ("b", 0.25), ("c", 0.75), ("d", 0.75)]
            .into_iter()
            .map(|(t, v)| (t.to_string(), v, None).into())
            .collect();
        let (text, ranges) = chain_text_masked(&chain);
        assert_eq!(text, chain_text(&chain));
        let masked: Vec<&str> = ranges.iter().map(|r| &text[r.clone()]).collect();
        // Step 2 fell (0.5 -> 0.25); step 3 rose; step 4 held.
        assert_eq!(masked, ["Step 2: b"]);
    }
}
