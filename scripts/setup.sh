#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and install featsvm with its dev tools
# the web page (serve extra), Ray (ray extra: `extract --engine ray`, `--backend ray`) and the
# ONNX engines (onnx extra: `--engine onnxruntime|openvino`, export), so that their tests run.
# Usage: scripts/setup.sh [PYTHON] [VENV]
set -euo pipefail
PYTHON="${1:-python3}"
VENV="${2:-.venv}"
cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# Installs the newest torch/torchvision pip may take (torch 2.13.0 is excluded in pyproject:
# its CPU-only wheel breaks torchvision). Re-running only installs what changed.
"$VENV/bin/python" -m pip install -q -e ".[dev,serve,ray,onnx]" 2> >(grep -v "^WARNING: Location" >&2)
"$VENV/bin/python" -c "import featsvm, torch, torchvision; print(f'featsvm {featsvm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}')"
