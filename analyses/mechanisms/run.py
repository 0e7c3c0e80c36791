"""The companion paper's mechanisms on SmolLM2-135M's trained steering vectors (the ones steerlens ships).

    python analyses/mechanisms/run.py          # a few minutes on 2 CPU cores; finished parts are kept

Parts, each into results/<part>/ (tables as CSV, figures as HTML), then results/summary.md:
- first_token_last: the last layer's vector alone, Δp at every generated position and the tokens it boosts
  (the paper: a token-substitution bias concentrated on the first generated token);
- first_token_all: all layers' vectors, the same measurement;
- patching_penultimate: the penultimate layer's vector reaching the last layer only through each part of it
  (the paper: attention patterns largely intact, the effect goes through the MLP and unembedding);
- propagation: each layer's vector alone, how its change of the residual stream carries to later layers.
An interrupted run resumes: parts whose folder holds results are not run again.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from steerlens import smollm
from steerlens.analysis.mechanisms import run_first_token, run_patching, run_propagation
from steerlens.analysis.results import StudyResult
from steerlens.data import format_prompt
from steerlens.data.generated import generate
from steerlens.io import write_text
from steerlens.models import load_model
from steerlens.vectors import SteeringVectors

HERE = Path(__file__).resolve().parent


def run_part(out: Path, name: str, make: Callable[[], StudyResult]) -> Path:
    """Run one part unless its folder already holds its results (a finished part is kept)."""
    folder = out / name
    if not (folder / "done").is_file():
        make().save(folder)
        write_text(folder / "done", "")
    return folder


def summary(out: Path, last: int) -> str:
    """The figures the README quotes, from the saved tables."""
    lines = []
    for part, what in (("first_token_last", f"layer {last} alone"), ("first_token_all", "all layers")):
        positions = pd.read_csv(out / part / "first_token_by_position.csv", index_col=0)
        tokens = pd.read_csv(out / part / "first_token_tokens.csv", index_col=0)
        first = tokens[(tokens["position"] == 0) & (tokens["side"] == "boosted")]
        lines += [f"## First-token effect, {what}", "",
                  positions.head(6).to_markdown(index=False, floatfmt=".4f"), "",
                  f"Share of all |Δp| at position 0: {positions.loc[positions.position == 0, 'l1_share'].iloc[0]:.3f} "
                  f"(uniform over {len(positions)} positions would be {1 / len(positions):.3f}).", "",
                  "Most boosted tokens at the first generated position (by mean Δp over prompts):", "",
                  first.groupby("token")["dp"].mean().sort_values(ascending=False).head(10).to_frame().to_markdown(floatfmt=".4f"), ""]
    patching = pd.read_csv(out / "patching_penultimate" / "patching.csv", index_col=0)
    routes = patching.groupby(["variant", "mode", "route"])["recovered"].agg(["mean", "max", "size"]).reset_index()
    lines += [f"## Penultimate layer ({last - 1}) patched into the last layer", "",
              "Share of the steering's change in the target token's probability that each patch reproduces "
              "(`recovered`; mean and max over its heads or groups):", "",
              routes.sort_values("mean", ascending=False).to_markdown(index=False, floatfmt=".3f"), ""]
    grid = pd.read_csv(out / "propagation" / "propagation_cos_vector.csv", index_col=0)
    diagonal_next = [grid.iloc[i, i + 1] for i in range(len(grid) - 1) if pd.notna(grid.iloc[i, i + 1])]
    lines += ["## Propagation", "",
              f"How much vector i's effect one layer later looks like the vector trained there, mean over i of "
              f"mean_t cos(Δh_(i+1)(t), s_(i+1)): {sum(diagonal_next) / max(1, len(diagonal_next)):.3f}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "config.yaml")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    settings = yaml.safe_load(args.config.read_text())
    model, tokenizer = load_model(settings["model"])
    vectors = SteeringVectors.load(smollm.TRAINED_VECTORS if settings["vectors"] == "shipped" else settings["vectors"])
    prompts = [format_prompt(tokenizer, p.problem) for p in generate("word-arith", settings["prompts"], heldout=True)]
    tokens = settings["max_new_tokens"]
    last = vectors.num_layers - 1
    run_part(args.out, "first_token_last",
             lambda: run_first_token(model, tokenizer, vectors.select([last]), prompts, max_new_tokens=tokens))
    run_part(args.out, "first_token_all", lambda: run_first_token(model, tokenizer, vectors, prompts, max_new_tokens=tokens))
    run_part(args.out, "patching_penultimate",
             lambda: run_patching(model, tokenizer, vectors, prompts, last - 1, max_new_tokens=tokens))
    run_part(args.out, "propagation", lambda: run_propagation(model, tokenizer, vectors, prompts[: settings["propagation_prompts"]],
                                                              max_new_tokens=tokens))
    text = summary(args.out, last)
    write_text(args.out / "summary.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
