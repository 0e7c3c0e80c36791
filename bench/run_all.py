"""Run every benchmark that fits this machine and write bench/RESULTS.json and bench/RESULTS.md.

    python bench/run_all.py                 # CPU: toy shapes, HF + vLLM rollouts, logit lens at 150k x 3584
    python bench/run_all.py --quick         # fewer repetitions, smaller logit lens (a smoke run)
    python bench/run_all.py --device cuda   # adds Qwen2.5-1.5B / 7B training-step shapes in bf16
    python bench/run_all.py --no-peer       # without the TRL comparison (which installs TRL into bench/.trl)

Each section's figures are ratios measured side by side in one process (see each bench_*.py), so
they survive machine noise better than absolute times; the date, machine and versions are recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_logit_lens  # noqa: E402
import bench_patching  # noqa: E402
import bench_rollout  # noqa: E402
import bench_train_step  # noqa: E402
import bench_trl_peer  # noqa: E402

from steerlens.io import write_text  # noqa: E402

KEPT_MARKER = "<!-- Below: figures from benchmarks run on their own; bench/run_all.py keeps them. -->"
from steerlens.rollout import vllm_available  # noqa: E402

HERE = Path(__file__).parent


def machine() -> dict[str, Any]:
    import transformers

    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if vllm_available():
        import vllm

        info["vllm"] = vllm.__version__
    return info


def train_steps(device: str, reps: int) -> list[dict[str, Any]]:
    shapes = [("toy", "float32")] + (
        [("qwen2.5-1.5b", "bfloat16"), ("qwen2.5-7b", "bfloat16")] if device == "cuda" else []
    )
    results = []
    for shape, dtype in shapes:
        args = bench_train_step.parser().parse_args(
            ["--shape", shape, "--device", device, "--dtype", dtype, "--reps", str(reps)]
        )
        if shape == "qwen2.5-7b":  # full tuning of 7B does not fit beside the others in 80 GB
            args.kinds = "steering,lora"
        results.append(bench_train_step.run(args))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-peer", action="store_true", help="skip the TRL RLOOTrainer comparison")
    args = parser.parse_args()
    reps = 2 if args.quick else 5
    engines = "hf,vllm" if vllm_available() and args.device == "cpu" else "hf"
    rollout_args = bench_rollout.parser().parse_args(["--engines", engines, "--reps", str(reps)])
    lens_args = bench_logit_lens.parser().parse_args(
        [
            "--vocab",
            "150000",
            "--hidden",
            "1024" if args.quick else "3584",
            "--layers",
            "28",
            "--repeats",
            str(min(reps, 3)),
        ]
    )
    patching_args = bench_patching.parser().parse_args(["--repeats", str(min(reps, 3))])
    results = {
        "machine": machine(),
        "train_step": train_steps(args.device, reps),
        "rollout": bench_rollout.run(rollout_args),
        "logit_lens": bench_logit_lens.run(lens_args),
        "patching": bench_patching.run(patching_args),
    }
    if not args.no_peer:
        steps = "2" if args.quick else "4"
        results["trl_peer"] = [
            bench_trl_peer.run(bench_trl_peer.parser().parse_args(["--trainable", kind, "--steps", steps]))
            for kind in ("steering", "lora")
        ]
    write_text(HERE / "RESULTS.json", json.dumps(results, indent=2) + "\n")
    lens = results["logit_lens"]
    sections = [
        f"# Benchmark results\n\n{json.dumps(results['machine'])}\n",
        "## RLOO update: steering vs LoRA vs full\n",
        *[bench_train_step.markdown(r) + "\n" for r in results["train_step"]],
        "## Rollouts and sync\n",
        bench_rollout.markdown(results["rollout"]) + "\n",
        "## Logit lens\n",
        f"{lens['layers']} layers x {lens['vocab']:,} tokens x d={lens['hidden']} ({lens['dtype']}), "
        f"{lens['threads']} threads: median {lens['median_s']:.2f} s, "
        f"extra peak memory {lens['extra_peak_gib']:.2f} GiB\n",
        "## Head patching\n",
        bench_patching.markdown(results["patching"]) + "\n",
    ]
    if "trl_peer" in results:
        sections += ["## Peer: TRL's RLOOTrainer\n", *[bench_trl_peer.markdown(r) + "\n" for r in results["trl_peer"]]]
    print("\n".join(sections))
    write_text(HERE / "RESULTS.md", "\n".join(sections) + "\n" + kept_sections())


def kept_sections() -> str:
    """What RESULTS.md holds from the marker on: figures of benchmarks that run on their own (llama.cpp,
    the memory model, the SmolLM2 update levers), which this script must not erase."""
    old = (HERE / "RESULTS.md").read_text() if (HERE / "RESULTS.md").is_file() else ""
    start = old.find(KEPT_MARKER)
    return old[start:] if start >= 0 else KEPT_MARKER + "\n"


if __name__ == "__main__":
    main()
