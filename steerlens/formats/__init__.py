"""Steering vectors in other tools' files: read any known format, write any, convert between them.

Every format here adds layer n's vector to the output of decoder block n, as steerlens does, so layer
numbers carry over unchanged; what each cannot express (llama.cpp has no slot for layer 0, no format
has a place for vectors added inside a layer) is refused with a message rather than shifted.
`docs/formats.md` lists each format's layout and convention.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlens.formats.llama_cpp import read_gguf, write_easysteer, write_gguf
from steerlens.formats.vllm_lens import read_vllm_lens, write_vllm_lens
from steerlens.vectors import SteeringVectors, VectorsError


@dataclass(frozen=True)
class Format:
    """One file format: how to recognise, read and write it."""

    name: str
    description: str
    suffixes: tuple[str, ...]
    read: Callable[..., SteeringVectors]  # (path, num_layers: int | None) -> SteeringVectors
    write: Callable[..., Path]  # (vectors, path, **options) -> path


def _read_steerlens(path: Path, num_layers: int | None = None) -> SteeringVectors:
    return SteeringVectors.load(path)


def _write_steerlens(vectors: SteeringVectors, path: Path) -> Path:
    return vectors.save(path)


FORMATS: dict[str, Format] = {
    "steerlens": Format(
        "steerlens",
        "safetensors with the layers and provenance in the header",
        (".safetensors",),
        _read_steerlens,
        _write_steerlens,
    ),
    "llama.cpp": Format(
        "llama.cpp",
        "GGUF control vector (llama.cpp --control-vector, repeng export_gguf)",
        (".gguf",),
        read_gguf,
        write_gguf,
    ),
    "easysteer": Format(
        "easysteer",
        "GGUF directions for EasySteer's vLLM steering (layer 0 allowed; read as llama.cpp)",
        (),
        read_gguf,
        write_easysteer,
    ),
    "vllm-lens": Format(
        "vllm-lens",
        "JSON of a vllm-lens SteeringVector (its request wire form)",
        (".vllm-lens.json",),
        read_vllm_lens,
        write_vllm_lens,
    ),
}


def format_named(name: str) -> Format:
    """The format called `name`, or a one-line error listing the known ones."""
    if name not in FORMATS:
        raise VectorsError(f"unknown vectors format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(path: str | Path) -> str:
    """The format a file's suffix names."""
    name = Path(path).name.lower()
    for fmt in FORMATS.values():
        if any(name.endswith(suffix) for suffix in fmt.suffixes):
            return fmt.name
    suffix = Path(path).suffix
    raise VectorsError(
        f"{path}: cannot tell the vectors format from the suffix {suffix!r}; name it (one of {', '.join(FORMATS)})"
    )


def read_vectors(path: str | Path, format: str = "auto", num_layers: int | None = None) -> SteeringVectors:
    """Read vectors from a file of `format` ("auto": by suffix); `num_layers` is needed by formats that
    do not record the model's layer count."""
    name = detect_format(path) if format == "auto" else format
    return format_named(name).read(Path(path), num_layers=num_layers)


def write_vectors(vectors: SteeringVectors, path: str | Path, format: str = "auto", **options: Any) -> Path:
    """Write `vectors` as `format` ("auto": by suffix); `options` go to that format's writer
    (llama.cpp: `drop_layer0`, `model_hint`)."""
    fmt = format_named(detect_format(path) if format == "auto" else format)
    accepted = set(inspect.signature(fmt.write).parameters) - {"vectors", "path"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise VectorsError(
            f"the {fmt.name} format takes no option {', '.join(unknown)}"
            + (f" (it takes {', '.join(sorted(accepted))})" if accepted else "")
        )
    return fmt.write(vectors, Path(path), **options)


def convert(
    source: str | Path,
    target: str | Path,
    to: str = "auto",
    source_format: str = "auto",
    num_layers: int | None = None,
    **options: Any,
) -> Path:
    """Read `source` and write it to `target` as `to`."""
    return write_vectors(read_vectors(source, source_format, num_layers), target, to, **options)
