"""vLLM plugin: steered variants of vLLM's models, and the worker calls that update them.

vLLM runs `register()` in every process it starts (entry point group `vllm.general_plugins` in
pyproject.toml). It registers, for every architecture in vLLM's `ModelRegistry`, a model class
`Steered<Architecture>` by a lazy "module:Class" string, so registration stays cheap; the class is
built on first access by the module-level `__getattr__`, as a subclass of the class vLLM itself
registers for that architecture (native or its Transformers backend).

A steered model is the stock vLLM model plus one non-persistent buffer `steerlens_steering` of
shape `[L, d]` (zeros: no effect), allocated in `__init__` so it exists before weights load and
before any torch.compile / CUDA-graph capture. The decoder layers are found by
`steerlens.anatomy.decoder_layers`, the rule the HF backends use, on the vLLM model's module names
(vLLM mirrors the checkpoint's module paths), and `d` is the text config's hidden size. Each decoder
layer present on this pipeline rank gets the same tensor and adds its row to the hidden state it
returns, which lands the vector in the residual stream exactly once in both layer styles vLLM has:
a layer returning the full hidden state (the Transformers backend's HF layers), and one returning
`(hidden, residual)` whose sum the next layer's fused norm (or the final norm) forms, so adding to
`hidden` adds to the stream, last layer included. Being a buffer, not a parameter, it is never
expected in a checkpoint nor filled by dummy weight loading. Updates are in-place `copy_`s through
`SteeringWorkerExtension`, so captured graphs see them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from steerlens.anatomy import add_to_output, decoder_layers
from steerlens.errors import ModelError
from steerlens.vectors import VectorsError

PREFIX = "Steered"
BUFFER = "steerlens_steering"
WORKER_EXTENSION = f"{__name__}.SteeringWorkerExtension"

_layer_classes: dict[type, type] = {}


def steered_name(architecture: str) -> str:
    """The registered name of `architecture`'s steered variant."""
    return PREFIX + architecture


def vllm_architectures() -> set[str]:
    """The architectures vLLM's registry serves (its steered variants excluded)."""
    from vllm import ModelRegistry

    return {name for name in ModelRegistry.get_supported_archs() if not name.startswith(PREFIX)}


def register() -> None:
    """Register a steered variant of every architecture vLLM serves (lazily; safe to call more than once)."""
    from vllm import ModelRegistry

    for architecture in vllm_architectures():
        ModelRegistry.register_model(steered_name(architecture), f"{__name__}:{steered_name(architecture)}")


def __getattr__(name: str) -> type[nn.Module]:
    """Build `Steered<Architecture>` on first access (vLLM resolves lazy registrations this way)."""
    architecture = name.removeprefix(PREFIX)
    if not name.startswith(PREFIX) or architecture not in vllm_architectures():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    current_platform.verify_model_arch(architecture)  # the platform check vLLM runs on the name it loads
    cls = _steered_model_class(architecture, ModelRegistry.models[architecture].load_model_cls())
    globals()[name] = cls
    return cls


def _steered_model_class(architecture: str, base: type[nn.Module]) -> type[nn.Module]:
    """`base` whose constructor also installs the steering buffer and steered decoder layers."""

    class Steered(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            install_steering(self, architecture, int(vllm_config.model_config.hf_text_config.hidden_size))

    Steered.__name__ = Steered.__qualname__ = steered_name(architecture)
    Steered.__module__ = __name__
    return Steered


def install_steering(model: nn.Module, architecture: str, hidden_size: int) -> None:
    """Give `model` a zero `[L, d]` steering buffer and make its decoder layers on this rank add their row.

    Runs inside the model's constructor, under vLLM's default device and dtype, so the buffer is
    created where and how the weights are.
    """
    from vllm.model_executor.models.utils import PPMissingLayer

    layers = decoder_layers(model, architecture)
    steering = torch.zeros(len(layers), hidden_size)
    model.register_buffer(BUFFER, steering, persistent=False)
    for index, layer in enumerate(layers):
        if isinstance(layer, PPMissingLayer):  # held by another pipeline-parallel rank
            continue
        layer.__class__ = _steered_layer_class(type(layer))
        layer.register_buffer(BUFFER, steering, persistent=False)
        layer.steerlens_index = index


def _steered_layer_class(base: type) -> type:
    """A subclass of the decoder layer class `base` whose output gets its steering row added.

    Swapping the class of an existing layer keeps its parameter names, so weight loading is unchanged.
    """
    if base not in _layer_classes:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            vector = getattr(self, BUFFER)[self.steerlens_index]
            return add_to_output(base.forward(self, *args, **kwargs), vector)

        _layer_classes[base] = type(f"{PREFIX}{base.__name__}", (base,), {"forward": forward})
    return _layer_classes[base]


def steering_buffer(model: nn.Module) -> torch.Tensor:
    """The `[L, d]` steering buffer of a steered vLLM model."""
    buffer = getattr(model, BUFFER, None)
    if not isinstance(buffer, torch.Tensor):
        raise ModelError(
            f"{type(model).__name__} is not a steerlens-steered model (no {BUFFER} buffer); build the engine "
            "with steerlens.backends.vllm.SteeredLLM"
        )
    return buffer


def to_wire(values: torch.Tensor) -> tuple[bytes, list[int]]:
    """`values` as raw fp32 bytes plus shape: collective_rpc's msgpack carries bytes, not tensors
    (tensors would need VLLM_ALLOW_INSECURE_SERIALIZATION)."""
    values = values.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return values.numpy().tobytes(), list(values.shape)


def from_wire(data: bytes, shape: list[int]) -> torch.Tensor:
    """The fp32 CPU tensor that `to_wire` encoded."""
    return torch.frombuffer(bytearray(data), dtype=torch.float32).view(*shape)


class SteeringWorkerExtension:
    """Methods vLLM mixes into each worker, called with `LLM.collective_rpc("steerlens_...")`."""

    model_runner: Any

    def steerlens_push(self, data: bytes, shape: list[int]) -> None:
        """Copy the `[L, d]` values in `data` (see `to_wire`) into this worker's steering buffer, in place."""
        buffer = steering_buffer(self.model_runner.get_model())
        if list(shape) != list(buffer.shape):
            raise VectorsError(f"steering values of shape {list(shape)} for a buffer of {list(buffer.shape)}")
        buffer.copy_(from_wire(data, shape).to(device=buffer.device, dtype=buffer.dtype))

    def steerlens_pull(self) -> tuple[bytes, list[int]]:
        """This worker's steering buffer, encoded by `to_wire`."""
        return to_wire(steering_buffer(self.model_runner.get_model()))
