"""EvalConfig: every knob of `steerlens eval`, as YAML keys, CLI flags and documentation at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from steerlens.config import ConfigError, option
from steerlens.options import SharedOptions, option_checks
from steerlens.rollout import Sampling

# Fields that do not change any number: a finished or interrupted evaluation may be continued with other values.
NON_RESULT_FIELDS = (
    "out_dir",
    "progress",
    "engine",
    "gpu_memory_utilization",
    "chunk_problems",
    "label",
    "model_label",
    "base",  # which folders a named-set pass makes, not what any folder holds
    "too_long",  # an `error` run wrote nothing to mix with; `skip` rows are marked `skipped` in the samples
)


@dataclass
class EvalConfig(SharedOptions):
    """Evaluate a model, with or without steering vectors or a peft adapter (LoRA, TinyLoRA), on math benchmarks.

    The model, engine, data, reward-fallback and sampling options come from `steerlens.options`
    (`ModelOptions`, `DataOptions`, `SamplingOptions`); this class adds the rest.

    **What is evaluated**

    - `vectors`: steering vectors (`.safetensors`) applied in the engine, or named sets `NAME=FILE[,NAME=FILE]`
      (one or more) evaluated in one pass beside the base model (one folder each under `out_dir`, and a
      combined table); none: the unsteered model.
    - `base`: with named sets, also evaluate the unsteered model in that pass (`--no-base`: only the sets).
    - `adapter`: a peft adapter directory from a `trainable=lora` or `tinylora` run (its `lora/` or `tinylora/`),
      merged into the model before evaluating.
    - `label`: the setup's name in the tables (default: `steering`, `lora` or `base`).
    - `model_label`: the model's name in the tables (default: `model` as given); name a fine-tuned
      checkpoint's base model to put it in that model's rows.

    **Benchmarks and decoding**

    - `benchmarks`: `NAME=FILE`, a file whose name starts with a known benchmark (`aime24.jsonl`), or a
      generated set (`toy-arith`, `word-arith`).
    - `samples`: samples per problem for every benchmark; by default each benchmark's protocol: 32 for
      AIME/AMC, 4 for GSM8K/MATH, 1 otherwise.
    - `seeds`: the evaluation seeds; tables report the mean ± std over them.
    - `decoding`: `greedy` (one sample, one seed), `sample` at `temperature`, or `auto`: greedy for the base
      model, sampling with vectors or an adapter.
    - `limit`: evaluate only the first N problems of each benchmark.

    **Bookkeeping**

    - `chunk_problems`: problems generated and saved at a time (the unit of resumption).
    - `out_dir`: where `samples/*.jsonl` and the tables go; an interrupted run continues there.
    - `progress`: show a live progress bar.
    """

    vectors: str | None = option(
        None, "steering vectors (.safetensors), or named sets NAME=FILE,NAME=FILE in one pass (none: unsteered)"
    )
    base: bool = option(True, "with named sets NAME=FILE, also evaluate the base model in the same pass")
    adapter: str | None = option(None, "peft adapter directory (trainable=lora or tinylora run), merged into the model")
    label: str | None = option(None, "setup name in the tables (default: steering, lora or base)")
    model_label: str | None = option(None, "model name in the tables (default: --model as given)")
    benchmarks: list[str] = option(
        ["toy-arith"], "benchmarks: NAME=FILE, a file named after a known benchmark, or a generated set"
    )
    samples: int | None = option(None, "samples per problem for every benchmark (default: its protocol)")
    seeds: list[int] = option([0, 1, 2], "evaluation seeds; tables report mean ± std over them")
    decoding: Literal["auto", "greedy", "sample"] = option(
        "auto", "greedy, sample at --temperature, or auto (greedy for the base model only)"
    )
    limit: int | None = option(None, "evaluate only the first N problems of each benchmark")
    chunk_problems: int = option(64, "problems generated and saved at a time (the unit of resumption)")
    out_dir: str = option("runs/eval", "where samples/*.jsonl and the tables go; an interrupted run continues there")
    progress: bool = option(True, "show a live progress bar")

    def __post_init__(self) -> None:
        checks = [
            (bool(self.benchmarks), "benchmarks must name at least one benchmark"),
            (bool(self.seeds), "seeds must list at least one seed"),
            (self.samples is None or self.samples >= 1, "samples must be >= 1"),
            (self.limit is None or self.limit >= 1, "limit must be >= 1"),
            (self.chunk_problems >= 1, "chunk_problems must be >= 1"),
            (not (self.vectors and self.adapter), "give vectors or adapter, not both"),
        ]
        problems = [message for ok, message in checks + option_checks(self) if not ok]
        if problems:
            raise ConfigError("EvalConfig: " + "; ".join(problems))

    def named_sets(self) -> bool:
        """Whether `vectors` names sets (`NAME=FILE`, one or more), evaluated beside the base model."""
        return bool(self.vectors) and "=" in str(self.vectors)

    def vector_files(self) -> dict[str, str]:
        """The vector files `vectors` names, by set name: `a=FILE,b=FILE`, or one FILE (named by its stem)."""
        if not self.vectors:
            return {}
        if "=" not in self.vectors:
            return {Path(self.vectors).stem: self.vectors}
        files: dict[str, str] = {}
        for entry in self.vectors.split(","):
            name, _, path = entry.partition("=")
            if not name.strip() or not path.strip() or name.strip() in files:
                raise ConfigError(
                    f"EvalConfig: vectors must be FILE or NAME=FILE,NAME=FILE with distinct names, got {self.vectors!r}"
                )
            files[name.strip()] = path.strip()
        return files

    @property
    def setup(self) -> str:
        """The row label of this run in the tables."""
        return self.label or ("steering" if self.vectors else Path(self.adapter).name if self.adapter else "base")

    @property
    def table_model(self) -> str:
        """The model's name in the tables: `model_label`, else the model as given."""
        return self.model_label or self.model

    @property
    def greedy(self) -> bool:
        return self.decoding == "greedy" or (self.decoding == "auto" and not (self.vectors or self.adapter))

    def decoding_sampling(self) -> Sampling:
        """Greedy or sampled decoding, as `decoding` asks."""
        return self.greedy_sampling() if self.greedy else self.sampling()
