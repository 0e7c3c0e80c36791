"""How a run directory may be used: start fresh, resume, or refuse — decided before anything is loaded.

The rules that keep a run's output safe:
- without `resume`, a directory that holds any of a run (metrics, checkpoints, a summary) is refused;
- with `resume`, the newest checkpoint whose manifest verifies is used, and every newer one that does
  not is named with the reason; when checkpoints exist but none verifies, or a finished run wrote none,
  the run stops and nothing is touched (it never starts again from step 0 over earlier work);
- a run stopped before its first checkpoint saved nothing but its first steps' metrics rows, which a resume
  replaces anyway: with `resume` it starts again from step 0;
- resuming with changed result-affecting settings is refused, naming them, unless
  `allow_config_change` is set; the change is then appended to `config_changes.jsonl`;
- except the schedule's settings (`steps`, `warmup_ratio`): a run may be extended (or shortened, or its warm-up
  restated) whenever the learning rate of every step already taken stays the same. Nothing else a step computes
  depends on them (the data order comes from (seed, epoch), sampling seeds from (seed, step, problem)), so the
  resumed run equals one run with the new settings. The change is recorded in `config_changes.jsonl` as any other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlens.config import ConfigError, build_config
from steerlens.rl.checkpoint import CheckpointError, checkpoint_dirs, checkpoint_step, newest_valid
from steerlens.rl.config import RESUME_FREE_FIELDS, TrainConfig

RUN_FILES = ("metrics.jsonl", "summary.json")
CHANGES = "config_changes.jsonl"
SCHEDULE_FIELDS = ("steps", "warmup_ratio")  # what the learning-rate schedule is made of, besides `lr`


@dataclass
class ResumePlan:
    """Where to continue from (None: step 0), what was skipped and why, and allowed config changes."""

    checkpoint: Path | None = None
    skipped: list[str] = field(default_factory=list)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def holds_run(out: Path) -> bool:
    """Whether `out` holds any output of an earlier run."""
    return any((out / name).exists() for name in RUN_FILES) or bool(checkpoint_dirs(out))


def warmup_steps(steps: int, warmup_ratio: float) -> int:
    """The length of the learning-rate warm-up, in steps: `warmup_ratio` of `steps`, at least one."""
    return max(1, math.ceil(warmup_ratio * steps))


def lr_factor(step: int, warmup: int) -> float:
    """The learning rate of 0-based `step` as a fraction of `lr`: linear over `warmup` steps, then constant."""
    return min(1.0, (step + 1) / warmup)


def saved_config(saved_yaml: Path) -> TrainConfig:
    """The config a checkpoint was written with; unreadable, it is a `CheckpointError`."""
    try:
        return build_config(TrainConfig, saved_yaml)
    except ConfigError as err:
        raise CheckpointError(
            f"{saved_yaml}: the run's saved config cannot be read ({err}); "
            "cannot tell whether --resume would change its settings"
        ) from err


def config_changes(cfg: TrainConfig, saved: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Result-affecting fields whose value differs from the run's saved config: name -> (old, new)."""
    old, new = dataclasses.asdict(saved), dataclasses.asdict(cfg)
    return {k: (old[k], new[k]) for k in new if k not in RESUME_FREE_FIELDS and old.get(k) != new[k]}


def schedule_refusal(saved: TrainConfig, cfg: TrainConfig, taken: int) -> str | None:
    """Why `cfg`'s steps and warm-up cannot follow the run's `saved` ones after `taken` steps, or None when the
    learning rate of every step taken stays the same (and `cfg.steps` leaves steps to run or none)."""
    if cfg.steps < taken:
        return f"the run has already taken {_steps(taken)}"
    before, after = warmup_steps(saved.steps, saved.warmup_ratio), warmup_steps(cfg.steps, cfg.warmup_ratio)
    if all(lr_factor(s, before) == lr_factor(s, after) for s in range(taken)):
        return None
    ways = []
    span = _steps_with_warmup(before, cfg.warmup_ratio, taken)
    if span is not None:
        ways.append(f"--steps from {span[0]} to {span[1]}" if span[0] < span[1] else f"--steps {span[0]}")
    ratio = _ratio_with_warmup(before, cfg.steps)
    if ratio is not None:
        ways.append(f"--warmup-ratio {ratio:g}")
    keep = f"keep it with {' or '.join(ways)}, " if ways else ""
    return (
        f"warmup_ratio {cfg.warmup_ratio:g} of {cfg.steps} steps makes the learning-rate warm-up {_steps(after)} "
        f"instead of the run's {before}, which changes the learning rate of the {_steps(taken)} already taken; "
        f"{keep}or pass --allow-config-change to continue anyway (the change is recorded)"
    )


def _listed(changes: dict[str, tuple[Any, Any]], names: list[str]) -> str:
    return ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in names)


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _steps_with_warmup(warmup: int, ratio: float, taken: int) -> tuple[int, int] | None:
    """The step counts from `taken` on whose warm-up under `ratio` lasts `warmup` steps, as (fewest, most); None
    when there are none, or when any count would do (`ratio` 0)."""
    if ratio <= 0:
        return None
    low = max(1, taken, math.floor((warmup - 1) / ratio) - 2)  # ceil(ratio * m) == warmup: just above (warmup-1)/ratio
    while warmup_steps(low, ratio) < warmup:
        low += 1
    high = math.ceil(warmup / ratio) + 2  # ... up to warmup/ratio
    while high >= low and warmup_steps(high, ratio) > warmup:
        high -= 1
    return (low, high) if high >= low and warmup_steps(low, ratio) == warmup else None


def _ratio_with_warmup(warmup: int, steps: int) -> float | None:
    """A short warmup_ratio whose warm-up over `steps` lasts `warmup` steps (0 for one step), or None."""
    if warmup == 1:
        return 0.0
    for digits in range(1, 8):
        ratio = float(f"{(warmup - 0.5) / steps:.{digits}g}")
        if ratio < 1 and warmup_steps(steps, ratio) == warmup:
            return ratio
    return None


def plan_resume(cfg: TrainConfig) -> ResumePlan:
    """Decide how `cfg.out_dir` is used; raises `CheckpointError` (one line) when it must not be."""
    out = Path(cfg.out_dir)
    if not cfg.resume:
        if holds_run(out):
            raise CheckpointError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out-dir"
            )
        return ResumePlan()
    checkpoint, skipped = newest_valid(out)
    if checkpoint is None:
        if skipped or (out / "summary.json").exists():
            why = "; ".join(skipped) or "the run finished without writing one"
            raise CheckpointError(
                f"{out}: no checkpoint can be resumed ({why}); nothing was changed. Move the "
                "directory away to start again from step 0"
            )
        return ResumePlan()
    saved, taken = saved_config(checkpoint / "config.yaml"), checkpoint_step(checkpoint)
    changes = config_changes(cfg, saved)
    schedule = [k for k in SCHEDULE_FIELDS if k in changes]
    refusal = schedule_refusal(saved, cfg, taken) if schedule else None
    if cfg.allow_config_change:
        return ResumePlan(checkpoint, skipped, changes)
    if len(schedule) < len(changes):
        shown = _listed(changes, list(changes))
        if schedule and refusal is None:  # the schedule's change alone is fine: say so apart
            others = [k for k in changes if k not in schedule]
            shown = f"{_listed(changes, others)}; {_listed(changes, schedule)} alone would be allowed"
        raise CheckpointError(
            f"{out}: --resume with other settings than the run's ({shown}); pass "
            "--allow-config-change to continue anyway (the change is recorded)"
        )
    if refusal is not None:
        asked = " ".join(f"--{k.replace('_', '-')} {getattr(cfg, k):g}" for k in schedule)
        raise CheckpointError(f"{out}: cannot resume with {asked}: {refusal}")
    return ResumePlan(checkpoint, skipped, changes)
