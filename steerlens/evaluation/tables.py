"""Tables from evaluation samples: one run's scores, and many runs combined in the paper's Table 1 layout.

A run directory holds `samples/*.jsonl` (the audit trail) and, derived from it, `scores.csv` (per
benchmark and seed), `summary.csv` / `summary.md` (mean ± std over seeds, Average included),
`lengths.csv` and `run.json` (model and setup labels). `combine_runs` reads only `scores.csv` and
`run.json`, so tables can be rebuilt from finished runs without a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from steerlens.errors import SteerlensError
from steerlens.evaluation.benchmarks import SIX
from steerlens.evaluation.metrics import benchmark_scores, length_stats, summarize, with_average
from steerlens.io import write_json, write_text

if TYPE_CHECKING:
    import plotly.graph_objects as go


class TableError(SteerlensError, ValueError):
    """Runs cannot be combined into a table."""


def write_run_tables(samples: pd.DataFrame, out_dir: Path, model: str, setup: str) -> dict[str, pd.DataFrame]:
    """Score one run's samples and write its tables next to them."""
    scores = benchmark_scores(samples)
    summary = summarize(scores)
    lengths = length_stats(samples)
    write_text(out_dir / "scores.csv", scores.to_csv(index=False))
    write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    write_text(out_dir / "summary.md", summary.to_markdown(index=False, floatfmt=".4f") + "\n")
    write_text(out_dir / "lengths.csv", lengths.to_csv(index=False))
    write_json(out_dir / "run.json", {"model": model, "setup": setup})
    return {"scores": scores, "summary": summary, "lengths": lengths}


def _read_run(run_dir: Path) -> pd.DataFrame:
    scores_path, run_path = run_dir / "scores.csv", run_dir / "run.json"
    if not scores_path.is_file() or not run_path.is_file():
        raise TableError(f"{run_dir}: not a finished evaluation (no scores.csv / run.json); run steerlens eval first")
    scores = with_average(pd.read_csv(scores_path))
    run = json.loads(run_path.read_text())
    return scores.assign(model=run["model"], setup=run["setup"])


def table1(scores: pd.DataFrame) -> pd.DataFrame:
    """Model x setup rows, benchmark columns (the six, then others, then Average), cells `mean ± std` in %."""
    stats = scores.groupby(["model", "setup", "benchmark"], sort=False)["score"].agg(
        mean="mean", std=lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0
    )
    cells = (100 * stats["mean"]).map("{:.1f}".format) + " ± " + (100 * stats["std"]).map("{:.1f}".format)
    table = cells.unstack("benchmark")
    present = list(table.columns)
    order = [b for b in SIX if b in present] + [b for b in present if b not in SIX and b != "Average"]
    order += ["Average"] if "Average" in present else []
    return table[order].fillna("–")


def combine_runs(run_dirs: list[Path], out_prefix: Path) -> pd.DataFrame:
    """Write `<prefix>.csv`, `.md` (Table 1 layout) and `.html` (bar chart with std error bars)."""
    if not run_dirs:
        raise TableError("give at least one evaluation directory")
    scores = pd.concat([_read_run(Path(d)) for d in run_dirs], ignore_index=True)
    table = table1(scores)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    write_text(out_prefix.with_suffix(".csv"), table.to_csv())
    write_text(out_prefix.with_suffix(".md"), table.reset_index().to_markdown(index=False) + "\n")
    figure_html = _figure(scores).to_html(include_plotlyjs="cdn", full_html=True)
    write_text(out_prefix.with_suffix(".html"), figure_html)
    return table


def _figure(scores: pd.DataFrame) -> go.Figure:
    import plotly.express as px

    stats = scores.groupby(["model", "setup", "benchmark"], sort=False)["score"].agg(["mean", "std"]).reset_index()
    stats["run"] = stats["model"].astype(str) + " · " + stats["setup"].astype(str)
    stats["std"] = stats["std"].fillna(0.0)
    return px.bar(
        stats,
        x="benchmark",
        y="mean",
        error_y="std",
        color="run",
        barmode="group",
        labels={"mean": "score (mean over seeds)"},
        title="Accuracy per benchmark",
    )
