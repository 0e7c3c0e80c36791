"""First-token study: planted tokens are found where they were planted, Δp matches a direct computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlens.analysis.first_token import (
    FirstTokenError,
    by_position,
    delta_p,
    first_token_effect,
    generate_greedy,
    prefix_control,
)
from steerlens.anatomy import model_shape
from steerlens.backends import hf
from steerlens.models import load_model
from steerlens.vectors import SteeringVectors

PROMPTS = ["Hello there", "Steering is fun!"]


@pytest.fixture(scope="module")
def model_tok(tiny_qwen_dir: Path):
    return load_model(tiny_qwen_dir)


def planted(model, token: int, scale: float = 200.0) -> SteeringVectors:
    """A last-layer vector along the unembedding row of `token`: it raises that token's logit everywhere."""
    u = model.get_output_embeddings().weight.detach()[token]
    vectors = SteeringVectors.zeros(model_shape(model), [model_shape(model).num_layers - 1])
    vectors.values = (u / u.norm() * scale)[None]
    return vectors


def test_planted_token_is_boosted_first(model_tok) -> None:
    model, tok = model_tok
    token = tok.convert_tokens_to_ids("Z")
    result = first_token_effect(model, tok, PROMPTS, planted(model, token), max_new_tokens=4)
    first = result.positions[result.positions.position == 0]
    assert len(first) == len(PROMPTS)
    assert (first.boosted_id == token).all() and (first.steered_argmax == token).all()
    assert (first.token_id == token).all()
    assert not (first.base_argmax == token).any() and not first.boosted_is_base_argmax.any()
    assert (result.positions.l1.between(0, 2)).all() and (result.positions.kl >= 0).all()
    assert (result.positions.p_token_steered > result.positions.p_token_base).all()
    top = result.tokens[(result.tokens.position == 0) & (result.tokens["rank"] == 1)]
    assert (top[top.side == "boosted"].token_id == token).all()
    assert result.overall[(result.overall.side == "boosted") & (result.overall["rank"] == 1)].token_id.item() == token
    summary = by_position(result.positions)
    assert summary.position.tolist() == list(range(4)) and summary.l1_share.sum() == pytest.approx(1.0)


def test_delta_p_matches_a_direct_computation(model_tok) -> None:
    model, tok = model_tok
    vectors = planted(model, tok.convert_tokens_to_ids("q"), scale=50.0)
    result = first_token_effect(model, tok, PROMPTS, vectors, max_new_tokens=3)
    traj = result.trajectories
    row = 0
    ids = traj.ids[row][traj.attention_mask[row].bool()][None]  # drop the left padding
    prompt_len = int(traj.attention_mask[row, : traj.prompt_width].sum())
    with torch.no_grad():
        base = model(ids).logits[0].softmax(-1)
        with hf.attach(model, vectors):
            steered = model(ids).logits[0].softmax(-1)
    for position in range(3):
        dp = steered[prompt_len - 1 + position] - base[prompt_len - 1 + position]
        got = result.positions[(result.positions.prompt == row) & (result.positions.position == position)].iloc[0]
        assert got.l1 == pytest.approx(float(dp.abs().sum()), abs=1e-5)
        assert got.boost == pytest.approx(float(dp.max()), abs=1e-6) and got.boosted_id == int(dp.argmax())


def test_boosting_the_base_argmax_is_reported(model_tok) -> None:
    model, tok = model_tok
    base = generate_greedy(model, tok, PROMPTS[:1], None, max_new_tokens=1)
    argmax = int(base.ids[0, base.prompt_width])
    result = first_token_effect(model, tok, PROMPTS[:1], planted(model, argmax, scale=50.0), max_new_tokens=2)
    assert result.positions[result.positions.position == 0].boosted_is_base_argmax.all()


def test_zero_vector_changes_nothing(model_tok) -> None:
    model, tok = model_tok
    zero = SteeringVectors.zeros(model_shape(model))
    result = first_token_effect(model, tok, PROMPTS, zero, max_new_tokens=3, token_positions=0)
    assert (result.positions.l1 == 0).all() and (result.positions.kl == 0).all()
    assert result.tokens.empty


def test_stop_token_ends_the_trajectory(model_tok) -> None:
    model, tok = model_tok
    traj = generate_greedy(model, tok, PROMPTS, planted(model, tok.eos_token_id), max_new_tokens=4)
    assert traj.generated.sum(1).tolist() == [1, 1]
    assert traj.completions(tok) == ["", ""]
    result = delta_p(model, tok, traj, planted(model, tok.eos_token_id))
    assert len(result.positions) == 2


def test_prefix_control_continues_from_the_steered_first_token(model_tok) -> None:
    model, tok = model_tok
    token = tok.convert_tokens_to_ids("Z")
    table = prefix_control(model, tok, PROMPTS, planted(model, token), max_new_tokens=4)
    assert len(table) == len(PROMPTS)
    assert (table.first_token_id == token).all() and (table.base_first_token_id != token).all()
    assert table.prefixed_text.str.startswith("Z").all() and table.steered_text.str.startswith("Z").all()
    assert (table.prefix_prefixed >= 1).all() and (table.prefix_base == 0).all()
    assert (table.agree_prefixed >= table.agree_base).all()
    assert (table.kl_first > 0).all() and table.kl_rest.notna().all()


def test_bad_requests(model_tok) -> None:
    model, tok = model_tok
    with pytest.raises(FirstTokenError, match="max_new_tokens"):
        generate_greedy(model, tok, PROMPTS, None, max_new_tokens=0)
    with pytest.raises(FirstTokenError, match="at least one prompt"):
        generate_greedy(model, tok, [], None)
