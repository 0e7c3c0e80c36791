"""The learning-signal monitor: tells a bad recipe from a bad method while the run is going.

A prompt group whose samples all get the same reward has zero advantages and gives no gradient. When most
groups are like that for several steps in a row, RLOO is not learning for lack of signal, whatever the
method could do: the monitor says so once, with what to change.
"""

from __future__ import annotations

from steerlens.rl.report import StepMetrics

WARN_SHARE = 0.5  # "most groups"
WARN_STEPS = 3  # "several steps in a row"


class SignalMonitor:
    """Watches each step's `no_signal_share` and returns a warning (once per streak) when it stays above
    `share` for `steps` steps running."""

    def __init__(self, share: float = WARN_SHARE, steps: int = WARN_STEPS) -> None:
        self.share, self.steps = share, steps
        self.streak = 0

    def observe(self, metrics: StepMetrics) -> str | None:
        """The warning to show after this step, if any."""
        self.streak = self.streak + 1 if metrics.no_signal_share > self.share else 0
        if self.streak != self.steps:
            return None
        return (
            f"step {metrics.step}: {metrics.no_signal_share:.0%} of prompt groups gave no learning signal (all "
            f"their rewards equal) for {self.steps} steps running; {advice(metrics)}"
        )


def advice(metrics: StepMetrics) -> str:
    """What to change, read from the step's outcomes: all wrong or all right, and whether the budget cuts them."""
    if metrics.accuracy > 0.5:
        return "the task is too easy for the policy: use harder problems"
    steps = ["more samples per prompt (--generations)"]
    if metrics.truncation_rate > 0.5:
        steps.append(f"a longer token budget ({metrics.truncation_rate:.0%} of completions hit --max-new-tokens)")
    steps += ["an easier task", "a lower --lr if the reward fell"]
    return "try " + ", ".join(steps)
