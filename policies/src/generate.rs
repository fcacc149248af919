//! Sampling and batched generation over a [`KvCache`].
//!
//! Randomness comes from seeded ChaCha streams, one per row and one uniform
//! per row per step (inverse-CDF sampling on the device): what a row samples
//! depends on its own stream only, not on which rows share its batch, and
//! libtorch's global generator is never touched.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass kept (1 = off).
    pub top_p: f64,
    /// Most likely tokens kept (0 = off).
    pub top_k: usize,
    /// Generation of a sequence ends at the first of these (not included in
    /// the returned text), e.g. MedS3's next "Step k:".
    pub stop: Vec<String>,
    /// Tokens that end a sequence besides EOS (a template's end of turn).
    pub stop_token_ids: Vec<i64>,
    /// Generate exactly `max_new_tokens` (benchmarks): EOS and stops ignored.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams {
            max_new_tokens,
            ..Default::default()
        }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Every setting in range (a temperature of NaN or below 0, a top-p
    /// outside (0, 1] or no tokens at all would sample nothing useful).
    pub fn validate(&self) -> Result<(), String> {
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be a finite number >= 0 (0: greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Eos,
    /// Stopped by this stop string.
    Stop(String),
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Every generated token, including the EOS or the tokens of a stop string.
    pub tokens: Vec<i64>,
    /// Log-probability of each token under the model's distribution at the
    /// sampling temperature (the raw model when greedy), before top-k,
    /// top-p and the canonical mask: what a learner computes with the same
    /// temperature (TRL's semantics), so on-policy ratios are 1.
    pub logprobs: Vec<f32>,
    /// Decoded text, cut before a stop string; special tokens dropped.
    pub text: String,
    pub finish: Finish,
}

impl Generation {
    pub(crate) fn empty() -> Generation {
        Generation {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            finish: Finish::Length,
        }
    }
}

/// `n` independent random streams seeded from `rng`, one per row.
pub fn streams(rng: &mut ChaCha8Rng, n: usize) -> Vec<ChaCha8Rng> {
    (0..n)
        .map(|_| ChaCha8Rng::seed_from_u64(rng.random::<u64>()))
        .collect()
}

/// Whether [`temper`] changes logits at `temperature` (not greedy, not 1).
pub fn tempers(temperature: f64) -> bool {
    temperature > 0.0 && temperature != 1.0
}

/// `logits` divided by `temperature`: the distribution a sample at that
/// temperature is drawn from, and the one its learner scores. Greedy (0)
/// and 1 leave them as they are.
pub fn temper(logits: &Tensor, temperature: f64) -> Tensor {
    if tempers(temperature) {
        logits / temperature
    } else {
        logits.shallow_clone()
    }
}

/// Picks one token per row of `logits` [B, V], row i drawing from `rngs[i]`
/// and never a token `forbidden` [B, V] marks; returns the tokens and their
/// log-probabilities at the sampling temperature before any filtering (the
/// distribution a learner at that temperature computes, so on-policy
/// ratios are 1).
pub fn sample(
    logits: &Tensor,
    forbidden: Option<&Tensor>,
    params: &SamplingParams,
    rngs: &mut [ChaCha8Rng],
) -> (Vec<i64>, Vec<f32>) {
    let logits = logits.to_kind(Kind::Float);
    let (b, v) = (logits.size()[0], logits.size()[1]);
    let logp = temper(&logits, params.temperature).log_softmax(-1, Kind::Float);
    let logits = match forbidden {
        Some(mask) => logits.masked_fill(mask, f64::NEG_INFINITY),
        None => logits,
    };
    let next = if params.is_greedy() {
        logits.argmax(-1, false)
    } else {
        let mut l = temper(&logits, params.temperature);
        if params.top_k > 0 && (params.top_k as i64) < v {
            let k = params.top_k as i64;
            let kth = l.topk(k, -1, true, true).0.narrow(1, k - 1, 1);
            l = l.masked_fill(&l.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        let mut probs = l.softmax(-1, Kind::Float);
        if params.top_p < 1.0 {
            let (sorted, idx) = probs.sort(-1, true);
            // Keep tokens while the mass before them is below top_p (the most
            // likely one always stays).
            let before = sorted.cumsum(-1, Kind::Float) - &sorted;
            let kept = sorted.masked_fill(&before.gt(params.top_p), 0.0);
            probs = probs.zeros_like().scatter(-1, &idx, &kept);
        }
        let cdf = probs.cumsum(-1, Kind::Float);
        assert_eq!(rngs.len() as i64, b, "sample: one random stream per row");
        let u: Vec<f32> = rngs.iter_mut().map(|r| r.random::<f32>()).collect();
        let u =
            Tensor::from_slice(&u).to_device(cdf.device()).view([b, 1]) * cdf.narrow(1, v - 1, 1);
        u.searchsorted(&cdf, false, true, "right", None::<Tensor>)
            .clamp_max(v - 1)
            .view([b])
    };
    let lp = logp.gather(1, &next.view([b, 1]), false).view([b]);
    let next = next.to_device(tch::Device::Cpu);
    let lp = lp.to_device(tch::Device::Cpu);
    (
        Vec::<i64>::try_from(&next).unwrap_or_default(),
        Vec::<f32>::try_from(&lp).unwrap_or_default(),
    )
}

/// Left-pads sequences so they end at the same column: returns ids [B, T] and
/// the validity mask [B, T] (as i64 0/1).
pub fn pad_left(seqs: &[Vec<i64>], pad: i64) -> (Tensor, Tensor) {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend(std::iter::repeat_n(pad, t - s.len()).chain(s.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, t - s.len()).chain(std::iter::repeat_n(1, s.len())));
    }
    let shape = [seqs.len() as i64, t as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&mask).view(shape),
    )
}

/// Right-pads sequences (training batches) to the longest length rounded up
/// to `multiple` (few distinct shapes keep oneDNN's kernel cache warm): ids
/// [B, T] and mask [B, T].
pub fn pad_right_to(seqs: &[Vec<i64>], pad: i64, multiple: usize) -> (Tensor, Tensor) {
    let t = seqs
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .next_multiple_of(multiple.max(1));
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend(
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, t - s.len())),
        );
        mask.extend(std::iter::repeat_n(1i64, s.len()).chain(std::iter::repeat_n(0, t - s.len())));
    }
    let shape = [seqs.len() as i64, t as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&mask).view(shape),
    )
}

/// Right-pads to the longest sequence.
pub fn pad_right(seqs: &[Vec<i64>], pad: i64) -> (Tensor, Tensor) {
    pad_right_to(seqs, pad, 1)
}
