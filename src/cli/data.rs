//! `medzero data`: make a SynthClinic world, or inspect a data file.

use super::SynthArgs;
use crate::experiment::Config;
use anyhow::{Context, Result};
use medzero_envs::loaders::{self, Format};
use medzero_envs::synthclinic::{SynthClinic, SynthConfig};

pub(super) fn synthclinic(a: &SynthArgs) -> Result<()> {
    let cfg = synth_config(a)?;
    let world = SynthClinic::generate(&cfg)?;
    world.write_dir(&a.out)?;
    println!(
        "wrote {} train and {} test questions, {} textbook lines ({} facts withheld) to {}",
        world.train.len(),
        world.test.len(),
        world.textbook.len(),
        world.withheld.len(),
        a.out.display()
    );
    Ok(())
}

/// Flags and `--set` knobs over the defaults, through the same TOML path as
/// experiment configs, so unknown knobs get the same "did you mean".
fn synth_config(a: &SynthArgs) -> Result<SynthConfig> {
    let mut sets = vec![format!("data.synthclinic.seed={}", a.seed)];
    let flags: [(&str, Option<String>); 8] = [
        ("train", a.train.map(|v| v.to_string())),
        ("test", a.test.map(|v| v.to_string())),
        ("hops", a.hops.map(|v| v.to_string())),
        ("typical_shown", a.typical_shown.map(|v| v.to_string())),
        ("noise_findings", a.noise_findings.map(|v| v.to_string())),
        (
            "distractor_similarity",
            a.distractor_similarity.map(|v| v.to_string()),
        ),
        (
            "withheld_fraction",
            a.withheld_fraction.map(|v| v.to_string()),
        ),
        ("options", a.options.map(|v| v.to_string())),
    ];
    for (k, v) in flags {
        if let Some(v) = v {
            sets.push(format!("data.synthclinic.{k}={v}"));
        }
    }
    sets.extend(a.set.iter().map(|s| format!("data.synthclinic.{s}")));
    let cfg = Config::parse("", "synthclinic knobs", &sets)?
        .data
        .synthclinic;
    cfg.validate()?;
    Ok(cfg)
}

pub(super) fn inspect(file: &std::path::Path, format: Option<&str>, json: bool) -> Result<()> {
    let fmt = match format {
        Some(name) => name.parse::<Format>().map_err(anyhow::Error::msg)?,
        None => loaders::detect_format(file)?,
    };
    let problems = loaders::load_problems_as(file, fmt)?;
    let stats = loaders::stats(&problems);
    let sample = problems.first().context("the file holds no records")?;
    if json {
        let v = serde_json::json!({
            "file": file.display().to_string(),
            "format": fmt.name(),
            "records": problems.len(),
            "stats": stats,
            "sample": sample,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("file:     {}", file.display());
        println!("format:   {}", fmt.name());
        println!("records:  {}", problems.len());
        println!("answers:  {}", fmt_counts(&stats.answer_distribution));
        println!("tasks:    {}", fmt_counts(&stats.tasks));
        println!(
            "options:  {}",
            fmt_counts(
                &stats
                    .option_counts
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect()
            )
        );
        println!(
            "\nsample ({}):\n{}\ngold: {:?}",
            sample.id,
            sample.prompt_text(),
            sample.gold
        );
    }
    Ok(())
}

fn fmt_counts(m: &std::collections::BTreeMap<String, usize>) -> String {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let shown: Vec<String> = v.iter().take(12).map(|(k, n)| format!("{k} {n}")).collect();
    let more = if v.len() > 12 {
        format!(" (+{} more)", v.len() - 12)
    } else {
        String::new()
    };
    shown.join(", ") + &more
}
