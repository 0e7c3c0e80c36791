"""Logit lens of steering vectors: which vocabulary tokens each layer's vector points at.

For a vector s_l and unembedding row u_v the score is the cosine c_l(v) = <s_l, u_v> / (|s_l| |u_v|),
reported with the raw dot product <s_l, u_v>. By default s_l is projected as it is (the companion paper's
choice); with the final norm it is first passed through the model's last normalisation layer, which is
what the residual stream goes through before the unembedding. Every table carries a `projection` column
("raw" or "final_norm") saying which.

All layers are scored with one matrix product per vocabulary chunk, keeping only running top-k /
bottom-k and histogram counts, so a 150k x 5120 unembedding never needs more than one chunk in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from steerlens import anatomy
from steerlens.errors import SteerlensError
from steerlens.vectors import SteeringVectors

RAW = "raw"
FINAL_NORM = "final_norm"
EPS = 1e-12


class LogitLensError(SteerlensError, ValueError):
    """The model or the vectors cannot be projected as asked."""


@dataclass
class LogitLensResult:
    """Top-k / bottom-k tokens per layer and cosine histograms over the whole vocabulary.

    `top` and `bottom` have columns (layer, side, rank, token_id, token, cosine, dot, projection); rank 1 is
    the most aligned token (top) or the most opposed one (bottom). `histogram` has columns
    (layer, bin_left, bin_right, count, projection), trimmed per layer to the bins that hold tokens.
    """

    top: pd.DataFrame
    bottom: pd.DataFrame
    histogram: pd.DataFrame
    projection: str

    def table(self) -> pd.DataFrame:
        """Top and bottom tokens in one table (the `side` column tells them apart)."""
        return pd.concat([self.top, self.bottom], ignore_index=True)


def _rows(vectors: SteeringVectors | torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Layer labels and `[n, d]` values; a bare tensor's rows are labelled 0..n-1."""
    if isinstance(vectors, SteeringVectors):
        vectors.require_layer_output("the logit lens (it reads vectors as residual-stream directions)")
        return list(vectors.layers), vectors.values.detach()
    values = vectors.detach()
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2:
        raise LogitLensError(f"vectors must be [layers, d] or [d], got shape {tuple(values.shape)}")
    return list(range(values.shape[0])), values


def decode_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (`<id N>` without a tokenizer)."""
    if tokenizer is None:
        return [f"<id {i}>" for i in ids]
    return list(tokenizer.batch_decode([[int(i)] for i in ids]))


@torch.no_grad()
def logit_lens(
    vectors: SteeringVectors | torch.Tensor,
    unembed: torch.Tensor,
    tokenizer: Any = None,
    *,
    k: int = 50,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hist_bins: int = 2000,
    chunk_size: int = 8192,
    progress: bool = False,
) -> LogitLensResult:
    """Cosine projection of every vector on every unembedding row: top/bottom `k` tokens and histograms.

    `norm` (e.g. `steerlens.anatomy.final_norm(model)`) is applied to the vectors first; the result is labelled
    `projection="final_norm"` then, else `"raw"`. Histograms use `hist_bins` equal bins over [-1, 1].
    Computation runs on `unembed`'s device in fp32, `chunk_size` vocabulary rows at a time.
    """
    if unembed.ndim != 2:
        raise LogitLensError(f"unembedding must be [vocab, d], got shape {tuple(unembed.shape)}")
    layers, values = _rows(vectors)
    if values.shape[1] != unembed.shape[1]:
        raise LogitLensError(f"vectors have width {values.shape[1]}, the unembedding {unembed.shape[1]}")
    if k < 1 or chunk_size < 1 or hist_bins < 1:
        raise LogitLensError(f"k, chunk_size and hist_bins must be >= 1 (got {k}, {chunk_size}, {hist_bins})")
    projection = RAW if norm is None else FINAL_NORM
    device = unembed.device
    s = values.to(device=device, dtype=torch.float32)
    if norm is not None:
        weight = next(iter(norm.parameters()), None) if isinstance(norm, nn.Module) else None
        like = dict(device=weight.device, dtype=weight.dtype) if weight is not None else {}
        s = norm(s.to(**like)).to(device=device, dtype=torch.float32)
    s_norm = s.norm(dim=1)
    vocab, n = unembed.shape[0], s.shape[0]
    k = min(k, vocab)

    best = {
        side: (torch.empty(n, 0, device=device), torch.empty(n, 0, dtype=torch.long, device=device))
        for side in ("top", "bottom")
    }
    counts = torch.zeros(n * hist_bins, dtype=torch.long, device=device)
    offsets = torch.arange(n, device=device)[:, None] * hist_bins
    ones = torch.ones(n * min(chunk_size, vocab), dtype=torch.long, device=device)
    for start in tqdm(range(0, vocab, chunk_size), desc="logit lens", unit="chunk", disable=not progress):
        u = unembed[start : start + chunk_size].to(torch.float32)
        cos = (s @ u.T).div_((s_norm[:, None] * u.norm(dim=1)[None, :]).clamp_min_(EPS))
        bins = cos.add(1.0).mul_(hist_bins / 2).long().clamp_(0, hist_bins - 1).add_(offsets).view(-1)
        counts.index_add_(0, bins, ones[: bins.numel()])  # much faster than bincount on CPU
        for side, sign in (("top", 1.0), ("bottom", -1.0)):
            kept_vals, kept_ids = best[side]
            vals, ids = (sign * cos).topk(min(k, cos.shape[1]), dim=1)
            vals, ids = torch.cat([kept_vals, vals], 1), torch.cat([kept_ids, ids + start], 1)
            order = vals.topk(min(k, vals.shape[1]), dim=1).indices
            best[side] = (vals.gather(1, order), ids.gather(1, order))

    frames = {
        side: _token_table(layers, s, s_norm, unembed, best[side][1], tokenizer, side, projection) for side in best
    }
    histogram = _histogram_table(layers, counts.view(n, hist_bins).cpu(), projection)
    return LogitLensResult(frames["top"], frames["bottom"], histogram, projection)


def _token_table(
    layers: list[int],
    s: torch.Tensor,
    s_norm: torch.Tensor,
    unembed: torch.Tensor,
    ids: torch.Tensor,
    tokenizer: Any,
    side: str,
    projection: str,
) -> pd.DataFrame:
    """Rows for the chosen ids, with cosine and dot recomputed exactly from the gathered unembedding rows."""
    rows = unembed[ids.flatten()].to(torch.float32).view(*ids.shape, -1)
    dots = torch.einsum("nd,nkd->nk", s, rows)
    cos = dots / (s_norm[:, None] * rows.norm(dim=2)).clamp_min(EPS)
    flat_ids = ids.flatten().tolist()
    k = ids.shape[1]
    return pd.DataFrame(
        {
            "layer": [layer for layer in layers for _ in range(k)],
            "side": side,
            "rank": list(range(1, k + 1)) * len(layers),
            "token_id": flat_ids,
            "token": decode_tokens(tokenizer, flat_ids),
            "cosine": cos.flatten().cpu().numpy(),
            "dot": dots.flatten().cpu().numpy(),
            "projection": projection,
        }
    )


def _histogram_table(layers: list[int], counts: torch.Tensor, projection: str) -> pd.DataFrame:
    """Long-form histogram rows, each layer trimmed to its first..last occupied bin."""
    n_bins = counts.shape[1]
    width = 2.0 / n_bins
    parts = []
    for layer, row in zip(layers, counts):
        occupied = row.nonzero().flatten()
        lo, hi = int(occupied[0]), int(occupied[-1]) + 1
        left = torch.arange(lo, hi, dtype=torch.float64) * width - 1.0
        parts.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "bin_left": left.numpy(),
                    "bin_right": (left + width).numpy(),
                    "count": row[lo:hi].numpy(),
                }
            )
        )
    table = pd.concat(parts, ignore_index=True)
    table["projection"] = projection
    return table


def coarsen_histogram(histogram: pd.DataFrame, max_bins: int = 100) -> pd.DataFrame:
    """Merge adjacent bins so that each layer has at most `max_bins` (for display)."""
    parts = []
    for layer, group in histogram.groupby("layer", sort=True):
        factor = max(1, math.ceil(len(group) / max_bins))
        block = pd.Series(range(len(group)), index=group.index) // factor
        merged = group.groupby(block).agg(
            bin_left=("bin_left", "min"),
            bin_right=("bin_right", "max"),
            count=("count", "sum"),
            projection=("projection", "first"),
        )
        parts.append(merged.assign(layer=layer))
    columns = ["layer", "bin_left", "bin_right", "count", "projection"]
    return pd.concat(parts, ignore_index=True)[columns]


def model_logit_lens(
    model: nn.Module,
    tokenizer: Any,
    vectors: SteeringVectors | torch.Tensor,
    *,
    k: int = 50,
    final_norm: bool = False,
    **kwargs: Any,
) -> LogitLensResult:
    """`logit_lens` against an HF model's lm_head, optionally through its final norm first."""
    norm = anatomy.final_norm(model) if final_norm else None
    return logit_lens(vectors, anatomy.unembedding(model), tokenizer, k=k, norm=norm, **kwargs)
