"""The vLLM backend pinned against the HF hooks: one tiny Qwen2 engine for the module, plus one short
Llama engine. Engine log-probabilities must equal HF's (fp32, to ATOL) for zero, random, partial and
re-pushed vectors; bad pushes and stale syncs must fail loudly, and a model the engine refuses in one line."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoConfig, Qwen2Config

pytest.importorskip("vllm")

from steerlens.backends.vllm import (  # noqa: E402
    SteeredArchitecture,
    SteeredLLM,
    SyncError,
    engine_logprobs,
    hf_sequence_logprobs,
    verify_push,
)
from steerlens.backends.vllm_checks import SteeringProbe  # noqa: E402
from steerlens.backends.vllm_plugin import to_wire  # noqa: E402
from steerlens.errors import ModelError, SteeringNotApplied  # noqa: E402
from steerlens.models import load_model  # noqa: E402
from steerlens.tiny import byte_tokenizer  # noqa: E402
from steerlens.vectors import ModelShape, SteeringVectors, VectorsError  # noqa: E402

pytestmark = pytest.mark.vllm

ATOL = 1e-3
ENGINE_ARGS = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 512}


def random_vectors(shape: ModelShape, seed: int, layers: tuple[int, ...] | None = None) -> SteeringVectors:
    """Vectors large enough to move the tiny model's log-probs well beyond ATOL."""
    generator = torch.Generator().manual_seed(seed)
    chosen = layers if layers is not None else tuple(range(shape.num_layers))
    values = torch.randn(len(chosen), shape.hidden_size, generator=generator) * 0.5
    return SteeringVectors(values=values, layers=chosen, num_layers=shape.num_layers)


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def stock_logprobs(model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """Log-probs of the completion from the plain HF model, no hooks at all."""
    logits = model(input_ids=torch.tensor([prompt_ids + completion_ids])).logits[0].float()
    targets = torch.tensor(completion_ids)
    return logits[len(prompt_ids) - 1 : -1].log_softmax(-1).gather(-1, targets[:, None])[:, 0]


@pytest.fixture(scope="module")
def hf(tiny_qwen_dir: Path) -> tuple[torch.nn.Module, Any]:
    return load_model(tiny_qwen_dir)


@pytest.fixture(scope="module")
def initial() -> SteeringVectors:
    """What the module's engine is built with (the constructor's push)."""
    return random_vectors(ModelShape(4, 128), seed=100)


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir: Path, initial: SteeringVectors) -> Iterator[SteeredLLM]:
    with SteeredLLM(tiny_qwen_dir, vectors=initial, **ENGINE_ARGS) as steering:
        yield steering


def test_constructor_pushes_vectors(engine: SteeredLLM, hf: tuple, initial: SteeringVectors) -> None:
    # First in the file (pytest keeps file order): the engine still holds what it was built with.
    assert (engine.shape.num_layers, engine.shape.hidden_size, engine.shape.architecture) == (
        4,
        128,
        "Qwen2ForCausalLM",
    )
    assert torch.equal(engine.vectors().values, initial.dense())
    assert verify_push(engine, *hf, initial, atol=ATOL) <= ATOL


def test_zero_vectors_match_stock_hf(engine: SteeredLLM, hf: tuple) -> None:
    model, tokenizer = hf
    engine.update(SteeringVectors.zeros(engine.shape))
    prompt, completion = ids(tokenizer, "Question: 3 + 4 =?\nAnswer:"), ids(tokenizer, " 7, so \\boxed{7}.")
    diff = (engine_logprobs(engine, prompt, completion) - stock_logprobs(model, prompt, completion)).abs()
    assert float(diff.max()) <= ATOL


def test_pushed_vectors_match_hf_hooks(engine: SteeredLLM, hf: tuple) -> None:
    model, tokenizer = hf
    vectors = random_vectors(engine.shape, seed=1)
    engine.update(vectors)
    assert verify_push(engine, model, tokenizer, vectors, atol=ATOL) <= ATOL
    prompt, completion = ids(tokenizer, "Question: 3 + 4 =?\nAnswer:"), ids(tokenizer, " 7.")
    moved = engine_logprobs(engine, prompt, completion) - stock_logprobs(model, prompt, completion)
    assert float(moved.abs().max()) > 100 * ATOL  # the vectors really steer, so the match above means something


def test_push_twice_updates_in_place(engine: SteeredLLM, hf: tuple) -> None:
    first, second = random_vectors(engine.shape, seed=2), random_vectors(engine.shape, seed=3)
    engine.update(first)
    assert verify_push(engine, *hf, first, atol=ATOL) <= ATOL
    engine.update(second)
    assert torch.equal(engine.vectors().values, second.dense())
    assert verify_push(engine, *hf, second, atol=ATOL) <= ATOL


@pytest.mark.parametrize("layers", [(3,), (0, 2)], ids=["last-layer-only", "layers-0-2"])
def test_partial_layers_match_hf(engine: SteeredLLM, hf: tuple, layers: tuple[int, ...]) -> None:
    # A last-layer-only vector that matched to ATOL was added exactly once, after the final decoder layer.
    vectors = random_vectors(engine.shape, seed=4, layers=layers)
    engine.update(vectors)
    assert torch.equal(engine.vectors().values, vectors.dense())
    assert verify_push(engine, *hf, vectors, atol=ATOL) <= ATOL


def test_wrong_shape_push_raises_and_keeps_values(engine: SteeredLLM) -> None:
    kept = random_vectors(engine.shape, seed=5)
    engine.update(kept)
    with pytest.raises(VectorsError, match="hidden size: vectors have 64, vLLM engine has 128"):
        engine.update(SteeringVectors.zeros(ModelShape(4, 64)))
    with pytest.raises(VectorsError, match="layer count: vectors have 6, vLLM engine has 4"):
        engine.update(SteeringVectors.zeros(ModelShape(6, 128)))
    assert torch.equal(engine.vectors().values, kept.dense())


def test_verify_push_detects_mismatch(engine: SteeredLLM, hf: tuple) -> None:
    pushed, other = random_vectors(engine.shape, seed=6), random_vectors(engine.shape, seed=7)
    engine.update(pushed)
    with pytest.raises(SyncError, match="max \\|Δ log-prob\\|"):
        verify_push(engine, *hf, other, atol=ATOL)


def test_push_clears_prefix_cache(engine: SteeredLLM, hf: tuple) -> None:
    # A prompt longer than a KV block gets cached; its KV was computed under the old vectors.
    from vllm import SamplingParams

    model, tokenizer = hf
    prompt = ids(tokenizer, "The quick brown fox jumps over the lazy dog. " * 8)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, detokenize=False)
    engine.update(random_vectors(engine.shape, seed=8))
    engine.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    vectors = random_vectors(engine.shape, seed=9)
    engine.update(vectors)
    (output,) = engine.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    token = output.outputs[0].token_ids[0]
    expected = hf_sequence_logprobs(model, vectors, prompt, [token])[0]
    assert abs(output.outputs[0].logprobs[0][token].logprob - float(expected)) <= ATOL


def test_engine_runs_v1_and_base_slot_equals_stock_hf(engine: SteeredLLM, hf: tuple) -> None:
    # The V1 pin reached vLLM's config; "base" (slot 0) is the stock model whatever the default set holds.
    model, tokenizer = hf
    assert engine.llm.llm_engine.vllm_config.use_v2_model_runner is False
    engine.update(random_vectors(engine.shape, seed=11))
    prompt, completion = ids(tokenizer, "Question: 3 + 4 =?\nAnswer:"), ids(tokenizer, " 7, so \\boxed{7}.")
    diff = engine_logprobs(engine, prompt, completion, vectors="base") - stock_logprobs(model, prompt, completion)
    assert float(diff.abs().max()) <= ATOL


def test_startup_probe_passes_and_rejects_mixed_up_outputs(engine: SteeredLLM) -> None:
    # The real probe passes (as it did at start, in under a second); the same real outputs with a batch's rows
    # swapped, or with the scale-0 request given the steered one's output, are refused.
    start = time.perf_counter()
    shift = engine.prove_steering()
    assert shift >= 0.01 and time.perf_counter() - start < 1.0
    probe = SteeringProbe.of(engine.llm.llm_engine.vllm_config, engine.bank.probe_slot)
    engine.llm.collective_rpc("steerlens_write", args=(probe.slot, *to_wire(probe.vectors(engine.shape).dense())))
    try:
        outputs = [engine.llm.generate(prompts, params, use_tqdm=False) for prompts, params in probe.calls()]
    finally:
        engine.llm.collective_rpc("steerlens_write", args=(probe.slot, *to_wire(torch.zeros(4, 128))))
    assert probe.judge(outputs) == pytest.approx(shift, abs=1e-4)
    (base, steered, off), *alone = outputs
    for mixed_up in ([steered, base, off], [base, steered, steered]):
        with pytest.raises(SteeringNotApplied, match=r"^steering is misapplied .* differ from its own run by") as info:
            probe.judge([mixed_up, *alone])
        assert "\n" not in str(info.value)


def test_steered_architecture_override() -> None:
    override = SteeredArchitecture({"rms_norm_eps": 1e-5})
    config = override(Qwen2Config(architectures=["Qwen2ForCausalLM"]))
    assert config.architectures == ["SteeredQwen2ForCausalLM"] and config.rms_norm_eps == 1e-5
    assert override(Qwen2Config(architectures=[""])).architectures == [""]  # vLLM's model_type probe
    # Every architecture vLLM serves is steerable (one rule, no list); one it does not know is refused.
    assert override(Qwen2Config(architectures=["GPT2LMHeadModel"])).architectures == ["SteeredGPT2LMHeadModel"]
    with pytest.raises(ModelError, match="vLLM has no model for the architecture GPTNeoForCausalLM"):
        override(Qwen2Config(architectures=["GPTNeoForCausalLM"]))


def test_cli_refuses_an_architecture_vllm_lacks_in_one_line(tmp_path: Path) -> None:
    # GPT-Neo: not in vLLM's registry, and its Transformers backend cannot run it either. vLLM's config
    # validation wraps the refusal in a ~150-line pydantic error; the CLI must print one line, exit 2.
    from typer.testing import CliRunner

    from steerlens.cli import app

    directory = tmp_path / "tiny-gpt-neo"
    config = GPTNeoConfig(
        vocab_size=264,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global"], 2]],
        max_position_embeddings=256,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    result = CliRunner().invoke(
        app,
        ["eval", "--model", str(directory), "--engine", "vllm", "--out-dir", str(tmp_path / "eval"), "--no-progress"],
    )
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: vLLM has no model for the architecture GPTNeoForCausalLM") and "--engine hf" in line


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"max_model_len": 4096}, "User-specified max_model_len"),  # refused by vLLM's config validation
        pytest.param(
            {"kv_cache_memory_bytes": 1024},
            "No available memory for the cache blocks",  # by its engine process: the cause, not vLLM's wrapper
            marks=pytest.mark.slow,
        ),
    ],
    ids=["config", "engine-process"],
)
def test_vllm_refusals_are_one_line(tiny_qwen_dir: Path, settings: dict[str, int], reason: str) -> None:
    with pytest.raises(ModelError, match=rf"^vLLM cannot run \S+ \(Qwen2ForCausalLM\): {reason}") as info:
        SteeredLLM(tiny_qwen_dir, **{**ENGINE_ARGS, **settings})
    assert "\n" not in str(info.value) and "--engine hf" in str(info.value)


def test_max_model_len_reaches_the_engine(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    """`--max-model-len` is passed to vLLM: past the tiny model's context, vLLM's own validation refuses it."""
    from typer.testing import CliRunner

    from steerlens.cli import app

    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_qwen_dir),
            "--engine",
            "vllm",
            "--max-model-len",
            "100000",
            "--out-dir",
            str(tmp_path / "eval"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "User-specified max_model_len (100000)" in line, line


@pytest.mark.slow
def test_llama_engine_matches_hf(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model(tiny_llama_dir)
    with SteeredLLM(tiny_llama_dir, **ENGINE_ARGS) as engine:
        assert engine.shape.architecture == "LlamaForCausalLM"
        assert verify_push(engine, model, tokenizer, SteeringVectors.zeros(engine.shape), atol=ATOL) <= ATOL
        vectors = random_vectors(engine.shape, seed=10)
        engine.update(vectors)
        assert verify_push(engine, model, tokenizer, vectors, atol=ATOL) <= ATOL
