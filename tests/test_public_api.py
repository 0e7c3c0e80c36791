"""steerlens as another project imports it: only `import steerlens as sl` names (and the peer libraries).

One tiny model, one set of vectors, four runtimes: HF transformers, TransformerLens (inside its own
`run_with_cache`), nnsight (inside a trace) and the vLLM engine. Each carries the vector in the
residual stream after its layer, all give the same logits, and the handle verbs are the same on each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import steerlens as sl

ATOL = 1e-4
PROMPT = "Steering vectors, one per layer."
COMPLETION = " They are added after each layer."


@pytest.fixture(scope="module")
def hf_model(tiny_qwen_dir: Path) -> tuple[torch.nn.Module, Any]:
    return sl.load_model(tiny_qwen_dir)


@pytest.fixture(scope="module")
def ids(hf_model: tuple[torch.nn.Module, Any]) -> torch.Tensor:
    return hf_model[1](PROMPT, return_tensors="pt").input_ids


def random_vectors(model: torch.nn.Module, seed: int, layers: tuple[int, ...] | None = None) -> sl.SteeringVectors:
    vectors = sl.SteeringVectors.zeros(sl.model_shape(model), layers)
    vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(seed)) * 4.0
    return vectors


def test_public_names() -> None:
    assert sl.__version__ and "steer" in sl.__all__ and "Trainer" in sl.__all__
    assert all(hasattr(sl, name) for name in sl.__all__)
    assert (Path(sl.__file__).parent / "py.typed").is_file()
    with pytest.raises(sl.SteerlensError, match="cannot steer a builtins.str"):
        sl.steer("not a model", sl.SteeringVectors.zeros(sl.ModelShape(2, 4)))


# ---- each runtime: logits for `ids`, and the layer-0 output as the next layer sees it -------------------
def run_hf(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    captured: list[torch.Tensor] = []
    layer0 = sl.decoder_layers(model)[0]
    hook = layer0.register_forward_hook(lambda m, a, out: captured.append(out if torch.is_tensor(out) else out[0]))
    try:
        logits = model(ids).logits
    finally:
        hook.remove()
    return logits, captured[0]


@pytest.fixture(scope="module")
def runtimes(tiny_qwen_dir: Path, hf_model: tuple[torch.nn.Module, Any]) -> dict[str, tuple[Any, Callable]]:
    """name -> (the model object `sl.steer` takes, a runner returning (logits, layer-0 output))."""
    from nnsight.modeling.transformers import TransformersModel
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(tiny_qwen_dir), device="cpu", dtype=torch.float32)
    lm = TransformersModel(str(tiny_qwen_dir), task="text-generation", dispatch=True)

    def run_tlens(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cache = bridge.run_with_cache(ids)
        return logits, cache["blocks.0.hook_out"]

    def run_nnsight(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with lm.trace(ids):
            out = lm.model.layers[0].output
            hidden = (out if torch.is_tensor(out) else out[0]).save()
            logits = lm.output.logits.save()
        return logits, hidden

    model = hf_model[0]
    return {"hf": (model, lambda ids: run_hf(model, ids)), "tlens": (bridge, run_tlens), "nnsight": (lm, run_nnsight)}


@pytest.mark.parametrize("name", ["hf", "tlens", "nnsight"])
@torch.no_grad()
def test_one_handle_protocol(name: str, runtimes: dict, hf_model: tuple, ids: torch.Tensor) -> None:
    """steer / update / vectors / remove behave alike, and the layer output carries the vector."""
    model, run = runtimes[name]
    first, second = random_vectors(hf_model[0], 1), random_vectors(hf_model[0], 2, layers=None)
    with sl.steer(hf_model[0], first):
        expected = hf_model[0](ids).logits
    base_logits, base_h0 = run(ids)
    assert (base_logits - hf_model[0](ids).logits).abs().max() <= ATOL  # the unsteered runtimes agree

    with sl.steer(model, first) as handle:
        assert isinstance(handle, sl.SteeringHandle)
        logits, h0 = run(ids)
        assert torch.allclose(h0 - base_h0, first.values[0].expand_as(h0), atol=ATOL)
        assert (logits - expected).abs().max() <= ATOL  # the same logits as HF hooks
        assert (logits - base_logits).abs().max() > 100 * ATOL

        handle.update(second)
        assert torch.equal(handle.vectors().values, second.values)
        _, h0 = run(ids)
        assert torch.allclose(h0 - base_h0, second.values[0].expand_as(h0), atol=ATOL)
        with pytest.raises(sl.VectorsError, match="layers"):
            handle.update(second.select([0]))
    assert torch.equal(run(ids)[0], base_logits)  # leaving the block removed it


@torch.no_grad()
def test_tlens_as_hooks_in_run_with_cache(runtimes: dict, hf_model: tuple, ids: torch.Tensor) -> None:
    """`as_hooks()` steers one TransformerLens run (here its own `hooks()` context around `run_with_cache`)."""
    bridge, _ = runtimes["tlens"]
    vectors = random_vectors(hf_model[0], 3, layers=(1, 3))
    handle = sl.steer(bridge, vectors)
    handle.remove()
    base_logits, base_cache = bridge.run_with_cache(ids)
    with bridge.hooks(fwd_hooks=handle.as_hooks()):
        logits, cache = bridge.run_with_cache(ids)
    diff = cache["blocks.1.hook_out"] - base_cache["blocks.1.hook_out"]
    assert torch.allclose(diff, vectors.values[0].expand_as(diff), atol=ATOL)
    with sl.steer(hf_model[0], vectors):
        assert (logits - hf_model[0](ids).logits).abs().max() <= ATOL
    assert torch.equal(bridge.run_with_cache(ids)[0], base_logits)
    with handle, pytest.raises(sl.SteerlensError, match="already steers"):
        handle.as_hooks()


@pytest.mark.vllm
def test_vllm_engine_speaks_the_same_verbs(tiny_qwen_dir: Path, hf_model: tuple) -> None:
    pytest.importorskip("vllm")
    model, tokenizer = hf_model
    prompt = list(tokenizer(PROMPT)["input_ids"])
    completion = list(tokenizer(COMPLETION, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([prompt + completion])

    @torch.no_grad()
    def hf_logprobs(vectors: sl.SteeringVectors | None) -> torch.Tensor:
        if vectors is None:
            logits = model(ids).logits
        else:
            with sl.steer(model, vectors):
                logits = model(ids).logits
        logp = logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        return logp.gather(-1, ids[0, len(prompt) :, None])[:, 0]

    first, second = random_vectors(model, 4), random_vectors(model, 5, layers=(0, 2))
    with sl.vllm.SteeredLLM(tiny_qwen_dir, first, kv_cache_memory_bytes=64 << 20, max_model_len=512) as engine:

        def engine_logprobs() -> torch.Tensor:
            return sl.vllm.engine_logprobs(engine, prompt, completion)

        assert (engine_logprobs() - hf_logprobs(first)).abs().max() <= 1e-3
        engine.update(second)
        assert torch.equal(engine.vectors().values, second.dense())
        assert (engine_logprobs() - hf_logprobs(second)).abs().max() <= 1e-3
        engine.remove()
        assert not engine.vectors().values.any()
        assert (engine_logprobs() - hf_logprobs(None)).abs().max() <= 1e-3


def test_trainer_takes_a_model_a_task_and_any_reward(tmp_path: Path) -> None:
    """A steering vector trained for a non-math behaviour, through `sl.Trainer`, raises its reward.

    The reward asks only for the `\\boxed{...}` form (the shipped toy model writes it ~5% of the time),
    whatever the answer: a format reward the math reward would not give.
    """
    model, tokenizer = sl.load_model("toy-arith")
    problems = [sl.Problem(str(i), f"What is {i % 17}+{i % 11}?", str(i % 17 + i % 11)) for i in range(256)]
    calls: list[int] = []

    def boxed_anything(completions: list[str], batch: list[sl.Problem]) -> list[float]:
        assert len(completions) == len(batch) and all(isinstance(p, sl.Problem) for p in batch)
        calls.append(len(completions))
        return [1.0 if "\\boxed{" in text else 0.0 for text in completions]

    task = sl.Task(problems, reward=boxed_anything, eval_problems=problems[:32])
    cfg = sl.TrainConfig(
        engine="hf",
        steps=16,
        prompts_per_step=16,
        generations=8,
        max_new_tokens=40,
        lr=0.1,
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    summary = sl.Trainer(model, tokenizer, task, cfg).train()
    assert 16 * 8 in calls  # a whole step scored at once
    print(
        "\ncustom reward:",
        {
            k: summary[k]
            for k in ("reward_first_steps", "reward_last_steps", "heldout_accuracy_before", "heldout_accuracy_after")
        },
    )
    assert summary["reward_last_steps"] - summary["reward_first_steps"] >= 0.15, summary
    assert summary["heldout_accuracy_after"] > summary["heldout_accuracy_before"], summary
    assert "formatted_first_steps" not in summary  # only the math reward knows a format
    trained = sl.SteeringVectors.load(tmp_path / "run" / "vectors.safetensors")
    assert trained.values.abs().sum() > 0
