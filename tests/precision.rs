//! bf16 training: the student stored in bf16 trains through f32 master
//! weights and f32 AdamW moments, and its loss curve follows the f32 run's,
//! on the CPU and (ignored without one; scripts/device-check.sh) on a GPU.

mod support;

/// `train/loss` of the chains run on `device` in `dtype`.
fn loss_curve(device: &str, dtype: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    support::chains_run(dir.path(), device, dtype).1
}

/// Over 60 steps of a memorising run (loss 5.9 to 1.3, lr 3e-3 on a cosine
/// to 0) the bf16 curve stays within 0.03 nats of f32's at every step after
/// the fifth and ends within 3% of it.
fn assert_bf16_follows_f32(device: &str) {
    let f32 = loss_curve(device, "f32");
    let bf16 = loss_curve(device, "bf16");
    assert_eq!(f32.len(), 60);
    assert_eq!(bf16.len(), f32.len());
    assert!(f32[59] < 0.5 * f32[0], "the f32 run did not learn: {f32:?}");
    for (step, (a, b)) in f32.iter().zip(&bf16).enumerate().skip(5) {
        assert!(
            (a - b).abs() <= 0.03,
            "{device}, step {}: f32 loss {a:.4}, bf16 {b:.4}\nf32 {f32:?}\nbf16 {bf16:?}",
            step + 1
        );
    }
    let (a, b) = (f32[59], bf16[59]);
    assert!(
        (a - b).abs() <= 0.03 * a,
        "{device}: final loss f32 {a:.4}, bf16 {b:.4}"
    );
}

/// Measured on the CPU (2026-12-03): at most 0.008 nats apart, final 1.302
/// vs 1.298; with the masters switched off (plain bf16 AdamW) 0.21 nats
/// apart and a final 1.511, the late small updates rounded away.
#[test]
fn bf16_loss_curve_follows_f32() {
    assert_bf16_follows_f32("cpu");
}

#[test]
#[ignore = "needs a CUDA device (scripts/device-check.sh)"]
fn cuda_bf16_loss_curve_follows_f32() {
    assert_bf16_follows_f32("cuda");
}
