//! The teacher boundary: what distillation, MedThink, MedCritical and
//! LLM-as-judge ask of a stronger model. Implementations: SynthClinic's
//! oracle ([`oracle`]: exact knowledge, with its noise and screening knobs),
//! a local medzero model ([`local`], e.g. a bigger one trained earlier) and
//! any OpenAI-compatible chat-completions server ([`chat`], over the
//! [`openai`] client: retries, cache, concurrency limit).
//!
//! Every request returns a typed [`TeacherError`]: a reply in the wrong form
//! is [`TeacherError::Malformed`], which stages count and skip; anything else
//! (the server down after its retries, a bad key, a question the oracle
//! cannot know) is [`TeacherError::Unavailable`] and stops the stage, which a
//! rerun resumes.

pub mod chat;
pub mod local;
pub mod openai;
pub mod oracle;

use anyhow::Result;
use medzero_envs::synthclinic::{OracleConfig, SynthClinic};
use medzero_envs::{Problem, Step, verify};
use medzero_policies::tokenizer::PromptTemplate;
use medzero_rewards::{Reward, RewardError};
use serde::{Deserialize, Serialize};

pub use chat::ChatTeacher;
pub use local::{LocalTeacher, LocalTeacherConfig};
pub use oracle::OracleTeacher;

#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    /// The teacher replied, but not in the asked-for form: skip the item.
    #[error("malformed teacher reply: {0}")]
    Malformed(String),
    /// The teacher could not answer: stop the stage.
    #[error(transparent)]
    Unavailable(#[from] anyhow::Error),
}

impl TeacherError {
    pub fn is_malformed(&self) -> bool {
        matches!(self, TeacherError::Malformed(_))
    }
}

/// A judge's verdict on a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Correct,
    Wrong,
}

pub trait Teacher: Send + Sync {
    fn name(&self) -> String;
    /// MedThink's stage-1 target: `Answer: <option text>` and numbered
    /// knowledge points behind it.
    fn explain(&self, p: &Problem) -> Result<String, TeacherError>;
    /// Whether to keep the item (false: the teacher doubts its own answer).
    fn screen(&self, p: &Problem) -> Result<bool, TeacherError>;
    /// A reasoning chain in step format ending "The answer is <text>.",
    /// continuing `attempt` from its first wrong step (empty: from scratch).
    fn correct(&self, p: &Problem, attempt: &[Step]) -> Result<Vec<Step>, TeacherError>;
    /// Whether `response`'s final answer to `p` is right (MedThink's judge).
    fn judge(&self, p: &Problem, response: &str) -> Result<Verdict, TeacherError>;

    /// The option text the teacher answers `p` with (answer-only
    /// distillation): the `Answer:` line of its explanation, resolved to an
    /// option of `p`.
    fn answer(&self, p: &Problem) -> Result<String, TeacherError> {
        let reply = self.explain(p)?;
        verify::verify(p, &reply)
            .chosen
            .and_then(|letter| p.option(&letter).map(|c| c.text.clone()))
            .ok_or_else(|| {
                TeacherError::Malformed(format!("{}: the explanation names no option", p.id))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherKind {
    /// SynthClinic's oracle: knows the KB, wrong on `oracle.noise` of items.
    Oracle,
    /// An OpenAI-compatible chat-completions server (`[teacher.http]`).
    Http,
    /// A medzero model folder, e.g. a bigger model (`[teacher.local]`).
    Local,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherConfig {
    pub kind: TeacherKind,
    pub oracle: OracleConfig,
    pub http: openai::HttpTeacherConfig,
    pub local: LocalTeacherConfig,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        TeacherConfig {
            kind: TeacherKind::Oracle,
            oracle: OracleConfig::default(),
            http: Default::default(),
            local: Default::default(),
        }
    }
}

impl TeacherConfig {
    /// Checks the table of the chosen kind.
    pub fn validate(&self) -> Result<()> {
        use anyhow::Context;
        let o = &self.oracle;
        for (name, v) in [
            ("noise", o.noise),
            ("screen_recall", o.screen_recall),
            ("screen_false_alarm", o.screen_false_alarm),
        ] {
            if !(0.0..=1.0).contains(&v) {
                anyhow::bail!("teacher.oracle.{name} must be in [0, 1], got {v}");
            }
        }
        match self.kind {
            TeacherKind::Oracle => Ok(()),
            TeacherKind::Http => Ok(self.http.validate().context("teacher.http")?),
            TeacherKind::Local => self.local.validate().context("teacher.local"),
        }
    }

    /// The configured teacher. `template` is how the student's prompts are
    /// rendered (a local teacher's default).
    pub fn build(
        &self,
        world: &SynthClinic,
        template: PromptTemplate,
        device: tch::Device,
    ) -> Result<Box<dyn Teacher>> {
        use anyhow::Context;
        Ok(match self.kind {
            TeacherKind::Oracle => Box::new(OracleTeacher(world.oracle(self.oracle.clone()))),
            TeacherKind::Http => Box::new(ChatTeacher(
                openai::HttpTeacher::new(self.http.clone()).context("teacher.http")?,
            )),
            TeacherKind::Local => Box::new(LocalTeacher::load(&self.local, template, device)?),
        })
    }
}

/// LLM-as-judge as a reward: 1 when the teacher's verdict is "correct". A
/// malformed verdict is a reward failure the caller counts (the item scores
/// nothing), an unavailable teacher stops the stage. Strict rule
/// verification stays the default for option questions.
pub struct JudgeReward<'a>(pub &'a dyn Teacher);

impl Reward for JudgeReward<'_> {
    fn name(&self) -> &str {
        "judge"
    }

    fn score(&self, problem: &Problem, response: &str) -> Result<f32, RewardError> {
        match self.0.judge(problem, response) {
            Ok(Verdict::Correct) => Ok(1.0),
            Ok(Verdict::Wrong) => Ok(0.0),
            Err(TeacherError::Malformed(m)) => Err(RewardError::Malformed(m)),
            Err(TeacherError::Unavailable(e)) => Err(RewardError::Failed(format!("{e:#}"))),
        }
    }
}
