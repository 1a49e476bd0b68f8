#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
#
#   bash scripts/setup_env.sh            # idempotent: a ready .venv is checked in seconds
#   VENV=/path/to/venv bash scripts/setup_env.sh
#
# Install order (see docs/install.md for why):
#   1. requirements/torch.txt            torch + torchvision, alone
#   2. requirements/nodeps.txt        with --no-deps (sglang: its declared deps pin CUDA kernels)
#   3. requirements/runtime.txt          everything else in one resolve, torch repeated as hard pins
#   4. the project itself, editable, --no-deps
# A stamp (hash of the requirement files + Python version) makes a re-run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
REQS=(requirements/torch.txt requirements/nodeps.txt requirements/runtime.txt setup.py)
stamp_of() { cat "${REQS[@]}" | sha256sum | cut -d' ' -f1; echo "$($PY --version 2>&1)"; }
STAMP_FILE="$VENV/.megatron_vgpo_stamp"
want="$(stamp_of)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" -U pip
echo "[setup] 1/4 torch + torchvision"
"${PIP[@]}" -r requirements/torch.txt
echo "[setup] 2/4 sglang, qwen tokenizer files (no deps)"
"${PIP[@]}" --no-deps -r requirements/nodeps.txt
echo "[setup] 3/4 runtime dependencies (one resolve)"
"${PIP[@]}" -r requirements/torch.txt -r requirements/runtime.txt
echo "[setup] 4/4 megatron_vgpo (editable)"
"${PIP[@]}" --no-deps -e . --config-settings editable_mode=compat
"$VENV/bin/python" -W ignore -c "import torch, torchvision, transformers, megatron.core; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| megatron-core', megatron.core.__version__)"
echo "$want" > "$STAMP_FILE"
echo "[setup] done in $(( $(date +%s) - t0 ))s"
