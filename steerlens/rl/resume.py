"""How a run directory may be used: start fresh, resume, or refuse — decided before anything is loaded.

The rules that keep a run's output safe:
- without `resume`, a directory that holds any of a run (metrics, checkpoints, a summary) is refused;
- with `resume`, the newest checkpoint whose manifest verifies is used, and every newer one that does
  not is named with the reason; when none verifies over existing output, the run stops and nothing
  is touched (it never starts again from step 0 over earlier work);
- resuming with changed result-affecting settings is refused, naming them, unless
  `allow_config_change` is set; the change is then appended to `config_changes.jsonl`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlens.config import ConfigError, build_config
from steerlens.rl.checkpoint import CheckpointError, checkpoint_dirs, newest_valid
from steerlens.rl.config import RESUME_FREE_FIELDS, TrainConfig

RUN_FILES = ("metrics.jsonl", "summary.json")
CHANGES = "config_changes.jsonl"


@dataclass
class ResumePlan:
    """Where to continue from (None: step 0), what was skipped and why, and allowed config changes."""

    checkpoint: Path | None = None
    skipped: list[str] = field(default_factory=list)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def holds_run(out: Path) -> bool:
    """Whether `out` holds any output of an earlier run."""
    return any((out / name).exists() for name in RUN_FILES) or bool(checkpoint_dirs(out))


def config_changes(cfg: TrainConfig, saved_yaml: Path) -> dict[str, tuple[Any, Any]]:
    """Result-affecting fields whose value differs from the run's saved config: name -> (old, new)."""
    try:
        saved = build_config(TrainConfig, saved_yaml)
    except ConfigError as err:
        raise CheckpointError(
            f"{saved_yaml}: the run's saved config cannot be read ({err}); "
            "cannot tell whether --resume would change its settings"
        ) from err
    old, new = dataclasses.asdict(saved), dataclasses.asdict(cfg)
    return {k: (old[k], new[k]) for k in new if k not in RESUME_FREE_FIELDS and old.get(k) != new[k]}


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
        if holds_run(out):
            why = "; ".join(skipped) or "no checkpoint was written"
            raise CheckpointError(
                f"{out}: no checkpoint can be resumed ({why}); nothing was changed. Move the "
                "directory away to start again from step 0"
            )
        return ResumePlan(skipped=skipped)
    changes = config_changes(cfg, checkpoint / "config.yaml")
    if changes and not cfg.allow_config_change:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise CheckpointError(
            f"{out}: --resume with other settings than the run's ({listed}); pass "
            "--allow-config-change to continue anyway (the change is recorded)"
        )
    return ResumePlan(checkpoint, skipped, changes)
