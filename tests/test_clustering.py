"""Token clustering against a real local HTTP server speaking the OpenAI chat-completions API, plus offline."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from steerlens.analysis.clustering import (
    FAILED,
    UNCLASSIFIED,
    ClusteringConfig,
    ClusteringError,
    cluster_tokens,
    llm_clusters,
    parse_answer,
)
from steerlens.config import ConfigError

KEY = "sk-test-secret-123"
TOKENS = {3: [" the", "Haus", "Katze", "+", "-"]}
GOOD = {
    "tokens": [
        {"token": " the", "language": "English", "translation": ""},
        {"token": "Haus", "language": "German", "translation": "house"},
        {"token": "Katze", "language": "German", "translation": "cat"},
        {"token": "+", "language": "symbol", "translation": ""},
        {"token": "-", "language": "symbol", "translation": ""},
    ],
    "topics": [
        {"topic": "Household and animals", "tokens": ["Haus", "Katze"]},
        {"topic": "Arithmetic operators", "tokens": ["+", "-"]},
    ],
    "unclassified": [" the"],
}


class ChatServer:
    """A stdlib HTTP server answering /v1/chat/completions from a script of (status, content) and counting.

    Text content is the chat reply; bytes content is sent as the whole body (status 200, text/html).
    """

    def __init__(self) -> None:
        self.script: deque[tuple[int, str | bytes]] = deque()
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
                self._send(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": "served-model", "object": "model", "created": 0, "owned_by": "test"}],
                    },
                )

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                status, content = server.script.popleft() if server.script else (500, "script exhausted")
                if isinstance(content, bytes):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                    return
                if status != 200:
                    self._send(status, {"error": {"message": content, "type": "scripted", "code": status}})
                    return
                self._send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                        ],
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def chats(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatServer]:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    chat = ChatServer()
    chat.thread.start()
    yield chat
    chat.httpd.shutdown()
    chat.httpd.server_close()


def config(server: ChatServer, tmp_path: Path, **kwargs: Any) -> ClusteringConfig:
    return ClusteringConfig(base_url=server.url, cache_dir=tmp_path / "cache", backoff_s=0.01, concurrency=1, **kwargs)


def test_good_answer_is_parsed_into_topics(server: ChatServer, tmp_path: Path) -> None:
    server.script.append((200, "```json\n" + json.dumps(GOOD) + "\n```"))
    table = llm_clusters(TOKENS, config(server, tmp_path))  # no model named: the server's only one is used
    assert table["topic"].tolist() == ["Household and animals", "Arithmetic operators", UNCLASSIFIED]
    animals = table.iloc[0]
    assert animals["tokens"] == ["Haus", "Katze"] and animals["translation"] == ["house", "cat"]
    assert animals["language"] == ["German", "German"]
    assert set(table["layer"]) == {3} and set(table["status"]) == {"ok"} and set(table["method"]) == {"llm"}
    assert set(table["model"]) == {"served-model"}
    (chat,) = server.chats()
    assert chat["model"] == "served-model" and chat["temperature"] == 0
    assert chat["auth"] == f"Bearer {KEY}" and "Katze" in chat["messages"][-1]["content"]
    written = "".join(p.read_text() for p in (tmp_path / "cache").iterdir())
    assert KEY not in written and KEY not in repr(config(server, tmp_path, api_key=KEY))


def test_cache_hit_makes_no_request(server: ChatServer, tmp_path: Path) -> None:
    server.script.append((200, json.dumps(GOOD)))
    first = llm_clusters(TOKENS, config(server, tmp_path, model="m"))
    again = llm_clusters(TOKENS, config(server, tmp_path, model="m"))
    assert len(server.requests) == 1
    pd.testing.assert_frame_equal(first, again)
    server.script.append((200, json.dumps(GOOD)))
    llm_clusters(TOKENS, config(server, tmp_path, model="another-model"))  # the model is part of the key
    assert len(server.requests) == 2


def test_malformed_answer_gets_one_reminder_then_a_failure_row(server: ChatServer, tmp_path: Path) -> None:
    server.script.extend([(200, "Sure! Here are the clusters: Haus, Katze"), (200, json.dumps(GOOD))])
    table = llm_clusters(TOKENS, config(server, tmp_path, model="m"))
    assert set(table["status"]) == {"ok"} and len(server.chats()) == 2
    assert "could not be used" in server.chats()[1]["messages"][-1]["content"]

    server.script.extend([(200, "no json"), (200, '{"topics": "Haus"}')])
    failed = llm_clusters({5: ["a", "b"]}, config(server, tmp_path, model="m"))
    assert len(server.chats()) == 4 and len(failed) == 1
    row = failed.iloc[0]
    assert row["topic"] == FAILED and row["status"] == "failed" and row["tokens"] == ["a", "b"]
    assert '"topics" must be a list' in row["error"]
    server.script.append((200, json.dumps({"topics": [{"topic": "Letters", "tokens": ["a", "b"]}]})))
    assert llm_clusters({5: ["a", "b"]}, config(server, tmp_path, model="m"))["status"].tolist() == ["ok"]


def test_rate_limit_and_server_errors_are_retried(server: ChatServer, tmp_path: Path) -> None:
    server.script.extend([(429, "slow down"), (503, "overloaded"), (200, json.dumps(GOOD))])
    table = llm_clusters(TOKENS, config(server, tmp_path, model="m"))
    assert set(table["status"]) == {"ok"} and len(server.chats()) == 3

    server.script.extend([(429, "slow down")] * 3)
    with pytest.raises(ClusteringError, match=r"HTTP 429.*after 2 retries"):
        llm_clusters({1: ["x", "y"]}, config(server, tmp_path, model="m", max_retries=2))
    assert len(server.chats()) == 6


def test_unauthorised_gives_a_clear_error_naming_the_variable(server: ChatServer, tmp_path: Path) -> None:
    server.script.append((401, f"Incorrect API key provided: {KEY}"))
    with pytest.raises(ClusteringError, match="HTTP 401.*set the environment variable OPENAI_API_KEY") as err:
        llm_clusters(TOKENS, config(server, tmp_path, model="m"))
    assert KEY not in str(err.value) and len(server.requests) == 1


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"<html><p>It works!</p></html>", "with a body that is not JSON"),
        (b'{"object": "error"}', "answered JSON without choices"),
    ],
)
def test_an_answer_that_is_not_the_api_json_is_one_line(
    server: ChatServer, tmp_path: Path, body: bytes, needle: str
) -> None:
    server.script.append((200, body))
    with pytest.raises(ClusteringError, match=needle) as err:
        llm_clusters(TOKENS, config(server, tmp_path, model="m"))
    assert server.url in str(err.value) and "\n" not in str(err.value) and len(server.chats()) == 1


@pytest.mark.parametrize("model, what", [(None, "listing models"), ("m", "clustering tokens")])
def test_an_endpoint_that_never_answers_fails_within_the_deadline(tmp_path: Path, model: str | None, what: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody ever answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        start = time.monotonic()
        with pytest.raises(ClusteringError, match=rf"still failing \(APITimeoutError\) while {what}.*within 1.5 s"):
            llm_clusters(
                TOKENS,
                ClusteringConfig(
                    base_url=url, model=model, cache_dir=tmp_path, deadline_s=1.5, api_key="local", backoff_s=0.01
                ),
            )
        assert time.monotonic() - start < 1.5 + 1.0


def test_time_limits_must_be_positive_numbers() -> None:
    with pytest.raises(
        ConfigError,
        match=r"ClusteringConfig: deadline_s \(--llm-timeout\) must be a number of "
        r"seconds > 0, got nan",
    ):
        ClusteringConfig(deadline_s=float("nan"))
    with pytest.raises(ConfigError, match="timeout_s must be .* got 0"):
        ClusteringConfig(timeout_s=0)


def test_parse_answer_is_lenient_but_keeps_the_rules() -> None:
    text = "<think>hmm</think>Here you go:\n" + json.dumps(
        {
            "topics": [
                {"topic": "Animals", "tokens": ["Katze ", "Hund", "invented"]},
                {"topic": "Alone", "tokens": ["Haus"]},
            ]
        }
    )
    answer = parse_answer(text, ["Katze", "Hund", "Haus", " the"])
    assert answer["topics"] == [
        {"topic": "Animals", "tokens": ["Katze", "Hund"]},
        {"topic": UNCLASSIFIED, "tokens": ["Haus", " the"]},
    ]
    assert parse_answer(json.dumps(answer), ["Katze", "Hund", "Haus", " the"]) == answer


def test_offline_clustering_groups_tokens_by_unembedding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 32, generator=gen)
    unembed = torch.cat(
        [
            base[0] + 0.05 * torch.randn(3, 32, generator=gen),
            base[1] + 0.05 * torch.randn(3, 32, generator=gen),
            base[2:],
        ]
    )
    tokens = pd.DataFrame({"layer": 0, "rank": range(1, 8), "token_id": range(7), "token": list("abcdefg")})
    table = cluster_tokens(tokens, unembed=unembed, n_clusters=3)  # no endpoint configured: offline
    assert table.columns.tolist() == [
        "layer",
        "topic",
        "tokens",
        "translation",
        "language",
        "method",
        "model",
        "status",
        "error",
    ]
    assert sorted(map(sorted, table["tokens"])) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert table["topic"].iloc[-1] == UNCLASSIFIED and set(table["method"]) == {"offline"}
    with pytest.raises(ClusteringError, match="needs the unembedding"):
        cluster_tokens(tokens)
