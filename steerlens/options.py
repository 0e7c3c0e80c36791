"""Option groups shared by the jobs' configs: the model and engine, the data and its reward, sampling.

`TrainConfig` and `EvalConfig` inherit these, so each shared option is declared (and documented) once,
and YAML files and `--key value` flags stay flat.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from steerlens.config import option
from steerlens.data import DataError, Problem
from steerlens.models import context_length, resolve_model
from steerlens.rollout import Sampling, encode_prompt
from steerlens.task import template_prompt

LOG = logging.getLogger("steerlens")
LISTED = 5  # too-long problems named in the line; the rest are counted


@dataclass
class ModelOptions:
    """Which model, in which dtype, on which generation engine.

    - `model`: the base model: a short name (`toy-arith`, `smollm2-135m`), a local checkpoint directory, or a
      hub id.
    - `dtype`: the model's dtype; training log-probs are always computed in fp32.
    - `engine`: the generation engine: `vllm` (the steering is held in the engine and updated in place) or
      `hf` (HF `generate`); `auto` is vLLM if it is installed.
    - `gpu_memory_utilization`: vLLM's memory fraction on a GPU, its KV-cache share on a CPU.
    - `max_model_len`: vLLM's context in tokens (prompt + completion); by default the model's own. A long
      native context (Qwen2.5-14B: 131072) can need more KV cache than the engine's share holds, and vLLM then
      refuses to start: set it to the prompts' room + `max_new_tokens`.
    """

    model: str = option("toy-arith", "base model: short name (toy-arith, smollm2-135m), local directory or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "model dtype (training log-probs are always computed in fp32)"
    )
    engine: Literal["auto", "vllm", "hf"] = option(
        "auto", "generation engine: vllm, hf (generate), or auto (vLLM if installed)"
    )
    gpu_memory_utilization: float = option(0.3, "vLLM memory fraction (GPU) / KV-cache share (CPU)")
    max_model_len: int | None = option(None, "vLLM context in tokens, prompt + completion (default: the model's own)")


@dataclass
class DataOptions:
    r"""How problems are read, prompted and scored.

    - `problem_key`, `answer_key`: the columns holding the problem and the gold answer; by default they are
      recognised from common names per dataset.
    - `template`: the prompt template: `chat` (a system prompt asks for `\boxed{}`), `r1` (plain, for base
      models), or `auto`.
    - `bad_answers`: gold answers of a dataset file that math-verify cannot read, on which no completion could
      ever be scored correct: `error` stops before the run and lists them, `drop` leaves those problems out,
      `keep` keeps them; they are reported either way.
    - `answer_fallback`: a completion without a `\boxed{}` (or `<answer>`) answer: `none` scores it wrong (the
      paper); `last_number` verifies its last number instead, for models that compute but never box (the
      boxed share is reported as `formatted_rate`).
    - `too_long`: problems whose prompt (after the template, in the model's tokens) leaves no room for
      `max_new_tokens` in the engine's context (`max_model_len`, else the model's own): `error` stops before
      the engine starts, naming them (index and length) in one line per file; `skip` leaves them out of
      generation and says so in that line; an evaluation records each as wrong, in rows marked `skipped`,
      training leaves them out.
    """

    problem_key: str | None = option(None, "column holding the problem (default: recognised per dataset)")
    answer_key: str | None = option(None, "column holding the gold answer (default: recognised per dataset)")
    template: Literal["auto", "chat", "r1"] = option(
        "auto", "prompt template: chat (asks for \\boxed{}), r1 (plain, for base models), auto"
    )
    bad_answers: Literal["error", "drop", "keep"] = option(
        "error", "gold answers math-verify cannot read: error (stop, listing them), drop or keep"
    )
    answer_fallback: Literal["none", "last_number"] = option(
        "none", "a completion without a boxed answer: none = wrong, last_number = its last number verified"
    )
    too_long: Literal["error", "skip"] = option(
        "error", "prompts too long for the context with max_new_tokens: error (stop, listing them) or skip (wrong)"
    )


@dataclass
class SamplingOptions:
    """How completions are sampled (training rollouts; evaluation with decoding=sample).

    - `max_new_tokens`: the completion length cap in tokens (the paper: up to 4096 for Qwen2.5-Math, 32768
      for the others).
    - `temperature`: the sampling temperature, > 0; greedy decoding is its own setting (`decoding` in
      evaluation).
    - `top_p`: nucleus sampling's probability mass.
    """

    max_new_tokens: int = option(
        48, "completion length cap in tokens (paper: up to 4096 for Qwen2.5-Math, 32768 for others)"
    )
    temperature: float = option(1.0, "sampling temperature (> 0; greedy decoding is its own setting)")
    top_p: float = option(1.0, "nucleus sampling")

    def sampling(self) -> Sampling:
        """These options as the engines' `Sampling`."""
        return Sampling(self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)

    def greedy_sampling(self) -> Sampling:
        return Sampling.greedy(self.max_new_tokens)


class SharedOptions(ModelOptions, DataOptions, SamplingOptions):
    """Every shared group: what a job's config inherits (for type hints)."""


def option_checks(opts: SharedOptions) -> list[tuple[bool, str]]:
    """The shared options' range checks, as (ok, message) pairs for a config's `__post_init__`."""
    return [
        (0 < opts.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
        (
            opts.max_model_len is None or opts.max_model_len > opts.max_new_tokens,
            "max_model_len must exceed max_new_tokens (it holds the prompt and the completion)",
        ),
        (opts.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
        (opts.temperature > 0, "temperature must be > 0 (greedy decoding is decoding=greedy in eval)"),
        (0 < opts.top_p <= 1, "top_p must be in (0, 1]"),
    ]


def too_long_problems(problems: Sequence[Problem], source: str, opts: SharedOptions, tokenizer: Any) -> dict[int, int]:
    """The problems of `source` whose prompt cannot be generated from in full: index -> prompt tokens.

    A prompt is counted in the tokenizer's ids after the template (as the engines encode it) and must leave
    `max_new_tokens` in the engine's context (`max_model_len`, else the model's own), so every problem gets the
    same completion budget: vLLM refuses a longer prompt, and cuts short a completion that runs into the end of
    its context. `opts.too_long` decides: `error` raises one line naming them (index and length), `skip` logs
    that line and returns them for the caller to leave out. Nothing to check for a model without a context."""
    context = opts.max_model_len or context_length(opts.model)
    if context is None or not problems:
        return {}
    room = context - opts.max_new_tokens
    prompt = template_prompt(tokenizer, opts.template)
    lengths = {i: len(encode_prompt(tokenizer, prompt(problem))) for i, problem in enumerate(problems)}
    long = {i: n for i, n in lengths.items() if n > room}
    if not long:
        return {}
    where = f"max_model_len {context}" if opts.max_model_len else f"the model's context of {context}"
    named = ", ".join(f"problem {i} ({n} tokens)" for i, n in list(long.items())[:LISTED])
    more = f" and {len(long) - LISTED} more" if len(long) > LISTED else ""
    message = (
        f"{source}: {len(long)} of {len(problems)} prompts leave no room for max_new_tokens {opts.max_new_tokens} "
        f"in {where} tokens (at most {max(room, 0)} prompt tokens): {named}{more}"
    )
    if opts.too_long == "error":
        raise DataError(f"{message}; shorten or remove them, raise --max-model-len, or pass --too-long skip")
    LOG.warning("%s; skipped them (an evaluation scores them wrong, training leaves them out)", message)
    return long


@functools.lru_cache(maxsize=4)
def model_tokenizer(model: str) -> Any:
    """The tokenizer of `model` (a short name, directory or hub id), loaded once per model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))


def fitting_problems(problems: Sequence[Problem], source: str, opts: SharedOptions) -> list[Problem]:
    """`problems` without those too long for the engine's context (see `too_long_problems`; `error` raises)."""
    long = too_long_problems(problems, source, opts, model_tokenizer(opts.model))
    kept = [problem for i, problem in enumerate(problems) if i not in long]
    if problems and not kept:
        raise DataError(f"{source}: no problem fits the engine's context; nothing is left to generate from")
    return kept
