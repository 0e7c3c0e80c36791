"""Steering vectors as MLP `down_proj` biases: the reference code's checkpoint format.

A constant bias on layer l's `down_proj` adds the same vector to the residual stream after layer l,
so the two forms are interchangeable (and one on `o_proj` adds it at the attention's output).
`import_vectors` reads `down_proj` biases from any checkpoint; `export_checkpoint` writes a checkpoint
that stock `transformers` loads with the effect preserved: architectures with an `mlp_bias` switch
(Llama) keep their class; Qwen2, which has no such switch, is written as the equivalent Llama layout
(Qwen2 = Llama with q/k/v biases).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import safe_open

from steerlens.anatomy import model_shape
from steerlens.errors import ModelError
from steerlens.io import atomic_dir
from steerlens.models import load_model, resolve_model
from steerlens.vectors import SteeringVectors, VectorsError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

BIAS_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj\.bias$")
LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
PROJECTION = re.compile(r"\.(self_attn|mlp)\.[a-z]+_proj\.weight$")
# The bias a vector at each placement is folded into (in a pre-norm Llama layer, down_proj's bias is added
# after the MLP, so at the layer's output too).
BIAS_TARGETS = {"layer_output": "mlp.down_proj", "mlp_output": "mlp.down_proj", "attn_output": "self_attn.o_proj"}
# Config keys Qwen2 and Llama share with the same meaning.
SHARED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
    "initializer_range",
    "use_cache",
    "head_dim",
)


def import_vectors(checkpoint: str | Path) -> SteeringVectors:
    """Read every layer's `mlp.down_proj.bias` from a checkpoint directory's safetensors files."""
    directory = Path(resolve_model(checkpoint))
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise VectorsError(f"{directory}: no config.json, so the layer count and width are unknown")
    config = json.loads(config_path.read_text())
    biases: dict[int, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                match = BIAS_KEY.search(key)
                if match:
                    biases[int(match.group(1))] = handle.get_tensor(key).float()
    if not biases:
        raise VectorsError(f"{directory}: no tensor named '...layers.N.mlp.down_proj.bias' in its safetensors files")
    layers = sorted(biases)
    return SteeringVectors(
        values=torch.stack([biases[layer] for layer in layers]),
        layers=tuple(layers),
        num_layers=int(config["num_hidden_layers"]),
        model=str(config.get("_name_or_path", directory)),
        architecture=(config.get("architectures") or [""])[0],
        provenance={"imported_from": str(directory), "format": "down_proj_bias"},
    )


def _llama_config(config: PretrainedConfig) -> PretrainedConfig:
    """A LlamaConfig computing the same function as a Qwen2 config, with every bias switched on."""
    from transformers import LlamaConfig

    if getattr(config, "use_sliding_window", False):
        raise ModelError("cannot export a Qwen2 model that uses sliding-window attention as Llama")
    source = config.to_dict()
    kept = {key: source[key] for key in SHARED_KEYS if key in source}
    return LlamaConfig(**kept, attention_bias=True, mlp_bias=True, architectures=["LlamaForCausalLM"])


def export_checkpoint(base: str | Path, vectors: SteeringVectors, out_dir: str | Path) -> Path:
    """Write `base` with `vectors` folded into biases, loadable by stock transformers: `down_proj` biases for
    vectors at the layer's or the MLP's output, `o_proj` biases for vectors at the attention's output."""
    from transformers import AutoModelForCausalLM

    if vectors.placement not in BIAS_TARGETS:
        raise VectorsError(
            f"a bias checkpoint holds vectors at {', '.join(BIAS_TARGETS)}, not at {vectors.placement!r} "
            "(a norm's output has no bias to fold them into); save them with save_pretrained"
        )
    model, loaded_tokenizer = load_model(base)
    vectors.check_fits(model_shape(model))
    # load_model's annotation is generic (nn.Module, object); what it loads is an HF model and tokenizer.
    tokenizer = cast("PreTrainedTokenizerBase", loaded_tokenizer)
    config = cast("PretrainedConfig", model.config)
    new_config: PretrainedConfig
    if hasattr(config, "mlp_bias"):
        new_config = config
    elif type(model).__name__ == "Qwen2ForCausalLM":
        new_config = _llama_config(config)
    else:
        raise ModelError(f"export to a bias checkpoint is not supported for {type(model).__name__}")
    target = BIAS_TARGETS[vectors.placement]
    new_config.mlp_bias = True
    new_config.attention_bias = new_config.attention_bias or target == "self_attn.o_proj"
    switched_on = {"mlp": True, "self_attn": new_config.attention_bias}
    state = model.state_dict()
    for key in list(state):
        projection = PROJECTION.search(key)
        bias_key = key.replace(".weight", ".bias")
        if projection and switched_on[projection.group(1)] and bias_key not in state:
            state[bias_key] = torch.zeros(state[key].shape[0], dtype=state[key].dtype)
    dense = vectors.dense()
    for key in [k for k in list(state) if k.endswith(f"{target}.bias")]:
        layer = LAYER_INDEX.search(key)
        if layer is None:
            raise ModelError(f"export: no layer index in the weight name {key!r}")
        state[key] = state[key] + dense[int(layer.group(1))].to(state[key].dtype)
    exported = AutoModelForCausalLM.from_config(new_config, dtype=next(model.parameters()).dtype)
    missing, unexpected = exported.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if not key.endswith("rotary_emb.inv_freq")]:
        raise ModelError(
            f"export: weights did not map onto {type(exported).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with atomic_dir(out_dir) as tmp:
        exported.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
