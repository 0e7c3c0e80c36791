"""vLLM and HF rollouts sample from the same steered distribution, and return what the trainer needs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from steerlens.anatomy import model_shape
from steerlens.backends import hf
from steerlens.backends.vllm import SteeredLLM, hf_sequence_logprobs
from steerlens.models import load_model
from steerlens.rollout import HFRollout, Sampling, VLLMRollout, encode_prompt
from steerlens.vectors import SteeringVectors

pytestmark = pytest.mark.vllm
PROMPTS = ["What is 12+7?", "Compute 3-1."]


@pytest.fixture(scope="module")
def setup(tiny_qwen_dir: Path):
    model, tokenizer = load_model(tiny_qwen_dir)
    vectors = SteeringVectors.zeros(model_shape(model))
    vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(5)) * 2.0
    engine = VLLMRollout(SteeredLLM(tiny_qwen_dir, vectors), tokenizer)
    yield model, tokenizer, vectors, engine
    engine.close()


def test_completions_carry_stop_token_and_truncation(setup) -> None:
    model, tokenizer, vectors, engine = setup
    for rollout in (engine, HFRollout(model, tokenizer)):
        groups = rollout.generate(PROMPTS, 3, Sampling(max_new_tokens=6, temperature=1.0), seeds=[1, 2])
        assert [len(g) for g in groups] == [3, 3]
        for c in (c for g in groups for c in g):
            assert 1 <= len(c.token_ids) <= 6
            assert c.truncated == (c.token_ids[-1] != tokenizer.eos_token_id)


def test_seeded_sampling_is_reproducible(setup) -> None:
    model, tokenizer, vectors, engine = setup
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    for rollout in (engine, HFRollout(model, tokenizer)):
        a = rollout.generate(PROMPTS, 2, sampling, seeds=[7, 8])
        b = rollout.generate(PROMPTS[::-1], 2, sampling, seeds=[8, 7])  # other batch order, same seeds
        assert [c.token_ids for c in a[0]] == [c.token_ids for c in b[1]]


def test_vllm_samples_score_the_same_under_hf(setup) -> None:
    """Each sampled token's log-prob as vLLM saw it equals the trainer's recomputation (same vectors)."""
    from vllm import SamplingParams

    model, tokenizer, vectors, engine = setup
    prompt_ids = encode_prompt(tokenizer, PROMPTS[0])
    out = engine.engine.llm.generate(
        [{"prompt_token_ids": prompt_ids}],
        SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=3, logprobs=0),
        use_tqdm=False,
    )[0]
    for sample in out.outputs:
        engine_lp = torch.tensor([step[tok].logprob for step, tok in zip(sample.logprobs, sample.token_ids)])
        trainer_lp = hf_sequence_logprobs(model, vectors, prompt_ids, list(sample.token_ids))
        assert torch.allclose(engine_lp, trainer_lp, atol=1e-3), (engine_lp - trainer_lp).abs().max()


def test_both_engines_sample_the_same_distribution(setup) -> None:
    """First-token frequencies of 400 samples per engine agree within sampling error."""
    model, tokenizer, vectors, engine = setup
    sampling = Sampling(max_new_tokens=1, temperature=1.0, seed=0)
    with hf.attach(model, vectors), torch.no_grad():
        hf_first = [
            g[0].token_ids[0]
            for g in HFRollout(model, tokenizer, batch_size=400).generate([PROMPTS[0]] * 400, 1, sampling)
        ]
        logits = model(torch.tensor([encode_prompt(tokenizer, PROMPTS[0])])).logits[0, -1]
        hf_seeded_first = [
            g[0].token_ids[0]
            for g in HFRollout(model, tokenizer, batch_size=400).generate(
                [PROMPTS[0]] * 400, 1, sampling, seeds=list(range(2000, 2400))
            )
        ]
    vllm_first = [
        g[0].token_ids[0] for g in engine.generate([PROMPTS[0]] * 400, 1, sampling, seeds=list(range(1000, 1400)))
    ]
    probs = torch.softmax(logits, -1)
    top = int(probs.argmax())
    p = float(probs[top])
    sigma = math.sqrt(p * (1 - p) / 400)
    for first in (hf_first, hf_seeded_first, vllm_first):
        assert abs(first.count(top) / 400 - p) < 4 * sigma + 1e-3, (first.count(top) / 400, p)


def test_seeded_hf_rows_do_not_depend_on_the_batch(setup) -> None:
    """HF rollouts sample every prompt's rows in one batched call; a row's tokens follow from its seed alone."""
    model, tokenizer, vectors, engine = setup
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9)
    together = HFRollout(model, tokenizer, batch_size=64).generate(PROMPTS, 3, sampling, seeds=[5, 6])
    alone = HFRollout(model, tokenizer, batch_size=1).generate(PROMPTS[1:], 3, sampling, seeds=[6])
    assert [c.token_ids for c in together[1]] == [c.token_ids for c in alone[0]]
    assert len({tuple(c.token_ids) for g in together for c in g}) > 1  # samples, not copies of one row


def test_push_none_means_unsteered(setup) -> None:
    model, tokenizer, vectors, engine = setup
    greedy = Sampling(max_new_tokens=8, temperature=0.0)
    engine.update(None)
    try:
        unsteered = engine.generate(PROMPTS, 1, greedy)
        reference = HFRollout(model, tokenizer).generate(PROMPTS, 1, greedy)
        assert [g[0].token_ids for g in unsteered] == [g[0].token_ids for g in reference]
    finally:
        engine.update(vectors)
