//! `medzero eval`: a model (or a run's last trained model) scored on a data
//! file, greedy and with selection rules over N samples.

use super::{EvalArgs, device_arg, template};
use crate::eval::EvalConfig;
use crate::experiment::Config;
use anyhow::{Context, Result};
use medzero_envs::loaders;
use medzero_envs::synthclinic::SynthClinic;
use medzero_policies::Policy;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub(super) fn eval(a: &EvalArgs) -> Result<()> {
    let cfg = EvalConfig {
        samples: a.n,
        temperature: a.temperature,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        limit: a.limit,
        rules: a.select.clone(),
        judge: a.judge.is_some(),
        ..EvalConfig::default()
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replace("eval.", "--")))?;
    let template = template(&a.template)?;
    let device = device_arg(&a.device)?;
    let dir = crate::infra::io::resolve_model(&a.model)?;
    let policy = Policy::load(&dir, device, None)?;
    let problems = loaders::load_problems(&a.data)?;
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
            Some(jc.teacher.build(&world, template, device)?)
        }
        None => None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let r = crate::eval::evaluate(
        &policy,
        &problems,
        template,
        &cfg,
        crate::eval::Graders {
            prm: prm.as_ref(),
            labeller: None,
            judge: judge.as_deref(),
        },
        &mut rng,
    )?;
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
