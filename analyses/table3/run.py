"""Table 3 in miniature: the cost of steering, rank-1 LoRA and full RL tuning on SmolLM2-135M, measured, beside
the paper's Qwen2.5-14B row computed from its config alone.

    python analyses/table3/run.py                 # ~6 minutes on 2 CPU cores; reruns skip finished methods

Each method trains the SmolLM2 preset for `steps` steps (config.yaml) into `results/runs/<method>`; the
trainer's own summary gives the trainable parameters, the optimizer state it holds and the mean update and
step times. Writes results/table3.{csv,md,html}. An interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.express as px

from steerlens.analysis.resources import resource_cost
from steerlens.io import write_text
from steerlens.rl.job import train

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: analyses.runner
from analyses.runner import runner_settings, training_config

HERE = Path(__file__).resolve().parent


def measured(method: str, lr: float, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train `method` for the configured steps (or read the finished run) and return its costs."""
    run_dir = out / "runs" / method
    if not (run_dir / "summary.json").is_file():
        train(training_config(HERE / settings["preset"], run_dir, settings["steps"], trainable=method, lr=lr))
    summary = json.loads((run_dir / "summary.json").read_text())
    engine = "HF generate" if method == "full" else "vLLM"
    return {
        "model": summary["config"]["model"],
        "method": method,
        "trainable_parameters": summary["trainable_parameters"],
        "optimizer_state_bytes": summary["optimizer_state_bytes"],
        "update_s": summary["mean_update_seconds"],
        "step_s": summary["mean_step_seconds"],
        "rollout_engine": engine,
        "source": "measured, 2 CPU cores",
    }


def from_config(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's model: our count from its config, and what the paper reports (per GPU, `ranks` GPUs)."""
    paper = settings["paper"]
    rows = []
    for method in ("steering", "full"):
        cost = resource_cost(str(HERE / paper["config"]), method, ranks=paper["ranks"])
        rows.append(
            {
                "model": "Qwen2.5-14B",
                "method": method,
                "trainable_parameters": cost.parameters,
                "optimizer_state_bytes": cost.optimizer_bytes_per_rank,
                "update_s": None,
                "step_s": paper[method]["step_s"],
                "rollout_engine": "-",
                "source": f"config (AdamW fp32, per GPU of {paper['ranks']}); paper: {paper[method]['parameters']} "
                f"parameters, {paper[method]['optimizer']} optimizer, {paper[method]['step_s']} s/step",
            }
        )
    return rows


def main() -> None:
    settings, out = runner_settings(__doc__ or "", HERE)
    rows = [measured(method, lr, settings, out) for method, lr in settings["methods"].items()]
    table = pd.DataFrame(rows + from_config(settings)).astype({"optimizer_state_bytes": int})
    write_text(out / "table3.csv", table.to_csv(index=False))
    write_text(out / "table3.md", table.to_markdown(index=False, floatfmt=",.2f", intfmt=",") + "\n")
    figure = px.bar(
        table,
        x="method",
        y="optimizer_state_bytes",
        color="model",
        barmode="group",
        log_y=True,
        hover_data=["trainable_parameters", "update_s", "step_s"],
        title="Optimizer state per method (log scale)",
    )
    write_text(out / "table3.html", figure.to_html(include_plotlyjs="cdn"))
    print((out / "table3.md").read_text())


if __name__ == "__main__":
    main()
