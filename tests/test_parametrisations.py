"""Parametrisations of the steering set: each variant's gradients are the dense vectors' gradient pushed
through its map (explicit formulas), parameter counts at SmolLM2's and Qwen2.5-7B's shapes, the budget rule
and its refusals, a short toy run per variant that resumes exactly, and vLLM equal to HF on pushed values."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from steerlens.config import ConfigError
from steerlens.data.generated import generate
from steerlens.models import load_model
from steerlens.rl.config import TrainConfig
from steerlens.rl.parametrisations import Dense, Form, LowRank, Parametrisation, ParametrisationError, Shared
from steerlens.rl.policy import SteeringPolicy
from steerlens.rl.trainer import Trainer
from steerlens.task import Task
from steerlens.vectors import SteeringVectors

SMOLLM2, QWEN7B = (30, 576), (28, 3584)  # (layers, hidden size)
FORMS = [Form(), Form("low_rank", 3), Form("shared", 2), Form("shared", 2, "random")]


def randomised(module: Parametrisation, seed: int) -> Parametrisation:
    """The module with every parameter random (the zero start would make some gradients vanish)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return module


def expected_gradients(module: Parametrisation, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """J^T G for each variant, written out by hand (independent of autograd)."""
    if isinstance(module, Dense):
        return {"values": grad}
    if isinstance(module, LowRank):
        a, b = module.coefficients.detach(), module.basis.detach()
        return {"coefficients": grad @ b.T, "basis": a.T @ grad}
    assert isinstance(module, Shared)
    c, u = module.coefficients.detach(), module.directions.detach()
    norm = u.norm(dim=1, keepdim=True)
    unit = u / norm
    out = {"coefficients": grad @ (unit * math.sqrt(module.width)).T}
    if module.directions.requires_grad:  # d(sqrt(d) u/|u|) = sqrt(d)/|u| (I - û û^T) du
        m = c.T @ grad
        out["directions"] = math.sqrt(module.width) / norm * (m - (m * unit).sum(1, keepdim=True) * unit)
    return out


@pytest.mark.parametrize("form", FORMS + [Form("shared", 1, "lens", "=")], ids=lambda f: f.describe())
def test_gradients_are_the_dense_gradient_through_the_map(form: Form) -> None:
    rows, width = 5, 16
    module = randomised(form.build(rows, width, lens=torch.randn(1, width)), seed=1)
    grad = torch.randn(rows, width, generator=torch.Generator().manual_seed(2))
    (module() * grad).sum().backward()
    expected = expected_gradients(module, grad)
    trained = {name: p for name, p in module.named_parameters() if p.requires_grad}
    assert trained.keys() == expected.keys()
    for name, param in trained.items():
        assert param.grad is not None and torch.allclose(param.grad, expected[name], atol=1e-5), name


def test_every_variant_starts_at_zero_with_a_nonzero_first_gradient() -> None:
    for form in FORMS:
        module = form.build(5, 16)
        assert not module().any(), form
        module().sum().backward()
        assert any(p.grad is not None and p.grad.any() for p in module.parameters()), form


@pytest.mark.parametrize(
    "shape, counts",
    [
        (SMOLLM2, {"dense": 17280, "low_rank(r=3)": 1818, "shared(n=2, trained)": 1212, "shared(n=2, random)": 60}),
        (QWEN7B, {"dense": 100352, "low_rank(r=3)": 10836, "shared(n=2, trained)": 7224, "shared(n=2, random)": 56}),
    ],
)
def test_parameter_counts(shape: tuple[int, int], counts: dict[str, int]) -> None:
    rows, width = shape
    for form in FORMS:
        built = form.build(rows, width).count()
        assert built == form.count(rows, width) == counts[form.describe()], form
    assert Form("shared", 1, "random").count(rows, width) == rows  # one scalar per layer
    assert Form("shared", 1).count(rows, width) == rows + width


@pytest.mark.parametrize(
    "shape, budget, picked",
    [
        (SMOLLM2, 30, "shared(n=1, random)"),
        (SMOLLM2, 605, "shared(n=1, random)"),
        (SMOLLM2, 606, "low_rank(r=1)"),
        (SMOLLM2, 17279, "low_rank(r=28)"),  # r = 29 would exceed dense's 17280
        (SMOLLM2, 17280, "dense"),
        (SMOLLM2, 10**9, "dense"),
        (QWEN7B, 13, "error"),
        (QWEN7B, 100000, "low_rank(r=27)"),
    ],
)
def test_budget_picks_the_largest_variant_that_fits(shape: tuple[int, int], budget: int, picked: str) -> None:
    rows, width = shape
    if picked == "error":
        with pytest.raises(ParametrisationError, match=f"param_budget {budget} is below {rows}"):
            Form.within_budget(rows, width, budget)
        return
    form = Form(budget=budget).resolve(rows, width)
    assert form.describe() == picked and form.count(rows, width) <= budget


def test_impossible_settings_are_refused_in_one_line() -> None:
    for form, needle in [
        (Form("low_rank", 31), r"rank 31 must be in \[1, 30\]"),
        (Form("shared", 31), r"directions \(rank\) 31 must be in \[1, 30\]"),
        (Form("shared", 577, "random"), r"must be in \[1, 576\]"),
        (Form("shared", 2, "lens", "="), "rank 1 and a lens_token"),
    ]:
        with pytest.raises(ParametrisationError, match=needle):
            form.resolve(*SMOLLM2)
    assert Form("shared", 576, "random").resolve(*SMOLLM2).count(*SMOLLM2) == 576 * 30
    for kwargs, needle in [
        ({"param_budget": 100, "parametrisation": "low_rank"}, "param_budget picks"),
        ({"parametrisation": "low_rank", "trainable": "lora"}, "only to trainable=steering"),
        ({"direction": "random"}, "direction applies to parametrisation=shared"),
        ({"parametrisation": "shared", "direction": "lens"}, "lens_token goes with direction=lens"),
        ({"rank": 0}, "rank and param_budget must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            TrainConfig(**kwargs)  # type: ignore[arg-type]


# ---- through the policy, on models ---------------------------------------------------------------------


def test_policy_chains_the_hooks_gradient(tiny_qwen_dir: Path) -> None:
    """The gradient the hooks leave on the dense vectors reaches the low-rank factors as J^T G; `refresh` puts
    the stepped values back into the hooks; the checkpoint state restores them."""
    model, _ = load_model(tiny_qwen_dir)
    policy = SteeringPolicy(model, [1, 2], "tiny", Form("low_rank", 2))
    try:
        state = {name: torch.randn_like(t) for name, t in policy.named_state().items()}
        policy.load_state(state)
        assert torch.equal(policy.vectors().values, policy.map().detach())
        model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.float().square().mean().backward()
        dense_grad = policy.handle.parameter.grad
        assert dense_grad is not None and dense_grad.any()
        expected = expected_gradients(policy.map, dense_grad.clone())
        policy.chain_gradients()
        assert policy.handle.parameter.grad is None
        assert [p.shape for p in policy.parameters()] == [(2, 2), (2, 128)]
        for name, param in policy.map.named_parameters():
            assert param.grad is not None and torch.allclose(param.grad, expected[name], atol=1e-5), name
            with torch.no_grad():
                param.sub_(param.grad)
        policy.refresh()
        assert torch.equal(policy.handle.parameter.detach(), policy.map().detach())
        assert set(policy.named_state()) == {"steering", "form.coefficients", "form.basis"}
    finally:
        policy.handle.remove()


def toy_run(out: Path, steps: int, resume: bool = False, **form: Any) -> dict[str, Any]:
    """A short HF-engine RLOO run on the shipped toy model, rewarded by a pseudo-random function of the text (so
    every group has signal from the first step)."""
    model, tokenizer = load_model("toy-arith")
    task = Task(generate("toy-arith", 16), reward=lambda texts, _: [float(sum(map(ord, t)) % 2) for t in texts])
    cfg = TrainConfig(
        steps=steps, prompts_per_step=2, generations=4, max_new_tokens=8, lr=0.1, warmup_ratio=0.0, save_every=1,
        engine="hf", eval_data=None, progress=False, out_dir=str(out), resume=resume, **form,
    )  # fmt: skip
    return Trainer(model, tokenizer, task, cfg).train()


@pytest.mark.slow
@pytest.mark.parametrize(
    "form, parameters, rank",
    [
        ({"parametrisation": "low_rank", "rank": 2}, 2 * (4 + 128), 2),
        ({"parametrisation": "shared", "rank": 1}, 4 + 128, 1),
        ({"param_budget": 10}, 4, 1),  # one fixed random direction: a scalar per layer
    ],
    ids=["low_rank", "shared", "budget"],
)
def test_toy_run_trains_and_resumes_exactly(form: dict[str, Any], parameters: int, rank: int, tmp_path: Path) -> None:
    straight = toy_run(tmp_path / "straight", 3, **form)
    toy_run(tmp_path / "resumed", 2, **form)
    resumed = toy_run(tmp_path / "resumed", 3, resume=True, **form)
    assert straight["trainable_parameters"] == resumed["trainable_parameters"] == parameters
    a = SteeringVectors.load(tmp_path / "straight" / "vectors.safetensors").values
    b = SteeringVectors.load(tmp_path / "resumed" / "vectors.safetensors").values
    assert a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert int(torch.linalg.matrix_rank(a)) == rank  # the dense values keep the variant's form
    saved = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_000003" / "trainable.safetensors"))
    assert torch.equal(saved["steering"], b) and any(name.startswith("form.") for name in saved)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]


# ---- vLLM rollouts equal HF's --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir: Path) -> Iterator[Any]:
    pytest.importorskip("vllm")
    from steerlens.backends.vllm import SteeredLLM

    with SteeredLLM(tiny_qwen_dir, kv_cache_memory_bytes=64 << 20, max_model_len=512) as steering:
        yield steering


@pytest.mark.vllm
@pytest.mark.parametrize("form", FORMS[1:] + [Form("shared", 1, "lens", "=")], ids=lambda f: f.describe())
def test_vllm_equals_hf_on_each_variant(form: Form, engine: Any, tiny_qwen_dir: Path) -> None:
    from steerlens.backends.vllm import verify_push

    model, tokenizer = load_model(tiny_qwen_dir)
    policy = SteeringPolicy(model, None, "tiny", form, tokenizer)
    with torch.no_grad():
        for tensor in randomised(policy.map, seed=3).parameters():
            tensor.mul_(0.5)
    policy.refresh()
    vectors = policy.vectors()
    assert vectors.values.abs().max() > 0.1
    engine.update(vectors)
    with policy.base_policy() as bare:
        assert verify_push(engine, bare, tokenizer, vectors, atol=1e-3) <= 1e-3
