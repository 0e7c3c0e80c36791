"""Math problems from local files (JSONL, JSON, parquet, CSV) or the hub, with answer columns recognised.

`DATASETS` says, per known benchmark or training set, where its problem and answer live; unknown
files fall back to the common column names. Adding a dataset is one entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steerlens.errors import SteerlensError
from steerlens.reward import extract_boxed

PROBLEM_KEYS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "Answer", "solution", "expected_answer", "target")


class DataError(SteerlensError, ValueError):
    """A dataset cannot be read as problems with answers."""


@dataclass(frozen=True)
class Problem:
    """One problem and its gold answer (as written in the dataset, without `\\boxed{}`)."""

    id: str
    problem: str
    answer: str


def canonical(name: str) -> str:
    """`MATH-500`, `math_500` and `math500` are the same name."""
    return name.lower().replace("-", "").replace("_", "")


def registered(name: str, keys: Iterable[str]) -> str | None:
    """The longest of `keys` that `name` starts with, up to case, '-' and '_' (math500 before math)."""
    known = [key for key in keys if canonical(name).startswith(canonical(key))]
    return max(known, key=len) if known else None


def gsm8k_answer(text: str) -> str:
    """GSM8K's final answer follows `####`."""
    return text.split("####")[-1].strip().replace(",", "")


def last_box(text: str) -> str:
    """MATH-style solutions give the answer in their last `\\boxed{}`."""
    return extract_boxed(text) or text.strip()


@dataclass(frozen=True)
class DatasetFormat:
    """Where a dataset keeps its problem and answer, and how to read the answer."""

    problem_key: str | None = None
    answer_key: str | None = None
    answer_from: Callable[[str], str] = str.strip


DATASETS: dict[str, DatasetFormat] = {
    "gsm8k": DatasetFormat("question", "answer", gsm8k_answer),
    "math": DatasetFormat("problem", "solution", last_box),
    "math500": DatasetFormat("problem", "answer"),
    "deepscaler": DatasetFormat("problem", "answer"),
    "aime24": DatasetFormat("problem", "answer"),
    "aime25": DatasetFormat("problem", "answer"),
    "amc23": DatasetFormat("problem", "answer"),
    "minerva": DatasetFormat("problem", "answer"),
    "olympiadbench": DatasetFormat("question", "final_answer"),
}


_JSON_KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}


def _kind(value: Any) -> str:
    """What a JSON value is, in words: "a list", "a number", ..."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is skipped); other bytes are a DataError naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {err.start}); expected a text file") from None


def _parse_json(text: str, path: Path, what: str) -> Any:
    """`text` as JSON; a syntax error or absurd nesting is a DataError naming `what` ("line 3", "the file")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}" if "\n" in text else f"column {err.colno}"
        raise DataError(f"{path}: {what} is not valid JSON ({where}: {err.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: {what} is not valid JSON (nested too deeply)") from None


def _row(value: Any, path: Path, where: str) -> dict[str, Any]:
    """A row must be a JSON object (its keys are the columns)."""
    if not isinstance(value, dict):
        raise DataError(f"{path}: {where} is {_kind(value)}; expected an object with a problem and an answer")
    return value


def _jsonl_table(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """One object per line (blank lines skipped); a line that is not one is an error naming its number."""
    rows, where = [], []
    for number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        place = f"line {number}"
        rows.append(_row(_parse_json(line, path, place), path, place))
        where.append(place)
    return pd.DataFrame(rows, dtype=object), where


def _json_table(path: Path) -> pd.DataFrame:
    """A list of objects, `{"data": [...]}`, or columns as pandas' `to_json` writes them."""
    data = _parse_json(_text(path), path, "the file")
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if isinstance(data, dict) and all(isinstance(column, (dict, list)) for column in data.values()):
        return pd.DataFrame(data, dtype=object)
    if not isinstance(data, list):
        raise DataError(f"{path}: the JSON is {_kind(data)}; expected a list of objects with a problem and an answer")
    return pd.DataFrame([_row(value, path, f"row {i + 1}") for i, value in enumerate(data)], dtype=object)


def _read_table(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The file's rows, and where each one is: "line N" in JSONL, "row N" otherwise (from 1, after a CSV header)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")
    try:
        if suffix == ".jsonl":
            return _jsonl_table(path)
        frame = (
            _json_table(path)
            if suffix == ".json"
            else pd.read_parquet(path)
            if suffix == ".parquet"
            else pd.read_csv(path, dtype=str, keep_default_na=False)
        )
    except DataError:
        raise
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: cannot be read as {suffix[1:]} ({' '.join(str(err).split())})") from err
    return frame, [f"row {i + 1}" for i in range(len(frame))]


def _pick(
    columns: list[str],
    explicit: str | None,
    preferred: str | None,
    candidates: tuple[str, ...],
    what: str,
    flag: str,
    source: str,
) -> str:
    if explicit is not None:
        if explicit not in columns:
            raise DataError(f"{source}: no column {explicit!r} ({flag}); columns are {columns}")
        return explicit
    for name in ((preferred,) if preferred else ()) + candidates:
        if name in columns:
            return name
    raise DataError(f"{source}: no {what} column among {columns}; name it with {flag} COLUMN")


def _frame(source: str, split: str | None) -> tuple[pd.DataFrame, list[str]]:
    """The rows of a local file or hub dataset, and where each one is (for errors)."""
    path = Path(source).expanduser()
    if path.exists():
        return _read_table(path)
    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"):
        raise DataError(f"dataset file {source} does not exist")
    try:
        import datasets

        frame = datasets.load_dataset(source, split=split or "train").to_pandas()
    except Exception as err:  # the hub client raises many kinds of errors when offline
        raise DataError(f"{source!r} is not a local file and could not be loaded from the hub ({err})") from err
    return frame, [f"row {i + 1}" for i in range(len(frame))]


def _missing(value: Any) -> bool:
    """None, or pandas' NaN / NA / NaT for an absent cell (never to become the text "nan")."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _cell(value: Any, role: str, column: str, where: str, numbers: bool) -> str:
    """A problem or answer cell as text (numbers too, when `numbers`); missing, empty or other kinds are
    errors that start with `where` (the file and row)."""
    if _missing(value):
        raise DataError(f"{where} has no {role} (column {column!r} is missing or null)")
    if numbers and isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        expected = "text or a number" if numbers else "text"
        raise DataError(f"{where}: the {role} (column {column!r}) is {_kind(value)}; expected {expected}")
    if not value.strip():
        raise DataError(f"{where} has an empty {role} (column {column!r})")
    return value


def load_problems(
    source: str | Path,
    problem_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    split: str | None = None,
    dataset: str | None = None,
) -> list[Problem]:
    """Problems with gold answers from a local file or hub id; `dataset` names a `DATASETS` format.

    Every row must hold a non-empty problem (text) and answer (text or a number); the first that does not
    is a `DataError` naming the file, the row (the line in JSONL) and the column.
    """
    source = str(source)
    key = registered(dataset or Path(source).stem, DATASETS)
    fmt = DATASETS[key] if key else DatasetFormat()
    frame, where = _frame(source, split)
    if frame.empty:
        raise DataError(f"{source}: the dataset is empty")
    columns = [str(c) for c in frame.columns]
    p_key = _pick(columns, problem_key, fmt.problem_key, PROBLEM_KEYS, "problem", "--problem-key", source)
    a_key = _pick(columns, answer_key, fmt.answer_key, ANSWER_KEYS, "answer", "--answer-key", source)
    reader = fmt.answer_from
    if answer_key is None and fmt.answer_key is None and a_key == "solution":
        reader = last_box
    ids = frame["id"] if "id" in frame.columns else frame.index
    problems = []
    for place, i, p, a, index in zip(where, ids, frame[p_key], frame[a_key], frame.index):
        at = f"{source}: {place}"
        problem = _cell(p, "problem", p_key, at, numbers=False)
        answer = reader(_cell(a, "answer", a_key, at, numbers=True))
        if not answer:
            raise DataError(f"{at}: no final answer can be read from the answer (column {a_key!r})")
        problems.append(Problem(str(index if _missing(i) else i), problem, answer))
    return problems[:limit] if limit is not None else problems
