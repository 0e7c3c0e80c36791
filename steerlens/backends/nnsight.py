"""nnsight backend: steering as an nnsight persistent edit, or inside one trace.

Works with any nnsight wrapper of a `transformers` causal LM (`LanguageModel`, `TransformersModel`),
loaded from a local directory without the hub, e.g. `LanguageModel(path, dispatch=True)`.

- `attach(lm, vectors)` (what `steerlens.steer` calls) stores the steering with nnsight's own
  `lm.edit(inplace=True)`, so every later trace, `generate` and plain call of `lm` is steered. The
  edit reads `handle.parameter` at run time, so `update()` takes effect on the next run and gradients
  reach it (`trainable=True`). nnsight 0.8 removes edits only all at once (`lm.clear_edits()`), so
  `remove()` clears every edit stored on `lm`.
- `steer(lm, vectors)` inside a `with lm.trace(...)` block steers that trace only.

The envoy tree mirrors the HF module tree, so the decoder layers, and the sub-module a placement adds
to, are found by `steerlens.anatomy`'s rules on the envoys' names. This module does not shadow the
`nnsight` package (imports are absolute).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from steerlens.anatomy import add_to_output, architecture, layers_path, placement_child
from steerlens.backends.base import Hook, SteeringHandle
from steerlens.vectors import BaseModel, ModelShape, SteeringVectors


def envoy_names(lm: Any) -> list[str]:
    """The module names below the nnsight model `lm` (its envoys' names without the root's)."""
    return [name.split(".", 1)[1] for name, _ in lm.named_modules() if "." in name]


def envoy_layers_path(lm: Any) -> str:
    """The dotted path of the decoder-layer list below the nnsight model `lm`."""
    return layers_path(envoy_names(lm), architecture(lm), type(lm).__name__)


def envoy_paths(lm: Any, vectors: SteeringVectors) -> list[tuple[int, str]]:
    """`(row, envoy path)` of each steered layer's module at the vectors' placement, in forward order."""
    names = envoy_names(lm)
    path = layers_path(names, architecture(lm), type(lm).__name__)
    paths = []
    for row, layer in sorted(enumerate(vectors.layers), key=lambda pair: pair[1]):
        prefix = f"{path}.{layer}."
        children = {name[len(prefix) :] for name in names if name.startswith(prefix) and "." not in name[len(prefix) :]}
        child = placement_child(children, vectors.placement)
        paths.append((row, f"{path}.{layer}" + (f".{child}" if child else "")))
    return paths


def nnsight_model_shape(lm: Any) -> ModelShape:
    """Layer count and width of the model an nnsight wrapper runs, from its envoys and config."""
    config = lm.config
    text_config = getattr(config, "get_text_config", lambda: config)()
    return ModelShape(
        num_layers=len(lm.get(envoy_layers_path(lm))),
        hidden_size=int(text_config.hidden_size),
        name=str(getattr(config, "_name_or_path", "")),
        architecture=architecture(lm),
        base=BaseModel.of_config(config),
    )


def _device(lm: Any) -> torch.device:
    """Where the model's weights are; CPU for a model not dispatched yet (its weights are on "meta")."""
    device = lm.device
    return torch.device("cpu") if device is None or device.type == "meta" else device


def _add(vector: torch.Tensor, output: Any) -> Any:
    return add_to_output(output, vector)


class NNsightSteering(SteeringHandle):
    """Steering on an nnsight model, stored as a persistent edit."""

    def __init__(self, lm: Any, vectors: SteeringVectors, trainable: bool = False) -> None:
        vectors.check_fits(nnsight_model_shape(lm))
        super().__init__(vectors, trainable, _device(lm))
        self.lm = lm
        self.paths = envoy_paths(lm, vectors)

    def _hooks(self) -> list[Hook]:
        """`(envoy path, fn)` per steered layer, in forward order: inside a trace,
        `envoy = lm.get(path); envoy.output = fn(envoy.output)`."""
        return [(path, partial(_add, self.parameter[row])) for row, path in self.paths]

    def _install(self) -> None:
        with self.lm.edit(inplace=True):
            for path, fn in self._hooks():
                envoy = self.lm.get(path)
                envoy.output = fn(envoy.output)

    def _uninstall(self) -> None:
        self.lm.clear_edits()


def attach(lm: Any, vectors: SteeringVectors, trainable: bool = False) -> NNsightSteering:
    """Steer every run of `lm` until the handle is removed (also usable as `with attach(...)`)."""
    return NNsightSteering(lm, vectors, trainable).attach()


def steer(lm: Any, vectors: SteeringVectors) -> None:
    """Add each vector to its decoder layer's output (or its placement's sub-module's) in the enclosing trace.

    Call it inside the `with` block, before reading anything downstream of the first steered layer::

        with lm.trace(tokens):
            steer(lm, vectors)
            logits = lm.output.logits.save()
    """
    vectors.check_fits(nnsight_model_shape(lm))
    values = vectors.values.to(_device(lm))
    for row, path in envoy_paths(lm, vectors):
        envoy = lm.get(path)
        envoy.output = add_to_output(envoy.output, values[row])
