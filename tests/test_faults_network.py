"""Fault injection for the network: endpoints that echo the key back, hang, or trickle, all real local servers.

The chat client (`analysis.llm_client`, the real openai client underneath) talks to stdlib HTTP servers and raw
sockets in threads. A key the request carried never reaches a message, log line, table or cache file; every
request ends within its deadline however the server dribbles; the failure is one line that names
`--llm-timeout`. The command-line cases load the tiny model (a few seconds).
"""

from __future__ import annotations

import base64
import doctest
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from steerlens.analysis.clustering import ClusteringConfig, ClusteringError, llm_clusters
from steerlens.analysis.llm_client import ChatConfig
from steerlens.cli import app, show_messages
from steerlens.redact import redact, remember

KEY = "sk-net-secret-0123456789abcdef"
TOKENS = {1: ["Haus", "Katze"], 2: ["+", "-"]}
MODELS = {"object": "list", "data": [{"id": "served", "object": "model", "created": 0, "owned_by": "test"}]}


@pytest.fixture(autouse=True, scope="module")
def openai_imported() -> None:
    """Import the openai package before any timing starts (a second or more on a busy machine)."""
    import openai  # noqa: F401


def reply(content: str) -> dict[str, Any]:
    """A chat completion whose message is `content`."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "served",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
    }


class Endpoint:
    """A stdlib HTTP server in a thread: GET lists one model, POST is answered by `answer(handler, headers)`
    (status, content type, body bytes), or never when it returns None (the handler waits until closing)."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler, str], tuple[int, str, bytes] | None]) -> None:
        self.closing = threading.Event()
        self.posts = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self.send(200, "application/json", json.dumps(MODELS).encode())

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.posts += 1
                headers = "; ".join(f"{name}: {value}" for name, value in self.headers.items())
                answer = answer_fn(self, headers)
                if answer is None:
                    endpoint.closing.wait(60)
                    return
                self.send(*answer)

        answer_fn = answer
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Endpoint]]:
    """Start `Endpoint`s (closed after the test), with $OPENAI_API_KEY set to the key to keep secret."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    started: list[Endpoint] = []

    def start(answer: Callable[[BaseHTTPRequestHandler, str], tuple[int, str, bytes] | None]) -> Endpoint:
        started.append(Endpoint(answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


def echo_error(status: int, padding: int = 0) -> Callable[[BaseHTTPRequestHandler, str], tuple[int, str, bytes]]:
    """An API error whose message is `padding` dots, the key, then the request's headers."""
    return lambda _, headers: (
        status,
        "application/json",
        json.dumps({"error": {"message": "." * padding + f"{KEY}; you sent {headers}", "code": status}}).encode(),
    )


def echo_text(padding: int) -> Callable[[BaseHTTPRequestHandler, str], tuple[int, str, bytes]]:
    """A body that is not JSON, the key starting at character `padding` (after which steerlens shortens it)."""
    return lambda _, headers: (200, "text/plain", ("." * padding + KEY + " " + headers).encode())


def no_key(text: str) -> bool:
    """Neither the key nor any 10 characters of it are in `text`."""
    return not any(KEY[i : i + 10] in text for i in range(len(KEY) - 9))


def chat(url: str, tmp_path: Path, **kwargs: Any) -> ClusteringConfig:
    return ClusteringConfig(base_url=url, cache_dir=tmp_path / "cache", backoff_s=0.01, **kwargs)


# ---- secrets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer, needle",
    [
        (echo_error(400), "answered HTTP 400 while clustering tokens: Error code: 400 - \\*\\*\\*; you sent"),
        (echo_error(422, padding=270), "answered HTTP 422"),  # the key across the 300-character cut
        (echo_text(padding=50), "body that is not JSON"),  # the key across the 60-character cut
    ],
    ids=["error", "error-cut", "not-json-cut"],
)
def test_a_key_echoed_in_an_error_is_redacted_before_it_is_shortened(
    endpoint: Callable[..., Endpoint], tmp_path: Path, answer: Any, needle: str
) -> None:
    server = endpoint(answer)
    with pytest.raises(ClusteringError, match=needle) as err:
        llm_clusters(TOKENS, chat(server.url, tmp_path, concurrency=1))
    message = str(err.value)
    assert no_key(message) and "***" in message and "\n" not in message, message  # it came back, redacted


def test_a_key_echoed_in_the_answer_stays_out_of_tables_and_cache(
    endpoint: Callable[..., Endpoint], tmp_path: Path
) -> None:
    """A server that puts the Authorization header into its reply: topics, translations and cache redacted."""

    def answer(_: BaseHTTPRequestHandler, headers: str) -> tuple[int, str, bytes]:
        auth = next(part for part in headers.split("; ") if part.lower().startswith("authorization"))
        content = {
            "tokens": [{"token": t, "language": "German", "translation": f"{KEY} {auth}"} for t in ("Haus", "Katze")],
            "topics": [{"topic": f"Headers {auth}", "tokens": ["Haus", "Katze"]}, {"topic": KEY, "tokens": ["+", "-"]}],
        }
        return 200, "application/json", json.dumps(reply(json.dumps(content))).encode()

    server = endpoint(answer)
    table = llm_clusters(TOKENS, chat(server.url, tmp_path, concurrency=2))
    written = table.to_csv() + "".join(p.read_text() for p in (tmp_path / "cache").glob("*.json"))
    assert no_key(written) and "Headers authorization: Bearer ***" in set(table["topic"]), written
    assert set(table["status"]) == {"ok"} and server.posts == 2


def test_log_records_and_unexpected_tracebacks_are_redacted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's log handler redacts every record (message, arguments, exception); `friendly` redacts a traceback."""
    from steerlens.cli_common import friendly

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    show_messages()
    logger = logging.getLogger("steerlens.test_network")
    try:
        logger.warning("retrying with key %s", KEY)
        try:
            raise ValueError(f"server said: Authorization: Basic {base64.b64encode(b'me:pw-12345').decode()}")
        except ValueError:
            logger.exception("the call failed (Bearer %s)", "tok-abcdef")
    finally:
        logging.getLogger("steerlens").handlers = []
    logged = capsys.readouterr().err
    assert no_key(logged) and "retrying with key ***" in logged and "Bearer ***" in logged, logged
    assert "Authorization: Basic ***" in logged and "ValueError" in logged, logged

    @friendly
    def broken() -> None:
        raise RuntimeError(f"unexpected, with {KEY}")

    with pytest.raises(Exception) as exited:  # typer.Exit(1) after a redacted traceback
        broken()
    assert getattr(exited.value, "exit_code", None) == 1
    shown = capsys.readouterr().err
    assert "RuntimeError: unexpected, with ***" in shown and no_key(shown), shown

    @friendly
    def plain_bug() -> None:
        raise RuntimeError("no secret here")

    with pytest.raises(RuntimeError, match="no secret here"):  # other bugs keep their traceback
        plain_bug()


def test_a_password_in_the_endpoint_url_is_redacted(endpoint: Callable[..., Endpoint], tmp_path: Path) -> None:
    """The URL's `user:password@` (sent as Basic auth, which the server echoes) never shows."""
    server = endpoint(echo_error(400))
    url = server.url.replace("http://", "http://me:pw-secret-9876@")
    with pytest.raises(ClusteringError, match=r"^http://me:\*\*\*@127\.0\.0\.1:\d+/v1 answered HTTP 400") as err:
        llm_clusters(TOKENS, chat(url, tmp_path, concurrency=1))
    assert "pw-secret" not in str(err.value) and "authorization: basic ***" in str(err.value).lower(), str(err.value)


def test_the_docstring_examples_run() -> None:
    import steerlens.redact

    assert doctest.testmod(steerlens.redact).failed == 0


def test_short_keys_only_where_they_stand_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import steerlens.redact

    monkeypatch.setattr(steerlens.redact, "_known", set())  # keys earlier tests' clients remembered ("local", ...)
    for name in steerlens.redact.KEY_ENV:
        monkeypatch.delenv(name, raising=False)
    remember("pw42x")
    assert redact("key pw42x, local pw42xyz") == "key ***, local pw42xyz"
    assert redact("Basic arithmetic and Bearer abc.DEF-123") == "Basic arithmetic and Bearer ***"


# ---- hung and trickling endpoints -----------------------------------------------------------------
class Trickle:
    """A raw TCP server that reads each request, then sends a valid response one byte every `interval` seconds,
    from its first byte ("headers") or after the headers ("body"). Sending it all would take ~60 s."""

    def __init__(self, part: str, interval: float = 0.1) -> None:
        self.closing = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.part, self.interval = part, interval
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            body = json.dumps(MODELS if data.startswith(b"GET") else reply("{}")).encode() + b" " * 500
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            out = head.encode() + body
            if self.part == "body":
                conn.sendall(head.encode())
                out = body
            for i in range(len(out)):
                if self.closing.wait(self.interval):
                    return
                try:
                    conn.sendall(out[i : i + 1])
                except OSError:
                    return

    def close(self) -> None:
        self.closing.set()
        self.sock.close()


@pytest.mark.parametrize("part", ["headers", "body"])
@pytest.mark.parametrize("model, what", [(None, "listing models"), ("m", "clustering tokens")])
def test_a_trickling_server_cannot_outlast_the_deadline(
    tmp_path: Path, part: str, model: str | None, what: str
) -> None:
    trickle = Trickle(part)
    try:
        start = time.monotonic()
        with pytest.raises(ClusteringError) as err:
            llm_clusters(TOKENS, chat(trickle.url, tmp_path, model=model, deadline_s=1.5, api_key=KEY))
        elapsed = time.monotonic() - start
    finally:
        trickle.close()
    message = str(err.value)
    assert elapsed < 1.5 + 2.0, (elapsed, message)  # ~60 s if the trickle were let through
    assert f"still failing (APITimeoutError) while {what}" in message and "within 1.5 s: --llm-timeout" in message
    assert "for a slow server, set --llm-timeout (deadline_s) to more seconds" in message and "\n" not in message


def test_the_deadline_bounds_every_try_whatever_timeout_s_and_retries_allow(tmp_path: Path) -> None:
    """Per-try timeouts shorter than the deadline are retried, but the deadline ends the call all the same."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody ever answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        start = time.monotonic()
        with pytest.raises(ClusteringError, match=r"still failing \(APITimeoutError\) .* after [1-9] retr"):
            llm_clusters(TOKENS, chat(url, tmp_path, model="m", deadline_s=2.0, timeout_s=0.5, api_key=KEY))
        assert time.monotonic() - start < 2.0 + 2.0


def test_one_failed_layer_stops_the_others_in_flight(endpoint: Callable[..., Endpoint], tmp_path: Path) -> None:
    """Layer 1's request is refused at once, layer 2's hangs: the error comes now, not at layer 2's deadline."""

    def answer(handler: BaseHTTPRequestHandler, _: str) -> tuple[int, str, bytes] | None:
        return (400, "application/json", b'{"error": {"message": "no"}}') if server.posts == 2 else None

    server = endpoint(answer)
    start = time.monotonic()
    with pytest.raises(ClusteringError, match="answered HTTP 400"):
        llm_clusters(TOKENS, chat(server.url, tmp_path, model="m", deadline_s=30, concurrency=2))
    assert time.monotonic() - start < 3 and server.posts == 2


def test_the_defaults_fail_a_hung_endpoint_within_two_minutes() -> None:
    """One request, all tries included, is bounded by `deadline_s`; the first failure ends the clustering."""
    from steerlens.cli import analyze

    config = ChatConfig()
    assert config.deadline_s <= 120 and config.timeout_s is None
    option = next(p for p in analyze.__wrapped__.__defaults__ if getattr(p, "param_decls", None) == ("--llm-timeout",))
    assert option.default == config.deadline_s


# ---- through the command line ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vectors_file(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from steerlens.anatomy import model_shape
    from steerlens.models import load_model
    from steerlens.vectors import SteeringVectors

    model, _ = load_model(tiny_qwen_dir)
    vectors = SteeringVectors.zeros(model_shape(model), layers=[1])
    vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(0))
    return vectors.save(tmp_path_factory.mktemp("vectors") / "v.safetensors")


def analyze_args(tiny_qwen_dir: Path, vectors_file: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [
        "analyze",
        str(vectors_file),
        "--model",
        str(tiny_qwen_dir),
        "--out",
        str(out),
        "--analyses",
        "clustering",
        "--top-k",
        "3",
        "--endpoint",
        url,
        *extra,
    ]


def test_analyze_never_prints_the_key_an_endpoint_echoes(
    endpoint: Callable[..., Endpoint], tiny_qwen_dir: Path, vectors_file: Path, tmp_path: Path
) -> None:
    """Two HTTP 500s echoing the headers (retried, logged), then an HTTP 400 echoing them: one redacted line."""

    def answer(handler: BaseHTTPRequestHandler, headers: str) -> tuple[int, str, bytes]:
        return echo_error(500 if server.posts <= 2 else 400)(handler, headers)

    server = endpoint(answer)
    result = CliRunner().invoke(app, analyze_args(tiny_qwen_dir, vectors_file, tmp_path / "o", server.url))
    output = result.output
    assert result.exit_code == 2 and no_key(output), output
    assert output.count("retry") == 2 and output.count("error:") == 1 and "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "answered HTTP 400" in last and "authorization: Bearer ***" in last, last


def test_analyze_on_a_trickling_endpoint_is_one_line_naming_the_option(
    tiny_qwen_dir: Path, vectors_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    trickle = Trickle("body")
    try:
        start = time.monotonic()
        args = analyze_args(tiny_qwen_dir, vectors_file, tmp_path / "o", trickle.url, "--llm-timeout", "2")
        result = CliRunner().invoke(app, args)
        elapsed = time.monotonic() - start
    finally:
        trickle.close()
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and elapsed < 30 and result.output.count("error:") == 1, (elapsed, result.output)
    assert last.startswith("error: ") and "within 2 s: --llm-timeout" in last and "for a slow server" in last, last
