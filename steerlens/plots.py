"""Plotly figures for analysis tables. Each function takes a pandas table and returns a `go.Figure`."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50))


def norms_bar(norms: pd.DataFrame, title: str = "Vector norm per layer") -> go.Figure:
    """Bar chart of a (layer, norm) table."""
    fig = go.Figure(go.Bar(x=norms["layer"], y=norms["norm"]))
    return fig.update_layout(title=title, xaxis_title="layer", yaxis_title="L2 norm", **LAYOUT)


def cosine_heatmap(matrix: pd.DataFrame, title: str = "Cosine between layers' vectors") -> go.Figure:
    """Heatmap of a square cosine matrix (index and columns are layers), colours fixed to [-1, 1]."""
    fig = go.Figure(
        go.Heatmap(
            z=matrix.to_numpy(),
            x=[str(c) for c in matrix.columns],
            y=[str(i) for i in matrix.index],
            zmin=-1,
            zmax=1,
            colorscale="RdBu_r",
        )
    )
    fig.update_yaxes(autorange="reversed", title="layer")
    return fig.update_layout(title=title, xaxis_title="layer", **LAYOUT)


def singular_values(sv: pd.DataFrame, stable_rank: float | None = None) -> go.Figure:
    """Singular values of the stack (log scale), the stable rank in the title."""
    title = "Singular values of the stack" + (f" (stable rank {stable_rank:.2f})" if stable_rank is not None else "")
    fig = go.Figure(go.Scatter(x=sv["index"], y=sv["singular_value"], mode="lines+markers"))
    return fig.update_layout(title=title, xaxis_title="index", yaxis_title="singular value", yaxis_type="log", **LAYOUT)


def run_cosines(table: pd.DataFrame, title: str = "Cosine between runs per layer") -> go.Figure:
    """One line per run pair from a (layer, run_a, run_b, cosine) table."""
    fig = go.Figure()
    for (a, b), group in table.groupby(["run_a", "run_b"], sort=False):
        fig.add_trace(go.Scatter(x=group["layer"], y=group["cosine"], mode="lines+markers", name=f"{a} vs {b}"))
    return fig.update_layout(title=title, xaxis_title="layer", yaxis_title="cosine", yaxis_range=[-1, 1], **LAYOUT)


def histogram_slider(
    histogram: pd.DataFrame, title: str = "Cosine with unembedding rows", value: str = "cosine"
) -> go.Figure:
    """Per-layer histograms from a (layer, bin_left, bin_right, count) table, one layer shown at a time."""
    groups = list(histogram.groupby("layer", sort=True))
    fig = go.Figure()
    for i, (layer, group) in enumerate(groups):
        centres = (group["bin_left"] + group["bin_right"]) / 2
        fig.add_trace(
            go.Bar(
                x=centres,
                y=group["count"],
                width=group["bin_right"] - group["bin_left"],
                name=f"layer {layer}",
                visible=i == 0,
            )
        )
    steps = [
        dict(
            method="update",
            label=str(layer),
            args=[{"visible": [j == i for j in range(len(groups))]}, {"title": f"{title}: layer {layer}"}],
        )
        for i, (layer, _) in enumerate(groups)
    ]
    first = f"{title}: layer {groups[0][0]}" if groups else title
    return fig.update_layout(
        title=first,
        xaxis_title=value,
        yaxis_title="tokens",
        bargap=0,
        sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="layer "))],
        **LAYOUT,
    )


def matrix_heatmap(matrix: pd.DataFrame, title: str, zmid: float | None = None) -> go.Figure:
    """Heatmap of any labelled matrix (swap donor x recipient, pair i x j, propagation i x j), values shown."""
    fig = go.Figure(
        go.Heatmap(
            z=matrix.to_numpy(dtype=float),
            x=[str(c) for c in matrix.columns],
            y=[str(i) for i in matrix.index],
            zmid=zmid,
            colorscale="RdBu_r" if zmid is not None else "Viridis",
            texttemplate="%{z:.2f}",
        )
    )
    fig.update_yaxes(autorange="reversed", title=str(matrix.index.name or ""))
    return fig.update_layout(title=title, xaxis_title=str(matrix.columns.name or ""), **LAYOUT)


def sweep_line(table: pd.DataFrame, x: str, y: str, title: str) -> go.Figure:
    """A single line of `y` against `x` (e.g. accuracy against the vectors' scale factor)."""
    fig = go.Figure(go.Scatter(x=table[x], y=table[y], mode="lines+markers"))
    return fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, **LAYOUT)


def scatter(table: pd.DataFrame, x: str, y: str, title: str, label: str | None = None) -> go.Figure:
    """Points of `y` against `x`, each optionally labelled by the `label` column (e.g. a layer pair)."""
    text = table[label].astype(str) if label else None
    fig = go.Figure(
        go.Scatter(
            x=table[x], y=table[y], mode="markers+text" if label else "markers", text=text, textposition="top center"
        )
    )
    return fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, **LAYOUT)
