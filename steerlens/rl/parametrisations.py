"""Parametrisations of a steering set: trained parameters mapped to the dense `[k, d]` vectors.

Every variant is an `nn.Module` whose `forward()` returns the dense values, one row per steered layer. The
hooks, the vLLM bank, the formats and the analyses only ever see those values; a parametrisation changes
only what the optimizer trains (`SteeringPolicy` pushes the dense vectors' gradient through the map):

| variant | trained parameters (k steered layers, width d) |
| --- | --- |
| `Dense` | k d: one free vector per layer (the papers') |
| `LowRank` | r (k + d): `A[k x r] @ B[r x d]` |
| `Shared`, trained directions | n (k + d): n directions shared by all layers, n coefficients per layer |
| `Shared`, fixed directions | n k: coefficients on random or logit-lens directions (one direction: k) |

Units: every trained number is in the units of one coordinate of a dense vector (bases and directions have
RMS 1 per coordinate, norm sqrt(d)), so one learning rate moves every variant by comparable amounts. Every
variant starts at the zero vectors, like dense training, with a non-zero first gradient.

`Form` names a variant and its size (a config's `parametrisation`, `rank`, `direction`); `Form.within_budget`
picks one by a parameter count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from steerlens.anatomy import final_norm, unembedding
from steerlens.errors import SteerlensError

Kind = Literal["dense", "low_rank", "shared"]
Direction = Literal["trained", "random", "lens"]


class ParametrisationError(SteerlensError, ValueError):
    """A parametrisation that cannot be built for this model (rank too large, budget too small, ...)."""


class Parametrisation(nn.Module):
    """Trained parameters whose `forward()` is the dense `[rows, width]` steering values."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.rows, self.width = rows, width

    def forward(self) -> torch.Tensor:
        raise NotImplementedError

    def count(self) -> int:
        """How many numbers the optimizer trains."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class Dense(Parametrisation):
    """One free vector per steered layer. `values` may be an existing parameter (the steering handle's), which
    is then trained directly."""

    def __init__(self, rows: int, width: int, values: nn.Parameter | None = None) -> None:
        super().__init__(rows, width)
        self.values = values if values is not None else nn.Parameter(torch.zeros(rows, width))

    def forward(self) -> torch.Tensor:
        return self.values


class LowRank(Parametrisation):
    """The stack of vectors as `coefficients[rows x r] @ basis[r x width]`. The coefficients start at zero (so do
    the vectors); the basis at r random orthogonal rows of RMS 1, so the first gradient `G @ basis.T` is not."""

    def __init__(self, rows: int, width: int, rank: int, generator: torch.Generator) -> None:
        super().__init__(rows, width)
        self.coefficients = nn.Parameter(torch.zeros(rows, rank))
        self.basis = nn.Parameter(random_directions(rank, width, generator))

    def forward(self) -> torch.Tensor:
        return self.coefficients @ self.basis


class Shared(Parametrisation):
    """n directions shared by every steered layer, each layer a coefficient on each: row l is
    `sum_j coefficients[l, j] * u_j`, with u_j the j-th direction rescaled to norm sqrt(width) (so a coefficient
    is the RMS of its layer's component). Directions are trained, or fixed (a buffer: only the coefficients
    train)."""

    def __init__(self, rows: int, width: int, directions: torch.Tensor, trained: bool) -> None:
        super().__init__(rows, width)
        self.coefficients = nn.Parameter(torch.zeros(rows, directions.shape[0]))
        start = directions.detach().float().clone()
        if trained:
            self.directions = nn.Parameter(start)
        else:
            self.register_buffer("directions", start)

    def forward(self) -> torch.Tensor:
        unit = self.directions / self.directions.norm(dim=1, keepdim=True)
        return self.coefficients @ (unit * math.sqrt(self.width))


def random_directions(count: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random orthogonal directions in R^width, each of norm sqrt(width) (RMS 1 per coordinate)."""
    gaussian = torch.randn(width, count, generator=generator)
    orthonormal, _ = torch.linalg.qr(gaussian)
    return orthonormal.T.contiguous() * math.sqrt(width)


def lens_direction(model: nn.Module, tokenizer: Any, token: str) -> torch.Tensor:
    """`[1, d]`: the direction that raises `token`'s logit most through the final norm's gain (its unembedding
    row times the gain, where the norm has one)."""
    ids = list(tokenizer(token, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        raise ParametrisationError(f"lens_token {token!r} is {len(ids)} tokens {ids}; give one token")
    row = unembedding(model)[ids[0]].float()
    gain = getattr(final_norm(model), "weight", None)
    return (row * gain.detach().float() if gain is not None else row)[None].cpu()


@dataclass(frozen=True)
class Form:
    """Which parametrisation trains a steering set of `rows` layers of width `width`, and its size.

    `rank`: the rank r of `low_rank`, the number of directions n of `shared` (1 with lens directions).
    `direction`: `shared`'s directions: trained (from random), fixed random, or the fixed logit-lens direction
    of `lens_token`. `budget`: when set, `resolve` replaces the form by `Form.within_budget`'s pick. `seed`:
    the seed of random bases and directions.
    """

    kind: Kind = "dense"
    rank: int = 1
    direction: Direction = "trained"
    lens_token: str | None = None
    budget: int | None = None
    seed: int = 0

    def resolve(self, rows: int, width: int) -> Form:
        """The form to build for `rows` x `width`: this one, or the budget's pick (same seed), checked."""
        form = self if self.budget is None else Form.within_budget(rows, width, self.budget, self.seed)
        form.check(rows, width)
        return form

    def count(self, rows: int, width: int) -> int:
        """The number of trained parameters, by formula (the built module's `count()` agrees)."""
        if self.kind == "dense":
            return rows * width
        if self.kind == "low_rank" or self.direction == "trained":
            return self.rank * (rows + width)
        return self.rank * rows

    def check(self, rows: int, width: int) -> None:
        """One line saying why this form cannot be built for `rows` x `width`, raised; None when it can."""
        most = width if self.kind == "shared" and self.direction != "trained" else min(rows, width)
        if self.kind != "dense" and not 1 <= self.rank <= most:
            what = "rank" if self.kind == "low_rank" else "the number of directions (rank)"
            raise ParametrisationError(
                f"{self.kind}: {what} {self.rank} must be in [1, {most}] for {rows} steered layers of width {width}"
            )
        if self.kind == "shared" and self.direction == "lens" and (self.rank != 1 or not self.lens_token):
            raise ParametrisationError("shared with direction=lens takes one direction: rank 1 and a lens_token")

    def build(self, rows: int, width: int, lens: torch.Tensor | None = None) -> Parametrisation:
        """The module, at the zero vectors; random bases and directions drawn from `seed`; `lens` is the
        `[1, width]` logit-lens direction (for direction=lens)."""
        self.check(rows, width)
        generator = torch.Generator().manual_seed(self.seed)
        if self.kind == "dense":
            return Dense(rows, width)
        if self.kind == "low_rank":
            return LowRank(rows, width, self.rank, generator)
        if self.direction == "lens":
            if lens is None:
                raise ParametrisationError("shared with direction=lens needs the model and tokenizer for its token")
            return Shared(rows, width, lens, trained=False)
        return Shared(rows, width, random_directions(self.rank, width, generator), self.direction == "trained")

    @staticmethod
    def within_budget(rows: int, width: int, budget: int, seed: int = 0) -> Form:
        """The form with the most trained parameters not above `budget`, among a ladder: one fixed random
        direction (`rows` parameters), low rank r = 1, 2, ... while below dense (r (rows + width)), dense
        (rows x width)."""
        ladder = [Form("shared", 1, "random", seed=seed), Form("dense", seed=seed)]
        ladder += [
            Form("low_rank", r, seed=seed) for r in range(1, min(rows, width) + 1) if r * (rows + width) < rows * width
        ]
        fits = [form for form in ladder if form.count(rows, width) <= budget]
        if not fits:
            raise ParametrisationError(
                f"param_budget {budget} is below {rows}, the smallest variant's parameters "
                f"(one scalar per steered layer on one fixed direction)"
            )
        return max(fits, key=lambda form: form.count(rows, width))

    def describe(self) -> str:
        """A short name: `dense`, `low_rank(r=2)`, `shared(n=1, random)`."""
        if self.kind == "dense":
            return "dense"
        if self.kind == "low_rank":
            return f"low_rank(r={self.rank})"
        return f"shared(n={self.rank}, {self.direction})"
