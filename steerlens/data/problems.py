"""Math problems from local files (JSONL, JSON, parquet, CSV) or the hub, with answer columns recognised.

`DATASETS` says, per known benchmark or training set, where its problem and answer live; unknown
files fall back to the common column names. Adding a dataset is one entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

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


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return pd.DataFrame(rows)
        if suffix == ".json":
            data: Any = json.loads(path.read_text())
            return pd.DataFrame(data if isinstance(data, list) else data.get("data", data))
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (json.JSONDecodeError, ValueError, OSError) as err:
        raise DataError(f"{path}: cannot be read as {suffix[1:]} ({err})") from err
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")


def _pick(columns: list[str], explicit: str | None, preferred: str | None, candidates: tuple[str, ...],
          what: str, flag: str, source: str) -> str:
    if explicit is not None:
        if explicit not in columns:
            raise DataError(f"{source}: no column {explicit!r} ({flag}); columns are {columns}")
        return explicit
    for name in ((preferred,) if preferred else ()) + candidates:
        if name in columns:
            return name
    raise DataError(f"{source}: no {what} column among {columns}; name it with {flag} COLUMN")


def _frame(source: str, split: str | None) -> pd.DataFrame:
    path = Path(source).expanduser()
    if path.exists():
        return _read_table(path)
    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"):
        raise DataError(f"dataset file {source} does not exist")
    try:
        import datasets

        return datasets.load_dataset(source, split=split or "train").to_pandas()
    except Exception as err:  # the hub client raises many kinds of errors when offline
        raise DataError(f"{source!r} is not a local file and could not be loaded from the hub ({err})") from err


def load_problems(source: str | Path, problem_key: str | None = None, answer_key: str | None = None,
                  limit: int | None = None, split: str | None = None, dataset: str | None = None) -> list[Problem]:
    """Problems with gold answers from a local file or hub id; `dataset` names a `DATASETS` format."""
    source = str(source)
    key = registered(dataset or Path(source).stem, DATASETS)
    fmt = DATASETS[key] if key else DatasetFormat()
    frame = _frame(source, split)
    if frame.empty:
        raise DataError(f"{source}: the dataset is empty")
    columns = [str(c) for c in frame.columns]
    p_key = _pick(columns, problem_key, fmt.problem_key, PROBLEM_KEYS, "problem", "--problem-key", source)
    a_key = _pick(columns, answer_key, fmt.answer_key, ANSWER_KEYS, "answer", "--answer-key", source)
    reader = fmt.answer_from
    if answer_key is None and fmt.answer_key is None and a_key == "solution":
        reader = last_box
    ids = frame["id"].astype(str) if "id" in frame.columns else frame.index.astype(str)
    problems = [Problem(str(i), str(p), reader(str(a))) for i, p, a in zip(ids, frame[p_key], frame[a_key])]
    return problems[:limit] if limit is not None else problems
