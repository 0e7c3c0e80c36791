"""Many vector sets in one vLLM engine: what the bank costs and what it buys, side by side in one run.

    python bench/bench_vector_sets.py --model smollm2-135m            # all three parts, CPU
    python bench/bench_vector_sets.py --parts overhead --rounds 5

- overhead: a stock `vllm.LLM` and a steered engine (the default set, and one named set), both alive,
  timed in alternating rounds on the same seeded requests, so machine drift hits all of them alike.
- mix: steady-state throughput of one steered engine when a batch of requests spreads over K = 1, 4 and
  16 distinct named sets (alternating rounds), as a ratio to K = 1 (EasySteer reports -14% at 8 and -32% at
  32 distinct sets on GPU).
- eval: 8 vector sets evaluated on word-arith (64 problems) in one pass (`evaluate_sets`) against 8
  evaluations one after another on the same running engine, the vectors pushed between them (what studies
  did before the bank); the engine start that 8 separate `steerlens eval` runs would add is reported
  beside. The two must produce the same samples.
- singles: single-layer training runs trained together (`train_each_layer`: one engine, one set per run)
  against the same runs one after another (each `steerlens train` run with its own engine, as before), with
  the preset of --train-config for --train-steps steps; the vectors must agree.
Prints JSON (Markdown with --markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from steerlens.anatomy import model_shape
from steerlens.data import format_prompt
from steerlens.data.generated import generate_problems
from steerlens.models import load_model, resolve_model
from steerlens.rollout import sample_seed
from steerlens.vectors import SteeringVectors


def random_sets(shape: Any, count: int, scale: float = 0.5) -> dict[str, SteeringVectors]:
    return {
        f"s{i}": SteeringVectors.from_dense(
            torch.randn(shape.num_layers, shape.hidden_size, generator=torch.Generator().manual_seed(i)) * scale
        )
        for i in range(count)
    }


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Each run once as warm-up, then `rounds` rounds of all runs, the order rotated every round (so no run
    always follows the same one); the median seconds of each."""
    for fn in runs.values():
        fn()
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(runs[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def steering_ops_seconds(num_layers: int, hidden_size: int, tokens: int, sets: int, reps: int = 200) -> float:
    """What the steered layers add to one forward pass of `tokens` tokens, measured alone: per layer, the
    gather of each token's row from the bank and the fused multiply-add into the hidden state."""
    bank = torch.randn(num_layers, sets, hidden_size)
    hidden = torch.randn(tokens, hidden_size)
    slots = torch.randint(0, sets, (tokens,))
    scales = torch.ones(tokens, 1)

    def forward_pass() -> None:
        for layer in range(num_layers):
            torch.addcmul(hidden, scales, torch.nn.functional.embedding(slots, bank[layer]))

    forward_pass()
    return timed(lambda: [forward_pass() for _ in range(reps)]) / reps


def requests(args: argparse.Namespace, tokenizer: Any) -> tuple[list[str], list[Any]]:
    from vllm import SamplingParams

    prompts = [format_prompt(tokenizer, p.problem) for p in generate_problems(args.prompts, seed=5)]
    params = [
        SamplingParams(
            n=args.samples, temperature=1.0, max_tokens=args.max_new_tokens, seed=sample_seed(0, 0, i), ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    return prompts, params


def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Stock engine vs steered engine (default set; one named set), alternating rounds, both alive."""
    from vllm import LLM

    from steerlens.backends.vllm import SteeredLLM, engine_defaults

    path = resolve_model(args.model)
    model, tokenizer = load_model(path)
    (vectors,) = random_sets(model_shape(model), 1).values()
    prompts, params = requests(args, tokenizer)
    stock = LLM(model=path, **engine_defaults())
    steered = SteeredLLM(path, vectors, max_vector_sets=1)
    steered.add("named", vectors)
    try:
        seconds = alternate(
            {
                "stock": lambda: stock.generate(prompts, params, use_tqdm=False),
                "steered": lambda: steered.generate(prompts, params),
                "steered_named": lambda: steered.generate(prompts, params, vectors="named"),
            },
            args.rounds,
        )
    finally:
        stock.llm_engine.engine_core.shutdown()
        steered.close()
    shape = model_shape(model)
    per_step = steering_ops_seconds(shape.num_layers, shape.hidden_size, len(prompts) * args.samples, sets=3)
    return {
        **seconds,
        "overhead": seconds["steered"] / seconds["stock"] - 1,
        "overhead_named": seconds["steered_named"] / seconds["stock"] - 1,
        "steering_ops_per_decode_step_s": per_step,
        "decode_step_s": seconds["stock"] / args.max_new_tokens,
        "steering_ops_share": per_step * args.max_new_tokens / seconds["stock"],
    }


def bench_mix(args: argparse.Namespace) -> dict[str, Any]:
    """One engine, 16 named sets; the same batch spread over K distinct sets, alternating rounds."""
    from steerlens.backends.vllm import SteeredLLM

    path = resolve_model(args.model)
    model, tokenizer = load_model(path)
    sets = random_sets(model_shape(model), 16)
    prompts, params = requests(args, tokenizer)
    engine = SteeredLLM(path, max_vector_sets=len(sets))
    for name, vectors in sets.items():
        engine.add(name, vectors)
    names = list(sets)
    try:
        seconds = alternate(
            {
                f"K={k}": (
                    lambda k=k: engine.generate(prompts, params, vectors=[names[i % k] for i in range(len(prompts))])
                )
                for k in (1, 4, 16)
            },
            args.rounds,
        )
    finally:
        engine.close()
    tokens = len(prompts) * args.samples * args.max_new_tokens
    return {
        "seconds": seconds,
        "tokens_per_s": {k: tokens / s for k, s in seconds.items()},
        "vs_one_set": {k: seconds["K=1"] / s - 1 for k, s in seconds.items()},
    }


def bench_eval(args: argparse.Namespace) -> dict[str, Any]:
    """8 sets: one pass vs one evaluation after another on the same engine (pushing between them)."""
    from steerlens.config import build_config
    from steerlens.evaluation.config import EvalConfig
    from steerlens.evaluation.runner import evaluate, evaluate_sets, start_engine

    out = Path(tempfile.mkdtemp(prefix="steerlens-bench-sets-"))
    cfg = build_config(
        EvalConfig,
        None,
        [
            "--model",
            args.model,
            "--engine",
            "vllm",
            "--benchmarks",
            "word-arith",
            "--limit",
            str(args.problems),
            "--decoding",
            "sample",
            "--seeds",
            "0",
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--no-progress",
            "--answer-fallback",
            "last_number",
            "--out-dir",
            str(out),
        ],
    )
    shape = model_shape(load_model(resolve_model(args.model))[0])
    sets = random_sets(shape, args.sets, scale=args.vector_scale)
    start = time.perf_counter()
    engine = start_engine(cfg, out, max_vector_sets=len(sets))
    engine_start = time.perf_counter() - start
    try:
        one_by_one = timed(
            lambda: [
                evaluate(replace(cfg, out_dir=str(out / "one-by-one" / name), label=name), vectors, engine=engine)
                for name, vectors in sets.items()
            ]
        )
        one_pass = timed(lambda: evaluate_sets(replace(cfg, out_dir=str(out / "one-pass")), sets, engine=engine))
    finally:
        engine.close()
    same = all(
        (out / "one-pass" / name / "samples" / "word-arith.seed0.jsonl").read_text().splitlines()
        == (out / "one-by-one" / name / "samples" / "word-arith.seed0.jsonl").read_text().splitlines()
        for name in sets
    )
    completions = [
        json.loads(line)["completion"]
        for name in sets
        for line in (out / "one-pass" / name / "samples" / "word-arith.seed0.jsonl").open()
    ]
    return {
        "sets": len(sets),
        "problems": args.problems,
        "engine_start_s": engine_start,
        "one_by_one_s": one_by_one,
        "one_pass_s": one_pass,
        "speedup": one_by_one / one_pass,
        "speedup_vs_separate_runs": (one_by_one + (len(sets) - 1) * engine_start) / one_pass,
        "same_samples": same,
        "distinct_completions": len(set(completions)),
        "out_dir": str(out),
    }


def bench_singles(args: argparse.Namespace) -> dict[str, Any]:
    """Single-layer runs: trained together vs one after another (each with its own engine)."""
    from steerlens.config import build_config
    from steerlens.rl.config import TrainConfig
    from steerlens.rl.together import train_each_layer

    out = Path(tempfile.mkdtemp(prefix="steerlens-bench-singles-"))
    layers = [int(layer) for layer in args.train_layers.split(",")]
    config = Path(args.train_config) if args.train_config else None
    cfg = build_config(
        TrainConfig,
        config,
        [
            "--model",
            args.model,
            "--steps",
            str(args.train_steps),
            "--no-progress",
            "--save-every",
            str(args.train_steps),
            "--out-dir",
            str(out / "together"),
        ],
    )
    together_s = timed(lambda: train_each_layer(cfg, layers))
    alone_s = timed(lambda: train_each_layer(replace(cfg, out_dir=str(out / "alone")), layers, together=False))
    diff = max(
        float(
            (
                SteeringVectors.load(out / "together" / f"layer{layer}" / "vectors.safetensors").values
                - SteeringVectors.load(out / "alone" / f"layer{layer}" / "vectors.safetensors").values
            )
            .abs()
            .max()
        )
        for layer in layers
    )
    return {
        "layers": layers,
        "steps": args.train_steps,
        "prompts_per_step": cfg.prompts_per_step,
        "generations": cfg.generations,
        "together_s": together_s,
        "one_by_one_s": alone_s,
        "speedup": alone_s / together_s,
        "max_vector_diff": diff,
        "out_dir": str(out),
    }


def markdown(result: dict[str, Any]) -> str:
    rows = [
        f"{result['model']}, torch {result['torch']}"
        + (
            f": {result['prompts']} prompts x {result['samples']} samples x {result['max_new_tokens']} tokens per batch"
            if "overhead" in result or "mix" in result
            else ""
        ),
        "",
    ]
    if "overhead" in result:
        o = result["overhead"]
        rows += [
            "| engine | s per batch | vs stock |",
            "|---|---|---|",
            f"| stock vLLM | {o['stock']:.3f} | |",
            f"| steered, default set | {o['steered']:.3f} | {100 * o['overhead']:+.1f}% |",
            f"| steered, one named set | {o['steered_named']:.3f} | {100 * o['overhead_named']:+.1f}% |",
            "",
            "The steering ops alone (gather + multiply-add in every layer) take "
            f"{1e3 * o['steering_ops_per_decode_step_s']:.3f} ms "
            f"per decode step of {result['prompts'] * result['samples']} sequences, "
            f"against {1e3 * o['decode_step_s']:.1f} ms "
            f"for the whole step: {100 * o['steering_ops_share']:.2f}% of the batch time.",
            "",
        ]
    if "mix" in result:
        m = result["mix"]
        rows += ["| distinct sets in the batch | s per batch | tokens/s | vs K=1 |", "|---|---|---|---|"]
        rows += [
            f"| {k} | {m['seconds'][k]:.3f} | {m['tokens_per_s'][k]:.0f} | {100 * m['vs_one_set'][k]:+.1f}% |"
            for k in m["seconds"]
        ]
        rows += [""]
    if "eval" in result:
        e = result["eval"]
        rows += [
            f"| {e['sets']} sets x {e['problems']} problems | seconds |",
            "|---|---|",
            f"| one after another, one engine | {e['one_by_one_s']:.1f} |",
            f"| one pass | {e['one_pass_s']:.1f} |",
            f"| speed-up | {e['speedup']:.2f}x |",
            f"| engine start (each separate run adds it) | {e['engine_start_s']:.1f} |",
            f"| speed-up vs {e['sets']} separate runs | {e['speedup_vs_separate_runs']:.2f}x |",
            f"| same samples both ways | {e['same_samples']} |",
            "",
        ]
    if "singles" in result:
        t = result["singles"]
        rows += [
            f"| {len(t['layers'])} single-layer runs x {t['steps']} steps ({t['prompts_per_step']} prompts x "
            f"{t['generations']} generations) | seconds |",
            "|---|---|",
            f"| one after another (an engine each) | {t['one_by_one_s']:.1f} |",
            f"| together (one engine, one batch per step) | {t['together_s']:.1f} |",
            f"| speed-up | {t['speedup']:.2f}x |",
            f"| max difference between their vectors | {t['max_vector_diff']:.1e} |",
        ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--parts", default="overhead,mix,eval", help="any of overhead,mix,eval,singles")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sets", type=int, default=8)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--vector-scale", type=float, default=0.05)
    parser.add_argument("--train-config", default=None, help="a TrainConfig YAML for the singles part")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--train-layers", default="0,1,2,3")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    parts = {"overhead": bench_overhead, "mix": bench_mix, "eval": bench_eval, "singles": bench_singles}
    result: dict[str, Any] = {
        "model": args.model,
        "torch": torch.__version__,
        "prompts": args.prompts,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
    }
    for part in args.parts.split(","):
        result[part] = parts[part](args)
    print(markdown(result) if args.markdown else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
