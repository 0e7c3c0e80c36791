"""Serving steered models: `steerlens serve --vectors name=FILE` on SmolLM2-135M, queried with the real `openai`
client over real HTTP. Each vector set is its own model name; greedy completions equal in-process generation
token for token (base, each set, a scale in the request body, a set loaded at run time, and 32 concurrent
requests across 4 sets); unknown sets and missing keys get clear errors; runtime loading is off unless asked.

The in-process reference runs first and its engine is closed before the server starts (2 cores)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from steerlens import smollm
from steerlens.rollout import vllm_available

pytestmark = [
    pytest.mark.smollm,
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not smollm.available(), reason=f"needs the SmolLM2 weights: {smollm.INSTALL}"),
    pytest.mark.skipif(not vllm_available(), reason="needs vLLM"),
]

openai = pytest.importorskip("openai")

MODEL = "smollm2-135m"
KEY = "test-key"
TRAINED = (
    Path(__file__).resolve().parents[1] / "steerlens" / "assets" / "smollm2-135m-word-arith" / "vectors.safetensors"
)
PROMPTS = [
    "Question: Tom has 12 apples and gives 5 to Ann. How many apples does Tom have left?\nAnswer:",
    "The capital of France is",
]
MAX_TOKENS = 16


def random_like(trained: Any, seed: int) -> Any:
    """Random vectors with each layer's norm equal to the trained vectors' (so they steer as strongly)."""
    from steerlens.vectors import SteeringVectors

    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(trained.values.shape, generator=generator)
    values = values / values.norm(dim=-1, keepdim=True) * trained.values.norm(dim=-1, keepdim=True) * 2
    return SteeringVectors(values, trained.layers, trained.num_layers)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from steerlens.vectors import SteeringVectors

    folder = tmp_path_factory.mktemp("vectors")
    trained = SteeringVectors.load(TRAINED)
    return {
        "trained": TRAINED,
        **{
            name: random_like(trained, seed).save(folder / f"{name}.safetensors")
            for name, seed in (("r1", 1), ("r2", 2), ("r3", 3), ("late", 4))
        },
    }


@pytest.fixture(scope="module")
def expected(files: dict[str, Path]) -> dict[tuple[str, str], list[int]]:
    """Greedy token ids per (set, prompt) from an in-process engine: base, each set, 'trained' at 0.5."""
    from vllm import SamplingParams

    from steerlens.backends.vllm import SteeredLLM
    from steerlens.vectors import SteeringVectors

    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    out = {}
    with SteeredLLM(MODEL, max_model_len=2048) as engine:
        for name, path in files.items():
            engine.add(name, SteeringVectors.load(path))
        engine.add("trained-half", SteeringVectors.load(files["trained"]), scale=0.5)
        names = ["base", *files, "trained-half"]
        requests = [(name, prompt) for name in names for prompt in PROMPTS]
        outputs = engine.generate([prompt for _, prompt in requests], greedy, vectors=[name for name, _ in requests])
        for request, output in zip(requests, outputs):
            out[request] = list(output.outputs[0].token_ids)
    assert len({tuple(out[(name, PROMPTS[0])]) for name in names}) >= 5, "the sets should steer differently"
    return out


@pytest.fixture(scope="module")
def server(files: dict[str, Path], expected: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from steerlens.serving import LocalServer, steering_settings

    served = {name: path for name, path in files.items() if name != "late"}
    settings = steering_settings(MODEL, served, api_key=KEY, allow_loading=True)
    with LocalServer(
        MODEL, log_path=tmp_path_factory.mktemp("serve") / "server.log", max_model_len=2048, steering=settings
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


def completion_ids(client: Any, model: str, prompt: str, **extra: Any) -> list[int]:
    response = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"return_token_ids": True, **extra},
    )
    return list(response.choices[0].token_ids)


def test_each_set_is_a_model_name_beside_the_base(client: Any) -> None:
    assert [model.id for model in client.models.list()] == [MODEL, "trained", "r1", "r2", "r3"]


def test_greedy_completions_equal_in_process_generation(client: Any, expected: dict) -> None:
    for name in [MODEL, "trained", "r1", "r2", "r3"]:
        for prompt in PROMPTS:
            assert completion_ids(client, name, prompt) == expected[("base" if name == MODEL else name, prompt)], name
    # a set and a scale named in the body instead of the model name
    body = {"steerlens": {"vectors": "trained", "scale": 0.5}}
    assert completion_ids(client, MODEL, PROMPTS[0], **body) == expected[("trained-half", PROMPTS[0])]
    # chat completions run under the set too (the same engine path; steered differs from base)
    chats = {
        name: client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=MAX_TOKENS, temperature=0.0
        )
        .choices[0]
        .message.content
        for name in (MODEL, "r1")
    }
    assert chats[MODEL] != chats["r1"]


def test_unknown_set_and_missing_key_are_clear_errors(client: Any, server: Any) -> None:
    with pytest.raises(
        openai.NotFoundError, match=f"no vector set or model named 'nope'; available: {MODEL}, trained, r1, r2, r3"
    ):
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="available:"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"steerlens": {"vectors": "nope"}})
    with pytest.raises(openai.BadRequestError, match="steerlens field"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"steerlens": "trained"})
    anonymous = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.completions.create(model="trained", prompt="Hi", max_tokens=2)


def test_concurrent_requests_each_get_their_own_set(client: Any, expected: dict) -> None:
    names = ["trained", "r1", "r2", "r3"]
    jobs = [(names[i % 4], PROMPTS[(i // 4) % 2]) for i in range(32)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda job: completion_ids(client, *job), jobs))
    for (name, prompt), ids in zip(jobs, results):
        assert ids == expected[(name, prompt)], name


def test_a_vector_file_loads_at_run_time(client: Any, server: Any, files: dict, expected: dict) -> None:
    endpoint = server.url.removesuffix("/v1") + "/steerlens/vectors"

    def post(body: dict, key: str | None = KEY) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    assert post({"name": "late", "path": str(files["late"])}, key=None)[0] == 401
    status, reply = post({"name": "late", "path": str(files["late"]) + ".missing"})
    assert status == 400 and "late" in reply["error"]["message"]
    status, reply = post({"name": "late", "path": str(files["late"])})
    assert status == 200 and reply["name"] == "late"
    assert "late" in [model.id for model in client.models.list()]
    assert completion_ids(client, "late", PROMPTS[0]) == expected[("late", PROMPTS[0])]


def test_runtime_loading_is_off_unless_asked(tiny_qwen_dir: Path, tmp_path: Path, client: Any) -> None:
    # a second, tiny steered server started without --allow-vector-loading and without a key, on loopback
    from steerlens.serving import LOOPBACK, LocalServer, steering_settings
    from steerlens.vectors import SteeringVectors

    vectors = SteeringVectors(torch.ones(4, 128), (0, 1, 2, 3), 4).save(tmp_path / "ones.safetensors")
    settings = steering_settings(str(tiny_qwen_dir), {"ones": vectors})
    with LocalServer(str(tiny_qwen_dir), log_path=tmp_path / "tiny.log", max_model_len=512, steering=settings) as tiny:
        assert tiny.url.startswith(f"http://{LOOPBACK}:")
        request = urllib.request.Request(
            tiny.url.removesuffix("/v1") + "/steerlens/vectors",
            method="POST",
            data=json.dumps({"name": "x", "path": str(vectors)}).encode(),
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 404 and "--allow-vector-loading" in json.load(refused.value)["error"]["message"]
        keyless = openai.OpenAI(base_url=tiny.url, api_key="anything", max_retries=0)
        assert keyless.completions.create(model="ones", prompt="Hi", max_tokens=2).choices[0].text is not None
