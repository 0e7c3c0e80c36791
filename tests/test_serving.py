"""The clustering analysis against a real local OpenAI-compatible endpoint: vLLM's server for SmolLM2-135M.

Starts `vllm serve` (via steerlens.serving.LocalServer) once for the module; the requests are real HTTP to
a real engine. A 135M model's answers are weak, so the assertions are about the plumbing: the request
reaches the served model, its answer is parsed into topics or recorded as a failure with the reason,
good answers are cached, and nothing needs a key.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from steerlens import smollm
from steerlens.analysis.clustering import COLUMNS, ClusteringConfig, cluster_tokens
from steerlens.rollout import vllm_available
from steerlens.serving import LocalServer, ServerError

pytestmark = [
    pytest.mark.smollm,
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not smollm.available(), reason=f"needs the SmolLM2 weights: {smollm.INSTALL}"),
    pytest.mark.skipif(not vllm_available(), reason="needs vLLM"),
]

NAME = "smollm2-135m"

TOKENS = pd.DataFrame(
    {"layer": [0] * 6, "rank": range(6), "token": [" Paris", " London", " Berlin", " dog", " cat", " horse"]}
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    monkeypatch_module.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch_module.delenv("OPENAI_BASE_URL", raising=False)
    with LocalServer(NAME, log_path=tmp_path_factory.mktemp("serve") / "server.log", max_model_len=2048) as running:
        yield running


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def requests_served(server: LocalServer) -> float:
    """Finished requests, from the server's own Prometheus counter."""
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total{"))


def test_server_lists_the_model_under_its_short_name(server: LocalServer) -> None:
    assert server.served_models() == [NAME]


def test_clustering_end_to_end_through_the_served_model(server: LocalServer, tmp_path: Path) -> None:
    config = ClusteringConfig(base_url=server.url, cache_dir=tmp_path, max_tokens=160, concurrency=1)
    before = requests_served(server)
    table = cluster_tokens(TOKENS, config, method="auto")
    asked = requests_served(server) - before
    assert list(table.columns) == COLUMNS and set(table["model"]) == {NAME} and set(table["method"]) == {"llm"}
    assert asked in (1, 2)  # one request, plus one reminder if the first answer was unusable
    if set(table["status"]) == {"ok"}:  # a usable answer: every token placed once, and cached
        placed = [token for tokens in table["tokens"] for token in tokens]
        assert sorted(placed) == sorted(TOKENS["token"]) and asked >= 1
        assert len(list(tmp_path.glob("*.json"))) == 1
        again = cluster_tokens(TOKENS, config)
        assert requests_served(server) - before == asked and again.equals(table)
    else:  # the small model's answer stayed malformed: one failure row saying why, nothing cached
        (row,) = table.itertuples()
        assert row.status == "failed" and row.error and asked == 2 and not list(tmp_path.glob("*.json"))


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ServerError, match=f"^vllm serve {broken} did not start: ") as caught:
        LocalServer(str(broken), log_path=tmp_path / "log", start_timeout_s=300)
    message = str(caught.value)
    assert "no-such-architecture" in message and "\n" not in message  # the cause, from the server's log
    assert message.endswith(f"(log: {tmp_path / 'log'})")
