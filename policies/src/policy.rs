//! A policy: a decoder, its variables and its tokenizer, with the operations
//! actors and the learner share — logits, sequence log-probs, batched
//! generation with a KV cache and prefix forking — and loading and saving in
//! HF's folder layout.

use crate::generate::{Finish, Generation, SamplingParams, pad_left, sample};
use crate::kv_cache::KvCache;
use crate::llama::{ConfigError, DType, Decoder, DecoderConfig};
use crate::prm::ValueHead;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::weights::{self, WeightsError};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(
        "{dir}: the tokenizer has {tokenizer} tokens but the model only {model} embeddings: they do not belong together"
    )]
    TokenizerMismatch {
        dir: String,
        tokenizer: usize,
        model: i64,
    },
    #[error(
        "prompt of {tokens} tokens plus {new} new tokens exceeds the model's context of {context}"
    )]
    TooLong {
        tokens: usize,
        new: usize,
        context: i64,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

pub struct Policy {
    pub vs: nn::VarStore,
    pub model: Decoder,
    pub tokenizer: Tokenizer,
}

impl Policy {
    /// A freshly initialised model (N(0, 0.02) weights, as HF initialises),
    /// seeded so the same seed gives the same weights.
    pub fn new_random(
        cfg: &DecoderConfig,
        tokenizer: Tokenizer,
        device: Device,
        seed: u64,
    ) -> Result<Policy, PolicyError> {
        check_fit("(new model)", &tokenizer, cfg)?;
        tch::manual_seed(seed as i64);
        let mut vs = nn::VarStore::new(device);
        let model = Decoder::new(&vs.root(), cfg);
        if cfg.dtype != DType::F32 {
            vs.set_kind(cfg.dtype.kind());
        }
        Ok(Policy {
            vs,
            model,
            tokenizer,
        })
    }

    /// Loads an HF model folder: `config.json`, `model.safetensors` (or
    /// shards) and `tokenizer.json`. `dtype` overrides the config's.
    pub fn load(dir: &Path, device: Device, dtype: Option<DType>) -> Result<Policy, PolicyError> {
        Ok(Self::load_impl(dir, device, dtype, false)?.0)
    }

    fn load_impl(
        dir: &Path,
        device: Device,
        dtype: Option<DType>,
        head: bool,
    ) -> Result<(Policy, Option<ValueHead>), PolicyError> {
        let mut cfg = DecoderConfig::from_hf_file(&dir.join("config.json"))?;
        if let Some(d) = dtype {
            cfg.dtype = d;
        }
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        check_fit(&dir.display().to_string(), &tokenizer, &cfg)?;
        let mut vs = nn::VarStore::new(device);
        let model = Decoder::new(&vs.root(), &cfg);
        let head = head.then(|| ValueHead::new(&vs.root(), cfg.hidden_size));
        if cfg.dtype != DType::F32 {
            vs.set_kind(cfg.dtype.kind());
        }
        weights::load(dir, &vs.variables(), cfg.tie_word_embeddings)?;
        Ok((
            Policy {
                vs,
                model,
                tokenizer,
            },
            head,
        ))
    }

    /// Saves `config.json`, `model.safetensors` and `tokenizer.json` into
    /// `dir`, each written whole (temp file, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<(), PolicyError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| PolicyError::Io {
                path: path.clone(),
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let cfg_path = dir.join("config.json");
        medzero_envs::atomic::write(&cfg_path, self.model.cfg.to_hf_json().as_bytes())
            .map_err(io(&cfg_path))?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let bytes = weights::to_bytes(&self.named_parameters(), Some(meta))?;
        let w = dir.join("model.safetensors");
        medzero_envs::atomic::write(&w, &bytes).map_err(io(&w))?;
        self.tokenizer.save(&dir.join("tokenizer.json"))?;
        Ok(())
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.model.cfg
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Trainable variables by HF name, sorted (a stable order for optimizers
    /// and weight publication).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Final hidden states [B, T, H] for a batch (the PRM head reads these).
    pub fn hidden(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let device = self.device();
        let (ids, mask) = (ids.to_device(device), mask.to_device(device));
        let positions = Decoder::positions_from_mask(&mask);
        self.model.forward(&ids, &positions, &mask, None)
    }

    /// A PRM head on this policy's backbone, its variables in the same store
    /// (saved and trained with the backbone).
    pub fn add_value_head(&self) -> ValueHead {
        ValueHead::new(&self.vs.root(), self.model.cfg.hidden_size)
    }

    /// Loads a folder saved with a PRM head.
    pub fn load_with_head(
        dir: &Path,
        device: Device,
        dtype: Option<DType>,
    ) -> Result<(Policy, ValueHead), PolicyError> {
        let (policy, head) = Self::load_impl(dir, device, dtype, true)?;
        Ok((policy, head.expect("asked for a head")))
    }

    /// Logits [B, T, V] for a batch (`mask` marks real tokens; right or left
    /// padding). Positions count real tokens only.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        self.model.logits(&self.hidden(ids, mask))
    }

    /// Sum over completion tokens of log p(token | prefix), per sequence
    /// (REFERENCE 5: `log_softmax(logits[:, :-1])[labels[:, 1:]]`, prompt and
    /// padding masked by `completion` [B, T]).
    pub fn sequence_logprobs(&self, ids: &Tensor, mask: &Tensor, completion: &Tensor) -> Tensor {
        let t = ids.size()[1];
        let logits = self.logits(ids, mask);
        let logp = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
        let labels = ids.narrow(1, 1, t - 1).to_device(logp.device());
        let tok = logp.gather(2, &labels.unsqueeze(-1), false).squeeze_dim(-1);
        let m = completion
            .narrow(1, 1, t - 1)
            .to_device(tok.device())
            .to_kind(Kind::Float);
        (tok * m).sum_dim_intlist(1, false, Kind::Float)
    }

    fn check_length(&self, prompts: &[Vec<i64>], new: usize) -> Result<(), PolicyError> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let context = self.model.cfg.max_position_embeddings;
        if (longest + new) as i64 > context {
            return Err(PolicyError::TooLong {
                tokens: longest,
                new,
                context,
            });
        }
        Ok(())
    }

    /// Runs the prompts (left-padded) through a fresh cache with room for
    /// `new` more tokens; returns the cache, the last logits [B, V] and each
    /// row's next position.
    pub fn prefill(
        &self,
        prompts: &[Vec<i64>],
        new: usize,
    ) -> Result<(KvCache, Tensor, Tensor), PolicyError> {
        self.check_length(prompts, new)?;
        let device = self.device();
        let (ids, mask) = pad_left(prompts, self.tokenizer.pad_id());
        let (ids, mask) = (ids.to_device(device), mask.to_device(device));
        let capacity = ids.size()[1] + new as i64;
        let mut cache = KvCache::new(
            &self.model.cfg,
            prompts.len() as i64,
            capacity,
            self.model.kind(),
            device,
        );
        let positions = Decoder::positions_from_mask(&mask);
        let logits = tch::no_grad(|| {
            let h = self
                .model
                .forward(&ids, &positions, &mask, Some(&mut cache));
            self.model.logits(&h.select(1, -1))
        });
        let next_pos = mask.sum_dim_intlist(1, false, Kind::Int64);
        Ok((cache, logits, next_pos))
    }

    /// Batched generation with a KV cache.
    pub fn generate(
        &self,
        prompts: &[Vec<i64>],
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Generation>, PolicyError> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let (mut cache, logits, next_pos) = self.prefill(prompts, params.max_new_tokens)?;
        Ok(self.decode(&mut cache, logits, next_pos, params, rng))
    }

    /// Appends `tokens[i]` (equal lengths) to row i of `cache`, each row
    /// continuing from its position `pos` [B]; returns the logits after each
    /// row's last token [B, V] and the rows' next positions. Forces text into
    /// a generation ("The answer is") or feeds a stopped row's last token.
    pub fn extend(
        &self,
        cache: &mut KvCache,
        tokens: &[Vec<i64>],
        pos: &Tensor,
    ) -> (Tensor, Tensor) {
        let b = tokens.len() as i64;
        let t = tokens.first().map_or(0, Vec::len) as i64;
        assert!(
            tokens.iter().all(|r| r.len() as i64 == t) && b == cache.batch() && t > 0,
            "extend: one equal-length, non-empty token row per cache row"
        );
        let device = self.device();
        let flat: Vec<i64> = tokens.concat();
        let ids = Tensor::from_slice(&flat).view([b, t]).to_device(device);
        let pos = pos.to_device(device);
        let positions = pos.view([b, 1]) + Tensor::arange(t, (Kind::Int64, device)).view([1, t]);
        let valid = Tensor::ones([b, t], (Kind::Int64, device));
        let logits = tch::no_grad(|| {
            let h = self.model.forward(&ids, &positions, &valid, Some(cache));
            self.model.logits(&h.select(1, t - 1))
        });
        (logits, pos + t)
    }

    /// `n` completions of one prompt that share its prefill: the prompt runs
    /// once and the samples continue from a forked cache.
    pub fn sample_n(
        &self,
        prompt: &[i64],
        n: usize,
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Generation>, PolicyError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let (cache, logits, pos) = self.prefill(&[prompt.to_vec()], params.max_new_tokens)?;
        let n = n as i64;
        let mut forked = cache.fork(0, n);
        Ok(self.decode(
            &mut forked,
            logits.repeat([n, 1]),
            pos.repeat([n]),
            params,
            rng,
        ))
    }

    /// Continues every row of `cache` from `logits` [B, V] (the distribution
    /// of each row's next token) until EOS, a stop string or the budget.
    pub fn decode(
        &self,
        cache: &mut KvCache,
        logits: Tensor,
        next_pos: Tensor,
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
    ) -> Vec<Generation> {
        let b = cache.batch() as usize;
        let device = self.device();
        let budget = params.max_new_tokens.min(cache.remaining() as usize + 1);
        let mut out: Vec<Generation> = (0..b).map(|_| Generation::empty()).collect();
        let mut done = vec![false; b];
        let (mut logits, mut pos) = (logits, next_pos.to_device(device));
        tch::no_grad(|| {
            for step in 0..budget {
                let (tokens, logprobs) = sample(&self.known(&logits), params, rng);
                for (i, (g, d)) in out.iter_mut().zip(done.iter_mut()).enumerate() {
                    if !*d {
                        *d = self.record(g, tokens[i], logprobs[i], params);
                    }
                }
                if done.iter().all(|&d| d) || step + 1 == budget {
                    break;
                }
                let ids = Tensor::from_slice(&tokens)
                    .to_device(device)
                    .view([b as i64, 1]);
                let valid: Vec<i64> = done.iter().map(|&d| (!d) as i64).collect();
                let valid = Tensor::from_slice(&valid)
                    .to_device(device)
                    .view([b as i64, 1]);
                let h = self
                    .model
                    .forward(&ids, &pos.view([b as i64, 1]), &valid, Some(cache));
                logits = self.model.logits(&h.select(1, 0));
                pos += 1;
            }
        });
        self.finish_texts(&mut out);
        out
    }

    fn ends(&self, token: i64, params: &SamplingParams) -> bool {
        token == self.tokenizer.eos_id() || params.stop_token_ids.contains(&token)
    }

    /// Logits over the tokenizer's tokens only: HF models often pad the
    /// embedding past the vocabulary, and those ids decode to nothing.
    fn known(&self, logits: &Tensor) -> Tensor {
        let vocab = self.tokenizer.vocab_size() as i64;
        if logits.size()[1] > vocab {
            logits.narrow(1, 0, vocab)
        } else {
            logits.shallow_clone()
        }
    }

    /// Appends a sampled token; true when it ends the sequence.
    fn record(
        &self,
        g: &mut Generation,
        token: i64,
        logprob: f32,
        params: &SamplingParams,
    ) -> bool {
        g.tokens.push(token);
        g.logprobs.push(logprob);
        if params.ignore_eos {
            return false;
        }
        if self.ends(token, params) {
            g.finish = Finish::Eos;
        } else if let Some(s) = self.stop_hit(&g.tokens, &params.stop) {
            g.finish = Finish::Stop(s);
        } else {
            return false;
        }
        true
    }

    /// Decodes each generation, cutting it before its stop string.
    fn finish_texts(&self, out: &mut [Generation]) {
        for g in out {
            g.text = self.tokenizer.decode(&g.tokens).unwrap_or_default();
            if let Finish::Stop(s) = &g.finish
                && let Some(at) = g.text.find(s.as_str())
            {
                g.text.truncate(at);
            }
        }
    }

    /// Whether the generated tail now contains a stop string. Only the last
    /// tokens are decoded, so the check stays cheap for long generations.
    fn stop_hit(&self, tokens: &[i64], stop: &[String]) -> Option<String> {
        if stop.is_empty() {
            return None;
        }
        let tail = &tokens[tokens.len().saturating_sub(16)..];
        let text = self.tokenizer.decode(tail).ok()?;
        stop.iter().find(|s| text.contains(s.as_str())).cloned()
    }

    /// Generation that recomputes the whole sequence every step (no cache):
    /// the reference the cached path is tested and benchmarked against.
    pub fn generate_uncached(
        &self,
        prompts: &[Vec<i64>],
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Generation>, PolicyError> {
        self.check_length(prompts, params.max_new_tokens)?;
        let mut seqs = prompts.to_vec();
        let mut out: Vec<Generation> = prompts.iter().map(|_| Generation::empty()).collect();
        let mut done = vec![false; prompts.len()];
        for _ in 0..params.max_new_tokens {
            let (ids, mask) = pad_left(&seqs, self.tokenizer.pad_id());
            let logits = tch::no_grad(|| self.logits(&ids, &mask).select(1, -1));
            let (tokens, logprobs) = sample(&self.known(&logits), params, rng);
            for (i, (g, d)) in out.iter_mut().zip(done.iter_mut()).enumerate() {
                if !*d {
                    seqs[i].push(tokens[i]);
                    *d = self.record(g, tokens[i], logprobs[i], params);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        self.finish_texts(&mut out);
        Ok(out)
    }
}

fn check_fit(dir: &str, tokenizer: &Tokenizer, cfg: &DecoderConfig) -> Result<(), PolicyError> {
    if tokenizer.vocab_size() as i64 > cfg.vocab_size {
        return Err(PolicyError::TokenizerMismatch {
            dir: dir.to_string(),
            tokenizer: tokenizer.vocab_size(),
            model: cfg.vocab_size,
        });
    }
    Ok(())
}
