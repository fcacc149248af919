//! A policy: a decoder, its variables and its tokenizer, with the operations
//! actors and the learner share — logits, sequence log-probs, batched
//! generation with a KV cache and prefix forking — and loading and saving in
//! HF's folder layout.

use crate::generate::{Finish, Generation, SamplingParams, pad_left, sample, streams};
use crate::kv_cache::KvCache;
use crate::llama::{ConfigError, DType, Decoder, DecoderConfig};
use crate::prm::ValueHead;
use crate::rows::{Rows, SyncReport};
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
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error(
        "{dir}: tensor {tensor} holds NaN or infinite values; the model is unusable (a training \
         run that diverged wrote it?)"
    )]
    NotFinite { dir: String, tensor: String },
    #[error("prompt {row} is empty: generation needs at least one token to continue from")]
    EmptyPrompt { row: usize },
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
        crate::manifest::Manifest::verify(dir)?;
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
        let policy = Policy {
            vs,
            model,
            tokenizer,
        };
        if let Some(tensor) = policy.first_non_finite() {
            return Err(PolicyError::NotFinite {
                dir: dir.display().to_string(),
                tensor,
            });
        }
        Ok((policy, head))
    }

    /// The name of the first parameter holding NaN or an infinity, if any.
    pub fn first_non_finite(&self) -> Option<String> {
        tch::no_grad(|| {
            self.named_parameters()
                .into_iter()
                .find(|(_, t)| t.isfinite().all().int64_value(&[]) == 0)
                .map(|(n, _)| n)
        })
    }

    /// Saves `config.json`, `model.safetensors` and `tokenizer.json` into
    /// `dir`, each written whole (temp file, fsync, rename), and the
    /// folder's checksums (`manifest.json`), which [`Policy::load`] verifies.
    pub fn save(&self, dir: &Path) -> Result<(), PolicyError> {
        self.save_files(dir)?;
        crate::manifest::Manifest::write(dir)?;
        Ok(())
    }

    /// [`save`](Self::save) without the manifest, for a caller that adds
    /// files of its own (a checkpoint's optimizer state) and then writes one
    /// manifest for the whole folder, hashing each file once.
    pub fn save_files(&self, dir: &Path) -> Result<(), PolicyError> {
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
        self.tempered_sequence_logprobs(ids, mask, completion, 1.0)
    }

    /// [`Policy::sequence_logprobs`] of the distribution at `temperature`
    /// (logits divided by it), the one samples at that temperature come from.
    pub fn tempered_sequence_logprobs(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        completion: &Tensor,
        temperature: f64,
    ) -> Tensor {
        let t = ids.size()[1];
        let logits = crate::generate::temper(&self.logits(ids, mask), temperature);
        let logp = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
        let labels = ids.narrow(1, 1, t - 1).to_device(logp.device());
        let tok = logp.gather(2, &labels.unsqueeze(-1), false).squeeze_dim(-1);
        let m = completion
            .narrow(1, 1, t - 1)
            .to_device(tok.device())
            .to_kind(Kind::Float);
        (tok * m).sum_dim_intlist(1, false, Kind::Float)
    }

    /// log p(token | the tokens before it) for each token of each
    /// continuation of `context`, and whether every one of them is the
    /// argmax there (the continuation is the greedy one): how an option or
    /// a reference answer is scored. The context runs once; its cached row
    /// is copied per continuation and only the continuations' tokens but the
    /// last go through the model (the context's logits predict the first).
    pub fn continuation_logprobs(
        &self,
        context: &[i64],
        continuations: &[Vec<i64>],
    ) -> Result<Vec<(Vec<f64>, bool)>, PolicyError> {
        if let Some(row) = continuations.iter().position(Vec::is_empty) {
            return Err(PolicyError::EmptyPrompt { row });
        }
        let n = continuations.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let k = continuations.iter().map(Vec::len).max().unwrap_or(0);
        let one = self.prefill(&[context.to_vec()], k)?;
        let (b, t) = (n as i64, k as i64);
        let device = self.device();
        let pad = self.tokenizer.pad_id();
        let labels: Vec<i64> = continuations
            .iter()
            .flat_map(|c| (0..k).map(move |j| c.get(j).copied().unwrap_or(pad)))
            .collect();
        let labels = Tensor::from_slice(&labels).view([b, t]).to_device(device);
        tch::no_grad(|| {
            let first = one
                .logits
                .to_kind(Kind::Float)
                .unsqueeze(1)
                .expand([b, 1, -1], false);
            let logits = if k > 1 {
                // Tokens 0..k-2 of each continuation; position j predicts j + 1.
                let mut rows = one.select(&vec![0; n], k - 1);
                let (mut valid, mut positions) = (Vec::new(), Vec::new());
                for c in continuations {
                    for j in 0..k - 1 {
                        valid.push(i64::from(j + 1 < c.len()));
                        positions.push((context.len() + j.min(c.len().saturating_sub(2))) as i64);
                    }
                }
                let on = |v: &[i64]| Tensor::from_slice(v).view([b, t - 1]).to_device(device);
                let hidden = self.model.forward(
                    &labels.narrow(1, 0, t - 1),
                    &on(&positions),
                    &on(&valid),
                    Some(&mut rows.cache),
                );
                let rest = self.model.logits(&hidden).to_kind(Kind::Float);
                Tensor::cat(&[first, rest], 1)
            } else {
                first
            };
            let logp = logits.log_softmax(-1, Kind::Float);
            let tok = logp.gather(2, &labels.unsqueeze(-1), false).squeeze_dim(-1);
            let top = logp.argmax(-1, false).eq_tensor(&labels);
            let lp = Vec::<Vec<f64>>::try_from(tok.to_kind(Kind::Double)).expect("[B, k]");
            let top = Vec::<Vec<bool>>::try_from(top.to_kind(Kind::Bool)).expect("[B, k]");
            Ok(lp
                .into_iter()
                .zip(top)
                .zip(continuations)
                .map(|((lp, top), c)| {
                    let n = c.len();
                    (lp[..n].to_vec(), top[..n].iter().all(|&g| g))
                })
                .collect())
        })
    }

    fn check_length(&self, longest: usize, new: usize) -> Result<(), PolicyError> {
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
    /// `room` more tokens per row. An empty prompt is an error: there is no
    /// distribution to continue from.
    pub fn prefill(&self, prompts: &[Vec<i64>], room: usize) -> Result<Rows, PolicyError> {
        if let Some(row) = prompts.iter().position(Vec::is_empty) {
            return Err(PolicyError::EmptyPrompt { row });
        }
        self.check_length(prompts.iter().map(Vec::len).max().unwrap_or(0), room)?;
        let device = self.device();
        let (ids, mask) = pad_left(prompts, self.tokenizer.pad_id());
        let (ids, mask) = (ids.to_device(device), mask.to_device(device));
        let capacity = ids.size()[1] + room as i64;
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
        Ok(Rows {
            cache,
            logits,
            ids: prompts.to_vec(),
        })
    }

    /// Appends `tokens[i]` to row i (rows may get different numbers of
    /// tokens, or none: such a row keeps its logits).
    pub fn extend(&self, rows: &mut Rows, tokens: &[Vec<i64>]) -> Result<(), PolicyError> {
        assert_eq!(tokens.len(), rows.len(), "extend: one token list per row");
        let t = tokens.iter().map(Vec::len).max().unwrap_or(0);
        if t == 0 {
            return Ok(());
        }
        let longest = (0..rows.len())
            .map(|i| rows.ids[i].len() + tokens[i].len())
            .max()
            .unwrap_or(0);
        self.check_length(longest, 0)?;
        let (b, t) = (rows.len() as i64, t as i64);
        let device = self.device();
        let pad = self.tokenizer.pad_id();
        let mut ids = Vec::with_capacity((b * t) as usize);
        let mut valid = Vec::with_capacity((b * t) as usize);
        let mut positions = Vec::with_capacity((b * t) as usize);
        for (row, new) in rows.ids.iter().zip(tokens) {
            let start = row.len() as i64;
            for j in 0..t {
                let real = (j as usize) < new.len();
                ids.push(if real { new[j as usize] } else { pad });
                valid.push(real as i64);
                positions.push(start + j.min(new.len().max(1) as i64 - 1));
            }
        }
        let on = |v: &[i64]| Tensor::from_slice(v).view([b, t]).to_device(device);
        rows.cache.reserve(t);
        let hidden = tch::no_grad(|| {
            self.model.forward(
                &on(&ids),
                &on(&positions),
                &on(&valid),
                Some(&mut rows.cache),
            )
        });
        // Each row's logits after its own last new token.
        let fed: Vec<i64> = (0..b).filter(|&i| !tokens[i as usize].is_empty()).collect();
        let last: Vec<i64> = fed
            .iter()
            .map(|&i| tokens[i as usize].len() as i64 - 1)
            .collect();
        let fed_t = Tensor::from_slice(&fed).to_device(device);
        let last_t = Tensor::from_slice(&last).to_device(device);
        let h = hidden
            .index_select(0, &fed_t)
            .gather(
                1,
                &last_t
                    .view([-1, 1, 1])
                    .expand([fed.len() as i64, 1, hidden.size()[2]], false),
                false,
            )
            .squeeze_dim(1);
        let new_logits = tch::no_grad(|| self.model.logits(&h));
        rows.logits = rows
            .logits
            .index_copy(0, &fed_t, &new_logits.to_kind(rows.logits.kind()));
        for (row, new) in rows.ids.iter_mut().zip(tokens) {
            row.extend_from_slice(new);
        }
        Ok(())
    }

    /// Makes row i hold exactly `targets[i]` (rows with `None` are left as
    /// they are): the longest prefix the row shares with its target stays
    /// cached, the rest of the target is run through the model. What
    /// generated text looks like to a reader (its re-tokenised text, with
    /// canonical markers) is thereby what the model continues from.
    pub fn sync(
        &self,
        rows: &mut Rows,
        targets: &[Option<Vec<i64>>],
    ) -> Result<SyncReport, PolicyError> {
        assert_eq!(targets.len(), rows.len(), "sync: one target per row");
        let mut report = SyncReport::default();
        let mut feed = vec![Vec::new(); rows.len()];
        for (i, target) in targets.iter().enumerate() {
            let Some(target) = target else { continue };
            if target.is_empty() {
                return Err(PolicyError::EmptyPrompt { row: i });
            }
            let held = &rows.ids[i];
            if held == target {
                continue;
            }
            let common = held.iter().zip(target).take_while(|(a, b)| a == b).count();
            // At least one token is fed, so the logits follow the target's end.
            let keep = common.min(target.len() - 1);
            if keep < held.len() {
                rows.cache.truncate_row(i as i64, keep);
                rows.ids[i].truncate(keep);
                report.rewound += 1;
            }
            feed[i] = target[keep..].to_vec();
            report.fed += feed[i].len();
        }
        self.extend(rows, &feed)?;
        Ok(report)
    }

    /// Batched generation with a KV cache; each prompt samples from its own
    /// random stream, drawn from `rng` in prompt order.
    pub fn generate(
        &self,
        prompts: &[Vec<i64>],
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Generation>, PolicyError> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows = self.prefill(prompts, params.max_new_tokens)?;
        let mut streams = streams(rng, prompts.len());
        Ok(self.decode(&mut rows, params, &mut streams))
    }

    /// `n` completions of one prompt that share its prefill: the prompt runs
    /// once and the samples continue from copies of its row.
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
        let one = self.prefill(&[prompt.to_vec()], 0)?;
        self.check_length(prompt.len(), params.max_new_tokens)?;
        let mut rows = one.select(&vec![0; n], params.max_new_tokens);
        let mut streams = streams(rng, n);
        Ok(self.decode(&mut rows, params, &mut streams))
    }

    /// [`sample_n`](Self::sample_n) in batches of at most `max_rows`, so N
    /// samples never hold N rows of cache at once. The samples are those of
    /// one call: each row's random stream is drawn in order either way.
    pub fn sample_n_batched(
        &self,
        prompt: &[i64],
        n: usize,
        max_rows: usize,
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Generation>, PolicyError> {
        let max_rows = max_rows.max(1);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let k = max_rows.min(n - out.len());
            out.extend(self.sample_n(prompt, k, params, rng)?);
        }
        Ok(out)
    }

    /// Continues every row until EOS, a stop string, the budget or the end
    /// of the model's context, row i sampling from `rngs[i]` (so what a row
    /// samples does not depend on which rows share its batch). Afterwards
    /// each row holds its ids plus every token it sampled but the last, and
    /// its logits are the ones that last token was drawn from; a caller that
    /// continues a row appends or [`sync`](Self::sync)s from there.
    pub fn decode(
        &self,
        rows: &mut Rows,
        params: &SamplingParams,
        rngs: &mut [ChaCha8Rng],
    ) -> Vec<Generation> {
        let b = rows.len();
        assert_eq!(rngs.len(), b, "decode: one random stream per row");
        let device = self.device();
        let context = self.model.cfg.max_position_embeddings as usize;
        let furthest = rows.ids.iter().map(Vec::len).max().unwrap_or(0);
        // The last sampled token is never fed, so n tokens need n - 1 positions.
        let budget = params
            .max_new_tokens
            .min(context.saturating_sub(furthest) + 1);
        let mut out: Vec<Generation> = (0..b).map(|_| Generation::empty()).collect();
        if b == 0 || budget == 0 {
            return out;
        }
        rows.cache.reserve(budget as i64 - 1);
        let mut done = vec![false; b];
        let mut logits = rows.logits.shallow_clone();
        let mut last_logits = rows.logits.copy();
        tch::no_grad(|| {
            for step in 0..budget {
                // A live row's last id is the token its logits follow.
                let prev: Vec<i64> = rows
                    .ids
                    .iter()
                    .map(|r| r.last().copied().unwrap_or(-1))
                    .collect();
                let forbidden = self.forbidden(&prev, params);
                let (tokens, logprobs) =
                    sample(&self.known(&logits), forbidden.as_ref(), params, rngs);
                let mut ended = Vec::new();
                for (i, (g, d)) in out.iter_mut().zip(done.iter_mut()).enumerate() {
                    if !*d {
                        *d = self.record(g, tokens[i], logprobs[i], params);
                        if *d || step + 1 == budget {
                            ended.push(i as i64);
                        }
                    }
                }
                if !ended.is_empty() {
                    let idx = Tensor::from_slice(&ended).to_device(device);
                    last_logits = last_logits.index_copy(0, &idx, &logits.index_select(0, &idx));
                }
                if done.iter().all(|&d| d) || step + 1 == budget {
                    break;
                }
                let positions: Vec<i64> = rows.ids.iter().map(|r| r.len() as i64).collect();
                let valid: Vec<i64> = done.iter().map(|&d| (!d) as i64).collect();
                let col = |v: &[i64]| Tensor::from_slice(v).to_device(device).view([b as i64, 1]);
                let h = self.model.forward(
                    &col(&tokens),
                    &col(&positions),
                    &col(&valid),
                    Some(&mut rows.cache),
                );
                logits = self.model.logits(&h.select(1, 0));
                for (i, row) in rows.ids.iter_mut().enumerate() {
                    if !done[i] {
                        row.push(tokens[i]);
                    }
                }
            }
        });
        rows.logits = last_logits;
        self.finish_texts(&mut out);
        out
    }

    fn ends(&self, token: i64, params: &SamplingParams) -> bool {
        self.tokenizer.is_stop(token) || params.stop_token_ids.contains(&token)
    }

    /// Logits over the tokenizer's tokens only: HF models often pad the
    /// embedding past the vocabulary, and those ids decode to nothing.
    pub(crate) fn known(&self, logits: &Tensor) -> Tensor {
        let vocab = self.tokenizer.vocab_size() as i64;
        if logits.size()[1] > vocab {
            logits.narrow(1, 0, vocab)
        } else {
            logits.shallow_clone()
        }
    }

    /// The tokens that may not follow each of `prev` [B, vocab], when the
    /// tokenizer constrains sampling to canonical sequences.
    pub(crate) fn forbidden(&self, prev: &[i64], params: &SamplingParams) -> Option<Tensor> {
        let canonical = self.tokenizer.canonical()?;
        let v = self.tokenizer.vocab_size() as i64;
        let stops: &[i64] = if params.ignore_eos {
            &[]
        } else {
            &params.stop_token_ids
        };
        Some(
            Tensor::from_slice(&canonical.forbidden(prev, stops))
                .view([prev.len() as i64, v])
                .to_device(self.device()),
        )
    }

    /// Appends a sampled token; true when it ends the sequence.
    pub(crate) fn record(
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
    pub(crate) fn finish_texts(&self, out: &mut [Generation]) {
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
        if let Some(row) = prompts.iter().position(Vec::is_empty) {
            return Err(PolicyError::EmptyPrompt { row });
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        self.check_length(longest, params.max_new_tokens)?;
        let mut streams = streams(rng, prompts.len());
        let mut seqs = prompts.to_vec();
        let mut out: Vec<Generation> = prompts.iter().map(|_| Generation::empty()).collect();
        let mut done = vec![false; prompts.len()];
        for _ in 0..params.max_new_tokens {
            let (ids, mask) = pad_left(&seqs, self.tokenizer.pad_id());
            let logits = tch::no_grad(|| self.logits(&ids, &mask).select(1, -1));
            let prev: Vec<i64> = seqs
                .iter()
                .map(|s| s.last().copied().unwrap_or(-1))
                .collect();
            let forbidden = self.forbidden(&prev, params);
            let (tokens, logprobs) = sample(
                &self.known(&logits),
                forbidden.as_ref(),
                params,
                &mut streams,
            );
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
