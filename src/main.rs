use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use medzero::config::{Config, QUICKSTART};
use medzero::eval::EvalConfig;
use medzero_envs::loaders::{self, Format};
use medzero_envs::synthclinic::{SynthClinic, SynthConfig};
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::process::ExitCode;

/// Self-play RL for small clinical-reasoning language models.
#[derive(Parser)]
#[command(name = "medzero", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment (no CONFIG: the embedded quickstart). Re-running an
    /// existing run name resumes it.
    Run {
        /// Experiment TOML, e.g. experiments/quickstart.toml.
        config: Option<PathBuf>,
        /// Override a config key: --set search.max_nodes=60 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Delete an existing run of the same name and start over.
        #[arg(long)]
        fresh: bool,
    },
    /// Make or inspect data sets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate from a model folder (HF layout: config.json, model.safetensors, tokenizer.json).
    Generate(GenerateArgs),
    /// Score a model (a folder, or a run whose last trained model is used) on a data file.
    Eval(EvalArgs),
    /// Throughput of the hot paths, side by side with transformers / PyTorch.
    Bench {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Skip the transformers / PyTorch side.
        #[arg(long)]
        no_peer: bool,
        /// CPU threads for both sides (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with = "temperature")]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in a template (plain, chat_ml); none by default.
    #[arg(long)]
    template: Option<String>,
    /// Print the token ids and their log-probs as JSON.
    #[arg(long)]
    json: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct EvalArgs {
    /// A model folder, or a run folder (runs/NAME).
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Samples per question for vote-sc@N (0: greedy only).
    #[arg(long, default_value_t = 0)]
    n: usize,
    /// Score only the first K questions.
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Selection rules over the N samples: vote-sc, prm-max, prm-minmax,
    /// prm-vote-sum, p-vs, bon-mean, bon-prod (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "vote-sc")]
    select: Vec<medzero::selection::Rule>,
    /// A PRM folder (a `meds3_prm` stage's model) for the PRM rules.
    #[arg(long)]
    prm: Option<PathBuf>,
    /// An experiment TOML whose `[teacher]` also judges each greedy answer
    /// (LLM-as-judge, 1 = correct / 2 = wrong), reported beside the strict
    /// verifier's accuracy.
    #[arg(long)]
    judge: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[arg(long, default_value = "plain")]
    template: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Generate a SynthClinic world: kb.json, train/test.jsonl, textbook.txt, gold_chains.jsonl.
    Synthclinic(SynthArgs),
    /// Detect a data file's format and summarise it.
    Inspect {
        file: PathBuf,
        /// Force a format instead of detecting it.
        #[arg(long)]
        format: Option<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct SynthArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    train: Option<usize>,
    #[arg(long)]
    test: Option<usize>,
    /// Mechanism levels between findings and the disease.
    #[arg(long)]
    hops: Option<usize>,
    /// Chance each typical finding is shown.
    #[arg(long)]
    typical_shown: Option<f64>,
    /// Unrelated findings per case.
    #[arg(long)]
    noise_findings: Option<usize>,
    /// Chance a distractor shares findings with the answer.
    #[arg(long)]
    distractor_similarity: Option<f64>,
    /// Share of KB facts left out of the textbook.
    #[arg(long)]
    withheld_fraction: Option<f64>,
    #[arg(long)]
    options: Option<usize>,
    /// Any other knob: --set diseases=40 (repeatable).
    #[arg(long = "set", value_name = "KNOB=VALUE")]
    set: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the
/// message before it already includes (many errors print their source).
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
    }
    out
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config, set, fresh } => {
            let cfg = match &config {
                Some(path) => Config::from_file(path, &set)?,
                None => Config::load(QUICKSTART, "quickstart (embedded)", &set)?,
            };
            let stop = medzero::signals::install()?;
            let out = medzero::experiment::run(&cfg, fresh, &stop)?;
            println!("{}", out.results.to_markdown());
            println!("run folder: {}", out.dir.display());
            Ok(())
        }
        Command::Data(DataCommand::Synthclinic(a)) => {
            let cfg = synth_config(&a)?;
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
        Command::Data(DataCommand::Inspect { file, format, json }) => {
            inspect(&file, format.as_deref(), json)
        }
        Command::Generate(a) => generate(&a),
        Command::Eval(a) => eval(&a),
        Command::Bench {
            json,
            no_peer,
            threads,
        } => {
            let mut cfg = medzero::bench::BenchConfig {
                peer: !no_peer,
                ..Default::default()
            };
            if let Some(t) = threads {
                cfg.threads = t;
            }
            let report = medzero::bench::run(&cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.to_markdown());
            }
            Ok(())
        }
    }
}

fn template(name: &str) -> Result<PromptTemplate> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| anyhow::anyhow!("unknown template {name:?}; known: plain, chat_ml"))
}

fn generate(a: &GenerateArgs) -> Result<()> {
    let policy = Policy::load(&a.model, device_arg(&a.device)?, None)?;
    let text = match &a.template {
        Some(t) => template(t)?.render(&a.prompt),
        None => a.prompt.clone(),
    };
    let prompt = policy.tokenizer.encode(&text)?;
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

fn eval(a: &EvalArgs) -> Result<()> {
    let dir = medzero::experiment::resolve_model(&a.model)?;
    let device = device_arg(&a.device)?;
    let policy = Policy::load(&dir, device, None)?;
    let problems = loaders::load_problems(&a.data)?;
    let cfg = EvalConfig {
        samples: a.n,
        max_new_tokens: a.max_new_tokens,
        limit: a.limit,
        rules: a.select.clone(),
        judge: a.judge.is_some(),
        ..EvalConfig::default()
    };
    let prm = a
        .prm
        .as_deref()
        .map(|d| medzero::meds3::Prm::load(d, device))
        .transpose()?;
    let judge = match &a.judge {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--judge {}", path.display()))?;
            let jc = Config::load(&text, &path.display().to_string(), &[])?;
            let world = SynthClinic::generate(&jc.data.synthclinic)?;
            Some(medzero::experiment::teacher(&jc, &world)?)
        }
        None => None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let r = medzero::eval::evaluate(
        &policy,
        &problems,
        template(&a.template)?,
        &cfg,
        medzero::eval::Graders {
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
    Ok(Config::load("", "synthclinic knobs", &sets)?
        .data
        .synthclinic)
}

fn inspect(file: &std::path::Path, format: Option<&str>, json: bool) -> Result<()> {
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

/// `--device` through the same rules as `run.device`.
fn device_arg(device: &str) -> Result<tch::Device> {
    medzero::config::RunConfig {
        device: device.to_string(),
        ..Default::default()
    }
    .device()
}
