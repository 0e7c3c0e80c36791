"""Several trainings on one model and one engine, in lockstep: each step's rollouts of every run in one
engine call, each run under its own vector set; then each run learns on its own (`Trainer.learn`), with its
own parameters, optimizer, checkpoints and metrics, so it equals the run trained alone with the same seeds."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from steerlens.models import config_shape
from steerlens.rl import distributed as D
from steerlens.rl.config import TrainConfig
from steerlens.rl.job import job_context, job_model, math_problems, math_task, train
from steerlens.rl.resume import plan_resume
from steerlens.rl.step import PhaseClock
from steerlens.rl.trainer import Trainer, TrainingError, training_rollout


def train_together(trainers: list[Trainer]) -> list[dict[str, Any]]:
    """Run (or resume) several runs in lockstep on one rollout engine; returns their summaries.

    The runs must share the engine, the step count and the sampling settings, and each samples under its
    own vector set (`Trainer(..., vector_set=)`); runs resumed at different steps join when the loop
    reaches them.
    """
    first = trainers[0]
    shared = {(t.cfg.steps, t.cfg.generations, t.cfg.sampling(), t.cfg.placement, id(t.rollout)) for t in trainers}
    if len(shared) > 1:
        raise TrainingError(
            "runs trained together share one engine, their step count, generations, sampling and placement"
        )
    if len(trainers) > 1 and any(t.vector_set is None for t in trainers):
        raise TrainingError("runs trained together each need their own vector set in the engine (vector_set=)")
    starts = [t.begin() for t in trainers]
    for step in range(min(starts), first.cfg.steps):
        asked = [(t, t.prompts(step)) for t, start in zip(trainers, starts) if start <= step]
        start = time.perf_counter()
        groups = first.rollout.generate(
            [p for _, a in asked for p in a.prompts],
            first.cfg.generations,
            first.cfg.sampling(),
            seeds=[s for _, a in asked for s in a.seeds],
            vectors=[t.vector_set for t, a in asked for _ in a.prompts],
        )
        seconds = time.perf_counter() - start
        offset = 0
        for trainer, prompts in asked:
            n = len(prompts.prompts)
            trainer.learn(prompts.sampled(groups[offset : offset + n]), PhaseClock(rollout=seconds))
            offset += n
    return [trainer.finish() for trainer in trainers]


def train_runs_together(runs: list[TrainConfig], names: list[str]) -> list[dict[str, Any]]:
    """Load the model once, start one engine with a vector set per run (`names`), and `train_together`."""
    if len({run.placement for run in runs}) > 1:
        raise TrainingError("runs trained together share one engine, which adds every vector set at one placement")
    for run in runs:
        plan_resume(run)
    problems = [math_problems(run) for run in runs]
    first = runs[0]
    ctx = job_context(first)
    try:
        model, tokenizer = job_model(first, ctx)
        rollout = training_rollout(
            model, tokenizer, first, first.engine, max_vector_sets=len(runs), placement=first.placement
        )
        try:
            return train_together(
                [
                    Trainer(model, tokenizer, math_task(run, tokenizer, task), run, rollout, vector_set=name)
                    for run, task, name in zip(runs, problems, names)
                ]
            )
        finally:
            rollout.close()
    finally:
        D.shutdown(ctx)


def train_each_layer(cfg: TrainConfig, layers: list[int] | None = None, together: bool = True) -> dict[int, Path]:
    """One single-layer run per layer (default: all), in `out_dir/layer{i}`, for the pair study.

    As in the reference, every vector is trained on its own with `cfg`'s settings. By default the runs
    train together (one model, one engine, each step's rollouts of all runs in one batch);
    `together=False` trains them one after another. Finished runs are kept and interrupted ones resumed, so
    rerunning the same command completes the set. Returns layer -> vectors file.
    """
    if cfg.trainable != "steering":
        raise TrainingError(f"single-layer runs train steering vectors, not trainable={cfg.trainable}")
    num_layers = config_shape(cfg.model).num_layers
    layers = list(range(num_layers)) if layers is None else layers
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise TrainingError(f"layers {bad} do not exist: {cfg.model} has layers 0..{num_layers - 1}")
    runs = {
        layer: replace(
            cfg,
            layers=[layer],
            out_dir=str(Path(cfg.out_dir) / f"layer{layer}"),
            resume=(Path(cfg.out_dir) / f"layer{layer}").exists(),
        )
        for layer in layers
    }
    todo = {layer: run for layer, run in runs.items() if not (Path(run.out_dir) / "summary.json").is_file()}
    if todo and together:
        train_runs_together(list(todo.values()), [f"layer{layer}" for layer in todo])
    elif todo:
        for run in todo.values():
            train(run)
    return {layer: Path(run.out_dir) / "vectors.safetensors" for layer, run in runs.items()}
