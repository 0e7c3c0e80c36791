"""Scores from per-sample verdicts: per-benchmark score per seed, mean ± std over seeds, the Average.

Everything works on a DataFrame of samples with columns benchmark, seed, index (problem), sample,
correct, tokens, truncated: the same rows the evaluation writes to JSONL, so any number can be
recomputed from the audit trail.
"""

from __future__ import annotations

import pandas as pd

from steerlens.evaluation.benchmarks import SIX


def benchmark_scores(samples: pd.DataFrame) -> pd.DataFrame:
    """Score per (benchmark, seed): mean over problems of the mean correctness over that problem's samples.

    With one sample per problem this is PASS@1; with k it is AVG@k / mean@k.
    """
    per_problem = samples.groupby(["benchmark", "seed", "index"])["correct"].mean()
    scores = per_problem.groupby(["benchmark", "seed"]).agg(score="mean", problems="size").reset_index()
    samples_per = samples.groupby(["benchmark", "seed"]).size().rename("samples").reset_index()
    return scores.merge(samples_per, on=["benchmark", "seed"])


def with_average(scores: pd.DataFrame) -> pd.DataFrame:
    """Add the paper's `Average` rows (mean of the six benchmarks, per seed) where a seed has all six."""
    six = scores[scores["benchmark"].isin(SIX)]
    complete = six.groupby("seed").filter(lambda g: set(g["benchmark"]) == set(SIX))
    if complete.empty:
        return scores
    average = (
        complete.groupby("seed")
        .agg(score=("score", "mean"), problems=("problems", "sum"), samples=("samples", "sum"))
        .reset_index()
    )
    average.insert(0, "benchmark", "Average")
    return pd.concat([scores, average], ignore_index=True)


def summarize(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per benchmark (std with ddof=1; 0 for a single seed), Average last."""
    scores = with_average(scores)
    summary = scores.groupby("benchmark", sort=False)["score"].agg(
        mean="mean", std=lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0, seeds="size"
    )
    return summary.reset_index()


def length_stats(samples: pd.DataFrame) -> pd.DataFrame:
    """Completion lengths in tokens per benchmark: mean, median, 90th percentile, max, truncation rate."""
    grouped = samples.groupby("benchmark")
    return pd.DataFrame(
        {
            "mean_tokens": grouped["tokens"].mean(),
            "median_tokens": grouped["tokens"].median(),
            "p90_tokens": grouped["tokens"].quantile(0.9),
            "max_tokens": grouped["tokens"].max(),
            "truncation_rate": grouped["truncated"].mean(),
        }
    ).reset_index()
