"""Base models by name or path: short-name sources, resolution to a local directory, loading.

Where a loaded model keeps its layers, norm and unembedding is `steerlens.anatomy`'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from steerlens.errors import ModelError
from steerlens.vectors import ModelShape

ASSETS = Path(__file__).parent / "assets"

# Named model sources: a short name -> a function that returns a local checkpoint directory.
# Other modules add theirs with `register_source` (steerlens.smollm adds "smollm2-135m").
MODEL_SOURCES: dict[str, Callable[[], Path]] = {
    "toy-arith": lambda: ASSETS / "toy-arith",
}


def register_source(name: str, resolve: Callable[[], Path]) -> None:
    """Make `load_model(name)` load the checkpoint directory that `resolve()` returns."""
    MODEL_SOURCES[name] = resolve


def resolve_model(name_or_path: str | Path) -> str:
    """A local directory for a registered short name or an existing path; else the string as a hub id."""
    key = str(name_or_path)
    if key in MODEL_SOURCES:
        return str(MODEL_SOURCES[key]())
    path = Path(key).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
            raise ModelError(f"{path}: a directory without config.json is not a model checkpoint")
        return str(path)
    if key.startswith((".", "/", "~")) or key.count("/") > 1:
        known = ", ".join(sorted(MODEL_SOURCES)) or "none"
        raise ModelError(f"model path {key!r} does not exist (named models: {known})")
    return key


def config_shape(model: str) -> ModelShape:
    """Layer count and hidden size from the model's config alone (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(model)).get_text_config()
    return ModelShape(num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size), name=model)


def load_model(
    name_or_path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> tuple[nn.Module, object]:
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
