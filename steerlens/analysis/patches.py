"""What a head-patching variant is: which parts of the study layer read the steered input and which the clean
one (`Patch`), built from a unit, index, mode and route (`make_patch`); a sweep's variants (`variant_patches`).
`analysis.patching` runs them; the parts are explained there."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from steerlens.errors import SteerlensError

MODES = ("only", "skip")
ROUTES = ("both", "residual", "mlp")
PER_HEAD_UNITS = ("head", "q")
PER_GROUP_UNITS = ("k", "v", "kv")
WHOLE_UNITS = ("all_q", "all_k", "all_v", "attn", "mlp", "layer")
DEFAULT_VARIANTS = ("head", "kv", "all_v", "attn", "mlp", "layer")


class PatchingError(SteerlensError, ValueError):
    """A patching request does not fit the model or is not defined."""


@dataclass(frozen=True)
class Patch:
    """Which parts of the study layer see the steered input (True) and which the clean one (False).

    `head[h]` is None when head h's output is computed from q/k/v, True / False to take it whole from
    the steered / clean run.
    """

    q: tuple[bool, ...]
    k: tuple[bool, ...]
    v: tuple[bool, ...]
    head: tuple[bool | None, ...]
    mlp: bool
    residual: bool
    route: str = "both"

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise PatchingError(f"route must be one of {ROUTES}, got {self.route!r}")
        if len(self.q) != len(self.head):
            raise PatchingError(f"{len(self.q)} query entries for {len(self.head)} heads; they must match")
        if len(self.k) != len(self.v) or len(self.q) % max(len(self.k), 1):
            raise PatchingError(f"{len(self.k)} key / {len(self.v)} value groups do not fit {len(self.q)} heads")

    @classmethod
    def uniform(cls, steered: bool, heads: int, groups: int) -> Patch:
        """Every part steered (the steered run) or every part clean (the unsteered run)."""
        return cls((steered,) * heads, (steered,) * groups, (steered,) * groups, (None,) * heads, steered, steered)

    def inverse(self) -> Patch:
        """Every source flipped (head overrides too), the route kept: `p` and `p.inverse()` split the parts."""

        def flip(values: tuple) -> tuple:
            return tuple(None if x is None else not x for x in values)

        return replace(
            self,
            q=flip(self.q),
            k=flip(self.k),
            v=flip(self.v),
            head=flip(self.head),
            mlp=not self.mlp,
            residual=not self.residual,
        )

    @property
    def overrides_heads(self) -> bool:
        return any(h is not None for h in self.head)


def _unit_count(unit: str, heads: int, groups: int) -> int | None:
    """How many indexed parts `unit` has (query heads, or KV groups); None for a whole-layer unit."""
    return heads if unit in PER_HEAD_UNITS else groups if unit in PER_GROUP_UNITS else None


def make_patch(unit: str, index: int | None, mode: str, heads: int, groups: int, route: str = "both") -> Patch:
    """The patch that steers only `unit` (mode "only") or all but `unit` (mode "skip").

    Units: "head", "q" (per query head), "k", "v", "kv" (per KV group), "all_q", "all_k", "all_v",
    "attn" (q, k and v), "mlp", "layer" (everything but the residual: "skip" of it is skip-layer).
    """
    if mode not in MODES:
        raise PatchingError(f"mode must be one of {MODES}, got {mode!r}")
    count = _unit_count(unit, heads, groups)
    if unit not in PER_HEAD_UNITS + PER_GROUP_UNITS + WHOLE_UNITS:
        raise PatchingError(f"unknown unit {unit!r}; use one of {PER_HEAD_UNITS + PER_GROUP_UNITS + WHOLE_UNITS}")
    if count is not None and (index is None or not 0 <= index < count):
        raise PatchingError(f"unit {unit!r} needs an index in 0..{count - 1}, got {index}")
    part = mode == "only"
    base = Patch.uniform(not part, heads, groups)

    def at(values: tuple, value: Any) -> tuple:
        return tuple(value if i == index else x for i, x in enumerate(values))

    changes: dict[str, Any] = {
        "head": {"head": at(base.head, part), "route": route},
        "q": {"q": at(base.q, part)},
        "k": {"k": at(base.k, part)},
        "v": {"v": at(base.v, part)},
        "kv": {"k": at(base.k, part), "v": at(base.v, part)},
        "all_q": {"q": (part,) * heads},
        "all_k": {"k": (part,) * groups},
        "all_v": {"v": (part,) * groups},
        "attn": {"q": (part,) * heads, "k": (part,) * groups, "v": (part,) * groups},
        "mlp": {"mlp": part},
        "layer": {"q": (part,) * heads, "k": (part,) * groups, "v": (part,) * groups, "mlp": part},
    }[unit]
    return replace(base, **changes)


def variant_patches(
    units: Sequence[str], modes: Sequence[str], routes: Sequence[str], heads: int, groups: int
) -> list[tuple[dict[str, Any], Patch]]:
    """Every (unit, index, mode, route) combination as a label dict and its patch; routes apply to "head"."""
    out = []
    for unit in units:
        count = _unit_count(unit, heads, groups)
        indices: list[int | None] = list(range(count)) if count is not None else [None]
        for mode in modes:
            for route in routes if unit == "head" else ("both",):
                for index in indices:
                    label = {"variant": unit, "index": -1 if index is None else index, "mode": mode, "route": route}
                    out.append((label, make_patch(unit, index, mode, heads, groups, route)))
    return out
