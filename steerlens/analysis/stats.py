"""Statistics of a stack of steering vectors: norms, cosines between layers and runs, spectrum.

Cosines involving a zero vector are reported as 0 (the direction is undefined).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations

import pandas as pd
import torch

from steerlens.vectors import SteeringVectors

EPS = 1e-12


def norms(vectors: SteeringVectors) -> pd.DataFrame:
    """L2 norm of each steered layer's vector: columns (layer, norm)."""
    return pd.DataFrame({"layer": list(vectors.layers), "norm": vectors.values.float().norm(dim=1).numpy()})


def layer_cosines(vectors: SteeringVectors) -> pd.DataFrame:
    """Pairwise cosine matrix between the steered layers' vectors (index and columns are layers)."""
    values = vectors.values.float()
    unit = values / values.norm(dim=1, keepdim=True).clamp_min(EPS)
    layers = list(vectors.layers)
    return pd.DataFrame((unit @ unit.T).numpy(), index=pd.Index(layers, name="layer"), columns=layers)


def run_cosines(runs: Mapping[str, SteeringVectors]) -> pd.DataFrame:
    """Per-layer cosine between every pair of runs (e.g. seeds): columns (layer, run_a, run_b, cosine).

    Only layers both runs steer are compared; the runs must fit the same model shape.
    """
    rows = [
        {"layer": layer, "run_a": name_a, "run_b": name_b, "cosine": cosine}
        for (name_a, a), (name_b, b) in combinations(runs.items(), 2)
        for layer, cosine in a.cosine(b).items()
    ]
    return pd.DataFrame(rows, columns=["layer", "run_a", "run_b", "cosine"])


def singular_values(vectors: SteeringVectors) -> pd.DataFrame:
    """Singular values of the `[layers, d]` stack: columns (index, singular_value, cumulative_energy).

    `cumulative_energy` is the share of the squared Frobenius norm held by the first index+1 values.
    """
    sv = torch.linalg.svdvals(vectors.values.double())
    energy = sv.square().cumsum(0) / sv.square().sum().clamp_min(EPS)
    return pd.DataFrame({"index": range(len(sv)), "singular_value": sv.numpy(), "cumulative_energy": energy.numpy()})


def stable_rank(vectors: SteeringVectors) -> float:
    """Stable rank |S|_F^2 / |S|_2^2 of the stack: 1 if all vectors share a direction, up to min(L, d)."""
    sv = torch.linalg.svdvals(vectors.values.double())
    return float(sv.square().sum() / sv[0].square().clamp_min(EPS)) if len(sv) and sv[0] > 0 else 0.0
