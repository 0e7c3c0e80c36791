"""Time and memory of one RLOO update for steering vs LoRA vs full tuning, side by side in one run.

    python bench/bench_train_step.py                                  # toy shape, CPU
    python bench/bench_train_step.py --shape qwen2.5-1.5b --device cuda --dtype bfloat16
    python bench/bench_train_step.py --shape qwen2.5-7b --device cuda --dtype bfloat16 --kinds steering,lora

Random weights (speed does not depend on them). One update = forward on prompt+completion, fp32
log-probs of the completion positions (`steerlens.rl.update.completion_logprobs`), the token-normalised
policy loss, backward, grad clipping, AdamW step — the same functions the trainer uses. Reports per kind: median
seconds per update, trainable
parameters, optimizer-state and gradient bytes, and (CUDA) the update's peak memory above the resident
weights. The kinds' updates are interleaved round by round in one process, so machine noise hits all
alike and the ratios to steering are what to read. Prints JSON (Markdown with --markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {  # (layers, hidden, heads, kv_heads, intermediate, vocab): public configs of these models
    "toy": (4, 128, 2, 1, 256, 264),
    "qwen2.5-0.5b": (24, 896, 14, 2, 4864, 151936),
    "qwen2.5-1.5b": (28, 1536, 12, 2, 8960, 151936),
    "qwen2.5-7b": (28, 3584, 28, 4, 18944, 152064),
    "qwen2.5-14b": (48, 5120, 40, 8, 13824, 152064),
}


def build(shape: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    layers, hidden, heads, kv, inter, vocab = SHAPES[shape]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        architectures=["Qwen2ForCausalLM"],
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class Contender:
    """One kind of training (its own copy of the model) and a timed RLOO update on a fixed batch."""

    def __init__(self, args: argparse.Namespace, kind: str) -> None:
        from steerlens.rl.policy import make_policy

        torch.manual_seed(0)
        self.args, self.kind = args, kind
        self.policy = make_policy(
            build(args.shape, getattr(torch, args.dtype), args.device), kind, None, args.shape
        )  # LoRA: rank 1, the default
        self.params = self.policy.parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.policy.model.train()
        self.times: list[float] = []
        self.peak_extra = 0

    def update(self, ids: torch.Tensor, adv: torch.Tensor) -> None:
        from steerlens.rl.objective import policy_loss
        from steerlens.rl.update import completion_logprobs

        args = self.args
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for chunk in range(0, args.batch, args.micro_batch):
            rows = ids[chunk : chunk + args.micro_batch]
            lens = [args.completion_len] * len(rows)
            logp = completion_logprobs(
                self.policy.model, rows, torch.ones_like(rows), [args.prompt_len] * len(rows), lens
            )
            mask = torch.ones_like(logp, dtype=torch.bool)
            policy_loss(logp, mask, adv[chunk : chunk + len(rows)], args.batch * args.completion_len).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 2.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            self.peak_extra = max(self.peak_extra, torch.cuda.max_memory_allocated() - resident)
        self.times.append(time.perf_counter() - start)

    def result(self, warmup: int) -> dict:
        state = sum(
            t.numel() * t.element_size()
            for s in self.optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        grads = sum(p.numel() * p.element_size() for p in self.params)
        return {
            "kind": self.kind,
            "seconds_per_update": statistics.median(self.times[warmup:]),
            "trainable_parameters": sum(p.numel() for p in self.params),
            "optimizer_state_bytes": state,
            "gradient_bytes": grads,
            "update_peak_bytes": self.peak_extra if self.args.device.startswith("cuda") else None,
        }


def run(args: argparse.Namespace) -> dict:
    """Interleave the kinds' updates round by round, so load on the machine hits all of them alike."""
    contenders = [Contender(args, kind) for kind in args.kinds.split(",")]
    vocab = SHAPES[args.shape][5]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_len + args.completion_len), generator=gen).to(args.device)
    adv = torch.randn(args.batch, generator=gen).to(args.device)
    for _ in range(args.warmup + args.reps):
        for contender in contenders:
            contender.update(ids, adv)
    results = [c.result(args.warmup) for c in contenders]
    base = next((r["seconds_per_update"] for r in results if r["kind"] == "steering"), None)
    for r in results:
        r["time_vs_steering"] = r["seconds_per_update"] / base if base else None
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"
    )
    return {
        "shape": args.shape,
        "device": device,
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "completion_len": args.completion_len,
        "torch": torch.__version__,
        "kinds": results,
    }


def markdown(result: dict) -> str:
    rows = [
        f"{result['shape']} on {result['device']} ({result['dtype']}, batch {result['batch']} x "
        f"{result['prompt_len']}+{result['completion_len']} tokens, torch {result['torch']})",
        "",
        "| kind | s / update | x steering | trainable params | optimizer bytes | update peak (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["kinds"]:
        peak = "-" if r["update_peak_bytes"] is None else f"{r['update_peak_bytes'] / 2**20:.0f}"
        rows.append(
            f"| {r['kind']} | {r['seconds_per_update']:.4f} | {r['time_vs_steering']:.1f} | "
            f"{r['trainable_parameters']:,} | {r['optimizer_state_bytes']:,} | {peak} |"
        )
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="toy")
    parser.add_argument("--kinds", default="steering,lora,full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    return parser


def main() -> None:
    args = parser().parse_args()
    result = run(args)
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
