"""SteeringVectors: one d-dimensional vector per steered layer, plus what they belong to.

A set holds a `[k, d]` tensor for `k` of the model's `L` layers (all of them, one, or any subset),
saved as safetensors with the metadata in the header so a file says which model it fits and how it
was made. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steerlens.errors import SteerlensError
from steerlens.io import atomic_path

TENSOR_KEY = "steering"
FORMAT = "steerlens.vectors/1"


class VectorsError(SteerlensError, ValueError):
    """A vectors file or set does not fit what it is used with."""


def _is_index(value: Any) -> bool:
    """A whole number that is not a bool (JSON and YAML give ints, floats, strings and bools alike)."""
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


@dataclass(frozen=True)
class ModelShape:
    """What a set of vectors must agree with: the model's layer count and hidden size."""

    num_layers: int
    hidden_size: int
    name: str = ""
    architecture: str = ""


@dataclass
class SteeringVectors:
    """Steering vectors for `layers` of a model with `num_layers` layers and width `hidden_size`.

    `values[i]` is added to the residual stream after layer `layers[i]`, at every position.
    """

    values: torch.Tensor
    layers: tuple[int, ...]
    num_layers: int
    model: str = ""
    architecture: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.values, torch.Tensor) or not self.values.is_floating_point():
            kind = self.values.dtype if isinstance(self.values, torch.Tensor) else type(self.values).__name__
            raise VectorsError(f"values must be a floating-point tensor, got {kind}")
        if not isinstance(self.layers, (list, tuple)) or not all(_is_index(layer) for layer in self.layers):
            raise VectorsError(f"layers must be a list of layer indices, got {self.layers!r}")
        if not _is_index(self.num_layers):
            raise VectorsError(f"num_layers must be a whole number, got {self.num_layers!r}")
        self.layers = tuple(int(layer) for layer in self.layers)
        self.num_layers = int(self.num_layers)
        if self.values.ndim != 2:
            raise VectorsError(f"values must be [layers, hidden], got shape {tuple(self.values.shape)}")
        if len(self.layers) != self.values.shape[0]:
            raise VectorsError(f"{len(self.layers)} layer indices for {self.values.shape[0]} vectors; they must match")
        if len(set(self.layers)) != len(self.layers):
            raise VectorsError(f"layer indices repeat: {list(self.layers)}")
        bad = [layer for layer in self.layers if not 0 <= layer < self.num_layers]
        if bad:
            raise VectorsError(f"layer indices {bad} outside the model's 0..{self.num_layers - 1}")
        finite = torch.isfinite(self.values.detach()).all(dim=1)
        if not bool(finite.all()):
            broken = [layer for layer, ok in zip(self.layers, finite.tolist()) if not ok]
            raise VectorsError(
                f"values are not finite (NaN or Inf) at layers {broken}: vectors from a diverged run cannot steer"
            )

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def zeros(
        cls, shape: ModelShape, layers: Iterable[int] | None = None, dtype: torch.dtype = torch.float32
    ) -> SteeringVectors:
        """Zero vectors for `layers` (default: every layer) of a model of `shape`."""
        chosen = tuple(range(shape.num_layers)) if layers is None else tuple(layers)
        return cls(
            values=torch.zeros(len(chosen), shape.hidden_size, dtype=dtype),
            layers=chosen,
            num_layers=shape.num_layers,
            model=shape.name,
            architecture=shape.architecture,
        )

    @classmethod
    def from_dense(cls, dense: torch.Tensor, **meta: Any) -> SteeringVectors:
        """Wrap an `[L, d]` tensor that has one row for every layer."""
        return cls(values=dense, layers=tuple(range(dense.shape[0])), num_layers=dense.shape[0], **meta)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.values.shape[1])

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.num_layers, self.hidden_size, self.model, self.architecture)

    def dense(self) -> torch.Tensor:
        """An `[L, d]` tensor with a zero row for every layer that is not steered."""
        out = torch.zeros(self.num_layers, self.hidden_size, dtype=self.values.dtype)
        out[list(self.layers)] = self.values.detach().cpu()
        return out

    def fingerprint(self) -> str:
        """`sha256:<hex>` of the layers and fp32 values: names vectors that were never saved to a file."""
        digest = hashlib.sha256(json.dumps([list(self.layers), self.num_layers]).encode())
        digest.update(self.values.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
        return f"sha256:{digest.hexdigest()}"

    def norms(self) -> dict[int, float]:
        """L2 norm of each layer's vector."""
        return {layer: float(v.norm()) for layer, v in zip(self.layers, self.values.float())}

    # ---- operations ---------------------------------------------------------------------------
    def select(self, layers: Iterable[int]) -> SteeringVectors:
        """Keep only `layers` (each must be present)."""
        wanted = tuple(layers)
        missing = [layer for layer in wanted if layer not in self.layers]
        if missing:
            raise VectorsError(f"layers {missing} are not in this set (it has {list(self.layers)})")
        rows = [self.layers.index(layer) for layer in wanted]
        return replace(self, values=self.values[rows].clone(), layers=wanted)

    def scale(self, factor: float) -> SteeringVectors:
        """Every vector multiplied by `factor` (the magnitude sweep)."""
        return replace(self, values=self.values * factor, provenance={**self.provenance, "scaled_by": factor})

    @classmethod
    def merge(cls, parts: Sequence[SteeringVectors]) -> SteeringVectors:
        """Stack sets that steer disjoint layers of the same model (e.g. single-layer runs)."""
        if not parts:
            raise VectorsError("merge needs at least one set")
        first = parts[0]
        for other in parts[1:]:
            first.check_fits(other.shape, what="merged set")
        layers = [layer for part in parts for layer in part.layers]
        if len(set(layers)) != len(layers):
            raise VectorsError(f"merged sets steer the same layer twice: {sorted(layers)}")
        order = sorted(range(len(layers)), key=layers.__getitem__)
        values = torch.cat([p.values.to(first.values.dtype) for p in parts])[order]
        sources = [p.provenance for p in parts]
        return replace(first, values=values, layers=tuple(sorted(layers)), provenance={"merged": sources})

    def cosine(self, other: SteeringVectors) -> dict[int, float]:
        """Per-layer cosine similarity with `other` over the layers both steer."""
        self.check_fits(other.shape, what="compared set")
        out = {}
        for layer in self.layers:
            if layer in other.layers:
                a = self.values[self.layers.index(layer)].float()
                b = other.values[other.layers.index(layer)].float()
                out[layer] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        return out

    def check_fits(self, shape: ModelShape, what: str = "model") -> None:
        """Raise a clear error if these vectors cannot steer a model of `shape`."""
        problems = []
        if shape.num_layers != self.num_layers:
            problems.append(f"layer count: vectors have {self.num_layers}, {what} has {shape.num_layers}")
        if shape.hidden_size != self.hidden_size:
            problems.append(f"hidden size: vectors have {self.hidden_size}, {what} has {shape.hidden_size}")
        if problems:
            origin = f" (vectors made for {self.model!r})" if self.model else ""
            raise VectorsError(f"steering vectors do not fit the {what}{origin}: " + "; ".join(problems))

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file atomically; metadata goes in the header."""
        path = Path(path)
        meta = {
            "format": FORMAT,
            "layers": json.dumps(list(self.layers)),
            "num_layers": str(self.num_layers),
            "hidden_size": str(self.hidden_size),
            "model": self.model,
            "architecture": self.architecture,
            "dtype": str(self.values.dtype).removeprefix("torch."),
            "provenance": json.dumps(self.provenance, default=str),
        }
        with atomic_path(path) as tmp:
            save_file({TENSOR_KEY: self.values.detach().cpu().contiguous()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringVectors:
        """Read a file written by `save`, with clear errors for anything else."""
        path = Path(path)
        if not path.is_file():
            raise VectorsError(f"{path}: no such vectors file")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise VectorsError(f"{path}: not a readable safetensors file ({err})") from err
        if meta.get("format") != FORMAT or TENSOR_KEY not in tensors:
            raise VectorsError(
                f"{path}: not a steerlens vectors file (header format={meta.get('format')!r}, "
                f"tensors={sorted(tensors)}); for a checkpoint with down_proj biases use "
                "steerlens.bias_checkpoint.import_vectors"
            )
        fields = {}
        for name in ("layers", "num_layers", "provenance"):
            raw = meta.get(name, "{}" if name == "provenance" else None)
            if raw is None:
                raise VectorsError(f"{path}: header field {name} is missing")
            try:
                fields[name] = json.loads(raw)
            except json.JSONDecodeError as err:
                raise VectorsError(f"{path}: header field {name} is not valid JSON ({raw[:40]!r})") from err
        layers, num_layers, provenance = fields["layers"], fields["num_layers"], fields["provenance"]
        if not isinstance(provenance, dict):
            raise VectorsError(f"{path}: header field provenance must be a JSON object, got {provenance!r}")
        try:
            return cls(
                values=tensors[TENSOR_KEY],
                layers=layers,
                num_layers=num_layers,
                model=meta.get("model", ""),
                architecture=meta.get("architecture", ""),
                provenance=provenance,
            )
        except VectorsError as err:
            raise VectorsError(f"{path}: {err}") from err
