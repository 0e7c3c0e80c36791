"""The memory-bounded update: micro-batches by a token budget, and policy log-probs that never hold a
`[tokens, vocab]` tensor for the whole micro-batch.

Only the completion positions are unembedded, a chunk of tokens at a time, each chunk recomputed in the
backward pass (activation checkpointing), so the log-prob step's peak is bounded by `chunk_tokens x vocab`
instead of growing with `batch x sequence x vocab`. Sequences are sorted by length before they are
grouped, so little padding is computed, and a prompt's generations can share one forward of the prompt.
Decoder-layer checkpointing (HF's gradient checkpointing) is a switch of its own (`layer_checkpointing`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from steerlens.errors import ModelError
from steerlens.rl.objective import policy_loss


def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_sequences: int) -> list[list[int]]:
    """Indices of `lengths` grouped so that each group, padded to its longest, holds at most `max_tokens`
    tokens and `max_sequences` sequences (a longer sequence goes alone). Longest first, so a group's
    sequences have similar lengths and the first group shows the peak."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        # the group's longest is its first (descending order): padded size = count x first length
        if groups and len(groups[-1]) < max_sequences and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def decoder_trunk(model: nn.Module) -> nn.Module:
    """The decoder stack without its unembedding (returns final-normed hidden states)."""
    get_decoder = getattr(model, "get_decoder", None)
    trunk = get_decoder() if callable(get_decoder) else None
    if not isinstance(trunk, nn.Module):
        raise ModelError(f"{type(model).__name__} has no get_decoder(): cannot compute log-probs from hidden states")
    return trunk


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None
) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lens: list[int],
    completion_lens: list[int],
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Per-token log-probs (fp32) of each row's completion, `[batch, max_completion_len]`, zero beyond
    its length: the same numbers as the model's full logits would give, from completion positions only."""
    hidden = decoder_trunk(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows, steps = _completion_positions(completion_lens, hidden.device)
    starts = torch.tensor(prompt_lens, device=hidden.device)[rows]
    picked = hidden[rows, starts - 1 + steps]  # the position that predicts completion token t
    return _scatter_logprobs(model, picked, input_ids[rows, starts + steps], rows, steps, completion_lens, chunk_tokens)


def shared_prompt_logprobs(
    model: nn.Module, prompts: list[list[int]], completions: list[list[int]], chunk_tokens: int = 1024
) -> torch.Tensor:
    """`completion_logprobs` of rows whose prompts repeat (a prompt's generations), each distinct prompt's
    forward computed once: the distinct prompts run left-padded side by side, their keys and values are
    gathered for their rows (gradients flow back through them), and the completions run on that cache.
    The last completion token predicts nothing and is not run either."""
    trunk = decoder_trunk(model)
    device = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    owner = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=device)
    prompt_lens = torch.tensor([len(p) for p in distinct], device=device)
    width_p = int(prompt_lens.max())
    pads = width_p - prompt_lens
    prompt_ids = torch.tensor([[0] * (width_p - len(p)) + list(p) for p in distinct], device=device)
    prompt_mask = (torch.arange(width_p, device=device)[None] >= pads[:, None]).long()
    positions = (torch.arange(width_p, device=device)[None] - pads[:, None]).clamp(min=0)
    prompt = trunk(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    last = prompt.last_hidden_state[owner, -1:]  # each row's prompt's last position: predicts its first token
    lens = [len(c) for c in completions]
    width = max(lens)
    targets_all = torch.tensor([c + [0] * (width - len(c)) for c in completions], device=device)
    if width > 1:
        cache = prompt.past_key_values
        cache.batch_select_indices(owner)
        steps = torch.arange(width - 1, device=device)[None]
        mask = torch.cat([prompt_mask[owner], (steps < torch.tensor(lens, device=device)[:, None] - 1).long()], dim=1)
        rest = trunk(
            input_ids=targets_all[:, :-1],
            attention_mask=mask,
            position_ids=prompt_lens[owner][:, None] + steps,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        hidden = torch.cat([last, rest], dim=1)
    else:
        hidden = last
    rows, steps_all = _completion_positions(lens, device)
    return _scatter_logprobs(
        model, hidden[rows, steps_all], targets_all[rows, steps_all], rows, steps_all, lens, chunk_tokens
    )


def _completion_positions(completion_lens: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, step) of every completion token, row-major."""
    rows = torch.tensor([b for b, c in enumerate(completion_lens) for _ in range(c)], device=device)
    steps = torch.tensor([t for c in completion_lens for t in range(c)], device=device)
    return rows, steps


def _scatter_logprobs(
    model: nn.Module,
    picked: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    steps: torch.Tensor,
    completion_lens: list[int],
    chunk_tokens: int,
) -> torch.Tensor:
    """Log-probs of `targets` from the hidden states `picked`, unembedded `chunk_tokens` at a time (each
    chunk recomputed in backward), placed at (rows, steps) of a zero `[batch, max_len]` fp32 tensor."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    pieces = [
        checkpoint(
            _chunk_logprobs,
            picked[s : s + chunk_tokens],
            targets[s : s + chunk_tokens],
            head,
            softcap,
            use_reentrant=False,
        )
        for s in range(0, len(targets), chunk_tokens)
    ]
    out = torch.zeros(len(completion_lens), max(completion_lens), dtype=torch.float32, device=picked.device)
    out[rows, steps] = torch.cat(pieces) if pieces else out.new_zeros(0)
    return out


@dataclass(frozen=True)
class MicroBatch:
    """The rows of one forward and backward pass: each row's prompt and completion token ids.
    `shared_prompt`: each distinct prompt is computed once for its rows (`shared_prompt_logprobs`)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    shared_prompt: bool = False
    pad_id: int = 0

    def logprobs(self, model: nn.Module, chunk_tokens: int = 1024) -> torch.Tensor:
        """`[rows, max_completion_len]` fp32 completion log-probs under `model`, zero beyond each length."""
        if self.shared_prompt:
            return shared_prompt_logprobs(model, self.prompts, self.completions, chunk_tokens)
        device = next(model.parameters()).device
        seqs = [p + c for p, c in zip(self.prompts, self.completions, strict=True)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs], device=device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        return completion_logprobs(
            model, ids, attention, [len(p) for p in self.prompts], [len(c) for c in self.completions], chunk_tokens
        )

    @property
    def padded_tokens(self) -> int:
        """Token positions its forward passes compute: with shared prompts the distinct prompts padded plus
        every row's completion padded; else every row, prompt and completion, padded to the longest."""
        if self.shared_prompt:
            distinct = {tuple(p) for p in self.prompts}
            return len(distinct) * max(map(len, distinct)) + len(self.prompts) * max(map(len, self.completions))
        return len(self.prompts) * max(len(p) + len(c) for p, c in zip(self.prompts, self.completions, strict=True))

    def mask(self, device: torch.device | str) -> torch.Tensor:
        """True at each row's real completion tokens."""
        lens = torch.tensor([len(c) for c in self.completions], device=device)
        return torch.arange(int(lens.max()), device=device)[None] < lens[:, None]


def micro_batches(
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    max_tokens: int,
    max_sequences: int,
    share_prompts: bool = False,
    pad_id: int = 0,
) -> list[tuple[list[int], MicroBatch]]:
    """(indices, micro-batch) pairs covering every row once, each within `max_tokens` padded tokens and
    `max_sequences` rows (a longer row goes alone). Without `share_prompts`: `token_budget_batches` over
    the full lengths. With it: each prompt's rows grouped under what the budget leaves beside one copy of
    the prompt, and such groups packed together while the distinct prompts (padded) plus the rows'
    completions (padded) fit; the rows of a batch share their prompts' forward."""
    if not share_prompts:
        groups = token_budget_batches(
            [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)], max_tokens, max_sequences
        )
        return [(g, MicroBatch([prompts[i] for i in g], [completions[i] for i in g], pad_id=pad_id)) for g in groups]
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    parts = [
        [rows[j] for j in part]
        for key, rows in by_prompt.items()
        for part in token_budget_batches(
            [len(completions[i]) for i in rows], max(1, max_tokens - len(key)), max_sequences
        )
    ]

    def batch(rows: list[int]) -> MicroBatch:
        shared = len({tuple(prompts[i]) for i in rows}) < len(rows)
        return MicroBatch([prompts[i] for i in rows], [completions[i] for i in rows], shared, pad_id)

    packed: list[list[int]] = []
    for part in parts:
        joined = packed[-1] + part if packed else []
        if joined and len(joined) <= max_sequences and batch(joined).padded_tokens <= max_tokens:
            packed[-1] = joined
        else:
            packed.append(list(part))
    return [(rows, batch(rows)) for rows in packed]


def micro_batch_loss(
    policy: Any,
    batch: MicroBatch,
    advantage: torch.Tensor,
    total_tokens: int,
    chunk_tokens: int = 1024,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """The policy loss of one micro-batch, ready for `backward()`: completion log-probs masked to each
    row's length and, with `kl_coef > 0`, the KL to `policy.base_policy()` (its log-probs without
    gradient). One function for the trainer and the benches, so what they measure is what trains."""
    logp = batch.logprobs(policy.model, chunk_tokens)
    ref = None
    if kl_coef > 0:
        with torch.no_grad(), policy.base_policy() as base:
            ref = batch.logprobs(base, chunk_tokens)
    return policy_loss(logp, batch.mask(logp.device), advantage.to(logp.device), total_tokens, ref, kl_coef)


@contextlib.contextmanager
def layer_checkpointing(model: Any, enabled: bool) -> Iterator[None]:
    """HF's decoder-layer activation checkpointing for the duration (steering hooks run inside the
    recomputation, since they are part of each layer's call)."""
    if not enabled:
        yield
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()
