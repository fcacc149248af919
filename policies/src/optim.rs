//! AdamW, learning-rate schedules and gradient clipping, owned by medzero.
//!
//! libtorch's optimizers (tch's `nn::Optimizer`) keep their moments out of
//! reach, so a checkpoint could not hold them and a resumed run would drift.
//! This AdamW is plain tensor ops whose state exports as named tensors.
//!
//! Users compare runs with `torch.optim.AdamW` (single-tensor path),
//! `torch.nn.utils.clip_grad_norm_` and transformers'
//! `get_{constant,linear,cosine}_schedule_with_warmup`, so every formula below
//! repeats theirs operation for operation, with the same f64 host scalars and
//! the same tensor kernels. For f32/f64 parameters on CPU the results are
//! bit-identical (tested against torch); see [`AdamW::step`] for the limits.
//!
//! Parameters stored in bf16 or f16 train with f32 master weights
//! (Micikevicius et al., arXiv:1710.03740): the moments and an f32 copy of
//! the parameter take every update, and the parameter holds the copy rounded
//! to its dtype. Updates far below a bf16 ulp (lr 1e-5 on weights near 1)
//! would otherwise round away, step after step.

use safetensors::tensor::SafeTensors;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use tch::{COptimizer, Kind, Tensor};

/// Errors building an optimizer or restoring its state.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("invalid AdamW config: {0}")]
    Config(String),
    #[error("parameter {name:?} {problem}")]
    Param { name: String, problem: &'static str },
    #[error("{origin} does not match the optimizer's parameters: {details}")]
    Mismatch { origin: String, details: String },
    #[error("{origin}: step count {steps} is negative")]
    Steps { origin: String, steps: i64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not an optimizer state file: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// AdamW hyperparameters. `Default` is torch's (`torch.optim.AdamW()`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Base learning rate; [`Schedule::lr`] scales it per step.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied only to parameters selected for decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// torch's constructor checks (NaN fails them too).
    pub fn validate(&self) -> Result<(), OptimError> {
        let non_negative = 0.0..=f64::INFINITY;
        let beta = 0.0..1.0;
        let checks = [
            ("lr", self.lr, non_negative.contains(&self.lr)),
            ("eps", self.eps, non_negative.contains(&self.eps)),
            ("beta1", self.beta1, beta.contains(&self.beta1)),
            ("beta2", self.beta2, beta.contains(&self.beta2)),
            (
                "weight_decay",
                self.weight_decay,
                non_negative.contains(&self.weight_decay),
            ),
        ];
        match checks.iter().find(|(_, _, ok)| !ok) {
            Some((field, value, _)) => {
                let range = if field.starts_with("beta") {
                    "in [0, 1)"
                } else {
                    ">= 0"
                };
                Err(OptimError::Config(format!(
                    "{field} = {value} must be {range}"
                )))
            }
            None => Ok(()),
        }
    }
}

/// One trainable tensor and its moments (same device and layout; f32 for a
/// parameter with a master copy, else the parameter's dtype).
struct Slot {
    name: String,
    param: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The f32 master of a bf16/f16 parameter: the optimizer updates it and
    /// copies its rounding into `param`.
    master: Option<Tensor>,
}

impl Slot {
    /// The tensor the update applies to.
    fn target(&self) -> &Tensor {
        self.master.as_ref().unwrap_or(&self.param)
    }

    /// The state it checkpoints, by key prefix.
    fn held(&self) -> impl Iterator<Item = (&'static str, &Tensor)> {
        [(EXP_AVG, &self.exp_avg), (EXP_AVG_SQ, &self.exp_avg_sq)]
            .into_iter()
            .chain(self.master.iter().map(|m| (MASTER, m)))
    }
}

/// bf16 and f16 parameters train through an f32 master copy.
fn needs_master(kind: Kind) -> bool {
    matches!(kind, Kind::BFloat16 | Kind::Half)
}

/// AdamW (decoupled weight decay, no amsgrad) with state that checkpoints.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    steps: i64,
    /// The clipping factor [`AdamW::clip_grad_norm`] computed, applied to the
    /// f32 gradients of master slots in the next step: scaling their bf16
    /// gradients in place would round the clipped values.
    pending_clip: Option<Tensor>,
    /// tch cannot set a gradient to undefined; libtorch's own optimizers can
    /// (`zero_grad(set_to_none = true)`), so one holding the same tensors does
    /// that for [`AdamW::zero_grad`]. It never steps.
    grad_reset: COptimizer,
}

impl std::fmt::Debug for AdamW {
    /// A summary: tensors' own `Debug` would print (and sync) their values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("cfg", &self.cfg)
            .field("params", &self.slots.len())
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

const EXP_AVG: &str = "exp_avg/";
const EXP_AVG_SQ: &str = "exp_avg_sq/";
const MASTER: &str = "master/";
const STEPS_KEY: &str = "steps_taken";
const FORMAT_KEY: &str = "format";
const FORMAT: &str = "medzero.adamw";

impl AdamW {
    /// An optimizer over `params` (named, `requires_grad`). Weight decay
    /// applies where `decay(name, tensor)` holds — torch's param groups with
    /// `weight_decay = 0` for the rest; [`AdamW::default_decay`] is the usual
    /// transformer split. Moments start at zero, as torch's lazy init does.
    pub fn new(
        params: Vec<(String, Tensor)>,
        cfg: AdamWConfig,
        decay: impl Fn(&str, &Tensor) -> bool,
    ) -> Result<Self, OptimError> {
        cfg.validate()?;
        let mut seen = HashSet::new();
        let mut grad_reset = COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false)?;
        let mut slots = Vec::with_capacity(params.len());
        for (name, param) in params {
            if !seen.insert(name.clone()) {
                return Err(OptimError::Param {
                    name,
                    problem: "is listed twice",
                });
            }
            if !param.requires_grad() {
                return Err(OptimError::Param {
                    name,
                    problem: "does not require grad",
                });
            }
            grad_reset.add_parameters(&param, 0)?;
            let decay = decay(&name, &param);
            let master = needs_master(param.kind())
                .then(|| tch::no_grad(|| param.detach().to_kind(Kind::Float)));
            let like = master.as_ref().unwrap_or(&param);
            let (exp_avg, exp_avg_sq) = tch::no_grad(|| (like.zeros_like(), like.zeros_like()));
            slots.push(Slot {
                name,
                param,
                decay,
                exp_avg,
                exp_avg_sq,
                master,
            });
        }
        Ok(Self {
            cfg,
            slots,
            steps: 0,
            pending_clip: None,
            grad_reset,
        })
    }

    /// Decay matrices (linear and embedding weights); spare biases and 1-D
    /// tensors such as norm weights.
    pub fn default_decay(name: &str, param: &Tensor) -> bool {
        param.dim() >= 2 && !(name == "bias" || name.ends_with(".bias"))
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The parameters, in the order given to [`AdamW::new`].
    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.slots.iter().map(|s| &s.param)
    }

    /// One update at learning rate `lr` (usually [`Schedule::lr`]).
    ///
    /// This is `torch.optim.AdamW`'s single-tensor algorithm (`foreach=False`,
    /// `amsgrad=False`), op for op, under `no_grad`. tch's `addcmul_`/`addcdiv_` lack the
    /// `value` argument, so the scalar is folded into the first operand
    /// (`fl(value * t1)`): the CPU kernels compute `self + value * t1 * t2`
    /// (resp. `/ t2`) left to right with `value` rounded to the dtype, so the
    /// result is the same bit for bit for f32/f64. For bf16/f16 torch keeps
    /// that product in f32, and on CUDA it groups `value * (t1 op t2)`; there
    /// the last bit can differ.
    ///
    /// A parameter with an f32 master is updated through it: its gradient in
    /// f32 (times the pending clipping factor), the same ops on the master,
    /// then the master rounded into the parameter; so the master follows an
    /// f32 run on the same gradients bit for bit.
    ///
    /// Parameters without a gradient are skipped, like torch. The step count
    /// (bias correction) is per optimizer where torch keeps one per parameter:
    /// they agree whenever all parameters get gradients, or none do (a call
    /// that updates nothing does not count).
    pub fn step(&mut self, lr: f64) {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.cfg;
        let step = self.steps + 1;
        // Python floats, as torch computes them: `beta ** step`, `bc2 ** 0.5`,
        // both glibc's `pow`. Optimised builds would turn `powf(x, 0.5)` into
        // `sqrt(x)`, which differs from `pow` in the last bit for ~0.1% of
        // inputs (step 69 at beta2 = 0.995), so the exponent stays opaque.
        let bias_correction1 = 1.0 - beta1.powf(step as f64);
        let bias_correction2 = 1.0 - beta2.powf(step as f64);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(std::hint::black_box(0.5));
        let mut updated = false;
        let clip = self.pending_clip.take();
        tch::no_grad(|| {
            for s in &mut self.slots {
                let mut grad = s.param.grad();
                if !grad.defined() {
                    continue;
                }
                updated = true;
                if s.master.is_some() {
                    grad = grad.to_kind(Kind::Float);
                    if let Some(coef) = &clip {
                        let _ = grad.g_mul_(&coef.to_device(grad.device()));
                    }
                }
                let mut target = s.target().shallow_clone();
                let wd = if s.decay { weight_decay } else { 0.0 };
                if wd != 0.0 {
                    let _ = target.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = s.exp_avg.lerp_(&grad, 1.0 - beta1);
                let _ = s.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = s
                    .exp_avg_sq
                    .addcmul_(&grad.g_mul_scalar(1.0 - beta2), &grad);
                let mut denom = s.exp_avg_sq.sqrt().g_div_scalar(bias_correction2_sqrt);
                let _ = denom.g_add_scalar_(eps);
                let _ = target.addcdiv_(&s.exp_avg.g_mul_scalar(-step_size), &denom);
                if s.master.is_some() {
                    s.param.copy_(&target);
                }
            }
        });
        if updated {
            self.steps = step;
        }
    }

    /// Sets every gradient to undefined, torch's `zero_grad()` default
    /// (`set_to_none=True`): the next backward writes fresh gradients and
    /// parameters it does not reach are skipped by [`AdamW::step`].
    pub fn zero_grad(&mut self) {
        self.pending_clip = None;
        self.grad_reset
            .zero_grad()
            .expect("libtorch zero_grad over the optimizer's own tensors");
    }

    /// [`clip_grad_norm`] over this optimizer's parameters. With master
    /// weights the norm is taken over the gradients in f32 and the factor is
    /// applied to them in f32 at the next [`AdamW::step`].
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let (total, coef) = clip_factor(self.params(), max_norm);
        tch::no_grad(|| {
            for s in self.slots.iter().filter(|s| s.master.is_none()) {
                let mut g = s.param.grad();
                if g.defined() {
                    let _ = g.g_mul_(&coef.to_device(g.device()));
                }
            }
        });
        self.pending_clip = Some(coef);
        total
    }

    /// The name of the first moment holding NaN or an infinity, if any.
    pub fn first_non_finite(&self) -> Option<String> {
        tch::no_grad(|| {
            self.state()
                .into_iter()
                .find(|(_, t)| t.isfinite().all().int64_value(&[]) == 0)
                .map(|(n, _)| n)
        })
    }

    /// The total gradient norm, unclipped (0 without gradients), in f32 for
    /// bf16/f16 gradients.
    pub fn grad_norm(&self) -> f64 {
        clip_factor(self.params(), f64::INFINITY).0
    }

    /// Updates applied so far (the bias-correction step, torch's `state["step"]`).
    pub fn steps_taken(&self) -> i64 {
        self.steps
    }

    /// The moments as `exp_avg/<name>` and `exp_avg_sq/<name>`, and the f32
    /// masters of bf16/f16 parameters as `master/<name>`, parameter by
    /// parameter. They alias the live tensors (no copy): save them before the
    /// next [`AdamW::step`].
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                s.held()
                    .map(|(prefix, t)| (format!("{prefix}{}", s.name), t.shallow_clone()))
            })
            .collect()
    }

    /// Restores moments exported by [`AdamW::state`] and the step count.
    /// Every name, shape and dtype is checked before anything is copied, so on
    /// error the optimizer is unchanged; values are copied exactly (no dtype
    /// conversion, any device).
    pub fn load_state(
        &mut self,
        state: &[(String, Tensor)],
        steps_taken: i64,
    ) -> Result<(), OptimError> {
        self.restore("state", state, steps_taken)
    }

    fn restore(
        &mut self,
        origin: &str,
        state: &[(String, Tensor)],
        steps: i64,
    ) -> Result<(), OptimError> {
        if steps < 0 {
            return Err(OptimError::Steps {
                origin: origin.into(),
                steps,
            });
        }
        let mut given: HashMap<&str, &Tensor> = HashMap::with_capacity(state.len());
        let mut twice = Vec::new();
        for (name, t) in state {
            if given.insert(name, t).is_some() {
                twice.push(name.as_str());
            }
        }
        let (mut missing, mut wrong) = (Vec::new(), Vec::new());
        let mut copies = Vec::with_capacity(state.len());
        for s in &self.slots {
            for (prefix, moment) in s.held() {
                let key = format!("{prefix}{}", s.name);
                let Some(t) = given.remove(key.as_str()) else {
                    missing.push(key);
                    continue;
                };
                if t.size() != moment.size() {
                    let (got, want) = (t.size(), moment.size());
                    wrong.push(format!("{key} has shape {got:?}, expected {want:?}"));
                } else if t.kind() != moment.kind() {
                    let (got, want) = (t.kind(), moment.kind());
                    wrong.push(format!("{key} has dtype {got:?}, expected {want:?}"));
                } else {
                    copies.push((moment.shallow_clone(), t));
                }
            }
        }
        let mut unexpected: Vec<&str> = given.into_keys().collect();
        unexpected.sort_unstable();
        let problems: Vec<String> = [
            ("missing ", capped(&missing)),
            ("unexpected ", capped(&unexpected)),
            ("", capped(&wrong)),
            ("listed twice: ", capped(&twice)),
        ]
        .into_iter()
        .filter(|(_, list)| !list.is_empty())
        .map(|(what, list)| format!("{what}{list}"))
        .collect();
        if !problems.is_empty() {
            return Err(OptimError::Mismatch {
                origin: origin.into(),
                details: problems.join("; "),
            });
        }
        tch::no_grad(|| {
            for (mut moment, t) in copies {
                moment.copy_(t);
            }
            // A parameter is its master's rounding; the saved model may have
            // been written by another copy of it.
            for s in &mut self.slots {
                if let Some(m) = &s.master {
                    s.param.copy_(m);
                }
            }
        });
        self.steps = steps;
        Ok(())
    }

    /// Writes the state to a safetensors file (step count in its metadata),
    /// atomically: a temporary file beside it, fsync, rename, fsync the folder.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let io_err = |source| OptimError::Io {
            path: path.to_path_buf(),
            source,
        };
        let metadata = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (STEPS_KEY.to_string(), self.steps.to_string()),
        ]);
        let bytes = crate::weights::to_bytes(&self.state(), Some(metadata)).map_err(|e| {
            OptimError::Format {
                path: path.to_path_buf(),
                msg: e.to_string(),
            }
        })?;
        medzero_envs::atomic::write(path, &bytes).map_err(io_err)
    }

    /// Restores state written by [`AdamW::save`], with the same checks as
    /// [`AdamW::load_state`].
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let format_err = |msg: String| OptimError::Format {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = fs::read(path).map_err(|source| OptimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| format_err(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Err(format_err(format!(
                "no {FORMAT_KEY}={FORMAT} in its metadata"
            )));
        }
        let steps = meta
            .get(STEPS_KEY)
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| format_err(format!("no integer {STEPS_KEY} in its metadata")))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| format_err(e.to_string()))?;
        let state = file
            .iter()
            .map(|(name, view)| {
                crate::weights::view_to_tensor(&path.display().to_string(), name, &view)
                    .map(|t| (name.to_string(), t))
                    .map_err(|e| format_err(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.restore(&path.display().to_string(), &state, steps)
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` with its defaults
/// (2-norm, `error_if_nonfinite=False`, `foreach=False`): the 2-norm of the
/// per-gradient 2-norms, then every gradient times `min(max_norm / (total +
/// 1e-6), 1)`, computed on the device as torch does. Returns the total norm
/// before clipping (0 when no parameter has a gradient); reading it is the one
/// host sync. With gradients of several dtypes or devices torch orders the
/// per-gradient norms by a hash map, so the total can differ in the last bit;
/// one dtype on one device (the usual case) matches exactly (on CPU, given the
/// same intra-op thread count: large reductions split by thread).
pub fn clip_grad_norm<'a>(params: impl IntoIterator<Item = &'a Tensor>, max_norm: f64) -> f64 {
    let params: Vec<&Tensor> = params.into_iter().collect();
    let (total, coef) = clip_factor(params.iter().copied(), max_norm);
    tch::no_grad(|| {
        for mut g in params.iter().map(|p| p.grad()).filter(Tensor::defined) {
            let _ = g.g_mul_(&coef.to_device(g.device()));
        }
    });
    total
}

/// The total gradient norm (bf16/f16 gradients read in f32) and
/// `min(max_norm / (total + 1e-6), 1)` as a tensor on the first gradient's
/// device (1 without gradients).
fn clip_factor<'a>(params: impl IntoIterator<Item = &'a Tensor>, max_norm: f64) -> (f64, Tensor) {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .into_iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        let Some(device) = grads.first().map(Tensor::device) else {
            return (0.0, Tensor::from(1.0f32));
        };
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| {
                let g = if needs_master(g.kind()) {
                    g.to_kind(Kind::Float)
                } else {
                    g.shallow_clone()
                };
                g.norm().to_device(device)
            })
            .collect();
        let total = Tensor::stack(&norms, 0).norm();
        // Python's `max_norm / tensor` is `tensor.reciprocal() * max_norm`.
        let coef = total
            .g_add_scalar(1e-6)
            .reciprocal()
            .g_mul_scalar(max_norm)
            .clamp_max(1.0);
        (total.double_value(&[]), coef)
    })
}

/// Which transformers schedule [`Schedule`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// `get_constant_schedule_with_warmup`
    Constant,
    /// `get_linear_schedule_with_warmup`
    Linear,
    /// `get_cosine_schedule_with_warmup` (half a cosine, `num_cycles = 0.5`)
    Cosine,
}

/// A learning-rate schedule: linear warmup from 0, then constant, linear to
/// 0, or cosine to 0 at `total_steps` (which `Constant` ignores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// The multiplier at optimizer step `step` (0-based: the first update uses
    /// `factor(0)`, as with `LambdaLR`), computed exactly as transformers'
    /// lambdas do, including their `max(0.0, ·)` past `total_steps`.
    pub fn factor(&self, step: usize) -> f64 {
        let (step, warmup, total) = (
            step as i64,
            self.warmup_steps as i64,
            self.total_steps as i64,
        );
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let decay_steps = (total - warmup).max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => python_max0((total - step) as f64 / decay_steps),
            ScheduleKind::Cosine => {
                const NUM_CYCLES: f64 = 0.5;
                let progress = (step - warmup) as f64 / decay_steps;
                let factor =
                    0.5 * (1.0 + (std::f64::consts::PI * NUM_CYCLES * 2.0 * progress).cos());
                python_max0(factor)
            }
        }
    }

    /// The learning rate at `step`: `base_lr * factor(step)`, as `LambdaLR`.
    pub fn lr(&self, base_lr: f64, step: usize) -> f64 {
        base_lr * self.factor(step)
    }
}

/// The first few of `items`, comma-separated, and how many more there are:
/// a state file of another model would otherwise list every tensor.
fn capped<S: AsRef<str>>(items: &[S]) -> String {
    const SHOWN: usize = 8;
    let shown = items
        .iter()
        .take(SHOWN)
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        format!("{shown} and {} more", items.len() - SHOWN)
    } else {
        shown
    }
}

/// Python's `max(0.0, x)`: `x` only if strictly greater (so never -0.0 or NaN).
fn python_max0(x: f64) -> f64 {
    if x > 0.0 { x } else { 0.0 }
}
