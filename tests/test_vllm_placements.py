"""Every placement on vLLM: an engine built for a placement adds each set's vectors where the HF hooks do
(log-probs equal to ATOL, default and named sets), refuses sets made for another placement in one line, and
trains: two RLOO steps whose pushes are verified against HF after each step. One tiny Qwen2 engine per
placement (layer_output is `test_vllm_backend`'s)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from steerlens.backends.vllm import SteeredLLM, engine_logprobs, verify_push  # noqa: E402
from steerlens.data.generated import generate  # noqa: E402
from steerlens.models import load_model  # noqa: E402
from steerlens.rl.config import TrainConfig  # noqa: E402
from steerlens.rl.trainer import Trainer  # noqa: E402
from steerlens.rollout import VLLMRollout  # noqa: E402
from steerlens.task import Task  # noqa: E402
from steerlens.vectors import PLACEMENTS, SteeringVectors, VectorsError  # noqa: E402

pytestmark = pytest.mark.vllm

ATOL = 1e-3
INSIDE = [placement for placement in PLACEMENTS if placement != "layer_output"]


def random_vectors(engine: SteeredLLM, seed: int, layers: tuple[int, ...]) -> SteeringVectors:
    """Vectors at the engine's placement, large enough to move the tiny model's log-probs well beyond ATOL."""
    vectors = SteeringVectors.zeros(engine.shape, layers, placement=engine.placement)
    vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(seed))
    return vectors


@pytest.fixture(scope="module")
def hf(tiny_qwen_dir: Path) -> tuple[torch.nn.Module, Any]:
    return load_model(tiny_qwen_dir)


@pytest.fixture(scope="module", params=INSIDE)
def engine(request: pytest.FixtureRequest, tiny_qwen_dir: Path) -> Iterator[SteeredLLM]:
    options = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 512}
    with SteeredLLM(tiny_qwen_dir, placement=request.param, **options) as steering:
        yield steering


def test_sets_at_the_placement_equal_the_hf_hooks(engine: SteeredLLM, hf: tuple) -> None:
    model, tokenizer = hf
    default, named = random_vectors(engine, 1, (0, 1, 2, 3)), random_vectors(engine, 2, (1, 3))
    engine.update(default)
    engine.add("named", named)
    try:
        assert verify_push(engine, model, tokenizer, default, atol=ATOL) <= ATOL
        assert verify_push(engine, model, tokenizer, named, atol=ATOL, name="named") <= ATOL
        prompt = list(tokenizer("Question: 3 + 4 =?\nAnswer:")["input_ids"])
        completion = list(tokenizer(" 7.", add_special_tokens=False)["input_ids"])
        moved = engine_logprobs(engine, prompt, completion) - engine_logprobs(engine, prompt, completion, "base")
        assert float(moved.abs().max()) > 100 * ATOL  # the vectors really steer, so the match means something
        assert engine.vectors("named").placement == engine.placement
    finally:
        engine.remove("named")


def test_sets_for_another_placement_are_refused_in_one_line(engine: SteeredLLM) -> None:
    layer_output = SteeringVectors.zeros(engine.shape)
    with pytest.raises(
        VectorsError,
        match=f"adds at '{engine.placement}', these vectors at 'layer_output'; start another engine with placement="
        "'layer_output'$",
    ) as err:
        engine.add("other", layer_output)
    assert "\n" not in str(err.value) and engine.names() == []


def test_training_at_the_placement_pushes_what_hf_trains(
    engine: SteeredLLM, tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    """Two RLOO steps at the engine's placement, each push verified against the HF model (verify_every=1); the
    trainer keeps its vectors attached to its model, so it gets a model of its own."""
    model, tokenizer = load_model(tiny_qwen_dir)
    task = Task(generate("toy-arith", 8), reward=lambda texts, _: [float(sum(map(ord, t)) % 2) for t in texts])
    cfg = TrainConfig(
        steps=2, prompts_per_step=2, generations=4, max_new_tokens=8, lr=0.1, warmup_ratio=0.0, engine="vllm",
        eval_data=None, progress=False, verify_every=1, verify_atol=ATOL, placement=engine.placement,
        out_dir=str(tmp_path),
    )  # fmt: skip
    summary = Trainer(model, tokenizer, task, cfg, rollout=VLLMRollout(engine, tokenizer)).train()
    trained = SteeringVectors.load(tmp_path / "vectors.safetensors")
    assert trained.placement == engine.placement and trained.values.abs().sum() > 0
    assert summary["steps"] == 2


def test_a_server_serves_one_placement(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    """`steerlens serve` takes the placement of its vector files into the engine's config; files for two
    placements are refused in one line before any server starts."""
    import json

    from steerlens.anatomy import model_shape
    from steerlens.serving import server_command, steering_settings

    model, _ = load_model(tiny_qwen_dir)
    files = {
        placement: SteeringVectors.zeros(model_shape(model), placement=placement).save(
            tmp_path / f"{placement}.safetensors"
        )
        for placement in ("attn_output", "mlp_input")
    }
    settings = steering_settings(str(tiny_qwen_dir), {"a": files["attn_output"]})
    command = server_command(str(tiny_qwen_dir), 8000, steering=settings)
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert settings.placement == overrides["steerlens_placement"] == "attn_output"
    with pytest.raises(
        VectorsError,
        match=r"^the server \(vector set 'b', .*\) adds at 'attn_output', these vectors at 'mlp_input'; "
        "one server serves one placement: start another$",
    ):
        steering_settings(str(tiny_qwen_dir), {"a": files["attn_output"], "b": files["mlp_input"]})
    assert steering_settings(str(tiny_qwen_dir), {}, placement="mlp_input").placement == "mlp_input"


def test_sets_at_two_placements_are_refused_before_an_engine_starts(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    from steerlens.anatomy import model_shape
    from steerlens.evaluation.config import EvalConfig
    from steerlens.evaluation.runner import EvalError, evaluate_sets

    model, _ = load_model(tiny_qwen_dir)
    sets = {p: SteeringVectors.zeros(model_shape(model), placement=p) for p in ("attn_output", "layer_output")}
    cfg = EvalConfig(model=str(tiny_qwen_dir), engine="vllm", out_dir=str(tmp_path), progress=False)
    with pytest.raises(EvalError, match="added at attn_output, layer_output, and one vLLM engine adds every set at"):
        evaluate_sets(cfg, sets)
