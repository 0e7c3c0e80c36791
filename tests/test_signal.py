"""The learning-signal monitor: a reward constant within each prompt group gives no gradient, and the run
says so (100% no-signal groups, a warning naming what to change); a reward that varies within every group
shows 0% and no warning. The outcome shares (correct / wrong / truncated) add up to one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from steerlens.data.generated import generate
from steerlens.models import load_model
from steerlens.rl.config import TrainConfig
from steerlens.rl.report import format_report
from steerlens.rl.signal import WARN_STEPS
from steerlens.rl.trainer import Trainer
from steerlens.task import Task

GENERATIONS = 4


def by_problem(completions: list[str], problems: list) -> list[float]:
    """+1 for problems with an even id, -1 otherwise: every sample of a group gets its problem's reward."""
    return [1.0 if int(p.id) % 2 == 0 else -1.0 for p in problems]


def alternating(completions: list[str], problems: list) -> list[float]:
    """+1, -1, +1, ... over the (prompt-major) batch: every group of an even size holds both rewards."""
    return [1.0 if i % 2 == 0 else -1.0 for i in range(len(completions))]


def run(tmp_path: Path, reward, steps: int) -> tuple[list[dict], dict]:
    model, tokenizer = load_model("toy-arith")
    cfg = TrainConfig(
        steps=steps,
        prompts_per_step=4,
        generations=GENERATIONS,
        max_new_tokens=12,
        engine="hf",
        eval_data=None,
        progress=False,
        save_every=steps,
        out_dir=str(tmp_path / "run"),
    )
    summary = Trainer(model, tokenizer, Task(generate("toy-arith", 64), reward=reward), cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return rows, summary


def test_constant_reward_per_group_shows_no_signal_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="steerlens"):
        rows, summary = run(tmp_path, by_problem, steps=WARN_STEPS)
    assert [r["no_signal_share"] for r in rows] == [1.0] * WARN_STEPS
    assert all(r["adv_min"] == r["adv_max"] == 0.0 for r in rows)  # no gradient from any group
    warnings = [r.message for r in caplog.records if "gave no learning signal" in r.message]
    assert len(warnings) == 1 and "more samples per prompt" in warnings[0], caplog.text
    assert summary["no_signal_share_last_steps"] == 1.0
    assert "groups without signal" in format_report(summary)


def test_reward_varying_within_groups_shows_full_signal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="steerlens"):
        rows, _ = run(tmp_path, alternating, steps=WARN_STEPS)
    assert [r["no_signal_share"] for r in rows] == [0.0] * WARN_STEPS
    assert not [r for r in caplog.records if "gave no learning signal" in r.message]
    for r in rows:
        assert r["accuracy"] == 0.5  # half the samples are rewarded +1
        assert r["accuracy"] + r["wrong_rate"] + r["truncated_wrong_rate"] == pytest.approx(1.0)
        assert r["truncated_wrong_rate"] <= r["truncation_rate"]
