"""Rollout engines: sample completions from a (steered) model with vLLM, or HF `generate` as fallback.

Both engines take prompt strings, tokenize them the same way (`encode_prompt`), sample with the same
parameters, and return token ids that include the stop token, so the trainer can recompute the exact
log-probabilities of what was sampled.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from steerlens.anatomy import model_shape
from steerlens.backends.hf import attach
from steerlens.backends.vector_bank import BASE, SetChoice, VectorSetError, per_prompt
from steerlens.backends.vllm import DEFAULT_VECTOR_SETS, SteeredLLM, lora_engine_options, require_vllm, vllm_available
from steerlens.backends.vllm_weights import WeightPush, weight_transfer_options
from steerlens.errors import SteerlensError
from steerlens.models import load_model, resolve_model
from steerlens.vectors import SteeringVectors


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters shared by every engine; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def greedy(cls, max_new_tokens: int) -> Sampling:
        """Greedy decoding (the one definition train and eval share)."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled continuation: its prompt's token ids, its own (stop token included), text, and
    whether it hit the length cap."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    truncated: bool


class Rollout(Protocol):
    """What the trainer and the evaluator need from an engine."""

    tokenizer: Any

    def generate(
        self, prompts: list[str], n: int, sampling: Sampling, seeds: list[int] | None = None, vectors: SetChoice = None
    ) -> list[list[Completion]]:
        """`n` completions per prompt; `seeds` (one per prompt) make each prompt's samples reproducible
        whatever else is in the batch (used for exact resume and rank-independent data parallelism);
        `vectors` names the vector set of every prompt or of each (None: what `update` set; "base":
        unsteered; else a set `add` loaded)."""
        ...

    def update(self, vectors: SteeringVectors | None, name: str | None = None) -> None:
        """Steer the engine's model with `vectors` from now on (None: unsteered); with `name`, give the named
        set new values instead."""
        ...

    def add(self, name: str, vectors: SteeringVectors, scale: float = 1.0) -> None:
        """Hold `vectors` (times `scale`) as the named set `name`, for requests that ask for it."""
        ...

    def remove(self, name: str) -> None:
        """Drop the named set `name`."""
        ...

    def close(self) -> None: ...


def sample_seed(seed: int, step: int, index: int) -> int:
    """A sampling seed for prompt `index` of step `step` (or evaluation pass), independent of batching and rank;
    HF rollouts seed sample `j` of a prompt seeded `s` with `sample_seed(s, 0, j)`."""
    return (seed * 1_000_003 + step * 100_003 + index) % (2**31 - 1)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt; BOS is added only if the tokenizer has one and the text lacks it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = isinstance(bos, str) and bool(bos) and not text.startswith(bos)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def stop_token_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS plus the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(ids)


class RowSeededSampler(LogitsProcessor):
    """A logits processor that samples each row with its own seeded generator and leaves only that token
    (every other logit -inf), so a batched greedy `generate` returns seeded samples: one call for many
    prompts, and each row's draws depend on its seed alone, not on what else is in the batch.

    The sampling is HF's `do_sample` with `temperature` and `top_p` (the smallest set of tokens whose
    probability reaches `top_p`, the most likely always kept)."""

    def __init__(self, seeds: list[int], sampling: Sampling) -> None:
        self.seeds = seeds
        self.temperature, self.top_p = sampling.temperature, sampling.top_p
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.generators:  # on the logits' device, at the first step
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            ordered, order = probs.sort(dim=-1, descending=True)
            before = ordered.cumsum(dim=-1) - ordered  # mass of the more likely tokens
            ordered[before >= self.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
        chosen = torch.cat(
            [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators, strict=True)]
        )
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen[:, None], 0.0)


class HFRollout:
    """Sampling with `model.generate`; steering is whatever is attached to `model` (the trainer shares its
    hooked model, so nothing is pushed), plus what `update` attaches."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 64) -> None:
        self.model: Any = model  # an HF causal LM (generate)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stops = stop_token_ids(tokenizer, model)
        self._sets: dict[str, tuple[SteeringVectors, float]] = {}  # name -> (values as given, scale)
        self._own_handle: Any = None
        self._own: SteeringVectors | None = None

    def update(self, vectors: SteeringVectors | None, name: str | None = None) -> None:
        """Attach `vectors` to the model (replacing what this engine attached before); with `name`, give that
        set new values (at the scale it was added with)."""
        if name is not None:
            scale = self._held(name)[1]
            self._sets[name] = (
                vectors if vectors is not None else SteeringVectors.zeros(model_shape(self.model)),
                scale,
            )
            return
        if self._own_handle is not None:
            self._own_handle.remove()
            self._own_handle = None
        if vectors is not None:
            self._own_handle = attach(self.model, vectors)
        self._own = vectors

    def add(self, name: str, vectors: SteeringVectors, scale: float = 1.0) -> None:
        """Hold `vectors` times `scale` as set `name`; requests under it run with them attached instead."""
        if name == BASE or name in self._sets:
            raise VectorSetError(f"cannot add a vector set named {name!r}: the name is taken")
        self._sets[name] = (vectors, scale)

    def remove(self, name: str) -> None:
        self._held(name)
        del self._sets[name]

    def _held(self, name: str) -> tuple[SteeringVectors, float]:
        """Set `name`'s values and scale; a one-line error listing the sets when there is none of that name."""
        if name not in self._sets:
            raise VectorSetError(f"no vector set named {name!r}; available: {', '.join([BASE, *self._sets])}")
        return self._sets[name]

    @contextmanager
    def _steered_by(self, name: str | None) -> Iterator[None]:
        """Run the block with set `name` attached in place of this engine's own vectors (None: as they are)."""
        if name is None:
            yield
            return
        own = self._own
        values, scale = (None, 0.0) if name == BASE else self._held(name)
        self.update(None if values is None else values.scale(scale))
        try:
            yield
        finally:
            self.update(own)

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""

    def generate(
        self, prompts: list[str], n: int, sampling: Sampling, seeds: list[int] | None = None, vectors: SetChoice = None
    ) -> list[list[Completion]]:
        """The prompts of each vector set in turn (HF hooks steer the whole batch, so one set at a time)."""
        if seeds is not None and len(seeds) != len(prompts):
            raise SteerlensError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts (one seed per prompt)")
        names = per_prompt(vectors, len(prompts))
        for name in names:
            if name not in (None, BASE):
                self._held(name)
        results: list[list[Completion]] = [[] for _ in prompts]
        for name in dict.fromkeys(names):
            rows = [i for i, other in enumerate(names) if other == name]
            with self._steered_by(name):
                groups = self._generate(
                    [prompts[i] for i in rows], n, sampling, None if seeds is None else [seeds[i] for i in rows]
                )
            for i, group in zip(rows, groups):
                results[i] = group
        return results

    @torch.no_grad()
    def _generate(
        self, prompts: list[str], n: int, sampling: Sampling, seeds: list[int] | None
    ) -> list[list[Completion]]:
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        if seeds is None and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        flat = [ids for ids in encoded for _ in range(n)]
        row_seeds = (
            None if seeds is None or sampling.is_greedy else [sample_seed(s, 0, j) for s in seeds for j in range(n)]
        )
        out: list[Completion] = []
        for start in range(0, len(flat), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            out.extend(self._generate_batch(flat[chunk], sampling, None if row_seeds is None else row_seeds[chunk]))
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(
        self, batch: list[list[int]], sampling: Sampling, row_seeds: list[int] | None = None
    ) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        extra: dict[str, Any] = {}
        if row_seeds is not None:  # our sampler leaves one token per row, which greedy decoding then takes
            extra["logits_processor"] = LogitsProcessorList([RowSeededSampler(row_seeds, sampling)])
        greedy = sampling.is_greedy or row_seeds is not None
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
            **extra,
        )[:, width:].tolist()
        completions = []
        for prompt, row in zip(batch, generated, strict=True):
            ids: list[int] = []
            for token in row:
                ids.append(token)
                if token in self.stops:
                    break
            truncated = ids[-1] not in self.stops if ids else True
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            completions.append(Completion(prompt, ids, text, truncated))
        return completions


class VLLMRollout:
    """Sampling with a vLLM engine whose steered model holds the vectors in place (see backends.vllm)."""

    def __init__(self, engine: SteeredLLM, tokenizer: Any) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.stops = stop_token_ids(tokenizer)
        self._adapters: Path | None = None  # where `update_adapter` saves, created at its first push
        self._pushes = 0
        self._weights: WeightPush | None = None  # `update_weights`'s transfer, built at its first push

    def update(self, vectors: SteeringVectors | None, name: str | None = None) -> None:
        """Copy new values into the engine's default set (None: unsteered), or into the named set `name`."""
        if name is not None:
            self.engine.update(name, vectors if vectors is not None else self.engine.zeros())
        elif vectors is None:
            self.engine.remove()
        else:
            self.engine.update(vectors)

    def add(self, name: str, vectors: SteeringVectors, scale: float = 1.0) -> None:
        """Load `vectors` into the engine's bank as set `name` (see `SteeredLLM.add`)."""
        self.engine.add(name, vectors, scale)

    def remove(self, name: str) -> None:
        self.engine.remove(name)

    def update_adapter(self, model: Any) -> None:
        """Serve the LoRA adapter of the peft `model` as it is now: saved to a new folder of this engine's
        own, loaded under a new id (the previous folder is kept while vLLM may still read it)."""
        if self._adapters is None:
            self._adapters = Path(tempfile.mkdtemp(prefix="steerlens-adapters-"))
        self._pushes += 1
        folder = self._adapters / f"v{self._pushes}"
        model.save_pretrained(folder)
        self.engine.load_adapter(folder)
        shutil.rmtree(self._adapters / f"v{self._pushes - 2}", ignore_errors=True)

    def update_weights(self, model: nn.Module) -> None:
        """Load every weight of the HF `model` as it is now into the engine (full tuning; CUDA vLLM started with
        `full_weights`, see `backends.vllm_weights`)."""
        if self._weights is None or self._weights.model is not model:
            self._weights = WeightPush(self.engine, model)
        self._weights.push()

    def close(self) -> None:
        """Shut the engine's processes down (and delete the adapter folders)."""
        self.engine.close()
        if self._adapters is not None:
            shutil.rmtree(self._adapters, ignore_errors=True)

    def generate(
        self, prompts: list[str], n: int, sampling: Sampling, seeds: list[int] | None = None, vectors: SetChoice = None
    ) -> list[list[Completion]]:
        """One engine batch, each prompt under its own vector set."""
        from vllm import SamplingParams

        greedy = sampling.is_greedy

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
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        results = self.engine.generate([{"prompt_token_ids": ids} for ids in encoded], per_request, vectors=vectors)
        return [
            [Completion(ids, list(o.token_ids), o.text, o.finish_reason == "length") for o in result.outputs]
            for ids, result in zip(encoded, results, strict=True)
        ]


def use_vllm(engine: str) -> bool:
    """Whether an engine choice ("auto", "vllm", "hf") means vLLM here; "vllm" without vLLM raises."""
    if engine not in ("auto", "vllm", "hf"):
        raise SteerlensError(f"engine must be 'auto', 'vllm' or 'hf', got {engine!r}")
    if engine == "vllm":
        require_vllm()
    return engine == "vllm" or (engine == "auto" and vllm_available())


def make_rollout(
    model: nn.Module | str | Path,
    tokenizer: Any = None,
    engine: str = "auto",
    vectors: SteeringVectors | None = None,
    dtype: str = "float32",
    gpu_memory_utilization: float = 0.3,
    batch_size: int = 64,
    seed: int = 0,
    max_model_len: int | None = None,
    lora_rank: int | None = None,
    max_vector_sets: int = DEFAULT_VECTOR_SETS,
    full_weights: bool = False,
    placement: str | None = None,
) -> Rollout:
    """The one engine factory: vLLM or HF `generate` ("auto": vLLM when installed) for `model`.

    `model` is a loaded HF model (with its `tokenizer`; HF generation then shares it, hooks and all,
    and vLLM loads the same checkpoint directory) or a name/path, loaded here. `vectors` steer the
    engine from the start; `seed` is vLLM's engine seed (requests carry their own seeds); `max_model_len`
    caps vLLM's context (None: the model's own); `lora_rank` starts vLLM ready to serve a LoRA adapter of
    that rank (`VLLMRollout.update_adapter`); `max_vector_sets` sizes vLLM's bank of named sets (`add`);
    `full_weights` starts vLLM ready to take a fully tuned model's weights (`VLLMRollout.update_weights`; CUDA only,
    refused in one line elsewhere); `placement` is where vLLM adds vectors (None: where `vectors` are added, else
    the layer's output).
    """
    if isinstance(model, nn.Module):
        config: Any = model.config
        source = str(config._name_or_path)
    else:
        source = resolve_model(model)
    if use_vllm(engine):
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
        options: dict[str, Any] = {} if max_model_len is None else {"max_model_len": max_model_len}
        if lora_rank is not None:
            options.update(lora_engine_options(lora_rank))
        if full_weights:
            options.update(weight_transfer_options(model if isinstance(model, nn.Module) else None))
        llm = SteeredLLM(
            source,
            vectors,
            max_vector_sets,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            placement=placement,
            **options,
        )
        return VLLMRollout(llm, tokenizer)
    if not isinstance(model, nn.Module):
        model, tokenizer = load_model(source, dtype=dtype)
    rollout = HFRollout(model, tokenizer, batch_size=batch_size)
    if vectors is not None:
        rollout.update(vectors)
    return rollout
