//! The base layer, which knows no algorithm: files written whole and JSONL
//! records, model folders, checkpoints, metrics (TensorBoard), result
//! tables, signals and progress bars.

pub mod checkpoint;
pub mod io;
pub mod monitor;
pub mod progress;
pub mod results;
pub mod signals;

/// FNV-1a (64-bit): a hash that is stable across runs and platforms, unlike
/// the standard library's, for seeds and cache keys.
pub fn fnv1a64(offset: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(offset, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// FNV-1a's 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// AdamW's settings (libtorch's eps), checked as every trainer needs them:
/// a finite learning rate above 0, betas in [0, 1), and a finite weight
/// decay and clipping norm >= 0. Configs call it to validate at load and
/// again to build the optimizer, so the two cannot disagree.
pub fn adamw(
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    max_grad_norm: f64,
) -> anyhow::Result<medzero_policies::optim::AdamWConfig> {
    if !(lr.is_finite() && lr > 0.0) {
        anyhow::bail!("lr must be a finite number > 0, got {lr}");
    }
    for (name, v) in [
        ("weight_decay", weight_decay),
        ("max_grad_norm", max_grad_norm),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            anyhow::bail!("{name} must be a finite number >= 0, got {v}");
        }
    }
    let cfg = medzero_policies::optim::AdamWConfig {
        lr,
        beta1,
        beta2,
        eps: 1e-8,
        weight_decay,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Stops a training loop whose loss or gradient norm is not finite at
/// `step`, before the optimizer writes NaN into the weights (and a
/// checkpoint saves them): the last checkpoint stays good to resume from.
pub fn ensure_finite(
    tag: &str,
    step: usize,
    loss: f64,
    grad_norm: f64,
    lr: f64,
) -> anyhow::Result<()> {
    if loss.is_finite() && grad_norm.is_finite() {
        return Ok(());
    }
    anyhow::bail!(
        "{tag}: training diverged at step {step}: loss {loss}, gradient norm {grad_norm} at \
         learning rate {lr:e}; nothing was stepped or saved past the last checkpoint. Lower the \
         learning rate (or warm up longer), check the data, and rerun: the stage resumes from \
         its last checkpoint"
    )
}
