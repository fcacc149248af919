#!/usr/bin/env bash
# The GPU check, one command: builds medzero against CUDA libtorch, runs the
# CUDA tests (tests/cuda.rs and tests/precision.rs, ignored elsewhere) and the GPU bench rows
# (decode at batch 1 / 64 / 256, SFT / DPO / GRPO learner steps with MFU,
# MCTS nodes/s one tree at a time and 8 trees in flight through the
# service) for the quickstart student and SmolLM2-135M-Instruct in bf16,
# and prints one table. Needs an NVIDIA GPU, cargo, and what `make setup`
# installs (PyTorch 2.13.0 from PyPI, the CUDA 13 build on Linux x86_64):
# with those caches warm it takes a few minutes; a cold build adds the
# compile. Outputs go to $OUT (default target/device-check).
#
#   PEAK_TFLOPS   the GPU's dense bf16 peak for MFU (default 989: H100/H200 SXM)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-target/device-check}"
PEAK="${PEAK_TFLOPS:-989}"
mkdir -p "$OUT"
start=$(date +%s)
say() { echo "device-check [$(( $(date +%s) - start ))s]: $*" >&2; }

command -v nvidia-smi >/dev/null || { say "no nvidia-smi: this is no NVIDIA GPU machine"; exit 1; }
command -v cargo >/dev/null || { say "no cargo: install Rust (rustup) first"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
make setup >&2
.medzero/py/bin/python -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "sees", torch.cuda.device_count(), "GPU(s)"); sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { say "the PyTorch in the cache sees no GPU (a CPU-only wheel, or a driver older than its CUDA)"; exit 1; }

say "building"
cargo build --release --bins --tests >&2
say "CUDA tests"
cargo test --release --test cuda --test precision -- --ignored 2>&1 | tee "$OUT/tests.log" >&2 \
  || say "CUDA tests FAILED: see $OUT/tests.log (the bench rows follow anyway)"
tests=$(grep -E '^test result' "$OUT/tests.log" | awk '{p += $4; f += $6} END {print p " passed, " f " failed"}')

bench() {
  local name=$1; shift
  say "bench: $name"
  target/release/medzero bench --device cuda --dtype bf16 --no-peer --json \
    --only decode --only learner --only mcts --only service \
    --batches 1,64,256 --peak-tflops "$PEAK" "$@" > "$OUT/bench-$name.json"
}
bench student
bench smollm2 --model .medzero/models/SmolLM2-135M-Instruct

.medzero/py/bin/python - "$OUT" "$tests" "$(( $(date +%s) - start ))" <<'PY'
import json, sys, pathlib
out, tests, secs = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
gpu = (out / "gpu.txt").read_text().strip()
lines = [f"GPU: {gpu}; CUDA tests: {tests}; {secs} s in all", ""]
lines += ["| model | benchmark | unit | medzero |", "|---|---|---|---|"]
for name in ["student", "smollm2"]:
    report = json.loads((out / f"bench-{name}.json").read_text())
    if name == "student":
        lines.insert(1, report["stamp"])
    for r in report["rows"]:
        v = r["medzero"]
        lines.append(f"| {name} | {r['name']} | {r['unit']} | {v:,.0f} |" if v >= 100 else f"| {name} | {r['name']} | {r['unit']} | {v:.3g} |")
table = "\n".join(lines)
(out / "table.md").write_text(table + "\n")
print(table)
PY
