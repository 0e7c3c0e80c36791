"""Verifiable math reward: math-verify on the last `\\boxed{}` (or `<answer>` block) against the gold answer.

`fallback="last_number"` reads the completion's last number when it holds no answer in the asked-for
format: a documented relaxation for models that compute but never box (SmolLM2-135M writes "#### 7").

math-verify bounds its own work with `signal.alarm`, which only works in a process's main thread,
so `RewardScorer` verifies in a pool of worker processes (each task runs in a worker's main thread),
one chunk of completions per worker, with a wall-clock backstop per chunk: a chunk that still
overruns is counted wrong and the pool is replaced. Tiny batches are verified in-process when the
caller is itself a main thread.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import re
import threading
from typing import Literal

from steerlens.errors import SteerlensError


class RewardError(SteerlensError, ValueError):
    """Completions and gold answers that cannot be scored together."""


AnswerFormat = Literal["boxed", "answer_tag"]
Fallback = Literal["none", "last_number"]
TAIL_CHARS = 20_000  # only the end of a completion can hold its last answer
BOX_OPENERS = ("\\boxed", "\\fbox")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces allowed); None if absent or unbalanced."""
    text = text[-TAIL_CHARS:]
    start = max(text.rfind(opener + "{") for opener in BOX_OPENERS)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_answer_tag(text: str) -> str | None:
    """Content of the last `<answer>...</answer>` block (the r1 template's answer), None if absent."""
    found = ANSWER_TAG.findall(text[-TAIL_CHARS:])
    return found[-1].strip() if found else None


def extract_last_number(text: str) -> str | None:
    """The last number in the text (thousands separators dropped; `3/4` and `-2.5` kept whole), None if none."""
    found = NUMBER.findall(text[-TAIL_CHARS:])
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str, answer_format: AnswerFormat = "boxed", fallback: Fallback = "none") -> str | None:
    """The final answer a completion commits to, in the given format (else the fallback's reading)."""
    if answer_format == "answer_tag":
        tagged = extract_answer_tag(text)
        answer = extract_boxed(tagged) or tagged if tagged is not None else None
    else:
        answer = extract_boxed(text)
    if not answer and fallback == "last_number":
        return extract_last_number(text)
    return answer


def is_correct(
    completion: str, gold: str, answer_format: AnswerFormat = "boxed", timeout_s: int = 5, fallback: Fallback = "none"
) -> bool:
    """Whether the completion's final answer equals `gold` according to math-verify (no answer: False)."""
    from math_verify import parse, verify

    answer = extract_answer(completion, answer_format, fallback)
    if not answer:
        return False
    try:
        target = parse("\\boxed{" + answer + "}", parsing_timeout=timeout_s)
        reference = parse("\\boxed{" + gold + "}", parsing_timeout=timeout_s)
        return bool(target) and bool(reference) and bool(verify(reference, target, timeout_seconds=timeout_s))
    except Exception:  # math-verify raises on pathological input despite raise_on_error=False
        return False


def _score_chunk(
    items: list[tuple[str, str]], answer_format: AnswerFormat, timeout_s: int, fallback: Fallback
) -> list[bool]:
    return [is_correct(completion, gold, answer_format, timeout_s, fallback) for completion, gold in items]


class RewardScorer:
    """Verifies batches of completions without ever hanging the caller."""

    def __init__(
        self,
        answer_format: AnswerFormat = "boxed",
        workers: int = 2,
        timeout_s: int = 5,
        in_process_below: int = 8,
        fallback: Fallback = "none",
    ) -> None:
        self.answer_format = answer_format
        self.fallback = fallback
        self.workers = max(1, workers)
        self.timeout_s = timeout_s
        self.in_process_below = in_process_below
        self._pool: futures.ProcessPoolExecutor | None = None

    def _executor(self) -> futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: forking a process that holds torch / vLLM threads is unsafe
            self._pool = futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def extract(self, completion: str) -> str | None:
        """The answer this scorer verifies (fallback included)."""
        return extract_answer(completion, self.answer_format, self.fallback)

    def formatted(self, completion: str) -> bool:
        """Whether the completion gives an answer in the asked-for format (without the fallback)."""
        return bool(extract_answer(completion, self.answer_format))

    def score(self, completions: list[str], golds: list[str]) -> list[bool]:
        """One verdict per completion."""
        if len(completions) != len(golds):
            raise RewardError(f"{len(completions)} completions for {len(golds)} gold answers")
        items = [(c[-TAIL_CHARS:], g) for c, g in zip(completions, golds)]
        if len(items) < self.in_process_below and threading.current_thread() is threading.main_thread():
            return _score_chunk(items, self.answer_format, self.timeout_s, self.fallback)
        size = -(-len(items) // self.workers) if items else 1
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        pool = self._executor()
        jobs = [pool.submit(_score_chunk, chunk, self.answer_format, self.timeout_s, self.fallback) for chunk in chunks]
        verdicts: list[bool] = []
        broken = False
        for chunk, job in zip(chunks, jobs):
            try:
                # math-verify stops each parse/verify at timeout_s; this backstop covers everything else
                verdicts.extend(job.result(timeout=60 + 3 * self.timeout_s * len(chunk)))
            except (futures.TimeoutError, futures.process.BrokenProcessPool):
                verdicts.extend([False] * len(chunk))
                broken = True
        if broken:
            self._kill_pool()
        return verdicts

    def _kill_pool(self) -> None:
        if self._pool is not None:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
