"""Cost of a full head-patching sweep against the forward passes it replaces.

    python bench/bench_patching.py        # random Qwen2: 6 layers, d=512, 16 q / 4 KV heads, 2 x 128 tokens
    python bench/bench_patching.py --model smollm2-135m     # a real model's shapes (30 layers, 9 q / 3 KV heads)

The sweep (`head_patching`: every query head, KV group, all V, attention, MLP and whole layer, each "only"
and "skip") computes the study layer's input once and runs only the layers after it, variants stacked in
the batch. The naive way runs the whole model once per variant. Both are timed here, side by side: the
sweep, one full forward pass with a patch (`patch_hooks`, the naive unit), and one plain steered forward.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import torch
from bench_rollout import median_time  # bench/ is on sys.path: the script's own directory

from steerlens.analysis.patches import DEFAULT_VARIANTS, MODES, make_patch, variant_patches
from steerlens.analysis.patching import head_patching, patch_hooks
from steerlens.anatomy import attention_parts, model_shape
from steerlens.backends import hf
from steerlens.models import load_model
from steerlens.tiny import build_tiny_model
from steerlens.vectors import SteeringVectors


def load(args: argparse.Namespace, workdir: str) -> tuple[torch.nn.Module, str]:
    if args.model:
        return load_model(args.model)[0], args.model
    path = build_tiny_model(f"{workdir}/model", "qwen2", layers=6, hidden=512, heads=16, kv_heads=4, intermediate=1024)
    return load_model(path)[0], "random qwen2 6 x 512, 16 q / 4 KV heads"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        model, label = load(args, workdir)
    shape = model_shape(model)
    layer = shape.num_layers - 2  # the reference's setting: the vector before the last layer
    vectors = SteeringVectors(torch.randn(1, shape.hidden_size) * 4, (layer,), shape.num_layers)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))
    parts = attention_parts(model, layer + 1)
    variants = len(variant_patches(DEFAULT_VARIANTS, MODES, ("both",), parts.heads, parts.groups))
    with torch.no_grad():
        sweep_s = median_time(
            lambda: head_patching(model, ids, vectors, layer, batch_size=args.batch_size), args.repeats
        )
        patch = make_patch("q", 0, "only", parts.heads, parts.groups)

        def patched_forward() -> None:
            with patch_hooks(model, vectors, layer, patch):
                model(ids)

        patched_s = median_time(patched_forward, args.repeats)
        with hf.attach(model, vectors):
            steered_s = median_time(lambda: model(ids), args.repeats)
    return {
        "bench": "patching",
        "model": label,
        "layers": shape.num_layers,
        "heads": parts.heads,
        "kv_groups": parts.groups,
        "batch": args.batch,
        "tokens": args.tokens,
        "variants": variants,
        "sweep_s": sweep_s,
        "patched_forward_s": patched_s,
        "steered_forward_s": steered_s,
        "naive_s": variants * patched_s,
        "speedup_vs_naive": variants * patched_s / sweep_s,
        "sweep_in_forward_passes": sweep_s / steered_s,
        "threads": torch.get_num_threads(),
    }


def markdown(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"### Head-patching sweep ({r['model']}, study layer {r['layers'] - 1}, "
            f"{r['batch']} x {r['tokens']} tokens)",
            "",
            "| variants | sweep (s) | one forward (s) | naive: a patched forward per variant (s) | speed-up "
            "| sweep cost in forward passes |",
            "|---|---|---|---|---|---|",
            f"| {r['variants']} | {r['sweep_s']:.2f} | {r['steered_forward_s']:.3f} | {r['naive_s']:.2f} | "
            f"x{r['speedup_vs_naive']:.1f} | {r['sweep_in_forward_passes']:.1f} |",
        ]
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a short name or checkpoint (default: a random Qwen2, see above)")
    p.add_argument("--batch", type=int, default=2, help="prompts")
    p.add_argument("--tokens", type=int, default=128, help="tokens per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="variants stacked per tail pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main() -> None:
    args = parser().parse_args()
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else markdown(result))


if __name__ == "__main__":
    main()
