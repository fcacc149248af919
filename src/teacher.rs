//! The teacher boundary: what distillation, MedThink and MedCritical ask of
//! a stronger model. Implementations: SynthClinic's oracle (exact knowledge,
//! with its noise and screening knobs), a local medzero model (e.g. a bigger
//! one trained earlier) and any OpenAI-compatible chat-completions server
//! through [`crate::http_teacher::HttpTeacher`] (retries, cache, concurrency
//! limit). A reply a teacher cannot parse is an error for that item, which
//! stages count and skip, never a crash.

use crate::http_teacher::{FNV_OFFSET, HttpTeacher, Message, fnv1a64};
use anyhow::{Context, Result};
use medzero_envs::synthclinic::Oracle;
use medzero_envs::{Problem, Step, parse_chain, verify};
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, SamplingParams};
use medzero_rewards::Reward;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

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

/// `[teacher.local]`: a medzero model folder (or a run folder, whose last
/// trained model is used) as the teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalTeacherConfig {
    pub model: PathBuf,
    /// The template the teacher model was trained with (default: the
    /// student's).
    pub template: Option<PromptTemplate>,
    pub max_new_tokens: usize,
    /// Screening samples per question: the teacher keeps a question when
    /// at least `screen_agreement` of them name the same option as its
    /// greedy answer (self-consistency as confidence).
    pub screen_samples: usize,
    pub screen_agreement: f64,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for LocalTeacherConfig {
    fn default() -> Self {
        LocalTeacherConfig {
            model: PathBuf::new(),
            template: None,
            max_new_tokens: 160,
            screen_samples: 8,
            screen_agreement: 0.75,
            temperature: 0.7,
            top_p: 0.95,
            seed: 0,
        }
    }
}

impl LocalTeacherConfig {
    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            anyhow::bail!("model: a model or run folder is required");
        }
        if self.max_new_tokens == 0 || self.screen_samples == 0 {
            anyhow::bail!("max_new_tokens and screen_samples must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.screen_agreement) {
            anyhow::bail!(
                "screen_agreement must be in [0, 1], got {}",
                self.screen_agreement
            );
        }
        if self.temperature <= 0.0 || !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            anyhow::bail!("temperature must be > 0 and top_p in (0, 1]");
        }
        Ok(())
    }
}

/// A medzero model as a teacher. It answers in whatever form it was trained
/// to (a `Step k:` chain or `Answer:` with knowledge points); each request
/// is reduced to that answer:
/// - explain: its greedy answer, as `Answer: <text>` and the chain's steps
///   (or its knowledge points) numbered;
/// - screen: keep when `screen_agreement` of `screen_samples` samples agree
///   with the greedy answer;
/// - correct: its own greedy chain from scratch (a model without step labels
///   cannot tell which student step went wrong);
/// - judge: 1 when the reply names the option the teacher itself answers
///   (a reference-free judge, unlike the chat judge, which is shown the key).
///
/// Generation is serialised on one model and seeded per request from the
/// question id, so results do not depend on thread order.
pub struct LocalTeacher {
    policy: Mutex<Policy>,
    template: PromptTemplate,
    cfg: LocalTeacherConfig,
    dir: PathBuf,
    greedy: Mutex<HashMap<String, String>>,
}

impl LocalTeacher {
    pub fn load(
        cfg: &LocalTeacherConfig,
        student_template: PromptTemplate,
        device: tch::Device,
    ) -> Result<Self> {
        cfg.validate().context("teacher.local")?;
        let dir = crate::experiment::resolve_model(&cfg.model).context("teacher.local.model")?;
        let policy = Policy::load(&dir, device, None)
            .with_context(|| format!("loading the teacher model {}", dir.display()))?;
        Ok(LocalTeacher {
            policy: Mutex::new(policy),
            template: cfg.template.unwrap_or(student_template),
            cfg: cfg.clone(),
            dir,
            greedy: Mutex::new(HashMap::new()),
        })
    }

    fn rng(&self, kind: &str, p: &Problem) -> ChaCha8Rng {
        // FNV-1a: stable across runs and platforms, unlike the std hasher.
        let key = [kind.as_bytes(), &[0], p.id.as_bytes()].concat();
        ChaCha8Rng::seed_from_u64(fnv1a64(FNV_OFFSET ^ self.cfg.seed, &key))
    }

    fn generate(&self, p: &Problem, n: usize, temperature: f64) -> Result<Vec<String>> {
        let policy = self.policy.lock().expect("teacher model lock");
        let prompt = policy
            .tokenizer
            .encode(&self.template.render(&p.prompt_text()))?;
        let params = SamplingParams {
            max_new_tokens: self.cfg.max_new_tokens,
            temperature,
            top_p: if temperature > 0.0 {
                self.cfg.top_p
            } else {
                1.0
            },
            stop_token_ids: vec![policy.tokenizer.end_of_turn_id(self.template)],
            ..SamplingParams::default()
        };
        let mut rng = self.rng(
            if temperature > 0.0 {
                "sample"
            } else {
                "greedy"
            },
            p,
        );
        let outs = policy.sample_n(&prompt, n, &params, &mut rng)?;
        Ok(outs.into_iter().map(|g| g.text).collect())
    }

    /// The teacher's greedy reply to `p`, generated once.
    fn greedy_reply(&self, p: &Problem) -> Result<String> {
        if let Some(r) = self.greedy.lock().expect("cache lock").get(&p.id) {
            return Ok(r.clone());
        }
        let reply = self.generate(p, 1, 0.0)?.remove(0);
        self.greedy
            .lock()
            .expect("cache lock")
            .insert(p.id.clone(), reply.clone());
        Ok(reply)
    }

    /// The option the greedy reply names, or a [`Malformed`] error.
    fn greedy_choice(&self, p: &Problem) -> Result<(String, String)> {
        let reply = self.greedy_reply(p)?;
        match verify::verify(p, &reply).chosen {
            Some(letter) => Ok((letter, reply)),
            None => Err(Malformed(format!(
                "{}: the teacher model's reply names no option: {:?}",
                p.id,
                excerpt(&reply)
            ))
            .into()),
        }
    }
}

fn excerpt(s: &str) -> String {
    s.chars().take(120).collect()
}

impl Teacher for LocalTeacher {
    fn name(&self) -> String {
        format!("local:{}", self.dir.display())
    }

    fn explain(&self, p: &Problem) -> Result<String> {
        let (letter, reply) = self.greedy_choice(p)?;
        if reply.trim_start().starts_with("Answer:") {
            return Ok(reply.trim().to_string());
        }
        let text = p.option(&letter).map_or("", |c| c.text.as_str());
        let mut s = format!("Answer: {text}\n");
        for (i, step) in crate::meds3::response_steps(&reply).iter().enumerate() {
            s.push_str(&format!("\n{}. {}", i + 1, step));
        }
        Ok(s)
    }

    fn screen(&self, p: &Problem) -> Result<bool> {
        let (letter, _) = self.greedy_choice(p)?;
        let samples = self.generate(p, self.cfg.screen_samples, self.cfg.temperature)?;
        let agree = samples
            .iter()
            .filter(|s| verify::verify(p, s).chosen.as_deref() == Some(letter.as_str()))
            .count();
        Ok(agree as f64 >= self.cfg.screen_agreement * samples.len() as f64)
    }

    fn correct(&self, p: &Problem, _attempt: &[Step]) -> Result<Vec<Step>> {
        let (_, reply) = self.greedy_choice(p)?;
        let steps: Vec<Step> = crate::meds3::response_steps(&reply)
            .into_iter()
            .map(Step::new)
            .collect();
        if steps
            .last()
            .is_none_or(|s| verify::extract_answer(&s.text).is_none())
        {
            return Err(Malformed(format!(
                "{}: the teacher model's reply is no chain ending with an answer: {:?}",
                p.id,
                excerpt(&reply)
            ))
            .into());
        }
        Ok(steps)
    }

    fn judge(&self, p: &Problem, response: &str) -> Result<u8> {
        let (letter, _) = self.greedy_choice(p)?;
        let named = verify::verify(p, response).chosen;
        Ok(if named.as_deref() == Some(letter.as_str()) {
            1
        } else {
            2
        })
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

    fn score(&self, problem: &Problem, response: &str) -> f32 {
        match self.0.judge(problem, response) {
            Ok(1) => 1.0,
            Ok(_) => 0.0,
            Err(e) => {
                eprintln!("judge: {e:#}");
                0.0
            }
        }
    }
}
