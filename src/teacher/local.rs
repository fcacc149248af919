//! A medzero model folder (or a run folder, whose last trained model is
//! used) as the teacher: e.g. a bigger model trained earlier.

use super::{Teacher, TeacherError, Verdict};
use crate::infra::{FNV_OFFSET, fnv1a64};
use anyhow::{Context, Result};
use medzero_envs::{Problem, Step, response_steps, verify};
use medzero_policies::tokenizer::{PromptTemplate, TemplateChoice};
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// `[teacher.local]`: a medzero model folder (or a run folder, whose last
/// trained model is used) as the teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalTeacherConfig {
    pub model: PathBuf,
    /// The template the teacher model was trained with (default: the
    /// student's); `model` and `auto` resolve against the teacher's folder.
    pub template: Option<TemplateChoice>,
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
            max_new_tokens: 320,
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
        let dir = crate::infra::io::resolve_model(&cfg.model).context("teacher.local.model")?;
        let policy = Policy::load(&dir, device, None)
            .with_context(|| format!("loading the teacher model {}", dir.display()))?;
        let template = match cfg.template {
            Some(choice) => choice
                .resolve(policy.tokenizer.chat_template())
                .context("teacher.local.template")?,
            None => student_template,
        };
        Ok(LocalTeacher {
            policy: Mutex::new(policy),
            template,
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
            stop_token_ids: vec![policy.tokenizer.end_of_turn_id(&self.template)],
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

    /// The option the greedy reply names, or a malformed reply.
    fn greedy_choice(&self, p: &Problem) -> Result<(String, String), TeacherError> {
        let reply = self.greedy_reply(p)?;
        match verify::verify(p, &reply).chosen {
            Some(letter) => Ok((letter, reply)),
            None => Err(TeacherError::Malformed(format!(
                "{}: the teacher model's reply names no option: {:?}",
                p.id,
                excerpt(&reply)
            ))),
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

    fn explain(&self, p: &Problem) -> Result<String, TeacherError> {
        let (letter, reply) = self.greedy_choice(p)?;
        if reply.trim_start().starts_with("Answer:") {
            return Ok(reply.trim().to_string());
        }
        let text = p.option(&letter).map_or("", |c| c.text.as_str());
        let mut s = format!("Answer: {text}\n");
        for (i, step) in response_steps(&reply).iter().enumerate() {
            s.push_str(&format!("\n{}. {}", i + 1, step));
        }
        Ok(s)
    }

    fn screen(&self, p: &Problem) -> Result<bool, TeacherError> {
        let (letter, _) = self.greedy_choice(p)?;
        let samples = self.generate(p, self.cfg.screen_samples, self.cfg.temperature)?;
        let agree = samples
            .iter()
            .filter(|s| verify::verify(p, s).chosen.as_deref() == Some(letter.as_str()))
            .count();
        Ok(agree as f64 >= self.cfg.screen_agreement * samples.len() as f64)
    }

    fn correct(&self, p: &Problem, _attempt: &[Step]) -> Result<Vec<Step>, TeacherError> {
        let (_, reply) = self.greedy_choice(p)?;
        let steps: Vec<Step> = response_steps(&reply).into_iter().map(Step::new).collect();
        if steps
            .last()
            .is_none_or(|s| verify::extract_answer(&s.text).is_none())
        {
            return Err(TeacherError::Malformed(format!(
                "{}: the teacher model's reply is no chain ending with an answer: {:?}",
                p.id,
                excerpt(&reply)
            )));
        }
        Ok(steps)
    }

    fn judge(&self, p: &Problem, response: &str) -> Result<Verdict, TeacherError> {
        let (letter, _) = self.greedy_choice(p)?;
        let named = verify::verify(p, response).chosen;
        Ok(if named.as_deref() == Some(letter.as_str()) {
            Verdict::Correct
        } else {
            Verdict::Wrong
        })
    }
}
