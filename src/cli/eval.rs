//! `medzero eval`: a model (or a run's last trained model) scored on a data
//! file, greedy and with selection rules over N samples.

use super::{EvalArgs, EvalMode, device_arg, template};
use crate::eval::EvalConfig;
use crate::experiment::Config;
use anyhow::{Context, Result, bail};
use medzero_envs::Problem;
use medzero_envs::loaders;
use medzero_envs::synthclinic::SynthClinic;
use medzero_policies::Policy;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;

pub(super) fn eval(a: &EvalArgs) -> Result<()> {
    let device = device_arg(&a.device)?;
    let dir = crate::infra::io::resolve_model(&a.model)?;
    let mut problems = loaders::load_problems(&a.data)?;
    let shots = match (a.shots, &a.shots_file) {
        (0, _) => Vec::new(),
        (_, Some(file)) => shots(&loaders::load_problems(file)?, a.shots, file)?,
        (k, None) => {
            // Shots from the scored file itself: those questions are not scored.
            let s = shots(&problems, k, &a.data)?;
            problems.drain(..k);
            s
        }
    };
    let cfg = EvalConfig {
        samples: a.n,
        temperature: a.temperature,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        limit: a.limit,
        rules: a.select.clone(),
        judge: a.judge.is_some(),
        shots,
        ..EvalConfig::default()
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replace("eval.", "--")))?;
    let policy = Policy::load(&dir, device, None)?;
    let template = template(&a.template, &policy.tokenizer)?;
    if a.mode == EvalMode::McqLoglik {
        return loglik(a, &dir, &policy, &template, &problems);
    }
    let prm = a
        .prm
        .as_deref()
        .map(|d| medzero_rewards::Prm::load(d, device))
        .transpose()?;
    let judge = match &a.judge {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--judge {}", path.display()))?;
            // The teacher table of an experiment; its stages do not matter.
            let jc = Config::parse(&text, &path.display().to_string(), &[])?;
            jc.teacher.validate()?;
            let world = SynthClinic::generate(&jc.data.synthclinic)?;
            Some(jc.teacher.build(&world, template.clone(), device)?)
        }
        None => None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let r = crate::eval::evaluate(
        &policy,
        &problems,
        &template,
        &cfg,
        crate::eval::Graders {
            prm: prm.as_ref(),
            labeller: None,
            judge: judge.as_deref(),
        },
        &mut rng,
    )?;
    if let Some(path) = &a.predictions {
        write_lines(path, &r.predictions)?;
    }
    if a.json {
        let v = serde_json::json!({"model": dir.display().to_string(), "data": a.data.display().to_string(), "report": r});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model:  {}", dir.display());
        println!("data:   {} ({} questions)", a.data.display(), r.n);
        println!("greedy: {:.1}%", 100.0 * r.greedy_accuracy);
        if let Some(s) = r.sample_accuracy {
            println!("samples: {:.1}% of {} per question", 100.0 * s, a.n);
        }
        for (rule, acc) in &r.selection_accuracy {
            println!("{rule}: {:.1}%", 100.0 * acc);
        }
        if let Some(j) = &r.judge {
            println!(
                "judge:  {:.1}% by {} (agrees with the strict rule on {:.1}%, {} failed)",
                100.0 * j.accuracy,
                j.judge,
                100.0 * j.agreement,
                j.failures
            );
        }
    }
    Ok(())
}

/// The first `k` questions of `from` as worked examples.
fn shots(from: &[Problem], k: usize, file: &Path) -> Result<Vec<(String, String)>> {
    if from.len() <= k {
        bail!(
            "--shots {k}: {} holds {} questions; give fewer shots or another --shots-file",
            file.display(),
            from.len()
        );
    }
    from[..k]
        .iter()
        .map(|p| match crate::eval::gold_letter(p) {
            Some(letter) => Ok((p.prompt_text(), format!("The answer is {letter}."))),
            None => bail!(
                "--shots: {} question {} has no gold option letter to answer with",
                file.display(),
                p.id
            ),
        })
        .collect()
}

/// `--mode mcq-loglik`: lm-eval's acc and acc_norm over the options.
fn loglik(
    a: &EvalArgs,
    dir: &Path,
    policy: &Policy,
    template: &medzero_policies::tokenizer::PromptTemplate,
    problems: &[Problem],
) -> Result<()> {
    if a.n > 0 || a.shots > 0 || a.judge.is_some() || a.prm.is_some() {
        bail!("--mode mcq-loglik scores options only: drop --n, --shots, --judge and --prm");
    }
    let problems = if a.limit > 0 && a.limit < problems.len() {
        &problems[..a.limit]
    } else {
        problems
    };
    let start = std::time::Instant::now();
    let bar = crate::infra::progress::bar(problems.len() as u64, "mcq-loglik", "questions");
    let r = crate::eval::loglik::evaluate(policy, problems, template, a.choices, |k| {
        bar.inc(k as u64)
    })?;
    bar.finish_and_clear();
    let wall_s = start.elapsed().as_secs_f64();
    if let Some(path) = &a.predictions {
        write_lines(path, &r.predictions)?;
    }
    if a.json {
        let v = serde_json::json!({"model": dir.display().to_string(), "data": a.data.display().to_string(), "mode": "mcq-loglik", "wall_s": wall_s, "report": r});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model:    {}", dir.display());
        println!("data:     {} ({} questions)", a.data.display(), r.n);
        println!("acc:      {:.1}%", 100.0 * r.acc);
        println!("acc_norm: {:.1}%", 100.0 * r.acc_norm);
        println!("wall:     {wall_s:.1}s");
    }
    Ok(())
}

/// One JSON object per line, written whole (temp file, fsync, rename).
fn write_lines<T: serde::Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(item)?);
        text.push('\n');
    }
    medzero_envs::atomic::write(path, text.as_bytes())
        .with_context(|| format!("--predictions {}", path.display()))
}
