//! The command line: one file per command, this module the flags and the
//! dispatch. Errors print as one line with their causes, and exit 1.

pub mod bench;
mod data;
mod eval;
mod generate;
mod run;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
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
    /// Score a model on a data file: a model folder, or a run folder, whose
    /// last trained model (the last finished stage, in the run's stage order,
    /// that trained one) is scored.
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
        /// An HF model folder (e.g. .medzero/models/SmolLM2-135M-Instruct)
        /// instead of the quickstart student: decode, prefix reuse, SFT and
        /// DPO rows beside transformers and TRL on the same folder.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Only these row groups (repeatable): decode, learner, mcts,
        /// service, queue, runtime, dist.
        #[arg(long)]
        only: Vec<String>,
        /// cpu, cuda, cuda:N or auto: where medzero's side runs (decode,
        /// learner, mcts and service rows; the others are CPU-only).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 or bf16 weights (bf16 trains with f32 master weights).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Decode batch sizes, comma-separated (default 1,32; 1,8,32 with
        /// --model).
        #[arg(long, value_delimiter = ',')]
        batches: Vec<usize>,
        /// The device's peak dense TFLOP/s at --dtype: adds the learner
        /// steps' model FLOPs utilisation (6 x parameters x tokens/s).
        #[arg(long)]
        peak_tflops: Option<f64>,
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
    /// Wrap the prompt in a template (auto, plain, chat_ml, model: the
    /// model's own chat template); none by default.
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
    /// Sampling temperature of the N samples.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Nucleus mass of the N samples.
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Score only the first K questions.
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Selection rules over the N samples: vote-sc, prm-max, prm-minmax,
    /// prm-vote-sum, p-vs, bon-mean, bon-prod (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "vote-sc")]
    select: Vec<crate::eval::selection::Rule>,
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
    /// generate (greedy answers read by the verifier, and samples) or
    /// mcq-loglik (each option's log-likelihood, lm-eval's acc / acc_norm).
    #[arg(long, value_enum, default_value = "generate")]
    mode: EvalMode,
    /// mcq-loglik continuations: each option's text, or its letter.
    #[arg(long, value_enum, default_value = "text")]
    choices: crate::eval::loglik::Choices,
    /// Write one JSON line per question (id, prompt, response or option
    /// scores, extracted answer, gold, correct) to this file.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Worked examples before each question (generation mode): the first K
    /// questions of --shots-file, answered "The answer is X.".
    #[arg(long, default_value_t = 0)]
    shots: usize,
    /// Where the shots come from (default: --data, whose shot questions are
    /// then left out of the scoring).
    #[arg(long)]
    shots_file: Option<PathBuf>,
    /// How questions become prompts: auto (the model's own chat template
    /// when its folder has one, else plain), plain, chat_ml or model.
    #[arg(long, default_value = "auto")]
    template: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EvalMode {
    Generate,
    McqLoglik,
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

/// Parses the command line, runs it, and turns an error into exit code 1.
pub fn main() -> ExitCode {
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
        Command::Run { config, set, fresh } => run::run(config.as_deref(), &set, fresh),
        Command::Data(DataCommand::Synthclinic(a)) => data::synthclinic(&a),
        Command::Data(DataCommand::Inspect { file, format, json }) => {
            data::inspect(&file, format.as_deref(), json)
        }
        Command::Generate(a) => generate::generate(&a),
        Command::Eval(a) => eval::eval(&a),
        Command::Bench {
            json,
            no_peer,
            threads,
            model,
            only,
            device,
            dtype,
            batches,
            peak_tflops,
        } => bench::command(bench::Options {
            json,
            no_peer,
            threads,
            model,
            only,
            device: device_arg(&device)?,
            dtype: medzero_policies::llama::DType::parse(&dtype)
                .filter(|d| *d != medzero_policies::llama::DType::F16)
                .ok_or_else(|| anyhow::anyhow!("--dtype must be f32 or bf16, got {dtype:?}"))?,
            batches,
            peak_tflops,
        }),
    }
}

/// `--template` (auto, plain, chat_ml, model) for a model with `tokenizer`.
fn template(
    name: &str,
    tokenizer: &medzero_policies::tokenizer::Tokenizer,
) -> Result<medzero_policies::tokenizer::PromptTemplate> {
    let choice: medzero_policies::tokenizer::TemplateChoice = name
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--template: {e}"))?;
    choice
        .resolve(tokenizer.chat_template())
        .map_err(|e| anyhow::anyhow!("--template: {e}"))
}

/// `--device`, parsed and resolved as `run.device` is.
fn device_arg(device: &str) -> Result<tch::Device> {
    let spec: medzero_policies::device::DeviceSpec = device
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--{e}"))?;
    spec.resolve().map_err(|e| anyhow::anyhow!("--{e}"))
}
