"""`steerlens` keeps vLLM and transformers to warnings unless --verbose (VLLM_LOGGING_LEVEL wins); help is quick."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from steerlens.cli import app

ENV = "VLLM_LOGGING_LEVEL"
LOGGERS = ("vllm", "transformers")


@pytest.fixture(autouse=True)
def unset(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start without the variable; afterwards restore it and the loggers' levels as they were."""
    monkeypatch.setenv(ENV, "unused")  # records the original value, restored at teardown
    monkeypatch.delenv(ENV)
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def invoke(*options: str) -> None:
    """A command that starts no engine: print eval's default config."""
    result = CliRunner().invoke(app, [*options, "eval", "--print-config"])
    assert result.exit_code == 0, result.output


def test_quiet_by_default() -> None:
    invoke()
    assert os.environ[ENV] == "WARNING"
    assert all(logging.getLogger(name).level == logging.WARNING for name in LOGGERS)


def test_user_setting_and_verbose_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "DEBUG")
    invoke()
    assert os.environ[ENV] == "DEBUG"
    monkeypatch.delenv(ENV)
    invoke("--verbose")
    assert ENV not in os.environ
    assert "--verbose" in CliRunner().invoke(app, ["--help"]).output


def test_help_imports_no_job_and_lists_config_options() -> None:
    """`steerlens --help` imports no job (no torch); a job's help describes its config's options."""
    probe = (
        "import sys; from typer.testing import CliRunner; from steerlens.cli import app; "
        "CliRunner().invoke(app, ['--help']); print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"
    for command in (["train"], ["study", "singles"], ["eval"]):
        output = CliRunner().invoke(app, [*command, "--help"]).output
        assert "Options of the config" in output and "--max-new-tokens (int, default 48)" in output, command
    assert "--lr (float" in CliRunner().invoke(app, ["train", "--help"]).output
