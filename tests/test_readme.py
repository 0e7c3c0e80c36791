"""The README's two opening commands: CI runs the second; this runs the first's job and checks it works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from steerlens.cli import LOG_STREAM_ENV, QUIET_ENV

ROOT = Path(__file__).parents[1]
REPORT_LINE = re.compile(
    r"^(trained steering for \d+ steps -> \S+"
    r"|reward .*|accuracy .*|answers in .*|completions cut .*|groups without signal .*|held-out greedy accuracy.*"
    r"|trainable parameters: .*)$"
)


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md must open with a bash block of commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command() -> None:
    test_command = readme_commands()[1]
    assert test_command.startswith("bash scripts/setup.sh && ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.split("&& ", 1)[1] in ci, "the test command in the README must be the one .ci/run calls"
    assert "bash scripts/setup.sh" in ci


@pytest.mark.slow
@pytest.mark.vllm
def test_main_command_trains_and_shows_reward_rising(tmp_path: Path) -> None:
    """`steerlens train` with its embedded defaults (only the output folder moved) shows the method working, and
    its stdout is its report alone (issue 32, item 5), though vLLM, the default engine, logs to stdout unless told."""
    main_command = readme_commands()[0]
    assert main_command.endswith(".venv/bin/steerlens train")
    steerlens = Path(sys.executable).parent / "steerlens"
    out = tmp_path / "run"
    run = subprocess.run(
        [str(steerlens), "train", "--out-dir", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in (LOG_STREAM_ENV, QUIET_ENV)},  # as in a user's shell
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = [line for line in run.stdout.splitlines() if line.strip()]
    assert report and all(REPORT_LINE.match(line) for line in report), run.stdout
    assert report[0].endswith(str(out / "vectors.safetensors"))
    assert "held-out greedy accuracy" in run.stdout and "trainable parameters" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_last_steps"] > summary["reward_first_steps"] + 0.25, summary
    assert summary["heldout_accuracy_after"] > summary["heldout_accuracy_before"] + 0.2, summary
    assert summary["config"]["engine"] == "auto" and (out / "vectors.safetensors").is_file()
