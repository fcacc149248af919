//! Self-iterated preference learning as a stage (the iterative DPO recipe
//! users of TRL ask for, and MedCritical's stage 2, arXiv 2509.23368): each
//! round samples the training questions
//! with the latest policy on the actor runtime, builds pairs, trains DPO (or
//! KTO on the pairs' unpaired halves) against a fixed reference, and scores
//! the round's model on the test split. Round k lives in `round-k/`; a
//! finished round leaves `round.json` and is skipped on resume.

use super::{Stage, StageCtx, StageOutput, TrainedModel, required};
use crate::eval::{self, EvalConfig};
use crate::infra::io::{read_jsonl, write_json, write_jsonl};
use crate::infra::monitor::{Metrics, TensorBoard};
use crate::rollout::medcritical::{
    Correction, Corrector, SelfCorrection, attempt_ids, attempt_text,
};
use crate::rollout::sampling::{Sampler, SamplingConfig};
use crate::runtime::collect::{Collect, collect};
use crate::runtime::{Rollout, RuntimeConfig};
use crate::train::dpo::{Dpo, DpoConfig, EncodedPair, Pair, Reference};
use crate::train::kto::{self, Kto, KtoConfig, KtoExample};
use crate::train::{self, BatchLoss, TrainConfig};
use anyhow::{Context, Result, bail};
use medzero_envs::{Problem, Step, Trajectory, chain_text};
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
    /// The reference model's stage (none: `init`, MedCritical's SFT model).
    pub reference: Option<String>,
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
    /// The loss of a `dpo` stage (default: sigmoid, MedCritical's beta 0.3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoConfig>,
    /// The loss of a `kto` stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kto: Option<KtoConfig>,
    /// The optimisation of each round (epochs over its pairs, batch, lr...).
    pub optim: TrainConfig,
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
            reference: None,
            rounds: 2,
            problems: 0,
            pairs: PairBuilder::SelfCorrection,
            corrector: Corrector::Student,
            retries: 4,
            pairs_per_problem: 1,
            tree_data: Vec::new(),
            sampling: SamplingConfig::default(),
            dpo: None,
            kto: None,
            optim: TrainConfig {
                lr: 1e-5,
                epochs: 1.0,
                batch_size: 8,
                ..TrainConfig::default()
            },
            runtime: RuntimeConfig::default(),
            eval: EvalConfig::default(),
            report_rounds: true,
        }
    }
}

/// Which loss a preference stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    Dpo,
    Kto,
}

/// MedCritical's DPO setting: the sigmoid loss at beta 0.3.
fn medcritical_dpo() -> DpoConfig {
    DpoConfig {
        beta: 0.3,
        ..DpoConfig::default()
    }
}

impl PreferenceStage {
    fn validate(&self, loss: Loss) -> Result<()> {
        required("init", &self.init)?;
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
            Loss::Dpo if self.kto.is_some() => {
                bail!("a dpo stage takes a [stages.dpo] table, not [stages.kto]")
            }
            Loss::Kto if self.dpo.is_some() => {
                bail!("a kto stage takes a [stages.kto] table, not [stages.dpo]")
            }
            Loss::Dpo => self.dpo_config().validate().context("dpo")?,
            Loss::Kto => self.kto_config().validate().context("kto")?,
        }
        if self.pairs != PairBuilder::Tree {
            self.sampling.validate().context("sampling")?;
        }
        self.optim.validate().context("optim")?;
        self.eval.validate().context("eval")
    }

    fn dpo_config(&self) -> DpoConfig {
        self.dpo.clone().unwrap_or_else(medcritical_dpo)
    }

    fn kto_config(&self) -> KtoConfig {
        self.kto.clone().unwrap_or_default()
    }

    /// Stage names this one reads.
    fn refs(&self) -> Vec<&str> {
        std::iter::once(self.init.as_str())
            .chain(self.reference.as_deref())
            .chain(self.tree_data.iter().map(String::as_str))
            .collect()
    }
}

macro_rules! preference_stage {
    ($(#[doc = $doc:literal])* $name:ident, $loss:expr) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub PreferenceStage);

        impl Stage for $name {
            fn name(&self) -> Option<&str> {
                self.0.name.as_deref()
            }
            fn refs(&self) -> Vec<&str> {
                self.0.refs()
            }
            fn runtime(&self) -> Option<&RuntimeConfig> {
                Some(&self.0.runtime)
            }
            // Self-corrections retry from prefixes on a model of their own.
            fn servable(&self) -> bool {
                self.0.pairs != PairBuilder::SelfCorrection
            }
            fn validate(&self) -> Result<()> {
                self.0.validate($loss)
            }
            fn run(&self, ctx: &mut StageCtx) -> Result<StageOutput> {
                run(ctx, &self.0, $loss)
            }
        }
    };
}

preference_stage!(
    /// Self-iterated DPO.
    DpoStage,
    Loss::Dpo
);
preference_stage!(
    /// Self-iterated KTO on the pairs' unpaired halves.
    KtoStage,
    Loss::Kto
);

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
    row: crate::infra::results::Row,
}

fn run(ctx: &mut StageCtx, stage: &PreferenceStage, loss: Loss) -> Result<StageOutput> {
    let (name, device) = (ctx.name, ctx.run.device);
    let init = ctx.model(&stage.init)?;
    let reference_dir = match &stage.reference {
        None => init.dir.clone(),
        Some(r) => ctx.model(r)?.dir,
    };
    let problems = ctx.train_problems(stage.problems, 0);
    let judge = if stage.eval.judge {
        Some(ctx.services.teacher()?)
    } else {
        None
    };
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
            // Each round's sampling and training in its own TensorBoard run.
            let mut tb = TensorBoard::create(&dir)?;
            let pairs = round_pairs(ctx, &mut tb, stage, &tag, &dir, &current, problems, round)?;
            let policy = Policy::load(&current.dir, device, None)?;
            let reference = Policy::load(&reference_dir, device, None)?;
            let end = policy.tokenizer.end_of_turn_id(&ctx.run.template);
            let max_len = stage.optim.max_len;
            let mut objective: Box<dyn BatchLoss> = match loss {
                Loss::Dpo => {
                    let encoded: Vec<EncodedPair> = pairs
                        .iter()
                        .map(|p| EncodedPair::encode(&policy, p, end, max_len))
                        .collect::<Result<_>>()?;
                    let cfg = stage.dpo_config();
                    let reference = if cfg.precompute_reference {
                        Reference::precompute(&reference, &encoded, stage.optim.batch_size)?
                    } else {
                        Reference::Model(Box::new(reference))
                    };
                    Box::new(Dpo {
                        cfg,
                        pairs: encoded,
                        reference,
                    })
                }
                Loss::Kto => Box::new(Kto {
                    cfg: stage.kto_config(),
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
            let trained = train::train(
                &policy,
                objective.as_mut(),
                &stage.optim,
                train::TrainRun {
                    seed: ctx.run.seed + round as u64,
                    dir: &dir,
                    tag: &tag,
                    metrics: &mut tb,
                    stop: ctx.stop,
                },
            )?;
            tb.flush()?;
            crate::infra::io::save_model(&policy, &dir.join("model"))?;
            let mut rng = ChaCha8Rng::seed_from_u64(ctx.run.seed);
            let r = eval::evaluate(
                &policy,
                &ctx.world.test,
                &ctx.run.template,
                &stage.eval,
                eval::Graders {
                    judge: judge.as_deref(),
                    ..Default::default()
                },
                &mut rng,
            )?;
            ctx.metrics
                .scalar("eval/greedy_accuracy", round as u64, r.greedy_accuracy);
            let tokens = current.training_tokens + trained.tokens;
            let greedy_accuracy = r.greedy_accuracy;
            let row = r.into_row(&format!("{name}-round-{round}"), tokens, trained.wall_s);
            eprintln!(
                "{name} round {round}: {} pairs, {} steps, final loss {:.4}, greedy {:.1}%",
                pairs.len(),
                trained.steps,
                trained.final_loss,
                100.0 * greedy_accuracy
            );
            let report = RoundReport {
                round,
                pairs: pairs.len(),
                steps: trained.steps,
                tokens,
                final_loss: trained.final_loss,
                wall_s: trained.wall_s,
                greedy_accuracy,
                row,
            };
            write_json(&done, &report)?;
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
    Ok(StageOutput {
        rows,
        model: Some(current),
    })
}

/// The round's pairs: read back from `pairs.jsonl`, or built and written.
#[allow(clippy::too_many_arguments)]
fn round_pairs(
    ctx: &mut StageCtx,
    metrics: &mut dyn Metrics,
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
            let seed = ctx.run.seed + round as u64;
            let stored = sample(ctx, metrics, stage, tag, &samples, current, problems, seed)?;
            let policy = Policy::load(&current.dir, ctx.run.device, None)?;
            let template = ctx.run.template.clone();
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
    write_jsonl(&path, &pairs)?;
    metrics.scalar("data/pairs", 0, pairs.len() as f64);
    Ok(pairs)
}

/// The student's attempts on `problems` with the `current` model, on the
/// actor runtime (resumable from its store).
#[allow(clippy::too_many_arguments)]
fn sample(
    ctx: &mut StageCtx,
    metrics: &mut dyn Metrics,
    stage: &PreferenceStage,
    tag: &str,
    dir: &Path,
    current: &TrainedModel,
    problems: &[Problem],
    seed: u64,
) -> Result<Vec<Trajectory>> {
    let template = ctx.run.template.clone();
    let teacher = match stage.corrector {
        Corrector::Teacher if stage.pairs == PairBuilder::SelfCorrection => {
            Some(ctx.services.teacher()?)
        }
        _ => None,
    };
    let correcting;
    let plain;
    let rollout: &dyn Rollout = if stage.pairs == PairBuilder::SelfCorrection {
        correcting = SelfCorrection {
            sampling: stage.sampling.clone(),
            template,
            labeller: ctx.truth,
            corrector: stage.corrector,
            teacher: teacher.as_deref(),
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
    let (stored, _) = collect(Collect {
        name: tag,
        dir,
        model_dir: &current.dir,
        device: ctx.run.device,
        problems,
        rollout,
        runtime: &stage.runtime,
        seed,
        metrics,
        stop: ctx.stop,
    })?;
    Ok(stored)
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
    let template = ctx.run.template.clone();
    let text = |leaf: &crate::rollout::mcts::Meds3Leaf| {
        let steps: Vec<Step> = leaf
            .chain
            .iter()
            .map(|s| Step::new(s.text.clone()))
            .collect();
        chain_text(&steps)
    };
    let mut out = Vec::new();
    for (p, r) in super::meds3::records(ctx, &stage.tree_data)? {
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
    read_jsonl(path, "a preference pair")
}
