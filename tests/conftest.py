"""Shared fixtures: tiny models built locally once per test session (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlens.tiny import build_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen2 checkpoint (4 layers, hidden 128, byte tokenizer)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama checkpoint (4 layers, hidden 128, byte tokenizer)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", seed=1)


@pytest.fixture(params=["qwen2", "llama"])
def tiny_dir(request: pytest.FixtureRequest, tiny_qwen_dir: Path, tiny_llama_dir: Path) -> Path:
    """Each tiny architecture in turn."""
    return tiny_qwen_dir if request.param == "qwen2" else tiny_llama_dir


@pytest.fixture(scope="session")
def trained_toy_vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steering vectors from a short HF-engine RLOO run on the shipped toy model (~45 s; the training
    tests check the learning itself)."""
    from steerlens.config import build_config
    from steerlens.rl.config import TrainConfig
    from steerlens.rl.job import train

    out = tmp_path_factory.mktemp("toy-run")
    train(
        build_config(
            TrainConfig,
            None,
            [
                "--engine",
                "hf",
                "--steps",
                "16",
                "--prompts-per-step",
                "16",
                "--generations",
                "8",
                "--max-new-tokens",
                "40",
                "--lr",
                "1e-1",
                "--eval-data",
                "null",
                "--no-progress",
                "--out-dir",
                str(out),
            ],
        )
    )
    return out / "vectors.safetensors"
