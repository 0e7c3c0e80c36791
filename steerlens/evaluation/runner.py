"""Run an evaluation: generate k samples per problem per seed, verify them, append them to JSONL.

Samples go to `out_dir/samples/<benchmark>.seed<seed>.jsonl`, one row per completion, written a chunk
of problems at a time with fsync. A rerun with the same `out_dir` reads what is there, drops a torn
last line, and generates only the problems still missing, so an interrupted evaluation continues where
it stopped. Per-request sampling seeds depend only on (seed, problem index), never on chunking, so a
resumed run produces the same samples as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from steerlens.backends.vector_bank import BASE
from steerlens.config import to_yaml
from steerlens.data import Problem, load_problems
from steerlens.data.generated import generator_of, materialize
from steerlens.errors import SteerlensError
from steerlens.evaluation.benchmarks import BenchmarkSpec, parse_benchmark
from steerlens.evaluation.config import NON_RESULT_FIELDS, EvalConfig
from steerlens.evaluation.tables import combine_runs, write_run_tables
from steerlens.io import append_jsonl, atomic_dir, read_jsonl, write_json, write_jsonl, write_text
from steerlens.options import model_tokenizer, too_long_problems
from steerlens.rollout import Rollout, make_rollout, sample_seed, use_vllm
from steerlens.task import MathReward, PromptFn, check_answers, template_prompt
from steerlens.vectors import SteeringVectors

GENERATED_PROBLEMS = 200
LOG = logging.getLogger("steerlens")


class EvalError(SteerlensError, ValueError):
    """An evaluation cannot run as configured."""


def samples_path(out_dir: Path, benchmark: str, seed: int) -> Path:
    return out_dir / "samples" / f"{benchmark}.seed{seed}.jsonl"


def finished_samples(path: Path, k: int) -> list[dict[str, Any]]:
    """The rows of problems whose `k` samples are all on disk; a torn last line and the rows of a
    problem left incomplete (the run stopped, or the disk filled, mid-problem) are removed from the
    file, so those problems are generated again."""
    rows, torn = read_jsonl(path)
    count = Counter(row["index"] for row in rows)
    kept = [row for row in rows if count[row["index"]] >= k]
    if torn or len(kept) < len(rows):
        partial = sorted({row["index"] for row in rows} - {row["index"] for row in kept})
        LOG.warning(
            "%s: %s%s; they are generated again",
            path,
            "a torn last line, " if torn else "",
            f"{len(partial)} problem(s) with fewer than {k} samples" if partial else "no partial problem",
        )
        write_jsonl(path, kept)
    return kept


def load_benchmark(spec: BenchmarkSpec, cfg: EvalConfig, out_dir: Path) -> list[Problem]:
    """The benchmark's problems (a generated benchmark, from the held-out stream, is written into the run directory)."""
    source = materialize(spec.source, out_dir / "data", GENERATED_PROBLEMS, heldout=True)
    problems = load_problems(source, problem_key=cfg.problem_key, answer_key=cfg.answer_key, dataset=spec.name)
    problems = problems[: cfg.limit] if cfg.limit else problems
    return problems if generator_of(spec.source) else check_answers(problems, source, cfg.bad_answers)


def check_resumable(cfg: EvalConfig, out_dir: Path) -> None:
    """Refuse to mix samples from different settings in one `out_dir`."""
    saved_path = out_dir / "eval_config.json"
    current = asdict(cfg)
    if saved_path.is_file():
        # a field added since that run was written had its default value then
        saved = {**asdict(EvalConfig()), **json.loads(saved_path.read_text())}
        changed = [k for k in current if k not in NON_RESULT_FIELDS and saved.get(k) != current[k]]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise EvalError(
                f"{out_dir} holds an evaluation with other settings ({diffs}); use another --out-dir to evaluate these"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(saved_path, current)
    write_text(out_dir / "eval_config.yaml", to_yaml(cfg))


def model_path(cfg: EvalConfig, out_dir: Path) -> str:
    """The model to load: the base, or the base with the peft adapter (LoRA, TinyLoRA) merged in (saved once in
    out_dir)."""
    if not cfg.adapter:
        return cfg.model
    merged = out_dir / "merged-model"
    if not (merged / "config.json").is_file():
        from peft import PeftModel

        from steerlens.models import load_model, resolve_model

        if not (Path(cfg.adapter) / "adapter_config.json").is_file():
            raise EvalError(
                f"adapter {cfg.adapter}: no adapter_config.json (expected the lora/ or tinylora/ folder of a "
                "trainable=lora or tinylora run)"
            )
        base, tokenizer = load_model(resolve_model(cfg.model), dtype=cfg.dtype)
        model = PeftModel.from_pretrained(base, cfg.adapter).merge_and_unload()
        with atomic_dir(merged) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return str(merged)


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class SetRun:
    """One evaluation in a pass: its config (its own `out_dir`) and the engine's vector set it runs under
    (None: the engine's own vectors; "base": unsteered; else a set loaded with `Rollout.add`)."""

    cfg: EvalConfig
    vectors: str | None

    @property
    def seeds(self) -> list[int]:
        return self.cfg.seeds[:1] if self.cfg.greedy else self.cfg.seeds


def samples_per_problem(cfg: EvalConfig, spec: BenchmarkSpec) -> int:
    return 1 if cfg.greedy else (cfg.samples or spec.protocol.k)


Skipped = dict[str, dict[int, int]]  # benchmark name -> {problem index: prompt tokens} too long to generate from


def load_runs(runs: list[SetRun]) -> tuple[dict[str, list[Problem]], Skipped]:
    """Check that each run's folder may hold it and load its benchmarks (each generated one is written into
    the run's folder), and check every prompt against the engine's context (`too_long_problems`): done before
    any engine starts, so bad input fails fast. Problems by benchmark name, and the problems to skip."""
    problems: dict[str, list[Problem]] = {}
    skipped: Skipped = {}
    for run in runs:
        check_resumable(run.cfg, Path(run.cfg.out_dir))
        for entry in run.cfg.benchmarks:
            spec = parse_benchmark(entry)
            problems[spec.name] = load_benchmark(spec, run.cfg, Path(run.cfg.out_dir))
            if spec.name not in skipped:
                tokenizer = model_tokenizer(run.cfg.model)
                skipped[spec.name] = too_long_problems(problems[spec.name], spec.source, run.cfg, tokenizer)
    return problems, skipped


def skipped_rows(
    spec: BenchmarkSpec, problems: list[Problem], seed: int, k: int, long: dict[int, int]
) -> list[dict[str, Any]]:
    """The rows of problems left out as too long: `k` wrong samples each, marked `skipped` with the reason."""
    return [
        {
            "benchmark": spec.name,
            "seed": seed,
            "index": i,
            "id": problems[i].id,
            "sample": j,
            "prompt": "",
            "completion": "",
            "extracted": None,
            "formatted": False,
            "gold": problems[i].answer,
            "correct": False,
            "tokens": 0,
            "truncated": False,
            "skipped": f"too long: {tokens} prompt tokens",
        }
        for i, tokens in sorted(long.items())
        for j in range(k)
    ]


def run_pass(
    engine: Rollout, runs: list[SetRun], problems: dict[str, list[Problem]], skipped: Skipped | None = None
) -> dict[Path, pd.DataFrame]:
    """Generate and verify every run's missing samples of `problems` (`load_runs`) in one pass (the `skipped`
    problems are not generated: each gets `k` wrong rows marked `skipped`): for each seed,
    benchmark and chunk of problems, one engine call per decoding holds every run that still needs them,
    each request under its run's vector set. Each run appends its own JSONL a chunk at a time, so any run
    resumes on its own; its samples equal those of the run evaluated alone (seeds depend only on the
    evaluation seed and problem index). Returns each run's samples, keyed by its `out_dir`."""
    first = runs[0].cfg
    specs = [parse_benchmark(entry) for entry in first.benchmarks]
    done = {
        (run.cfg.out_dir, spec.name, seed): {
            row["index"]
            for row in finished_samples(
                samples_path(Path(run.cfg.out_dir), spec.name, seed), samples_per_problem(run.cfg, spec)
            )
        }
        for run in runs
        for spec in specs
        for seed in run.seeds
    }
    total = sum(len(problems[spec.name]) for run in runs for spec in specs for _ in run.seeds)
    prompt = template_prompt(engine.tokenizer, first.template)
    with (
        MathReward.for_template(engine.tokenizer, first.template, first.answer_fallback) as reward,
        tqdm(total=total, disable=not first.progress, desc="eval", unit="problem") as bar,
    ):
        bar.update(sum(len(indices) for indices in done.values()))
        for seed in dict.fromkeys(seed for run in runs for seed in run.seeds):
            for spec in specs:
                todo = {
                    r: {i for i in range(len(problems[spec.name])) if i not in done[(run.cfg.out_dir, spec.name, seed)]}
                    for r, run in enumerate(runs)
                    if seed in run.seeds
                }
                long = (skipped or {}).get(spec.name, {})
                for r, indices in todo.items():
                    if left_out := {i: long[i] for i in indices & long.keys()}:
                        k = samples_per_problem(runs[r].cfg, spec)
                        rows = skipped_rows(spec, problems[spec.name], seed, k, left_out)
                        append_jsonl(samples_path(Path(runs[r].cfg.out_dir), spec.name, seed), rows)
                        indices.difference_update(left_out)
                        bar.update(len(left_out))
                for chunk in chunks(sorted(set().union(*todo.values())), first.chunk_problems):
                    for greedy in (True, False):
                        group = [
                            (runs[r], [i for i in chunk if i in indices])
                            for r, indices in todo.items()
                            if runs[r].cfg.greedy == greedy
                        ]
                        group = [(run, indices) for run, indices in group if indices]
                        if group:
                            generate_chunk(engine, reward, prompt, spec, problems[spec.name], seed, group)
                            bar.update(sum(len(indices) for _, indices in group))
    return {
        Path(run.cfg.out_dir): pd.DataFrame(
            [
                row
                for spec in specs
                for seed in run.seeds
                for row in read_jsonl(samples_path(Path(run.cfg.out_dir), spec.name, seed))[0]
            ]
        )
        for run in runs
    }


def generate_chunk(
    engine: Rollout,
    reward: MathReward,
    prompt: PromptFn,
    spec: BenchmarkSpec,
    problems: list[Problem],
    seed: int,
    group: list[tuple[SetRun, list[int]]],
) -> None:
    """One engine call for the problems each run of `group` (all greedy, or all sampled) still needs,
    each under its run's vector set; each run's rows are appended to its own samples file."""
    cfg = group[0][0].cfg
    k = samples_per_problem(cfg, spec)
    requests = [(run, i) for run, indices in group for i in indices]
    prompts = [prompt(problems[i]) for _, i in requests]
    groups = engine.generate(
        prompts,
        k,
        cfg.decoding_sampling(),
        seeds=[sample_seed(seed, 0, i) for _, i in requests],
        vectors=[run.vectors for run, _ in requests],
    )
    texts = [c.text for samples in groups for c in samples]
    verdicts = iter(reward.verdicts(texts, [problems[i] for (_, i), samples in zip(requests, groups) for _ in samples]))
    rows: dict[str, list[dict[str, Any]]] = {run.cfg.out_dir: [] for run, _ in group}
    for (run, i), text, samples in zip(requests, prompts, groups):
        rows[run.cfg.out_dir].extend(
            {
                "benchmark": spec.name,
                "seed": seed,
                "index": i,
                "id": problems[i].id,
                "sample": j,
                "prompt": text,
                "completion": c.text,
                "extracted": reward.extract(c.text),
                "formatted": reward.formatted(c.text),
                "gold": problems[i].answer,
                "correct": next(verdicts),
                "tokens": len(c.token_ids),
                "truncated": c.truncated,
            }
            for j, c in enumerate(samples)
        )
    for out_dir, run_rows in rows.items():
        append_jsonl(samples_path(Path(out_dir), spec.name, seed), run_rows)


def evaluate(
    cfg: EvalConfig, vectors: SteeringVectors | None = None, engine: Rollout | None = None
) -> dict[str, pd.DataFrame]:
    """Run (or continue) the evaluation and write its tables; returns them.

    `vectors` steer the model (default: the file `cfg.vectors` names, if any); vectors given without
    a file are recorded in the run by their fingerprint. `engine` reuses a running engine of
    `cfg.model`: the vectors are pushed into it and it is left open. Without it, one is started and
    closed here. A `cfg.vectors` naming sets (`a=FILE` or `a=FILE,b=FILE`) evaluates them all with
    `evaluate_sets`, beside the base model unless `cfg.base` is off, and returns their combined table (as
    `"summary"`).
    """
    if vectors is None and cfg.named_sets():
        return evaluate_named_files(cfg, engine)
    if vectors is None and cfg.vectors:
        vectors = SteeringVectors.load(next(iter(cfg.vector_files().values())))
    elif vectors is not None and not cfg.vectors:
        cfg = replace(cfg, vectors=vectors.fingerprint())
    runs = [SetRun(cfg, None)]
    problems, skipped = load_runs(runs)
    own_engine = engine is None
    if engine is None:
        engine = start_engine(cfg, Path(cfg.out_dir), vectors)
    elif cfg.adapter:
        raise EvalError("an adapter is merged into the model at start-up: evaluate it without a shared engine")
    else:
        engine.update(vectors)
    try:
        (samples,) = run_pass(engine, runs, problems, skipped).values()
    finally:
        if own_engine:
            engine.close()
    return write_run_tables(samples, Path(cfg.out_dir), model=cfg.table_model, setup=cfg.setup)


def evaluate_sets(
    cfg: EvalConfig, sets: Mapping[str, SteeringVectors | None], engine: Rollout | None = None
) -> dict[str, dict[str, pd.DataFrame]]:
    """Evaluate `cfg.model` under each named set (None: unsteered) in one pass, set `name` into
    `cfg.out_dir/<name>/` with its name as the setup label; returns each set's tables.

    The sets are loaded into one engine's bank (`engine`, left open, or one started and closed here) and
    every chunk of problems is generated for all of them in one batch (see `run_pass`). Each set's folder
    is an evaluation of its own: it resumes on its own and equals evaluating the set alone.
    """
    if cfg.adapter:
        raise EvalError("evaluate_sets compares vector sets on one model; evaluate an adapter on its own")
    out_dir = Path(cfg.out_dir)
    runs = {
        name: SetRun(
            replace(
                cfg, label=name, out_dir=str(out_dir / name), vectors=None if vectors is None else vectors.fingerprint()
            ),
            BASE if vectors is None else name,
        )
        for name, vectors in sets.items()
    }
    problems, skipped = load_runs(list(runs.values()))
    own_engine = engine is None
    if engine is None:
        steered = [vectors for vectors in sets.values() if vectors is not None]
        placements = {vectors.placement for vectors in steered}
        if len(placements) > 1 and use_vllm(cfg.engine):
            raise EvalError(
                f"the vector sets are added at {', '.join(sorted(placements))}, and one vLLM engine adds every set at "
                "one placement: evaluate each placement's sets in a run of its own (or with --engine hf)"
            )
        placement = steered[0].placement if steered else None
        engine = start_engine(cfg, out_dir, max_vector_sets=len(steered), placement=placement)
    loaded = []
    try:
        for name, vectors in sets.items():
            if vectors is not None:
                engine.add(name, vectors)
                loaded.append(name)
        samples = run_pass(engine, list(runs.values()), problems, skipped)
    finally:
        for name in loaded:
            engine.remove(name)
        if own_engine:
            engine.close()
    return {
        name: write_run_tables(
            samples[Path(run.cfg.out_dir)], Path(run.cfg.out_dir), model=cfg.table_model, setup=run.cfg.setup
        )
        for name, run in runs.items()
    }


def evaluate_named_files(cfg: EvalConfig, engine: Rollout | None = None) -> dict[str, pd.DataFrame]:
    """`steerlens eval --vectors a=FILE,b=FILE`: the base model (unless `--no-base`) and every named file in one
    pass, each in `out_dir/<name>/`, and their combined table in `out_dir/table.{csv,md,html}`."""
    files = cfg.vector_files()
    if BASE in files:
        raise EvalError(f"--vectors: {BASE!r} is the unsteered model's folder; give the vector set another name")
    sets: dict[str, SteeringVectors | None] = {BASE: None} if cfg.base else {}
    sets.update({name: SteeringVectors.load(path) for name, path in files.items()})
    evaluate_sets(cfg, sets, engine)
    table = combine_runs([Path(cfg.out_dir) / name for name in sets], Path(cfg.out_dir) / "table")
    return {"summary": table.reset_index()}


def start_engine(
    cfg: EvalConfig,
    out_dir: Path,
    vectors: SteeringVectors | None = None,
    max_vector_sets: int = 0,
    placement: str | None = None,
) -> Rollout:
    """An engine for `cfg.model` (with the adapter merged, if any) steered by `vectors`, with room for
    `max_vector_sets` named sets added at `placement` (None: where `vectors` are added, else layer outputs)."""
    return make_rollout(
        model_path(cfg, out_dir),
        engine=cfg.engine,
        vectors=vectors,
        dtype=cfg.dtype,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        max_vector_sets=max_vector_sets,
        placement=placement,
    )
