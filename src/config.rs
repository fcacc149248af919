//! Experiment configs: serde data with defaults and validation. A config is
//! TOML (a file, or the embedded quickstart), then `--set key.path=value`
//! overrides; an unknown key is an error that names the nearest valid key.

use crate::eval::EvalConfig;
use crate::sft::SftConfig;
use anyhow::{Context, Result, anyhow, bail};
use medzero_envs::synthclinic::{OracleConfig, SynthConfig};
use medzero_policies::DecoderConfig;
use medzero_policies::llama::{Arch, DType};
use medzero_policies::tokenizer::PromptTemplate;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The default experiment of `medzero run` and `make run`.
pub const QUICKSTART: &str = include_str!("../experiments/quickstart.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub teacher: TeacherConfig,
    pub student: StudentConfig,
    pub stages: Vec<Stage>,
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
    pub template: PromptTemplate,
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
            template: PromptTemplate::Plain,
            min_word_count: 1,
        }
    }
}

impl StudentConfig {
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
    pub device: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: "quickstart".into(),
            seed: 0,
            out_dir: "runs".into(),
            deterministic: true,
            threads: 0,
            device: "cpu".into(),
        }
    }
}

impl RunConfig {
    /// `run.device` as a libtorch device; a GPU libtorch cannot see is an
    /// error, not a silent fall back to the CPU.
    pub fn device(&self) -> Result<tch::Device> {
        let gpus = tch::Cuda::device_count() as usize;
        let index = match self.device.as_str() {
            "cpu" => return Ok(tch::Device::Cpu),
            "auto" => {
                return Ok(if gpus > 0 {
                    tch::Device::Cuda(0)
                } else {
                    tch::Device::Cpu
                });
            }
            "cuda" => 0,
            d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => i,
                _ => bail!(
                    "run.device must be cpu, cuda, cuda:N or auto, got {:?}",
                    self.device
                ),
            },
        };
        if index >= gpus {
            bail!(
                "run.device = {:?}, but libtorch sees {gpus} CUDA device(s) (a CPU-only machine, or a \
                 CPU build of libtorch); use run.device = \"cpu\" or \"auto\"",
                self.device
            );
        }
        Ok(tch::Device::Cuda(index))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The SynthClinic world the run trains and tests on.
    pub synthclinic: SynthConfig,
    /// Real benchmark files (any format `medzero data inspect` knows) that
    /// evaluation stages also score, e.g. `../shared/data/meds3-eval/MedQA.json`.
    pub eval_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherKind {
    /// SynthClinic's oracle: knows the KB, wrong on `oracle.noise` of items.
    Oracle,
    /// An OpenAI-compatible chat-completions server (`[teacher.http]`).
    Http,
    /// A medzero model folder, e.g. a bigger model (`[teacher.local]`).
    Local,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherConfig {
    pub kind: TeacherKind,
    pub oracle: OracleConfig,
    pub http: crate::http_teacher::HttpTeacherConfig,
    pub local: crate::teacher::LocalTeacherConfig,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        TeacherConfig {
            kind: TeacherKind::Oracle,
            oracle: OracleConfig::default(),
            http: Default::default(),
            local: Default::default(),
        }
    }
}

/// One step of the pipeline; its folder is `stages/<k>-<name>/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Stage {
    /// Reference points every method must beat or match: chance-level
    /// heuristics, the teacher, and the oracle's gold chains.
    Baselines(BaselinesStage),
    /// Domain-foundation pretraining of the base student on the textbook.
    Pretrain(TrainStage),
    /// Answer-only distillation: SFT on the teacher's answers without
    /// reasoning (the classic-KD baseline of the papers).
    DistillAnswers(TrainStage),
    /// SFT on the teacher's reasoning chains in MedS3's step format (the cold
    /// start that teaches the student to reason in steps).
    DistillChains(TrainStage),
    /// MedS3: tree search over reasoning steps on the actor runtime.
    Meds3Search(crate::meds3::SearchStage),
    /// MedS3: policy SFT on the correct chains of search stages.
    Meds3Policy(crate::meds3::PolicyStage),
    /// MedS3: the process reward model on the search stages' step values.
    Meds3Prm(crate::meds3::PrmStage),
    /// Rejection-sampling fine-tuning on the actor/learner runtime.
    RejectionSampling(crate::rejection_sampling::RejectionSamplingStage),
    /// Self-iterated DPO (MedCritical's stage 2, and best-vs-worst or MedS3
    /// tree pairs).
    Dpo(crate::preference::PreferenceStage),
    /// KTO on the unpaired halves of the same pairs (Med-Shicheng's alignment).
    Kto(crate::preference::PreferenceStage),
    /// MedThink stage 1: teacher screening and knowledge explanations, SFT.
    MedthinkKnowledge(crate::medthink::KnowledgeStage),
    /// MedThink stage 2: the teacher corrects the student's wrong answers, SFT.
    MedthinkCorrection(crate::medthink::CorrectionStage),
    /// Greedy and sampled accuracy of trained models on the test split.
    Eval(EvalStage),
}

impl Stage {
    pub fn kind(&self) -> &'static str {
        match self {
            Stage::Baselines(_) => "baselines",
            Stage::Pretrain(_) => "pretrain",
            Stage::DistillAnswers(_) => "distill_answers",
            Stage::DistillChains(_) => "distill_chains",
            Stage::Meds3Search(_) => "meds3_search",
            Stage::Meds3Policy(_) => "meds3_policy",
            Stage::Meds3Prm(_) => "meds3_prm",
            Stage::RejectionSampling(_) => "rejection_sampling",
            Stage::Dpo(_) => "dpo",
            Stage::Kto(_) => "kto",
            Stage::MedthinkKnowledge(_) => "medthink_knowledge",
            Stage::MedthinkCorrection(_) => "medthink_correction",
            Stage::Eval(_) => "eval",
        }
    }
    pub fn name(&self) -> &str {
        let named = match self {
            Stage::Baselines(s) => &s.name,
            Stage::Pretrain(s) | Stage::DistillAnswers(s) | Stage::DistillChains(s) => &s.name,
            Stage::Meds3Search(s) => &s.name,
            Stage::Meds3Policy(s) => &s.name,
            Stage::Meds3Prm(s) => &s.name,
            Stage::RejectionSampling(s) => &s.name,
            Stage::Dpo(s) | Stage::Kto(s) => &s.name,
            Stage::MedthinkKnowledge(s) => &s.name,
            Stage::MedthinkCorrection(s) => &s.name,
            Stage::Eval(s) => &s.name,
        };
        named.as_deref().unwrap_or(self.kind())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BaselinesStage {
    pub name: Option<String>,
}

/// A stage that trains a model and leaves it in `stages/<k>-<name>/model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainStage {
    pub name: Option<String>,
    /// The stage whose model this one starts from (empty: the base student).
    pub init: String,
    pub sft: SftConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EvalStage {
    pub name: Option<String>,
    /// Stages whose models are scored, in table order.
    pub models: Vec<String>,
    /// A PRM stage whose model scores samples for the PRM selection rules.
    pub prm: String,
    pub eval: EvalConfig,
}

impl Config {
    /// Parses TOML text, applies `key.path=value` overrides, deserialises and
    /// validates. `origin` names the text in errors.
    pub fn load(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        let mut value: toml::Value =
            toml::from_str(text).with_context(|| format!("{origin}: not valid TOML"))?;
        for o in overrides {
            apply_override(&mut value, o).with_context(|| format!("--set {o}"))?;
        }
        let cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            // toml appends "in `table`" on a second line; the path says it already.
            let inner = e.inner().to_string();
            let msg = explain(inner.lines().next().unwrap_or_default());
            anyhow!("{origin}: at `{path}`: {msg}")
        })?;
        cfg.validate()
            .with_context(|| format!("{origin}: invalid config"))?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Config::load(&text, &path.display().to_string(), overrides)
    }

    pub fn validate(&self) -> Result<()> {
        if self.run.name.is_empty()
            || self.run.name.contains(['/', '\\'])
            || self.run.name.starts_with('.')
        {
            bail!(
                "run.name must be a plain folder name, got {:?}",
                self.run.name
            );
        }
        let d = self.run.device.as_str();
        if !(matches!(d, "cpu" | "cuda" | "auto")
            || d.strip_prefix("cuda:")
                .is_some_and(|i| i.parse::<usize>().is_ok()))
        {
            bail!("run.device must be cpu, cuda, cuda:N or auto, got {d:?}");
        }
        self.data.synthclinic.validate()?;
        let o = &self.teacher.oracle;
        for (name, v) in [
            ("noise", o.noise),
            ("screen_recall", o.screen_recall),
            ("screen_false_alarm", o.screen_false_alarm),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("teacher.oracle.{name} must be in [0, 1], got {v}");
            }
        }
        if self.teacher.kind == TeacherKind::Http {
            self.teacher
                .http
                .validate()
                .map_err(|e| anyhow!("teacher.http: {e}"))?;
        }
        if self.teacher.kind == TeacherKind::Local {
            self.teacher
                .local
                .validate()
                .map_err(|e| anyhow!("teacher.local: {e}"))?;
        }
        for f in &self.data.eval_files {
            if !f.exists() {
                bail!("data.eval_files: {} does not exist", f.display());
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for s in &self.stages {
            let refs: Vec<&str> = match s {
                Stage::Pretrain(t) | Stage::DistillAnswers(t) | Stage::DistillChains(t) => {
                    vec![t.init.as_str()]
                }
                Stage::Meds3Search(m) => vec![m.init.as_str()],
                Stage::RejectionSampling(r) => vec![r.init.as_str()],
                Stage::Dpo(p) | Stage::Kto(p) => p.refs(),
                Stage::MedthinkKnowledge(m) => vec![m.init.as_str()],
                Stage::MedthinkCorrection(m) => vec![m.knowledge.as_str()],
                Stage::Meds3Policy(m) => std::iter::once(m.init.as_str())
                    .chain(m.data.iter().map(String::as_str))
                    .collect(),
                Stage::Meds3Prm(m) => std::iter::once(m.init.as_str())
                    .chain(m.data.iter().map(String::as_str))
                    .collect(),
                Stage::Eval(e) => e
                    .models
                    .iter()
                    .map(String::as_str)
                    .chain((!e.prm.is_empty()).then_some(e.prm.as_str()))
                    .collect(),
                _ => Vec::new(),
            };
            for r in refs {
                if !r.is_empty() && !names.contains(r) {
                    bail!(
                        "stage {:?} refers to {r:?}, which names no earlier stage",
                        s.name()
                    );
                }
            }
            if let Stage::Meds3Search(m) = s {
                m.mcts
                    .validate()
                    .with_context(|| format!("stage {:?}", s.name()))?;
                m.runtime
                    .validate()
                    .with_context(|| format!("stage {:?}", s.name()))?;
                if m.init.is_empty() {
                    bail!(
                        "stage {:?}: `init` must name the model that searches",
                        s.name()
                    );
                }
            }
            if let Stage::RejectionSampling(r) = s {
                r.validate()
                    .with_context(|| format!("stage {:?}", s.name()))?;
            }
            if let Stage::MedthinkCorrection(m) = s
                && m.knowledge.is_empty()
            {
                bail!(
                    "stage {:?}: `knowledge` must name the medthink_knowledge stage",
                    s.name()
                );
            }
            if let Stage::Dpo(p) | Stage::Kto(p) = s {
                let loss = if matches!(s, Stage::Dpo(_)) {
                    crate::preference::Loss::Dpo
                } else {
                    crate::preference::Loss::Kto
                };
                p.validate(loss)
                    .with_context(|| format!("stage {:?}", s.name()))?;
            }
            let runtime = match s {
                Stage::Meds3Search(m) => Some(&m.runtime),
                Stage::RejectionSampling(r) => Some(&r.runtime),
                Stage::Dpo(p) | Stage::Kto(p) => Some(&p.runtime),
                Stage::MedthinkCorrection(m) => Some(&m.runtime),
                _ => None,
            };
            if let Some(rt) = runtime
                && self.run.deterministic
                && rt.mode == crate::runtime::learner::Mode::Async
            {
                bail!(
                    "stage {:?}: run.deterministic is true but runtime.mode is async; \
                     use \"sync\" or \"deterministic\", or set run.deterministic = false",
                    s.name()
                );
            }
            if !names.insert(s.name()) {
                bail!(
                    "two stages are named {:?}; give one a distinct `name`",
                    s.name()
                );
            }
        }
        Ok(())
    }

    /// The fully resolved config, as written into the run folder.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises to TOML")
    }
}

/// `a.b.c=value`: the value is parsed as TOML (number, bool, array, quoted
/// string), else taken as a bare string. A numeric segment indexes an array.
fn apply_override(root: &mut toml::Value, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("expected key.path=value"))?;
    let new: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("empty key in {path:?}");
    }
    let mut cur = root;
    for (i, key) in keys.iter().enumerate() {
        let last = i + 1 == keys.len();
        cur = match cur {
            toml::Value::Table(t) => {
                if last {
                    t.insert(key.to_string(), new);
                    return Ok(());
                }
                t.entry(key.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let idx: usize = key
                    .parse()
                    .map_err(|_| anyhow!("`{key}` indexes an array; use a number"))?;
                let len = a.len();
                let slot = a
                    .get_mut(idx)
                    .ok_or_else(|| anyhow!("index {idx} out of range (array has {len})"))?;
                if last {
                    *slot = new;
                    return Ok(());
                }
                slot
            }
            _ => bail!("`{}` is not a table", keys[..i].join(".")),
        };
    }
    unreachable!("the loop returns at the last key")
}

/// Adds "did you mean" to serde's unknown-field and unknown-variant messages.
fn explain(msg: &str) -> String {
    let unknown = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| {
            msg.split_once(p)
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(name, _)| name)
        });
    let Some(unknown) = unknown else {
        return msg.to_string();
    };
    let Some((_, expected)) = msg.split_once("expected") else {
        return msg.to_string();
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(unknown, c), *c))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, c)) if score > 0.7 => format!("{msg}; did you mean `{c}`?"),
        _ => msg.to_string(),
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
        let with = |d: &str| Config::load("", "t", &[format!("run.device=\"{d}\"")]);
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
        let err = Config::load("", "t.toml", &["data.synthclinic.hopz=2".into()])
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
        let err = Config::load("", "q", &["data.synthclinic.hops=9".into()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("hops must be 1, 2 or 3"),
            "{err:#}"
        );
        let err = Config::load("", "q", &["run.name=../x".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("plain folder name"), "{err:#}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = Config::load(QUICKSTART, "q", &[]).unwrap();
        let again = Config::load(&c.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(c, again);
    }
}
