"""Head patching on the layer after a steering vector: which parts of that layer carry the effect.

Setting of the companion paper: a vector s added after layer l is studied at the study layer l+1 (the
reference moves s_{L-2} to the input of the last layer). The study layer is run on the unsteered input x
and on x+s and the two runs are mixed part by part. Every part reads either x ("clean") or x+s ("steered"):

- `q[h]`, `k[g]`, `v[g]`: the query projection of query head h, the key / value projections of KV group g;
- `head[h]`: head h's attention output before o_proj taken whole from the clean or the steered run
  (overriding what q/k/v give); `route` sends overridden heads to the residual path, the MLP path or both
  (the other path keeps the attention output computed from q/k/v);
- `mlp`: the s inside the MLP's input (the residual stream after attention);
- `residual`: the s carried past the layer on the residual stream.

All parts steered is the steered run; all clean is the unsteered one. "skip-attn" is q/k/v clean and the
rest steered; "skip-layer" is only the residual steered (s reaches the logits via final norm + unembedding).

The study layer's input is computed once; patched variants then run only layer l+1 onward, stacked in the
batch dimension (`batch_size` variants at a time), so a sweep over all heads costs a few tail passes.
Supported: pre-norm layers with `input_layernorm`, `self_attn.{q,k,v,o}_proj` and `post_attention_layernorm`
(Qwen2/2.5/3, Llama, Mistral). The model itself must be unsteered: the vector enters only through patches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pandas as pd
import torch
from torch import nn

from steerlens.analysis.patches import (
    DEFAULT_VARIANTS,
    MODES,
    Patch,
    PatchingError,
    variant_patches,
)
from steerlens.anatomy import AttentionParts, add_to_output, attention_parts, decoder_layers, final_norm, layer_output
from steerlens.vectors import SteeringVectors

# ---- the study layer's modules and the hooks that mix clean and steered parts ------------------------------


@dataclass
class _Plan:
    """Patches as row tensors: `[n, heads]` / `[n, groups]` masks, head sources (-1 own, 0 clean, 1 steered)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    head: torch.Tensor
    mlp: torch.Tensor
    residual: torch.Tensor
    to_residual: torch.Tensor
    to_mlp: torch.Tensor

    @classmethod
    def of(cls, patches: Sequence[Patch], device: torch.device, dtype: torch.dtype) -> _Plan:
        def mask(field: str) -> torch.Tensor:
            return torch.tensor([getattr(p, field) for p in patches], dtype=torch.bool, device=device)

        def scalar(values: list[bool]) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)

        head = torch.tensor([[-1 if h is None else int(h) for h in p.head] for p in patches], device=device)
        return cls(
            mask("q"),
            mask("k"),
            mask("v"),
            head,
            scalar([p.mlp for p in patches]),
            scalar([p.residual for p in patches]),
            torch.tensor([p.route != "mlp" for p in patches], device=device).view(-1, 1, 1),
            torch.tensor([p.route != "residual" for p in patches], device=device).view(-1, 1, 1),
        )

    def rows(self, batch: int) -> _Plan:
        """Each patch repeated for the `batch` rows of its block (variant-major batch layout)."""
        return _Plan(*(t.repeat_interleave(batch, dim=0) for t in vars(self).values()))


def _mix(own: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`other` in the heads where `mask` ([rows or 1, heads]) is set, `own` elsewhere; both `[rows, T, heads*hd]`."""
    shape = own.shape
    split = (*shape[:-1], -1, head_dim)
    where = mask.view(mask.shape[0], *([1] * (len(split) - 3)), mask.shape[1], 1)
    return torch.where(where, other.reshape(split), own.reshape(split)).reshape(shape)


class _PatchHooks:
    """Forward hooks on the study layer: each row reads clean input x; its plan row says what gets x+s.

    q/k/v projections of x+s are recomputed inside the hooks, so this also works token by token under
    generation. Head overrides need `refs`, the clean and steered runs' o_proj inputs for the same rows.
    """

    def __init__(
        self,
        parts: AttentionParts,
        vector: torch.Tensor,
        plan: _Plan,
        refs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.parts, self.plan, self.refs = parts, plan, refs
        self.vector = vector
        self._steered_in: torch.Tensor | None = None
        self._own: torch.Tensor | None = None
        self._mlp_extra: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _PatchHooks:
        p = self.parts
        self._handles = [
            p.ln1.register_forward_hook(self._ln1),
            p.q.register_forward_hook(partial(self._proj, self.plan.q)),
            p.k.register_forward_hook(partial(self._proj, self.plan.k)),
            p.v.register_forward_hook(partial(self._proj, self.plan.v)),
            p.ln2.register_forward_pre_hook(self._ln2),
            p.layer.register_forward_hook(self._residual),
        ]
        if self.refs is not None:
            self._handles += [p.o.register_forward_pre_hook(self._heads), p.o.register_forward_hook(self._route)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._steered_in, self._own, self._mlp_extra = [], None, None, None

    def _ln1(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self._steered_in = module.forward(args[0] + self.vector.to(args[0].dtype))

    def _proj(self, mask: torch.Tensor, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return _mix(out, module.forward(self._steered_in), mask, self.parts.head_dim)

    def _heads(self, module: nn.Module, args: tuple) -> tuple:
        clean, steered = self.refs
        own = args[0]
        mixed = _mix(
            _mix(own, clean, self.plan.head == 0, self.parts.head_dim),
            steered,
            self.plan.head == 1,
            self.parts.head_dim,
        )
        self._own = own
        return (mixed, *args[1:])

    def _route(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        own = module.forward(self._own)
        to_residual = torch.where(self.plan.to_residual, out, own)
        self._mlp_extra = torch.where(self.plan.to_mlp, out, own) - to_residual
        return to_residual

    def _ln2(self, module: nn.Module, args: tuple) -> tuple:
        hidden = args[0] + self.plan.mlp.to(args[0].dtype) * self.vector.to(args[0].dtype)
        if self._mlp_extra is not None:
            hidden = hidden + self._mlp_extra
        return (hidden, *args[1:])

    def _residual(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return add_to_output(output, self.plan.residual * self.vector)


# ---- running the study layer and the rest of the model on stacked variants ---------------------------------


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


def _tile(obj: Any, batch: int, n: int) -> Any:
    """Repeat every tensor whose first dimension is the batch `n` times (variant-major); recurse into containers."""
    if isinstance(obj, dict):
        return {k: _tile(v, batch, n) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj.repeat(n, *([1] * (obj.ndim - 1))) if obj.ndim and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tile(x, batch, n) for x in obj)
    return obj


def study_layer(model: nn.Module, layer: int) -> int:
    """The study layer `layer`+1, after checking that it exists in `model` (a vector after its last layer has none)."""
    num_layers = len(decoder_layers(model))
    if not 0 <= layer <= num_layers - 2:
        raise PatchingError(
            f"layer must be in 0..{num_layers - 2} (the study layer layer+1 must exist in "
            f"this {num_layers}-layer model), got {layer}"
        )
    return layer + 1


def steering_vector(vectors: SteeringVectors | torch.Tensor, layer: int) -> torch.Tensor:
    """The `[d]` vector of `layer` from a set (which must steer it), or a bare `[d]` tensor as given."""
    if isinstance(vectors, SteeringVectors):
        vectors.require_layer_output("head patching (it adds the vector to the layer's output itself)")
        if layer not in vectors.layers:
            raise PatchingError(f"the vectors do not steer layer {layer} (they steer {list(vectors.layers)})")
        return vectors.values[vectors.layers.index(layer)].detach()
    if vectors.ndim != 1:
        raise PatchingError(f"a bare vector must be [d], got shape {tuple(vectors.shape)}")
    return vectors.detach()


class LayerPatcher:
    """Layer `layer`'s output x (the study layer's input) computed once for `ids`; patched runs from there.

    `logits(patches)` runs the study layer under each patch and the rest of the model, `batch_size`
    patches stacked in the batch dimension at a time; `reference_logits()` are the genuine clean and
    steered runs (the study layer on x and on x+s, no hooks).
    """

    def __init__(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        vectors: SteeringVectors | torch.Tensor,
        layer: int,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        device = next(model.parameters()).device
        self.model, self.layer, self.study = model, layer, study_layer(model, layer)
        self.parts = attention_parts(model, self.study)
        self.ids = ids.view(1, -1).to(device) if ids.ndim == 1 else ids.to(device)
        self.mask = torch.ones_like(self.ids) if attention_mask is None else attention_mask.to(device)
        self.x, self.kwargs = self._capture_input()
        self.vector = steering_vector(vectors, layer).to(device=device, dtype=self.x.dtype)
        self._refs: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    @torch.no_grad()
    def _capture_input(self) -> tuple[torch.Tensor, dict[str, Any]]:
        captured: dict[str, Any] = {}

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["x"] = args[0] if args else kwargs["hidden_states"]
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        handle = self.parts.layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["x"], captured["kwargs"]

    def _tail(self, hidden: torch.Tensor, n: int) -> torch.Tensor:
        """Layers from the study layer on and the final norm, for `n` variant blocks of the batch."""
        kwargs = _tile(self.kwargs, self.batch, n)
        for layer in decoder_layers(self.model)[self.study :]:
            hidden = layer_output(layer(hidden, **kwargs))
        return final_norm(self.model)(hidden)

    def _unembed(
        self, hidden: torch.Tensor, n: int, positions: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        hidden = hidden.view(n, self.batch, *hidden.shape[1:])
        if positions is not None:
            hidden = hidden[:, positions[0], positions[1]]
        return self.model.get_output_embeddings()(hidden).float()

    @torch.no_grad()
    def reference_logits(self, positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`[2, B, T, V]` logits of the clean and the steered run (`[2, S, V]` at `positions` (rows, cols))."""
        outputs: list[torch.Tensor] = []
        hook = self.parts.o.register_forward_pre_hook(lambda m, args: outputs.append(args[0]))
        try:
            hidden = self._tail(torch.cat([self.x, self.x + self.vector]), 2)
        finally:
            hook.remove()
        self._refs = tuple(outputs[0].chunk(2))  # type: ignore[assignment]
        return self._unembed(hidden, 2, positions)

    @torch.no_grad()
    def logits(
        self, patches: Sequence[Patch], positions: tuple[torch.Tensor, torch.Tensor] | None = None, batch_size: int = 16
    ) -> Iterator[torch.Tensor]:
        """`[n, B, T, V]` logits (or `[n, S, V]` at `positions`) for each chunk of `batch_size` patches."""
        if any(p.overrides_heads for p in patches) and self._refs is None:
            self.reference_logits(positions=(self.ids.new_zeros(1), self.ids.new_zeros(1)))
        for start in range(0, len(patches), batch_size):
            chunk = patches[start : start + batch_size]
            n = len(chunk)
            self._check(chunk)
            plan = _Plan.of(chunk, self.x.device, self.x.dtype).rows(self.batch)
            refs = None if self._refs is None else tuple(r.repeat(n, 1, 1) for r in self._refs)
            with _PatchHooks(self.parts, self.vector, plan, refs):  # type: ignore[arg-type]
                hidden = self._tail(self.x.repeat(n, 1, 1), n)
            yield self._unembed(hidden, n, positions)

    def _check(self, patches: Sequence[Patch]) -> None:
        for p in patches:
            if len(p.head) != self.parts.heads or len(p.k) != self.parts.groups:
                raise PatchingError(
                    f"patch has {len(p.head)} heads / {len(p.k)} KV groups, the study layer "
                    f"{self.parts.heads} / {self.parts.groups}"
                )


# ---- metrics ------------------------------------------------------------------------------------------------


def _targets(
    targets: str | torch.Tensor, ids: torch.Tensor, steered_logp: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Chosen token per scored position; -1 where there is none (the last position under "next")."""
    if isinstance(targets, torch.Tensor):
        return targets.to(ids.device)[rows, cols]
    if targets == "steered_argmax":
        return steered_logp.argmax(-1)
    if targets == "next":
        nxt = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -1)], dim=1)
        return nxt[rows, cols]
    raise PatchingError(f"targets must be 'steered_argmax', 'next' or a [B, T] tensor of ids, got {targets!r}")


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || p) over the last dimension from log-probabilities (>= 0, 0 when equal)."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0.0)


def _prob(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    picked = logp.gather(-1, target.clamp_min(0).expand(*logp.shape[:-1]).unsqueeze(-1)).squeeze(-1).exp()
    return picked.masked_fill(target < 0, float("nan"))


@torch.no_grad()
def head_patching(
    model: nn.Module,
    ids: torch.Tensor,
    vectors: SteeringVectors | torch.Tensor,
    layer: int,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    modes: Sequence[str] = MODES,
    routes: Sequence[str] = ("both",),
    attention_mask: torch.Tensor | None = None,
    score_mask: torch.Tensor | None = None,
    targets: str | torch.Tensor = "steered_argmax",
    batch_size: int = 8,
) -> pd.DataFrame:
    """Per-token effect of patching each part of layer `layer`+1 with the vector of `layer`.

    One row per (variant, index, mode, route, batch, position) scored (`score_mask`, default every attended
    position): `kl_steered` = KL(steered || patched), `kl_base` = KL(unsteered || patched) of the next-token
    distributions, `prob` = patched probability of the target token (`targets`: the steered run's argmax,
    "next" = the next input token, or a `[B, T]` tensor) with `p_base` / `p_steered` the references and
    `dprob` = prob - p_base. Mode "only" steers just the unit, "skip" all but it; routes apply to "head".
    """
    patcher = LayerPatcher(model, ids, vectors, layer, attention_mask)
    score = patcher.mask.bool() if score_mask is None else score_mask.to(patcher.ids.device).bool()
    rows, cols = score.nonzero(as_tuple=True)
    base_logp, steered_logp = patcher.reference_logits((rows, cols)).log_softmax(-1)
    target = _targets(targets, patcher.ids, steered_logp, rows, cols)
    p_base, p_steered = _prob(base_logp, target), _prob(steered_logp, target)
    labelled = variant_patches(variants, modes, routes, patcher.parts.heads, patcher.parts.groups)
    frames, done = [], 0
    for logits in patcher.logits([p for _, p in labelled], (rows, cols), batch_size):
        logp = logits.log_softmax(-1)
        prob = _prob(logp, target)
        metrics = {
            "kl_steered": kl_divergence(steered_logp, logp),
            "kl_base": kl_divergence(base_logp, logp),
            "prob": prob,
            "dprob": prob - p_base,
        }
        for i, (label, _) in enumerate(labelled[done : done + logits.shape[0]]):
            frames.append(
                pd.DataFrame(
                    {
                        **label,
                        "batch": rows.cpu().numpy(),
                        "position": cols.cpu().numpy(),
                        "target": target.cpu().numpy(),
                        **{k: v[i].cpu().numpy() for k, v in metrics.items()},
                        "p_base": p_base.cpu().numpy(),
                        "p_steered": p_steered.cpu().numpy(),
                    }
                )
            )
        done += logits.shape[0]
    return pd.concat(frames, ignore_index=True)


def summarize_patching(table: pd.DataFrame) -> pd.DataFrame:
    """Means per (variant, index, mode, route), and `recovered` = mean dprob / mean (p_steered - p_base).

    `recovered` is the share of the steering's change in target probability that the patch reproduces
    (1 for the steered run, 0 for the unsteered one).
    """
    keys = ["variant", "index", "mode", "route"]
    gain = (table["p_steered"] - table["p_base"]).groupby([table[k] for k in keys]).mean()
    out = table.groupby(keys)[["kl_steered", "kl_base", "prob", "dprob"]].mean()
    out["recovered"] = out["dprob"] / gain
    return out.reset_index()


@contextmanager
def patch_hooks(model: nn.Module, vectors: SteeringVectors | torch.Tensor, layer: int, patch: Patch) -> Iterator[None]:
    """Steer with the vector of `layer` only through `patch`'s parts of layer `layer`+1, e.g. for generation.

    Use on a model where `layer` itself is not steered (attach other layers' vectors as usual). Head
    overrides need the whole steered run and are refused; q/k/v, mlp and residual parts work token by token.
    """
    study = study_layer(model, layer)
    if patch.overrides_heads:
        raise PatchingError("head overrides need the steered run's head outputs; use q/k/v parts for generation")
    parts = attention_parts(model, study)
    param = next(model.parameters())
    vector = steering_vector(vectors, layer).to(device=param.device, dtype=param.dtype)
    with _PatchHooks(parts, vector, _Plan.of([patch], param.device, param.dtype)):
        yield
