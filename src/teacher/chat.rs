//! A chat-completions model as a teacher: one prompt per request kind, and a
//! strict parse of the reply. Only replies that parse are cached, so a rerun
//! against a fixed server asks again instead of failing on a stored reply.

use super::openai::{HttpTeacher, Message};
use super::{Teacher, TeacherError, Verdict};
use anyhow::Context;
use medzero_envs::{Problem, Step, parse_chain, verify};

pub struct ChatTeacher(pub HttpTeacher);

const SYSTEM: &str = "You are an expert clinician teaching a medical student. Follow the requested answer format exactly.";

impl ChatTeacher {
    /// Asks, and parses the reply with `parse` (an error names what is
    /// missing); the reply is cached only when it parses.
    fn ask<T>(
        &self,
        p: &Problem,
        user: String,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, TeacherError> {
        let reply = self
            .0
            .chat_accepting(&[Message::system(SYSTEM), Message::user(user)], &|c| {
                parse(c.trim()).is_ok()
            })
            .with_context(|| format!("asking teacher {}", self.0.config().model))?;
        parse(reply.content.trim()).map_err(|e| TeacherError::Malformed(format!("{}: {e}", p.id)))
    }
}

fn parse_explanation(reply: &str) -> Result<String, String> {
    match verify::extract_answer(reply) {
        Some(_) => Ok(reply.to_string()),
        None => Err("no `Answer:` line".into()),
    }
}

fn parse_yes_no(reply: &str) -> Result<bool, String> {
    match reply
        .split_whitespace()
        .next()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        Some("YES") | Some("YES.") => Ok(true),
        Some("NO") | Some("NO.") => Ok(false),
        _ => Err(format!("expected YES or NO, got {reply:?}")),
    }
}

fn parse_chain_reply(reply: &str) -> Result<Vec<Step>, String> {
    let steps = parse_chain(reply);
    if steps.len() < 2
        || steps
            .last()
            .is_none_or(|s| verify::extract_answer(&s.text).is_none())
    {
        return Err("no `Step k:` chain ending with an answer".into());
    }
    Ok(steps)
}

fn parse_verdict(reply: &str) -> Result<Verdict, String> {
    match reply.trim_start().chars().next() {
        Some('1') => Ok(Verdict::Correct),
        Some('2') => Ok(Verdict::Wrong),
        _ => Err(format!("judge expected 1 or 2, got {reply:?}")),
    }
}

impl Teacher for ChatTeacher {
    fn name(&self) -> String {
        format!("http:{}", self.0.config().model)
    }

    fn explain(&self, p: &Problem) -> Result<String, TeacherError> {
        self.ask(
            p,
            format!(
                "{}\n\nAnswer on the first line as `Answer: <the option's text>`, then a blank line, then the \
                 numbered knowledge points (1., 2., ...) that lead to it.",
                p.prompt_text()
            ),
            parse_explanation,
        )
    }

    fn screen(&self, p: &Problem) -> Result<bool, TeacherError> {
        self.ask(
            p,
            format!(
                "{}\n\nCan you answer this question with confidence? Reply with one word: YES or NO.",
                p.prompt_text()
            ),
            parse_yes_no,
        )
    }

    fn correct(&self, p: &Problem, attempt: &[Step]) -> Result<Vec<Step>, TeacherError> {
        let shown = if attempt.is_empty() {
            String::new()
        } else {
            format!(
                "\n\nA student reasoned:\n{}\n\nKeep the student's correct steps and fix the reasoning from its first wrong step.",
                medzero_envs::render_chain(attempt)
            )
        };
        self.ask(
            p,
            format!(
                "{}{shown}\n\nWrite the reasoning as lines `Step 1: ...`, `Step 2: ...`, the last one ending \
                 `The answer is <the option's text>.`",
                p.prompt_text()
            ),
            parse_chain_reply,
        )
    }

    fn judge(&self, p: &Problem, response: &str) -> Result<Verdict, TeacherError> {
        let reference = p.gold_text().unwrap_or_default();
        self.ask(
            p,
            format!(
                "Question:\n{}\n\nReference answer: {reference}\n\nStudent reply:\n{response}\n\nIs the student's final \
                 answer correct? Reply with 1 if it is correct and 2 if it is wrong, nothing else.",
                p.prompt_text()
            ),
            parse_verdict,
        )
    }
}
