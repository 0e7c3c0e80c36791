"""What the analysis runners (`analyses/<name>/run.py`) share: their command line and their training runs.

A runner is a script, `python analyses/<name>/run.py [--config FILE] [--out DIR]`; it puts the repository
root on `sys.path` to import this module as `analyses.runner`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from steerlens.config import build_config, read_config
from steerlens.io import write_jsonl
from steerlens.rl.config import TrainConfig
from steerlens.rl.job import math_problems


def runner_settings(doc: str, folder: Path, argv: Sequence[str] | None = None) -> tuple[dict[Any, Any], Path]:
    """A runner's command line: `--config`, default `folder/config.yaml`, read with a config file's checks,
    and `--out`, default `folder/results`. Returns the settings and `out`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=folder / "config.yaml", help="the runner's settings (YAML)")
    parser.add_argument("--out", type=Path, default=folder / "results", help="where results (and runs/) go")
    args = parser.parse_args(argv)
    return read_config(args.config), args.out


def training_config(preset: Path, out_dir: Path, steps: int, **overrides: Any) -> TrainConfig:
    """The training preset for `steps` steps into `out_dir`, with no held-out report or progress bar, resuming
    what an earlier run left there (checkpoints every preset `save_every` steps, so a stopped run loses at most
    that many); `overrides` set further keys (checked as a file's)."""
    return build_config(
        TrainConfig,
        preset,
        {
            "steps": steps,
            "eval_data": None,
            "progress": False,
            "out_dir": str(out_dir),
            "resume": out_dir.exists(),
            **overrides,
        },
    )


def heldout_benchmark(preset: Path, path: Path) -> str:
    """The preset's fixed held-out set (the problems its training runs report on, the same for every training
    seed) written once to `path` (JSONL), as a `steerlens eval` benchmark entry `word-arith=<path>`."""
    if not path.is_file():
        cfg = build_config(TrainConfig, preset)
        with tempfile.TemporaryDirectory() as scratch:
            _, held_out = math_problems(replace(cfg, out_dir=scratch))
        write_jsonl(path, [{"problem": p.problem, "answer": p.answer} for p in held_out])
    return f"word-arith={path}"


def finished(cfg: TrainConfig) -> bool:
    """Whether run `cfg` has finished (its summary is written last)."""
    return (Path(cfg.out_dir) / "summary.json").is_file()


def summary_of(cfg: TrainConfig) -> dict[str, Any]:
    """The finished run's `summary.json`."""
    return json.loads((Path(cfg.out_dir) / "summary.json").read_text())
