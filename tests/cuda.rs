//! The same runs on a CUDA device as on the CPU: training, saving and
//! greedy decoding (bf16 on a GPU: tests/precision.rs). Ignored without a
//! GPU; `scripts/device-check.sh` runs them with `--ignored`.

mod support;

use serde_json::Value as Json;
use std::path::Path;
use support::{chains_run, medzero, stderr, stdout};

fn greedy(model: &Path, device: &str) -> Json {
    let o = medzero(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Question:",
        "--greedy",
        "--max-new-tokens",
        "48",
        "--json",
        "--device",
        device,
    ]);
    assert!(o.status.success(), "{device}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// f32 on the GPU trains the CPU's curve (within 1e-3 nats per step over 60
/// steps: kernels sum in other orders), and the model it saves decodes the
/// same 48 greedy tokens on both devices with log-probs within 1e-3.
#[test]
#[ignore = "needs a CUDA device (scripts/device-check.sh)"]
fn cuda_trains_and_decodes_as_the_cpu_does() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cpu_run, cpu) = chains_run(a.path(), "cpu", "f32");
    let (_, gpu) = chains_run(b.path(), "cuda", "f32");
    for (step, (x, y)) in cpu.iter().zip(&gpu).enumerate() {
        assert!(
            (x - y).abs() <= 1e-3,
            "step {}: cpu {x}, cuda {y}",
            step + 1
        );
    }
    let model = cpu_run.join("stages/0-chains/model");
    let (on_cpu, on_gpu) = (greedy(&model, "cpu"), greedy(&model, "cuda"));
    assert_eq!(on_cpu["tokens"], on_gpu["tokens"]);
    let lp = |v: &Json| -> Vec<f64> {
        let list = v["logprobs"].as_array().unwrap();
        list.iter().map(|x| x.as_f64().unwrap()).collect()
    };
    for (x, y) in lp(&on_cpu).iter().zip(lp(&on_gpu)) {
        assert!((x - y).abs() <= 1e-3, "log-prob cpu {x}, cuda {y}");
    }
}
