"""The benchmarks the papers report, and how each is scored.

AIME and AMC are small, so each problem is sampled k=32 times and the score is the mean correctness
(AVG@32); MATH-500, MinervaMath and OlympiadBench take one sample per problem (PASS@1); GSM8K and MATH
report the mean over k samples (mean@k). AVG@k and mean@k are the same number (mean correctness over
k samples per problem, averaged over problems); the names follow the papers. Adding a benchmark is one
`BENCHMARKS` entry (and, if its columns are unusual, one `steerlens.data.DATASETS` entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from steerlens.data.problems import registered
from steerlens.errors import SteerlensError


@dataclass(frozen=True)
class Benchmark:
    """How a benchmark is scored: metric name and samples per problem when sampling."""

    metric: str
    k: int


BENCHMARKS: dict[str, Benchmark] = {
    "aime24": Benchmark("avg@k", 32),
    "aime25": Benchmark("avg@k", 32),
    "amc23": Benchmark("avg@k", 32),
    "math500": Benchmark("pass@1", 1),
    "minerva": Benchmark("pass@1", 1),
    "olympiadbench": Benchmark("pass@1", 1),
    "gsm8k": Benchmark("mean@k", 4),
    "math": Benchmark("mean@k", 4),
    "toy-arith": Benchmark("pass@1", 1),
    "word-arith": Benchmark("pass@1", 1),
}
# The paper's "Average" is the mean of these six scores, per seed.
SIX = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
DEFAULT_PROTOCOL = Benchmark("pass@1", 1)


class BenchmarkError(SteerlensError, ValueError):
    """A benchmark entry cannot be understood."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark of an evaluation: its name (table column), data source and protocol."""

    name: str
    source: str
    protocol: Benchmark


def parse_benchmark(entry: str) -> BenchmarkSpec:
    """`NAME=FILE`, a file whose stem names a benchmark (`aime24.jsonl`), or a generated set (`toy-arith`,
    `word-arith`)."""
    name, sep, source = entry.partition("=")
    if not sep:
        name, source = Path(entry).stem, entry
    if not name or not source:
        raise BenchmarkError(f"benchmark {entry!r}: expected NAME=FILE or a file path")
    key = registered(name, BENCHMARKS)
    return BenchmarkSpec(key or name, source, BENCHMARKS[key] if key else DEFAULT_PROTOCOL)
