"""How steerlens phrases requests to a vLLM engine and reads what comes back: a prompt with its prefix-cache
salt, sampling parameters with a vector set's slot and scale, and prompt log-probs for scoring a sequence."""

from __future__ import annotations

from typing import Any

import torch

from steerlens.errors import SteerlensError


def with_salt(prompt: Any, salt: str | None) -> Any:
    """A vLLM prompt (text or dict) carrying `cache_salt` (None: as it is)."""
    if salt is None:
        return prompt
    return {**prompt, "cache_salt": salt} if isinstance(prompt, dict) else {"prompt": prompt, "cache_salt": salt}


def with_extra_args(params: Any, args: dict[str, Any]) -> Any:
    """A copy of `SamplingParams` with `args` added to its extra args (a request's slot and scale)."""
    copy = params.clone()
    copy.extra_args = {**(params.extra_args or {}), **args}
    return copy


def scoring_params(prompt_ids: list[int], completion_ids: list[int]) -> Any:
    """`SamplingParams` that return the log-probability of every prompt token (and generate one token)."""
    from vllm import SamplingParams

    if not prompt_ids or not completion_ids:
        raise SteerlensError("engine_logprobs needs a non-empty prompt and a non-empty completion")
    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)


def scored_logprobs(output: Any, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """The completion tokens' log-probabilities in a request run with `scoring_params` (fp32, CPU)."""
    positions = output.prompt_logprobs[len(prompt_ids) :]
    return torch.tensor(
        [entry[token].logprob for entry, token in zip(positions, completion_ids, strict=True)], dtype=torch.float32
    )
