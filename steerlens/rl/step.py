"""What one step works on, and how it is timed: this rank's prompts of the step (`StepPrompts`, drawn by
`batch_indices`), their sampled completions (`Rollouts`), and a clock per phase (`PhaseClock`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from steerlens.data import Problem
from steerlens.rollout import Completion


@dataclass(frozen=True)
class StepPrompts:
    """This rank's share of one step: its problems, their prompts and their sampling seeds."""

    step: int
    problems: list[Problem]
    prompts: list[str]
    seeds: list[int]  #: one per prompt, from (seed, step, global problem index): independent of batching and rank

    def sampled(self, groups: list[list[Completion]]) -> Rollouts:
        """These prompts with their sampled completions."""
        return Rollouts(self.step, self.problems, groups)


@dataclass(frozen=True)
class Rollouts:
    """One step's sampled completions on this rank: a group of `generations` per problem."""

    step: int
    problems: list[Problem]
    groups: list[list[Completion]]

    @property
    def completions(self) -> list[Completion]:
        """Every completion, prompt-major (the order of rewards and advantages)."""
        return [c for group in self.groups for c in group]

    @property
    def problem_of_each(self) -> list[Problem]:
        """Each completion's problem, in the same order."""
        return [p for p, group in zip(self.problems, self.groups, strict=True) for _ in group]


class PhaseClock:
    """Wall-clock seconds per named phase of a step (`with clock("reward"): ...`)."""

    def __init__(self, **seconds: float) -> None:
        self.seconds = dict(seconds)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def batch_indices(step: int, size: int, n_problems: int, seed: int) -> list[int]:
    """Global problem indices of a step: consecutive slices of a per-epoch shuffled order."""
    out = []
    for position in range(step * size, (step + 1) * size):
        epoch, offset = divmod(position, n_problems)
        order = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(order[offset]))
    return out


def due(step: int, every: int) -> bool:
    """Whether something done every `every` steps (0: never) is due after step `step` (0-based)."""
    return every > 0 and (step + 1) % every == 0
