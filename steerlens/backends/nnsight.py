"""nnsight backend: steer one trace from inside it, or every run of the model until detached.

Works with any nnsight wrapper of a `transformers` causal LM (`TransformersModel`, or the deprecated
`LanguageModel`), loaded from a local directory without the hub, e.g.
`TransformersModel(path, task="text-generation", dispatch=True)`. Its envoy tree mirrors the HF
module tree, so decoder layer l is at the same path as in `steerlens.models.LAYER_PATHS`
(`lm.model.layers[l]` for Qwen2 and Llama).

This module's name does not shadow the `nnsight` package: Python 3 imports are absolute, so
`import nnsight` (in this package too) finds the installed package; import this module as
`from steerlens.backends import nnsight as nnsight_backend` to keep both names usable side by side.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from steerlens.backends import hf
from steerlens.anatomy import add_to_output
from steerlens.anatomy import decoder_layers, model_shape
from steerlens.vectors import SteeringVectors


def hf_model(lm: Any) -> nn.Module:
    """The `transformers` model an nnsight wrapper runs (what its envoy tree mirrors)."""
    return lm._module


def layer_envoys(lm: Any) -> Any:
    """The envoy of the model's decoder-layer list, found at the same path as in the HF model."""
    model = hf_model(lm)
    layers = decoder_layers(model)
    path = next(name for name, module in model.named_modules() if module is layers)
    envoy = lm
    for attr in path.split("."):
        envoy = getattr(envoy, attr)
    return envoy


def steer(lm: Any, vectors: SteeringVectors) -> None:
    """Add each vector to its decoder layer's output in the enclosing nnsight trace.

    Call it inside the `with` block, before reading anything downstream of the first steered layer::

        from steerlens.backends import nnsight as nnsight_backend

        with lm.trace(tokens):
            nnsight_backend.steer(lm, vectors)
            logits = lm.output.logits.save()

    Layers are edited in forward order, as nnsight requires. The layer output may be a tensor
    (transformers 5) or a tuple whose first element is the hidden state (older versions).
    """
    vectors.check_fits(model_shape(hf_model(lm)))
    layers = layer_envoys(lm)
    values = vectors.values.to(lm.device)
    for row, layer in sorted(enumerate(vectors.layers), key=lambda pair: pair[1]):
        layers[layer].output = add_to_output(layers[layer].output, values[row])


def attach(lm: Any, vectors: SteeringVectors, trainable: bool = False) -> hf.HFSteering:
    """Steer every trace, generate and plain call of `lm` until the handle is detached.

    HF forward hooks on the wrapped model do the work, so this is the HF backend's handle. A model
    built lazily (`dispatch=False`) gets its real weights loaded first: nnsight swaps the meta model
    for a new one on dispatch, which would silently drop hooks placed on the meta model.
    """
    dispatch = getattr(lm, "dispatch", None)
    if dispatch is not None:
        dispatch()
    return hf.attach(hf_model(lm), vectors, trainable)
