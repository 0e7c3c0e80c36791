"""Every decoder family on every backend: a tiny random model per family, steered alike by HF hooks,
TransformerLens, nnsight and the vLLM engine, through the public API only.

For each family, one file of random vectors (every layer, the last included: a vector added twice or
in the wrong place there shows) steers each backend to HF's logits (fp32: 1e-4 among HF,
TransformerLens and nnsight; 1e-3 on the engine's log-probabilities); zero vectors give the
unsteered model; the vectors a backend hands back, saved to a file, steer HF the same way. A family a
library here cannot run is skipped with that library's own first error line; README.md's "Supported
architectures" lists the outcome. Qwen2 and Llama are covered by test_backends_equivalence.py and
test_vllm_backend.py. One small vLLM engine per family (~30 s each on two cores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import steerlens as sl
from steerlens.tiny import build_tiny_model

FAMILIES = ["qwen3", "qwen3_moe", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "gpt_oss"]
ATOL = 1e-4
ENGINE_ATOL = 1e-3
SCALE = 2.0
PROMPT = "Steering vectors, one per layer."
COMPLETION = " They are added after each layer."
ENGINE_ARGS = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 256}

Runner = Callable[[torch.Tensor], torch.Tensor]


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@dataclass
class Family:
    """One family's tiny checkpoint, loaded in HF, and its random vectors file."""

    directory: Path
    hf: torch.nn.Module
    tokenizer: Any
    vectors_file: Path

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    directory = tmp_path_factory.mktemp("architectures") / request.param
    try:
        build_tiny_model(directory, request.param, seed=0)
    except ValueError as err:  # this transformers has no such model type
        pytest.skip(f"transformers: {first_line(err)}")
    model, tokenizer = sl.load_model(directory)
    vectors = sl.SteeringVectors.zeros(sl.model_shape(model))
    vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(0)) * SCALE
    return Family(directory, model, tokenizer, vectors.save(directory.with_suffix(".safetensors")))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---- each library: (the object sl.steer takes, a runner returning logits) -------------------------------
def load_tlens(directory: Path) -> tuple[Any, Runner]:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(str(directory), device="cpu", dtype=torch.float32)
    except ValueError as err:  # TransformerLens has no adapter for the architecture
        pytest.skip(f"TransformerLens: {first_line(err)}")
    return bridge, bridge


def load_nnsight(directory: Path) -> tuple[Any, Runner]:
    from nnsight.modeling.transformers import TransformersModel

    lm = TransformersModel(str(directory), task="text-generation", dispatch=True)

    def run(ids: torch.Tensor) -> torch.Tensor:
        with lm.trace(ids):
            logits = lm.output.logits.save()
        return logits

    return lm, run


LOADERS: dict[str, Callable[[Path], tuple[Any, Runner]]] = {"tlens": load_tlens, "nnsight": load_nnsight}


@pytest.mark.parametrize("backend", LOADERS)
@torch.no_grad()
def test_backend_gives_the_hf_logits(family: Family, backend: str, tmp_path: Path) -> None:
    model, run = LOADERS[backend](family.directory)
    ids = torch.tensor([family.ids(PROMPT)])
    vectors = sl.SteeringVectors.load(family.vectors_file)
    base = family.hf(ids).logits
    with sl.steer(family.hf, vectors):
        expected = family.hf(ids).logits
    assert max_diff(expected, base) > 1000 * ATOL, "steering too weak for the comparison to mean anything"

    assert max_diff(run(ids), base) <= ATOL
    with sl.steer(model, vectors) as handle:
        assert max_diff(run(ids), expected) <= ATOL
        handed_back = handle.vectors().save(tmp_path / "handed-back.safetensors")
    with sl.steer(model, sl.SteeringVectors.zeros(sl.model_shape(family.hf))):
        assert max_diff(run(ids), base) <= ATOL
    with sl.steer(family.hf, sl.SteeringVectors.load(handed_back)):
        assert max_diff(family.hf(ids).logits, expected) <= ATOL


@pytest.mark.vllm
@torch.no_grad()
def test_vllm_gives_the_hf_logprobs(family: Family, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    prompt, completion = family.ids(PROMPT), family.ids(COMPLETION)
    ids = torch.tensor([prompt + completion])

    def hf_logprobs(vectors: sl.SteeringVectors) -> torch.Tensor:
        with sl.steer(family.hf, vectors):
            logits = family.hf(ids).logits[0, len(prompt) - 1 : -1]
        return logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])[:, 0]

    vectors = sl.SteeringVectors.load(family.vectors_file)
    zeros = sl.SteeringVectors.zeros(sl.model_shape(family.hf))
    assert max_diff(hf_logprobs(vectors), hf_logprobs(zeros)) > 100 * ENGINE_ATOL
    try:
        engine = sl.vllm.SteeredLLM(family.directory, vectors, **ENGINE_ARGS)
    except sl.ModelError as err:  # the engine refused the model: vLLM here has no model for it or cannot run it
        pytest.skip(f"vLLM: {first_line(err)}")
    with engine:
        assert max_diff(sl.vllm.engine_logprobs(engine, prompt, completion), hf_logprobs(vectors)) <= ENGINE_ATOL
        handed_back = engine.vectors().save(tmp_path / "engine.safetensors")
        engine.remove()
        assert max_diff(sl.vllm.engine_logprobs(engine, prompt, completion), hf_logprobs(zeros)) <= ENGINE_ATOL
    assert torch.equal(sl.SteeringVectors.load(handed_back).dense(), vectors.dense())
