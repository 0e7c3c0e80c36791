"""The toy task: problems are right and reproducible; the shipped model can do arithmetic but rarely boxes."""

from __future__ import annotations

from pathlib import Path

from steerlens.data import load_problems
from steerlens.data.generated import generate_problems, write_problems
from steerlens.models import load_model, resolve_model
from steerlens.toy import SHIPPED, evaluate_base, pretrain


def test_problems_are_reproducible_and_correct(tmp_path: Path) -> None:
    problems = generate_problems(200, seed=3)
    assert problems == generate_problems(200, seed=3) and problems != generate_problems(200, seed=4)
    for p in problems:
        assert str(eval(p.expression)) == p.answer and int(p.answer) >= 0  # noqa: S307 - our own a±b strings
    path = write_problems("toy-arith", tmp_path / "train.jsonl", n=50, seed=3)
    assert [(q.problem, q.answer) for q in load_problems(path)] == [(p.problem, p.answer) for p in problems[:50]]


def test_shipped_model_has_the_latent_skill() -> None:
    assert resolve_model("toy-arith") == str(SHIPPED)
    model, tokenizer = load_model("toy-arith")
    measured = evaluate_base(model, tokenizer, n=64, seed=99)
    assert measured["greedy_accuracy"] > 0.4, measured  # it computes the answer ...
    assert measured["sampled_boxed_rate"] < 0.15, measured  # ... but seldom boxes it
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_pretrain_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    report = pretrain(tmp_path / "toy", steps=3, batch_size=8, log_every=0)
    model, _ = load_model(tmp_path / "toy")
    assert report["settings"]["steps"] == 3 and (tmp_path / "toy" / "pretrain.json").is_file()
    assert model.config.num_hidden_layers == 4
