"""Effect propagation: how a single-layer vector's change to the residual stream evolves through later layers.

For a vector s_i added after layer i, teacher-force the same tokens steered and unsteered and take
Δh_j(t) = h_j^steered(t) - h_j(t), the difference of layer j's output at position t. Δh_j is 0 for j < i and
exactly s_i at j = i. Per (i, j) over the scored positions t (companion paper's "match effect"):

- `cos_vector`      mean_t cos(Δh_j(t), s_j): does the effect look like the vector trained for layer j?
- `cos_mean`        mean_t cos(Δh_j(t), mean_t Δh_j): is the effect the same direction at every position?
- `mean_cos_vector` cos(mean_t Δh_j, s_j)
- `norm`, `mean_norm`: mean_t |Δh_j(t)| and |mean_t Δh_j|.

`grid(table, metric)` turns a table into the L x L grid (NaN for j < i). Layer outputs come from forward
hooks registered after the steering hooks, so they include the steering (`output_hidden_states` does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from steerlens.analysis.first_token import generate_greedy, steering
from steerlens.anatomy import decoder_layers, layer_output, position_ids
from steerlens.errors import SteerlensError
from steerlens.vectors import SteeringVectors

METRICS = ("cos_vector", "cos_mean", "mean_cos_vector", "norm", "mean_norm")
EPS = 1e-12


class PropagationError(SteerlensError, ValueError):
    """A propagation request does not fit the model or the vectors."""


@torch.no_grad()
def layer_outputs(
    model: nn.Module,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    vectors: SteeringVectors | None = None,
) -> list[torch.Tensor]:
    """Every decoder layer's output `[B, T, d]` as the next layer sees it (steered by `vectors` if given)."""
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    captured: list[torch.Tensor] = []
    with steering(model, vectors):  # attached first, so the capture hooks below see the steering
        hooks = [
            layer.register_forward_hook(lambda m, a, out: captured.append(layer_output(out)))
            for layer in decoder_layers(model)
        ]
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
    return captured


@torch.no_grad()
def hidden_differences(
    model: nn.Module, ids: torch.Tensor, vectors: SteeringVectors, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`[L, B, T, d]` Δh_j = steered - unsteered output of every layer j, teacher-forced on `ids`."""
    base = layer_outputs(model, ids, attention_mask)
    steered = layer_outputs(model, ids, attention_mask, vectors)
    return torch.stack([s - b for s, b in zip(steered, base)])


def _metrics(delta: torch.Tensor, vector: torch.Tensor | None) -> dict[str, float]:
    """The per-(i, j) metrics of one layer's differences `delta` ([N, d], fp32) against its vector s_j."""
    mean = delta.mean(0)
    out = {
        "cos_mean": float(F.cosine_similarity(delta, mean[None], dim=1, eps=EPS).mean()),
        "norm": float(delta.norm(dim=1).mean()),
        "mean_norm": float(mean.norm()),
    }
    if vector is None:
        return {"cos_vector": float("nan"), "mean_cos_vector": float("nan"), **out}
    return {
        "cos_vector": float(F.cosine_similarity(delta, vector[None], dim=1, eps=EPS).mean()),
        "mean_cos_vector": float(F.cosine_similarity(mean, vector, dim=0, eps=EPS)),
        **out,
    }


@dataclass
class PropagationResult:
    """`table`: one row per (source i, target j >= i) with the metrics; `mean_effect[k, j]` is mean_t Δh_j
    for the k-th source (`sources[k]`, zero for j < i), e.g. for a logit lens of the last layer's mean effect."""

    table: pd.DataFrame
    mean_effect: torch.Tensor
    sources: tuple[int, ...]


@torch.no_grad()
def _source_rows(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    score: torch.Tensor,
    single: SteeringVectors,
    reference: SteeringVectors | None,
    base: list[torch.Tensor],
) -> tuple[list[dict], torch.Tensor]:
    """Metrics of one single-layer vector against the unsteered `base` outputs; reduced inside the hooks."""
    source = single.layers[0]
    layers = decoder_layers(model)
    rows: list[dict] = []
    means = torch.zeros(len(layers), base[0].shape[-1])

    def measure(j: int, module: nn.Module, args: Any, out: Any) -> None:
        delta = (layer_output(out) - base[j])[score].float()
        vector = None
        if reference is not None and j in reference.layers:
            vector = reference.values[reference.layers.index(j)].to(delta.device, torch.float32)
        rows.append({"source": source, "target": j, **_metrics(delta, vector)})
        means[j] = delta.mean(0).cpu()

    with steering(model, single):
        hooks = [
            layers[j].register_forward_hook(lambda m, a, out, j=j: measure(j, m, a, out))
            for j in range(source, len(layers))
        ]
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
    return rows, means


def _sources(vectors: SteeringVectors, sources: Sequence[int] | None) -> tuple[int, ...]:
    vectors.require_layer_output("effect propagation (it compares each layer's output with the next layer's vector)")
    chosen = tuple(vectors.layers if sources is None else sources)
    missing = [i for i in chosen if i not in vectors.layers]
    if missing:
        raise PropagationError(f"sources {missing} are not steered by the vectors (they steer {list(vectors.layers)})")
    return chosen


def effect_propagation(
    model: nn.Module,
    ids: torch.Tensor,
    vectors: SteeringVectors,
    *,
    reference: SteeringVectors | None = None,
    sources: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    score_mask: torch.Tensor | None = None,
) -> PropagationResult:
    """Propagation metrics of each single-layer vector in `vectors` (layer i's row alone), on fixed `ids`.

    `reference` supplies the s_j compared against (default: `vectors` itself, e.g. the merged single-layer
    runs); `score_mask` ([B, T] bool) picks the positions averaged over (default: every attended one).
    """
    ids = ids.view(1, -1) if ids.ndim == 1 else ids
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = (torch.ones_like(ids) if attention_mask is None else attention_mask).to(device)
    score = (mask.bool() if score_mask is None else score_mask.bool()).to(device)
    if score.shape != ids.shape:
        raise PropagationError(f"score_mask has shape {tuple(score.shape)}, the ids {tuple(ids.shape)}")
    chosen = _sources(vectors, sources)
    reference = vectors if reference is None else reference
    base = layer_outputs(model, ids, mask)
    results = [_source_rows(model, ids, mask, score, vectors.select([i]), reference, base) for i in chosen]
    return PropagationResult(
        pd.DataFrame([row for rows, _ in results for row in rows]), torch.stack([m for _, m in results]), chosen
    )


def propagation_from_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    vectors: SteeringVectors,
    *,
    max_new_tokens: int = 64,
    reference: SteeringVectors | None = None,
    sources: Sequence[int] | None = None,
) -> PropagationResult:
    """As `effect_propagation`, on each source vector's own greedy completions (generated positions only)."""
    chosen = _sources(vectors, sources)
    reference = vectors if reference is None else reference
    rows, means = [], []
    for i in chosen:
        single = vectors.select([i])
        traj = generate_greedy(model, tokenizer, prompts, single, max_new_tokens)
        base = layer_outputs(model, traj.ids, traj.attention_mask)
        r, m = _source_rows(model, traj.ids, traj.attention_mask, traj.generated, single, reference, base)
        rows += r
        means.append(m)
    return PropagationResult(pd.DataFrame(rows), torch.stack(means), chosen)


def grid(table: pd.DataFrame, metric: str, num_layers: int | None = None) -> pd.DataFrame:
    """`metric` as a source x target grid over all layers (NaN where not measured, e.g. target < source)."""
    if metric not in METRICS:
        raise PropagationError(f"metric must be one of {METRICS}, got {metric!r}")
    layers = range(num_layers if num_layers is not None else int(table[["source", "target"]].max().max()) + 1)
    pivot = table.pivot(index="source", columns="target", values=metric)
    return pivot.reindex(index=pd.Index(layers, name="source"), columns=pd.Index(layers, name="target"))
