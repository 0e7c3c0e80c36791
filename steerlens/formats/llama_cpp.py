"""llama.cpp control vectors: a GGUF file with architecture `controlvector` and one f32 tensor per layer.

llama.cpp adds `direction.N` to the output of decoder block N (0-based), the same place steerlens adds
layer N's vector, so layer numbers carry over unchanged. It has no slot for block 0: its loader rejects
`direction.0`. A set that steers layer 0 is therefore refused unless the caller explicitly drops that
layer (`drop_layer0=True`), which changes what the vectors do. repeng's `export_gguf` writes the same
layout, so these files are also repeng's. EasySteer reads the same tensors (`direction.N` added after
decoder layer N) and does accept `direction.0`: `write_easysteer` writes every layer.

steerlens adds two keys llama.cpp ignores (`steerlens.num_layers`, `steerlens.model`) so that a file it
wrote reads back exactly; a file from elsewhere does not know the model's layer count, so reading one
needs `num_layers`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from steerlens.io import atomic_path
from steerlens.vectors import SteeringVectors, VectorsError

ARCH = "controlvector"
DIRECTION = re.compile(r"^direction\.(\d+)$")
NUM_LAYERS_KEY = "steerlens.num_layers"
MODEL_KEY = "steerlens.model"


def write_gguf(vectors: SteeringVectors, path: str | Path, *, model_hint: str = "", drop_layer0: bool = False) -> Path:
    """Write `vectors` as a llama.cpp control vector; `model_hint` defaults to the vectors' architecture."""
    path = Path(path)
    layers = list(vectors.layers)
    if 0 in layers:
        if not drop_layer0:
            raise VectorsError(
                f"{path}: these vectors steer layer 0, which a llama.cpp control vector cannot express "
                "(llama.cpp has no direction.0); pass drop_layer0=True (steerlens convert --drop-layer0) to "
                "write the other layers only, which changes the steering"
            )
        layers.remove(0)
    if not layers:
        raise VectorsError(f"{path}: nothing to write: the set steers no layer llama.cpp can express")
    return _write_directions(vectors, path, layers, model_hint)


def write_easysteer(vectors: SteeringVectors, path: str | Path, *, model_hint: str = "") -> Path:
    """Write `vectors` as the GGUF EasySteer's vLLM steering loads: every layer, layer 0 included
    (llama.cpp itself refuses such a file when it has layer 0)."""
    return _write_directions(vectors, Path(path), list(vectors.layers), model_hint)


def _write_directions(vectors: SteeringVectors, path: Path, layers: list[int], model_hint: str) -> Path:
    """One f32 `direction.N` tensor per layer in `layers`, with llama.cpp's and steerlens's keys."""
    import gguf

    vectors.require_layer_output(
        f"{path}: a GGUF control vector", "keep them in steerlens's own safetensors (save_pretrained or .save)"
    )
    hint = model_hint or _model_type(vectors.architecture)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(layers))
        writer.add_uint32(NUM_LAYERS_KEY, vectors.num_layers)
        writer.add_string(MODEL_KEY, vectors.model)
        for layer in layers:
            row = vectors.values[vectors.layers.index(layer)]
            writer.add_tensor(f"direction.{layer}", row.detach().to(torch.float32).cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_gguf(path: str | Path, num_layers: int | None = None) -> SteeringVectors:
    """Read a llama.cpp (or repeng) control vector; `num_layers` is needed unless steerlens wrote it."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise VectorsError(f"{path}: no such control-vector file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise VectorsError(f"{path}: not a readable GGUF file ({err})") from err
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise VectorsError(f"{path}: GGUF architecture is {arch!r}, expected {ARCH!r} (a llama.cpp control vector)")
    rows: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = DIRECTION.match(tensor.name)
        if match is None:
            raise VectorsError(f"{path}: tensor {tensor.name!r} is not named direction.N")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise VectorsError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, llama.cpp needs F32")
        rows[int(match.group(1))] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
    if not rows:
        raise VectorsError(f"{path}: no direction.N tensors")
    recorded = _field(reader, NUM_LAYERS_KEY)
    total = num_layers if num_layers is not None else recorded
    if total is None:
        raise VectorsError(
            f"{path}: the file does not say how many layers the model has (it steers layers up to "
            f"{max(rows)}); pass num_layers (steerlens convert --num-layers N, or --model)"
        )
    layers = sorted(rows)
    try:
        return SteeringVectors(
            values=torch.stack([rows[layer] for layer in layers]),
            layers=tuple(layers),
            num_layers=int(total),
            model=str(_field(reader, MODEL_KEY) or ""),
            architecture="",
            provenance={
                "imported_from": str(path),
                "format": "llama.cpp",
                "model_hint": _field(reader, f"{ARCH}.model_hint") or "",
            },
        )
    except VectorsError as err:
        raise VectorsError(f"{path}: {err}") from err


def _field(reader: object, key: str) -> str | int | None:
    """A scalar or string metadata value, or None when the key is absent."""
    field = reader.fields.get(key)  # type: ignore[attr-defined]
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, (str, int)) else None


def _model_type(architecture: str) -> str:
    """`Qwen2ForCausalLM` -> `qwen2`: the model_type-like hint llama.cpp and repeng print."""
    return re.sub(r"For(CausalLM|ConditionalGeneration)$", "", architecture).lower()
