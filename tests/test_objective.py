"""Advantage and loss maths against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from steerlens.rl.objective import advantages, logprobs_from_logits, policy_loss


def test_rloo_leave_one_out() -> None:
    r = torch.tensor([[1.0, -1.0, -1.0, -1.0]])
    # A_0 = 1 - mean(-1,-1,-1) = 2; A_1 = -1 - mean(1,-1,-1) = -2/3
    assert torch.allclose(advantages(r, "rloo"), torch.tensor([[2.0, -2 / 3, -2 / 3, -2 / 3]]))


def test_group_mean_and_grpo() -> None:
    r = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    assert torch.allclose(advantages(r, "group_mean"), torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    # population std of (1, 0) is 0.5 -> (0.5 / 0.5, -0.5 / 0.5)
    assert torch.allclose(advantages(r, "grpo"), torch.tensor([[1.0, -1.0], [0.0, 0.0]]), atol=1e-5)


def test_advantage_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 generations"):
        advantages(torch.ones(3, 1), "rloo")
    with pytest.raises(ValueError, match="unknown baseline"):
        advantages(torch.ones(3, 2), "ppo")  # type: ignore[arg-type]


def test_completion_logprobs_pick_the_sampled_tokens() -> None:
    vocab = 5
    logits = torch.randn(2, 6, vocab, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 0]])
    lp = logprobs_from_logits(logits, ids, prompt_lens=[2, 3], completion_lens=[3, 2])
    full = torch.log_softmax(logits, dim=-1)
    expected0 = [full[0, 1, 2], full[0, 2, 3], full[0, 3, 4]]
    expected1 = [full[1, 2, 1], full[1, 3, 0], 0.0]
    assert torch.allclose(lp, torch.tensor([expected0, expected1]))


def test_loss_is_token_normalised_and_masks_padding() -> None:
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0])
    # -(2 * (-3) + (-1) * (-1.5)) / 5 = -(-6 + 1.5) / 5 = 0.9
    assert policy_loss(lp, mask, adv, total_tokens=5).item() == pytest.approx(0.9)
    # padded positions holding junk must not count
    junk = lp.clone()
    junk[0, 2] = -100.0
    assert policy_loss(junk, mask, adv, total_tokens=5).item() == pytest.approx(0.9)


def test_kl_term_is_zero_at_reference_and_positive_elsewhere() -> None:
    lp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    zero_adv = torch.zeros(1)
    assert policy_loss(lp, mask, zero_adv, 2, ref_logprobs=lp.clone(), kl_coef=0.5).item() == 0.0
    ref = torch.tensor([[-1.5, -1.0]])
    d = ref - lp
    expected = 0.5 * (torch.exp(d) - d - 1).sum() / 2
    assert policy_loss(lp, mask, zero_adv, 2, ref_logprobs=ref, kl_coef=0.5).item() == pytest.approx(expected.item())
