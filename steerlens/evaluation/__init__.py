"""Evaluation on math benchmarks with the papers' protocol: per-sample JSONL, tables, Table 1."""

from steerlens.evaluation.benchmarks import BENCHMARKS, SIX, Benchmark, BenchmarkSpec, parse_benchmark
from steerlens.evaluation.config import EvalConfig
from steerlens.evaluation.metrics import benchmark_scores, length_stats, summarize
from steerlens.evaluation.runner import evaluate
from steerlens.evaluation.tables import combine_runs

__all__ = [
    "BENCHMARKS",
    "SIX",
    "Benchmark",
    "BenchmarkSpec",
    "EvalConfig",
    "benchmark_scores",
    "combine_runs",
    "evaluate",
    "length_stats",
    "parse_benchmark",
    "summarize",
]
