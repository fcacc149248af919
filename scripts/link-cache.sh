#!/usr/bin/env bash
# Points .medzero/ (ignored by git) at the user-cache install made by setup.sh,
# so cargo (.cargo/config.toml) and the tests find libtorch and the Python peers
# without exported variables.
set -euo pipefail
CACHE="${MEDZERO_CACHE:-$HOME/.cache/medzero}"
VENV="$CACHE/py"
cd "$(dirname "$0")/.."
torch_dir=$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
mkdir -p .medzero
ln -sfn "$torch_dir" .medzero/libtorch
ln -sfn "$VENV" .medzero/py
