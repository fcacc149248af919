//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PROJECT_ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Python the peers run in.
pub fn python() -> PathBuf {
    medzero_policies::peer::python()
}

/// What TensorBoard's EventAccumulator reads from `dir`.
pub fn tb_read(dir: &Path) -> Json {
    let script = Path::new(PROJECT_ROOT).join("tests/support/tb_read.py");
    let python = python();
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (run `make setup`)", python.display()));
    assert!(
        out.status.success(),
        "tb_read.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("tb_read.py prints JSON")
}

/// The real benchmark files, beside the repo (`../shared/data/meds3-eval`).
pub fn meds3_eval(file: &str) -> PathBuf {
    Path::new(PROJECT_ROOT)
        .join("../shared/data/meds3-eval")
        .join(file)
}

/// Runs the `medzero` binary built for these tests.
pub fn medzero(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medzero"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running medzero")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A tiny random Qwen2-shaped decoder (2 layers, hidden 32) over a word-level
/// vocabulary of `words`.
pub fn tiny_policy(words: &str, seed: u64) -> medzero_policies::Policy {
    use medzero_policies::llama::DecoderConfig;
    use medzero_policies::tokenizer::Tokenizer;
    let tok = Tokenizer::word_level([words], 1);
    let cfg = DecoderConfig::tiny_qwen2(tok.vocab_size() as i64, tok.eos_id());
    medzero_policies::Policy::new_random(&cfg, tok, tch::Device::Cpu, seed).unwrap()
}

/// Writes experiment `text` into `dir` with its runs under `dir/runs`;
/// returns the config's path.
pub fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("exp.toml");
    let text = text.replace(
        "[run]",
        &format!("[run]\nout_dir = \"{}\"", dir.join("runs").display()),
    );
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A tiny SynthClinic world (8 training questions) and student, as TOML.
pub const TINY_WORLD: &str = r#"
[data.synthclinic]
train = 8
test = 8
hops = 1
# Two labs and no normal ones keep chains short enough for a 64-wide model
# to memorise digit by digit in 150 epochs.
labs = 2
normal_labs = 0
[student]
hidden_size = 64
layers = 2
heads = 2
kv_heads = 1
intermediate_size = 128
"#;

/// A `distill_chains` stage named "chains" of `epochs` epochs over the
/// tiny world (batch 8, lr 3e-3, no warmup, a checkpoint at the end only).
pub fn chains_stage(epochs: usize) -> String {
    format!(
        r#"[[stages]]
kind = "distill_chains"
name = "chains"
[stages.sft]
epochs = {epochs}
batch_size = 8
lr = 3e-3
warmup_ratio = 0.0
checkpoint_every = 0
"#
    )
}

/// A 60-step memorising chains run of the tiny world on `device` in
/// `dtype`, under `dir`: its run folder and `train/loss` at every step.
pub fn chains_run(dir: &Path, device: &str, dtype: &str) -> (PathBuf, Vec<f64>) {
    let text = format!(
        "[run]\nname = \"c\"\nthreads = 1\ndevice = \"{device}\"\n{TINY_WORLD}\ndtype = \"{dtype}\"\n{}log_every = 1\n",
        chains_stage(60)
    );
    let config = write_config(dir, &text);
    let o = medzero(&["run", &config]);
    assert!(o.status.success(), "{device} {dtype}: {}", stderr(&o));
    let run = dir.join("runs/c");
    let tb = tb_read(&run.join("stages/0-chains"));
    let loss = tb["scalars"]["train/loss"].as_array().expect("train/loss");
    (run, loss.iter().map(|p| p[1].as_f64().unwrap()).collect())
}

/// Trains a student on [`TINY_WORLD`]'s gold chains until it has memorised
/// them (150 epochs, seconds) in run `name` under `dir`; returns the run
/// folder (its model: `stages/0-chains/model`).
pub fn memorised_chains(dir: &Path, name: &str) -> PathBuf {
    let text = format!(
        "[run]\nname = \"{name}\"\nthreads = 1\n{TINY_WORLD}\n{}",
        chains_stage(150)
    );
    let config = write_config(dir, &text);
    let o = medzero(&["run", &config]);
    assert!(o.status.success(), "{}", stderr(&o));
    dir.join("runs").join(name)
}
