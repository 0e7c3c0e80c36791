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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from tqdm.auto import tqdm

from steerlens.config import to_yaml
from steerlens.data import Problem, load_problems
from steerlens.data.generated import generator_of, materialize
from steerlens.errors import SteerlensError
from steerlens.evaluation.benchmarks import BenchmarkSpec, parse_benchmark
from steerlens.evaluation.config import NON_RESULT_FIELDS, EvalConfig
from steerlens.evaluation.tables import write_run_tables
from steerlens.io import append_jsonl, atomic_dir, read_jsonl, write_json, write_jsonl, write_text
from steerlens.rollout import Rollout, make_rollout, sample_seed
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
        LOG.warning("%s: %s%s; they are generated again", path, "a torn last line, " if torn else "",
                    f"{len(partial)} problem(s) with fewer than {k} samples" if partial else "no partial problem")
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
            raise EvalError(f"{out_dir} holds an evaluation with other settings ({diffs}); "
                            "use another --out-dir to evaluate these")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(saved_path, current)
    write_text(out_dir / "eval_config.yaml", to_yaml(cfg))


def model_path(cfg: EvalConfig, out_dir: Path) -> str:
    """The model to load: the base, or the base with the LoRA adapter merged in (saved once in out_dir)."""
    if not cfg.adapter:
        return cfg.model
    merged = out_dir / "merged-model"
    if not (merged / "config.json").is_file():
        from peft import PeftModel

        from steerlens.models import load_model, resolve_model

        if not (Path(cfg.adapter) / "adapter_config.json").is_file():
            raise EvalError(f"adapter {cfg.adapter}: no adapter_config.json (expected the lora/ folder of a "
                            "trainable=lora run)")
        base, tokenizer = load_model(resolve_model(cfg.model), dtype=cfg.dtype)
        model = PeftModel.from_pretrained(base, cfg.adapter).merge_and_unload()
        with atomic_dir(merged) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return str(merged)


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_benchmark(engine: Rollout, reward: MathReward, prompt: PromptFn, spec: BenchmarkSpec,
                  problems: list[Problem], seed: int, cfg: EvalConfig, out_dir: Path, bar: tqdm) -> None:
    """Generate and verify the missing problems of one (benchmark, seed), appending each chunk; `reward`
    reads answers in the format `prompt` asks for."""
    k = 1 if cfg.greedy else (cfg.samples or spec.protocol.k)
    sampling = cfg.decoding_sampling()
    path = samples_path(out_dir, spec.name, seed)
    done = {row["index"] for row in finished_samples(path, k)}
    todo = [i for i in range(len(problems)) if i not in done]
    bar.update(len(problems) - len(todo))
    for chunk in chunks(todo, cfg.chunk_problems):
        prompts = [prompt(problems[i]) for i in chunk]
        groups = engine.generate(prompts, k, sampling, seeds=[sample_seed(seed, 0, i) for i in chunk])
        texts = [c.text for group in groups for c in group]
        verdicts = iter(reward.verdicts(texts, [problems[i] for i, group in zip(chunk, groups) for _ in group]))
        rows = [
            {"benchmark": spec.name, "seed": seed, "index": i, "id": problems[i].id, "sample": j,
             "prompt": text, "completion": c.text, "extracted": reward.extract(c.text),
             "formatted": reward.formatted(c.text),
             "gold": problems[i].answer, "correct": next(verdicts), "tokens": len(c.token_ids),
             "truncated": c.truncated}
            for i, text, group in zip(chunk, prompts, groups) for j, c in enumerate(group)
        ]
        append_jsonl(path, rows)
        bar.update(len(chunk))


def evaluate(cfg: EvalConfig, vectors: SteeringVectors | None = None,
             engine: Rollout | None = None) -> dict[str, pd.DataFrame]:
    """Run (or continue) the evaluation and write its tables; returns them.

    `vectors` steer the model (default: the file `cfg.vectors` names, if any); vectors given without
    a file are recorded in the run by their fingerprint. `engine` reuses a running engine of
    `cfg.model` (studies evaluate many vector sets on one model): the vectors are pushed into it and
    it is left open. Without it, one is started and closed here.
    """
    if vectors is None and cfg.vectors:
        vectors = SteeringVectors.load(cfg.vectors)
    elif vectors is not None and not cfg.vectors:
        cfg = replace(cfg, vectors=vectors.fingerprint())
    out_dir = Path(cfg.out_dir)
    specs = [parse_benchmark(entry) for entry in cfg.benchmarks]
    check_resumable(cfg, out_dir)
    benchmarks = [(spec, load_benchmark(spec, cfg, out_dir)) for spec in specs]
    seeds = cfg.seeds[:1] if cfg.greedy else cfg.seeds
    own_engine = engine is None
    if engine is None:
        engine = start_engine(cfg, out_dir, vectors)
    elif cfg.adapter:
        raise EvalError("an adapter is merged into the model at start-up: evaluate it without a shared engine")
    else:
        engine.update(vectors)
    total = sum(len(problems) for _, problems in benchmarks) * len(seeds)
    try:
        prompt = template_prompt(engine.tokenizer, cfg.template)
        with MathReward.for_template(engine.tokenizer, cfg.template, cfg.answer_fallback) as reward, \
                tqdm(total=total, disable=not cfg.progress, desc="eval", unit="problem") as bar:
            for seed in seeds:
                for spec, problems in benchmarks:
                    run_benchmark(engine, reward, prompt, spec, problems, seed, cfg, out_dir, bar)
    finally:
        if own_engine:
            engine.close()
    samples = pd.DataFrame([row for spec, _ in benchmarks for seed in seeds
                            for row in read_jsonl(samples_path(out_dir, spec.name, seed))[0]])
    return write_run_tables(samples, out_dir, model=cfg.model, setup=cfg.setup)


def start_engine(cfg: EvalConfig, out_dir: Path, vectors: SteeringVectors | None = None) -> Rollout:
    """An engine for `cfg.model` (with the adapter merged, if any) steered by `vectors`."""
    return make_rollout(model_path(cfg, out_dir), engine=cfg.engine, vectors=vectors, dtype=cfg.dtype,
                        gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len)
