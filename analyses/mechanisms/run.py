"""The companion paper's mechanisms on SmolLM2-135M's trained steering vectors: the ones steerlens ships, and
Table 1's three steering seeds (run analyses/table1/run.py first).

    python analyses/mechanisms/run.py          # ~30 minutes on 2 CPU cores; finished parts are kept

Parts, each into results/<part>/ (tables as CSV, figures as HTML), then results/summary.md:
- first_token_last: the last layer's vector alone, Δp at every generated position and the tokens it boosts
  (the paper: a token-substitution bias concentrated on the first generated token);
- first_token_all: all layers' vectors, the same measurement;
- patching_penultimate: the penultimate layer's vector reaching the last layer only through each part of it
  (the paper: attention patterns largely intact, the effect goes through the MLP and unembedding);
- propagation: each layer's vector alone, how its change of the residual stream carries to later layers;
- seed_alignment: per-layer cosine between Table 1's steering seeds, beside their held-out accuracies;
- seed_swap: hybrid sets, layers below a cut from one seed and the rest from another, evaluated in one pass;
- single_layer: single-layer vectors for a few layers (trained together in one engine) against all layers;
- lens_clusters: the shipped vectors' logit lens, its top tokens clustered by SmolLM2 itself behind
  `steerlens serve` (vLLM's OpenAI server, the real `openai` client).
An interrupted run resumes: parts whose folder holds results are not run again.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.express as px

from steerlens import smollm
from steerlens.analysis.clustering import ClusteringConfig, cluster_tokens
from steerlens.analysis.logit_lens import model_logit_lens
from steerlens.analysis.mechanisms import run_first_token, run_patching, run_propagation
from steerlens.analysis.results import StudyResult
from steerlens.analysis.stats import run_cosines
from steerlens.analysis.studies import accuracy_of_sets
from steerlens.backends.vector_bank import BASE
from steerlens.config import build_config, read_config
from steerlens.data import format_prompt
from steerlens.data.generated import generate
from steerlens.evaluation.config import EvalConfig
from steerlens.io import atomic_path, write_text
from steerlens.models import load_model
from steerlens.rl.together import train_each_layer
from steerlens.serving import LocalServer
from steerlens.vectors import SteeringVectors

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: analyses.runner
from analyses.runner import heldout_benchmark, runner_settings, training_config

HERE = Path(__file__).resolve().parent


def run_part(out: Path, name: str, make: Callable[[], StudyResult]) -> Path:
    """Run one part unless its folder already holds its results (a finished part is kept)."""
    folder = out / name
    if not (folder / "done").is_file():
        make().save(folder)
        write_text(folder / "done", "")
    return folder


class Table1:
    """What the mechanisms parts take from analyses/table1: its settings, kept rate, seeds' vectors and accuracies."""

    def __init__(self, config: Path) -> None:
        self.settings = read_config(config)
        self.dir = config.parent
        results = self.dir / "results"
        missing = [
            str(results / name) for name in ("kept_lr.json", "accuracy.csv", "vectors") if not (results / name).exists()
        ]
        if missing:
            raise SystemExit(f"Table 1's results are missing ({', '.join(missing)}): run analyses/table1/run.py first")
        self.kept_lr = float(json.loads((results / "kept_lr.json").read_text())["steering"])
        self.accuracy = pd.read_csv(results / "accuracy.csv")
        heldout = heldout_benchmark(self.dir / self.settings["preset"], results / "heldout.jsonl")
        self.eval = build_config(EvalConfig, None, {**self.settings["eval"], "benchmarks": [heldout]})
        self.seeds = {
            f"seed{seed}": SteeringVectors.load(results / "vectors" / f"steering-seed{seed}.safetensors")
            for seed in self.settings["seeds"]["steering"]
        }


def seed_alignment(table1: Table1) -> StudyResult:
    """Per-layer cosine between every pair of seeds; chance for random directions is about sqrt(2 / (pi d))."""
    cosines = run_cosines(table1.seeds)
    cosines["pair"] = cosines["run_a"] + "-" + cosines["run_b"]
    hidden = next(iter(table1.seeds.values())).hidden_size
    steering = table1.accuracy[table1.accuracy["method"] == "steering"]
    runs = "seed" + steering["seed"].astype(int).astype(str)
    accuracy = pd.DataFrame({"run": runs, "accuracy": steering["accuracy"].to_numpy()})
    per_pair = cosines.groupby("pair")["cosine"].agg(["mean", "min", "max"]).reset_index()
    per_pair["chance_abs_cosine"] = math.sqrt(2 / (math.pi * hidden))
    figure = px.line(
        cosines,
        x="layer",
        y="cosine",
        color="pair",
        markers=True,
        title="Cosine between seeds' vectors, per layer (SmolLM2-135M, Table 1's steering runs)",
    )
    return StudyResult(
        {"alignment": cosines, "alignment_by_pair": per_pair, "seed_accuracy": accuracy}, {"alignment": figure}
    )


def seed_swap(settings: dict[str, Any], table1: Table1, runs: Path) -> StudyResult:
    """Hybrids of the first two seeds (layers below each cut from one, the rest from the other), one engine pass."""
    (name_a, a), (name_b, b) = list(table1.seeds.items())[:2]
    last = a.num_layers - 1
    sets: dict[str, SteeringVectors | None] = {BASE: None, name_a: a, name_b: b}
    for cut in settings["swap_cuts"]:
        for (low_name, low), (high_name, high) in (((name_a, a), (name_b, b)), ((name_b, b), (name_a, a))):
            sets[f"{low_name}:0-{cut - 1}+{high_name}:{cut}-{last}"] = SteeringVectors.merge(
                [low.select(range(cut)), high.select(range(cut, last + 1))]
            )
    scores = accuracy_of_sets(settings["model"], sets, table1.eval, runs / "seed_swap")
    table = scores.rename_axis("set").reset_index()
    figure = px.bar(table, x="set", y="accuracy", title="Held-out greedy accuracy of seed hybrids (SmolLM2-135M)")
    return StudyResult({"swap": table}, {"swap": figure})


def single_layer(settings: dict[str, Any], table1: Table1, runs: Path, out: Path) -> StudyResult:
    """Single-layer vectors (trained together, Table 1's settings at a hotter rate) against all layers (seed 0)."""
    t1 = table1.settings
    seed = t1["seeds"]["steering"][0]
    cfg = training_config(
        table1.dir / t1["preset"],
        runs / "single",
        t1["steps"],
        lr=table1.kept_lr * settings["single_lr_factor"],
        seed=seed,
    )
    files = train_each_layer(cfg, settings["single_layers"])  # resumes or keeps each layer's run itself
    singles = {f"layer{layer}": SteeringVectors.load(path) for layer, path in files.items()}
    for layer, path in files.items():
        with atomic_path(out / "vectors" / f"layer{layer}.safetensors") as tmp:
            shutil.copyfile(path, tmp)  # a byte copy: a rerun leaves the file as it was
    sets: dict[str, SteeringVectors | None] = {BASE: None, "all": table1.seeds[f"seed{seed}"], **singles}
    scores = accuracy_of_sets(settings["model"], sets, table1.eval, runs / "single_eval")
    table = scores.rename_axis("set").reset_index()
    table["lr"] = [
        None if name == BASE else table1.kept_lr * (1 if name == "all" else settings["single_lr_factor"])
        for name in table["set"]
    ]
    figure = px.bar(table, x="set", y="accuracy", title="Single-layer vectors against all layers (SmolLM2-135M)")
    return StudyResult({"single_layer": table}, {"single_layer": figure})


def lens_clusters(
    settings: dict[str, Any], model: Any, tokenizer: Any, vectors: SteeringVectors, runs: Path
) -> StudyResult:
    """The logit lens's top tokens for a few layers, clustered by SmolLM2 itself through `steerlens serve`."""
    c = settings["clustering"]
    lens = model_logit_lens(model, tokenizer, vectors.select(c["layers"]), k=c["top"])
    with LocalServer(settings["model"], log_path=runs / "serve.log") as server:
        config = ClusteringConfig(base_url=server.url, max_tokens=c["max_tokens"], cache_dir=runs / "llm-cache")
        clusters = cluster_tokens(lens.top, config, method="llm")
    return StudyResult({"lens_top": lens.top, "clusters": clusters})


def summary(out: Path, last: int) -> str:
    """The figures the README quotes, from the saved tables."""
    lines = []
    for part, what in (("first_token_last", f"layer {last} alone"), ("first_token_all", "all layers")):
        positions = pd.read_csv(out / part / "first_token_by_position.csv", index_col=0)
        tokens = pd.read_csv(out / part / "first_token_tokens.csv", index_col=0)
        first = tokens[(tokens["position"] == 0) & (tokens["side"] == "boosted")]
        lines += [
            f"## First-token effect, {what}",
            "",
            positions.head(6).to_markdown(index=False, floatfmt=".4f"),
            "",
            f"Share of all |Δp| at position 0: {positions.loc[positions.position == 0, 'l1_share'].iloc[0]:.3f} "
            f"(uniform over {len(positions)} positions would be {1 / len(positions):.3f}).",
            "",
            "Most boosted tokens at the first generated position (by mean Δp over prompts):",
            "",
            first.groupby("token")["dp"]
            .mean()
            .sort_values(ascending=False)
            .head(10)
            .to_frame()
            .to_markdown(floatfmt=".4f"),
            "",
        ]
    patching = pd.read_csv(out / "patching_penultimate" / "patching.csv", index_col=0)
    routes = patching.groupby(["variant", "mode", "route"])["recovered"].agg(["mean", "max", "size"]).reset_index()
    lines += [
        f"## Penultimate layer ({last - 1}) patched into the last layer",
        "",
        "Share of the steering's change in the target token's probability that each patch reproduces "
        "(`recovered`; mean and max over its heads or groups):",
        "",
        routes.sort_values("mean", ascending=False).to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    grid = pd.read_csv(out / "propagation" / "propagation_cos_vector.csv", index_col=0)
    diagonal_next = [grid.iloc[i, i + 1] for i in range(len(grid) - 1) if pd.notna(grid.iloc[i, i + 1])]
    lines += [
        "## Propagation",
        "",
        f"How much vector i's effect one layer later looks like the vector trained there, mean over i of "
        f"mean_t cos(Δh_(i+1)(t), s_(i+1)): {sum(diagonal_next) / max(1, len(diagonal_next)):.3f}",
        "",
    ]
    alignment = pd.read_csv(out / "seed_alignment" / "alignment_by_pair.csv", index_col=0)
    accuracy = pd.read_csv(out / "seed_alignment" / "seed_accuracy.csv", index_col=0)
    lines += [
        "## Seed alignment (Table 1's steering seeds)",
        "",
        alignment.to_markdown(index=False, floatfmt=".3f"),
        "",
        accuracy.to_markdown(index=False, floatfmt=".4f"),
        "",
    ]
    for part, title in (("seed_swap", "Seed hybrids"), ("single_layer", "Single-layer against all-layer vectors")):
        table = pd.read_csv(out / part / f"{part.removeprefix('seed_')}.csv", index_col=0)
        lines += [f"## {title} (held-out greedy accuracy)", "", table.to_markdown(index=False, floatfmt=".4f"), ""]
    clusters = pd.read_csv(out / "lens_clusters" / "clusters.csv", index_col=0)
    status = clusters.groupby("layer")["status"].first()
    lines += [
        "## Logit lens clustered by SmolLM2 (steerlens serve)",
        "",
        f"Layers answered with usable JSON: {int((status == 'ok').sum())} of {len(status)}.",
        "",
        clusters[["layer", "topic", "tokens", "status"]].to_markdown(index=False),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    settings, out = runner_settings(__doc__ or "", HERE)
    model, tokenizer = load_model(settings["model"])
    vectors = SteeringVectors.load(smollm.TRAINED_VECTORS if settings["vectors"] == "shipped" else settings["vectors"])
    prompts = [format_prompt(tokenizer, p.problem) for p in generate("word-arith", settings["prompts"], heldout=True)]
    tokens = settings["max_new_tokens"]
    last = vectors.num_layers - 1
    run_part(
        out,
        "first_token_last",
        lambda: run_first_token(model, tokenizer, vectors.select([last]), prompts, max_new_tokens=tokens),
    )
    run_part(out, "first_token_all", lambda: run_first_token(model, tokenizer, vectors, prompts, max_new_tokens=tokens))
    run_part(
        out,
        "patching_penultimate",
        lambda: run_patching(model, tokenizer, vectors, prompts, last - 1, max_new_tokens=tokens),
    )
    run_part(
        out,
        "propagation",
        lambda: run_propagation(
            model, tokenizer, vectors, prompts[: settings["propagation_prompts"]], max_new_tokens=tokens
        ),
    )
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_part(out, "lens_clusters", lambda: lens_clusters(settings, model, tokenizer, vectors, runs))
    table1 = Table1((HERE / settings["table1"]).resolve())
    run_part(out, "seed_alignment", lambda: seed_alignment(table1))
    run_part(out, "seed_swap", lambda: seed_swap(settings, table1, runs))
    run_part(out, "single_layer", lambda: single_layer(settings, table1, runs, out / "single_layer"))
    text = summary(out, last)
    write_text(out / "summary.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
