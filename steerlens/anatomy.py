"""Model anatomy in one place: where a causal LM keeps its decoder layers, final norm and unembedding.

Every backend and analysis asks here. The decoder-layer list is found by the architecture registry
(`LAYER_PATHS`, for exceptions) and otherwise by name, as repeng and steering-vectors do: the longest
indexed module list called `layers`, `h`, `blocks` or `layer`. The same rule reads a torch model's
`named_modules()` and an nnsight envoy tree's, so both find the same path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerlens.errors import ModelError
from steerlens.vectors import LAYER_OUTPUT, BaseModel, ModelShape

# Architectures whose decoder layers are not found by name (or to pin a path); one line per exception.
LAYER_PATHS: dict[str, str] = {
    "GPT2LMHeadModel": "transformer.h",
}
LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_norm")
# The decoder layer's child each placement adds to (the first name the layer has), see `vectors.PLACEMENTS`.
# Gemma-style layers norm the attention's output with `post_attention_layernorm` and the MLP's input with
# `pre_feedforward_layernorm`, so that one comes first.
PLACEMENT_CHILDREN: dict[str, tuple[str, ...]] = {
    "attn_input": ("input_layernorm", "ln_1", "attention_norm", "ln1"),
    "attn_output": ("self_attn", "attn", "attention", "self_attention"),
    "mlp_input": ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm", "ln2"),
    "mlp_output": ("mlp", "feed_forward", "ffn"),
}
# A layer with a norm after its MLP but none before it (OLMo2) norms the attention's output with
# `post_attention_layernorm`: that norm feeds the residual stream, not the MLP alone.
POST_MLP_NORM, PRE_MLP_NORM = "post_feedforward_layernorm", "pre_feedforward_layernorm"
# What each placement needs, for the refusal.
PLACEMENT_NEEDS = {
    "attn_input": "norm that feeds only the attention (input_layernorm, ln_1, ...) and another for the MLP",
    "attn_output": "attention module (self_attn, attn, attention, self_attention)",
    "mlp_input": "norm that feeds only the MLP (pre_feedforward_layernorm, post_attention_layernorm before it, ln_2, "
    "...) and another for the attention",
    "mlp_output": "MLP module (mlp, feed_forward, ffn)",
}
_INDEXED = re.compile(r"^(?P<path>.+)\.(?P<index>\d+)$")


def register_architecture(architecture: str, layers_path: str) -> None:
    """Pin where `architecture` keeps its decoder layers (dotted path from the `*ForCausalLM` object)."""
    LAYER_PATHS[architecture] = layers_path


def architecture(model: Any) -> str:
    """The architecture name a model's config declares, else its class name."""
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return str(archs[0]) if archs else type(model).__name__


def layers_path(names: Iterable[str], arch: str, model_class: str = "") -> str:
    """The dotted path of the decoder-layer list, from the registry or from the module names.

    `names` are the model's module names (`named_modules()`); a list is a path whose children are
    `path.0`, `path.1`, ...; the longest list whose last name is in `LAYER_LIST_NAMES` wins.
    """
    for key in (model_class, arch):
        if key in LAYER_PATHS:
            return LAYER_PATHS[key]
    counts: dict[str, int] = {}
    for name in names:
        match = _INDEXED.match(name)
        if match and match["path"].rsplit(".", 1)[-1] in LAYER_LIST_NAMES:
            counts[match["path"]] = max(counts.get(match["path"], 0), int(match["index"]) + 1)
    if not counts:
        raise ModelError(
            f"steerlens cannot find the decoder layers of {model_class or arch} (no module list named "
            f"{', '.join(LAYER_LIST_NAMES)}); register them with "
            f"steerlens.anatomy.register_architecture({arch!r}, 'path.to.layers')"
        )
    return max(counts, key=lambda path: (counts[path], -path.count(".")))


def follow(root: Any, path: str) -> Any:
    """The attribute at dotted `path` below `root` (a module or an nnsight envoy)."""
    obj = root
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def decoder_layers(model: nn.Module, arch: str = "") -> nn.ModuleList:
    """The model's decoder layers, in order; `arch` names the architecture when the config's is not the
    checkpoint's (vLLM's steered variants)."""
    path = layers_path((name for name, _ in model.named_modules()), arch or architecture(model), type(model).__name__)
    layers = follow(model, path)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(model).__name__}.{path} is a {type(layers).__name__}, not a list of decoder layers")
    return layers


def placement_child(children: Iterable[str], placement: str, layer: str = "decoder layer") -> str:
    """The name of the child of a decoder layer (`children`: its direct children's names) whose output
    `placement` adds to; "" for the layer's own output."""
    if placement == LAYER_OUTPUT:
        return ""
    names = set(children)
    found = {p: next((n for n in PLACEMENT_CHILDREN[p] if n in names), None) for p in PLACEMENT_CHILDREN}
    if POST_MLP_NORM in names and PRE_MLP_NORM not in names:
        found["mlp_input"] = None
    # a norm feeds only its own sub-module when the attention and the MLP each have their own (not one shared
    # norm of a parallel-residual layer, as GPT-J's or Phi-2's)
    separate = found["attn_input"] is not None and found["mlp_input"] is not None
    if found[placement] is None or (placement in ("attn_input", "mlp_input") and not separate):
        raise ModelError(
            f"placement {placement!r} needs a {PLACEMENT_NEEDS[placement]} in each {layer}, whose children are "
            f"{', '.join(sorted(names)) or 'none'}; use placement='{LAYER_OUTPUT}'"
        )
    return str(found[placement])


def placement_module(layer: nn.Module, placement: str) -> nn.Module:
    """The module of decoder layer `layer` whose output a vector at `placement` is added to."""
    child = placement_child((name for name, _ in layer.named_children()), placement, type(layer).__name__)
    return layer.get_submodule(child) if child else layer


def model_shape(model: nn.Module, name: str = "") -> ModelShape:
    """Layer count and hidden size of an HF causal LM, for checking vectors against it."""
    config: Any = model.config
    text_config = getattr(config, "get_text_config", lambda: config)()
    return ModelShape(
        num_layers=len(decoder_layers(model)),
        hidden_size=int(text_config.hidden_size),
        name=name or str(getattr(config, "_name_or_path", "")),
        architecture=architecture(model),
        base=BaseModel.of_config(config),
    )


def layer_output(output: Any) -> torch.Tensor:
    """The hidden state a decoder layer returns: the tensor itself (transformers 5) or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot read a hidden state from a layer output of type {type(output).__name__}")


def add_to_output(output: Any, vector: torch.Tensor) -> Any:
    """A decoder layer's output with `vector` added to its hidden state, in the same container."""
    hidden = layer_output(output)
    steered = hidden + vector.to(dtype=hidden.dtype, device=hidden.device)
    return steered if isinstance(output, torch.Tensor) else (steered,) + tuple(output[1:])


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def unembedding(model: nn.Module) -> torch.Tensor:
    """The `[vocab, d]` unembedding (lm_head) weight, detached."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or getattr(head, "weight", None) is None:
        raise ModelError(f"{type(model).__name__} has no output embedding (lm_head)")
    return head.weight.detach()


def final_norm(model: nn.Module) -> nn.Module:
    """The normalisation layer the model applies before its unembedding."""
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ModelError(
        f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(FINAL_NORM_NAMES)} "
        f"on {type(base).__name__}); pass the module yourself, or use the raw projection"
    )


@dataclass
class AttentionParts:
    """A pre-norm decoder layer's pieces (Qwen / Llama layout): norms, q/k/v/o projections, head size."""

    layer: nn.Module
    ln1: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    ln2: nn.Module
    head_dim: int

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def groups(self) -> int:
        return self.k.out_features // self.head_dim


def attention_parts(model: nn.Module, index: int) -> AttentionParts:
    """The parts of decoder layer `index`; raises for layouts other than pre-norm attention + MLP."""
    layer: Any = decoder_layers(model)[index]
    attn = getattr(layer, "self_attn", None)
    names = ("input_layernorm", "post_attention_layernorm")
    if (
        attn is None
        or not all(hasattr(layer, n) for n in names)
        or hasattr(layer, "pre_feedforward_layernorm")
        or not all(hasattr(attn, f"{p}_proj") for p in "qkvo")
    ):
        raise ModelError(
            f"{type(layer).__name__} is not a pre-norm layer with input_layernorm, "
            "self_attn.{q,k,v,o}_proj and post_attention_layernorm"
        )
    config: Any = model.config
    head_dim = int(getattr(attn, "head_dim", 0)) or attn.q_proj.out_features // config.num_attention_heads
    return AttentionParts(
        layer,
        layer.input_layernorm,
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        layer.post_attention_layernorm,
        head_dim,
    )
