"""`steerlens study ...` end to end on the toy model: each writes its tables and figures, bad input is one line."""

from __future__ import annotations

import json
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
    invoke(
        "study",
        "magnitude",
        "--model",
        "toy-arith",
        "--vectors",
        str(trained_toy_vectors),
        "--factors",
        "0,1",
        "--out",
        str(tmp_path),
        *QUICK_EVAL,
    )
    table = pd.read_csv(tmp_path / "magnitude.csv")
    assert table["factor"].tolist() == [0.0, 1.0] and table["accuracy"].iloc[1] > table["accuracy"].iloc[0]


def test_study_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["study", "swap", "--run", "nocolons", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "NAME:MODEL:VECTORS" in result.output
    missing = CliRunner().invoke(
        app,
        [
            "study",
            "magnitude",
            "--model",
            "toy-arith",
            "--vectors",
            str(tmp_path / "nope.safetensors"),
            "--out",
            str(tmp_path),
        ],
    )
    assert missing.exit_code == 2 and "nope.safetensors" in missing.output and "Traceback" not in missing.output


@pytest.mark.slow
def test_single_layer_runs_in_one_command_feed_the_pair_study(tmp_path: Path) -> None:
    from steerlens.vectors import SteeringVectors

    train = [
        "--engine",
        "hf",
        "--steps",
        "2",
        "--prompts-per-step",
        "4",
        "--generations",
        "2",
        "--max-new-tokens",
        "8",
        "--eval-data",
        "null",
        "--no-progress",
        "--lr",
        "0.1",
    ]
    output = invoke("study", "singles", "--layers", "1,3", "--out", str(tmp_path / "singles"), *train)
    files = {layer: tmp_path / "singles" / f"layer{layer}" / "vectors.safetensors" for layer in (1, 3)}
    for layer, path in files.items():
        summary = json.loads((path.parent / "summary.json").read_text())
        assert SteeringVectors.load(path).layers == (layer,) and summary["steps"] == 2
        assert summary["config"]["layers"] == [layer]
        assert f"--single {path}" in output
    stamps = {layer: path.stat().st_mtime_ns for layer, path in files.items()}
    invoke("study", "singles", "--layers", "1,3", "--out", str(tmp_path / "singles"), *train)  # finished: kept
    assert {layer: path.stat().st_mtime_ns for layer, path in files.items()} == stamps

    all_layers = SteeringVectors.merge([SteeringVectors.load(p) for p in files.values()]).save(
        tmp_path / "all.safetensors"
    )
    invoke(
        "study",
        "pairs",
        "--model",
        "toy-arith",
        "--vectors",
        str(all_layers),
        "--single",
        str(files[1]),
        "--single",
        str(files[3]),
        "--out",
        str(tmp_path / "pairs"),
        *QUICK_EVAL,
    )
    accuracy = pd.read_csv(tmp_path / "pairs" / "accuracy.csv", index_col=0)
    assert accuracy.shape == (2, 2) and accuracy.notna().values.sum() == 3  # L1, L3 and the pair; nothing below

    bad = CliRunner().invoke(app, ["study", "singles", "--layers", "9", "--out", str(tmp_path / "bad"), *train])
    assert bad.exit_code == 2 and "layers [9] do not exist" in bad.output
