"""TransformerLens backend: a hook on `blocks.{l}.hook_out` (the residual stream after block l) adds its vector,
or on the bridge's hook for another placement (`HOOKS`: `blocks.{l}.attn.hook_out`, ...).

Targets `transformer_lens.model_bridge.TransformerBridge`, the only model class TransformerLens 4
has, e.g. booted from a local checkpoint directory without the hub::

    bridge = TransformerBridge.boot_transformers("/path/to/checkpoint", device="cpu")
    with tlens.attach(bridge, vectors):
        logits = bridge(tokens)

`blocks.{l}.hook_resid_post` is the bridge's alias for the same hook point. The legacy
`HookedTransformer` (and its `hook_resid_post` on its own blocks) was removed in TransformerLens 4.0
(`from transformer_lens import HookedTransformer` raises an ImportError pointing to the bridge), so
it is not supported. The bridge runs the HF model's own weights unprocessed, so steered logits match
the HF backend; `enable_compatibility_mode()` folds LayerNorms and centres weights, which changes
the residual stream a vector is added to.

Attached steering uses permanent TransformerLens hooks, so `bridge.reset_hooks()` leaves it in
place; only `remove()` removes it. For a one-off run, `handle.as_hooks()` on a handle that is not
attached gives the same hooks as `fwd_hooks` for `bridge.run_with_hooks` / `run_with_cache`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from steerlens.backends.base import Hook, SteeringHandle
from steerlens.errors import ModelError
from steerlens.vectors import LAYER_OUTPUT, ModelShape, SteeringVectors


def tl_model_shape(model: Any) -> ModelShape:
    """Layer count and width of a TransformerLens model, from its config."""
    cfg = model.cfg
    return ModelShape(
        num_layers=int(cfg.n_layers),
        hidden_size=int(cfg.d_model),
        name=str(getattr(cfg, "model_name", "")),
        architecture=str(getattr(cfg, "original_architecture", "") or getattr(cfg, "architecture", "") or ""),
    )


# The bridge's hook point below `blocks.{l}` for each placement (its component names: ln1, attn, ln2, mlp).
HOOKS = {
    "layer_output": "hook_out",
    "attn_input": "ln1.hook_out",
    "attn_output": "attn.hook_out",
    "mlp_input": "ln2.hook_out",
    "mlp_output": "mlp.hook_out",
}


def hook_name(layer: int, placement: str = LAYER_OUTPUT) -> str:
    """The hook point whose activation a vector at `placement` of block `layer` is added to."""
    return f"blocks.{layer}.{HOOKS[placement]}"


class TLensSteering(SteeringHandle):
    """Steering on a TransformerLens `TransformerBridge` via hooks on each steered block's output."""

    def __init__(self, model: Any, vectors: SteeringVectors, trainable: bool = False) -> None:
        vectors.check_fits(tl_model_shape(model), what="TransformerLens model")
        device = next(model.parameters()).device
        super().__init__(vectors, trainable, device)
        self.model = model
        self._installed: list[tuple[Any, Callable[..., torch.Tensor]]] = []

    def _hook(self, layer: int, activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return activation + self.vector(layer, activation)

    def _hooks(self) -> list[Hook]:
        """`(hook name, hook function)` for each steered layer."""
        names = {layer: hook_name(layer, self.template.placement) for layer in self.layers}
        missing = [name for name in names.values() if name not in self.model.hook_dict]
        if missing:
            raise ModelError(
                f"this TransformerLens bridge has no hook point {missing[0]} for placement "
                f"{self.template.placement!r}; use placement='{LAYER_OUTPUT}'"
            )
        return [(names[layer], partial(self._hook, layer)) for layer in self.layers]

    def _install(self) -> None:
        for name, fn in self._hooks():
            self.model.add_hook(name, fn, is_permanent=True)
            self._installed.append((self.model.hook_dict[name], fn))

    def _uninstall(self) -> None:
        # `bridge.add_hook` returns no handle; find ours by the function it wraps and remove only it.
        for point, fn in self._installed:
            for handle in point.fwd_hooks:
                if handle.user_hook is fn:
                    handle.hook.remove()
            point.fwd_hooks = [handle for handle in point.fwd_hooks if handle.user_hook is not fn]
        self._installed = []


def attach(model: Any, vectors: SteeringVectors, trainable: bool = False) -> TLensSteering:
    """Steer a TransformerLens model with `vectors` until the handle is removed (or a `with` block ends)."""
    return TLensSteering(model, vectors, trainable).attach()
