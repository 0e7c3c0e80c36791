"""HF transformers backend: a forward hook on each steered decoder layer adds its vector."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from steerlens.backends.base import SteeringHandle
from steerlens.anatomy import add_to_output, decoder_layers, model_shape
from steerlens.vectors import SteeringVectors


class HFSteering(SteeringHandle):
    """Steering on a `transformers` causal LM via forward hooks on its decoder layers."""

    def __init__(self, model: nn.Module, vectors: SteeringVectors, trainable: bool = False) -> None:
        vectors.check_fits(model_shape(model))
        device = next(model.parameters()).device
        super().__init__(vectors, trainable, device)
        self.model = model
        self._hooks: list[Any] = []

    def _hook(self, layer: int, module: nn.Module, args: Any, output: Any) -> Any:
        return add_to_output(output, self.vector(layer, output if isinstance(output, torch.Tensor) else output[0]))

    def _install(self) -> None:
        layers = decoder_layers(self.model)
        self._hooks = [layers[layer].register_forward_hook(partial(self._hook, layer)) for layer in self.layers]

    def _remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def attach(model: nn.Module, vectors: SteeringVectors, trainable: bool = False) -> HFSteering:
    """Steer `model` with `vectors` until the handle is detached (also usable as `with attach(...)`)."""
    return HFSteering(model, vectors, trainable).attach()


def freeze(model: nn.Module) -> None:
    """Make every base weight non-trainable, so only steering parameters receive gradients."""
    for param in model.parameters():
        param.requires_grad_(False)
