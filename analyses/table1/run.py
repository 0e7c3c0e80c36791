"""Table 1 in miniature: SmolLM2-135M on word-arith, the base model against steering vectors, rank-1 LoRA on
down_proj and full RL tuning, with the same RLOO settings and step budget, 3 seeds each.

    python analyses/table1/run.py        # ~77 minutes on 2 CPU cores; a rerun keeps finished runs and resumes the rest

1. Sweep: each method trains at every learning rate of `sweep` with seed 0; it keeps the rate with the higher
   mean training reward over the last fifth of steps (no held-out data in the choice).
2. Seeds: the kept rate trains with the other seeds (the sweep's seed-0 run is the first seed).
   Steering runs of one phase train together: one engine, one vector set per run (`train_runs_together`).
3. Held-out greedy accuracy of the base model and of every seed's final model, one `steerlens eval` folder
   each, combined into the `steerlens table` layout (mean ± std over training seeds).
Writes results/{table1,sweep,timings}.{csv,md}, accuracy.csv, table1.html and the steering seeds' vectors
(results/vectors/);
runs and evaluations go to results/runs/ (not committed).
"""

from __future__ import annotations

import json
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
from steerlens.rl.config import TrainConfig
from steerlens.rl.job import train
from steerlens.rl.together import train_runs_together

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: analyses.runner
from analyses.runner import runner_settings, training_config

HERE = Path(__file__).resolve().parent


def run_config(settings: dict[str, Any], method: str, lr: float, seed: int, out: Path) -> TrainConfig:
    """The preset with this method, learning rate and seed, for the configured steps, into its own folder."""
    run_dir = out / "runs" / method / f"lr{lr:g}-seed{seed}"
    return training_config(HERE / settings["preset"], run_dir, settings["steps"], trainable=method, lr=lr, seed=seed)


def finished(cfg: TrainConfig) -> bool:
    return (Path(cfg.out_dir) / "summary.json").is_file()


def train_all(method: str, runs: list[TrainConfig], out: Path) -> None:
    """Train the unfinished runs (steering runs together in one engine) and log how long that took."""
    todo = [cfg for cfg in runs if not finished(cfg)]
    if not todo:
        return
    names = [Path(cfg.out_dir).name for cfg in todo]
    together = method == "steering" and len(todo) > 1
    start = time.perf_counter()
    if together:
        train_runs_together(todo, names)
    else:
        for cfg in todo:
            train(cfg)
    append_jsonl(
        out / "runs" / "timings.jsonl",
        {"method": method, "runs": names, "together": together, "seconds": time.perf_counter() - start},
    )


def summary_of(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads((Path(cfg.out_dir) / "summary.json").read_text())


def sweep(settings: dict[str, Any], out: Path) -> tuple[pd.DataFrame, dict[str, float]]:
    """Train every method at every swept rate with the first seed; the rows and each method's kept rate."""
    seed, rows, kept = settings["seeds"][0], [], {}
    for method, rates in settings["sweep"].items():
        runs = [run_config(settings, method, lr, seed, out) for lr in rates]
        train_all(method, runs, out)
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
        best = max(rows[-len(rates) :], key=lambda row: row["reward_last"])
        kept[method] = best["lr"]
    table = pd.DataFrame(rows)
    table["kept"] = [kept[m] == lr for m, lr in zip(table["method"], table["lr"])]
    return table, kept


def eval_config(settings: dict[str, Any], model: str, out_dir: Path, label: str, **extra: Any) -> EvalConfig:
    """The configured evaluation of `model` into `out_dir`, labelled `label` in the table; `extra` sets more keys."""
    return build_config(
        EvalConfig, None, {**settings["eval"], "model": model, "label": label, "out_dir": str(out_dir), **extra}
    )


def evaluated(folder: Path) -> bool:
    return (folder / "scores.csv").is_file()


def evaluate_all(settings: dict[str, Any], kept: dict[str, float], out: Path) -> dict[tuple[str, int | None], Path]:
    """Held-out greedy accuracy: the base model, then every method's seeds; returns (method, seed) -> folder."""
    model = build_config(TrainConfig, HERE / settings["preset"]).model
    folders: dict[tuple[str, int | None], Path] = {("base", None): out / "runs" / "eval" / "base"}
    if not evaluated(folders["base", None]):
        evaluate(eval_config(settings, model, folders["base", None], "base"))
    for method, lr in kept.items():
        for seed in settings["seeds"]:
            run_dir = Path(run_config(settings, method, lr, seed, out).out_dir)
            folder = out / "runs" / "eval" / method / f"seed{seed}"
            folders[method, seed] = folder
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
    for seed in settings["seeds"]:
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
                "minutes": r["seconds"] / 60,
            }
            for r in rows
        ]
    )


def main() -> None:
    settings, out = runner_settings(__doc__ or "", HERE)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    swept, kept = sweep(settings, out)
    for method, lr in kept.items():
        train_all(method, [run_config(settings, method, lr, seed, out) for seed in settings["seeds"][1:]], out)
    keep_vectors(settings, kept["steering"], out)
    folders = evaluate_all(settings, kept, out)
    table = combine_runs(list(folders.values()), out / "table1")
    accuracy = accuracy_table(folders, kept)
    write_text(out / "accuracy.csv", accuracy.to_csv(index=False))
    write_text(out / "sweep.csv", swept.to_csv(index=False))
    write_text(out / "sweep.md", swept.to_markdown(index=False, floatfmt=".4g") + "\n")
    times = timings(out)
    write_text(out / "timings.csv", times.to_csv(index=False))
    write_text(out / "timings.md", times.to_markdown(index=False, floatfmt=".1f") + "\n")
    write_json(out / "kept_lr.json", kept)
    print(table.to_markdown(), "\n", swept.to_markdown(index=False), "\n", times.to_markdown(index=False))


if __name__ == "__main__":
    main()
