//! Self-iterated preference learning as a stage (the recipe of REFERENCE 5
//! and MedCritical's stage 2): each round samples the training questions
//! with the latest policy on the actor runtime, builds pairs, trains DPO (or
//! KTO on the pairs' unpaired halves) against a fixed reference, and scores
//! the round's model on the test split. Round k lives in `round-k/`; a
//! finished round leaves `round.json` and is skipped on resume.

use crate::dpo::{Dpo, DpoConfig, EncodedPair, Pair, Reference};
use crate::eval::{self, EvalConfig};
use crate::experiment::{StageCtx, StageResult, TrainedModel};
use crate::kto::{self, Kto, KtoConfig, KtoExample};
use crate::mcts::ROOT_TEXT;
use crate::medcritical::{Correction, Corrector, SelfCorrection, attempt_ids, attempt_text};
use crate::meds3::StoreOnly;
use crate::results::Row;
use crate::runtime::actor::Rollout;
use crate::runtime::learner::{self, LearnerConfig, Online, RuntimeConfig};
use crate::sampling::{Sampler, SamplingConfig};
use crate::sft::SftConfig;
use crate::trainer::{self, BatchLoss};
use anyhow::{Context, Result, bail};
use medzero_envs::{Problem, Trajectory, atomic, render_chain};
use medzero_policies::Policy;
use medzero_rewards::RuleVerifier;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairBuilder {
    /// MedCritical: the student's wrong attempt against its correction.
    SelfCorrection,
    /// A verified-correct sample against a wrong one of the same question.
    BestVsWorst,
    /// MedS3's tree: correct finished leaves against wrong ones, from the
    /// search stages in `tree_data` (one round only).
    Tree,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferenceStage {
    pub name: Option<String>,
    /// The stage whose model round 1 starts from.
    pub init: String,
    /// The reference model's stage (empty: `init`, MedCritical's SFT model).
    pub reference: String,
    pub rounds: usize,
    /// Training questions per round, from the start of the train split (0: all).
    pub problems: usize,
    pub pairs: PairBuilder,
    /// Who writes the chosen side of self-correction pairs.
    pub corrector: Corrector,
    /// Continuations the student samples from a sound prefix (corrector = self).
    pub retries: usize,
    /// Pairs kept per question at most.
    pub pairs_per_problem: usize,
    /// Search stages whose trees give `tree` pairs.
    pub tree_data: Vec<String>,
    pub sampling: SamplingConfig,
    pub dpo: DpoConfig,
    pub kto: KtoConfig,
    /// The optimisation of each round (epochs over its pairs, batch, lr...).
    pub optim: SftConfig,
    pub runtime: RuntimeConfig,
    /// How each round's model is scored on the test split.
    pub eval: EvalConfig,
    /// Each round's scores join the run's table (false: only TensorBoard and
    /// `round.json`, for runs whose eval stage scores the final model).
    pub report_rounds: bool,
}

impl Default for PreferenceStage {
    fn default() -> Self {
        PreferenceStage {
            name: None,
            init: String::new(),
            reference: String::new(),
            rounds: 2,
            problems: 0,
            pairs: PairBuilder::SelfCorrection,
            corrector: Corrector::Student,
            retries: 4,
            pairs_per_problem: 1,
            tree_data: Vec::new(),
            sampling: SamplingConfig::default(),
            dpo: DpoConfig {
                // MedCritical's setting.
                beta: 0.3,
                ..DpoConfig::default()
            },
            kto: KtoConfig::default(),
            optim: SftConfig {
                lr: 1e-5,
                epochs: 1.0,
                batch_size: 8,
                ..SftConfig::default()
            },
            runtime: RuntimeConfig::default(),
            eval: EvalConfig::default(),
            report_rounds: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    Dpo,
    Kto,
}

impl PreferenceStage {
    pub fn validate(&self, loss: Loss) -> Result<()> {
        if self.init.is_empty() {
            bail!("`init` must name the stage whose model the first round starts from");
        }
        if self.rounds == 0 || self.pairs_per_problem == 0 {
            bail!("rounds and pairs_per_problem must be positive");
        }
        if self.pairs == PairBuilder::Tree && (self.rounds != 1 || self.tree_data.is_empty()) {
            bail!("pairs = \"tree\" takes pairs from `tree_data` search stages, in one round");
        }
        if self.pairs == PairBuilder::SelfCorrection
            && self.corrector == Corrector::Student
            && self.retries == 0
        {
            bail!("corrector = \"self\" needs retries > 0");
        }
        match loss {
            Loss::Dpo => self.dpo.validate()?,
            Loss::Kto => self.kto.validate()?,
        }
        self.optim.validate()?;
        self.runtime.validate()
    }

    /// Stage names this one reads.
    pub fn refs(&self) -> Vec<&str> {
        std::iter::once(self.init.as_str())
            .chain((!self.reference.is_empty()).then_some(self.reference.as_str()))
            .chain(self.tree_data.iter().map(String::as_str))
            .collect()
    }
}

/// What a finished round records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RoundReport {
    round: usize,
    pairs: usize,
    steps: usize,
    tokens: u64,
    final_loss: f64,
    wall_s: f64,
    greedy_accuracy: f64,
    row: Row,
}

pub fn run(
    ctx: &mut StageCtx,
    name: &str,
    stage: &PreferenceStage,
    loss: Loss,
) -> Result<StageResult> {
    stage.validate(loss)?;
    let device = ctx.device;
    let init = ctx.model(&stage.init)?;
    let reference_dir = if stage.reference.is_empty() {
        init.dir.clone()
    } else {
        ctx.model(&stage.reference)?.dir
    };
    let train = &ctx.world.train;
    let problems = if stage.problems > 0 && stage.problems < train.len() {
        &train[..stage.problems]
    } else {
        &train[..]
    };
    let judge = crate::experiment::eval_judge(ctx, &stage.eval)?;
    let mut current = init.clone();
    let mut rows = Vec::new();
    for round in 1..=stage.rounds {
        let dir = ctx.dir.join(format!("round-{round}"));
        let done = dir.join("round.json");
        let report: RoundReport = if done.exists() {
            serde_json::from_str(&std::fs::read_to_string(&done)?)
                .with_context(|| format!("reading {}", done.display()))?
        } else {
            std::fs::create_dir_all(&dir)?;
            let tag = format!("{name}/round-{round}");
            let pairs = round_pairs(ctx, stage, &tag, &dir, &current, problems, round)?;
            let policy = Policy::load(&current.dir, device, None)?;
            let reference = Policy::load(&reference_dir, device, None)?;
            let end = policy.tokenizer.end_of_turn_id(ctx.cfg.student.template);
            let max_len = stage.optim.max_len;
            let mut objective: Box<dyn BatchLoss> = match loss {
                Loss::Dpo => {
                    let encoded: Vec<EncodedPair> = pairs
                        .iter()
                        .map(|p| EncodedPair::encode(&policy, p, end, max_len))
                        .collect::<Result<_>>()?;
                    let reference = if stage.dpo.precompute_reference {
                        Reference::precompute(&reference, &encoded, stage.optim.batch_size)?
                    } else {
                        Reference::Model(Box::new(reference))
                    };
                    Box::new(Dpo {
                        cfg: stage.dpo.clone(),
                        pairs: encoded,
                        reference,
                    })
                }
                Loss::Kto => Box::new(Kto {
                    cfg: stage.kto.clone(),
                    examples: kto::encode(
                        &policy,
                        &unpaired(&pairs),
                        end,
                        max_len,
                        stage.optim.batch_size,
                    )?,
                    reference,
                }),
            };
            let trained = trainer::train(
                &policy,
                objective.as_mut(),
                &stage.optim,
                ctx.cfg.run.seed + round as u64,
                &dir,
                &tag,
                ctx.metrics,
                ctx.stop,
            )?;
            let model_dir = dir.join("model");
            policy.save(&model_dir)?;
            let mut rng = ChaCha8Rng::seed_from_u64(ctx.cfg.run.seed);
            let r = eval::evaluate(
                &policy,
                &ctx.world.test,
                ctx.cfg.student.template,
                &stage.eval,
                eval::Graders {
                    judge: judge.as_deref(),
                    ..Default::default()
                },
                &mut rng,
            )?;
            ctx.metrics.scalar(
                &format!("eval/{name}/greedy_accuracy"),
                round as u64,
                r.greedy_accuracy,
            );
            let tokens = current.training_tokens + trained.tokens;
            let row = Row {
                method: format!("{name}-round-{round}"),
                eval_set: "synthclinic-test".into(),
                greedy_accuracy: r.greedy_accuracy,
                selection_accuracy: r.selection_accuracy,
                judge_accuracy: r.judge.map(|j| j.accuracy),
                per_task: r.per_task,
                n: r.n,
                training_tokens: tokens,
                wall_s: trained.wall_s,
            };
            eprintln!(
                "{name} round {round}: {} pairs, {} steps, final loss {:.4}, greedy {:.1}%",
                pairs.len(),
                trained.steps,
                trained.final_loss,
                100.0 * r.greedy_accuracy
            );
            let report = RoundReport {
                round,
                pairs: pairs.len(),
                steps: trained.steps,
                tokens,
                final_loss: trained.final_loss,
                wall_s: trained.wall_s,
                greedy_accuracy: r.greedy_accuracy,
                row,
            };
            atomic::write(&done, serde_json::to_string_pretty(&report)?.as_bytes())?;
            report
        };
        current = TrainedModel {
            dir: dir.join("model"),
            training_tokens: report.tokens,
            wall_s: current.wall_s + report.wall_s,
        };
        if stage.report_rounds {
            rows.push(report.row);
        }
    }
    Ok(StageResult {
        rows,
        model: Some(current),
    })
}

/// The round's pairs: read back from `pairs.jsonl`, or built and written.
fn round_pairs(
    ctx: &mut StageCtx,
    stage: &PreferenceStage,
    tag: &str,
    dir: &Path,
    current: &TrainedModel,
    problems: &[Problem],
    round: usize,
) -> Result<Vec<Pair>> {
    let path = dir.join("pairs.jsonl");
    if path.exists() {
        return read_pairs(&path);
    }
    let pairs = match stage.pairs {
        PairBuilder::Tree => tree_pairs(ctx, stage)?,
        PairBuilder::SelfCorrection | PairBuilder::BestVsWorst => {
            let samples = dir.join("samples");
            std::fs::create_dir_all(&samples)?;
            let seed = ctx.cfg.run.seed + round as u64;
            let stored = sample(ctx, stage, tag, &samples, current, problems, seed)?;
            let policy = Policy::load(&current.dir, ctx.device, None)?;
            let template = ctx.cfg.student.template;
            let mut by_problem: BTreeMap<&str, Vec<&Trajectory>> = BTreeMap::new();
            for t in &stored {
                by_problem.entry(t.problem_id.as_str()).or_default().push(t);
            }
            let mut pairs = Vec::new();
            for p in problems {
                let Some(ts) = by_problem.get_mut(p.id.as_str()) else {
                    continue;
                };
                ts.sort_by(|a, b| a.id.cmp(&b.id));
                let prompt = template.render(&p.prompt_text());
                let built = match stage.pairs {
                    PairBuilder::SelfCorrection => correction_pairs(&policy, ts, &prompt)?,
                    _ => best_vs_worst(&policy, ts, &prompt)?,
                };
                pairs.extend(built.into_iter().take(stage.pairs_per_problem));
            }
            pairs
        }
    };
    if pairs.is_empty() {
        bail!(
            "{tag}: no preference pairs (every sampled answer was {}); \
             sample more (sampling.samples) or use more problems",
            if stage.pairs == PairBuilder::Tree {
                "on one side of the tree"
            } else {
                "right or none could be corrected"
            }
        );
    }
    crate::experiment::write_jsonl(&path, &pairs)?;
    ctx.metrics
        .scalar(&format!("{tag}/pairs"), 0, pairs.len() as f64);
    Ok(pairs)
}

/// The student's attempts on `problems` with the `current` model, on the
/// actor runtime (resumable from its store).
#[allow(clippy::too_many_arguments)]
fn sample(
    ctx: &mut StageCtx,
    stage: &PreferenceStage,
    tag: &str,
    dir: &Path,
    current: &TrainedModel,
    problems: &[Problem],
    seed: u64,
) -> Result<Vec<Trajectory>> {
    let template = ctx.cfg.student.template;
    let correcting;
    let plain;
    let rollout: &dyn Rollout = if stage.pairs == PairBuilder::SelfCorrection {
        correcting = SelfCorrection {
            sampling: stage.sampling.clone(),
            template,
            oracle: ctx.world.oracle(ctx.cfg.teacher.oracle.clone()),
            corrector: stage.corrector,
            retries: stage.retries,
        };
        &correcting
    } else {
        plain = Sampler {
            cfg: stage.sampling.clone(),
            template,
            reward: RuleVerifier,
        };
        &plain
    };
    attempts(
        ctx,
        rollout,
        tag,
        dir,
        &current.dir,
        problems,
        &stage.runtime,
        seed,
    )
}

/// Runs `rollout` with the model in `model_dir` over `problems` on the actor
/// runtime, storing in `dir` (a rerun resumes from the store); returns every
/// stored trajectory.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attempts(
    ctx: &mut StageCtx,
    rollout: &dyn Rollout,
    tag: &str,
    dir: &Path,
    model_dir: &Path,
    problems: &[Problem],
    runtime: &RuntimeConfig,
    seed: u64,
) -> Result<Vec<Trajectory>> {
    let device = ctx.device;
    let policy = Policy::load(model_dir, device, None)?;
    let model_dir = model_dir.to_path_buf();
    let build = move || Ok(Policy::load(&model_dir, device, None)?);
    learner::run(Online {
        name: tag,
        dir,
        problems,
        rollout,
        objective: &mut StoreOnly,
        policy: &policy,
        build_actor_policy: &build,
        runtime,
        learner: &LearnerConfig::default(),
        seed,
        metrics: ctx.metrics,
        stop: ctx.stop,
    })?;
    Ok(crate::runtime::store::read_trajectories(
        &dir.join("trajectories.jsonl"),
        false,
    )?)
}

/// Each wrong attempt against its correction (MedCritical).
fn correction_pairs(policy: &Policy, attempts: &[&Trajectory], prompt: &str) -> Result<Vec<Pair>> {
    let mut out = Vec::new();
    for t in attempts {
        let record = Correction::of(t)?;
        let Some(correction) = record.correction else {
            continue;
        };
        out.push(Pair {
            prompt: prompt.to_string(),
            chosen: correction,
            rejected: record.text,
            chosen_ids: record.correction_ids,
            rejected_ids: attempt_ids(policy, t),
            meta: serde_json::json!({
                "problem": t.problem_id,
                "builder": "self_correction",
                "rejected_id": t.id,
                "chosen_by": record.corrected_by,
            }),
        });
    }
    Ok(out)
}

/// Verified-correct samples against wrong ones, pairing them in sample order.
fn best_vs_worst(policy: &Policy, attempts: &[&Trajectory], prompt: &str) -> Result<Vec<Pair>> {
    let (good, bad): (Vec<&&Trajectory>, Vec<&&Trajectory>) =
        attempts.iter().partition(|t| t.reward >= 1.0);
    good.iter()
        .zip(&bad)
        .map(|(g, b)| {
            Ok(Pair {
                prompt: prompt.to_string(),
                chosen: attempt_text(policy, g)?,
                rejected: attempt_text(policy, b)?,
                chosen_ids: attempt_ids(policy, g),
                rejected_ids: attempt_ids(policy, b),
                meta: serde_json::json!({
                    "problem": g.problem_id,
                    "builder": "best_vs_worst",
                    "chosen_id": g.id,
                    "rejected_id": b.id,
                }),
            })
        })
        .collect()
}

/// Correct finished leaves of MedS3 trees against wrong ones.
fn tree_pairs(ctx: &StageCtx, stage: &PreferenceStage) -> Result<Vec<Pair>> {
    let template = ctx.cfg.student.template;
    let text = |leaf: &crate::mcts::Meds3Leaf| {
        let steps: Vec<medzero_envs::Step> = leaf
            .chain
            .iter()
            .map(|s| medzero_envs::Step::new(s.text.clone()))
            .collect();
        format!("{ROOT_TEXT}\n\n{}", render_chain(&steps))
    };
    let mut out = Vec::new();
    for (p, r) in crate::meds3::records(ctx, &stage.tree_data)? {
        let prompt = template.render(&p.prompt_text());
        for (pos, neg) in r.pos.iter().zip(&r.neg).take(stage.pairs_per_problem) {
            out.push(Pair {
                prompt: prompt.clone(),
                chosen: text(pos),
                rejected: text(neg),
                chosen_ids: None,
                rejected_ids: None,
                meta: serde_json::json!({
                    "problem": p.id,
                    "builder": "tree",
                    "values": [pos.value, neg.value],
                }),
            });
        }
    }
    Ok(out)
}

/// KTO's unpaired view of pairs: chosen sides desirable, rejected sides not
/// (a chosen text repeated across pairs counts once).
fn unpaired(pairs: &[Pair]) -> Vec<KtoExample> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in pairs {
        for (completion, ids, desirable) in [
            (&p.chosen, &p.chosen_ids, true),
            (&p.rejected, &p.rejected_ids, false),
        ] {
            if seen.insert((p.prompt.clone(), completion.clone())) {
                out.push(KtoExample {
                    prompt: p.prompt.clone(),
                    completion: completion.clone(),
                    completion_ids: ids.clone(),
                    desirable,
                    meta: p.meta.clone(),
                });
            }
        }
    }
    out
}

/// Reads a pair file, naming the line of a malformed record.
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    crate::experiment::read_jsonl(path, "a preference pair")
}
