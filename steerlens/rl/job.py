"""A training job from its config alone: the model by name, the math task from files or generated sets,
the device and the process group. `train(cfg)` is what `steerlens train` runs."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlens.data import Problem, load_problems
from steerlens.data.generated import HELDOUT, generator_of, materialize
from steerlens.models import load_model
from steerlens.options import fitting_problems
from steerlens.rl import distributed as D
from steerlens.rl.config import TrainConfig
from steerlens.rl.resume import plan_resume
from steerlens.rl.trainer import Trainer, TrainingError
from steerlens.rollout import Rollout
from steerlens.task import MathReward, Task, check_answers

GENERATED_TRAIN_PROBLEMS = 2000


def load_split(source: str, cfg: TrainConfig, out_dir: Path, exclude: AbstractSet[str] = frozenset()) -> list[Problem]:
    """Problems from `source`; generated sets (toy-arith, word-arith, ...-heldout) are written into the run
    directory, drawn with the data seed (not the training seed), so every training seed sees the same sets."""
    n = 4 * cfg.eval_problems if source.endswith(HELDOUT) else GENERATED_TRAIN_PROBLEMS
    source = materialize(source, out_dir / "data", n, seed=cfg.data_seed)
    problems = load_problems(source, problem_key=cfg.problem_key, answer_key=cfg.answer_key)
    kept = [p for p in problems if p.problem not in exclude]
    if not kept:
        raise TrainingError(
            f"{source}: all {len(problems)} problems also appear in the training data; "
            "give --eval-data a held-out file (or null)"
        )
    return kept


def math_problems(cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
    """The job's training and held-out problems (`cfg.data`, `cfg.eval_data` minus training problems),
    their gold answers checked as `cfg.bad_answers` asks."""
    out = Path(cfg.out_dir)
    problems = load_split(cfg.data, cfg, out)
    seen = {p.problem for p in problems}
    held_out = load_split(cfg.eval_data, cfg, out, seen)[: cfg.eval_problems] if cfg.eval_data else []
    if generator_of(cfg.data) is None:
        problems = check_answers(problems, cfg.data, cfg.bad_answers)
    if cfg.eval_data and generator_of(cfg.eval_data) is None:
        held_out = check_answers(held_out, cfg.eval_data, cfg.bad_answers)
    held_out = fitting_problems(held_out, cfg.eval_data or "", cfg) if held_out else held_out
    return fitting_problems(problems, cfg.data, cfg), held_out


def math_task(cfg: TrainConfig, tokenizer: Any, split: tuple[list[Problem], list[Problem]]) -> Task:
    """The math task of a config: its training and held-out problems (`split`, from `math_problems`) and the
    math-verify reward for its prompt template."""
    problems, held_out = split
    reward = MathReward.for_template(tokenizer, cfg.template, cfg.answer_fallback, cfg.reward_correct, cfg.reward_wrong)
    return Task(problems=problems, reward=reward, prompt=cfg.template, eval_problems=held_out)


def device_type(device: str) -> str:
    """The config's device with "auto" decided: CUDA when available, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def job_context(cfg: TrainConfig) -> D.Dist:
    """The process group of a job (one process unless started by torchrun), on the config's device type."""
    return D.init_distributed(device_type(cfg.device))


def job_model(cfg: TrainConfig, ctx: D.Dist) -> tuple[nn.Module, Any]:
    """The job's model and tokenizer, on this rank's device (its own GPU under torchrun)."""
    device = device_type(cfg.device)
    if device == "cuda" and ctx.active:
        device = f"cuda:{ctx.local_rank}"
    return load_model(cfg.model, dtype=cfg.dtype, device=device)


def train(cfg: TrainConfig, rollout: Rollout | None = None) -> dict[str, Any]:
    """Run (or resume) a training job from its config alone: the model by name, the math task from
    `cfg.data`. The cheap checks (run directory, data) come before the model loads. Returns the
    summary written to `out_dir/summary.json`."""
    plan_resume(cfg)
    problems = math_problems(cfg)
    ctx = job_context(cfg)
    try:
        model, tokenizer = job_model(cfg, ctx)
        return Trainer(model, tokenizer, math_task(cfg, tokenizer, problems), cfg, rollout).train()
    finally:
        D.shutdown(ctx)
