"""Base models by name or path: short-name sources, resolution to a local directory, loading.

Where a loaded model keeps its layers, norm and unembedding is `steerlens.anatomy`'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlens.errors import ModelError
from steerlens.vectors import BaseModel, ModelShape

ASSETS = Path(__file__).parent / "assets"

SOURCE_ENTRY_POINTS = "steerlens.model_sources"  # packages name their models here (steerlens: smollm2-135m)

# Named model sources: a short name -> a function that returns a local checkpoint directory. Besides
# `register_source`, any installed package can add one as an entry point in the group above.
MODEL_SOURCES: dict[str, Callable[[], Path]] = {
    "toy-arith": lambda: ASSETS / "toy-arith",
}


def _source(name: str) -> Callable[[], Path] | None:
    """The registered source called `name`, loading it from its entry point on first use."""
    if name not in MODEL_SOURCES:
        for entry in entry_points(group=SOURCE_ENTRY_POINTS, name=name):
            MODEL_SOURCES[name] = entry.load()
    return MODEL_SOURCES.get(name)


def source_names() -> list[str]:
    """Every short model name: registered ones and installed entry points."""
    return sorted(set(MODEL_SOURCES) | {entry.name for entry in entry_points(group=SOURCE_ENTRY_POINTS)})


def register_source(name: str, resolve: Callable[[], Path]) -> None:
    """Make `load_model(name)` load the checkpoint directory that `resolve()` returns."""
    MODEL_SOURCES[name] = resolve


def resolve_model(name_or_path: str | Path) -> str:
    """A local directory for a registered short name or an existing path; else the string as a hub id."""
    key = str(name_or_path)
    source = _source(key)
    if source is not None:
        return str(source())
    path = Path(key).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
            raise ModelError(f"{path}: a directory without config.json is not a model checkpoint")
        return str(path)
    if key.startswith((".", "/", "~")) or key.count("/") > 1:
        known = ", ".join(source_names()) or "none"
        raise ModelError(f"model path {key!r} does not exist (named models: {known})")
    return key


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def context_length(model: str) -> int | None:
    """The model's own context in tokens, from its config alone: the smallest of the lengths it declares (what
    vLLM takes as `max_model_len` when none is given); None if it declares none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(model)).get_text_config()
    lengths = [value for key in CONTEXT_KEYS if isinstance(value := getattr(config, key, None), int) and value > 0]
    return min(lengths) if lengths else None


WEIGHTS_INDEX = "model.safetensors.index.json"
STEERLENS_FORMAT_KEY = "format"  # a steerlens vectors file's header names its format under this key


def stray_weight_files(folder: str | Path) -> list[tuple[Path, str]]:
    """The `*.safetensors` in a model folder that vLLM would load as weights but that are not the model's: each
    with what it is. vLLM loads every top-level `*.safetensors` unless the folder's weight index lists the
    shards; without one, a steerlens vectors file (known by its header) or any file beside `model.safetensors`
    is not a model shard."""
    from safetensors import safe_open

    path = Path(folder)
    if not path.is_dir() or (path / WEIGHTS_INDEX).is_file():
        return []
    files = sorted(path.glob("*.safetensors"))
    strays = []
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                header = handle.metadata() or {}
        except Exception:  # noqa: BLE001 - an unreadable file is vLLM's to report
            header = {}
        if str(header.get(STEERLENS_FORMAT_KEY, "")).startswith("steerlens.vectors"):
            strays.append((file, "a steerlens vectors file"))
        elif file.name != "model.safetensors" and (path / "model.safetensors").is_file():
            strays.append((file, "not a shard of the model (its weights are model.safetensors)"))
    return strays


def check_weight_files(folder: str | Path) -> None:
    """Refuse, in one line, a model folder holding a `*.safetensors` that vLLM would load as weights but is not
    the model's (see `stray_weight_files`): vLLM would fail on it with "no module or parameter named ..."."""
    strays = stray_weight_files(folder)
    if strays:
        file, what = strays[0]
        others = f" (and {len(strays) - 1} more)" if len(strays) > 1 else ""
        raise ModelError(
            f"{file} is {what}, inside the model folder {file.parent}{others}: vLLM would load it as model "
            "weights and fail; move it out of the folder"
        )


def config_shape(model: str) -> ModelShape:
    """Layer count and hidden size from the model's config alone (no weights loaded)."""
    from transformers import AutoConfig

    full = AutoConfig.from_pretrained(resolve_model(model))
    config = full.get_text_config()
    return ModelShape(
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        name=model,
        base=BaseModel.of_config(full),
    )


def load_model(
    name_or_path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a short name, a local directory, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name_or_path)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as err:
        raise ModelError(f"could not load model {name_or_path!r} from {source!r}: {err}") from err
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
