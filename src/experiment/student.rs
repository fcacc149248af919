//! The base student of a run: an HF model folder (`student.from`), or a
//! fresh Llama-family decoder over a word-level vocabulary of the world's
//! training texts.

use super::config::Config;
use anyhow::Result;
use medzero_envs::ROOT_TEXT;
use medzero_envs::synthclinic::SynthClinic;
use medzero_policies::Policy;
use medzero_policies::tokenizer::{PromptTemplate, Tokenizer};
use std::path::Path;

/// The prompt template of the run: `student.template` resolved against the
/// student folder's own chat template (a fresh student has none).
pub fn student_template(cfg: &Config) -> Result<PromptTemplate> {
    let own = if cfg.student.from.is_empty() {
        None
    } else {
        let path = Path::new(&cfg.student.from).join("tokenizer.json");
        Tokenizer::from_file(&path)?.chat_template().cloned()
    };
    Ok(cfg.student.template.resolve(own.as_ref())?)
}

pub fn base_student(cfg: &Config, world: &SynthClinic, device: tch::Device) -> Result<Policy> {
    if !cfg.student.from.is_empty() {
        return Ok(Policy::load(
            Path::new(&cfg.student.from),
            device,
            Some(cfg.student.dtype),
        )?);
    }
    let oracle = world.oracle(cfg.teacher.oracle.clone());
    let truth = world.truth();
    let template = student_template(cfg)?;
    let mut texts: Vec<String> = world.textbook.clone();
    // Training split and textbook only: a word only the test split holds
    // would be an id that is never an input or a target, so training could
    // only push its logit down; such words read as <unk> instead.
    for p in &world.train {
        texts.push(template.render(&p.prompt_text()));
        if let Ok(steps) = truth.gold_chain(p) {
            texts.push(medzero_envs::render_chain(&steps));
        }
        if let Ok(e) = oracle.explain(p) {
            texts.push(e.render(p));
        }
        texts.extend(
            p.options
                .iter()
                .map(|c| format!("The answer is {}.", c.text)),
        );
    }
    // MedS3's fixed texts: the root sentence and the Reflect opening.
    texts.push(format!("{ROOT_TEXT} But wait,"));
    let tokenizer =
        Tokenizer::word_level(texts.iter().map(String::as_str), cfg.student.min_word_count);
    let decoder = cfg
        .student
        .decoder(tokenizer.vocab_size(), tokenizer.eos_id());
    Ok(Policy::new_random(
        &decoder,
        tokenizer,
        device,
        cfg.run.seed,
    )?)
}
