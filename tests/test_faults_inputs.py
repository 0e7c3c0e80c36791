"""Fault injection for inputs: damaged configs and datasets of every kind, through the real CLI.

Each must stop the command with exit code 2 and one line `error: <file>: <what is wrong>`, no traceback,
before any model is loaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from steerlens.cli import app
from steerlens.config import MAX_CONFIG_BYTES

# A "billion laughs": nine levels of nine aliases each, 9^9 strings if it were ever expanded.
ALIAS_BOMB = (
    "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
    + "layers: *i\n"
)

CONFIGS = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text (byte 0)"),
    "huge": ("steps: 3\n" + "#" * MAX_CONFIG_BYTES + "\n", f"larger than {MAX_CONFIG_BYTES} bytes"),
    "alias_bomb": (ALIAS_BOMB, "more than 20 aliases"),
    "deep_nesting": ("layers: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
    "broken_yaml": ("steps: [1\nlr: 2\n", "not valid YAML (line 2, column 3"),
    "top_level_list": ("- steps\n", "expected a mapping of keys to values at the top level, got list"),
    "infinity": ("lr: .inf\n", "lr must be a finite number, got inf"),
    "minus_infinity": ("reward_wrong: -.inf\n", "reward_wrong must be a finite number, got -inf"),
    "nan": ("kl_coef: .nan\n", "kl_coef must be a finite number, got nan"),
    "overflow": ("lr: 1e999\n", "lr must be a finite number, got '1e999'"),
    "nested_list": ("layers: [[1, 2]]\n", "layers[0] must be int, got [1, 2]"),
    "wrong_item": ("layers: [1, two]\n", "layers[1] must be int, got 'two'"),
    "bool_as_int": ("steps: true\n", "steps must be int, got True"),
    "int_as_bool": ("resume: 1\n", "resume must be true or false, got 1"),
    "bool_as_float": ("lr: yes\n", "lr must be float, got True"),
    "float_as_int": ("steps: 2.5\n", "steps must be int, got 2.5"),
    "list_as_text": ("model: [a, b]\n", "model must be str, got ['a', 'b']"),
    "mapping_as_number": ("lr: {value: 1}\n", "lr must be float, got {'value': 1}"),
    "null_as_text": ("model:\n", "model must be str, got None"),
    "out_of_range": ("steps: 0\n", "TrainConfig: steps must be >= 1"),
}

FLAGS = {
    "infinity": (["--lr", "inf"], "command line: lr must be a finite number, got 'inf'"),
    "nan": (["--temperature", "nan"], "command line: temperature must be a finite number, got 'nan'"),
    "nested_list": (["--layers", "[[1, 2]]"], "command line: layers[0] must be int, got [1, 2]"),
    "broken_yaml": (["--eval-data", "[oops"], "command line: --eval-data: not valid YAML"),
}

ROW = {"problem": "What is 1+1?", "answer": "2"}
DATASETS = {
    "non_object_line.jsonl": (json.dumps(ROW) + "\n[1, 2]\n", "line 2 is a list; expected an object"),
    "torn_line.jsonl": (json.dumps(ROW) + '\n{"problem": "What is 2+2?", "ans', "line 2 is not valid JSON (column 29"),
    "deep_line.jsonl": ("[" * 100_000 + "]" * 100_000 + "\n", "line 1 is not valid JSON (nested too deeply)"),
    "missing_answer.jsonl": (
        json.dumps(ROW) + '\n\n{"problem": "What is 2+2?"}\n',
        "line 3 has no answer (column 'answer' is missing or null)",
    ),
    "null_answer.jsonl": ('{"problem": "What is 2+2?", "answer": null}\n', "line 1 has no answer"),
    "empty_problem.jsonl": ('{"problem": " ", "answer": "4"}\n', "line 1 has an empty problem (column 'problem')"),
    "list_answer.jsonl": ('{"problem": "p", "answer": [4]}\n', "line 1: the answer (column 'answer') is a list"),
    "not_utf8.jsonl": (
        json.dumps(ROW).encode() + b'\n{"problem": "\xff", "answer": "1"}\n',
        "line 2 is not UTF-8 text",
    ),
    "scalar.json": ("42", "the JSON is a number; expected a list of objects"),
    "broken.json": ('[\n{"problem": "p"\n', "the file is not valid JSON (line 3, column 1"),
    "strings.json": ('["What is 1+1?", "2"]', "row 1 is a string; expected an object"),
    "missing_cell.csv": ("problem,answer\nWhat is 1+1?,2\nWhat is 2+2?,\n", "row 2 has an empty answer"),
    "short_row.csv": ("problem,answer\nWhat is 1+1?,2\nWhat is 2+2?\n", "row 2 has an empty answer"),
    "garbage.parquet": (b"PAR1 this is not parquet", "cannot be read as parquet"),
    "missing_answer.parquet": (pd.DataFrame({"problem": ["p", "q"], "answer": ["1", None]}), "row 2 has no answer"),
    "gsm8k_no_final_answer.jsonl": (
        '{"question": "q", "answer": "2 + 2 = 4 ####"}\n',
        "line 1: no final answer can be read",
    ),
}


def fails_in_one_line(args: list[str], *needles: str) -> str:
    """Run the CLI: exit code 2, one line `error: ...` holding every needle, and no traceback."""
    result = CliRunner().invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output[-2000:]
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    assert all(needle in lines[0] for needle in needles), lines[0]
    return lines[0]


def write(path: Path, content: str | bytes | pd.DataFrame) -> Path:
    if isinstance(content, pd.DataFrame):
        content.to_parquet(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_damaged_config_file(tmp_path: Path, name: str) -> None:
    content, needle = CONFIGS[name]
    path = write(tmp_path / f"{name}.yaml", content)
    start = time.monotonic()
    line = fails_in_one_line(["train", "--config", str(path), "--print-config"], f"error: {path}: ", needle)
    assert time.monotonic() - start < 10 and line.count("TrainConfig") <= 1


@pytest.mark.parametrize("name", FLAGS)
def test_damaged_command_line_value(name: str) -> None:
    flags, needle = FLAGS[name]
    fails_in_one_line(["train", *flags, "--print-config"], needle)


def test_a_config_path_that_is_a_directory(tmp_path: Path) -> None:
    fails_in_one_line(["train", "--config", str(tmp_path), "--print-config"], f"config file {tmp_path} is not a file")


@pytest.mark.parametrize("name", DATASETS)
def test_damaged_dataset(tmp_path: Path, name: str) -> None:
    content, needle = DATASETS[name]
    path = write(tmp_path / name, content)
    fails_in_one_line(
        ["train", "--data", str(path), "--eval-data", "null", "--engine", "hf", "--out-dir", str(tmp_path / "run")],
        f"error: {path}: ",
        needle,
    )


def test_damaged_benchmark_file(tmp_path: Path) -> None:
    content, needle = DATASETS["missing_cell.csv"]
    path = write(tmp_path / "mine.csv", content)
    fails_in_one_line(
        ["eval", "--benchmarks", f"mine={path}", "--engine", "hf", "--out-dir", str(tmp_path / "run")],
        f"error: {path}: ",
        needle,
    )
