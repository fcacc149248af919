//! The learner-step workloads `medzero bench` times beside TRL and
//! `benches/learner.rs` hands to criterion: one optimizer step (loss,
//! backward, clipping at 1, AdamW at 1e-4) of SFT, DPO or GRPO on random
//! token batches of a given shape, as the peers' trainers take them.

use crate::train::BatchLoss;
use crate::train::dpo::{Dpo, DpoConfig, EncodedPair, Reference};
use crate::train::grpo::{self, GrpoConfig, Sample};
use crate::train::sft::completion_nll_sum;
use anyhow::Result;
use medzero_policies::Policy;
use medzero_policies::generate::pad_right;
use medzero_policies::optim::{AdamW, AdamWConfig};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

/// The group size of the GRPO workload.
pub const GROUP: usize = 8;

enum Work {
    Sft {
        ids: Tensor,
        mask: Tensor,
        targets: Tensor,
        tokens: f64,
    },
    Dpo {
        dpo: Box<Dpo>,
        all: Vec<usize>,
    },
    Grpo {
        prompts: Vec<Vec<i64>>,
        completions: Vec<Vec<i64>>,
        advantages: Vec<Vec<f32>>,
        cfg: GrpoConfig,
        half: usize,
    },
}

/// One kind of learner step on a fixed batch, ready to repeat.
pub struct LearnerStep<'p> {
    policy: &'p Policy,
    opt: AdamW,
    work: Work,
    /// What the row is called.
    pub name: String,
    /// Tokens one step trains on.
    pub tokens: usize,
}

/// `n` random prompts of `len` ids (skipping the first few, the specials).
pub fn random_prompts(rng: &mut ChaCha8Rng, n: usize, len: usize, vocab: i64) -> Vec<Vec<i64>> {
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(5..vocab)).collect())
        .collect()
}

/// AdamW at a small learning rate over every parameter.
pub fn optimizer(policy: &Policy) -> Result<AdamW> {
    let cfg = AdamWConfig {
        lr: 1e-4,
        ..Default::default()
    };
    Ok(AdamW::new(
        policy.named_parameters(),
        cfg,
        AdamW::default_decay,
    )?)
}

impl<'p> LearnerStep<'p> {
    /// SFT: `batch` sequences of `len` tokens, the loss on every token.
    pub fn sft(policy: &'p Policy, batch: usize, len: usize) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let seqs = random_prompts(&mut rng, batch, len, policy.config().vocab_size);
        let (ids, mask) = pad_right(&seqs, 0);
        let (ids, mask) = (
            ids.to_device(policy.device()),
            mask.to_device(policy.device()),
        );
        Ok(LearnerStep {
            policy,
            opt: optimizer(policy)?,
            work: Work::Sft {
                targets: mask.ones_like(),
                ids,
                mask,
                tokens: (batch * (len - 1)) as f64,
            },
            name: format!("SFT step, batch {batch} x {len} tokens"),
            tokens: batch * len,
        })
    }

    /// DPO as TRL's DPOTrainer takes it: batch/2 pairs of len/2-token
    /// prompts and completions, a frozen reference run live, sigmoid loss.
    pub fn dpo(policy: &'p Policy, batch: usize, len: usize) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (half, pairs) = (len / 2, (batch / 2).max(1));
        let vocab = policy.config().vocab_size;
        let mut draw = || random_prompts(&mut rng, pairs, half, vocab);
        let (p, c, r) = (draw(), draw(), draw());
        let encoded: Vec<EncodedPair> = (0..pairs)
            .map(|i| EncodedPair {
                prompt: p[i].clone(),
                chosen: c[i].clone(),
                rejected: r[i].clone(),
            })
            .collect();
        let reference = Policy::new_random(
            policy.config(),
            policy.tokenizer.clone(),
            policy.device(),
            1,
        )?;
        Ok(LearnerStep {
            policy,
            opt: optimizer(policy)?,
            work: Work::Dpo {
                dpo: Box::new(Dpo {
                    cfg: DpoConfig {
                        precompute_reference: false,
                        ..DpoConfig::default()
                    },
                    pairs: encoded,
                    reference: Reference::Model(Box::new(reference)),
                }),
                all: (0..pairs).collect(),
            },
            name: format!("DPO step, {pairs} pairs x {half}+{half} tokens, live reference"),
            tokens: pairs * 4 * half,
        })
    }

    /// GRPO as TRL's GRPOTrainer takes it with generation bypassed: `batch`
    /// completions (groups of [`GROUP`]) of len/2 tokens after len/2-token
    /// prompts, per-token advantages, TRL's default `dapo` loss without KL.
    pub fn grpo(policy: &'p Policy, batch: usize, len: usize) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let vocab = policy.config().vocab_size;
        let half = len / 2;
        let rows = batch.max(GROUP);
        Ok(LearnerStep {
            policy,
            opt: optimizer(policy)?,
            work: Work::Grpo {
                prompts: random_prompts(&mut rng, rows / GROUP, half, vocab),
                completions: random_prompts(&mut rng, rows, half, vocab),
                advantages: (0..rows)
                    .map(|i| vec![if i % 2 == 0 { 1.0 } else { -1.0 }; half])
                    .collect(),
                cfg: GrpoConfig::default(),
                half,
            },
            name: format!(
                "GRPO step, {rows} completions ({} groups) x {half}+{half} tokens",
                rows / GROUP
            ),
            tokens: rows * 2 * half,
        })
    }

    /// The policy's parameter count (for FLOPs per token).
    pub fn parameters(&self) -> i64 {
        self.policy.config().num_parameters()
    }

    /// Whether [`LearnerStep::step`] splits its batch over the ranks of a
    /// distributed run (SFT and DPO do; GRPO's loss normalises over the
    /// whole generation batch, which the offline loop's shares do not cover).
    pub fn data_parallel(&self) -> bool {
        !matches!(self.work, Work::Grpo { .. })
    }

    /// One optimizer step; with several processes, over this rank's shard
    /// of the batch, gradients summed over the ranks, as the offline loop.
    pub fn step(&mut self) -> Result<()> {
        let policy = self.policy;
        let group = medzero_dist::world();
        let loss = match &mut self.work {
            Work::Sft {
                ids,
                mask,
                targets,
                tokens,
            } => {
                let rows = crate::runtime::parallel::shard_range(ids.size()[0] as usize, group);
                let (start, len) = (rows.start as i64, rows.len() as i64);
                let cut = |t: &Tensor| t.narrow(0, start, len);
                completion_nll_sum(policy, &cut(ids), &cut(mask), &cut(targets)) / *tokens
            }
            Work::Dpo { dpo, all } => {
                let mine = crate::runtime::parallel::shard(all, group);
                dpo.micro_loss(policy, all, mine)?.loss
            }
            Work::Grpo {
                prompts,
                completions,
                advantages,
                cfg,
                half,
            } => {
                let batch: Vec<Sample> = (0..completions.len())
                    .map(|i| Sample {
                        prompt: &prompts[i / GROUP],
                        completion: &completions[i],
                        advantages: &advantages[i],
                        old_logprobs: &[],
                        masked: false,
                    })
                    .collect();
                let sampled = grpo::Sampled {
                    max_completion: *half,
                    temperature: 1.0,
                };
                grpo::loss(policy, None, &batch, cfg, sampled)?.loss
            }
        };
        loss.backward();
        if let Some(g) = group.filter(|_| self.data_parallel()) {
            let params: Vec<Tensor> = self.opt.params().map(Tensor::shallow_clone).collect();
            crate::runtime::parallel::allreduce_grads(g, &params)?;
        }
        self.opt.clip_grad_norm(1.0);
        self.opt.step(1e-4);
        self.opt.zero_grad();
        Ok(())
    }
}
