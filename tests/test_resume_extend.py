"""Extending a run on resume (issue 31, item 4): allowed when the learning rate of the steps already taken stays
the same, recorded, and equal to one run of the longer length; refused in one line when the warm-up would change."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from steerlens.cli import app
from steerlens.rl.config import TrainConfig
from steerlens.rl.resume import schedule_refusal, warmup_steps
from steerlens.vectors import SteeringVectors

# warmup_ratio 0.4: a warm-up of ceil(1.2) = ceil(1.6) = 2 steps at 3 and 4 steps (lr x 0.5, then x 1), 3 at 6
TRAIN = [
    "train",
    "--engine",
    "hf",
    "--warmup-ratio",
    "0.4",
    "--lr",
    "0.1",
    "--save-every",
    "2",
    "--prompts-per-step",
    "4",
    "--generations",
    "4",
    "--max-new-tokens",
    "40",
    "--eval-data",
    "null",
    "--no-progress",
]


def run(out: Path, steps: int, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*TRAIN, "--steps", str(steps), "--out-dir", str(out), *extra])
    return result.exit_code, result.output


def vectors(out: Path) -> torch.Tensor:
    return SteeringVectors.load(out / "vectors.safetensors").values


def rewards(out: Path) -> list[float]:
    return [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step toy run, checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("extend") / "three"
    code, output = run(out, 3)
    assert code == 0, output
    return out


def test_an_extended_run_equals_one_run_of_the_longer_length(three_steps: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    code, output = run(straight, 4)
    assert code == 0, output
    extended = Path(shutil.copytree(three_steps, tmp_path / "extended"))
    code, output = run(extended, 4, "--resume")
    assert code == 0, output
    assert "continuing with changed settings: steps: 3 -> 4" in output, output

    a, b = vectors(straight), vectors(extended)
    assert a.abs().sum() > 0 and not torch.equal(b, vectors(three_steps)), "the fourth step changed nothing"
    assert torch.equal(a, b), (a - b).abs().max()  # one process on the CPU: bit for bit
    code, output = run(tmp_path / "no-warm-up", 4, "--warmup-ratio", "0")  # only step 0's lr differs (x1, not x0.5)
    assert code == 0, output
    assert not torch.allclose(vectors(tmp_path / "no-warm-up"), b, atol=1e-6), "the comparison misses the schedule"
    assert rewards(extended) == rewards(straight) and len(rewards(extended)) == 4
    # recorded: the run's config history says from 3 to 4 steps at step 3; its config and summary say 4
    changes = [json.loads(line) for line in (extended / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 3, "changes": {"steps": [3, 4]}}]
    assert "\nsteps: 4\n" in (extended / "config.yaml").read_text()
    assert json.loads((extended / "summary.json").read_text())["config"]["steps"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ("--steps", "6"),
            "cannot resume with --steps 6: warmup_ratio 0.4 of 6 steps makes the learning-rate warm-up 3 steps "
            "instead of the run's 2, which changes the learning rate of the 3 steps already taken; keep it with "
            "--steps from 3 to 5 or --warmup-ratio 0.2, or pass --allow-config-change",
        ),
        (("--steps", "2"), "cannot resume with --steps 2: the run has already taken 3 steps"),
        (
            ("--steps", "4", "--lr", "0.05"),
            "--resume with other settings than the run's (lr: 0.1 -> 0.05; steps: 3 -> 4 alone would be allowed); "
            "pass --allow-config-change",
        ),
    ],
    ids=["warm-up would change", "fewer steps than taken", "another setting changed"],
)
def test_a_resume_that_changes_the_schedule_is_refused_in_one_line(
    three_steps: Path, tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    out = Path(shutil.copytree(three_steps, tmp_path / "run"))
    before = snapshot(out)
    result = CliRunner().invoke(app, [*TRAIN, "--steps", "3", *extra, "--out-dir", str(out), "--resume"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith(f"error: {out}: ") and message in errors[0], errors[0]
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "steps, ratio, taken, new_steps, new_ratio",
    [
        (40, 0.03, 40, 80, 0.03),
        (10, 0.5, 3, 4, 0.5),
        (40, 0.1, 40, 80, 0.0),
        (40, 0.0, 40, 80, 0.1),
        (100, 0.3, 40, 100, 0.31),
    ],
)
def test_each_way_a_refusal_offers_keeps_the_schedule(
    steps: int, ratio: float, taken: int, new_steps: int, new_ratio: float
) -> None:
    """The refusal's `--steps from A to B` and `--warmup-ratio R` both give the run's warm-up back; one step
    outside the span does not."""
    saved = TrainConfig(steps=steps, warmup_ratio=ratio)
    why = schedule_refusal(saved, TrainConfig(steps=new_steps, warmup_ratio=new_ratio), taken)
    assert why is not None and f"instead of the run's {warmup_steps(steps, ratio)}" in why
    span = re.search(r"--steps from (\d+) to (\d+)", why)
    if span:
        low, high = int(span[1]), int(span[2])
        for n in (low, high):
            assert schedule_refusal(saved, TrainConfig(steps=n, warmup_ratio=new_ratio), taken) is None
        for n in (low - 1, high + 1):
            if n >= taken:
                assert schedule_refusal(saved, TrainConfig(steps=n, warmup_ratio=new_ratio), taken) is not None
    keep = re.search(r"--warmup-ratio ([0-9.e-]+)", why)
    if keep:
        assert schedule_refusal(saved, TrainConfig(steps=new_steps, warmup_ratio=float(keep[1])), taken) is None
    assert span or keep, why


def test_any_extension_keeps_a_run_without_warm_up_and_the_steps_taken_decide_the_rest() -> None:
    no_warmup = TrainConfig(steps=10, warmup_ratio=0.0)
    assert schedule_refusal(no_warmup, TrainConfig(steps=10_000, warmup_ratio=0.0), 10) is None
    saved = TrainConfig(steps=40, warmup_ratio=0.03)  # 2 warm-up steps; 3 from 67 steps on
    assert schedule_refusal(saved, TrainConfig(steps=66, warmup_ratio=0.03), 40) is None
    assert schedule_refusal(saved, TrainConfig(steps=67, warmup_ratio=0.03), 40) is not None
    assert schedule_refusal(saved, TrainConfig(steps=40, warmup_ratio=0.05), 40) is None  # restated: still 2
