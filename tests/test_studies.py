"""Studies over many vector sets: swap matrices, pair-layer matrices, magnitude sweeps (toy model, HF engine)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from steerlens.analysis.studies import magnitude_sweep, normalised_gain, pair_study, relative_improvement, swap_matrix
from steerlens.config import build_config
from steerlens.evaluation import EvalConfig
from steerlens.tiny import build_tiny_model
from steerlens.vectors import ModelShape, SteeringVectors, VectorsError


def quick_eval() -> EvalConfig:
    return build_config(
        EvalConfig,
        None,
        ["--engine", "hf", "--decoding", "greedy", "--limit", "24", "--max-new-tokens", "40", "--no-progress"],
    )


def test_propagation_is_matched_to_pairs() -> None:
    import pandas as pd

    from steerlens.analysis.studies import propagation_vs_pairs

    propagation = pd.DataFrame({"source": [0, 0, 1, 1], "target": [0, 1, 1, 2], "cos_mean": [1.0, 0.8, 1.0, 0.6]})
    relative = relative_improvement({0: 0.3, 1: 0.5, 2: 0.8}, {(0, 1): 0.65, (1, 2): 0.9}, all_layers=0.9)
    table = propagation_vs_pairs(propagation, relative).set_index(["i", "j"])
    assert list(table.index) == [(0, 1), (1, 2)]
    assert table.loc[(0, 1), "cos_mean"] == 0.8 and table.loc[(1, 2), "cos_mean"] == 0.6
    assert table.loc[(0, 1), "relative_improvement"] == pytest.approx((0.65 - 0.5) / (0.9 - 0.5))


def test_normalised_gain_and_relative_improvement_maths() -> None:
    assert normalised_gain(0.6, base=0.2, own=0.6) == 1.0
    assert normalised_gain(0.4, base=0.2, own=0.6) == pytest.approx(0.5)
    assert normalised_gain(0.1, base=0.2, own=0.6) == pytest.approx(-0.25)
    assert math.isnan(normalised_gain(0.3, base=0.2, own=0.2))
    table = relative_improvement({0: 0.3, 1: 0.5, 2: 0.8}, {(0, 1): 0.65, (0, 2): 0.7, (1, 2): 0.9}, all_layers=0.8)
    rows = table.set_index(["i", "j"])
    assert rows.loc[(0, 1), "relative_improvement"] == pytest.approx((0.65 - 0.5) / (0.8 - 0.5))
    assert rows.loc[(0, 1), "best_single"] == 0.5
    assert math.isnan(rows.loc[(1, 2), "relative_improvement"])  # best single already equals all layers


@pytest.mark.slow
def test_swap_matrix_on_two_models(tmp_path: Path, trained_toy_vectors: Path) -> None:
    toy = SteeringVectors.load(trained_toy_vectors)
    other_dir = build_tiny_model(tmp_path / "other", "qwen2", seed=5)
    other = SteeringVectors.from_dense(torch.randn(4, 128) * 0.5, model="other")
    table = swap_matrix({"toy": ("toy-arith", toy), "other": (str(other_dir), other)}, quick_eval(), tmp_path / "swap")
    cells = table.set_index(["donor", "recipient"])
    assert len(table) == 4
    assert cells.loc[("toy", "toy"), "accuracy"] > cells.loc[("toy", "toy"), "base"] + 0.2
    assert cells.loc[("toy", "toy"), "normalised"] == pytest.approx(1.0)
    own, base = cells.loc[("toy", "toy"), "own"], cells.loc[("other", "toy"), "base"]
    assert cells.loc[("other", "toy"), "normalised"] == pytest.approx(
        normalised_gain(cells.loc[("other", "toy"), "accuracy"], base, own), nan_ok=True
    )
    assert (tmp_path / "swap" / "toy" / "other" / "samples" / "toy-arith.seed0.jsonl").is_file()


def test_swap_refuses_vectors_of_another_shape(tmp_path: Path) -> None:
    wrong = SteeringVectors.zeros(ModelShape(num_layers=6, hidden_size=128))
    with pytest.raises(VectorsError, match="layer count: vectors have 6"):
        swap_matrix({"a": ("toy-arith", wrong)}, quick_eval(), tmp_path)


@pytest.mark.slow
def test_pair_study_and_magnitude_sweep(tmp_path: Path, trained_toy_vectors: Path) -> None:
    trained = SteeringVectors.load(trained_toy_vectors)
    singles = {layer: trained.select([layer]) for layer in (1, 2, 3)}
    result = pair_study("toy-arith", singles, trained, quick_eval(), tmp_path / "pairs")
    matrix, scores = result["accuracy"], result["scores"]["accuracy"]
    assert matrix.shape == (3, 3) and matrix.loc[3, 1] != matrix.loc[3, 1]  # lower triangle empty (NaN)
    assert [matrix.loc[i, i] for i in (1, 2, 3)] == [scores[f"L{i}"] for i in (1, 2, 3)]
    assert matrix.loc[1, 3] == scores["L1+L3"] and len(result["relative"]) == 3

    sweep = magnitude_sweep("toy-arith", trained, [0.0, 1.0], quick_eval(), tmp_path / "sweep")
    assert sweep["accuracy"].tolist() == [scores["base"], scores["all"]]


@pytest.mark.slow
def test_patched_accuracy_matches_the_steered_and_unsteered_runs(tmp_path: Path, trained_toy_vectors: Path) -> None:
    from dataclasses import replace

    from steerlens.analysis.patches import Patch, make_patch
    from steerlens.analysis.studies import headline, patched_accuracy
    from steerlens.evaluation import evaluate

    trained = SteeringVectors.load(trained_toy_vectors)
    patches = {
        "steered": Patch.uniform(True, 2, 1),
        "clean": Patch.uniform(False, 2, 1),
        "skip-attn": make_patch("attn", None, "skip", 2, 1),
    }
    scores = patched_accuracy("toy-arith", trained, 2, patches, quick_eval(), tmp_path / "patched")
    without = trained.select([0, 1, 3]).save(tmp_path / "without-2.safetensors")
    full = headline(
        evaluate(replace(quick_eval(), vectors=str(trained_toy_vectors), out_dir=str(tmp_path / "a")))["summary"]
    )
    rest = headline(evaluate(replace(quick_eval(), vectors=str(without), out_dir=str(tmp_path / "b")))["summary"])
    assert scores["steered"] == full and scores["clean"] == rest
    assert 0.0 <= scores["skip-attn"] <= 1.0 and len(scores) == 3


@pytest.mark.slow
def test_run_swap_returns_its_grids_and_figures(tmp_path: Path) -> None:
    from dataclasses import replace

    from steerlens.analysis.studies import run_swap
    from steerlens.models import config_shape

    zeros = SteeringVectors.zeros(config_shape("toy-arith"))
    result = run_swap({"toy": ("toy-arith", zeros)}, replace(quick_eval(), limit=4), tmp_path)
    assert result.tables["swap_accuracy"].shape == (1, 1)
    assert set(result.figures) == {"swap_normalised", "swap_accuracy"}
    assert {p.name for p in result.save(tmp_path)} == {
        "swap.csv",
        "swap_accuracy.csv",
        "swap_normalised.html",
        "swap_accuracy.html",
    }
