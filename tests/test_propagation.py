"""Effect propagation: nothing moves before the steered layer, the steered layer moves by exactly s_i."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlens.analysis.propagation import (
    PropagationError,
    effect_propagation,
    grid,
    hidden_differences,
    propagation_from_prompts,
)
from steerlens.anatomy import model_shape
from steerlens.models import load_model
from steerlens.vectors import SteeringVectors


@pytest.fixture(scope="module")
def case(tiny_qwen_dir: Path):
    model, tok = load_model(tiny_qwen_dir)
    enc = tok(["Propagate the effect.", "Layer by layer"], return_tensors="pt", padding=True, padding_side="left")
    vectors = SteeringVectors.zeros(model_shape(model))
    vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(0)) * 2
    return model, tok, enc.input_ids, enc.attention_mask, vectors


def test_last_layer_vector_changes_only_the_last_layer(case) -> None:
    model, _, ids, mask, vectors = case
    delta = hidden_differences(model, ids, vectors.select([3]), mask)
    assert delta.shape[0] == 4
    assert torch.equal(delta[:3], torch.zeros_like(delta[:3]))
    assert torch.allclose(delta[3], vectors.values[3].expand_as(delta[3]), atol=1e-5)


def test_grid_is_masked_below_the_source_and_exact_at_it(case) -> None:
    model, _, ids, mask, vectors = case
    result = effect_propagation(model, ids, vectors, attention_mask=mask)
    assert result.sources == (0, 1, 2, 3)
    assert len(result.table) == 4 + 3 + 2 + 1 and (result.table.target >= result.table.source).all()
    diagonal = result.table[result.table.source == result.table.target]
    for metric in ("cos_vector", "mean_cos_vector", "cos_mean"):
        assert diagonal[metric].to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert diagonal.norm.to_numpy() == pytest.approx(vectors.values.norm(dim=1).numpy(), rel=1e-5)
    cos = grid(result.table, "cos_vector")
    assert cos.shape == (4, 4)
    lower = torch.tril(torch.ones(4, 4, dtype=torch.bool), diagonal=-1).numpy()
    assert cos.isna().to_numpy()[lower].all() and cos.notna().to_numpy()[~lower].all()
    off = result.table[result.table.target > result.table.source]
    assert (off.cos_vector.abs() < 0.99).all() and (off.norm > 0).all()
    assert result.mean_effect.shape == (4, 4, 128)
    assert torch.equal(result.mean_effect[2, :2], torch.zeros(2, 128))
    assert torch.allclose(result.mean_effect[1, 1], vectors.values[1], atol=1e-5)


def test_single_source_against_a_partial_reference(case) -> None:
    model, _, ids, mask, vectors = case
    score = mask.bool().clone()
    score[:, :-2] = False
    reference = vectors.select([2])
    table = effect_propagation(
        model, ids, vectors, reference=reference, sources=[1], attention_mask=mask, score_mask=score
    ).table
    assert table.target.tolist() == [1, 2, 3]
    assert table.set_index("target").cos_vector.isna().tolist() == [True, False, True]
    assert table.cos_mean.notna().all()


def test_propagation_on_generated_tokens(case) -> None:
    model, tok, _, _, vectors = case
    result = propagation_from_prompts(model, tok, ["Hi", "Steer"], vectors, max_new_tokens=3, sources=[0, 3])
    assert result.sources == (0, 3) and len(result.table) == 4 + 1
    assert result.table[result.table.source == result.table.target].cos_vector.to_numpy() == pytest.approx(1.0)


def test_bad_requests(case) -> None:
    model, _, ids, mask, vectors = case
    with pytest.raises(PropagationError, match=r"sources \[1\] are not steered"):
        effect_propagation(model, ids, vectors.select([0]), sources=[1])
    with pytest.raises(PropagationError, match="score_mask has shape"):
        effect_propagation(model, ids, vectors, attention_mask=mask, score_mask=mask[:, :2])
    with pytest.raises(PropagationError, match="metric must be one of"):
        grid(effect_propagation(model, ids, vectors.select([3])).table, "cosine")
