"""stdout is the results, stderr everything else (issue 32, item 5): `steerlens eval` on the toy task with the
default engine (vLLM where installed, whose logs and engine processes write to stdout unless told), its stdout
checked line by line, so `steerlens eval ... > table.md` captures the table alone. `steerlens train`'s stdout is
checked on the README's main command (tests/test_readme.py), which runs the same default engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from steerlens.cli import LOG_STREAM_ENV, QUIET_ENV


@pytest.mark.slow
def test_eval_prints_only_its_table_and_folder_on_stdout(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "steerlens.cli", "eval", "--limit", "4", "--max-new-tokens", "8", "--no-progress"]
        + ["--out-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in (LOG_STREAM_ENV, QUIET_ENV)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == f"samples and tables: {out}"
    table = lines[:-1]
    assert len(table) >= 3 and all(line.startswith("|") for line in table), result.stdout
    assert (out / "scores.csv").is_file()
