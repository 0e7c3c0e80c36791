"""`steerlens study patching | first-token | propagation` as functions: how the model responds to the vectors.

Each takes a loaded (unsteered) HF model, its tokenizer, the vectors and chat-formatted prompts, runs the
analysis on greedy completions, and returns its tables and figures as a `StudyResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from steerlens.analysis.first_token import by_position, first_token_effect, generate_greedy, prefix_control
from steerlens.analysis.patching import head_patching, summarize_patching
from steerlens.analysis.propagation import grid, propagation_from_prompts
from steerlens.analysis.results import StudyResult
from steerlens.plots import matrix_heatmap, sweep_line
from steerlens.vectors import SteeringVectors

# The propagation grids drawn, with what each shows (see `steerlens.analysis.propagation`).
PROPAGATION_GRIDS = {
    "cos_vector": "mean_t cos(Δh_j(t), s_j)",
    "mean_cos_vector": "cos(mean_t Δh_j, s_j)",
    "cos_mean": "mean_t cos(Δh_j(t), mean_t Δh_j)",
}


def run_patching(
    model: nn.Module,
    tokenizer: Any,
    vectors: SteeringVectors,
    prompts: Sequence[str],
    layer: int,
    *,
    max_new_tokens: int = 48,
) -> StudyResult:
    """Head patching on layer `layer`+1 with the vector of `layer`, scored on that vector's own greedy completions.

    Tables: `patching_tokens` (every scored token) and `patching` (means per variant).
    """
    single = vectors.select([layer])
    traj = generate_greedy(model, tokenizer, prompts, single, max_new_tokens=max_new_tokens)
    table = head_patching(model, traj.ids, single, layer, attention_mask=traj.attention_mask, score_mask=traj.generated)
    return StudyResult({"patching_tokens": table, "patching": summarize_patching(table)})


def run_first_token(
    model: nn.Module, tokenizer: Any, vectors: SteeringVectors, prompts: Sequence[str], *, max_new_tokens: int = 48
) -> StudyResult:
    """Δp at every generated position (per token, per position, overall) and the first-token prefix control."""
    result = first_token_effect(model, tokenizer, prompts, vectors, max_new_tokens=max_new_tokens)
    positions = by_position(result.positions)
    control = prefix_control(model, tokenizer, prompts, vectors, max_new_tokens=max_new_tokens)
    return StudyResult(
        {
            "first_token_positions": result.positions,
            "first_token_tokens": result.tokens,
            "first_token_overall": result.overall,
            "first_token_by_position": positions,
            "prefix_control": control,
        },
        {"first_token_by_position": sweep_line(positions, "position", "l1", "|Δp| by generated position")},
    )


def run_propagation(
    model: nn.Module, tokenizer: Any, vectors: SteeringVectors, prompts: Sequence[str], *, max_new_tokens: int = 48
) -> StudyResult:
    """Each layer's vector alone: the propagation table and its L x L grids (`PROPAGATION_GRIDS`) as heatmaps."""
    result = propagation_from_prompts(model, tokenizer, prompts, vectors, max_new_tokens=max_new_tokens)
    grids = {metric: grid(result.table, metric, vectors.num_layers) for metric in PROPAGATION_GRIDS}
    return StudyResult(
        {"propagation": result.table, **{f"propagation_{m}": g for m, g in grids.items()}},
        {f"propagation_{m}": matrix_heatmap(grids[m], title, zmid=0.0) for m, title in PROPAGATION_GRIDS.items()},
    )
