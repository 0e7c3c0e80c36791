"""The one protocol every backend follows.

`attach(model, vectors, trainable=False)` returns a `SteeringHandle`: the steering values live in
`handle.parameter` (`[k, d]`, one row per steered layer, fp32 unless asked otherwise), the model is
steered until `handle.detach()` is called, and the handle is a context manager that detaches itself.
Base weights are never touched; with `trainable=True` only `handle.parameter` requires grad.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any

import torch

from steerlens.vectors import SteeringVectors


class SteeringHandle(ABC):
    """Steering attached to one model; removes itself on `detach()` or on leaving a `with` block."""

    def __init__(self, vectors: SteeringVectors, trainable: bool, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> None:
        self.template = vectors
        self.parameter = torch.nn.Parameter(
            vectors.values.detach().to(device=device, dtype=dtype).clone(), requires_grad=trainable
        )
        self.rows = {layer: i for i, layer in enumerate(vectors.layers)}
        self.attached = False

    @property
    def layers(self) -> tuple[int, ...]:
        return self.template.layers

    def vector(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s vector in the dtype and device of the activation `like`."""
        return self.parameter[self.rows[layer]].to(dtype=like.dtype, device=like.device)

    def vectors(self, **provenance: Any) -> SteeringVectors:
        """The current values as a detached `SteeringVectors` (e.g. after training steps)."""
        values = self.parameter.detach().cpu().clone()
        return replace(self.template, values=values, provenance={**self.template.provenance, **provenance})

    @torch.no_grad()
    def set(self, vectors: SteeringVectors | torch.Tensor) -> None:
        """Overwrite the values in place (same layers), keeping the parameter object."""
        values = vectors.values if isinstance(vectors, SteeringVectors) else vectors
        if isinstance(vectors, SteeringVectors) and vectors.layers != self.layers:
            raise ValueError(f"set: layers {vectors.layers} differ from the attached {self.layers}")
        self.parameter.copy_(values.to(self.parameter.dtype))

    @abstractmethod
    def _install(self) -> None: ...

    @abstractmethod
    def _remove(self) -> None: ...

    def attach(self) -> "SteeringHandle":
        if not self.attached:
            self._install()
            self.attached = True
        return self

    def detach(self) -> None:
        if self.attached:
            self._remove()
            self.attached = False

    def __enter__(self) -> "SteeringHandle":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

