//! `medzero generate`: one completion of a prompt from a model folder.

use super::{GenerateArgs, device_arg, template};
use anyhow::{Result, bail};
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub(super) fn generate(a: &GenerateArgs) -> Result<()> {
    if a.prompt.is_empty() {
        bail!("--prompt is empty: give the text to continue");
    }
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: if a.greedy {
            0.0
        } else {
            a.temperature.unwrap_or(0.0)
        },
        top_p: a.top_p,
        ..SamplingParams::default()
    };
    params.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
    let policy = Policy::load(&a.model, device_arg(&a.device)?, None)?;
    let text = match &a.template {
        Some(t) => template(t, &policy.tokenizer)?.render(&a.prompt),
        None => a.prompt.clone(),
    };
    let prompt = policy.tokenizer.encode(&text)?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let g = policy
        .generate(std::slice::from_ref(&prompt), &params, &mut rng)?
        .remove(0);
    if a.json {
        let v = serde_json::json!({
            "prompt_tokens": prompt,
            "tokens": g.tokens,
            "logprobs": g.logprobs,
            "text": g.text,
            "finish": g.finish,
        });
        println!("{v}");
    } else {
        println!("{}", g.text);
    }
    Ok(())
}
