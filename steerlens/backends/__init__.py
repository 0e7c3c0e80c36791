"""Steering on every backend through one verb: `steer(model, vectors)` picks the backend by the model's type.

HF `transformers` models (`hf`), TransformerLens `TransformerBridge` (`tlens`) and nnsight models
(`nnsight`) return a `SteeringHandle` (see `base`); a vLLM engine is built steered (`vllm.SteeredLLM`)
and has the same verbs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from steerlens.backends.base import BackendError, SteeringHandle
from steerlens.vectors import SteeringVectors


def steer(model: Any, vectors: SteeringVectors, trainable: bool = False) -> SteeringHandle:
    """Steer `model` with `vectors` until the handle is removed (or its `with` block ends).

    Dispatches on the model's type: a TransformerLens `TransformerBridge`, an nnsight model, or any
    HF `transformers` causal LM. With `trainable=True` the handle's `parameter` receives gradients.
    """
    package = type(model).__module__.split(".", 1)[0]
    if package == "transformer_lens":
        from steerlens.backends import tlens

        return tlens.attach(model, vectors, trainable)
    if package == "nnsight":
        from steerlens.backends import nnsight

        return nnsight.attach(model, vectors, trainable)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        from steerlens.backends import hf

        return hf.attach(model, vectors, trainable)
    raise BackendError(
        f"steer: cannot steer a {type(model).__module__}.{type(model).__name__}; expected an HF transformers "
        "causal LM, a TransformerLens TransformerBridge or an nnsight model (for vLLM build "
        "steerlens.vllm.SteeredLLM(model, vectors))"
    )


__all__ = ["BackendError", "SteeringHandle", "steer"]
