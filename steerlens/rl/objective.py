"""The RLOO objective: group advantages, per-token log-probs, and the token-normalised loss."""

from __future__ import annotations

from typing import Literal

import torch

from steerlens.config import ConfigError

Baseline = Literal["rloo", "group_mean", "grpo"]


def advantages(rewards: torch.Tensor, baseline: Baseline = "rloo", eps: float = 1e-6) -> torch.Tensor:
    """Advantages for rewards shaped `[prompts, generations]`.

    rloo: `r_i - mean_{j != i} r_j` (leave-one-out); group_mean: `r_i - mean_j r_j`;
    grpo: `(r_i - mean_j r_j) / (std_j r_j + eps)`.
    """
    if rewards.ndim != 2:
        raise ConfigError(f"rewards must be [prompts, generations], got shape {tuple(rewards.shape)}")
    n = rewards.shape[1]
    mean = rewards.mean(dim=1, keepdim=True)
    if baseline == "rloo":
        if n < 2:
            raise ConfigError("the RLOO baseline needs at least 2 generations per prompt")
        return (rewards - mean) * n / (n - 1)
    if baseline == "group_mean":
        return rewards - mean
    if baseline == "grpo":
        return (rewards - mean) / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    raise ConfigError(f"unknown baseline {baseline!r}; expected rloo, group_mean or grpo")


def logprobs_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, prompt_lens: list[int], completion_lens: list[int]
) -> torch.Tensor:
    """Per-token log-probs (fp32) of each row's completion; zero beyond its length.

    `input_ids[b]` is prompt + completion (right-padded); `logits` come from one forward pass on it.
    Returns `[batch, max_completion_len]`.
    """
    width = max(completion_lens)
    out = torch.zeros(len(prompt_lens), width, dtype=torch.float32, device=logits.device)
    for b, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        step_logits = logits[b, p - 1 : p - 1 + c].float()
        targets = input_ids[b, p : p + c]
        out[b, :c] = torch.log_softmax(step_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return out


def policy_loss(
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantage: torch.Tensor,
    total_tokens: int,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """`-sum_i A_i * sum_t log pi(y_t)` over this micro-batch, divided by the step's total token count.

    With `ref_logprobs` and `kl_coef > 0`, adds the k3 estimate of KL(pi || ref) per token, summed
    and normalised the same way. `mask` marks real (non-padding) completion tokens.
    """
    mask = mask.to(token_logprobs.dtype)
    loss = -(advantage.to(token_logprobs.dtype) * (token_logprobs * mask).sum(dim=1)).sum()
    if ref_logprobs is not None and kl_coef > 0:
        diff = (ref_logprobs - token_logprobs) * mask
        loss = loss + kl_coef * ((torch.exp(diff) - diff - 1) * mask).sum()
    return loss / max(total_tokens, 1)
