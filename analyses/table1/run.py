"""Table 1 in miniature: SmolLM2-135M on word-arith, the base model against steering vectors (5 seeds), rank-1
LoRA on down_proj and full RL tuning (3 seeds each), with the same RLOO recipe and step budget.

    python analyses/table1/run.py        # ~4.5 hours on 2 CPU cores; a rerun keeps finished runs and resumes the rest

Method by method (steering, LoRA, full), so a stopped sweep leaves whole methods behind:
1. Sweep: the method trains at every learning rate of `sweep` with its first seed and keeps the rate with the
   higher mean training reward over the last fifth of steps (no held-out data in the choice).
2. Seeds: the kept rate trains with the other seeds (the sweep's run is the first seed). Steering runs of one
   phase train together: one engine, one vector set per run (`train_runs_together`).
3. Held-out greedy accuracy of every seed's final model on the preset's fixed held-out set, one
   `steerlens eval` folder each; the tables are rewritten after every method.
Writes results/{table1,sweep,timings}.{csv,md}, accuracy.csv, table1.html, heldout.jsonl and the steering seeds'
vectors (results/vectors/); runs and evaluations go to results/runs/ (not committed).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from steerlens.config import build_config
from steerlens.evaluation.config import EvalConfig
from steerlens.evaluation.runner import evaluate
from steerlens.evaluation.tables import combine_runs
from steerlens.io import append_jsonl, atomic_path, read_jsonl, write_json, write_text
from steerlens.rl.checkpoint import checkpoint_dirs
from steerlens.rl.config import TrainConfig
from steerlens.rl.job import train
from steerlens.rl.together import train_runs_together

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: analyses.runner
from analyses.runner import finished, heldout_benchmark, runner_settings, summary_of, training_config

HERE = Path(__file__).resolve().parent


def run_config(settings: dict[str, Any], method: str, lr: float, seed: int, out: Path) -> TrainConfig:
    """The preset with this method, learning rate and seed, for the configured steps, into its own folder."""
    run_dir = out / "runs" / method / f"lr{lr:g}-seed{seed}"
    return training_config(HERE / settings["preset"], run_dir, settings["steps"], trainable=method, lr=lr, seed=seed)


def train_all(method: str, runs: list[TrainConfig], out: Path) -> None:
    """Train the unfinished runs (steering runs together in one engine) and log how long that took; a phase that
    resumes a run from a checkpoint is marked, since its time leaves out what earlier sittings spent."""
    todo = [cfg for cfg in runs if not finished(cfg)]
    if not todo:
        return
    names = [Path(cfg.out_dir).name for cfg in todo]
    together = method == "steering" and len(todo) > 1
    resumed = any(checkpoint_dirs(Path(cfg.out_dir)) for cfg in todo)
    start = time.perf_counter()
    if together:
        train_runs_together(todo, names)
    else:
        for cfg in todo:
            train(cfg)
    append_jsonl(
        out / "runs" / "timings.jsonl",
        {
            "method": method,
            "runs": names,
            "together": together,
            "resumed": resumed,
            "seconds": time.perf_counter() - start,
        },
    )


def sweep(settings: dict[str, Any], method: str, out: Path) -> tuple[list[dict[str, Any]], float]:
    """Train `method` at every swept rate with its first seed; the sweep's rows and the kept rate."""
    seed, rates = settings["seeds"][method][0], settings["sweep"][method]
    runs = [run_config(settings, method, lr, seed, out) for lr in rates]
    train_all(method, runs, out)
    rows = []
    for lr, cfg in zip(rates, runs):
        s = summary_of(cfg)
        rows.append(
            {
                "method": method,
                "lr": lr,
                "seed": seed,
                "reward_first": s["reward_first_steps"],
                "reward_last": s["reward_last_steps"],
                "accuracy_first": s["accuracy_first_steps"],
                "accuracy_last": s["accuracy_last_steps"],
                "step_s": s["mean_step_seconds"],
            }
        )
    kept = max(rows, key=lambda row: row["reward_last"])["lr"]
    return [{**row, "kept": row["lr"] == kept} for row in rows], kept


def base_model(settings: dict[str, Any]) -> str:
    return build_config(TrainConfig, HERE / settings["preset"]).model


def eval_config(settings: dict[str, Any], model: str, out_dir: Path, label: str, **extra: Any) -> EvalConfig:
    """The configured evaluation of `model` on the fixed held-out set into `out_dir`, labelled `label` in the
    table; `extra` sets more keys."""
    benchmark = heldout_benchmark(HERE / settings["preset"], HERE / "results" / "heldout.jsonl")
    keys = {**settings["eval"], "benchmarks": [benchmark], "model": model, "label": label, "out_dir": str(out_dir)}
    return build_config(EvalConfig, None, {**keys, **extra})


def evaluated(folder: Path) -> bool:
    return (folder / "scores.csv").is_file()


def evaluate_base(settings: dict[str, Any], out: Path) -> Path:
    """Held-out greedy accuracy of the untrained model; its evaluation folder."""
    folder = out / "runs" / "eval" / "base"
    if not evaluated(folder):
        evaluate(eval_config(settings, base_model(settings), folder, "base"))
    return folder


def evaluate_method(settings: dict[str, Any], method: str, lr: float, out: Path) -> dict[int, Path]:
    """Held-out greedy accuracy of every seed's final model of `method`; seed -> evaluation folder."""
    model, folders = base_model(settings), {}
    for seed in settings["seeds"][method]:
        run_dir = Path(run_config(settings, method, lr, seed, out).out_dir)
        folder = folders[seed] = out / "runs" / "eval" / method / f"seed{seed}"
        if evaluated(folder):
            continue
        if method == "steering":
            cfg = eval_config(settings, model, folder, method, vectors=str(run_dir / "vectors.safetensors"))
        elif method == "lora":
            cfg = eval_config(settings, model, folder, method, adapter=str(run_dir / "lora"))
        else:
            cfg = eval_config(settings, str(run_dir / "model"), folder, method, model_label=model)
        evaluate(cfg)
    return folders


def keep_vectors(settings: dict[str, Any], lr: float, out: Path) -> None:
    """Commit-sized copies of the steering seeds' final vectors (results/vectors/), for the mechanisms analyses."""
    for seed in settings["seeds"]["steering"]:
        run_dir = Path(run_config(settings, "steering", lr, seed, out).out_dir)
        with atomic_path(out / "vectors" / f"steering-seed{seed}.safetensors") as tmp:
            shutil.copyfile(run_dir / "vectors.safetensors", tmp)  # a byte copy: a rerun leaves the file as it was


def accuracy_table(folders: dict[tuple[str, int | None], Path], kept: dict[str, float]) -> pd.DataFrame:
    """One row per evaluated model: method, training seed, learning rate, held-out accuracy."""
    return pd.DataFrame(
        [
            {
                "method": method,
                "seed": seed,
                "lr": kept.get(method),
                "accuracy": float(pd.read_csv(folder / "scores.csv")["score"].mean()),
            }
            for (method, seed), folder in folders.items()
        ]
    )


def timings(out: Path) -> pd.DataFrame:
    rows, _ = read_jsonl(out / "runs" / "timings.jsonl")
    return pd.DataFrame(
        [
            {
                "method": r["method"],
                "runs": ", ".join(r["runs"]),
                "together": r["together"],
                "resumed": r["resumed"],
                "minutes": r["seconds"] / 60,
            }
            for r in rows
        ]
    )


def write_tables(
    folders: dict[tuple[str, int | None], Path], swept: list[dict[str, Any]], kept: dict[str, float], out: Path
) -> None:
    """The results of the methods finished so far."""
    table = combine_runs(list(folders.values()), out / "table1")
    write_text(out / "accuracy.csv", accuracy_table(folders, kept).to_csv(index=False))
    sweep_table = pd.DataFrame(swept)
    write_text(out / "sweep.csv", sweep_table.to_csv(index=False))
    write_text(out / "sweep.md", sweep_table.to_markdown(index=False, floatfmt=".4g") + "\n")
    times = timings(out)
    write_text(out / "timings.csv", times.to_csv(index=False))
    write_text(out / "timings.md", times.to_markdown(index=False, floatfmt=".1f") + "\n")
    write_json(out / "kept_lr.json", kept)
    print(table.to_markdown(), "\n", sweep_table.to_markdown(index=False), "\n", times.to_markdown(index=False))


def main() -> None:
    settings, out = runner_settings(__doc__ or "", HERE)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    folders: dict[tuple[str, int | None], Path] = {("base", None): evaluate_base(settings, out)}
    swept: list[dict[str, Any]] = []
    kept: dict[str, float] = {}
    for method in settings["sweep"]:
        rows, kept[method] = sweep(settings, method, out)
        swept += rows
        seeds = settings["seeds"][method]
        train_all(method, [run_config(settings, method, kept[method], seed, out) for seed in seeds[1:]], out)
        if method == "steering":
            keep_vectors(settings, kept[method], out)
        for seed, folder in evaluate_method(settings, method, kept[method], out).items():
            folders[method, seed] = folder
        write_tables(folders, swept, kept, out)


if __name__ == "__main__":
    main()
