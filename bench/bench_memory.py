"""Peak memory of one RLOO update on this CPU, a linear model fitted to it, and the predicted peak per GPU
of every GPU preset in analyses/presets/ (issue 14).

    python bench/bench_memory.py                 # the full bench (~13 min on 2 cores): measure, fit, predict
    python bench/bench_memory.py --quick         # smoke run (< 1 min): two short updates, GPU table from RECORDED_FIT
    python bench/bench_memory.py --predict-only  # only the GPU table, from RECORDED_FIT (no torch model is built)
    python bench/bench_memory.py --json out.json # also write measurements, fit and GPU table as JSON

What is measured. One update = `steerlens.rl.update.completion_logprobs` + `policy_loss` + backward, with
steering vectors on every layer trainable (`make_policy(model, "steering", None, name)`), on random fp32
weights with Qwen2.5-1.5B's layer shape (d 1536, MLP 8960, 12 heads / 2 KV heads, sdpa attention,
rope_theta 1e6, tied embeddings) and one sequence: a 256-token prompt and a 512..8192-token completion,
with and without decoder-layer checkpointing. Each configuration runs in a fresh subprocess; its peak is
the growth of VmHWM over the resident set once the model is built (the high-water mark is reset through
/proc/self/clear_refs, so model construction's own transient peak does not hide the update's), with
glibc's mmap threshold pinned (CHILD_ENV) so that freed tensors leave the resident set. VmHWM counts every
page torch's CPU allocator touched, whichever op allocated it; tracemalloc and the torch profiler miss or
mis-attribute CPU tensor memory.

Why two vocabularies. At 151,936 tokens the unembedding costs 3 x 2 x V x d FLOPs per completion token
(forward, recompute, backward), more than three decoder layers, which would take the length sweep past
this machine's time budget. The sweep therefore uses a 32,768-token vocabulary (the layers are
Qwen2.5-1.5B's); the log-prob step is measured on its own at 32,768 and 151,936 tokens and two chunk
sizes, and one full-vocabulary run of the old full-logits path shows what the chunking removed.

The fit. Per checkpointing mode, peak = a + b*T + c*n*T over T = prompt + completion tokens and n = the
decoder layers the backward pass goes through. With steering on every layer that is n = L - 1: layer 0
needs no backward (its input does not require grad and its weights are frozen; its vector is added to its
output). So the models have 2 and 4 layers (n = 1, 3): with n = 0 the peak is elsewhere (layer 0's
forward temporaries, or the log-prob step), and an earlier run's line through n = 0 and n = 2
under-stated c (122 KiB per token per layer vs 132 KiB of saved tensors). b carries the last layer's
temporaries (and, checkpointed, one recomputed layer). The log-prob step is k x chunk x vocab x 4 bytes,
k fitted over the vocabulary / chunk runs (one layer, n = 0, where the log-prob step is the peak). How
the CPU fit becomes a GPU prediction is in `gpu_row`.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRESETS = HERE.parent / "analyses" / "presets"
CPU_PRESETS = {"smollm2-135m-word-arith.yaml"}  # the one preset that runs on this CPU, not a GPU

GiB = 2**30
MiB = 2**20
CPU_LIMIT = 12 * GiB  # a configuration predicted to need more (resident + update) is skipped
BENCH_PROMPT = 256

# Public config.json values (hub): (layers, d, MLP, heads, KV heads, vocab, tied embeddings,
# max_position_embeddings), as the author knows them (not fetched here): Qwen2.5-1.5B and -Math-1.5B tie
# their embeddings, the 7B/14B/Llama models do not; the Math models' context is 4096, the others' 131072.
# The parameter counts they give are the published ones (1.54 / 7.62 / 14.77 / 8.03 B). Llama layers are
# built as Qwen2 layers of the same shape for the saved-tensor count (q/k/v biases save no activations).
HUB = {
    "Qwen/Qwen2.5-1.5B": (28, 1536, 8960, 12, 2, 151936, True, 131072),
    "Qwen/Qwen2.5-Math-1.5B": (28, 1536, 8960, 12, 2, 151936, True, 4096),
    "Qwen/Qwen2.5-7B": (28, 3584, 18944, 28, 4, 152064, False, 131072),
    "Qwen/Qwen2.5-Math-7B": (28, 3584, 18944, 28, 4, 152064, False, 4096),
    "Qwen/Qwen2.5-14B": (48, 5120, 13824, 40, 8, 152064, False, 131072),
    "meta-llama/Llama-3.1-8B": (32, 4096, 14336, 32, 8, 128256, False, 131072),
    "meta-llama/Llama-3.1-8B-Instruct": (32, 4096, 14336, 32, 8, 128256, False, 131072),
}
BENCH_SHAPE = "Qwen/Qwen2.5-1.5B"

# The GPU: an 80 GB card as CUDA reports it (H100 80GB: 81,559 MiB; A100 80GB: 81,920 MiB; the smaller one).
GPU_BYTES = 81559 * MiB
HEADROOM = 0.10  # a preset fits when trainer + engine <= (1 - HEADROOM) x GPU
TRAINER_ALLOWANCE = 2 * GiB  # trainer's CUDA context (~0.5-1 GB), cuBLAS workspaces, allocator fragmentation
ENGINE_CONTEXT = 1 * GiB  # vLLM's engine process: its own CUDA context, outside gpu_memory_utilization
ENGINE_OVERHEAD = 2 * GiB  # inside vLLM's share, besides weights and KV: profiled activations, CUDA graphs
PROMPT_TOKENS = 1024  # the presets keep 1024 tokens of context for the prompt
BF16 = 2 / 4  # activation bytes on GPU (bf16) relative to the fp32 CPU measurement

# The fit of the run recorded in bench/RESULTS.md ("Memory model of one RLOO update (issue 14)"); used by
# --predict-only and --quick. Bytes, fp32, Qwen2.5-1.5B layer shape.
RECORDED_FIT: dict[str, Any] = {
    "plain": {"a": 109794090.2, "b": 100480.4, "c": 135687.9},
    "checkpointed": {"a": 27215046.2, "b": 248935.0, "c": 6155.2},
    "logprob_k": 2.9966,
    "layer_saved": {
        "Qwen/Qwen2.5-1.5B|full": 194616.0,
        "Qwen/Qwen2.5-1.5B|lora": 171068.0,
        "Qwen/Qwen2.5-1.5B|steering": 135224.0,
        "Qwen/Qwen2.5-14B|steering": 257192.0,
        "Qwen/Qwen2.5-7B|steering": 289912.0,
        "meta-llama/Llama-3.1-8B|steering": 246920.0,
    },
}


# ---- the measurement (child processes) ----------------------------------------------------------------
def build(layers: int, vocab: int, shape: str = BENCH_SHAPE) -> Any:
    """A random-weight fp32 Qwen2 causal LM with `shape`'s layers (sdpa attention) and `vocab` tokens."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    _, d, mlp, heads, kv, _, _, _ = HUB[shape]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(row for row in status if row.startswith(field + ":")).split()[1])


def settle() -> None:
    """Return freed memory to the OS and restart the high-water mark at the current resident set."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # Linux >= 4.0: reset VmHWM to VmRSS


def measure_update(spec: dict[str, Any]) -> dict[str, Any]:
    """One update of `spec` in this process: the growth of the peak resident set over the built model."""
    import torch

    from steerlens.rl.objective import logprobs_from_logits, policy_loss
    from steerlens.rl.policy import make_policy
    from steerlens.rl.update import completion_logprobs, layer_checkpointing

    torch.set_num_threads(spec["threads"])
    model = build(spec["layers"], spec["vocab"])
    policy = make_policy(model, "steering", None, "qwen2.5-1.5b-shape")
    model = policy.model
    model.train()  # HF's layer checkpointing is active only in training mode (as in Trainer.train)
    prompt, completion = spec["prompt"], spec["completion"]
    ids = torch.randint(0, spec["vocab"], (1, prompt + completion), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    settle()
    resident = status_kib("VmHWM") * 1024
    start = time.perf_counter()
    with layer_checkpointing(model, spec["checkpointing"]):
        if spec["path"] == "chunked":
            logp = completion_logprobs(model, ids, attn, [prompt], [completion], spec["chunk"])
        else:  # the reference: full logits [batch, seq, vocab], then logprobs_from_logits
            logp = logprobs_from_logits(model(input_ids=ids, attention_mask=attn).logits, ids, [prompt], [completion])
        mask = torch.ones_like(logp, dtype=torch.bool)
        policy_loss(logp, mask, torch.ones(1), completion).backward()
    seconds = time.perf_counter() - start
    grad = policy.parameters()[0].grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    return {
        **spec,
        "resident_mib": resident / MiB,
        "peak_mib": (status_kib("VmHWM") * 1024 - resident) / MiB,
        "seconds": seconds,
    }


def layer_saved_bytes(shape: str, kind: str, tokens: int = 128) -> float:
    """Bytes per token that one backward-traversed decoder layer of `shape` saves for backward (fp32,
    training `kind`), by autograd's saved-tensor hooks on a 2-layer model: unique storages, parameters
    excluded, attributed to the layer running when they were saved (layer 1 is read)."""
    import torch

    from steerlens.anatomy import decoder_layers
    from steerlens.rl.policy import make_policy
    from steerlens.rl.update import completion_logprobs

    model = build(2, 512, shape)
    policy = make_policy(model, kind, None, shape)  # LoRA: rank 1, the default
    model = policy.model
    model.train()
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    current: list[int | None] = [None]
    seen: set[int] = set()
    per_layer: dict[int, int] = defaultdict(int)
    for i, layer in enumerate(decoder_layers(model)):
        layer.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda *_: current.__setitem__(0, None))

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if current[0] is not None and ptr not in weights and ptr not in seen:
            seen.add(ptr)
            per_layer[current[0]] += t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logprobs(model, ids, torch.ones_like(ids), [tokens // 2], [tokens - tokens // 2], 64)
    return per_layer[1] / tokens


def child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["task"] == "update":
        return measure_update(spec)
    import torch

    torch.set_num_threads(spec["threads"])
    saved = {f"{shape}|{kind}": layer_saved_bytes(shape, kind) for shape, kind in spec["pairs"]}
    return {**spec, "bytes_per_token": saved}


# ---- the plan and its runs (parent) -----------------------------------------------------------------
SWEEP_VOCAB, SWEEP_CHUNK = 32768, 512


def spec(
    layers: int,
    completion: int,
    checkpointing: bool = False,
    vocab: int = SWEEP_VOCAB,
    chunk: int = SWEEP_CHUNK,
    path: str = "chunked",
    group: str = "sweep",
    prompt: int = BENCH_PROMPT,
) -> dict[str, Any]:
    return {
        "task": "update",
        "group": group,
        "layers": layers,
        "completion": completion,
        "prompt": prompt,
        "checkpointing": checkpointing,
        "vocab": vocab,
        "chunk": chunk,
        "path": path,
    }


def plan(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [spec(1, 256, prompt=128, chunk=256), spec(1, 512, prompt=128, chunk=256)]
    runs = [spec(2, c) for c in (512, 1024, 2048, 4096, 8192)]  # n = 1, every length
    runs += [spec(4, c) for c in (1024, 8192)]  # n = 3
    runs += [spec(2, c, True) for c in (1024, 4096, 8192)]  # checkpointed, n = 1
    runs += [spec(4, c, True) for c in (1024, 8192)]  # checkpointed, n = 3
    runs += [spec(1, c, vocab=v, chunk=1024, group="logprob") for v in (32768, 151936) for c in (1024, 2048)]
    runs += [spec(1, 1024, vocab=151936, chunk=256, group="logprob")]
    runs += [spec(1, c, vocab=151936, path="full-logits", group="reference") for c in (1024, 8192)]
    return runs


def prior_bytes(s: dict[str, Any]) -> float:
    """A rough prediction (before measuring) of resident model + update peak, to skip what cannot fit."""
    tokens, n = s["prompt"] + s["completion"], s["layers"] - 1
    weights = 4 * (s["vocab"] * 1536 + s["layers"] * 46.8e6) + 600 * MiB
    trunk = (8e3 * n + 2.2e5) * tokens if s["checkpointing"] else (2e5 * n + 3e4) * tokens
    if s["path"] == "chunked":
        logprob = 4 * min(s["chunk"], s["completion"]) * s["vocab"] * 4
    else:
        logprob = (tokens + 2 * s["completion"]) * s["vocab"] * 4
    return weights + trunk + logprob


# glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which freed tensors stay in
# the heap and count in VmHWM as if alive (measured: up to +46%, at 1.3k tokens). A fixed threshold keeps every
# block over 64 KiB in its own mapping, returned to the OS when torch frees it, so VmHWM tracks live tensors.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}


def run_child(payload: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CHILD_ENV},
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {payload} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(runs: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    results = []
    for s in runs:
        s = {**s, "threads": threads}
        predicted = prior_bytes(s)
        if predicted > CPU_LIMIT:
            results.append({**s, "skipped": f"predicted {predicted / GiB:.1f} GiB > {CPU_LIMIT / GiB:.0f} GiB"})
            print(f"skip  {label(s)}: {results[-1]['skipped']}", file=sys.stderr)
            continue
        r = run_child(s)
        results.append(r)
        print(
            f"run   {label(s)}: peak +{r['peak_mib']:.0f} MiB over {r['resident_mib']:.0f} MiB resident, "
            f"{r['seconds']:.1f} s",
            file=sys.stderr,
        )
    return results


def label(s: dict[str, Any]) -> str:
    mode = "ckpt" if s["checkpointing"] else "plain"
    return (
        f"{s['group']:9s} L={s['layers']} {mode:5s} V={s['vocab']:6d} chunk={s['chunk']:4d} {s['path']:11s} "
        f"C={s['completion']}"
    )


# ---- the fit -------------------------------------------------------------------------------------------
def lstsq(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares by the normal equations (a handful of rows and 2-3 columns)."""
    k = len(rows[0])
    ata = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
    aty = [sum(r[i] * v for r, v in zip(rows, y)) for i in range(k)]
    for col in range(k):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, k), key=lambda r: abs(ata[r][col]))
        ata[col], ata[pivot], aty[col], aty[pivot] = ata[pivot], ata[col], aty[pivot], aty[col]
        for r in range(k):
            if r != col:
                f = ata[r][col] / ata[col][col]
                ata[r] = [x - f * z for x, z in zip(ata[r], ata[col])]
                aty[r] -= f * aty[col]
    return [aty[i] / ata[i][i] for i in range(k)]


def fit(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: peak = a + b*T + c*n*T (bytes, T tokens, n backward layers); log-prob: k; with residuals."""
    done = [r for r in results if "peak_mib" in r]
    out: dict[str, Any] = {"residuals": []}
    for mode, ckpt in (("plain", False), ("checkpointed", True)):
        pts = [r for r in done if r["group"] == "sweep" and r["checkpointing"] == ckpt]
        if len({(r["layers"], r["completion"]) for r in pts}) < 3:
            continue
        rows = [[1.0, r["prompt"] + r["completion"], (r["layers"] - 1) * (r["prompt"] + r["completion"])] for r in pts]
        a, b, c = lstsq(rows, [r["peak_mib"] * MiB for r in pts])
        out[mode] = {"a": a, "b": b, "c": c}
        for r, row in zip(pts, rows):
            model = a + b * row[1] + c * row[2]
            out["residuals"].append(
                {
                    "fit": mode,
                    "layers": r["layers"],
                    "tokens": row[1],
                    "peak_mib": r["peak_mib"],
                    "fitted_mib": model / MiB,
                    "residual_mib": r["peak_mib"] - model / MiB,
                }
            )
    pts = [r for r in done if r["group"] == "logprob"]
    if len(pts) >= 3:
        # peak = a' + b'*T + k * chunk * vocab * 4 (one sequence, layer 0 only: n = 0)
        rows = [[1.0, r["prompt"] + r["completion"], min(r["chunk"], r["completion"]) * r["vocab"] * 4.0] for r in pts]
        a, b, k = lstsq(rows, [r["peak_mib"] * MiB for r in pts])
        out["logprob"] = {"a": a, "b": b, "k": k}
        for r, row in zip(pts, rows):
            model = a + b * row[1] + k * row[2]
            out["residuals"].append(
                {
                    "fit": "logprob",
                    "layers": r["layers"],
                    "tokens": row[1],
                    "vocab": r["vocab"],
                    "chunk": r["chunk"],
                    "peak_mib": r["peak_mib"],
                    "fitted_mib": model / MiB,
                    "residual_mib": r["peak_mib"] - model / MiB,
                }
            )
    ref = [r for r in done if r["group"] == "reference"]
    if ref and "logprob" in out:
        lp = out["logprob"]
        out["reference_bytes_per_token"] = [
            {
                "completion": r["completion"],
                "bytes_per_token": (r["peak_mib"] * MiB - lp["a"] - lp["b"] * (r["prompt"] + r["completion"]))
                / (r["prompt"] + r["completion"]),
            }
            for r in ref
        ]
    return out


def fit_summary(f: dict[str, Any]) -> list[str]:
    lines = []
    for mode in ("plain", "checkpointed"):
        if mode in f:
            p = f[mode]
            lines.append(
                f"{mode:12s}: peak = {p['a'] / MiB:7.1f} MiB + {p['b'] / 1024:6.1f} KiB x T + "
                f"{p['c'] / 1024:6.1f} KiB x n x T   (fp32; T tokens, n backward layers)"
            )
    if "logprob" in f:
        p = f["logprob"]
        lines.append(
            f"log-prob    : peak = {p['a'] / MiB:7.1f} MiB + {p['b'] / 1024:6.1f} KiB x T + "
            f"{p['k']:.2f} x chunk x vocab x 4 B   (n = 0)"
        )
    for r in f.get("reference_bytes_per_token", []):
        lines.append(
            f"full-logits reference path, C={r['completion']}: {r['bytes_per_token'] / MiB:.2f} MiB per token "
            "beyond the chunked path's per-token cost"
        )
    return lines


# ---- the GPU model -------------------------------------------------------------------------------------
def params_of(shape: str) -> int:
    layers, d, mlp, heads, kv, vocab, tied, _ = HUB[shape]
    kv_dim = d // heads * kv
    bias = shape.startswith("Qwen")  # Qwen2 has q/k/v biases, Llama none
    layer = d * d * 2 + d * kv_dim * 2 + 3 * d * mlp + 2 * d + ((d + 2 * kv_dim) if bias else 0)
    return vocab * d * (1 if tied else 2) + layers * layer + d


def kv_bytes_per_token(shape: str) -> int:
    layers, d, _, heads, kv, _, _, _ = HUB[shape]
    return 2 * layers * kv * (d // heads) * 2  # K and V, bf16


@functools.cache
def preset_settings(path: Path) -> Any:
    from steerlens.config import build_config
    from steerlens.rl.config import TrainConfig

    return build_config(TrainConfig, path)


def backward_layers(cfg: Any, layers: int) -> int:
    """Decoder layers the backward pass goes through: from the first steered layer's successor on (its
    vector is added to its output); LoRA and full tuning need every layer."""
    if cfg.trainable == "steering":
        return layers - 1 - min(cfg.layers or [0])
    return layers


def trainable_bytes(cfg: Any, shape: str) -> tuple[float, float]:
    """(bytes of the trained values beyond the bf16 weights, their gradients and AdamW states; the
    optimizer step's transient) as steerlens keeps them: steering and LoRA values fp32 (`SteeringHandle`
    parameter; peft keeps adapters fp32), full tuning trains the bf16 weights themselves (no fp32 master
    copy): bf16 gradients and bf16 AdamW states; the multi-tensor AdamW step allocates one temporary the
    size of the parameters."""
    layers, d, mlp, *_ = HUB[shape]
    if cfg.trainable == "steering":
        n = len(cfg.layers or range(layers)) * d
        return n * (4 + 4 + 8), n * 4
    if cfg.trainable == "lora":
        n = layers * cfg.lora_rank * (mlp + d)
        return n * (4 + 4 + 8), n * 4
    n = params_of(shape)
    return n * (2 + 4), n * 2


def gpu_row(
    path: Path, f: dict[str, Any], budget: int | None = None, utilization: float | None = None
) -> dict[str, Any]:
    """The predicted peak of `path`'s preset on one GPU, from the CPU fit `f`.

    Trainer = bf16 weights + trained values, gradients and AdamW states + the update's activations for
    one micro-batch of T = max(longest sequence, min(budget, micro_batch x longest)) tokens + the log-prob
    chunk + TRAINER_ALLOWANCE. Activations: the fp32 CPU fit scaled by BF16 (2/4), the per-layer term c by
    the ratio of one layer's saved bytes (saved-tensor count, this shape and kind vs the measured shape)
    without checkpointing and by d / 1536 with it (a saved layer input), the per-token term b by the
    larger of the two ratios (it holds hidden-state copies and one layer's transients). RMSNorm computes
    in fp32 whatever the dtype, so each backward layer adds back 2 x d x 2 bytes per token (its two fp32
    norm inputs, halved by the bf16 scaling). The log-prob
    chunk stays fp32: k x chunk x vocab x 4 bytes unscaled, plus the bf16 logits (2 bytes). Beside it: the
    vLLM engine's share (gpu_memory_utilization x GPU) and ENGINE_CONTEXT; the HF engine generates on the
    trainer's model between updates (its KV cache is counted as a separate, not concurrent, peak).
    """
    cfg = preset_settings(path)
    shape = cfg.model
    layers, d, mlp, heads, kv, vocab, tied, hub_len = HUB[shape]
    max_len = cfg.max_model_len or hub_len  # vLLM's context: the preset's cap, else the model's own
    budget = budget if budget is not None else cfg.max_tokens_per_micro_batch
    utilization = utilization if utilization is not None else cfg.gpu_memory_utilization
    longest = PROMPT_TOKENS + cfg.max_new_tokens
    tokens = max(longest, min(budget, cfg.micro_batch * longest))
    n = backward_layers(cfg, layers)
    saved = f["layer_saved"]
    rho_layer = saved[f"{layer_shape(shape)}|{cfg.trainable}"] / saved[f"{BENCH_SHAPE}|steering"]
    rho_d = d / 1536
    rho_b = max(rho_d, rho_layer)  # b: hidden-state copies (~d) and one layer's transients (~the layer)
    plain, ckpt = f["plain"], f["checkpointed"]
    norm_fp32 = 2 * d * 2  # per token per backward layer, on top of the scaled fit
    if cfg.activation_checkpointing:  # n saved layer inputs (~d each) + one layer recomputed (in b)
        per_token = BF16 * (ckpt["b"] * rho_b + ckpt["c"] * rho_d * n) + norm_fp32
        const = ckpt["a"]
    else:
        per_token = BF16 * (plain["b"] * rho_b + plain["c"] * rho_layer * n) + norm_fp32 * n
        const = plain["a"]
    const = max(const - f["logprob_k"] * SWEEP_CHUNK * SWEEP_VOCAB * 4, 0.0)  # less the sweep's own log-prob step
    activations = per_token * tokens
    logprob = f["logprob_k"] * cfg.logprob_chunk_tokens * vocab * 4 + cfg.logprob_chunk_tokens * vocab * 2
    weights = params_of(shape) * 2
    states, step_temp = trainable_bytes(cfg, shape)
    update_peak = weights + states + activations + logprob + const + TRAINER_ALLOWANCE
    step_peak = weights + states + step_temp + TRAINER_ALLOWANCE
    vllm = cfg.trainable == "steering" and cfg.engine in ("vllm", "auto")
    generate_peak = 0.0
    if vllm:
        engine = utilization * GPU_BYTES + ENGINE_CONTEXT
        kv_room = utilization * GPU_BYTES - weights - ENGINE_OVERHEAD
        kv_tokens = max(kv_room, 0) / kv_bytes_per_token(shape)
    else:  # HF generate on the trainer's model: one prompt's `generations` sequences at a time (seeded)
        engine, kv_tokens = 0.0, float("nan")
        generate_peak = weights + states + cfg.generations * longest * kv_bytes_per_token(shape) + TRAINER_ALLOWANCE
    trainer = max(update_peak, step_peak, generate_peak)
    total = trainer + engine
    # vLLM asleep during the update (sleep level 1: weights offloaded, KV cache dropped): its context and
    # CUDA-graph pool stay (not implemented in steerlens; reported only)
    asleep = trainer + (ENGINE_CONTEXT + ENGINE_OVERHEAD if vllm else 0.0)
    rollout_phase = weights + states + TRAINER_ALLOWANCE + engine  # the engine awake, no update running
    return {
        "preset": path.name,
        "model": shape,
        "trainable": cfg.trainable,
        "budget": budget,
        "tokens": tokens,
        "checkpointing": cfg.activation_checkpointing,
        "chunk": cfg.logprob_chunk_tokens,
        "engine": "vllm" if vllm else "hf",
        "utilization": utilization if vllm else None,
        "weights_gib": weights / GiB,
        "states_gib": states / GiB,
        "activations_gib": activations / GiB,
        "logprob_gib": logprob / GiB,
        "trainer_gib": trainer / GiB,
        "engine_gib": engine / GiB,
        "total_gib": total / GiB,
        "headroom": 1 - total / GPU_BYTES,
        "fits": total <= (1 - HEADROOM) * GPU_BYTES,
        "asleep_gib": asleep / GiB,
        "fits_asleep": max(asleep, rollout_phase) <= (1 - HEADROOM) * GPU_BYTES,
        "kv_tokens": kv_tokens,
        "kv_sequences": kv_tokens / longest if vllm else float("nan"),
        "max_model_len": max_len,
        "longest": longest,
        "engine_starts": (not vllm) or kv_tokens >= max_len,
    }


def max_budget(path: Path, f: dict[str, Any]) -> tuple[int, int]:
    """(the largest multiple of 1024 tokens whose row still fits, 0 if none; micro_batch x longest
    sequence, beyond which the budget changes nothing)."""
    cfg = preset_settings(path)
    cap = cfg.micro_batch * (PROMPT_TOKENS + cfg.max_new_tokens)
    best = 0
    for budget in range(1024, cap + 1, 1024):
        if not gpu_row(path, f, budget=budget)["fits"]:
            break
        best = budget
    return best, cap


def gpu_table(f: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(PRESETS.glob("*.yaml")):
        if path.name in CPU_PRESETS:
            continue
        row = gpu_row(path, f)
        row["max_budget"], row["budget_cap"] = max_budget(path, f)
        rows.append(row)
    return rows


def gpu_markdown(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| preset | model | trainable | budget tokens (largest fitting; cap = micro_batch x longest) | "
        "checkpointing | trainer peak GiB (weights / states / activations / log-prob) | engine share GiB | "
        "total GiB | headroom | fits? | engine KV room |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["engine"] == "vllm":
            kv = f"{r['kv_tokens'] / 1000:.0f}k tokens ({r['kv_sequences']:.1f} x {r['longest']})"
            engine = f"{r['engine_gib']:.1f} ({r['utilization']:.2f} x GPU + ctx)"
        else:
            kv, engine = "HF generate, between updates", "0 (hf)"
        if r["fits"]:
            verdict = "yes" if r["engine_starts"] else "memory: yes"
        elif r["fits_asleep"]:
            verdict = f"only with vLLM asleep during the update ({r['asleep_gib']:.1f} GiB then)"
        else:
            verdict = "no"
        if not r["engine_starts"]:
            verdict += f"; but vLLM refuses to start: KV room < its context {r['max_model_len']} (set max_model_len)"
        out.append(
            f"| {r['preset'].removesuffix('.yaml')} | {r['model']} | {r['trainable']} | {r['budget']} "
            f"({r['max_budget']}{' = cap' if r['max_budget'] == r['budget_cap'] else ''}) | "
            f"{'on' if r['checkpointing'] else 'off'} | {r['trainer_gib']:.1f} "
            f"({r['weights_gib']:.1f} / {r['states_gib']:.2f} / {r['activations_gib']:.1f} / "
            f"{r['logprob_gib']:.1f}) | {engine} | {r['total_gib']:.1f} | {100 * r['headroom']:.0f}% | "
            f"{verdict} | {kv} |"
        )
    return out


# ---- output ---------------------------------------------------------------------------------------------
def cpu_markdown(results: list[dict[str, Any]]) -> list[str]:
    out = [
        "| group | layers | backward layers n | checkpointing | vocab | chunk | path | tokens (prompt + completion) "
        "| resident MiB | update peak MiB | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = (
            f"| {r['group']} | {r['layers']} | {r['layers'] - 1} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['vocab']} | {r['chunk'] if r['path'] == 'chunked' else '-'} | {r['path']} | "
            f"{r['prompt']} + {r['completion']} |"
        )
        if "skipped" in r:
            out.append(head + f" - | skipped: {r['skipped']} | - |")
        else:
            out.append(head + f" {r['resident_mib']:.0f} | {r['peak_mib']:.0f} | {r['seconds']:.1f} |")
    return out


def residual_markdown(f: dict[str, Any]) -> list[str]:
    out = [
        "| fit | layers | tokens | vocab / chunk | measured MiB | fitted MiB | residual MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in f["residuals"]:
        vc = f"{r['vocab']} / {r['chunk']}" if "vocab" in r else "32768 / 512"
        out.append(
            f"| {r['fit']} | {r['layers']} | {r['tokens']} | {vc} | {r['peak_mib']:.0f} | "
            f"{r['fitted_mib']:.0f} | {r['residual_mib']:+.0f} |"
        )
    return out


def layer_shape(model: str) -> str:
    """The first HUB name whose decoder layers have `model`'s shape (vocabulary and context aside)."""
    return next(name for name, shape in HUB.items() if shape[:5] == HUB[model][:5])


def saved_pairs() -> list[tuple[str, str]]:
    pairs = {(BENCH_SHAPE, "steering")}
    for path in PRESETS.glob("*.yaml"):
        if path.name not in CPU_PRESETS:
            cfg = preset_settings(path)
            pairs.add((layer_shape(cfg.model), cfg.trainable))
    return sorted(pairs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: two short updates, GPU table from RECORDED_FIT")
    p.add_argument("--predict-only", action="store_true", help="only the GPU table, from RECORDED_FIT")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write measurements, fit and GPU table here")
    p.add_argument("--from-json", type=Path, help="refit and predict from the measurements of an earlier --json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    if args.predict_only:
        f = dict(RECORDED_FIT)
    elif args.from_json:
        earlier = json.loads(args.from_json.read_text())
        results = earlier["measurements"]
        f = fit(results)
        f["logprob_k"] = f["logprob"]["k"]
        f["layer_saved"] = earlier["fit"]["layer_saved"]
    else:
        results = measure(plan(args.quick), args.threads)
        if args.quick:
            f = dict(RECORDED_FIT)
            line = [[1.0, r["prompt"] + r["completion"]] for r in results]
            a, b = lstsq(line, [r["peak_mib"] * MiB for r in results])
            print(
                f"quick: peak = {a / MiB:.0f} MiB + {b / 1024:.1f} KiB x T (L=1, n=0; "
                "GPU table below from RECORDED_FIT)"
            )
        else:
            f = fit(results)
            f["logprob_k"] = f["logprob"]["k"]
            saved = run_child({"task": "saved", "threads": args.threads, "pairs": saved_pairs()})
            f["layer_saved"] = saved["bytes_per_token"]
    rows = gpu_table(f) if f["logprob_k"] else []
    wall = time.perf_counter() - start
    lines: list[str] = []
    if results:
        lines += ["CPU measurements (fp32, one sequence, Qwen2.5-1.5B layer shape):", *cpu_markdown(results), ""]
    if "residuals" in f:
        lines += ["Fit:", *fit_summary(f), "", *residual_markdown(f), ""]
    if f.get("layer_saved"):
        lines += ["Saved bytes per token of one backward layer (fp32, saved-tensor count):"]
        lines += [f"  {key}: {value / 1024:.1f} KiB" for key, value in sorted(f["layer_saved"].items())] + [""]
    if rows:
        lines += [
            f"GPU prediction (one {GPU_BYTES / GiB:.1f} GiB GPU per rank, bf16; fits: total <= "
            f"{1 - HEADROOM:.0%} of it):",
            *gpu_markdown(rows),
            "",
        ]
    lines.append(f"wall time {wall:.0f} s")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps({"measurements": results, "fit": f, "gpu": rows, "wall_s": wall}, indent=1, default=str)
        )


if __name__ == "__main__":
    main()
