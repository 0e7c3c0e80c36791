"""vLLM plugin: steered variants of vLLM's models, and the worker calls that update them.

vLLM runs `register()` in every process it starts (entry point group `vllm.general_plugins` in
pyproject.toml). It registers, for every architecture in vLLM's `ModelRegistry`, a model class
`Steered<Architecture>` by a lazy "module:Class" string, so registration stays cheap; the class is
built on first access by the module-level `__getattr__`, as a subclass of the class vLLM itself
registers for that architecture (native or its Transformers backend).

A steered model is the stock vLLM model plus two non-persistent buffers, allocated in `__init__` so they
exist before weights load and before any torch.compile / CUDA-graph capture:
- `steerlens_bank`, `[L, S, d]`: S vector sets (slot 0 stays zero: no steering; slot 1 is the engine's
  default set; slots 2.. are named sets, `hf_config.steerlens_vector_sets` of them, see `vector_bank`);
- `steerlens_slots` and `steerlens_scales`, one slot index and one scale per token the engine can run in a
  forward pass.
Each decoder layer on this pipeline rank adds `scales[t] * bank[layer, slots[t]]` to the hidden state of token t
it returns (a gather and one fused multiply-add), which lands the vector in the residual stream exactly once in
both layer styles vLLM has: a layer returning the full hidden state (the Transformers backend's HF layers), and
one returning `(hidden, residual)` whose sum the next layer's fused norm (or the final norm) forms, so adding to
`hidden` adds to the stream, last layer included. An engine built for another placement (`hf_config.
steerlens_placement`) adds the same way to the output of the layer's sub-module instead: the attention or MLP
(a tensor), or the norm before either (the normed tensor, or the first of vLLM's fused `(normed, residual)`).
The decoder layers and their sub-modules are found by `steerlens.anatomy`'s rules, the ones the HF backends
use, on the vLLM model's module names.

The slot buffer is filled outside the model: `SteeringWorkerExtension.steerlens_install` wraps the model runner
(V1's or V2's, `vllm_runners`) so that, once the scheduled batch is laid out, each token gets the slot and scale of
its own request (`SamplingParams.extra_args["steerlens_slot"]` and `["steerlens_scale"]`; default slot 1, scale 1).
Where a configuration makes that impossible the install reports why instead of raising, because an error raised
here reaches the host as a plain `Exception` (its type is lost in `collective_rpc`), and the host raises it.
The forward pass itself runs no Python of ours beyond the add, and compiled or captured graphs stay valid,
because the buffers are only ever written in place. Being buffers, not parameters, they are never expected in a
checkpoint nor filled by dummy weight loading. Values arrive through `SteeringWorkerExtension` as in-place
`copy_`s."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from steerlens.anatomy import decoder_layers, placement_module
from steerlens.backends.vector_bank import DEFAULT_SLOT, bank_slots
from steerlens.backends.vllm_runners import install_slot_fill
from steerlens.errors import ModelError
from steerlens.vectors import LAYER_OUTPUT, VectorsError

PREFIX = "Steered"
BANK = "steerlens_bank"
SLOTS = "steerlens_slots"
SCALES = "steerlens_scales"
VECTOR_SETS = "steerlens_vector_sets"  # the config attribute that sizes the bank (set by SteeredArchitecture)
PLACEMENT = "steerlens_placement"  # the config attribute naming where the model adds its vectors
WORKER_EXTENSION = f"{__name__}.SteeringWorkerExtension"
SKIP_FILL = "STEERLENS_TEST_SKIP_SLOT_FILL"  # "1": install nothing, as on a runner whose batches go unseen (tests)

_steered_classes: dict[type, type] = {}


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
            install_steering(self, architecture, vllm_config)

    Steered.__name__ = Steered.__qualname__ = steered_name(architecture)
    Steered.__module__ = __name__
    return Steered


def install_steering(model: nn.Module, architecture: str, vllm_config: Any) -> None:
    """Give `model` its zero steering bank and slot buffer, and make its decoder layers on this rank (or their
    sub-modules at the engine's placement) add their rows.

    Runs inside the model's constructor, under vLLM's default device and dtype, so the buffers are
    created where and how the weights are.
    """
    from vllm.model_executor.models.utils import PPMissingLayer

    layers = decoder_layers(model, architecture)
    text_config = vllm_config.model_config.hf_text_config
    hf_config = vllm_config.model_config.hf_config
    named = int(getattr(hf_config, VECTOR_SETS, 0) or 0)
    placement = str(getattr(hf_config, PLACEMENT, LAYER_OUTPUT) or LAYER_OUTPUT)
    bank = torch.zeros(len(layers), bank_slots(named), int(text_config.hidden_size))
    tokens = max(
        int(vllm_config.scheduler_config.max_num_batched_tokens),
        int(getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", 0) or 0),
    )
    buffers = {BANK: bank, SLOTS: torch.full((tokens,), DEFAULT_SLOT, dtype=torch.long), SCALES: torch.ones(tokens, 1)}
    for name, buffer in buffers.items():
        model.register_buffer(name, buffer, persistent=False)
    for index, layer in enumerate(layers):
        if isinstance(layer, PPMissingLayer):  # held by another pipeline-parallel rank
            continue
        target = placement_module(layer, placement)
        target.__class__ = _steered_class(type(target))
        for name, buffer in buffers.items():
            target.register_buffer(name, buffer, persistent=False)
        target.steerlens_index = index


def _steered_class(base: type) -> type:
    """A subclass of the module class `base` (a decoder layer, or the sub-module a placement names) whose
    output gets each token's steering row added.

    Swapping the class of an existing module keeps its parameter names, so weight loading is unchanged.
    """
    if base not in _steered_classes:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            output = base.forward(self, *args, **kwargs)
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            tokens = hidden.shape[-2]
            rows = nn.functional.embedding(getattr(self, SLOTS)[:tokens], getattr(self, BANK)[self.steerlens_index])
            steered = torch.addcmul(hidden, getattr(self, SCALES)[:tokens], rows)
            return steered if isinstance(output, torch.Tensor) else (steered, *output[1:])

        _steered_classes[base] = type(f"{PREFIX}{base.__name__}", (base,), {"forward": forward})
    return _steered_classes[base]


def steering_buffers(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `[L, S, d]` steering bank and the per-token slot and scale buffers of a steered vLLM model."""
    bank, slots, scales = (getattr(model, name, None) for name in (BANK, SLOTS, SCALES))
    if not all(isinstance(buffer, torch.Tensor) for buffer in (bank, slots, scales)):
        raise ModelError(
            f"{type(model).__name__} is not a steerlens-steered model (no {BANK} buffer); build the engine "
            "with steerlens.backends.vllm.SteeredLLM"
        )
    return bank, slots, scales  # type: ignore[return-value]


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

    def steerlens_install(self) -> str | None:
        """Make this worker fill the slot buffers before every forward pass (idempotent; `vllm_runners`).
        Returns None, or why this runner's batches cannot be steered: the host raises it."""
        runner = self.model_runner
        bank, slots, scales = steering_buffers(runner.get_model())
        if os.environ.get(SKIP_FILL) == "1":
            return None
        return install_slot_fill(runner, int(bank.shape[1]), slots, scales)

    def steerlens_write(self, slot: int, data: bytes, shape: list[int]) -> None:
        """Copy the `[L, d]` values in `data` (see `to_wire`) into bank slot `slot` of this worker, in place."""
        bank, _, _ = steering_buffers(self.model_runner.get_model())
        if list(shape) != [bank.shape[0], bank.shape[2]] or not 0 < slot < bank.shape[1]:
            raise VectorsError(
                f"steering values of shape {list(shape)} for slot {slot} of a bank of "
                f"{list(bank.shape)} (layers, slots, hidden size); slot 0 is never written"
            )
        bank[:, slot].copy_(from_wire(data, shape).to(device=bank.device, dtype=bank.dtype))

    def steerlens_read(self, slot: int) -> tuple[bytes, list[int]]:
        """Bank slot `slot` of this worker, encoded by `to_wire`."""
        bank, _, _ = steering_buffers(self.model_runner.get_model())
        return to_wire(bank[:, slot])
