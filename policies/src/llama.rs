//! The Llama family of decoders in tch: Llama and Qwen2 through one code path
//! (RMSNorm, RoPE with theta and Llama-3 scaling from the config, grouped-query
//! attention, SwiGLU MLP, Qwen2's q/k/v biases, optional tied embeddings).
//! HF `config.json` is read into a raw struct and converted into
//! [`DecoderConfig`], candle-style; the variable names are HF's, so weights
//! load from and save to `model.safetensors` unchanged.

use crate::kv_cache::KvCache;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Llama,
    Qwen2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::Bf16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
        }
    }
    /// The spelling HF configs use.
    pub fn hf_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
        }
    }
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "float32" | "f32" | "fp32" => Some(DType::F32),
            "bfloat16" | "bf16" => Some(DType::Bf16),
            "float16" | "f16" | "fp16" | "half" => Some(DType::F16),
            _ => None,
        }
    }
}

/// Llama 3's frequency-dependent RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Everything the decoder needs, whatever config format it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub arch: Arch,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_llama3: Option<Llama3Scaling>,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v (Qwen2: always; Llama: `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers it too; Qwen2 never).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub dtype: DType,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid HF config: {msg}")]
    Invalid { path: String, msg: String },
    #[error("{path}: unsupported model: {msg}")]
    Unsupported { path: String, msg: String },
}

/// HF `config.json` as written by transformers 4.x and 5.x.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    max_position_embeddings: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    /// transformers 5: `{rope_type, rope_theta, ...}`.
    rope_parameters: Option<serde_json::Value>,
    /// transformers 4: `{rope_type | type, factor, ...}`.
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => Vec::new(),
    }
}

impl DecoderConfig {
    /// A tiny Qwen2 (2 layers, hidden 32, GQA 2:1, tied embeddings) for tests
    /// and examples: fast on any CPU, yet every architectural path is used.
    pub fn tiny_qwen2(vocab_size: i64, eos: i64) -> DecoderConfig {
        DecoderConfig {
            arch: Arch::Qwen2,
            vocab_size,
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 16,
            max_position_embeddings: 512,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_llama3: None,
            tie_word_embeddings: true,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![eos],
            dtype: DType::F32,
        }
    }

    pub fn from_hf_file(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_hf_json(&text).map_err(|e| match e {
            ConfigError::Invalid { msg, .. } => ConfigError::Invalid {
                path: p.clone(),
                msg,
            },
            ConfigError::Unsupported { msg, .. } => ConfigError::Unsupported {
                path: p.clone(),
                msg,
            },
            other => other,
        })
    }

    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let invalid = |msg: String| ConfigError::Invalid {
            path: String::new(),
            msg,
        };
        let unsupported = |msg: String| ConfigError::Unsupported {
            path: String::new(),
            msg,
        };
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let kind = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.first().cloned())
            .unwrap_or_default();
        let arch = match kind.as_str() {
            "llama" | "LlamaForCausalLM" => Arch::Llama,
            "qwen2" | "Qwen2ForCausalLM" => Arch::Qwen2,
            other => {
                return Err(unsupported(format!(
                    "architecture {other:?}; medzero runs the Llama family (model_type \"llama\" or \"qwen2\")"
                )));
            }
        };
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(unsupported(format!(
                "hidden_act {act:?}; only \"silu\" (SwiGLU) is supported"
            )));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(unsupported("use_sliding_window = true".into()));
        }
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(|t| t.as_f64())
            })
            .unwrap_or(10000.0);
        let num = |k: &str| rope.and_then(|r| r.get(k)).and_then(|v| v.as_f64());
        let rope_llama3 = match rope_type {
            "default" => None,
            "llama3" => Some(Llama3Scaling {
                factor: num("factor")
                    .ok_or_else(|| invalid("llama3 rope scaling needs factor".into()))?,
                low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
                high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
                original_max_position_embeddings: num("original_max_position_embeddings")
                    .unwrap_or(8192.0),
            }),
            other => {
                return Err(unsupported(format!(
                    "rope type {other:?}; supported: default, llama3"
                )));
            }
        };
        let heads = raw.num_attention_heads;
        if heads <= 0 || raw.hidden_size % heads != 0 && raw.head_dim.is_none() {
            return Err(invalid(format!(
                "hidden_size {} is not divisible by num_attention_heads {heads}",
                raw.hidden_size
            )));
        }
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if kv <= 0 || heads % kv != 0 {
            return Err(invalid(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )));
        }
        let dtype_name = raw
            .dtype
            .or(raw.torch_dtype)
            .unwrap_or_else(|| "float32".into());
        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(DecoderConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / heads),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_llama3,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch == Arch::Llama && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            bos_token_id: ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: ids(&raw.eos_token_id),
            dtype: DType::parse(&dtype_name).unwrap_or(DType::F32),
        })
    }

    /// HF `config.json` that transformers 4.x and 5.x both load.
    pub fn to_hf_json(&self) -> String {
        let (model_type, architecture) = match self.arch {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        };
        let mut rope = serde_json::json!({"rope_type": "default", "rope_theta": self.rope_theta});
        if let Some(s) = self.rope_llama3 {
            rope = serde_json::json!({
                "rope_type": "llama3", "rope_theta": self.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        let mut v = serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope.clone(),
            "rope_scaling": if self.rope_llama3.is_some() { rope } else { serde_json::Value::Null },
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() { [one] => serde_json::json!(one), many => serde_json::json!(many) },
            "torch_dtype": self.dtype.hf_name(),
            "use_cache": true,
        });
        let obj = v.as_object_mut().expect("object");
        match self.arch {
            Arch::Llama => {
                obj.insert("attention_bias".into(), self.qkv_bias.into());
                obj.insert("mlp_bias".into(), self.mlp_bias.into());
            }
            Arch::Qwen2 => {
                obj.insert("use_sliding_window".into(), false.into());
            }
        }
        serde_json::to_string_pretty(&v).expect("json") + "\n"
    }

    /// Parameters, counting a tied head once.
    pub fn num_parameters(&self) -> i64 {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
            + if self.qkv_bias {
                d * (self.num_heads + 2 * self.num_kv_heads)
            } else {
                0
            }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let embed = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        embed + self.num_layers * (attn + mlp + 2 * h) + h
    }
}

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn new(p: &nn::Path, name: &str, in_dim: i64, out_dim: i64, bias: bool) -> Linear {
        let p = p / name;
        let w = p.var(
            "weight",
            &[out_dim, in_dim],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let b = bias.then(|| p.var("bias", &[out_dim], nn::Init::Const(0.0)));
        Linear { w, b }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, self.b.as_ref())
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

/// A decoder whose variables live in a caller's `VarStore` under HF names.
pub struct Decoder {
    pub cfg: DecoderConfig,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    /// RoPE inverse frequencies, float32 on the model's device.
    inv_freq: Tensor,
}

/// RMSNorm as HF computes it: in float32, scaled, cast back, then weighted.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = (xf * (var + eps).rsqrt()).to_kind(kind);
    w * normed
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3)
}

impl Decoder {
    pub fn new(p: &nn::Path, cfg: &DecoderConfig) -> Decoder {
        let m = p / "model";
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let embed = (&m / "embed_tokens").var(
            "weight",
            &[cfg.vocab_size, h],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = &m / "layers" / i;
                let a = &l / "self_attn";
                let f = &l / "mlp";
                Block {
                    input_norm: (&l / "input_layernorm").var("weight", &[h], nn::Init::Const(1.0)),
                    attn: Attention {
                        q: Linear::new(&a, "q_proj", h, cfg.num_heads * d, cfg.qkv_bias),
                        k: Linear::new(&a, "k_proj", h, cfg.num_kv_heads * d, cfg.qkv_bias),
                        v: Linear::new(&a, "v_proj", h, cfg.num_kv_heads * d, cfg.qkv_bias),
                        o: Linear::new(&a, "o_proj", cfg.num_heads * d, h, cfg.o_bias),
                    },
                    post_norm: (&l / "post_attention_layernorm").var(
                        "weight",
                        &[h],
                        nn::Init::Const(1.0),
                    ),
                    mlp: Mlp {
                        gate: Linear::new(&f, "gate_proj", h, cfg.intermediate_size, cfg.mlp_bias),
                        up: Linear::new(&f, "up_proj", h, cfg.intermediate_size, cfg.mlp_bias),
                        down: Linear::new(&f, "down_proj", cfg.intermediate_size, h, cfg.mlp_bias),
                    },
                }
            })
            .collect();
        let norm = (&m / "norm").var("weight", &[h], nn::Init::Const(1.0));
        let lm_head = (!cfg.tie_word_embeddings).then(|| {
            (p / "lm_head").var(
                "weight",
                &[cfg.vocab_size, h],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
        });
        let inv_freq = Self::inv_freq(cfg, d).to_device(p.device());
        Decoder {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        }
    }

    /// HF's default and Llama-3 inverse frequencies, computed as HF does (f32).
    fn inv_freq(cfg: &DecoderConfig, d: i64) -> Tensor {
        let exps = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / d as f64;
        let inv = Tensor::from(cfg.rope_theta as f32).pow(&exps).reciprocal();
        let Some(s) = cfg.rope_llama3 else { return inv };
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
        let scaled = inv.where_self(&wavelen.le(low_wavelen), &(&inv / s.factor));
        let smooth = (s.original_max_position_embeddings / &wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        let one_minus: Tensor = smooth.neg() + 1.0;
        let smoothed: Tensor = one_minus * &scaled / s.factor + &smooth * &scaled;
        let medium = wavelen
            .ge(high_wavelen)
            .logical_and(&wavelen.le(low_wavelen));
        smoothed.where_self(&medium, &scaled)
    }

    pub fn device(&self) -> Device {
        self.embed.device()
    }

    pub fn kind(&self) -> Kind {
        self.embed.kind()
    }

    /// Runs the decoder over `ids` [B, T] at `positions` [B, T].
    ///
    /// Without a cache the keys are the tokens themselves and `key_valid`
    /// [B, T] marks real tokens. With a cache, the tokens are appended at the
    /// cache's next column, `key_valid` is ignored (the cache tracks it) and
    /// attention covers every column written so far. Returns the final hidden
    /// states [B, T, hidden] (after the last norm).
    // `x = x + f(x)`, not `x += f(x)`: the in-place add would overwrite a
    // tensor autograd saved for RMSNorm's backward.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_valid: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let device = ids.device();
        let (offset, valid) = match cache.as_deref_mut() {
            Some(c) => (c.len(), c.append_valid(key_valid)),
            None => (0, key_valid.shallow_clone()),
        };
        let s = offset + t;
        // Column-causal mask: a query sees earlier columns that hold real
        // tokens, and always itself (so padded rows never go all -inf).
        let q_cols = Tensor::arange_start(offset, s, (Kind::Int64, device)).unsqueeze(1);
        let k_cols = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0);
        let causal = k_cols.le_tensor(&q_cols);
        let mask = causal
            .unsqueeze(0)
            .logical_and(&valid.to_kind(Kind::Bool).unsqueeze(1))
            .logical_or(&k_cols.eq_tensor(&q_cols).unsqueeze(0))
            .unsqueeze(1);

        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        let kind = self.kind();
        let (cos, sin) = (emb.cos().to_kind(kind), emb.sin().to_kind(kind));

        let cfg = &self.cfg;
        let mut x = Tensor::embedding(&self.embed, ids, -1, false, false);
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps);
            let split = |y: Tensor, heads: i64| y.view([b, t, heads, cfg.head_dim]).transpose(1, 2);
            let q = split(layer.attn.q.forward(&h), cfg.num_heads);
            let k = split(layer.attn.k.forward(&h), cfg.num_kv_heads);
            let v = split(layer.attn.v.forward(&h), cfg.num_kv_heads);
            let q = &q * &cos + rotate_half(&q) * &sin;
            let k = &k * &cos + rotate_half(&k) * &sin;
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.write(li, offset, &k, &v),
                None => (k, v),
            };
            let attn = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&mask),
                0.0,
                false,
                Some((cfg.head_dim as f64).powf(-0.5)),
                cfg.num_heads != cfg.num_kv_heads,
            );
            let attn = attn
                .transpose(1, 2)
                .reshape([b, t, cfg.num_heads * cfg.head_dim]);
            x = x + layer.attn.o.forward(&attn);
            let h = rms_norm(&x, &layer.post_norm, cfg.rms_norm_eps);
            let m = &layer.mlp;
            x = x + m
                .down
                .forward(&(m.gate.forward(&h).silu() * m.up.forward(&h)));
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        rms_norm(&x, &self.norm, cfg.rms_norm_eps)
    }

    /// Vocabulary logits for hidden states [..., hidden].
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(self.lm_head.as_ref().unwrap_or(&self.embed), None)
    }

    /// Positions and key mask for a right- or left-padded batch: positions
    /// count real tokens only (as HF generate derives them from the mask).
    pub fn positions_from_mask(mask: &Tensor) -> Tensor {
        (mask.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1).clamp_min(0)
    }
}
