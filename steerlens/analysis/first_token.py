"""First-token study: where along a completion steering changes the next-token distribution, and how.

The companion paper finds the last-layer vector acts mostly on the first generated token (e.g. "To" for
Qwen, "Step" for Llama). Here: greedy-generate with the vectors, teacher-force the same sequence steered
and unsteered, and compare Δp_t = softmax(z_steered,t) - softmax(z_base,t) at every generated position t
(t = 0 is the first generated token). `prefix_control` asks how much of the effect the first token alone
carries: the unsteered model continues from the prompt plus the steered run's first token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from steerlens.analysis.logit_lens import decode_tokens
from steerlens.analysis.patching import kl_divergence
from steerlens.anatomy import position_ids
from steerlens.backends import hf
from steerlens.errors import SteerlensError
from steerlens.rollout import encode_prompt, stop_token_ids
from steerlens.vectors import SteeringVectors


class FirstTokenError(SteerlensError, ValueError):
    """A first-token request cannot be run as given."""


@dataclass
class Trajectories:
    """Left-padded prompts followed by generated tokens.

    `ids` / `attention_mask` are `[B, P + N]`; `prompt_width` is P (the padded prompt width); `generated`
    marks generated tokens up to and including the first stop token.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    generated: torch.Tensor

    def __post_init__(self) -> None:
        if not self.generated.any(dim=1).all():
            raise FirstTokenError("every trajectory needs at least one generated token")

    def rows(self, start: int, stop: int) -> Trajectories:
        return Trajectories(
            self.ids[start:stop], self.attention_mask[start:stop], self.prompt_width, self.generated[start:stop]
        )

    def completions(self, tokenizer: Any) -> list[str]:
        """Each row's generated tokens decoded, special tokens dropped."""
        return [
            tokenizer.decode(row[mask].tolist(), skip_special_tokens=True)
            for row, mask in zip(self.ids, self.generated)
        ]


def steering(model: nn.Module, vectors: SteeringVectors | None) -> AbstractContextManager:
    """`model` steered by `vectors` (HF hooks) for a `with` block; unsteered when `vectors` is None."""
    return hf.attach(model, vectors) if vectors is not None else nullcontext()


def _left_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    vectors: SteeringVectors | None = None,
    max_new_tokens: int = 64,
) -> Trajectories:
    """Greedy completions of `prompts` (texts, or token-id lists used as given), steered by `vectors` if given."""
    if not prompts or max_new_tokens < 1:
        raise FirstTokenError(
            f"need at least one prompt and max_new_tokens >= 1 "
            f"(got {len(prompts)} prompts, max_new_tokens={max_new_tokens})"
        )
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    pad = tokenizer.pad_token_id
    ids, mask = _left_pad(encoded, pad, device)
    stops = stop_token_ids(tokenizer, model)
    with steering(model, vectors):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=pad,
        )
    new = out[:, ids.shape[1] :]
    is_stop = torch.isin(new, torch.tensor(stops, device=device))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # strictly after the first stop token
    generated = torch.cat([torch.zeros_like(mask, dtype=torch.bool), ~after_stop], dim=1)
    return Trajectories(out, torch.cat([mask, (~after_stop).long()], dim=1), ids.shape[1], generated)


def with_prefix(tokenizer: Any, prompts: Sequence[str | Sequence[int]], prefix: Sequence[int]) -> list[list[int]]:
    """Each prompt's ids with `prefix[i]` appended (the "prefix that token" control)."""
    return [
        (encode_prompt(tokenizer, p) if isinstance(p, str) else list(p)) + [int(t)]
        for p, t in zip(prompts, prefix, strict=True)
    ]


@torch.no_grad()
def _log_probs(
    model: nn.Module, traj: Trajectories, vectors: SteeringVectors | None, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """`[S, V]` next-token log-probabilities (fp32) at (rows, cols), teacher-forced, steered if `vectors`."""
    with steering(model, vectors):
        logits = model(
            input_ids=traj.ids,
            attention_mask=traj.attention_mask,
            position_ids=position_ids(traj.attention_mask),
            use_cache=False,
        ).logits
    return logits[rows, cols].float().log_softmax(-1)


@dataclass
class FirstTokenResult:
    """What steering does to the next-token distribution along the steered greedy completions.

    `positions`: one row per (prompt, position), position 0 = first generated token, with the generated
    token, l1 = Σ|Δp|, kl = KL(steered || base), the most boosted / suppressed token and its Δp, the base
    and steered argmax, `boosted_is_base_argmax`, and both runs' probability of the generated token.
    `tokens`: the `k` most boosted and suppressed tokens at each of the first `token_positions` positions.
    `overall`: the `k` tokens with the largest and smallest Δp (column dp) averaged over all generated positions.
    """

    positions: pd.DataFrame
    tokens: pd.DataFrame
    overall: pd.DataFrame
    trajectories: Trajectories


def _ranked(
    dp: torch.Tensor, p_base: torch.Tensor | None, p_steered: torch.Tensor | None, k: int, tokenizer: Any
) -> pd.DataFrame:
    """The `k` largest and smallest entries of `dp` ([V]): side, rank, token_id, token, dp (+ both runs' p)."""
    parts = []
    for side, sign in (("boosted", 1.0), ("suppressed", -1.0)):
        ids = (sign * dp).topk(min(k, dp.numel())).indices
        probs = (
            {}
            if p_base is None or p_steered is None
            else {"p_base": p_base[ids].cpu().numpy(), "p_steered": p_steered[ids].cpu().numpy()}
        )
        parts.append(
            pd.DataFrame(
                {
                    "side": side,
                    "rank": range(1, len(ids) + 1),
                    "token_id": ids.cpu().numpy(),
                    "token": decode_tokens(tokenizer, ids.tolist()),
                    "dp": dp[ids].cpu().numpy(),
                    **probs,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _chunks(count: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, count, size):
        yield start, min(start + size, count)


@torch.no_grad()
def delta_p(
    model: nn.Module,
    tokenizer: Any,
    traj: Trajectories,
    vectors: SteeringVectors,
    *,
    k: int = 10,
    token_positions: int = 4,
    batch_size: int = 8,
) -> FirstTokenResult:
    """Δp = softmax(steered) - softmax(base) at every generated position of `traj`, teacher-forced."""
    frames, token_frames = [], []
    total, count = None, 0
    for start, stop in _chunks(traj.ids.shape[0], batch_size):
        part = traj.rows(start, stop)
        rows, cols = part.generated.nonzero(as_tuple=True)
        steered = _log_probs(model, part, vectors, rows, cols - 1)
        base = _log_probs(model, part, None, rows, cols - 1)
        p_s, p_b = steered.exp(), base.exp()
        dp = p_s - p_b
        total = dp.sum(0) if total is None else total + dp.sum(0)
        count += dp.shape[0]
        token = part.ids[rows, cols]
        boost, boosted = dp.max(-1)
        suppress, suppressed = dp.min(-1)
        base_argmax = p_b.argmax(-1)
        position = cols - part.prompt_width
        frames.append(
            pd.DataFrame(
                {
                    "prompt": (rows + start).cpu().numpy(),
                    "position": position.cpu().numpy(),
                    "token_id": token.cpu().numpy(),
                    "token": decode_tokens(tokenizer, token.tolist()),
                    "l1": dp.abs().sum(-1).cpu().numpy(),
                    "kl": kl_divergence(steered, base).cpu().numpy(),
                    "boosted_id": boosted.cpu().numpy(),
                    "boosted_token": decode_tokens(tokenizer, boosted.tolist()),
                    "boost": boost.cpu().numpy(),
                    "suppressed_id": suppressed.cpu().numpy(),
                    "suppressed_token": decode_tokens(tokenizer, suppressed.tolist()),
                    "suppress": suppress.cpu().numpy(),
                    "base_argmax": base_argmax.cpu().numpy(),
                    "steered_argmax": p_s.argmax(-1).cpu().numpy(),
                    "boosted_is_base_argmax": (boosted == base_argmax).cpu().numpy(),
                    "p_token_base": p_b.gather(1, token[:, None]).squeeze(1).cpu().numpy(),
                    "p_token_steered": p_s.gather(1, token[:, None]).squeeze(1).cpu().numpy(),
                }
            )
        )
        for i in (position < token_positions).nonzero().flatten().tolist():
            ranked = _ranked(dp[i], p_b[i], p_s[i], k, tokenizer)
            token_frames.append(ranked.assign(prompt=int(rows[i]) + start, position=int(position[i])))
    overall = _ranked(total / count, p_base=None, p_steered=None, k=k, tokenizer=tokenizer)
    columns = ["prompt", "position", "side", "rank", "token_id", "token", "dp", "p_base", "p_steered"]
    tokens = pd.concat(token_frames, ignore_index=True)[columns] if token_frames else pd.DataFrame(columns=columns)
    return FirstTokenResult(pd.concat(frames, ignore_index=True), tokens, overall, traj)


def first_token_effect(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    vectors: SteeringVectors,
    *,
    max_new_tokens: int = 64,
    k: int = 10,
    token_positions: int = 4,
    batch_size: int = 8,
) -> FirstTokenResult:
    """Greedy-generate with `vectors` (all prompts in one batch), then Δp at every generated position."""
    traj = generate_greedy(model, tokenizer, prompts, vectors, max_new_tokens)
    return delta_p(model, tokenizer, traj, vectors, k=k, token_positions=token_positions, batch_size=batch_size)


def by_position(positions: pd.DataFrame, max_position: int | None = None) -> pd.DataFrame:
    """Mean l1, kl and boost per generated position, with each position's share of the total l1.

    A large share at position 0 is the "effect concentrates on the first token" finding.
    """
    table = positions if max_position is None else positions[positions.position <= max_position]
    out = (
        table.groupby("position")
        .agg(
            l1=("l1", "mean"),
            kl=("kl", "mean"),
            boost=("boost", "mean"),
            boosted_is_base_argmax=("boosted_is_base_argmax", "mean"),
            n=("l1", "size"),
        )
        .reset_index()
    )
    out["l1_share"] = table.groupby("position")["l1"].sum().to_numpy() / table["l1"].sum()
    return out


def _agreement(a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor) -> tuple[float, int]:
    """Share of `a`'s generated positions where `b` has the same token, and the common-prefix length."""
    a_tokens, b_tokens = a[a_mask].tolist(), b[b_mask].tolist()
    same = [x == y for x, y in zip(a_tokens, b_tokens)]
    prefix = same.index(False) if False in same else len(same)
    return sum(same) / max(len(a_tokens), 1), prefix


@torch.no_grad()
def prefix_control(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    vectors: SteeringVectors,
    *,
    max_new_tokens: int = 64,
) -> pd.DataFrame:
    """Does the steered first token alone carry the effect? One row per prompt.

    Three greedy completions: steered, unsteered, and unsteered after the prompt plus the steered run's
    first token ("prefixed"; its text starts with that token). `agree_*` is the share of the steered
    completion's positions where the other completion has the same token, `prefix_*` the common prefix
    length; `kl_first` / `kl_rest` are KL(steered || base) teacher-forced on the steered completion at
    position 0 and averaged after it (the unsteered model there already sees the first token). Score the
    texts (e.g. with the reward function) to measure how much of the accuracy gain the prefix recovers.
    """
    steered = generate_greedy(model, tokenizer, prompts, vectors, max_new_tokens)
    base = generate_greedy(model, tokenizer, prompts, None, max_new_tokens)
    first_col = steered.prompt_width
    first = steered.ids[:, first_col]
    prefixed = generate_greedy(
        model, tokenizer, with_prefix(tokenizer, prompts, first.tolist()), None, max(max_new_tokens - 1, 1)
    )
    prefixed_ids = torch.cat([first[:, None], prefixed.ids[:, prefixed.prompt_width :]], dim=1)
    prefixed_mask = torch.cat(
        [torch.ones_like(first[:, None], dtype=torch.bool), prefixed.generated[:, prefixed.prompt_width :]], dim=1
    )
    effect = delta_p(model, tokenizer, steered, vectors, k=1, token_positions=0).positions
    texts = {name: t.completions(tokenizer) for name, t in (("steered", steered), ("base", base))}
    first_tokens = decode_tokens(tokenizer, first.tolist())
    rows = []
    for i in range(len(prompts)):
        s_ids, s_mask = steered.ids[i, first_col:], steered.generated[i, first_col:]
        agree_base, prefix_base = _agreement(
            s_ids, s_mask, base.ids[i, base.prompt_width :], base.generated[i, base.prompt_width :]
        )
        agree_prefixed, prefix_prefixed = _agreement(s_ids, s_mask, prefixed_ids[i], prefixed_mask[i])
        kl = effect[effect.prompt == i].set_index("position")["kl"]
        rows.append(
            {
                "prompt": i,
                "first_token_id": int(first[i]),
                "first_token": first_tokens[i],
                "base_first_token_id": int(base.ids[i, base.prompt_width]),
                "steered_text": texts["steered"][i],
                "base_text": texts["base"][i],
                "prefixed_text": tokenizer.decode(prefixed_ids[i][prefixed_mask[i]].tolist(), skip_special_tokens=True),
                "agree_base": agree_base,
                "agree_prefixed": agree_prefixed,
                "prefix_base": prefix_base,
                "prefix_prefixed": prefix_prefixed,
                "kl_first": float(kl.loc[0]),
                "kl_rest": float(kl.drop(0).mean()) if len(kl) > 1 else float("nan"),
            }
        )
    return pd.DataFrame(rows)
