"""What a run trains or evaluates on: problems, how each becomes a prompt, and how completions are rewarded.

A `Task` (after nanochat's) owns its data and its reward. The reward is any callable
`reward(completions, problems) -> floats`, called once per step with the whole batch, so a scorer that
batches (a classifier, a pool of verifiers) can. The default is `MathReward`: the papers' math-verify
reward on the answer format the prompt template asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from steerlens.data import DataError, Problem, answer_format, format_prompt, resolve_template
from steerlens.data.prompts import Template
from steerlens.reward import AnswerFormat, Fallback, RewardScorer

PromptFn = Callable[[Problem], str]
LOG = logging.getLogger("steerlens")


class Reward(Protocol):
    """Scores a batch: one float per completion; `completions[i]` answers `problems[i]`."""

    def __call__(self, completions: list[str], problems: list[Problem]) -> Sequence[float]: ...


class MathReward:
    """math-verify on the last `\\boxed{}` (or `<answer>` block) against each problem's gold answer.

    `correct` / `wrong` are the reward values (the reference uses +1 / -1); `fallback="last_number"`
    verifies the last number of completions without a formatted answer. Close it (or use `with`)
    to stop its verifier processes.
    """

    def __init__(
        self,
        answer_format: AnswerFormat = "boxed",
        fallback: Fallback = "none",
        correct: float = 1.0,
        wrong: float = -1.0,
    ) -> None:
        self.scorer = RewardScorer(answer_format, fallback=fallback)
        self.correct, self.wrong = correct, wrong

    @classmethod
    def for_template(
        cls,
        tokenizer: Any,
        template: Template = "auto",
        fallback: Fallback = "none",
        correct: float = 1.0,
        wrong: float = -1.0,
    ) -> MathReward:
        """The reward that reads answers where `template` (as resolved for `tokenizer`) asks for them."""
        return cls(answer_format(resolve_template(tokenizer, template)), fallback, correct, wrong)

    def verdicts(self, completions: list[str], problems: list[Problem]) -> list[bool]:
        return self.scorer.score(completions, [p.answer for p in problems])

    def __call__(self, completions: list[str], problems: list[Problem]) -> list[float]:
        return [self.correct if ok else self.wrong for ok in self.verdicts(completions, problems)]

    def is_success(self, value: float) -> bool:
        """Whether a reward value means a verified-correct answer (the accuracy metrics)."""
        return value == self.correct

    def formatted(self, completion: str) -> bool:
        """Whether the completion holds an answer in the asked-for format (`formatted_rate`)."""
        return self.scorer.formatted(completion)

    def extract(self, completion: str) -> str | None:
        return self.scorer.extract(completion)

    def close(self) -> None:
        self.scorer.close()

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_answers(
    problems: Sequence[Problem], source: str, policy: Literal["error", "drop", "keep"] = "error"
) -> list[Problem]:
    """`problems` whose gold answers math-verify can read; the others stop the run (`error`), are
    dropped, or kept, and are reported in one line with the first examples either way.

    An answer counts as readable when `\\boxed{answer}` verifies against itself, so what this passes,
    the math reward can score correct.
    """
    with RewardScorer() as scorer:
        verdicts = scorer.score([f"\\boxed{{{p.answer}}}" for p in problems], [p.answer for p in problems])
    bad = [p for p, ok in zip(problems, verdicts) if not ok]
    if not bad:
        return list(problems)
    examples = "; ".join(f"problem {p.id}: {p.answer[:40]!r}" for p in bad[:3])
    message = (
        f"{source}: {len(bad)} of {len(problems)} gold answers cannot be read by math-verify "
        f"(e.g. {examples}), so no completion can be scored correct on them"
    )
    if policy == "error":
        raise DataError(f"{message}; fix them, or pass --bad-answers drop (or keep)")
    LOG.warning("%s; %s", message, "dropped them" if policy == "drop" else "kept them")
    return [p for p, ok in zip(problems, verdicts) if ok] if policy == "drop" else list(problems)


def template_prompt(tokenizer: Any, template: Template = "auto") -> PromptFn:
    """Problem -> prompt text with a template (`auto` resolved once for `tokenizer`)."""
    resolved: Literal["chat", "r1"] = resolve_template(tokenizer, template)
    return lambda problem: format_prompt(tokenizer, problem.problem, resolved)


def is_success(reward: Reward, value: float) -> bool:
    """A reward's own notion of success (`MathReward`: verified correct), else a positive reward."""
    check = getattr(reward, "is_success", None)
    return bool(check(value)) if callable(check) else value > 0


@dataclass
class Task:
    """Problems, their prompt, and the reward; `eval_problems` feed the before/after greedy accuracy.

    `prompt` is a template name (`auto`, `chat` with the paper's system prompt, `r1`) or a function
    from a problem to the prompt text. `reward` defaults to `MathReward` for that template.
    """

    problems: Sequence[Problem]
    reward: Reward | None = None
    prompt: Template | PromptFn = "auto"
    eval_problems: Sequence[Problem] = field(default_factory=list)

    def prompt_fn(self, tokenizer: Any) -> PromptFn:
        """The prompt text for each problem, with a template name resolved for `tokenizer`."""
        return self.prompt if callable(self.prompt) else template_prompt(tokenizer, self.prompt)

    def reward_fn(self, tokenizer: Any) -> Reward:
        """The task's reward, or the math reward for its template."""
        if self.reward is not None:
            return self.reward
        return MathReward.for_template(tokenizer, self.prompt if isinstance(self.prompt, str) else "chat")
