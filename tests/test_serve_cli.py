"""`steerlens serve` as a user runs it: a real process, its server a child, a request through the real `openai`
client, stopped by SIGINT; and the same plumbing in seconds around a stand-in server (a few lines of `http.server`).
(A real server that cannot start: tests/test_faults_engine.py; what a steered server answers:
tests/test_serve_vectors.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from steerlens import serving
from steerlens.cli import app
from steerlens.rollout import vllm_available
from steerlens.serving import LOOPBACK, free_port
from steerlens.vectors import SteeringVectors

NOTICES = ("Triton is installed",)  # vLLM's import notice on this machine, whatever steerlens does


# A stand-in for vLLM's server: lists one model, logs each request, stops on SIGINT with exit code 0.
STAND_IN = """
import http.server, json, signal, sys, threading
class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": "stand-in"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        print("GET", self.path, flush=True)
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Models)
signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
print("stand-in stopped", flush=True)
"""
# One that cannot start: the worker's exception, then vLLM's wrapper of the failed process.
REFUSING = """
import sys
print("(EngineCore pid=1) ERROR [core.py:9] ValueError: no 'lm_head' in StandIn. Its parameters: a, b", flush=True)
raise RuntimeError("Engine core initialization failed. See root cause above.")
"""


def stand_in(monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    def command(model: str, port: int, **_: object) -> list[str]:
        return [sys.executable, "-c", script, str(port)]

    monkeypatch.setattr(serving, "server_command", command)
    monkeypatch.setattr(serving, "server_environment", lambda steering: dict(os.environ))


def test_serve_passes_sigint_on_and_exits_with_the_servers_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stand_in(monkeypatch, STAND_IN)
    port, log = free_port(), tmp_path / "serve.log"

    def interrupt_when_listed() -> None:  # what Ctrl-C does, once the server answers
        while "GET /v1/models" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_listed, daemon=True).start()
    before = signal.getsignal(signal.SIGINT)
    result = CliRunner().invoke(app, ["serve", "--model", "m", "--port", str(port), "--log", str(log)])
    assert result.exit_code == 0, result.output
    url = f"http://{LOOPBACK}:{port}/v1"
    banner = f"serving m at {url} (export OPENAI_BASE_URL={url}); Ctrl-C stops it; server log: {log}"
    assert banner in result.output and "stand-in stopped" in log.read_text()
    assert signal.getsignal(signal.SIGINT) is before


def test_serve_that_cannot_start_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stand_in(monkeypatch, REFUSING)
    log = tmp_path / "serve.log"
    result = CliRunner().invoke(app, ["serve", "--model", "m", "--port", str(free_port()), "--log", str(log)])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: vllm serve m did not start: no 'lm_head' in StandIn (log: {log})"
    ], result.output
    assert "Traceback" in log.read_text()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="needs vLLM")
def test_serve_answers_and_stops_on_sigint(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    vectors = SteeringVectors(torch.ones(4, 128), (0, 1, 2, 3), 4).save(tmp_path / "ones.safetensors")
    port, log = free_port(), tmp_path / "serve.log"
    model = str(tiny_qwen_dir)
    args = ["serve", "--model", model, "--port", str(port), "--max-model-len", "256", "--vectors", f"ones={vectors}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "steerlens.cli", *args, "--log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    errors: list[str] = []
    ready = threading.Event()

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            errors.append(line)
            if line.startswith("serving "):
                ready.set()
        ready.set()  # the process is gone

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert ready.wait(300) and process.poll() is None, "".join(errors)[-3000:]
        url = f"http://{LOOPBACK}:{port}/v1"
        assert next(line for line in errors if line.startswith("serving ")).strip() == (
            f"serving {model}, ones at {url} (export OPENAI_BASE_URL={url}); Ctrl-C stops it; server log: {log}"
        )
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        for name in (model, "ones"):
            reply = client.completions.create(model=name, prompt="Hi", max_tokens=2, temperature=0)
            assert reply.usage.completion_tokens >= 1 and isinstance(reply.choices[0].text, str)
        process.send_signal(signal.SIGINT)  # to steerlens only: it passes the signal on to the server
        assert process.wait(timeout=120) == 0, "".join(errors)[-3000:]
    finally:
        if process.poll() is None:  # a failed check: SIGTERM, which steerlens passes on, then SIGKILL
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    reader.join(timeout=10)
    stdout = process.stdout.read() if process.stdout else ""
    assert not [line for line in stdout.splitlines() if not line.startswith(NOTICES)], stdout
    assert "Traceback" not in "".join(errors) + stdout
    assert "POST /v1/completions" in log.read_text()  # the server's own output, in the log
    with socket.socket() as probe:
        assert probe.connect_ex((LOOPBACK, port)) != 0  # the server stopped with steerlens
