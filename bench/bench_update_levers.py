"""Where the SmolLM2 preset's update time goes: each speed lever measured, side by side in one process.

    python bench/bench_update_levers.py                 # SmolLM2-135M, the preset's batch (8 prompts x 4)
    python bench/bench_update_levers.py --reps 5 --markdown

One update = forward, completion log-probs, the policy loss, backward, clipping and the AdamW step of
the steering vectors, on real word-arith prompts (chat template) and completions whose lengths follow the
preset's (`--max-new-tokens`, some truncated). The levers, added one at a time:

- `full logits`: the update as it was: every position unembedded, `[batch, seq, vocab]` fp32 logits;
- `completion only`: only completion positions unembedded, in chunks recomputed in backward (`completion_logprobs`);
- `token budget`: sequences sorted by length and grouped under a 2,048-token budget (less padding computed);
- `shared prompts`: each prompt's forward computed once for its generations, the completions running on
  its cached keys and values (`share_prompt_forward`, the trainer's default without checkpointing);
- `bf16 autocast`: the forward and backward under CPU bf16 autocast (this CPU has avx512_bf16), log-softmax in fp32.

The bounded setups run the trainer's own path: `micro_batches` and `micro_batch_loss`.

Configurations are interleaved round by round so machine drift hits all alike; the median of `--reps` is
reported with each lever's share of the total gain, and the log-probs' largest difference from the fp32
reference (what bf16 costs in accuracy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from steerlens.data.generated import generate
from steerlens.data.prompts import format_prompt
from steerlens.models import load_model
from steerlens.rl.objective import logprobs_from_logits, policy_loss
from steerlens.rl.policy import make_policy
from steerlens.rl.update import micro_batch_loss, micro_batches
from steerlens.rollout import encode_prompt


@dataclass(frozen=True)
class Setup:
    name: str
    bounded: bool  # completion positions only, chunked
    budget: int | None  # token-budget grouping (None: micro-batches of `micro_batch` sequences)
    bf16: bool
    shared: bool = False  # each prompt's forward once for its generations


SETUPS = [
    Setup("full logits (as before)", False, None, False),
    Setup("+ completion only", True, None, False),
    Setup("+ token budget", True, 2048, False),
    Setup("+ shared prompts", True, 2048, False, shared=True),
    Setup("+ bf16 autocast", True, 2048, True, shared=True),
]


def sequences(
    tokenizer: Any, prompts: int, generations: int, max_new: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """Real prompts, random completion tokens with lengths like the preset's (a quarter run to the limit)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for problem in generate("word-arith", prompts, seed=seed):
        prompt = encode_prompt(tokenizer, format_prompt(tokenizer, problem.problem))
        for _ in range(generations):
            length = (
                max_new
                if torch.rand(1, generator=gen).item() < 0.25
                else int(torch.randint(12, max_new, (1,), generator=gen))
            )
            out.append((prompt, torch.randint(100, tokenizer.vocab_size, (length,), generator=gen).tolist()))
    return out


@contextlib.contextmanager
def precision(bf16: bool) -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        yield


def update(
    policy: Any,
    optimizer: torch.optim.Optimizer,
    seqs: list[tuple[list[int], list[int]]],
    adv: torch.Tensor,
    setup: Setup,
    micro_batch: int,
    pad: int,
) -> tuple[float, torch.Tensor, float]:
    """One update; returns seconds, the log-probs (fp32, in input order, padded to the longest) and the
    token positions its forward passes computed."""
    model = policy.model
    total = sum(len(c) for _, c in seqs)
    prompts, completions = [p for p, _ in seqs], [c for _, c in seqs]
    width = max(map(len, completions))
    logps = torch.zeros(len(seqs), width)
    start = time.perf_counter()
    if setup.bounded:
        batches = micro_batches(prompts, completions, setup.budget or 10**9, micro_batch, setup.shared, pad)
        for rows, batch in batches:
            with precision(setup.bf16):
                loss = micro_batch_loss(policy, batch, adv[rows], total)
                loss.backward()
        computed = sum(batch.padded_tokens for _, batch in batches)
    else:  # the old path: every position unembedded, micro-batches in input order
        computed = 0
        for s in range(0, len(seqs), micro_batch):
            rows_ = [seqs[i][0] + seqs[i][1] for i in range(s, min(s + micro_batch, len(seqs)))]
            longest = max(map(len, rows_))
            computed += longest * len(rows_)
            ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows_])
            mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows_])
            group = list(range(s, s + len(rows_)))
            p_lens, c_lens = [len(seqs[i][0]) for i in group], [len(seqs[i][1]) for i in group]
            logp = logprobs_from_logits(model(input_ids=ids, attention_mask=mask).logits, ids, p_lens, c_lens)
            token_mask = torch.arange(logp.shape[1])[None] < torch.tensor(c_lens)[:, None]
            policy_loss(logp, token_mask, adv[group], total).backward()
            logps[group, : logp.shape[1]] = logp.detach()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 2.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    if setup.bounded:
        with torch.no_grad():  # the log-probs this setup computes, for the accuracy column (not timed)
            for rows, batch in batches:
                with precision(setup.bf16):
                    logp = batch.logprobs(model)
                logps[rows, : logp.shape[1]] = logp.float()
    return seconds, logps, computed


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    policy = make_policy(model, "steering", None, args.model)
    policy.load_state({name: 0.05 * torch.randn_like(t) for name, t in policy.named_state().items()})
    model.train()
    seqs = sequences(tokenizer, args.prompts, args.generations, args.max_new_tokens, args.seed)
    adv = torch.randn(len(seqs), generator=torch.Generator().manual_seed(1))
    # lr 0: every setup sees the same vectors, so their log-probs are comparable round after round
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)
    times: dict[str, list[float]] = {s.name: [] for s in SETUPS}
    logps: dict[str, torch.Tensor] = {}
    positions: dict[str, int] = {}
    for rep in range(args.warmup + args.reps):
        for setup in SETUPS:
            seconds, logp, computed = update(
                policy, optimizer, seqs, adv, setup, args.micro_batch, tokenizer.pad_token_id
            )
            if rep >= args.warmup:
                times[setup.name].append(seconds)
            logps[setup.name], positions[setup.name] = logp, computed
    reference = logps[SETUPS[0].name]
    base = statistics.median(times[SETUPS[0].name])
    rows, previous = [], base
    for setup in SETUPS:
        median = statistics.median(times[setup.name])
        rows.append(
            {
                "setup": setup.name,
                "seconds": median,
                "speedup": base / median,
                "gain_share": (previous - median) / (base - statistics.median(times[SETUPS[-1].name])),
                "positions": positions[setup.name],
                "max_abs_logprob_diff": float((logps[setup.name] - reference).abs().max()),
            }
        )
        previous = median
    return {
        "model": args.model,
        "sequences": len(seqs),
        "completion_tokens": sum(len(c) for _, c in seqs),
        "prompt_tokens": sum(len(p) for p, _ in seqs),
        "micro_batch": args.micro_batch,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}: {result['sequences']} sequences ({result['prompt_tokens']} prompt + "
        f"{result['completion_tokens']} completion tokens), median of {result['reps']}, "
        f"{result['threads']} threads, torch {result['torch']}",
        "",
        "| setup | s / update | speed-up | share of the gain | token positions computed | max abs Δ log-prob vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['setup']} | {r['seconds']:.2f} | x{r['speedup']:.2f} | {r['gain_share']:.0%} | "
            f"{r['positions']:,} | {r['max_abs_logprob_diff']:.2e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    result = run(args)
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
