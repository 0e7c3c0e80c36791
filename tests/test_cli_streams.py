"""stdout is the results, stderr everything else (issue 32, item 5): `steerlens eval` and `steerlens train` on the
toy task with the default engine (vLLM where installed, whose logs and engine processes write to stdout unless
told), their stdout checked line by line, so `steerlens eval ... > table.md` captures the table alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPORT_LINE = re.compile(
    r"^(trained steering for \d+ steps -> \S+"
    r"|reward .*|accuracy .*|answers in .*|completions cut .*|groups without signal .*|held-out greedy accuracy.*"
    r"|trainable parameters: .*)$"
)


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_STREAM", "VLLM_LOGGING_LEVEL")}
    result = subprocess.run(
        [sys.executable, "-m", "steerlens.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_eval_prints_only_its_table_and_folder_on_stdout(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = run(tmp_path, "eval", "--limit", "4", "--max-new-tokens", "8", "--no-progress", "--out-dir", str(out))
    lines = result.stdout.splitlines()
    assert lines[-1] == f"samples and tables: {out}"
    table = lines[:-1]
    assert len(table) >= 3 and all(line.startswith("|") for line in table), result.stdout
    assert (out / "scores.csv").is_file()


def test_train_prints_only_its_report_on_stdout(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(tmp_path, "train", "--steps", "1", "--out-dir", str(out))
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines and all(REPORT_LINE.match(line) for line in lines), result.stdout
    assert lines[0].endswith(str(out / "vectors.safetensors"))
