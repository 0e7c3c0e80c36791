"""The parameter-budget curve in miniature: SmolLM2-135M-Instruct's held-out greedy accuracy against the number of
trained parameters, from one scalar per layer to full RL tuning, on Table 1's recipe, steps and fixed held-out set.

    python analyses/budgets/run.py       # after analyses/table1/run.py; ~3.6 hours on 2 CPU cores; resumes

Points (3 training seeds each):
- steering variants (`config.yaml` `steering`: fixed random or logit-lens direction, one trained direction, a
  low-rank stack, one layer), every point and seed trained together in one engine, at Table 1's kept steering rate;
- TinyLoRA through peft's own tuner (13 parameters), its rate swept at the first seed as Table 1 sweeps;
- per-layer steering vectors, rank-1 LoRA and full tuning: Table 1's own runs (`analyses/table1/results/accuracy.csv`).
Every final model is evaluated by `steerlens eval` on Table 1's held-out problems. Writes results/budgets.{csv,md}
(per run, per point), results/tinylora_sweep.csv, and results/budgets.{html,svg} (the curve); runs and evaluations
go to results/runs/, committed (checkpoints every step, a few MB in all; not the merged models evaluation builds)
so that a rerun on a fresh checkout keeps finished runs and evaluations and resumes the rest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.express as px

from steerlens.analysis.resources import resource_cost
from steerlens.config import build_config, read_config
from steerlens.evaluation.config import EvalConfig
from steerlens.evaluation.runner import evaluate, evaluate_sets
from steerlens.io import write_text
from steerlens.rl.config import TrainConfig
from steerlens.rl.job import train
from steerlens.rl.together import train_runs_together
from steerlens.vectors import SteeringVectors

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: analyses.runner
from analyses.runner import finished, heldout_benchmark, runner_settings, summary_of, training_config
from scripts.run_notebooks import figure_svg

HERE = Path(__file__).resolve().parent
TABLE1_METHODS = {"steering": "per-layer vectors", "lora": "LoRA r=1 (down_proj)", "full": "full tuning"}


class Setup:
    """Table 1's settings this curve shares (preset, steps, evaluation, kept rates) and the curve's own."""

    def __init__(self, settings: dict[str, Any], out: Path) -> None:
        self.settings, self.out = settings, out
        table1_config = (HERE / settings["table1"]).resolve()
        self.table1 = read_config(table1_config)
        self.table1_results = table1_config.parent / "results"
        self.preset = (table1_config.parent / self.table1["preset"]).resolve()
        self.model = build_config(TrainConfig, self.preset).model
        self.kept = json.loads((self.table1_results / "kept_lr.json").read_text())

    def run(self, point: str, keys: dict[str, Any], lr: float, seed: int) -> TrainConfig:
        """Point `point`'s training run (TrainConfig `keys`) at rate `lr` and `seed`, in its own folder,
        checkpointed every step (a few hundred kB) so that a stopped sitting loses at most one step."""
        run_dir = self.out / "runs" / point / f"lr{lr:g}-seed{seed}"
        steps = self.table1["steps"]
        return training_config(self.preset, run_dir, steps, lr=lr, seed=seed, save_every=1, **keys)

    def eval_config(self, out_dir: Path, label: str, **extra: Any) -> EvalConfig:
        """Table 1's evaluation on its fixed held-out problems, into `out_dir`."""
        benchmark = heldout_benchmark(self.preset, self.table1_results / "heldout.jsonl")
        keys = {**self.table1["eval"], "benchmarks": [benchmark], "model": self.model, "label": label}
        return build_config(EvalConfig, None, {**keys, "out_dir": str(out_dir), **extra})


def accuracy_of(folder: Path) -> float:
    return float(pd.read_csv(folder / "scores.csv")["score"].mean())


def steering_points(setup: Setup) -> list[dict[str, Any]]:
    """Train every steering point and seed together (one engine, one vector set each), evaluate them in one pass."""
    lr, seeds = setup.kept["steering"], setup.settings["seeds"]
    runs = {
        f"{point}-seed{seed}": setup.run(point, keys, lr, seed)
        for point, keys in setup.settings["steering"].items()
        for seed in seeds
    }
    todo = {name: cfg for name, cfg in runs.items() if not finished(cfg)}
    if todo:
        train_runs_together(list(todo.values()), list(todo))
    folder = setup.out / "runs" / "eval" / "steering"
    sets = {name: SteeringVectors.load(Path(cfg.out_dir) / "vectors.safetensors") for name, cfg in runs.items()}
    if not all((folder / name / "scores.csv").is_file() for name in sets):
        evaluate_sets(setup.eval_config(folder, "steering"), sets)
    return [
        {
            "point": name.rsplit("-seed", 1)[0],
            "family": "steering",
            "seed": cfg.seed,
            "lr": lr,
            "parameters": summary_of(cfg)["trainable_parameters"],
            "accuracy": accuracy_of(folder / name),
        }
        for name, cfg in runs.items()
    ]


def tinylora_points(setup: Setup) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Sweep TinyLoRA's rate at the first seed (kept by training reward, as Table 1), train the other seeds at the
    kept rate, and evaluate each run's merged model; the rows and the sweep's table."""
    spec, seeds = setup.settings["tinylora"], setup.settings["seeds"]
    swept = [setup.run("tinylora", spec["keys"], lr, seeds[0]) for lr in spec["sweep"]]
    for cfg in swept:
        if not finished(cfg):
            train(cfg)
    sweep = pd.DataFrame(
        [
            {
                "lr": cfg.lr,
                "reward_first": summary_of(cfg)["reward_first_steps"],
                "reward_last": summary_of(cfg)["reward_last_steps"],
            }
            for cfg in swept
        ]
    )
    kept = float(sweep.loc[sweep["reward_last"].idxmax(), "lr"])
    sweep["kept"] = sweep["lr"] == kept
    rows = []
    for seed in seeds:
        cfg = setup.run("tinylora", spec["keys"], kept, seed)
        if not finished(cfg):
            train(cfg)
        folder = setup.out / "runs" / "eval" / "tinylora" / f"seed{seed}"
        if not (folder / "scores.csv").is_file():
            evaluate(setup.eval_config(folder, "tinylora", adapter=str(Path(cfg.out_dir) / "tinylora")))
        parameters = summary_of(cfg)["trainable_parameters"]
        rows.append(
            {
                "point": "tinylora",
                "family": "adapter",
                "seed": seed,
                "lr": kept,
                "parameters": parameters,
                "accuracy": accuracy_of(folder),
            }
        )
    return rows, sweep


def table1_points(setup: Setup) -> tuple[list[dict[str, Any]], float]:
    """Table 1's steering, LoRA and full runs at the curve's seeds (parameters counted from the model's config),
    and the base model's accuracy."""
    accuracy = pd.read_csv(setup.table1_results / "accuracy.csv")
    base = float(accuracy.loc[accuracy["method"] == "base", "accuracy"].iloc[0])
    rows = []
    for method, point in TABLE1_METHODS.items():
        ran = accuracy[(accuracy["method"] == method) & accuracy["seed"].isin(setup.settings["seeds"])]
        parameters = resource_cost(setup.model, method).parameters
        family = "steering" if method == "steering" else "adapter" if method == "lora" else "full"
        rows += [
            {
                "point": point,
                "family": family,
                "seed": int(r.seed),
                "lr": r.lr,
                "parameters": parameters,
                "accuracy": r.accuracy,
            }
            for r in ran.itertuples()
        ]
    return rows, base


def per_point(runs: pd.DataFrame, base: float) -> pd.DataFrame:
    """Mean, std and worst seed of each point, its gain over the base model, and the share of full tuning's gain."""
    table = (
        runs.groupby(["point", "family", "parameters"])["accuracy"]
        .agg(mean="mean", std="std", worst="min", seeds="size")
        .reset_index()
        .sort_values("parameters")
    )
    table["gain"] = table["mean"] - base
    full_gain = (
        float(table.loc[table["family"] == "full", "gain"].iloc[0])
        if (table["family"] == "full").any()
        else float("nan")
    )
    table["share_of_full_gain"] = table["gain"] / full_gain
    return table


def write_results(runs: pd.DataFrame, table: pd.DataFrame, sweep: pd.DataFrame, base: float, out: Path) -> None:
    write_text(out / "budgets.csv", runs.to_csv(index=False))
    lines = [
        f"Base model: {base:.4f} held-out greedy accuracy (0 trained parameters).",
        "",
        table.to_markdown(index=False, floatfmt=".4g"),
        "",
        "Every run:",
        "",
        runs.sort_values(["parameters", "point", "seed"]).to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    write_text(out / "budgets.md", "\n".join(lines))
    write_text(out / "tinylora_sweep.csv", sweep.to_csv(index=False))
    figure = px.scatter(
        runs, x="parameters", y="accuracy", color="family", symbol="point", log_x=True, opacity=0.5,
        title="Held-out accuracy against trained parameters (SmolLM2-135M, word-arith, 3 seeds per point)",
    )  # fmt: skip
    means = px.line(table, x="parameters", y="mean", log_x=True, markers=True, hover_name="point")
    figure.add_traces(means.update_traces(line={"color": "black"}, name="mean over seeds", showlegend=True).data)
    figure.add_hline(y=base, line_dash="dash", annotation_text=f"base model {base:.3f}")
    figure.update_layout(width=1000, height=600)
    figure.write_html(out / "budgets.html", include_plotlyjs="cdn")
    write_text(out / "budgets.svg", figure_svg(figure.to_dict()))
    print(table.to_markdown(index=False, floatfmt=".4g"))


def main() -> None:
    settings, out = runner_settings(__doc__ or "", HERE)
    setup = Setup(settings, out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    reused, base = table1_points(setup)
    steering = steering_points(setup)
    adapters, sweep = tinylora_points(setup)
    runs = pd.DataFrame(reused + steering + adapters)
    write_results(runs, per_point(runs, base), sweep, base, out)


if __name__ == "__main__":
    main()
