//! Experiment configs: serde data with defaults that validates itself at
//! load. A config is TOML (a file, or the embedded quickstart), then `--set
//! key.path=value` overrides ([`super::overrides`]); an unknown key is an
//! error that names the nearest valid key, and a bad value anywhere, in the
//! last stage as in the first, fails before anything runs.

use super::overrides::{apply_override, explain};
use crate::infra::results::ClaimSpec;
use crate::stages::{StageSpec, registry};
use crate::teacher::TeacherConfig;
use anyhow::{Context, Result, anyhow, bail};
use medzero_envs::synthclinic::SynthConfig;
use medzero_policies::DecoderConfig;
use medzero_policies::device::DeviceSpec;
use medzero_policies::llama::{Arch, DType};
use medzero_policies::tokenizer::TemplateChoice;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The default experiment of `medzero run` and `make run`.
pub const QUICKSTART: &str = include_str!("../../experiments/quickstart.toml");

/// The most libtorch threads a run may ask for: far more than any machine
/// has, far fewer than the thread stacks that would overflow.
const MAX_THREADS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub teacher: TeacherConfig,
    pub student: StudentConfig,
    pub stages: Vec<StageSpec>,
    /// Orderings checked when the run ends, written into `results.json`.
    pub claims: Vec<ClaimSpec>,
}

/// The base student: a fresh Llama-family decoder with SynthClinic's
/// word-level tokenizer, or an HF model folder (`from`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudentConfig {
    /// An HF model folder (config.json, model.safetensors, tokenizer.json);
    /// empty for a fresh model of the size below.
    pub from: String,
    pub arch: Arch,
    pub hidden_size: i64,
    pub layers: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub intermediate_size: i64,
    pub max_position: i64,
    pub rope_theta: f64,
    pub tie_embeddings: bool,
    pub dtype: DType,
    pub template: TemplateChoice,
    /// Words seen fewer times than this in SynthClinic's texts become <unk>.
    pub min_word_count: usize,
}

impl Default for StudentConfig {
    fn default() -> Self {
        StudentConfig {
            from: String::new(),
            arch: Arch::Qwen2,
            hidden_size: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            intermediate_size: 256,
            max_position: 512,
            rope_theta: 10000.0,
            tie_embeddings: true,
            dtype: DType::F32,
            template: TemplateChoice::Auto,
            min_word_count: 1,
        }
    }
}

impl StudentConfig {
    fn validate(&self) -> Result<()> {
        if self.template == TemplateChoice::Model && self.from.is_empty() {
            bail!(
                "student.template = \"model\" needs student.from: a fresh student has no chat \
                 template of its own; use \"plain\" or \"chat_ml\""
            );
        }
        if !self.from.is_empty() {
            let cfg = Path::new(&self.from).join("config.json");
            if !cfg.exists() {
                bail!(
                    "student.from: {} is no model folder (no config.json)",
                    self.from
                );
            }
            return Ok(());
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position", self.max_position),
        ] {
            if v <= 0 {
                bail!("student.{name} must be at least 1, got {v}");
            }
        }
        if self.hidden_size % self.heads != 0 || self.heads % self.kv_heads != 0 {
            bail!(
                "student.hidden_size ({}) must be a multiple of heads ({}), and heads of kv_heads ({})",
                self.hidden_size,
                self.heads,
                self.kv_heads
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!("student.rope_theta must be a finite number > 0");
        }
        if self.min_word_count == 0 {
            bail!("student.min_word_count must be at least 1");
        }
        Ok(())
    }

    /// The decoder config of a fresh student over a vocabulary of `vocab` tokens.
    pub fn decoder(&self, vocab: usize, eos: i64) -> DecoderConfig {
        DecoderConfig {
            arch: self.arch,
            vocab_size: vocab as i64,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.hidden_size / self.heads,
            max_position_embeddings: self.max_position,
            rms_norm_eps: 1e-6,
            rope_theta: self.rope_theta,
            rope_llama3: None,
            tie_word_embeddings: self.tie_embeddings,
            qkv_bias: self.arch == Arch::Qwen2,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![eos],
            dtype: self.dtype,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Folder under `out_dir`; re-running an existing name resumes it.
    pub name: String,
    pub seed: u64,
    pub out_dir: PathBuf,
    /// Fixed order and one actor, so the same seed gives the same results.
    pub deterministic: bool,
    /// libtorch intra-op threads (0 = all cores).
    pub threads: usize,
    /// Where models train and generate: `cpu`, `cuda`, `cuda:N`, or `auto`
    /// (the first GPU when libtorch sees one, else the CPU).
    pub device: DeviceSpec,
    /// With several processes (torchrun): the longest any rendezvous or
    /// collective waits before the run fails naming the lost rank.
    pub collective_timeout_s: f64,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: "quickstart".into(),
            seed: 0,
            out_dir: "runs".into(),
            deterministic: true,
            threads: 0,
            device: DeviceSpec::Cpu,
            collective_timeout_s: 300.0,
        }
    }
}

impl RunConfig {
    /// `run.device` as a libtorch device (a GPU libtorch cannot see is an
    /// error, not a silent fall back to the CPU).
    pub fn device(&self) -> Result<tch::Device> {
        self.device.resolve().map_err(|e| anyhow!("run.{e}"))
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            bail!("run.name must be a plain folder name, got {:?}", self.name);
        }
        if self.threads > MAX_THREADS {
            bail!(
                "run.threads = {} is more than {MAX_THREADS}; use 0 for every core",
                self.threads
            );
        }
        if !(self.collective_timeout_s.is_finite() && self.collective_timeout_s >= 1.0) {
            bail!(
                "run.collective_timeout_s must be a number of seconds >= 1, got {}",
                self.collective_timeout_s
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The SynthClinic world the run trains and tests on.
    pub synthclinic: SynthConfig,
    /// Real benchmark files (any format `medzero data inspect` knows) that
    /// evaluation stages also score, e.g. MedS3's `meds3-eval/MedQA.json`.
    pub eval_files: Vec<PathBuf>,
}

impl Config {
    /// Parses TOML text, applies `key.path=value` overrides, deserialises and
    /// validates. `origin` names the text in errors.
    pub fn load(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        let cfg = Config::parse(text, origin, overrides)?;
        cfg.validate()
            .with_context(|| format!("{origin}: invalid config"))?;
        Ok(cfg)
    }

    /// [`load`](Self::load) without the checks: for reading single settings
    /// (e.g. a world's knobs) from a text that holds no experiment.
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        let mut value: toml::Value =
            toml::from_str(text).with_context(|| format!("{origin}: not valid TOML"))?;
        for o in overrides {
            apply_override(&mut value, o).with_context(|| format!("--set {o}"))?;
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            // toml appends "in `table`" on a second line; the path says it already.
            let inner = e.inner().to_string();
            let msg = explain(inner.lines().next().unwrap_or_default());
            anyhow!("{origin}: at `{path}`: {msg}")
        })
    }

    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Config::load(&text, &path.display().to_string(), overrides)
    }

    /// Every table, then every stage and the rules between them.
    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        self.student.validate()?;
        self.data.synthclinic.validate()?;
        for f in &self.data.eval_files {
            if !f.exists() {
                bail!("data.eval_files: {} does not exist", f.display());
            }
        }
        self.teacher.validate()?;
        registry::validate(&self.stages, self.run.deterministic)?;
        let names: Vec<&str> = self.stages.iter().map(|s| s.name()).collect();
        for c in &self.claims {
            c.validate(&names).context("claims")?;
        }
        Ok(())
    }

    /// The fully resolved config, as written into the run folder.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quickstart_parses_and_validates() {
        let c = Config::load(QUICKSTART, "quickstart", &[]).unwrap();
        assert!(!c.stages.is_empty());
    }

    #[test]
    fn run_device_names_a_usable_device_or_says_why_not() {
        let with = |d: &str| Config::parse("", "t", &[format!("run.device=\"{d}\"")]);
        let e = format!("{:#}", with("gpu").unwrap_err());
        assert!(e.contains("cpu, cuda, cuda:N or auto"), "{e}");
        assert!(with("cuda:x").is_err());
        let gpus = tch::Cuda::device_count() as usize;
        assert_eq!(with("cpu").unwrap().run.device().unwrap(), tch::Device::Cpu);
        let auto = with("auto").unwrap().run.device().unwrap();
        assert_eq!(auto == tch::Device::Cpu, gpus == 0);
        // Syntax is checked at load; whether the GPU exists, when a run starts.
        let far = with(&format!("cuda:{gpus}")).unwrap();
        let e = far.run.device().unwrap_err().to_string();
        assert!(e.contains(&format!("sees {gpus} CUDA device")), "{e}");
        if gpus > 0 {
            assert_eq!(
                with("cuda").unwrap().run.device().unwrap(),
                tch::Device::Cuda(0)
            );
        }
    }

    #[test]
    fn every_shipped_experiment_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::from_file(&path, &[]).unwrap_or_else(|e| panic!("{e:#}"));
                n += 1;
            }
        }
        assert!(n >= 4, "{n} experiments");
    }

    #[test]
    fn unknown_key_suggests_the_nearest() {
        let err = Config::load("[run]\nsed = 3\n", "t.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at `run.sed`: unknown field `sed`"), "{err}");
        assert!(err.contains("did you mean `seed`?"), "{err}");
        let err = Config::parse("", "t.toml", &["data.synthclinic.hopz=2".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `hops`?"), "{err}");
        let err = Config::load("[[stages]]\nkind = \"baseline\"\n", "t.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `baselines`?"), "{err}");
    }

    #[test]
    fn overrides_apply_with_types() {
        let c = Config::load(
            QUICKSTART,
            "q",
            &[
                "run.seed=7".into(),
                "run.name=exp7".into(),
                "data.synthclinic.typical_shown=0.25".into(),
                "stages.0.name=b".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.run.seed, 7);
        assert_eq!(c.run.name, "exp7");
        assert_eq!(c.data.synthclinic.typical_shown, 0.25);
        assert_eq!(c.stages[0].name(), "b");
        let err = Config::load(QUICKSTART, "q", &["run.seed=seven".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("run.seed"), "{err:#}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        let err = Config::load(QUICKSTART, "q", &["data.synthclinic.hops=9".into()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("hops must be 1, 2 or 3"),
            "{err:#}"
        );
        let err = Config::load(QUICKSTART, "q", &["run.name=../x".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("plain folder name"), "{err:#}");
        let err = Config::load("", "q", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("no stages"), "{err:#}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = Config::load(QUICKSTART, "q", &[]).unwrap();
        let again = Config::load(&c.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(c, again);
    }
}
