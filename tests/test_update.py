"""The memory-bounded update computes the same numbers as the straightforward one.

Straightforward: full `[batch, sequence, vocab]` logits, each row's completion slice log-softmaxed.
Bounded: hidden states of completion positions only, unembedded a few tokens at a time and recomputed in
the backward pass, micro-batches grouped by a token budget, optionally decoder-layer checkpointing. For
steering, LoRA and full tuning on tiny models, log-probs and gradients agree to fp32 tolerance.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from steerlens.models import load_model
from steerlens.rl.objective import logprobs_from_logits, policy_loss
from steerlens.rl.policy import make_policy
from steerlens.rl.update import (
    MicroBatch,
    completion_logprobs,
    layer_checkpointing,
    micro_batch_loss,
    micro_batches,
    shared_prompt_logprobs,
    token_budget_batches,
)
from steerlens.tiny import build_tiny_model

ATOL = 1e-5
PROMPT_LENS = [5, 9, 3, 7]
COMPLETION_LENS = [7, 2, 11, 4]


def batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    seqs = [
        torch.randint(3, vocab, (p + c,), generator=generator).tolist() for p, c in zip(PROMPT_LENS, COMPLETION_LENS)
    ]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def gradients(policy, loss: torch.Tensor) -> list[torch.Tensor]:
    params = policy.parameters()
    return [g.clone() for g in torch.autograd.grad(loss, params)]


@pytest.mark.parametrize("trainable", ["steering", "lora", "full"])
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])  # gemma2: final-logit soft-capping in the head path
def test_bounded_logprobs_and_gradients_equal_full_logits(trainable: str, family: str, tmp_path: Path) -> None:
    model, _ = load_model(build_tiny_model(tmp_path / family, family, seed=3))
    policy = make_policy(model, trainable, None, family)
    if trainable == "steering":  # start away from zero so the vectors matter
        policy.load_state({name: torch.randn_like(t) for name, t in policy.named_state().items()})
    model.train()
    ids, mask = batch(model.config.vocab_size)
    weights = torch.randn(len(PROMPT_LENS), max(COMPLETION_LENS))
    reference = logprobs_from_logits(
        policy.model(input_ids=ids, attention_mask=mask).logits, ids, PROMPT_LENS, COMPLETION_LENS
    )
    expected = gradients(policy, (reference * weights).sum())
    for checkpointed in (False, True):
        with layer_checkpointing(policy.model, checkpointed):
            bounded = completion_logprobs(policy.model, ids, mask, PROMPT_LENS, COMPLETION_LENS, chunk_tokens=5)
            got = gradients(policy, (bounded * weights).sum())
        assert (bounded - reference).abs().max() <= ATOL
        for g, e in zip(got, expected, strict=True):
            assert torch.allclose(g, e, atol=ATOL, rtol=1e-4), (trainable, checkpointed, (g - e).abs().max())


def test_no_vocabulary_sized_tensor_is_kept_for_backward(tmp_path: Path) -> None:
    """What autograd saves for the log-prob step is bounded by the chunk, not by tokens x vocab."""
    model, _ = load_model(build_tiny_model(tmp_path / "q", "qwen2", seed=0))
    make_policy(model, "steering", None, "q")
    ids, mask = batch(model.config.vocab_size)
    vocab, tokens = model.config.vocab_size, sum(COMPLETION_LENS)
    for chunk, bounded in ((4, True), (None, False)):
        shapes: list[torch.Size] = []

        def record(t: torch.Tensor, shapes: list[torch.Size] = shapes) -> torch.Tensor:
            shapes.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
            if bounded:
                completion_logprobs(model, ids, mask, PROMPT_LENS, COMPLETION_LENS, chunk_tokens=chunk)
            else:
                logprobs_from_logits(
                    model(input_ids=ids, attention_mask=mask).logits, ids, PROMPT_LENS, COMPLETION_LENS
                )
        vocab_sized = [shape.numel() for shape in shapes if shape and shape[-1] == vocab and shape.numel() > vocab]
        if bounded:
            assert not vocab_sized, vocab_sized  # only hidden states and ids are saved; chunks are recomputed
        else:
            assert sum(vocab_sized) >= tokens * vocab  # the straightforward path keeps full logits


def test_token_budget_batches_respect_the_budget() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        budget, cap = rng.randint(1, 2000), rng.randint(1, 16)
        groups = token_budget_batches(lengths, budget, cap)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) <= cap
            assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget


@pytest.mark.parametrize("trainable", ["steering", "full"])
def test_micro_batch_loss_with_kl_equals_the_loss_from_full_logits(trainable: str, tmp_path: Path) -> None:
    """The trainer's loss of one micro-batch (mask, advantages, KL to the base policy) from bounded log-probs."""
    model, _ = load_model(build_tiny_model(tmp_path / "m", "qwen2", seed=4))
    policy = make_policy(model, trainable, None, "m")
    with policy.base_policy():  # full tuning copies its reference at first use, as the trainer's first step does
        pass
    with torch.no_grad():  # move the policy away from its base, so that the KL term is not zero
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    ids, mask = batch(model.config.vocab_size, seed=1)
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    total = sum(COMPLETION_LENS)
    token_mask = torch.arange(max(COMPLETION_LENS))[None] < torch.tensor(COMPLETION_LENS)[:, None]
    logp = logprobs_from_logits(model(input_ids=ids, attention_mask=mask).logits, ids, PROMPT_LENS, COMPLETION_LENS)
    with torch.no_grad(), policy.base_policy() as base:
        ref = logprobs_from_logits(base(input_ids=ids, attention_mask=mask).logits, ids, PROMPT_LENS, COMPLETION_LENS)
    expected = policy_loss(logp, token_mask, adv, total, ref, 0.1)
    assert float(expected - policy_loss(logp, token_mask, adv, total)) > 1e-4  # the KL term is there
    rows = [row[: p + c].tolist() for row, p, c in zip(ids, PROMPT_LENS, COMPLETION_LENS)]
    rows_batch = MicroBatch([r[:p] for r, p in zip(rows, PROMPT_LENS)], [r[p:] for r, p in zip(rows, PROMPT_LENS)])
    got = micro_batch_loss(policy, rows_batch, adv, total, chunk_tokens=3, kl_coef=0.1)
    assert abs(float(got - expected)) <= ATOL
    for g, e in zip(gradients(policy, got), gradients(policy, expected), strict=True):
        assert torch.allclose(g, e, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("trainable", ["steering", "lora", "full"])
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])  # gemma2: its own cache class and soft-capping
def test_shared_prompt_logprobs_and_gradients_equal_separate_rows(trainable: str, family: str, tmp_path: Path) -> None:
    """One prompt's forward shared by its completions gives each row's log-probs and the gradients of
    computing every row separately (prompt included), to fp32 tolerance."""
    model, _ = load_model(build_tiny_model(tmp_path / family, family, seed=5))
    policy = make_policy(model, trainable, None, family)
    if trainable == "steering":
        policy.load_state({name: torch.randn_like(t) for name, t in policy.named_state().items()})
    model.train()
    generator = torch.Generator().manual_seed(2)
    long, short = (torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in (9, 5))
    prompts = [long, short, long, long, short]  # two prompts of different lengths, interleaved
    completions = [
        torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in (6, 3, 1, 4, 6)
    ]
    weights = torch.randn(len(completions), 6)
    separate = MicroBatch(prompts, completions).logprobs(model, chunk_tokens=4)
    expected = gradients(policy, (separate * weights).sum())
    shared = shared_prompt_logprobs(model, prompts, completions, chunk_tokens=4)
    assert (shared - separate).abs().max() <= ATOL
    for g, e in zip(gradients(policy, (shared * weights).sum()), expected, strict=True):
        assert torch.allclose(g, e, atol=ATOL, rtol=1e-4), (trainable, (g - e).abs().max())


def test_micro_batches_share_each_prompt_within_the_budget() -> None:
    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 3 + [[6]] * 2 + [[9]]
    completions = [[7] * n for n in (5, 2, 8, 1, 3, 3, 9, 1, 2, 2)]
    for share in (False, True):
        batches = micro_batches(prompts, completions, max_tokens=12, max_sequences=3, share_prompts=share)
        if share:  # small groups of different prompts are packed together
            assert any(len({tuple(p) for p in b.prompts}) > 1 for _, b in batches)
        assert sorted(i for rows, _ in batches for i in rows) == list(range(len(prompts)))
        for rows, batch in batches:
            assert len(rows) <= 3 and batch.completions == [completions[i] for i in rows]
            assert batch.prompts == [prompts[i] for i in rows]
            if share:  # one copy of each prompt within the budget (a longer row goes alone)
                distinct = {tuple(p) for p in batch.prompts}
                assert batch.shared_prompt == (len(distinct) < len(rows))
                padded = len(distinct) * max(map(len, distinct)) + len(rows) * max(map(len, batch.completions))
                assert len(rows) == 1 or padded <= 12
