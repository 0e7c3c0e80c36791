"""Studies that evaluate many vector sets on one model: swaps between models or seeds, single- and
pair-layer vectors, magnitude sweeps ("Small Vectors, Big Effects").

Every set is evaluated by `steerlens.evaluation` into its own folder (per-sample JSONL, resumable), in
one engine pass per model: all of a model's sets are loaded into its engine's bank and every chunk of
problems is generated for all of them in one batch (`evaluation.runner.evaluate_sets`). All sets of a study
use the same decoding (`decoding=auto` means sampling here, so the unsteered baseline is measured the same way
as the steered sets).

`run_swap`, `run_pairs` and `run_magnitude` are `steerlens study swap | pairs | magnitude`: the tables
above plus their grids and figures, as a `StudyResult`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from itertools import combinations_with_replacement
from pathlib import Path

import pandas as pd

from steerlens.analysis.patches import Patch
from steerlens.analysis.results import StudyResult
from steerlens.backends.vector_bank import BASE
from steerlens.evaluation.config import EvalConfig
from steerlens.evaluation.runner import evaluate, evaluate_sets
from steerlens.models import config_shape
from steerlens.plots import matrix_heatmap, sweep_line
from steerlens.vectors import SteeringVectors


def headline(summary: pd.DataFrame) -> float:
    """One accuracy per run: the paper's Average when all six benchmarks were run, else the mean over benchmarks."""
    rows = summary.set_index("benchmark")["mean"]
    return float(rows["Average"]) if "Average" in rows.index else float(rows.mean())


def study_config(eval_cfg: EvalConfig, model: str, vectors: str | None = None, **changes: object) -> EvalConfig:
    """`eval_cfg` for a study on `model`: no adapter, one decoding for every set (auto: sampling)."""
    decoding = "sample" if eval_cfg.decoding == "auto" else eval_cfg.decoding
    return replace(eval_cfg, model=model, vectors=vectors, adapter=None, decoding=decoding, **changes)


def accuracy_of_sets(
    model: str, sets: Mapping[str, SteeringVectors | None], eval_cfg: EvalConfig, out_dir: Path
) -> pd.Series:
    """Accuracy of `model` under each named set (None: unsteered), evaluated into `out_dir/<name>/` in one
    engine pass (all sets in the engine's bank, every chunk of problems batched across them)."""
    shape = config_shape(model)
    for name, vectors in sets.items():
        if vectors is not None:
            vectors.check_fits(shape, what=f"model {model!r} (set {name!r})")
    tables = evaluate_sets(replace(study_config(eval_cfg, model), out_dir=str(out_dir)), sets)
    return pd.Series({name: headline(run["summary"]) for name, run in tables.items()}, name="accuracy")


def normalised_gain(accuracy: float, base: float, own: float) -> float:
    """(acc - base) / (acc_own - base): 1 = as good as the recipient's own vectors, 0 = no better than none."""
    return (accuracy - base) / (own - base) if own != base else float("nan")


def swap_matrix(runs: Mapping[str, tuple[str, SteeringVectors]], eval_cfg: EvalConfig, out_dir: Path) -> pd.DataFrame:
    """Every run's vectors applied to every run's model (runs: name -> (model, its trained vectors)).

    Rows: donor, recipient, accuracy, base (recipient unsteered), own (recipient with its own vectors),
    normalised. Donors and recipients must have the same shape (layer count and hidden size); steering
    another base model is the point here, so the base-model check is waived.
    """
    rows = []
    donors = {donor: replace(vectors, allow_other_base=True) for donor, (_, vectors) in runs.items()}
    for recipient, (model, _) in runs.items():
        sets = {BASE: None, **donors}
        scores = accuracy_of_sets(model, sets, eval_cfg, Path(out_dir) / recipient)
        for donor in runs:
            rows.append(
                {
                    "donor": donor,
                    "recipient": recipient,
                    "accuracy": scores[donor],
                    "base": scores[BASE],
                    "own": scores[recipient],
                    "normalised": normalised_gain(scores[donor], scores[BASE], scores[recipient]),
                }
            )
    return pd.DataFrame(rows)


def relative_improvement(
    single: Mapping[int, float], pairs: Mapping[tuple[int, int], float], all_layers: float
) -> pd.DataFrame:
    """(acc_ij - max(acc_i, acc_j)) / (acc_all - max(acc_i, acc_j)) per pair i < j: how much of the gap
    to all-layer steering a second vector closes (NaN when the better single vector already matches it)."""
    rows = []
    for (i, j), acc in pairs.items():
        best = max(single[i], single[j])
        gap = all_layers - best
        rows.append(
            {
                "i": i,
                "j": j,
                "accuracy": acc,
                "best_single": best,
                "relative_improvement": (acc - best) / gap if gap != 0 else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def pair_study(
    model: str, singles: Mapping[int, SteeringVectors], all_layers: SteeringVectors, eval_cfg: EvalConfig, out_dir: Path
) -> dict[str, pd.DataFrame]:
    """Evaluate each single-layer vector, every pair i <= j (two single-layer runs merged), all layers
    and none. Returns `accuracy` (an i x j matrix; the diagonal is the single vector) and
    `relative` (`relative_improvement` per pair) plus the base and all-layer scores in `scores`."""
    layers = sorted(singles)
    sets: dict[str, SteeringVectors | None] = {BASE: None, "all": all_layers}
    for i, j in combinations_with_replacement(layers, 2):
        sets[f"L{i}" if i == j else f"L{i}+L{j}"] = (
            singles[i] if i == j else SteeringVectors.merge([singles[i], singles[j]])
        )
    scores = accuracy_of_sets(model, sets, eval_cfg, out_dir)
    single = {i: scores[f"L{i}"] for i in layers}
    pairs = {(i, j): scores[f"L{i}+L{j}"] for i, j in combinations_with_replacement(layers, 2) if i < j}
    matrix = pd.DataFrame(index=pd.Index(layers, name="i"), columns=pd.Index(layers, name="j"), dtype=float)
    for i in layers:
        matrix.loc[i, i] = single[i]
    for (i, j), acc in pairs.items():
        matrix.loc[i, j] = acc
    return {
        "accuracy": matrix,
        "relative": relative_improvement(single, pairs, scores["all"]),
        "scores": scores.to_frame(),
    }


def propagation_vs_pairs(propagation: pd.DataFrame, relative: pd.DataFrame) -> pd.DataFrame:
    """Each pair (i < j) beside how layer i's vector alone propagates to layer j: the companion paper's
    scatter of pair gains against propagation cosines. `propagation` is `PropagationResult.table`
    (source, target, metrics), `relative` is `pair_study(...)["relative"]`."""
    renamed = propagation.rename(columns={"source": "i", "target": "j"})
    return relative.merge(renamed, on=["i", "j"], how="inner", validate="one_to_one")


def magnitude_sweep(
    model: str, vectors: SteeringVectors, factors: list[float], eval_cfg: EvalConfig, out_dir: Path
) -> pd.DataFrame:
    """Accuracy with all vectors scaled by each factor (0 = unsteered, 1 = as trained)."""
    sets = {f"x{factor:g}": vectors.scale(factor) for factor in factors}
    scores = accuracy_of_sets(model, sets, eval_cfg, out_dir)
    return pd.DataFrame({"factor": factors, "accuracy": [scores[f"x{f:g}"] for f in factors]})


def patched_accuracy(
    model: str, vectors: SteeringVectors, layer: int, patches: Mapping[str, Patch], eval_cfg: EvalConfig, out_dir: Path
) -> pd.Series:
    """Accuracy when the vector of `layer` reaches the model only through each patch of layer `layer`+1
    (e.g. skip-attn, skip-layer, one KV group), the other layers' vectors attached as usual.

    Runs on the HF engine (the patch is a set of HF hooks), one model for all patches; each patch is
    evaluated into `out_dir/<name>/` like any other set. Head overrides cannot be generated with
    (see `patch_hooks`); q/k/v, mlp and residual parts can.
    """
    from steerlens.analysis.patching import patch_hooks
    from steerlens.models import load_model
    from steerlens.rollout import HFRollout

    out_dir = Path(out_dir)
    hf_model, tokenizer = load_model(model, dtype=eval_cfg.dtype)
    others = [other for other in vectors.layers if other != layer]
    path = vectors.select(others).save(out_dir / "vectors" / "other-layers.safetensors") if others else None
    base_cfg = study_config(eval_cfg, model, str(path) if path else None, engine="hf")
    engine = HFRollout(hf_model, tokenizer)
    scores = {}
    for name, patch in patches.items():
        with patch_hooks(hf_model, vectors, layer, patch):
            cfg = replace(base_cfg, label=name, out_dir=str(out_dir / name))
            scores[name] = headline(evaluate(cfg, engine=engine)["summary"])
    return pd.Series(scores, name="accuracy")


def run_swap(runs: Mapping[str, tuple[str, SteeringVectors]], eval_cfg: EvalConfig, out_dir: Path) -> StudyResult:
    """`swap_matrix` with its donor x recipient grids of accuracy and normalised gain, and their heatmaps."""
    table = swap_matrix(runs, eval_cfg, out_dir)
    raw = table.pivot(index="donor", columns="recipient", values="accuracy")
    normalised = table.pivot(index="donor", columns="recipient", values="normalised")
    return StudyResult(
        {"swap": table.set_index(["donor", "recipient"]), "swap_accuracy": raw},
        {
            "swap_normalised": matrix_heatmap(normalised, "(acc - base) / (acc_own - base)", zmid=0.0),
            "swap_accuracy": matrix_heatmap(raw, "Accuracy: donor vectors on recipient model"),
        },
    )


def run_pairs(
    model: str,
    all_layers: SteeringVectors,
    eval_cfg: EvalConfig,
    out_dir: Path,
    singles: Mapping[int, SteeringVectors] | None = None,
) -> StudyResult:
    """`pair_study` with heatmaps of the pair accuracy and the relative improvement.

    `singles` maps each layer to its single-layer vectors (separately trained runs); None: each layer of
    `all_layers` alone.
    """
    singles = singles or {layer: all_layers.select([layer]) for layer in all_layers.layers}
    tables = pair_study(model, singles, all_layers, eval_cfg, out_dir)
    relative = tables["relative"].pivot(index="i", columns="j", values="relative_improvement")
    return StudyResult(
        tables,
        {
            "pair_accuracy": matrix_heatmap(tables["accuracy"], "Accuracy with layers i and j"),
            "pair_relative": matrix_heatmap(relative, "Relative improvement over the better single vector", zmid=0.0),
        },
    )


def run_magnitude(
    model: str, vectors: SteeringVectors, factors: list[float], eval_cfg: EvalConfig, out_dir: Path
) -> StudyResult:
    """`magnitude_sweep` and its accuracy-against-scale line."""
    table = magnitude_sweep(model, vectors, factors, eval_cfg, out_dir)
    return StudyResult(
        {"magnitude": table.set_index("factor")},
        {"magnitude": sweep_line(table, "factor", "accuracy", "Accuracy vs vector scale")},
    )
