//! Data parallelism over c10d (`medzero_dist`), for the offline loop and
//! the online learner alike: every rank takes a contiguous shard of each
//! optimizer step's items, gradients are summed over the ranks in flat
//! buckets before clipping and AdamW, so every rank applies the same update
//! to the same weights. A shard's loss is already its share of the whole
//! step's loss (normalised by the whole step's counts), so the summed
//! gradient is the one-process gradient of the global batch.

use crate::infra::checkpoint::TrainerState;
use anyhow::{Context, Result, bail};
use medzero_dist::Group;
use medzero_policies::optim::AdamW;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tch::{Kind, Tensor};

/// Gradient elements per allreduce: few enough calls for a small model,
/// buckets small enough not to double a large model's memory.
const BUCKET: i64 = 1 << 23;

/// This rank's share of `n` items: the `rank`-th of `world` contiguous
/// shards, whose sizes differ by at most one (equal when `world` divides
/// `n`; some are empty when `n` < `world`); all of them alone.
pub fn shard_range(n: usize, group: Option<&Group>) -> std::ops::Range<usize> {
    match group {
        Some(g) => g.rank() * n / g.world()..(g.rank() + 1) * n / g.world(),
        None => 0..n,
    }
}

/// This rank's share of a step's items ([`shard_range`]).
pub fn shard<'a>(picked: &'a [usize], group: Option<&Group>) -> &'a [usize] {
    &picked[shard_range(picked.len(), group)]
}

/// Rank 0's weights, moments, step count and data position on every rank
/// (`state` is this rank's; rank 0's is returned): a resume with another
/// world size, or a rank without checkpoints, starts where rank 0 left off.
pub fn start_from_rank0(
    group: &Group,
    opt: &mut AdamW,
    state: TrainerState,
) -> Result<TrainerState> {
    let params: Vec<Tensor> = opt.params().map(Tensor::shallow_clone).collect();
    broadcast_tensors(group, &params)?;
    let held: Vec<(String, Tensor)> = opt.state();
    broadcast_tensors(
        group,
        &held
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect::<Vec<_>>(),
    )?;
    let (state, steps) = broadcast_json(group, &(state, opt.steps_taken()))?;
    // The moments are already rank 0's (aliased); this sets the step count
    // and rounds any f32 masters into their bf16 parameters.
    opt.load_state(&held, steps)?;
    Ok(state)
}

/// One optimizer step's sums over the ranks: the gradients, then the loss,
/// the tokens and the metrics (each rank's micro-batch shares add up to the
/// global batch's values).
pub fn sum_step(
    group: &Group,
    opt: &AdamW,
    loss: &mut f64,
    tokens: &mut u64,
    metrics: &mut [(&'static str, f64)],
) -> Result<()> {
    let params: Vec<Tensor> = opt.params().map(Tensor::shallow_clone).collect();
    allreduce_grads(group, &params)?;
    let mut sums: Vec<f64> = [*loss, *tokens as f64]
        .into_iter()
        .chain(metrics.iter().map(|(_, v)| *v))
        .collect();
    allreduce_values(group, &mut sums)?;
    (*loss, *tokens) = (sums[0], sums[1] as u64);
    for ((_, v), sum) in metrics.iter_mut().zip(&sums[2..]) {
        *v = *sum;
    }
    Ok(())
}

/// The global batch (`batch_size * grad_accum`) must split evenly.
pub fn check_divides(per_step: usize, group: Option<&Group>, tag: &str) -> Result<()> {
    if let Some(g) = group
        && !per_step.is_multiple_of(g.world())
    {
        bail!(
            "{tag}: batch_size * grad_accum = {per_step} sequences per step does not split over \
             {} ranks; make it a multiple of WORLD_SIZE",
            g.world()
        );
    }
    Ok(())
}

/// Sums every parameter's gradient over the ranks. A parameter some rank
/// left without a gradient gets zeros there first, so all ranks step the
/// same set of parameters. Buckets are reduced in f32 (f64 stays f64), so
/// bf16 gradients lose nothing in the sum.
pub fn allreduce_grads(group: &Group, params: &[Tensor]) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let defined: Vec<i64> = params.iter().map(|p| p.grad().defined() as i64).collect();
        let mut any = Tensor::from_slice(&defined);
        group.allreduce_sum(&mut any)?;
        let any: Vec<i64> = Vec::try_from(&any)?;
        let missing: Vec<&Tensor> = params
            .iter()
            .zip(&any)
            .filter(|(p, n)| **n > 0 && !p.grad().defined())
            .map(|(p, _)| p)
            .collect();
        if !missing.is_empty() {
            // d/dp of 0 * sum(p) is a zero gradient of p's shape and dtype.
            tch::with_grad(|| {
                let zero = missing
                    .iter()
                    .map(|p| p.sum(p.kind()).g_mul_scalar(0.0))
                    .reduce(|a, b| a + b)
                    .expect("non-empty");
                zero.backward();
            });
        }
        let grads: Vec<Tensor> = params
            .iter()
            .zip(&any)
            .filter(|(_, n)| **n > 0)
            .map(|(p, _)| p.grad())
            .collect();
        for wide in [Kind::Double, Kind::Float] {
            let group_of = |g: &&Tensor| (g.kind() == Kind::Double) == (wide == Kind::Double);
            let mut bucket: Vec<&Tensor> = Vec::new();
            let mut elems = 0;
            for g in grads.iter().filter(group_of) {
                if elems + g.numel() as i64 > BUCKET && !bucket.is_empty() {
                    reduce_bucket(group, &bucket, wide)?;
                    bucket.clear();
                    elems = 0;
                }
                elems += g.numel() as i64;
                bucket.push(g);
            }
            if !bucket.is_empty() {
                reduce_bucket(group, &bucket, wide)?;
            }
        }
        Ok(())
    })
}

fn reduce_bucket(group: &Group, grads: &[&Tensor], kind: Kind) -> Result<()> {
    let flat: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_kind(kind).reshape([-1]))
        .collect();
    let mut flat = Tensor::cat(&flat, 0);
    group.allreduce_sum(&mut flat)?;
    let mut offset = 0;
    for g in grads {
        let n = g.numel() as i64;
        g.shallow_clone()
            .copy_(&flat.narrow(0, offset, n).view(g.size().as_slice()));
        offset += n;
    }
    Ok(())
}

/// Sums host scalars over the ranks (a step's loss, tokens, metrics).
pub fn allreduce_values(group: &Group, values: &mut [f64]) -> Result<()> {
    let mut t = Tensor::from_slice(values);
    group.allreduce_sum(&mut t)?;
    values.copy_from_slice(&Vec::<f64>::try_from(&t)?);
    Ok(())
}

/// Rank 0's tensors everywhere, in place (same names, shapes and order on
/// every rank).
pub fn broadcast_tensors(group: &Group, tensors: &[Tensor]) -> Result<()> {
    tch::no_grad(|| {
        for t in tensors {
            group.broadcast(&mut t.shallow_clone(), 0)?;
        }
        Ok(())
    })
}

/// Rank 0's `value`, on every rank (as JSON bytes).
pub fn broadcast_json<T: Serialize + DeserializeOwned>(group: &Group, value: &T) -> Result<T> {
    let bytes = serde_json::to_vec(value)?;
    let mut len = Tensor::from_slice(&[bytes.len() as i64]);
    group.broadcast(&mut len, 0)?;
    let len = len.int64_value(&[0]) as usize;
    let mut buf = if group.rank() == 0 {
        Tensor::from_slice(&bytes)
    } else {
        Tensor::zeros([len as i64], (Kind::Uint8, tch::Device::Cpu))
    };
    group.broadcast(&mut buf, 0)?;
    let got: Vec<u8> = Vec::try_from(&buf)?;
    serde_json::from_slice(&got).context("rank 0's broadcast state does not parse")
}

/// Every rank's `mine`, in rank order, merged on rank 0 by `merge`; the
/// merged value is returned on every rank. Point-to-point JSON messages
/// whose every wait lasts as long as the peer lives, not the collective
/// timeout: a rank's share of a round may finish long before another's.
pub fn exchange_json<T, U>(
    group: &Group,
    mine: T,
    merge: impl FnOnce(Vec<T>) -> Result<U>,
) -> Result<U>
where
    T: Serialize + DeserializeOwned,
    U: Serialize + DeserializeOwned,
{
    const GATHER: i32 = 21;
    const MERGED: i32 = 22;
    if group.rank() > 0 {
        send_json(group, &mine, 0, GATHER)?;
        return recv_json(group, 0, MERGED);
    }
    let mut all = vec![mine];
    for rank in 1..group.world() {
        all.push(recv_json(group, rank, GATHER)?);
    }
    let merged = merge(all)?;
    for rank in 1..group.world() {
        send_json(group, &merged, rank, MERGED)?;
    }
    Ok(merged)
}

fn send_json<T: Serialize>(group: &Group, value: &T, dst: usize, tag: i32) -> Result<()> {
    let bytes = serde_json::to_vec(value)?;
    group.send_waiting(&Tensor::from_slice(&[bytes.len() as i64]), dst, tag, None)?;
    group.send_waiting(&Tensor::from_slice(&bytes), dst, tag, None)?;
    Ok(())
}

fn recv_json<T: DeserializeOwned>(group: &Group, src: usize, tag: i32) -> Result<T> {
    let mut len = Tensor::zeros([1], (Kind::Int64, tch::Device::Cpu));
    group.recv(&mut len, src, tag, None)?;
    let mut buf = Tensor::zeros([len.int64_value(&[0])], (Kind::Uint8, tch::Device::Cpu));
    group.recv(&mut buf, src, tag, None)?;
    let got: Vec<u8> = Vec::try_from(&buf)?;
    serde_json::from_slice(&got).with_context(|| format!("rank {src}'s message does not parse"))
}
