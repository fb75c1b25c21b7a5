#!/usr/bin/env bash
# Creates the Python environment used by tools/train-demo (CPU torch is enough).
set -euo pipefail
VENV="${QC_TRAIN_VENV:-$HOME/.cache/quantcache/train-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install torch
"$VENV/bin/pip" install safetensors tokenizers numpy pillow
echo "venv ready at $VENV"
