"""Time the logit lens on a random unembedding the size of a large model's (default 150k x 5120, 32 layers).

    python bench/bench_logit_lens.py                      # fp32 unembedding, 3.1 GB
    python bench/bench_logit_lens.py --dtype bfloat16     # as a bf16 checkpoint holds it
    python bench/bench_logit_lens.py --threads 1          # on a machine whose cores are busy with other work

Prints the median wall time of `logit_lens` (top/bottom-k, dot products, histograms, no tokenizer) and the
memory it needed on top of the unembedding (growth of the process's peak resident set).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from steerlens.analysis.logit_lens import logit_lens


def peak_rss_gib() -> float:
    """The process's peak resident set so far (VmHWM), in GiB."""
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Median time and extra peak memory of `logit_lens` on a random unembedding of the given size."""
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    unembed = torch.empty(args.vocab, args.hidden, dtype=getattr(torch, args.dtype))
    for start in range(0, args.vocab, 8192):  # filled in blocks: no full-size fp32 temporary
        block = unembed[start : start + 8192]
        block.copy_(torch.randn(block.shape, generator=gen))
    vectors = torch.randn(args.layers, args.hidden, generator=gen)
    before = peak_rss_gib()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = logit_lens(vectors, unembed, k=args.k, chunk_size=args.chunk_size)
        times.append(time.perf_counter() - start)
    assert len(result.top) == args.layers * args.k
    return {
        "layers": args.layers,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "dtype": args.dtype,
        "k": args.k,
        "threads": torch.get_num_threads(),
        "unembedding_gib": unembed.numel() * unembed.element_size() / 2**30,
        "median_s": statistics.median(times),
        "all_s": times,
        "extra_peak_gib": peak_rss_gib() - before,
    }


def main() -> None:
    args = parser().parse_args()
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"logit lens: {r['layers']} layers x {r['vocab']} tokens x d={r['hidden']} ({r['dtype']}, "
        f"{r['unembedding_gib']:.2f} GiB), k={r['k']}, chunk {args.chunk_size}, {r['threads']} threads"
    )
    print(f"  median {r['median_s']:.2f} s over {args.repeats} runs (all: {', '.join(f'{t:.2f}' for t in r['all_s'])})")
    print(f"  peak memory beyond the unembedding: {r['extra_peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
