//! MedS3 (arXiv 2501.12051) as stages: `meds3_search` runs the step-level
//! tree search ([`crate::rollout::meds3`]) from a model on the actor
//! runtime and leaves the trees in MedS3's release format; `meds3_policy`
//! fine-tunes on their correct chains; `meds3_prm` trains the process reward
//! model on their step values. Self-evolution is the same three stages again
//! from the new policy; P-VS is an evaluation rule.

use super::{Accept, Stage, StageCtx, StageOutput, fine_tune, required};
use crate::eval::PrmQuality;
use crate::infra::io::write_json;
use crate::rollout::mcts::{self, MctsConfig, Meds3Record};
use crate::rollout::meds3::{MctsRollout, SearchMeta, StepGeneration};
use crate::runtime::RuntimeConfig;
use crate::runtime::collect::{Collect, collect};
use crate::train::TrainConfig;
use crate::train::prm::{PrmExample, PrmLoss};
use crate::train::sft::Example;
use anyhow::{Context, Result, bail};
use medzero_envs::{Problem, ROOT_TEXT, Step, Trajectory, atomic, parse_chain, response_steps};
use medzero_rewards::prm::{Prm, encode_steps};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

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

impl Stage for SearchStage {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn refs(&self) -> Vec<&str> {
        vec![self.init.as_str()]
    }

    fn runtime(&self) -> Option<&RuntimeConfig> {
        Some(&self.runtime)
    }

    fn servable(&self) -> bool {
        true
    }

    fn validate(&self) -> Result<()> {
        required("init", &self.init)?;
        self.mcts.validate()?;
        self.generation.validate()
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let init = ctx.model(&self.init)?;
        let name = ctx.name;
        let problems = ctx.train_problems(self.problems, self.offset);
        let rollout = MctsRollout {
            mcts: self.mcts.clone(),
            generation: self.generation.clone(),
            template: ctx.run.template.clone(),
            iteration: self.iteration,
        };
        let (stored, report) = collect(Collect {
            name,
            dir: ctx.dir,
            model_dir: &init.dir,
            device: ctx.run.device,
            problems,
            rollout: &rollout,
            runtime: &self.runtime,
            seed: ctx.run.seed,
            metrics: &mut *ctx.metrics,
            stop: ctx.stop,
        })?;
        // The records in problem order, whatever order the actors finished in.
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
        write_json(&ctx.dir.join("search.json"), &health)?;
        let n = health.trees.max(1) as f64;
        ctx.metrics
            .scalar("search/solved_frac", 0, health.solved as f64 / n);
        ctx.metrics
            .scalar("search/nodes_per_tree", 0, health.nodes as f64 / n);
        ctx.metrics.scalar(
            "search/leaf_accuracy",
            0,
            health.pos as f64 / health.finished_leaves.max(1) as f64,
        );
        eprintln!("{name}: {}", health.summary());
        Ok(StageOutput::default())
    }
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
    /// Which `pos` chains are trained on: all (`outcome`, MedS3's rule) or
    /// only those whose every step the world's labels find right (`sound`).
    pub accept: Accept,
    pub sft: TrainConfig,
}

/// The stages a trainer on search data refers to: its model and its searches.
fn trained_on<'a>(init: &'a str, data: &'a [String]) -> Vec<&'a str> {
    std::iter::once(init)
        .chain(data.iter().map(String::as_str))
        .collect()
}

fn check_trained_on(init: &str, data: &[String]) -> Result<()> {
    required("init", init)?;
    if data.is_empty() {
        bail!("`data` must name at least one meds3_search stage");
    }
    Ok(())
}

impl Stage for PolicyStage {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn refs(&self) -> Vec<&str> {
        trained_on(&self.init, &self.data)
    }

    fn validate(&self) -> Result<()> {
        check_trained_on(&self.init, &self.data)?;
        self.sft.validate().context("sft")
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let template = ctx.run.template.clone();
        let mut examples = Vec::new();
        let mut refused = 0usize;
        for (p, r) in records(ctx, &self.data)? {
            for leaf in &r.pos {
                let (completion, untrained) = chain_text_masked(&leaf.chain);
                if !self
                    .accept
                    .keeps(ctx.truth, p, &response_steps(&completion))
                {
                    refused += 1;
                    continue;
                }
                examples.push(Example {
                    prompt: template.render(&p.prompt_text()),
                    completion,
                    untrained: if self.mask_dropped_steps {
                        untrained
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        if self.accept != Accept::Outcome {
            eprintln!(
                "{}: kept {} correct chains, refused {refused} with a wrong step",
                self.name.as_deref().unwrap_or("meds3_policy"),
                examples.len()
            );
        }
        if examples.is_empty() {
            bail!(
                "the searches {:?} found no correct chain to train on (accept = {:?})",
                self.data,
                self.accept
            );
        }
        fine_tune(ctx, Some(&self.init), &self.sft, examples)
    }
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
    /// The world's semantic step labels (1 right, 0 wrong): a reference PRM
    /// trained on what the search values stand in for, so head quality
    /// shows apart from label quality.
    Oracle,
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
    /// Share of the searched questions (the last ones) kept out of training
    /// and scored after it, against their search values and the world's
    /// step labels (`prm_target.json`); 0: none.
    pub heldout: f64,
    pub sft: TrainConfig,
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
            heldout: 0.1,
            sft: TrainConfig::default(),
        }
    }
}

/// The file where a PRM stage states its target (see [`PrmTarget`]).
pub const PRM_TARGET_FILE: &str = "prm_target.json";

/// One searched chain as the PRM sees it: each node split at its `Step k:`
/// lines (a Finish node holds the rest of the chain), every piece carrying
/// its node's training label, and the world's label of each piece.
struct Labelled<'w> {
    problem: &'w Problem,
    steps: Vec<String>,
    labels: Vec<f64>,
    /// The node's search value (the MC estimate), per piece.
    values: Vec<f64>,
    oracle: Option<Vec<bool>>,
}

fn labelled_chains<'w>(ctx: &StageCtx<'w>, stage: &PrmStage) -> Result<Vec<Vec<Labelled<'w>>>> {
    let mut out = Vec::new();
    for (p, r) in records(ctx, &stage.data)? {
        let keep = if stage.balance {
            r.pos.len().min(r.neg.len())
        } else {
            usize::MAX
        };
        let mut chains = Vec::new();
        for leaf in r.pos.iter().take(keep).chain(r.neg.iter().take(keep)) {
            let node_labels = match stage.labels {
                PrmLabels::DualSided => mcts::dual_sided_labels(&leaf.chain, stage.lambda),
                _ => mcts::soft_labels(&leaf.chain),
            };
            let (mut steps, mut labels, mut values) = (Vec::new(), Vec::new(), Vec::new());
            for (node, label) in leaf.chain.iter().zip(node_labels) {
                for piece in parse_chain(&node.text) {
                    steps.push(piece.text);
                    labels.push(label);
                    values.push(node.value);
                }
            }
            let as_steps: Vec<Step> = steps.iter().cloned().map(Step::new).collect();
            let oracle = ctx.truth.label_steps(p, &as_steps).ok();
            if stage.labels == PrmLabels::Oracle {
                let Some(truth) = &oracle else {
                    bail!(
                        "labels = \"oracle\" needs the world's step labels, and {} has none",
                        p.id
                    );
                };
                labels = truth.iter().map(|&ok| ok as u8 as f64).collect();
            }
            chains.push(Labelled {
                problem: p,
                steps,
                labels,
                values,
                oracle,
            });
        }
        out.push(chains);
    }
    Ok(out)
}

fn prm_examples(
    ctx: &StageCtx,
    policy: &medzero_policies::Policy,
    chains: &[&Labelled],
) -> Result<Vec<PrmExample>> {
    let template = ctx.run.template.clone();
    chains
        .iter()
        .map(|c| {
            let (ids, step_ends) =
                encode_steps(policy, &template.render(&c.problem.prompt_text()), &c.steps)?;
            Ok(PrmExample {
                ids,
                step_ends,
                labels: c.labels.clone(),
            })
        })
        .collect()
}

/// What a PRM is trained towards and how near it gets (MedS3's PRM learns
/// search values, which estimate whether the answer is still reachable;
/// the world's labels judge each step's soundness).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrmTarget {
    pub labels: PrmLabels,
    /// The ceiling: the training labels themselves scored against the
    /// world's labels of the same steps.
    pub train: Option<PrmQuality>,
    /// The trained PRM on the held-out questions' steps, against their
    /// search values (>= 0.5 counts as right) and against the world's labels.
    pub heldout_vs_values: Option<PrmQuality>,
    pub heldout_vs_oracle: Option<PrmQuality>,
    /// The held-out steps' search values against the world's labels.
    pub heldout_ceiling: Option<PrmQuality>,
    pub heldout_questions: usize,
}

/// The pairs (score, the world's label) over `chains`, `score` picking a
/// chain's per-step scores.
fn against_oracle<'c>(
    chains: impl IntoIterator<Item = (&'c Labelled<'c>, &'c [f64])>,
) -> Option<PrmQuality> {
    let pairs: Vec<(f64, bool)> = chains
        .into_iter()
        .filter_map(|(c, scores)| c.oracle.as_ref().map(|o| (o, scores)))
        .flat_map(|(o, scores)| scores.iter().copied().zip(o.iter().copied()))
        .collect();
    PrmQuality::from_pairs(&pairs)
}

impl Stage for PrmStage {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn refs(&self) -> Vec<&str> {
        trained_on(&self.init, &self.data)
    }

    fn validate(&self) -> Result<()> {
        check_trained_on(&self.init, &self.data)?;
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            bail!("lambda must be a finite number >= 0, got {}", self.lambda);
        }
        if !(0.0..1.0).contains(&self.heldout) {
            bail!(
                "heldout must be a share of the questions in [0, 1), got {}",
                self.heldout
            );
        }
        self.sft.validate().context("sft")
    }

    fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
        let (policy, inherited) = ctx.start_from(Some(&self.init))?;
        tch::manual_seed(ctx.run.seed as i64);
        let head = policy.add_value_head();
        let questions = labelled_chains(ctx, self)?;
        let held = ((questions.len() as f64 * self.heldout).round() as usize)
            .min(questions.len().saturating_sub(1));
        let (train, heldout) = questions.split_at(questions.len() - held);
        let train: Vec<&Labelled> = train.iter().flatten().collect();
        let heldout: Vec<&Labelled> = heldout.iter().flatten().collect();
        if train.is_empty() {
            bail!(
                "the searches {:?} left no PRM data{}",
                self.data,
                if self.balance {
                    " (balance = true keeps only questions with both correct and wrong chains)"
                } else {
                    ""
                }
            );
        }
        let mut loss = PrmLoss {
            head: &head,
            data: prm_examples(ctx, &policy, &train)?,
            pad: policy.tokenizer.pad_id(),
        };
        let report = crate::train::train(&policy, &mut loss, &self.sft, ctx.train_run())?;
        let model = ctx.save_model(&policy, inherited + report.tokens, report.wall_s)?;

        drop(loss);
        // The trained model as it was saved, without reading it back.
        let prm = Prm { policy, head };
        let mut scores = Vec::with_capacity(heldout.len());
        for c in &heldout {
            let prompt = ctx.run.template.render(&c.problem.prompt_text());
            let s = prm.score(&prompt, std::slice::from_ref(&c.steps))?;
            scores.push(s.into_iter().next().unwrap_or_default());
        }
        let vs_values: Vec<(f64, bool)> = heldout
            .iter()
            .zip(&scores)
            .flat_map(|(c, s)| s.iter().copied().zip(c.values.iter().map(|&v| v >= 0.5)))
            .collect();
        let target = PrmTarget {
            labels: self.labels,
            train: against_oracle(train.iter().map(|&c| (c, c.labels.as_slice()))),
            heldout_vs_values: PrmQuality::from_pairs(&vs_values),
            heldout_vs_oracle: against_oracle(
                heldout.iter().zip(&scores).map(|(&c, s)| (c, s.as_slice())),
            ),
            heldout_ceiling: against_oracle(heldout.iter().map(|&c| (c, c.values.as_slice()))),
            heldout_questions: held,
        };
        write_json(&ctx.dir.join(PRM_TARGET_FILE), &target)?;
        let auroc = |q: &Option<PrmQuality>| q.as_ref().map_or(f64::NAN, |q| q.auroc);
        eprintln!(
            "{}: AUROC of its training labels vs the world's {:.3}; on {held} held-out questions, \
             the PRM vs search values {:.3}, vs the world's labels {:.3} (their values: {:.3})",
            ctx.name,
            auroc(&target.train),
            auroc(&target.heldout_vs_values),
            auroc(&target.heldout_vs_oracle),
            auroc(&target.heldout_ceiling),
        );
        for (tag, q) in [
            ("prm/train_labels_auroc", &target.train),
            ("prm/heldout_vs_values_auroc", &target.heldout_vs_values),
            ("prm/heldout_vs_oracle_auroc", &target.heldout_vs_oracle),
            ("prm/heldout_values_auroc", &target.heldout_ceiling),
        ] {
            if let Some(q) = q {
                ctx.metrics.scalar(tag, 0, q.auroc);
            }
        }
        Ok(StageOutput {
            rows: Vec::new(),
            model: Some(model),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
