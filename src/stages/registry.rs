//! The one list of stage kinds: a line per kind (its variant, payload and
//! TOML `kind`), from which the tagged serde enum and its dispatch to
//! [`Stage`] are generated. Adding a stage is a new file in `stages/` and a
//! line here. Cross-stage rules (unique names, references to earlier stages,
//! no asynchronous runtime in a deterministic run) are [`validate`].

// Every stage module, by its name.
use super::*;
use crate::runtime::{Mode, Placement};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

macro_rules! registry {
    ($($(#[doc = $doc:literal])* $variant:ident($payload:ty) = $kind:literal,)*) => {
        /// One stage of an experiment: its TOML table, tagged by `kind`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind")]
        pub enum StageSpec {
            $($(#[doc = $doc])* #[serde(rename = $kind)] $variant($payload),)*
        }

        impl StageSpec {
            /// Every stage kind, as TOML spells it.
            pub const KINDS: &'static [&'static str] = &[$($kind),*];

            pub fn kind(&self) -> &'static str {
                match self {
                    $(StageSpec::$variant(_) => $kind,)*
                }
            }

            pub fn stage(&self) -> &dyn Stage {
                match self {
                    $(StageSpec::$variant(s) => s,)*
                }
            }
        }
    };
}

registry! {
    /// Reference points every method must beat or match: chance-level
    /// heuristics, the teacher, and the oracle's gold chains.
    Baselines(baselines::BaselinesStage) = "baselines",
    /// Domain-foundation pretraining of the base student on the textbook.
    Pretrain(distill::Pretrain) = "pretrain",
    /// Answer-only distillation: SFT on the teacher's answers without
    /// reasoning (the classic-KD baseline of the papers).
    DistillAnswers(distill::DistillAnswers) = "distill_answers",
    /// SFT on the teacher's reasoning chains in MedS3's step format (the cold
    /// start that teaches the student to reason in steps).
    DistillChains(distill::DistillChains) = "distill_chains",
    /// MedS3: tree search over reasoning steps on the actor runtime.
    Meds3Search(meds3::SearchStage) = "meds3_search",
    /// MedS3: policy SFT on the correct chains of search stages.
    Meds3Policy(meds3::PolicyStage) = "meds3_policy",
    /// MedS3: the process reward model on the search stages' step values.
    Meds3Prm(meds3::PrmStage) = "meds3_prm",
    /// Rejection-sampling fine-tuning on the actor/learner runtime.
    RejectionSampling(rejection_sampling::RejectionSamplingStage) = "rejection_sampling",
    /// GRPO: group-relative policy-gradient RL on the actor/learner runtime.
    Grpo(grpo::GrpoStage) = "grpo",
    /// RLOO: leave-one-out policy-gradient RL on the actor/learner runtime.
    Rloo(rloo::RlooStage) = "rloo",
    /// Self-iterated DPO (MedCritical's stage 2, and best-vs-worst or MedS3
    /// tree pairs).
    Dpo(preference::DpoStage) = "dpo",
    /// KTO on the unpaired halves of the same pairs (Med-Shicheng's alignment).
    Kto(preference::KtoStage) = "kto",
    /// MedThink stage 1: teacher screening and knowledge explanations, SFT.
    MedthinkKnowledge(medthink::KnowledgeStage) = "medthink_knowledge",
    /// MedThink stage 2: the teacher corrects the student's wrong answers, SFT.
    MedthinkCorrection(medthink::CorrectionStage) = "medthink_correction",
    /// Greedy and sampled accuracy of trained models on the test split.
    Eval(eval::EvalStage) = "eval",
}

impl StageSpec {
    /// The stage's name: its own, else its kind.
    pub fn name(&self) -> &str {
        self.stage().name().unwrap_or(self.kind())
    }
}

/// The extra rules of a run over `world` processes: an online stage without
/// actor ranks runs data parallel, each rank generating its share of every
/// round, which needs rounds (no asynchronous runtime).
pub fn check_distributed(stages: &[StageSpec], world: usize) -> Result<()> {
    for (k, spec) in stages.iter().enumerate() {
        let at = || format!("stage {k} ({:?}, kind {:?})", spec.name(), spec.kind());
        let stage = spec.stage();
        let actor_ranks = stage.runtime().is_some_and(|rt| rt.actor_ranks);
        if actor_ranks && world == 1 {
            bail!(
                "{}: runtime.actor_ranks needs several processes (WORLD_SIZE > 1, e.g. torchrun)",
                at()
            );
        }
        if actor_ranks {
            if stage
                .runtime()
                .is_some_and(|rt| rt.mode == Mode::Deterministic)
                && world > 2
            {
                bail!(
                    "{}: runtime.mode = \"deterministic\" runs one actor, but {} actor ranks \
                     would; use \"sync\" or WORLD_SIZE = 2",
                    at(),
                    world - 1
                );
            }
            // Rank 0 alone learns and decides what is sampled.
            continue;
        }
        if world == 1 {
            continue;
        }
        if stage.runtime().is_some_and(|rt| rt.mode == Mode::Async) {
            bail!(
                "{}: runtime.mode = \"async\" cannot train data parallel over {world} ranks \
                 (they would take different steps); use \"sync\" or \"deterministic\", or \
                 runtime.actor_ranks",
                at()
            );
        }
    }
    Ok(())
}

/// Checks every stage and the rules between them, naming the stage (its
/// index and name) in any error: an experiment either loads whole or not at
/// all, before its first stage runs.
pub fn validate(stages: &[StageSpec], deterministic: bool) -> Result<()> {
    if stages.is_empty() {
        bail!("the experiment has no stages: add at least one [[stages]] table");
    }
    let mut names = std::collections::BTreeSet::new();
    for (k, spec) in stages.iter().enumerate() {
        let name = spec.name();
        let at = || format!("stage {k} ({name:?}, kind {:?})", spec.kind());
        let stage = spec.stage();
        stage.validate().with_context(at)?;
        for r in stage.refs() {
            if !names.contains(r) {
                bail!("{}: refers to {r:?}, which names no earlier stage", at());
            }
        }
        if let Some(rt) = stage.runtime() {
            rt.validate().with_context(at)?;
            if rt.placement == Placement::Shared && !stage.servable() {
                bail!(
                    "{}: runtime.placement = \"shared\" serves sampling and search rollouts; \
                     this stage's rollout runs forward passes of its own (advantages, \
                     corrections) and needs \"per_actor\"",
                    at()
                );
            }
            if deterministic && rt.mode == Mode::Async {
                bail!(
                    "{}: run.deterministic is true but runtime.mode is async; use \"sync\" or \
                     \"deterministic\", or set run.deterministic = false",
                    at()
                );
            }
        }
        if !names.insert(name) {
            bail!(
                "{}: two stages are named {name:?}; give one a distinct `name`",
                at()
            );
        }
    }
    Ok(())
}
