"""HF backend: steering adds the vector after the layer, only the vectors train, detaching restores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlens.anatomy import add_to_output, decoder_layers, model_shape
from steerlens.backends import hf
from steerlens.errors import ModelError
from steerlens.models import load_model
from steerlens.vectors import SteeringVectors, VectorsError


@pytest.fixture()
def model_and_ids(tiny_dir: Path):
    model, tokenizer = load_model(tiny_dir)
    ids = tokenizer("Steering vectors, one per layer.", return_tensors="pt").input_ids
    return model, ids


def random_vectors(model, layers=None, scale: float = 1.0, seed: int = 0) -> SteeringVectors:
    vectors = SteeringVectors.zeros(model_shape(model), layers)
    vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(seed)) * scale
    return vectors


def layer_outputs(model, ids) -> list[torch.Tensor]:
    """Each decoder layer's output as the next layer sees it (hooks registered after any steering).

    transformers 5 records `output_hidden_states` before later forward hooks run, so it does not
    show steering; capture the outputs directly instead.
    """
    captured: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, out: captured.append(out if isinstance(out, torch.Tensor) else out[0]))
        for layer in decoder_layers(model)
    ]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def test_zero_vectors_change_nothing(model_and_ids) -> None:
    model, ids = model_and_ids
    base = model(ids).logits
    with hf.attach(model, SteeringVectors.zeros(model_shape(model))):
        assert torch.equal(model(ids).logits, base)


def test_vector_is_added_after_its_layer_only_downstream(model_and_ids) -> None:
    model, ids = model_and_ids
    base = layer_outputs(model, ids)
    vectors = random_vectors(model, layers=[1])
    with hf.attach(model, vectors):
        steered = layer_outputs(model, ids)
    assert torch.equal(steered[0], base[0])
    # After layer 1 the difference is exactly the vector; later layers transform it.
    assert torch.allclose(steered[1] - base[1], vectors.values[0].expand_as(base[1]), atol=1e-5)
    assert not torch.allclose(steered[2], base[2] + vectors.values[0], atol=1e-3)


def test_detach_restores_exactly(model_and_ids) -> None:
    model, ids = model_and_ids
    base = model(ids).logits
    handle = hf.attach(model, random_vectors(model))
    assert not torch.allclose(model(ids).logits, base)
    handle.remove()
    assert torch.equal(model(ids).logits, base)


def test_only_vectors_get_gradients_and_base_is_bit_identical(model_and_ids) -> None:
    model, ids = model_and_ids
    hf.freeze(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = hf.attach(model, random_vectors(model, scale=0.1), trainable=True)
    opt = torch.optim.AdamW([handle.parameter], lr=1e-2)
    start = handle.parameter.detach().clone()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert handle.parameter.grad is not None and handle.parameter.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert not torch.equal(handle.parameter.detach(), start)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    handle.remove()
    current = handle.vectors(step=1)
    assert torch.equal(current.values, handle.parameter.detach()) and current.provenance["step"] == 1


def test_tuple_outputs_are_steered() -> None:
    out = (torch.zeros(1, 2, 3), "cache")
    steered = add_to_output(out, torch.ones(3))
    assert torch.equal(steered[0], torch.ones(1, 2, 3)) and steered[1] == "cache"
    assert torch.equal(add_to_output(torch.zeros(2, 3), torch.ones(3)), torch.ones(2, 3))


def test_misfit_and_unknown_architecture(model_and_ids) -> None:
    model, _ = model_and_ids
    wrong = SteeringVectors(torch.zeros(1, 64), (0,), 4)
    with pytest.raises(VectorsError, match="hidden size: vectors have 64, model has 128"):
        hf.attach(model, wrong)
    with pytest.raises(ModelError, match="register_architecture"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="without config.json"):
        load_model(tmp_path)
