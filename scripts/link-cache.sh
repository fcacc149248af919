#!/usr/bin/env bash
# Points .medzero/ (ignored by git) at the user-cache install made by setup.sh,
# so cargo (.cargo/config.toml) and the tests find libtorch and the Python peers
# without exported variables.
set -euo pipefail
CACHE="${MEDZERO_CACHE:-$HOME/.cache/medzero}"
VENV="$CACHE/py"
cd "$(dirname "$0")/.."
# setup.sh records where torch landed; importing torch to ask takes seconds.
if [ -f "$VENV/.medzero-torch-dir" ]; then
  torch_dir=$(cat "$VENV/.medzero-torch-dir")
else
  torch_dir=$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
fi
mkdir -p .medzero
ln -sfn "$torch_dir" .medzero/libtorch
ln -sfn "$VENV" .medzero/py
ln -sfn "$CACHE/models" .medzero/models
ln -sfn "$CACHE/gloo/include" .medzero/gloo-include
