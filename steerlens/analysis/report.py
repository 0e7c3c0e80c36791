"""Run chosen analyses on steering vectors and a loaded model: one self-contained HTML report plus its tables.

`analyze` returns an `AnalysisReport`; its `save(out_dir)` writes `report.html` (plotly.js embedded once,
every figure and table inline, viewable offline), `tables/NAME.csv` and `tables/NAME.parquet` for every
table, `figures/NAME.json` (plotly figure data) and `summary.json` (what was run, on what, how long it
took). List-valued columns are JSON strings in the CSV files and real lists in parquet.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from torch import nn

from steerlens import plots
from steerlens.analysis import clustering as clustering_mod
from steerlens.analysis import stats
from steerlens.analysis.logit_lens import LogitLensResult, coarsen_histogram, model_logit_lens
from steerlens.anatomy import model_shape, unembedding
from steerlens.errors import SteerlensError
from steerlens.io import atomic_path, write_json, write_text
from steerlens.vectors import SteeringVectors

ANALYSES = ("logit_lens", "stats", "clustering")


class AnalysisError(SteerlensError, ValueError):
    """An analysis request that cannot be run as asked."""


@dataclass
class AnalysisReport:
    """What `analyze` found: tables and figures by name, the summary, and the report page; `save` writes them."""

    tables: dict[str, pd.DataFrame]
    figures: dict[str, go.Figure]
    summary: dict[str, Any]
    html: str

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write report.html, tables/ (CSV and parquet), figures/ (plotly JSON) and summary.json into `out_dir`."""
        out_dir = Path(out_dir)
        written = [
            path for name, table in self.tables.items() for path in _write_table(out_dir / "tables", name, table)
        ]
        for name, fig in self.figures.items():
            written.append(out_dir / "figures" / f"{name}.json")
            write_text(written[-1], fig.to_json())
        written.append(out_dir / "summary.json")
        write_json(written[-1], self.summary)
        written.append(out_dir / "report.html")
        write_text(written[-1], self.html)
        return written


def analyze(
    vectors: SteeringVectors,
    model: nn.Module,
    tokenizer: Any,
    analyses: Sequence[str] = ANALYSES,
    *,
    name: str = "",
    top_k: int = 50,
    final_norm: bool = False,
    clustering: clustering_mod.ClusteringConfig | None = None,
    clustering_method: str = "auto",
    compare: Mapping[str, SteeringVectors] | None = None,
    chunk_size: int = 8192,
    progress: bool = True,
) -> AnalysisReport:
    """Run `analyses` on `vectors` against a loaded HF `model` and its tokenizer; `save` the result to write it.

    `name` is what the report calls the vectors (e.g. their file). `compare` adds other runs' vectors by
    name (e.g. other seeds) to the stats: per-layer cosine with each. Clustering groups each layer's top-k
    logit-lens tokens; it asks an LLM when `clustering` (or $OPENAI_BASE_URL) names an endpoint, else
    clusters offline (`clustering_method` forces either).
    """
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown or not analyses:
        raise AnalysisError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    vectors.check_fits(model_shape(model))
    others = dict(compare or {})

    timings: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    figures: dict[str, go.Figure] = {}
    sections: list[str] = []
    lens: LogitLensResult | None = None
    if "logit_lens" in analyses or "clustering" in analyses:
        start = time.perf_counter()
        lens = model_logit_lens(
            model, tokenizer, vectors, k=top_k, final_norm=final_norm, chunk_size=chunk_size, progress=progress
        )
        timings["logit_lens"] = time.perf_counter() - start
    if "stats" in analyses:
        start = time.perf_counter()
        sections.append(_stats_section(vectors, others, tables, figures))
        timings["stats"] = time.perf_counter() - start
    if "logit_lens" in analyses and lens is not None:
        sections.append(_lens_section(lens, tables, figures))
    clustering_info: dict[str, Any] = {}
    if "clustering" in analyses and lens is not None:
        start = time.perf_counter()
        config = clustering or clustering_mod.ClusteringConfig()
        method = clustering_mod.choose_method(config) if clustering_method == "auto" else clustering_method
        clusters = clustering_mod.cluster_tokens(
            lens.top, config, method=method, unembed=unembedding(model), progress=progress
        )
        tables["clusters"] = clusters
        clustering_info = {
            "method": method,
            "model": clusters["model"].iloc[0] if len(clusters) else "",
            "endpoint": config.endpoint() if method == "llm" else None,
            "failed_layers": sorted(clusters.loc[clusters["status"] == "failed", "layer"].tolist()),
        }
        sections.append(_clusters_section(clusters, method))
        timings["clustering"] = time.perf_counter() - start

    model_name = str(getattr(model.config, "_name_or_path", "")) or type(model).__name__
    summary = {
        "vectors": name,
        "model": model_name,
        "layers": list(vectors.layers),
        "num_layers": vectors.num_layers,
        "hidden_size": vectors.hidden_size,
        "analyses": list(analyses),
        "top_k": top_k,
        "projection": lens.projection if lens is not None else None,
        "compare": list(others),
        "clustering": clustering_info,
        "seconds": timings,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if "stats" in analyses:
        summary["stable_rank"] = stats.stable_rank(vectors)
    return AnalysisReport(tables, figures, summary, _page(summary, sections))


# ---- sections -------------------------------------------------------------------------------------
def _stats_section(
    vectors: SteeringVectors,
    others: dict[str, SteeringVectors],
    tables: dict[str, pd.DataFrame],
    figures: dict[str, go.Figure],
) -> str:
    cosines = stats.layer_cosines(vectors)
    tables["norms"] = stats.norms(vectors)
    tables["layer_cosines"] = cosines.reset_index()
    tables["singular_values"] = stats.singular_values(vectors)
    rank = stats.stable_rank(vectors)
    figures["norms"] = plots.norms_bar(tables["norms"])
    figures["layer_cosines"] = plots.cosine_heatmap(cosines)
    figures["singular_values"] = plots.singular_values(tables["singular_values"], rank)
    parts = [f"<p>Stable rank of the {len(vectors.layers)} x {vectors.hidden_size} stack: <b>{rank:.3f}</b>.</p>"]
    parts += [_figure(figures[name]) for name in ("norms", "layer_cosines", "singular_values")]
    if others:
        tables["run_cosines"] = stats.run_cosines({"this run": vectors, **others})
        figures["run_cosines"] = plots.run_cosines(tables["run_cosines"])
        parts.append(_figure(figures["run_cosines"]))
    return _section("stats", "Vector statistics", "".join(parts))


def _lens_section(lens: LogitLensResult, tables: dict[str, pd.DataFrame], figures: dict[str, go.Figure]) -> str:
    tables["logit_lens"] = lens.table()
    tables["logit_lens_histogram"] = lens.histogram
    label = "through the final norm" if lens.projection == "final_norm" else "raw (no final norm)"
    figures["logit_lens_histogram"] = plots.histogram_slider(
        coarsen_histogram(lens.histogram), title=f"Cosine with unembedding rows, {label}"
    )
    parts = [
        f"<p>Cosine between each layer's vector and every unembedding row, projection <b>{lens.projection}"
        f"</b> ({label}). Expand a layer for its full top/bottom lists with dot products.</p>",
        _figure(figures["logit_lens_histogram"]),
    ]
    for layer, top in lens.top.groupby("layer", sort=True):
        bottom = lens.bottom[lens.bottom["layer"] == layer]
        preview = ", ".join(_shown(t) for t in top["token"].head(8))
        parts.append(
            f"<details><summary>layer {layer}: {html.escape(preview)}</summary><div class='pair'>"
            f"<div><h4>top</h4>{_token_table(top)}</div><div><h4>bottom</h4>{_token_table(bottom)}</div>"
            "</div></details>"
        )
    return _section("logit_lens", "Logit lens", "".join(parts))


def _clusters_section(clusters: pd.DataFrame, method: str) -> str:
    how = (
        "topics named by an LLM (languages detected, non-English tokens translated)"
        if method == "llm"
        else "offline average-linkage on unembedding cosine (no LLM endpoint configured; topics are named "
        "after their most central token)"
    )
    shown = clusters.assign(
        tokens=[", ".join(_shown(t) for t in tokens) for tokens in clusters["tokens"]],
        translation=[
            ", ".join(f"{_shown(t)}={tr}" for t, tr in zip(tokens, trs) if tr)
            for tokens, trs in zip(clusters["tokens"], clusters["translation"])
        ],
    )
    columns = ["layer", "topic", "tokens", "translation", "status", "error"]
    return _section(
        "clustering",
        "Token clustering of the top tokens",
        f"<p>Method: {html.escape(how)}.</p>{_table(shown[columns])}",
    )


# ---- output helpers -------------------------------------------------------------------------------
def _shown(token: str) -> str:
    """A token quoted so that whitespace and control characters are visible."""
    return json.dumps(token, ensure_ascii=False)


def _token_table(rows: pd.DataFrame) -> str:
    columns = ["rank", "token_id", "token", "cosine", "dot"]
    return _table(rows[columns].assign(token=rows["token"].map(_shown)))


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, float_format=lambda x: f"{x:.4f}", border=0, classes="data")


def _figure(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, default_height="460px")


def _section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{html.escape(title)}</h2>{body}</section>"


def _write_table(directory: Path, name: str, table: pd.DataFrame) -> list[Path]:
    """CSV (lists as JSON strings) and parquet, each written atomically."""
    listy = [c for c in table.columns if table[c].map(lambda v: isinstance(v, list)).any()]
    flat = table.assign(**{c: table[c].map(lambda v: json.dumps(v, ensure_ascii=False)) for c in listy})
    csv, parquet = directory / f"{name}.csv", directory / f"{name}.parquet"
    with atomic_path(csv) as tmp:
        flat.to_csv(tmp, index=False)
    with atomic_path(parquet) as tmp:
        table.rename(columns=str).to_parquet(tmp, index=False)
    return [csv, parquet]


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table.data{border-collapse:collapse;font-size:13px;margin:.5em 0}
table.data td,table.data th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
details{margin:.3em 0}summary{cursor:pointer;font-family:monospace}.pair{display:flex;gap:2em;flex-wrap:wrap}
.meta td{padding:1px 10px 1px 0}"""


def _page(summary: dict[str, Any], sections: list[str]) -> str:
    """The whole report: plotly.js once in the head, then the sections."""
    from plotly.offline import get_plotlyjs

    meta = {
        "vectors": summary["vectors"] or "-",
        "model": summary["model"],
        "layers": f"{len(summary['layers'])} of {summary['num_layers']} (hidden size {summary['hidden_size']})",
        "projection": summary["projection"] or "-",
        "created": summary["created"],
    }
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items())
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>steerlens report</title>"
        f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>steerlens analysis</h1><table class='meta'>{rows}</table>{''.join(sections)}</body></html>"
    )
