"""Peer comparison: one RLOO step of steerlens vs TRL's RLOOTrainer, same model, prompts, batch and reward.

    python bench/bench_trl_peer.py                  # toy model, 16 prompts x 8 samples, 48 tokens, 4 timed steps
    python bench/bench_trl_peer.py --trainable lora # LoRA r=1 on down_proj in both
    python bench/bench_trl_peer.py --model smollm2-135m --data word-arith --answer-fallback last_number \
        --prompts 8 --generations 4 --steps 2 --micro-batch 32 --lr 2e-2   # a real model, a reward with signal

TRL is installed only for this benchmark, into bench/.trl (`pip install --no-deps --target`; its own
dependencies — accelerate, datasets, peft — are already steerlens's). Each trainer runs in its own
subprocess (so peak RSS is its own), one after the other, with the same seed: TRL generates with HF
`generate`, so steerlens runs with `engine=hf` for the like-for-like row and with vLLM (its default)
for a second row. Both use beta/kl_coef 0 (no reference model), temperature 1, one optimizer step per
batch, AdamW at the same learning rate, and the same math-verify reward (+1 / -1). Only the steering
vectors (or the LoRA weights) are trainable on both sides: for TRL the steerlens hooks are attached to
the model and their parameter is registered on it, every base weight frozen.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TRL_DIR = HERE / ".trl"
TRL_VERSION = "1.16.0"


def ensure_trl() -> str:
    """Import TRL from bench/.trl, installing it there first if needed; returns its version."""
    sys.path.insert(0, str(TRL_DIR))
    try:
        import trl
    except ImportError:
        print(f"installing trl=={TRL_VERSION} into {TRL_DIR} (benchmark only)", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(TRL_DIR),
                f"trl=={TRL_VERSION}",
            ],
            check=True,
        )
        sys.path_importer_cache.pop(str(TRL_DIR), None)  # the directory did not exist when first looked at
        importlib.invalidate_caches()
        import trl
    return trl.__version__


def problems(args: argparse.Namespace) -> list[Any]:
    from steerlens.data.generated import generate

    return generate(args.data, args.prompts * (args.steps + 1), seed=args.seed)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def run_steerlens(args: argparse.Namespace, engine: str) -> dict[str, Any]:
    """`steps + 1` steps of the steerlens trainer; per-step times from its metrics (first step dropped)."""
    from steerlens.data.generated import write_problems
    from steerlens.rl.config import TrainConfig
    from steerlens.rl.job import train

    with tempfile.TemporaryDirectory() as tmp:
        data = write_problems(args.data, Path(tmp) / "train.jsonl", args.prompts * (args.steps + 1), seed=args.seed)
        cfg = TrainConfig(
            model=args.model,
            trainable=args.trainable,
            data=str(data),
            eval_data=None,
            steps=args.steps + 1,
            prompts_per_step=args.prompts,
            generations=args.generations,
            max_new_tokens=args.max_new_tokens,
            lr=args.lr,
            micro_batch=args.micro_batch,
            engine=engine,
            verify_every=0,
            seed=args.seed,
            out_dir=str(Path(tmp) / "run"),
            save_every=10_000,
            progress=False,
            warmup_ratio=0.0,
            answer_fallback=args.answer_fallback,
            update_autocast=args.update_autocast,
        )
        t0 = time.perf_counter()
        summary = train(cfg)
        total = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [sum(v for k, v in r.items() if k.startswith("time_")) for r in rows[1:]]
    updates = [r["time_forward_backward"] for r in rows[1:]]
    return {
        "trainer": f"steerlens ({engine} rollouts)",
        "step_s": statistics.median(steps),
        "update_s": statistics.median(updates),
        "reward_mean": statistics.mean(r["reward_mean"] for r in rows),
        "trainable_parameters": summary["trainable_parameters"],
        "optimizer_bytes": summary["optimizer_state_bytes"],
        "process_s": round(total, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    """`steps + 1` steps of TRL's RLOOTrainer on the same batch; step times from a callback."""
    version = ensure_trl()
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from steerlens.anatomy import model_shape
    from steerlens.backends.hf import attach, freeze
    from steerlens.data import format_prompt
    from steerlens.models import load_model, resolve_model
    from steerlens.reward import RewardScorer
    from steerlens.vectors import SteeringVectors

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(resolve_model(args.model))
    peft_config = None
    if args.trainable == "steering":
        freeze(model)
        handle = attach(model, SteeringVectors.zeros(model_shape(model)), trainable=True)
        model.register_parameter("steering_vectors", handle.parameter)
    else:
        from peft import LoraConfig

        peft_config = LoraConfig(r=1, lora_alpha=2, target_modules=["down_proj"], lora_dropout=0.0)
    rows = [{"prompt": format_prompt(tokenizer, p.problem), "answer": p.answer} for p in problems(args)]
    scorer = RewardScorer(fallback=args.answer_fallback)

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [1.0 if ok else -1.0 for ok in scorer.score(completions, answer)]

    starts: list[float] = []
    steps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            starts.append(time.perf_counter())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            steps.append(time.perf_counter() - starts[-1])

    batch = args.prompts * args.generations
    micro = min(args.micro_batch, batch)
    with tempfile.TemporaryDirectory() as tmp:
        config = RLOOConfig(
            output_dir=tmp,
            max_steps=args.steps + 1,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=batch // micro,
            num_generations=args.generations,
            max_completion_length=args.max_new_tokens,
            temperature=1.0,
            beta=0.0,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=args.seed,
            bf16=False,
            shuffle_dataset=False,
            disable_dropout=True,
            adam_beta1=0.9,
            adam_beta2=0.999,
            weight_decay=0.0,
            max_grad_norm=2.0,
            warmup_steps=0,
        )
        trainer = RLOOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[StepTimer()],
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
        rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
        opt_bytes = sum(
            t.numel() * t.element_size()
            for s in trainer.optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
    scorer.close()
    return {
        "trainer": f"TRL {version} RLOOTrainer (HF generate)",
        "step_s": statistics.median(steps[1:]),
        "update_s": None,
        "reward_mean": statistics.mean(rewards) if rewards else None,
        "trainable_parameters": trainable,
        "optimizer_bytes": opt_bytes,
        "process_s": round(total, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def worker(args: argparse.Namespace) -> None:
    result = run_trl(args) if args.worker == "trl" else run_steerlens(args, args.worker.split(":")[1])
    print("RESULT " + json.dumps(result))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Each trainer in its own subprocess; the TRL row's ratios are relative to steerlens with HF rollouts."""
    from steerlens.backends.vllm import vllm_available

    workers = ["steerlens:hf", "trl"] + (
        ["steerlens:vllm"] if vllm_available() and args.trainable == "steering" else []
    )
    rows = []
    for name in workers:
        argv = [sys.executable, __file__, "--worker", name] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "json")
        ]
        out = subprocess.run(argv, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            raise RuntimeError(f"{name} worker failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    reference = rows[0]
    for row in rows:
        row["step_vs_steerlens_hf"] = round(row["step_s"] / reference["step_s"], 2)
    batch = (
        f"{args.prompts} prompts x {args.generations} samples, {args.max_new_tokens} new tokens, {args.data}, "
        f"fallback {args.answer_fallback}, steerlens autocast {args.update_autocast}"
    )
    return {
        "bench": "trl_peer",
        "model": args.model,
        "trainable": args.trainable,
        "batch": batch,
        "timed_steps": args.steps,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### RLOO step vs TRL ({result['model']}, {result['trainable']}, {result['batch']}, median of "
        f"{result['timed_steps']} steps after one warm-up)",
        "",
        "| trainer | step (s) | x steerlens-hf | update (s) | trainable params | optimizer bytes | peak RSS (MiB) "
        "| mean reward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        update = f"{r['update_s']:.3f}" if r["update_s"] is not None else "–"
        reward = f"{r['reward_mean']:+.3f}" if r["reward_mean"] is not None else "–"
        lines.append(
            f"| {r['trainer']} | {r['step_s']:.2f} | {r['step_vs_steerlens_hf']:.2f} | {update} | "
            f"{r['trainable_parameters']:,} | {r['optimizer_bytes']:,} | {r['peak_rss_mib']:.0f} | {reward} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-arith")
    p.add_argument("--trainable", choices=["steering", "lora"], default="steering")
    p.add_argument("--data", default="toy-arith", help="generated training problems (toy-arith, word-arith)")
    p.add_argument(
        "--answer-fallback",
        choices=["none", "last_number"],
        default="none",
        help="reward: verify the last number when nothing is boxed (both trainers)",
    )
    p.add_argument(
        "--update-autocast",
        choices=["off", "bfloat16"],
        default="off",
        help="steerlens's update under bf16 autocast (TRL keeps fp32: bf16=False)",
    )
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-2)
    p.add_argument("--steps", type=int, default=4, help="timed steps (one more runs first as warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.worker:
        worker(args)
        return
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else markdown(result))


if __name__ == "__main__":
    main()
