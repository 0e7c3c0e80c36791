"""The one handle protocol every backend follows.

`steerlens.steer(model, vectors)` (or a backend's `attach`) returns a `SteeringHandle`: the model is
steered until `remove()` is called or a `with` block ends. The same verbs exist on every backend:

- `update(vectors)`: new values in place (same layers), taking effect on the next forward pass;
- `vectors()`: the current values as a `SteeringVectors`;
- `remove()`: the model runs unsteered again (`attach()` puts the steering back);
- `as_hooks()`: `[(name, fn)]` for running the steering as one-off hooks instead (TransformerLens's
  `run_with_hooks` / `run_with_cache`; module paths and forward hooks on HF).

The values live in `handle.parameter` (`[k, d]`, one row per steered layer, fp32). Base weights are
never touched; with `trainable=True` only `handle.parameter` requires grad.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Self

import torch

from steerlens.errors import SteerlensError
from steerlens.vectors import SteeringVectors, VectorsError

Hook = tuple[str, Callable[..., Any]]


class BackendError(SteerlensError, ValueError):
    """A steering request the backend cannot carry out (wrong model type, handle state)."""


class SteeringHandle(ABC):
    """Steering attached to one model; removes itself on `remove()` or on leaving a `with` block.

    >>> import torch, steerlens as sl
    >>> model, tokenizer = sl.load_model("toy-arith")
    >>> ids = tokenizer("What is 2+3?", return_tensors="pt").input_ids
    >>> vectors = sl.SteeringVectors(torch.ones(2, model.config.hidden_size), layers=(0, 1), num_layers=4)
    >>> with sl.steer(model, vectors) as handle:
    ...     steered = model(ids).logits
    >>> bool((steered - model(ids).logits).abs().max() > 0)  # steered inside the block, stock after it
    True
    """

    def __init__(
        self, vectors: SteeringVectors, trainable: bool, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> None:
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
    def update(self, vectors: SteeringVectors | torch.Tensor) -> None:
        """Overwrite the values in place (same layers), keeping the parameter object."""
        if isinstance(vectors, SteeringVectors) and (vectors.layers, vectors.placement) != (
            self.layers,
            self.template.placement,
        ):
            raise VectorsError(
                f"update: vectors steer layers {list(vectors.layers)} at {vectors.placement!r}, the handle steers "
                f"{list(self.layers)} at {self.template.placement!r}; steer again to change either"
            )
        values = vectors.values if isinstance(vectors, SteeringVectors) else vectors
        if tuple(values.shape) != tuple(self.parameter.shape):
            raise VectorsError(
                f"update: values of shape {tuple(values.shape)}, the handle holds {tuple(self.parameter.shape)}"
            )
        self.parameter.copy_(values.to(self.parameter.dtype))

    def as_hooks(self) -> list[Hook]:
        """The steering as one-off `(name, fn)` hooks, for a handle that is not attached.

        An attached handle already steers every run: adding these on top would add each vector twice.
        """
        if self.attached:
            raise BackendError(
                "as_hooks: this handle is attached, so it already steers every run; "
                "call remove() first or run the model without extra hooks"
            )
        return self._hooks()

    @abstractmethod
    def _hooks(self) -> list[Hook]: ...

    @abstractmethod
    def _install(self) -> None: ...

    @abstractmethod
    def _uninstall(self) -> None: ...

    def attach(self) -> Self:
        """Steer the model (again); a no-op when already attached."""
        if not self.attached:
            self._install()
            self.attached = True
        return self

    def remove(self) -> None:
        """Stop steering the model; the values stay in the handle for `attach()` or `vectors()`."""
        if self.attached:
            self._uninstall()
            self.attached = False

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()
