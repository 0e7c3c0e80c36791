"""Every backend steers the same way: HF hooks, TransformerLens, nnsight and a bias checkpoint.

Each adds the vector at the same place (the residual stream after its layer, or a sub-module's output:
every placement), so in fp32 all give the same logits; the vectors are large enough that steering moves
the logits far beyond the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from nnsight.modeling.transformers import TransformersModel
from transformer_lens.model_bridge import TransformerBridge

from steerlens.anatomy import model_shape, placement_child
from steerlens.backends import hf, tlens
from steerlens.backends import nnsight as nnsight_backend
from steerlens.bias_checkpoint import BIAS_TARGETS, export_checkpoint
from steerlens.errors import ModelError
from steerlens.models import load_model
from steerlens.vectors import PLACEMENTS, SteeringVectors, VectorsError

ATOL = 1e-4
SCALE = 4.0
LAYER_SETS = {"all": None, "subset": (1, 3)}
PROMPT = "Steering vectors, one per layer."
DIR_FIXTURES = {"qwen2": "tiny_qwen_dir", "llama": "tiny_llama_dir"}


@dataclass
class Models:
    """One tiny checkpoint loaded in every library, plus a tokenized prompt."""

    directory: Path
    hf: torch.nn.Module
    bridge: Any
    lm: Any
    ids: torch.Tensor


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def models(request: pytest.FixtureRequest) -> Models:
    directory = request.getfixturevalue(DIR_FIXTURES[request.param])
    model, tokenizer = load_model(directory)
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu", dtype=torch.float32)
    lm = TransformersModel(str(directory), task="text-generation", dispatch=True)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return Models(directory, model, bridge, lm, ids)


def random_vectors(
    models: Models, layers: tuple[int, ...] | None, seed: int = 0, placement: str = "layer_output"
) -> SteeringVectors:
    vectors = SteeringVectors.zeros(model_shape(models.hf), layers, placement=placement)
    vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(seed)) * SCALE
    return vectors


# ---- one runner per backend: logits for `models.ids` steered by `vectors` ------------------------
def hf_logits(models: Models, vectors: SteeringVectors) -> torch.Tensor:
    with hf.attach(models.hf, vectors):
        return models.hf(models.ids).logits


def tlens_logits(models: Models, vectors: SteeringVectors, out_dir: Path) -> torch.Tensor:
    with tlens.attach(models.bridge, vectors):
        return models.bridge(models.ids)


def nnsight_plain_logits(models: Models) -> torch.Tensor:
    with models.lm.trace(models.ids):
        logits = models.lm.output.logits.save()
    return logits


def nnsight_steer_logits(models: Models, vectors: SteeringVectors, out_dir: Path) -> torch.Tensor:
    with models.lm.trace(models.ids):
        nnsight_backend.steer(models.lm, vectors)
        logits = models.lm.output.logits.save()
    return logits


def nnsight_attach_logits(models: Models, vectors: SteeringVectors, out_dir: Path) -> torch.Tensor:
    with nnsight_backend.attach(models.lm, vectors):
        return nnsight_plain_logits(models)


def checkpoint_logits(models: Models, vectors: SteeringVectors, out_dir: Path) -> torch.Tensor:
    model, _ = load_model(export_checkpoint(models.directory, vectors, out_dir))
    return model(models.ids).logits


RUNNERS: dict[str, Callable[[Models, SteeringVectors, Path], torch.Tensor]] = {
    "tlens": tlens_logits,
    "nnsight-steer": nnsight_steer_logits,
    "nnsight-attach": nnsight_attach_logits,
    "bias-checkpoint": checkpoint_logits,
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("layers", LAYER_SETS.values(), ids=LAYER_SETS.keys())
def test_every_backend_gives_the_hf_logits(
    models: Models, layers: tuple[int, ...] | None, placement: str, tmp_path: Path
) -> None:
    vectors = random_vectors(models, layers, placement=placement)
    base = models.hf(models.ids).logits
    reference = hf_logits(models, vectors)
    assert max_diff(reference, base) > 1000 * ATOL, "steering too weak for the comparison to mean anything"
    runners = {name: run for name, run in RUNNERS.items() if name != "bias-checkpoint" or placement in BIAS_TARGETS}
    diffs = {name: max_diff(run(models, vectors, tmp_path / name), reference) for name, run in runners.items()}
    assert all(diff <= ATOL for diff in diffs.values()), diffs


@torch.no_grad()
def test_placements_add_where_they_say(models: Models) -> None:
    """In these pre-norm layers the MLP's output joins the stream last, so mlp_output is layer_output (to fp32
    rounding, ~2e-7); every other placement changes what a later sub-module reads, so it steers differently
    (attn_output only through the MLP of its own layer, which in a tiny random model moves the logits ~2e-3)."""
    logits = {p: hf_logits(models, random_vectors(models, None, placement=p)) for p in PLACEMENTS}
    assert max_diff(logits["mlp_output"], logits["layer_output"]) <= ATOL / 100
    others = ("attn_input", "attn_output", "mlp_input")
    assert all(max_diff(logits[p], logits["layer_output"]) > 10 * ATOL for p in others), others


def test_bias_checkpoint_refuses_a_norm_placement(models: Models, tmp_path: Path) -> None:
    with pytest.raises(VectorsError, match="a bias checkpoint holds vectors at .* not at 'mlp_input'"):
        export_checkpoint(models.directory, random_vectors(models, None, placement="mlp_input"), tmp_path)


@torch.no_grad()
def test_zero_vectors_give_unsteered_logits(models: Models, tmp_path: Path) -> None:
    zeros = SteeringVectors.zeros(model_shape(models.hf))
    base = models.hf(models.ids).logits
    diffs = {name: max_diff(run(models, zeros, tmp_path / name), base) for name, run in RUNNERS.items()}
    assert all(diff <= ATOL for diff in diffs.values()), diffs


@torch.no_grad()
def test_tlens_detach_restores_exactly_and_survives_reset_hooks(models: Models) -> None:
    bridge, ids = models.bridge, models.ids
    base = bridge(ids)
    handle = tlens.attach(bridge, random_vectors(models, (1, 3)))
    steered = bridge(ids)
    bridge.reset_hooks()
    assert torch.equal(bridge(ids), steered)
    handle.remove()
    assert torch.equal(bridge(ids), base)
    assert not any(bridge.hook_dict[tlens.hook_name(layer)].fwd_hooks for layer in range(bridge.cfg.n_layers))


@torch.no_grad()
def test_nnsight_detach_restores_exactly(models: Models) -> None:
    base = nnsight_plain_logits(models)
    handle = nnsight_backend.attach(models.lm, random_vectors(models, None))
    assert max_diff(nnsight_plain_logits(models), base) > 1000 * ATOL
    handle.remove()
    assert torch.equal(nnsight_plain_logits(models), base)


@torch.no_grad()
def test_nnsight_attach_before_dispatch_steers_the_real_model(models: Models) -> None:
    vectors = random_vectors(models, (1, 3))
    lazy = TransformersModel(str(models.directory), task="text-generation")
    with nnsight_backend.attach(lazy, vectors):
        with lazy.trace(models.ids):
            logits = lazy.output.logits.save()
    assert max_diff(logits, hf_logits(models, vectors)) <= ATOL


@torch.no_grad()
def test_tlens_hook_points_run_with_hooks(models: Models) -> None:
    vectors = random_vectors(models, (1, 3))
    handle = tlens.TLensSteering(models.bridge, vectors)
    steered = models.bridge.run_with_hooks(models.ids, fwd_hooks=handle.as_hooks())
    assert max_diff(steered, hf_logits(models, vectors)) <= ATOL
    with handle, pytest.raises(ValueError, match="already steers"):
        handle.as_hooks()


def test_tlens_trainable_gradient_reaches_only_the_parameter(models: Models) -> None:
    bridge, ids = models.bridge, models.ids
    hf.freeze(bridge)
    with tlens.attach(bridge, random_vectors(models, (1, 3)), trainable=True) as handle:
        logits = bridge(ids)
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    assert handle.parameter.grad is not None and handle.parameter.grad.abs().sum() > 0
    assert all(param.grad is None for param in bridge.parameters())


def test_vectors_that_do_not_fit_are_refused(models: Models) -> None:
    wrong = SteeringVectors(torch.zeros(1, 64), (0,), 4)
    with pytest.raises(VectorsError, match="hidden size: vectors have 64, TransformerLens model has 128"):
        tlens.attach(models.bridge, wrong)
    with pytest.raises(VectorsError, match="hidden size: vectors have 64, model has 128"):
        nnsight_backend.attach(models.lm, wrong)
    with pytest.raises(VectorsError, match="hidden size"), models.lm.trace(models.ids):
        nnsight_backend.steer(models.lm, wrong)


@pytest.mark.parametrize(
    "children, found",
    [
        (
            ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
            ("input_layernorm", "post_attention_layernorm"),
        ),
        (("ln_1", "attn", "ln_2", "mlp"), ("ln_1", "ln_2")),  # GPT-2
        (  # Gemma 2/3: post_attention_layernorm norms the attention's output, pre_feedforward_layernorm the MLP's input
            (
                "input_layernorm",
                "self_attn",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "mlp",
                "post_feedforward_layernorm",
            ),
            ("input_layernorm", "pre_feedforward_layernorm"),
        ),  # fmt: skip
        (("self_attn", "post_attention_layernorm", "mlp", "post_feedforward_layernorm"), None),  # OLMo2: norms after
        (("input_layernorm", "self_attn", "mlp", "resid_dropout"), None),  # Phi-2: one norm feeds both
    ],
    ids=["llama", "gpt2", "gemma2", "olmo2", "phi2"],
)
def test_norm_placements_pick_the_norm_that_feeds_only_their_sub_module(
    children: tuple[str, ...], found: tuple[str, str] | None
) -> None:
    if found is not None:
        assert (placement_child(children, "attn_input"), placement_child(children, "mlp_input")) == found
        return
    for placement in ("attn_input", "mlp_input"):
        with pytest.raises(ModelError, match=f"placement '{placement}' needs a norm that feeds only the") as err:
            placement_child(children, placement, "Layer")
        assert "use placement='layer_output'" in str(err.value) and "\n" not in str(err.value)
    assert placement_child(children, "attn_output") == "self_attn"
