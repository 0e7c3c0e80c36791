"""vllm-lens steering vectors as JSON: the wire form of its `SteeringVector` (what a request sends).

vllm-lens has no file format; a steering vector travels as `SteeringVector.model_dump(mode="json")`:
`layer_indices`, `scale`, `norm_match`, `position_indices` and `activations` as base64 of the
zstd-compressed raw array with its numpy dtype and shape. It adds `scale * activations[i]` to the output
of decoder layer `layer_indices[i]`, as steerlens does. Two of its modes are not a constant added per
layer and are refused on reading: `norm_match` (the vector is rescaled to each token's residual norm)
and position-specific (3-D) activations. A file does not record the model's layer count.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerlens.io import write_json
from steerlens.vectors import SteeringVectors, VectorsError

STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "int16": torch.bfloat16}


def write_vllm_lens(vectors: SteeringVectors, path: str | Path) -> Path:
    """Write the JSON a vllm-lens request carries: fp32 activations, scale 1, no norm matching."""
    import zstandard

    vectors.require_layer_output(
        f"{path}: a vllm-lens steering vector", "keep them in steerlens's own safetensors (save_pretrained or .save)"
    )
    array = vectors.values.detach().to(torch.float32).cpu().contiguous().numpy()
    payload = {
        "activations": {
            "data": base64.b64encode(zstandard.ZstdCompressor(level=1).compress(array.tobytes())).decode("ascii"),
            "dtype": "float32",
            "original_dtype": "torch.float32",
            "shape": list(array.shape),
            "compression": "zstd",
        },
        "layer_indices": list(vectors.layers),
        "scale": 1.0,
        "norm_match": False,
        "position_indices": None,
    }
    write_json(Path(path), payload)
    return Path(path)


def read_vllm_lens(path: str | Path, num_layers: int | None = None) -> SteeringVectors:
    """Read a vllm-lens `SteeringVector` JSON; the scale is folded into the values."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VectorsError(f"{path}: not a readable vllm-lens JSON file ({err})") from err
    if not isinstance(data, dict) or not {"activations", "layer_indices"} <= set(data):
        raise VectorsError(f"{path}: a vllm-lens steering vector needs 'activations' and 'layer_indices'")
    if data.get("norm_match"):
        raise VectorsError(
            f"{path}: norm_match=true rescales the vector to each token's residual norm; that is "
            "not a constant per-layer vector and cannot be converted"
        )
    values = _tensor(data["activations"], path)
    if values.ndim != 2:
        raise VectorsError(
            f"{path}: activations of shape {tuple(values.shape)} are position-specific; only "
            "(layers, hidden) vectors added at every position convert"
        )
    if num_layers is None:
        raise VectorsError(
            f"{path}: a vllm-lens vector does not say how many layers the model has; pass "
            "num_layers (steerlens convert --num-layers N, or --model)"
        )
    scale = float(data.get("scale", 1.0))
    try:
        return SteeringVectors(
            values=values.float() * scale,
            layers=tuple(data["layer_indices"]),
            num_layers=num_layers,
            provenance={"imported_from": str(path), "format": "vllm-lens", "scale": scale},
        )
    except VectorsError as err:
        raise VectorsError(f"{path}: {err}") from err


def _tensor(encoded: Any, path: Path) -> torch.Tensor:
    """Decode vllm-lens's base64 (+ zstd) tensor dict."""
    import zstandard

    try:
        raw = base64.b64decode(encoded["data"])
        if encoded.get("compression") == "zstd":
            raw = zstandard.ZstdDecompressor().decompress(raw)
        stored = STORED_DTYPES[encoded["dtype"]]
        array = np.frombuffer(raw, dtype=np.dtype(encoded["dtype"])).reshape(encoded["shape"]).copy()
    except (KeyError, TypeError, ValueError, zstandard.ZstdError) as err:
        raise VectorsError(f"{path}: activations are not a vllm-lens tensor (float data, dtype, shape): {err}") from err
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if stored is torch.bfloat16 else tensor
