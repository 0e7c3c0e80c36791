"""The memory-bounded update: micro-batches by a token budget, and policy log-probs that never hold a
`[tokens, vocab]` tensor for the whole micro-batch.

Only the completion positions are unembedded, a chunk of tokens at a time, each chunk recomputed in the
backward pass (activation checkpointing), so the log-prob step's peak is bounded by `chunk_tokens x vocab`
instead of growing with `batch x sequence x vocab`. Sequences are sorted by length before they are
grouped, so little padding is computed. Decoder-layer checkpointing (HF's gradient checkpointing) is a
switch of its own (`checkpointing`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

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


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_lens: list[int], completion_lens: list[int], chunk_tokens: int = 1024) -> torch.Tensor:
    """Per-token log-probs (fp32) of each row's completion, `[batch, max_completion_len]`, zero beyond
    its length: the same numbers as the model's full logits would give, from completion positions only."""
    hidden = decoder_trunk(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = torch.tensor([b for b, c in enumerate(completion_lens) for _ in range(c)], device=hidden.device)
    steps = torch.tensor([t for c in completion_lens for t in range(c)], device=hidden.device)
    starts = torch.tensor(prompt_lens, device=hidden.device)[rows]
    picked = hidden[rows, starts - 1 + steps]  # the position that predicts completion token t
    targets = input_ids[rows, starts + steps]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    pieces = [checkpoint(_chunk_logprobs, picked[s : s + chunk_tokens], targets[s : s + chunk_tokens], head, softcap,
                         use_reentrant=False)
              for s in range(0, len(targets), chunk_tokens)]
    out = torch.zeros(len(completion_lens), max(completion_lens), dtype=torch.float32, device=hidden.device)
    out[rows, steps] = torch.cat(pieces) if pieces else out.new_zeros(0)
    return out


def micro_batch_loss(policy: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: list[int],
                     completion_lens: list[int], advantage: torch.Tensor, total_tokens: int, chunk_tokens: int = 1024,
                     kl_coef: float = 0.0) -> torch.Tensor:
    """The policy loss of one right-padded micro-batch, ready for `backward()`: completion log-probs masked
    to each row's length and, with `kl_coef > 0`, the KL to `policy.base_policy()` (its log-probs without
    gradient). One function for the trainer and the benches, so what they measure is what trains."""
    logp = sequence_logprobs(policy.model, input_ids, attention_mask, prompt_lens, completion_lens, chunk_tokens)
    lengths = torch.tensor(completion_lens, device=logp.device)
    mask = torch.arange(logp.shape[1], device=logp.device)[None] < lengths[:, None]
    ref = None
    if kl_coef > 0:
        with torch.no_grad(), policy.base_policy() as base:
            ref = sequence_logprobs(base, input_ids, attention_mask, prompt_lens, completion_lens, chunk_tokens)
    return policy_loss(logp, mask, advantage.to(logp.device), total_tokens, ref, kl_coef)


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
