"""Vectors as the objects of two other steering libraries: repeng's `ControlVector` and
steering-vectors' `SteeringVector`.

Both add layer k's vector to the output of decoder block k, as steerlens does, so layer numbers carry
over unchanged (repeng wraps `model.layers[k]`; steering-vectors hooks the `decoder_block` module k).
steering-vectors also adds inside the block, at the output of its attention, MLP or either's input
norm: those layer types carry steerlens's other placements (`LAYER_TYPES`); repeng has no such place.
Neither object knows the model's layer count, so reading one needs `num_layers`. Files: repeng saves
and loads a llama.cpp control vector (see `steerlens.formats.llama_cpp`); steering-vectors has no file
format of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from steerlens.vectors import SteeringVectors, VectorsError

# steering-vectors' layer type for each placement: it adds to the output of the module of that name (in Llama- and
# Qwen-style layers; Gemma 2 and 3 feed their MLP from pre_feedforward_layernorm, which it has no type for).
LAYER_TYPES = {
    "layer_output": "decoder_block",
    "attn_input": "input_layernorm",
    "attn_output": "self_attn",
    "mlp_input": "post_attention_layernorm",
    "mlp_output": "mlp",
}


def to_repeng(vectors: SteeringVectors, model_type: str = "") -> Any:
    """A `repeng.ControlVector` with one fp32 direction per steered layer."""
    vectors.require_layer_output(
        "a repeng ControlVector", "keep them in steerlens's own safetensors (save_pretrained or .save)"
    )
    from repeng import ControlVector

    directions = {layer: row.detach().float().cpu().numpy() for layer, row in zip(vectors.layers, vectors.values)}
    return ControlVector(model_type=model_type or vectors.architecture, directions=directions)


def from_repeng(control: Any, num_layers: int, model: str = "") -> SteeringVectors:
    """Steering vectors from a `repeng.ControlVector` for a model with `num_layers` decoder layers."""
    rows = {int(layer): torch.as_tensor(np.asarray(d, dtype=np.float32)) for layer, d in control.directions.items()}
    return _from_rows(rows, num_layers, model, {"format": "repeng", "model_hint": getattr(control, "model_type", "")})


def to_steering_vector(vectors: SteeringVectors) -> Any:
    """A `steering_vectors.SteeringVector` on decoder blocks (its `multiplier` plays steerlens's scale)."""
    if vectors.placement == "mlp_input" and vectors.architecture.startswith(("Gemma2", "Gemma3")):
        raise VectorsError(
            "a SteeringVector's post_attention_layernorm is the norm of the attention's output in Gemma 2 and 3 "
            "layers, not the MLP's input norm: mlp_input vectors of this model do not convert"
        )
    from steering_vectors import SteeringVector

    rows = {layer: row.detach().clone() for layer, row in zip(vectors.layers, vectors.values)}
    return SteeringVector(layer_activations=rows, layer_type=LAYER_TYPES[vectors.placement])


def from_steering_vector(vector: Any, num_layers: int, model: str = "") -> SteeringVectors:
    """Steering vectors from a `steering_vectors.SteeringVector`, at the placement its layer type names."""
    placements = {layer_type: placement for placement, layer_type in LAYER_TYPES.items()}
    if vector.layer_type not in placements:
        raise VectorsError(
            f"a SteeringVector on {vector.layer_type!r} layers has no steerlens placement; "
            f"layer types {', '.join(placements)} convert"
        )
    rows = {int(layer): torch.as_tensor(act).detach().float().cpu() for layer, act in vector.layer_activations.items()}
    vectors = _from_rows(rows, num_layers, model, {"format": "steering-vectors"})
    return replace(vectors, placement=placements[vector.layer_type])


def _from_rows(
    rows: Mapping[int, torch.Tensor], num_layers: int, model: str, provenance: dict[str, Any]
) -> SteeringVectors:
    """Resolve negative layer numbers (both libraries allow them) and build the set."""
    if not rows:
        raise VectorsError("the vector has no layers")
    resolved = {layer + num_layers if layer < 0 else layer: row.reshape(-1) for layer, row in rows.items()}
    layers = sorted(resolved)
    return SteeringVectors(
        values=torch.stack([resolved[layer] for layer in layers]),
        layers=tuple(layers),
        num_layers=num_layers,
        model=model,
        provenance=provenance,
    )
