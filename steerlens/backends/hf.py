"""HF transformers backend: a forward hook on each steered decoder layer (or the sub-module its placement
names, `anatomy.placement_module`) adds its vector to the output."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from steerlens.anatomy import add_to_output, decoder_layers, layer_output, model_shape, placement_module
from steerlens.backends.base import Hook, SteeringHandle
from steerlens.vectors import SteeringVectors


class HFSteering(SteeringHandle):
    """Steering on a `transformers` causal LM via forward hooks on its decoder layers."""

    def __init__(self, model: nn.Module, vectors: SteeringVectors, trainable: bool = False) -> None:
        vectors.check_fits(model_shape(model))
        device = next(model.parameters()).device
        super().__init__(vectors, trainable, device)
        self.model = model
        self._handles: list[Any] = []

    def _hook(self, layer: int, module: nn.Module, args: Any, output: Any) -> Any:
        return add_to_output(output, self.vector(layer, layer_output(output)))

    def _hooks(self) -> list[Hook]:
        """`(module path, forward hook)` per steered layer, for `model.get_submodule(path).register_forward_hook`."""
        layers = decoder_layers(self.model)
        paths = {id(module): name for name, module in self.model.named_modules()}
        placement = self.template.placement
        return [
            (paths[id(placement_module(layers[layer], placement))], partial(self._hook, layer)) for layer in self.layers
        ]

    def _install(self) -> None:
        self._handles = [self.model.get_submodule(path).register_forward_hook(fn) for path, fn in self._hooks()]

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attach(model: nn.Module, vectors: SteeringVectors, trainable: bool = False) -> HFSteering:
    """Steer `model` with `vectors` until the handle is removed (also usable as `with attach(...)`)."""
    return HFSteering(model, vectors, trainable).attach()


def freeze(model: nn.Module) -> None:
    """Make every base weight non-trainable, so only steering parameters receive gradients."""
    for param in model.parameters():
        param.requires_grad_(False)
