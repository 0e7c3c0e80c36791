"""`steerlens study ...` end to end on the toy model: each writes its tables and figures, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from steerlens.cli import app

QUICK_EVAL = ["--engine", "hf", "--decoding", "greedy", "--limit", "8", "--max-new-tokens", "40", "--no-progress"]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_mechanistic_studies_write_their_tables(tmp_path: Path, trained_toy_vectors: Path) -> None:
    common = ["--model", "toy-arith", "--vectors", str(trained_toy_vectors), "--prompts", "3", "--max-new-tokens", "24"]
    invoke("study", "patching", *common, "--layer", "2", "--out", str(tmp_path / "patch"))
    summary = pd.read_csv(tmp_path / "patch" / "patching.csv")
    assert {"head", "layer", "attn"} <= set(summary["variant"]) and summary["kl_steered"].ge(0).all()

    invoke("study", "first-token", *common, "--out", str(tmp_path / "first"))
    positions = pd.read_csv(tmp_path / "first" / "first_token_by_position.csv")
    assert positions["position"].iloc[0] == 0 and (tmp_path / "first" / "first_token_by_position.html").is_file()

    invoke("study", "propagation", *common, "--out", str(tmp_path / "prop"))
    grid = pd.read_csv(tmp_path / "prop" / "propagation_cos_vector.csv", index_col=0)
    assert grid.shape == (4, 4) and grid.iloc[1, 1] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_magnitude_study_from_the_command_line(tmp_path: Path, trained_toy_vectors: Path) -> None:
    invoke("study", "magnitude", "--model", "toy-arith", "--vectors", str(trained_toy_vectors), "--factors", "0,1",
           "--out", str(tmp_path), *QUICK_EVAL)
    table = pd.read_csv(tmp_path / "magnitude.csv")
    assert table["factor"].tolist() == [0.0, 1.0] and table["accuracy"].iloc[1] > table["accuracy"].iloc[0]


def test_study_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["study", "swap", "--run", "nocolons", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "NAME:MODEL:VECTORS" in result.output
    missing = CliRunner().invoke(app, ["study", "magnitude", "--model", "toy-arith", "--vectors",
                                       str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "nope.safetensors" in missing.output and "Traceback" not in missing.output
