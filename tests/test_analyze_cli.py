"""`steerlens analyze` end to end on a tiny model (report, tables, figures for the steered layers); stack statistics."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from steerlens.analysis import stats
from steerlens.anatomy import model_shape
from steerlens.cli import app
from steerlens.models import load_model
from steerlens.vectors import SteeringVectors


@pytest.fixture(scope="module")
def vector_files(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two random runs steering layers 1 and 3 of the tiny Qwen2 model."""
    model, _ = load_model(tiny_qwen_dir)
    out = tmp_path_factory.mktemp("vectors")
    paths = []
    for seed in (0, 1):
        vectors = SteeringVectors.zeros(model_shape(model), layers=[1, 3])
        vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(seed))
        paths.append(vectors.save(out / f"seed{seed}.safetensors"))
    return paths[0], paths[1]


def test_analyze_writes_report_and_tables(
    tiny_qwen_dir: Path, vector_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    out = tmp_path / "report"
    args = [
        "analyze",
        str(vector_files[0]),
        "--model",
        str(tiny_qwen_dir),
        "--out",
        str(out),
        "--top-k",
        "7",
        "--final-norm",
        "--compare",
        str(vector_files[1]),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output

    lens = pd.read_parquet(out / "tables" / "logit_lens.parquet")
    assert sorted(lens["layer"].unique()) == [1, 3] and set(lens["projection"]) == {"final_norm"}
    assert lens.groupby(["layer", "side"]).size().tolist() == [7] * 4
    assert pd.read_csv(out / "tables" / "norms.csv")["layer"].tolist() == [1, 3]
    assert sorted(pd.read_parquet(out / "tables" / "logit_lens_histogram.parquet")["layer"].unique()) == [1, 3]
    clusters = pd.read_parquet(out / "tables" / "clusters.parquet")
    assert sorted(clusters["layer"].unique()) == [1, 3] and set(clusters["method"]) == {"offline"}
    assert sum(len(t) for t in clusters["tokens"]) == 2 * 7
    runs = pd.read_csv(out / "tables" / "run_cosines.csv")
    assert runs["layer"].tolist() == [1, 3] and runs["cosine"].abs().max() <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"] == [1, 3] and summary["projection"] == "final_norm"

    report = (out / "report.html").read_text()
    assert report.count("Plotly.newPlot") == 5 and report.count("<script type='text/javascript'>") == 1
    assert "layer 1:" in report and "layer 3:" in report and "Token clustering" in report
    assert {p.name for p in (out / "figures").iterdir()} >= {"norms.json", "logit_lens_histogram.json"}


def test_analyze_reports_bad_input_in_one_line(
    tiny_qwen_dir: Path, vector_files: tuple[Path, Path], tmp_path: Path
) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "analyze",
            str(vector_files[0]),
            "--model",
            str(tiny_qwen_dir),
            "--out",
            str(tmp_path),
            "--analyses",
            "logit_lens,vibes",
        ],
    )
    assert result.exit_code == 2 and "unknown analyses ['vibes']" in result.output
    wide = SteeringVectors.zeros(model_shape(load_model(tiny_qwen_dir)[0]), layers=[0])
    wide.values = torch.zeros(1, 64)
    result = runner.invoke(
        app,
        [
            "analyze",
            str(wide.save(tmp_path / "w.safetensors")),
            "--model",
            str(tiny_qwen_dir),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "hidden size: vectors have 64" in result.output


def test_llm_timeout_bounds_a_silent_endpoint(
    tiny_qwen_dir: Path, vector_files: tuple[Path, Path], tmp_path: Path
) -> None:
    runner = CliRunner()
    args = [
        "analyze",
        str(vector_files[0]),
        "--model",
        str(tiny_qwen_dir),
        "--out",
        str(tmp_path / "o"),
        "--analyses",
        "clustering",
        "--top-k",
        "3",
    ]
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        start = time.monotonic()
        result = runner.invoke(
            app, args + ["--endpoint", f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "--llm-timeout", "2"]
        )
        elapsed = time.monotonic() - start
    assert result.exit_code == 2 and elapsed < 30, (elapsed, result.output)
    last = result.output.strip().splitlines()[-1]  # after the model's and the logit lens' progress bars
    assert last.startswith("error: http://127.0.0.1:") and "within 2 s: --llm-timeout" in last
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    for bad in ("0", "nan", "-inf"):
        result = runner.invoke(app, args + ["--llm-timeout", bad])
        assert result.exit_code == 2 and "deadline_s (--llm-timeout) must be a number of seconds > 0" in result.output


def test_stack_statistics() -> None:
    direction = torch.randn(16, generator=torch.Generator().manual_seed(0))
    parallel = SteeringVectors.from_dense(torch.stack([direction, -2 * direction, 3 * direction]))
    assert stats.stable_rank(parallel) == pytest.approx(1.0)
    expected = np.array([[1, -1, 1], [-1, 1, -1], [1, -1, 1]])
    assert np.allclose(stats.layer_cosines(parallel).to_numpy(), expected, atol=1e-6)
    assert np.allclose(stats.norms(parallel)["norm"], direction.norm().item() * np.array([1, 2, 3]), rtol=1e-6)
    orthogonal = SteeringVectors.from_dense(torch.eye(4, 16) * 5)
    assert stats.stable_rank(orthogonal) == pytest.approx(4.0)
    assert stats.singular_values(orthogonal)["cumulative_energy"].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    runs = stats.run_cosines({"a": parallel, "b": parallel.scale(-1.0), "c": parallel})
    assert len(runs) == 3 * 3 and runs.groupby("run_b")["cosine"].first().to_dict() == pytest.approx({"b": -1, "c": 1})
