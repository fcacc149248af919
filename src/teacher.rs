//! The teacher boundary: what distillation, MedThink and MedCritical ask of
//! a stronger model. Implementations: SynthClinic's oracle (exact knowledge,
//! with its noise and screening knobs) and any OpenAI-compatible
//! chat-completions server through [`crate::http_teacher::HttpTeacher`]
//! (retries, cache, concurrency limit). A reply a teacher cannot parse is an
//! error for that item, which stages count and skip, never a crash.

use crate::http_teacher::{HttpTeacher, Message};
use anyhow::{Context, Result};
use medzero_envs::synthclinic::Oracle;
use medzero_envs::{Problem, Step, parse_chain, verify};
use medzero_rewards::Reward;

/// A reply the teacher gave but that does not have the asked-for form: the
/// item is skipped and counted. Any other error (the server down after its
/// retries, a bad key) stops the stage.
#[derive(Debug)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed teacher reply: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// Whether `e` is a [`Malformed`] reply (skip the item) rather than a
/// failure that must stop the stage.
pub fn is_malformed(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Malformed>().is_some()
}

pub trait Teacher: Send + Sync {
    fn name(&self) -> String;
    /// MedThink's stage-1 target: `Answer: <option text>` and numbered
    /// knowledge points behind it.
    fn explain(&self, p: &Problem) -> Result<String>;
    /// Whether to keep the item (false: the teacher doubts its own answer).
    fn screen(&self, p: &Problem) -> Result<bool>;
    /// A reasoning chain in step format ending "The answer is <text>.",
    /// continuing `attempt` from its first wrong step (empty: from scratch).
    fn correct(&self, p: &Problem, attempt: &[Step]) -> Result<Vec<Step>>;
    /// MedThink's judge verdict on a reply: 1 = correct, 2 = wrong.
    fn judge(&self, p: &Problem, response: &str) -> Result<u8>;
}

/// SynthClinic's oracle as a teacher.
pub struct OracleTeacher(pub Oracle);

impl Teacher for OracleTeacher {
    fn name(&self) -> String {
        "oracle".into()
    }

    fn explain(&self, p: &Problem) -> Result<String> {
        let e = self.0.explain(p)?;
        Ok(e.render(p))
    }

    fn screen(&self, p: &Problem) -> Result<bool> {
        Ok(self.0.screen(p)?)
    }

    fn correct(&self, p: &Problem, attempt: &[Step]) -> Result<Vec<Step>> {
        Ok(self.0.correct(p, attempt)?)
    }

    fn judge(&self, p: &Problem, response: &str) -> Result<u8> {
        Ok(self.0.judge(p, response))
    }
}

/// A chat-completions model as a teacher: one prompt per request kind, and a
/// strict parse of the reply.
pub struct ChatTeacher(pub HttpTeacher);

const SYSTEM: &str = "You are an expert clinician teaching a medical student. Follow the requested answer format exactly.";

impl ChatTeacher {
    fn ask(&self, user: String) -> Result<String> {
        let reply = self
            .0
            .chat(&[Message::system(SYSTEM), Message::user(user)])
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("asking teacher {}", self.0.config().model))?;
        Ok(reply.content.trim().to_string())
    }
}

impl Teacher for ChatTeacher {
    fn name(&self) -> String {
        format!("http:{}", self.0.config().model)
    }

    fn explain(&self, p: &Problem) -> Result<String> {
        let reply = self.ask(format!(
            "{}\n\nAnswer on the first line as `Answer: <the option's text>`, then a blank line, then the \
             numbered knowledge points (1., 2., ...) that lead to it.",
            p.prompt_text()
        ))?;
        if verify::extract_answer(&reply).is_none() {
            return Err(Malformed(format!("{}: no `Answer:` line", p.id)).into());
        }
        Ok(reply)
    }

    fn screen(&self, p: &Problem) -> Result<bool> {
        let reply = self.ask(format!(
            "{}\n\nCan you answer this question with confidence? Reply with one word: YES or NO.",
            p.prompt_text()
        ))?;
        match reply
            .split_whitespace()
            .next()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            Some("YES") | Some("YES.") => Ok(true),
            Some("NO") | Some("NO.") => Ok(false),
            _ => Err(Malformed(format!("{}: expected YES or NO, got {reply:?}", p.id)).into()),
        }
    }

    fn correct(&self, p: &Problem, attempt: &[Step]) -> Result<Vec<Step>> {
        let shown = if attempt.is_empty() {
            String::new()
        } else {
            format!(
                "\n\nA student reasoned:\n{}\n\nKeep the student's correct steps and fix the reasoning from its first wrong step.",
                medzero_envs::render_chain(attempt)
            )
        };
        let reply = self.ask(format!(
            "{}{shown}\n\nWrite the reasoning as lines `Step 1: ...`, `Step 2: ...`, the last one ending \
             `The answer is <the option's text>.`",
            p.prompt_text()
        ))?;
        let steps = parse_chain(&reply);
        if steps.len() < 2
            || steps
                .last()
                .is_none_or(|s| verify::extract_answer(&s.text).is_none())
        {
            return Err(Malformed(format!(
                "{}: no `Step k:` chain ending with an answer",
                p.id
            ))
            .into());
        }
        Ok(steps)
    }

    fn judge(&self, p: &Problem, response: &str) -> Result<u8> {
        let reference = p.gold_text().unwrap_or_default();
        let reply = self.ask(format!(
            "Question:\n{}\n\nReference answer: {reference}\n\nStudent reply:\n{response}\n\nIs the student's final \
             answer correct? Reply with 1 if it is correct and 2 if it is wrong, nothing else.",
            p.prompt_text()
        ))?;
        match reply.trim_start().chars().next() {
            Some('1') => Ok(1),
            Some('2') => Ok(2),
            _ => Err(Malformed(format!("{}: judge expected 1 or 2, got {reply:?}", p.id)).into()),
        }
    }
}

/// LLM-as-judge as a reward: 1 when the teacher's verdict is "correct". A
/// failed judgement scores 0 (and is reported on stderr), so one bad reply
/// cannot stop a stage. Strict rule verification stays the default for
/// option questions.
pub struct JudgeReward<'a>(pub &'a dyn Teacher);

impl Reward for JudgeReward<'_> {
    fn name(&self) -> &str {
        "judge"
    }

    fn score(&self, problem: &Problem, steps: &[Step]) -> f32 {
        let response = medzero_envs::render_chain(steps);
        match self.0.judge(problem, &response) {
            Ok(1) => 1.0,
            Ok(_) => 0.0,
            Err(e) => {
                eprintln!("judge: {e:#}");
                0.0
            }
        }
    }
}
