"""What a run reports: one `StepMetrics` row per step in `metrics.jsonl`, a `RunSummary` at the end, and the
short human report `steerlens train` prints.

Both are typed records with documented fields; their dictionaries keep the keys `metrics.jsonl` and
`summary.json` have always had (plus new ones), so older runs still resume and read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from steerlens.vectors import SteeringVectors


@dataclass
class Scored:
    """This rank's completions of one step, flat and prompt-major, as the metrics need them; `merge` joins
    the ranks' parts."""

    rewards: list[float]
    advantages: list[float]
    correct: list[bool]
    truncated: list[bool]
    lengths: list[int]
    formatted: list[bool]  # empty when the reward does not say whether an answer is in the asked-for format
    generations: int

    @classmethod
    def merge(cls, parts: list[Scored]) -> Scored:
        """The ranks' parts joined in rank order."""
        joined = {
            f.name: [v for part in parts for v in getattr(part, f.name)] for f in fields(cls) if f.name != "generations"
        }
        return cls(**joined, generations=parts[0].generations)

    def no_signal_share(self) -> float:
        """The share of this step's prompt groups that give no gradient (`no_signal_share`)."""
        return no_signal_share(self.rewards, self.generations)


def no_signal_share(rewards: list[float], generations: int) -> float:
    """The share of prompt groups (`generations` consecutive rewards each) whose rewards are all equal: their
    advantages are zero, so they give no gradient."""
    groups = [rewards[i : i + generations] for i in range(0, len(rewards), generations)]
    return sum(max(g) == min(g) for g in groups) / len(groups)


@dataclass(frozen=True)
class UpdateResult:
    """What one optimizer step did."""

    loss: float  #: the step's policy loss, summed over micro-batches and ranks
    grad_norm: float  #: the gradient norm before clipping (NaN when the step was skipped)
    lr: float  #: the learning rate the step used
    applied: bool  #: False when the loss or a gradient was not finite and the step was skipped


@dataclass
class StepMetrics:
    """One row of `metrics.jsonl`: the step's rewards, learning signal, update and timings, over all ranks."""

    step: int  #: the step's index (0-based)
    reward_mean: float  #: mean reward of the step's completions
    accuracy: float  #: share of completions verified correct (also the "correct" outcome)
    wrong_rate: float  #: share that finished (stop token) with a wrong or unreadable answer
    truncated_wrong_rate: float  #: share that hit the token budget and were not correct
    no_signal_share: float  #: share of prompt groups with all rewards equal (no gradient from them)
    adv_mean: float  #: advantages' mean, standard deviation, minimum and maximum
    adv_std: float
    adv_min: float
    adv_max: float
    completion_len_mean: float  #: completion length in tokens, mean and maximum
    completion_len_max: int
    truncation_rate: float  #: share of completions that hit the token budget, correct or not
    loss: float
    grad_norm: float
    lr: float
    applied: bool
    seconds: dict[str, float]  #: time per phase (rollout, reward, forward_backward, sync): `time_<phase>` keys
    formatted_rate: float | None = None  #: share with an answer in the asked-for format (when the reward says)
    sync_max_logprob_diff: float | None = None  #: engine vs trainer log-prob gap, on steps that verified the push
    vector_norms: dict[str, float] | None = None  #: each steered layer's vector norm (steering runs)

    @classmethod
    def of(
        cls,
        step: int,
        scored: Scored,
        update: UpdateResult,
        seconds: dict[str, float],
        sync_diff: float | None,
        vectors: SteeringVectors | None,
    ) -> StepMetrics:
        """The row of a step from its scored completions (all ranks), its update, timings and push check."""
        n = len(scored.rewards)
        adv = scored.advantages
        adv_mean = sum(adv) / n
        wrong = [not c for c in scored.correct]
        return cls(
            step=step,
            reward_mean=sum(scored.rewards) / n,
            accuracy=sum(scored.correct) / n,
            wrong_rate=sum(w and not t for w, t in zip(wrong, scored.truncated)) / n,
            truncated_wrong_rate=sum(w and t for w, t in zip(wrong, scored.truncated)) / n,
            no_signal_share=scored.no_signal_share(),
            adv_mean=adv_mean,
            adv_std=math.sqrt(sum((a - adv_mean) ** 2 for a in adv) / (n - 1)) if n > 1 else 0.0,
            adv_min=min(adv),
            adv_max=max(adv),
            completion_len_mean=sum(scored.lengths) / n,
            completion_len_max=max(scored.lengths),
            truncation_rate=sum(scored.truncated) / n,
            loss=update.loss,
            grad_norm=update.grad_norm,
            lr=update.lr,
            applied=update.applied,
            seconds=seconds,
            formatted_rate=sum(scored.formatted) / n if scored.formatted else None,
            sync_max_logprob_diff=sync_diff,
            vector_norms=None if vectors is None else {str(k): round(v, 5) for k, v in vectors.norms().items()},
        )

    def row(self) -> dict[str, Any]:
        """The `metrics.jsonl` row: every field, timings as `time_<phase>`, fields that do not apply left out."""
        row = {k: v for k, v in asdict(self).items() if k != "seconds" and v is not None}
        row.update({f"time_{phase}": round(s, 4) for phase, s in self.seconds.items()})
        return row


WINDOWED = ("reward_mean", "accuracy", "formatted_rate", "no_signal_share", "truncation_rate")


@dataclass
class RunSummary:
    """`summary.json`: what a finished run did, its reward and learning signal early and late, held-out
    accuracy before and after, its cost and its artefact. `*_first_steps` / `*_last_steps` are means over
    the first and the last fifth of the steps."""

    trainable: str  #: what was trained: steering, lora, tinylora or full
    trainable_parameters: int
    optimizer_state_bytes: int
    steps: int  #: steps logged in metrics.jsonl
    windows: dict[str, float]  #: `<metric>_first_steps` / `<metric>_last_steps` for each logged metric of WINDOWED
    mean_step_seconds: float
    mean_update_seconds: float
    heldout_accuracy_after: float  #: greedy accuracy on the held-out problems at the end (NaN without them)
    artefact: str  #: the vectors file (steering), adapter folder (LoRA) or model folder (full tuning)
    config: dict[str, Any]  #: the run's whole configuration
    heldout_accuracy_before: float | None = None  #: the same before training (measured on a fresh start)

    @classmethod
    def of(cls, rows: list[dict[str, Any]], **known: Any) -> RunSummary:
        """The summary of a run's `metrics.jsonl` rows and the facts known at its end."""
        return cls(
            steps=len(rows),
            windows=window_means(rows),
            mean_step_seconds=sum(sum(v for k, v in r.items() if k.startswith("time_")) for r in rows) / len(rows),
            mean_update_seconds=sum(r["time_forward_backward"] for r in rows) / len(rows),
            **known,
        )

    def as_dict(self) -> dict[str, Any]:
        """`summary.json`'s flat keys (the windows inline; the before accuracy first, when measured)."""
        out = {} if self.heldout_accuracy_before is None else {"heldout_accuracy_before": self.heldout_accuracy_before}
        for key, value in asdict(self).items():
            if key == "windows":
                out.update(value)
            elif key != "heldout_accuracy_before":
                out[key] = value
        return out


def window_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each windowed metric's mean over the first and the last fifth of `rows` (metrics not logged are left out)."""
    k = max(1, len(rows) // 5)
    head, tail = rows[:k], rows[-k:]
    out: dict[str, float] = {}
    for key in WINDOWED:
        if all(key in r for r in head + tail):
            name = key.removesuffix("_mean").removesuffix("_rate")
            out[f"{name}_first_steps"] = sum(r[key] for r in head) / len(head)
            out[f"{name}_last_steps"] = sum(r[key] for r in tail) / len(tail)
    return out


def format_report(summary: dict[str, Any]) -> str:
    """The short human report printed at the end of `steerlens train` (from `summary.json`'s keys)."""
    lines = [
        f"trained {summary['trainable']} for {summary['steps']} steps -> {summary['artefact']}",
        f"reward   (first vs last fifth of steps): {summary['reward_first_steps']:+.3f} -> "
        f"{summary['reward_last_steps']:+.3f}",
        f"accuracy (sampled, same windows):        {summary['accuracy_first_steps']:.3f} -> "
        f"{summary['accuracy_last_steps']:.3f}",
    ]
    optional = [
        ("formatted", "answers in the asked-for format:         "),
        ("truncation", "completions cut at the token budget:     "),
        ("no_signal_share", "groups without signal (equal rewards):  "),
    ]
    for name, label in optional:
        if f"{name}_first_steps" in summary:
            lines.append(f"{label}{summary[f'{name}_first_steps']:.3f} -> {summary[f'{name}_last_steps']:.3f}")
    if summary["config"]["answer_fallback"] != "none":
        lines.append(
            f"reward relaxed: answer_fallback={summary['config']['answer_fallback']} verifies the last number "
            "of completions without a formatted answer"
        )
    if "heldout_accuracy_before" in summary and not math.isnan(summary["heldout_accuracy_after"]):
        lines.append(
            f"held-out greedy accuracy:                {summary['heldout_accuracy_before']:.3f} -> "
            f"{summary['heldout_accuracy_after']:.3f}"
        )
    lines.append(
        f"trainable parameters: {summary['trainable_parameters']:,}; optimizer state: "
        f"{summary['optimizer_state_bytes']:,} bytes; mean step {summary['mean_step_seconds']:.2f} s "
        f"(update {summary['mean_update_seconds']:.3f} s)"
    )
    return "\n".join(lines)
