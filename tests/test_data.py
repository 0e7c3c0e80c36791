"""Loading problems from local files in every supported format, and the errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from steerlens.data import DataError, format_prompt, load_problems
from steerlens.data.prompts import SYSTEM_PROMPT
from steerlens.tiny import byte_tokenizer

ROWS = [{"problem": "What is 1+1?", "answer": "2"}, {"problem": "Half of 1?", "answer": "\\frac{1}{2}"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_format_loads_the_same_problems(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"train{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    problems = load_problems(path)
    assert [(p.problem, p.answer) for p in problems] == [(r["problem"], r["answer"]) for r in ROWS]
    assert load_problems(path, limit=1)[0].problem == ROWS[0]["problem"]


def test_known_dataset_formats_read_their_answers(tmp_path: Path) -> None:
    gsm = tmp_path / "gsm8k_test.jsonl"
    gsm.write_text(json.dumps({"question": "Sum?", "answer": "3 + 4 = 7\n#### 1,007"}) + "\n")
    assert load_problems(gsm)[0].answer == "1007"
    math = tmp_path / "math_train.jsonl"
    math.write_text(json.dumps({"problem": "p", "solution": "so $\\boxed{\\frac{3}{4}}$."}) + "\n")
    assert load_problems(math)[0].answer == "\\frac{3}{4}"
    math500 = tmp_path / "math500.jsonl"
    math500.write_text(json.dumps({"problem": "p", "solution": "long", "answer": "5"}) + "\n")
    assert load_problems(math500)[0].answer == "5"
    custom = tmp_path / "mine.jsonl"
    custom.write_text(json.dumps({"q": "p", "gold": "9"}) + "\n")
    assert load_problems(custom, problem_key="q", answer_key="gold")[0].answer == "9"


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"problem": "p", "reply": "2"}\n', "no answer column"),
        ('{"problem": "p"\n', "line 1 is not valid JSON"),
        ("", "the dataset is empty"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=needle) as err:
        load_problems(path)
    assert str(path) in str(err.value)


def test_numbers_ids_and_line_separators_survive(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    rows = [{"problem": "a\u2028b", "answer": 3, "id": "x"}, {"problem": "c", "answer": 2.5}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert [(p.id, p.problem, p.answer) for p in load_problems(path)] == [("x", "a\u2028b", "3"), ("1", "c", "2.5")]
    columns = tmp_path / "columns.json"
    pd.DataFrame(ROWS).to_json(columns)  # pandas' default layout: {"problem": {"0": ...}, "answer": {...}}
    assert [(p.problem, p.answer) for p in load_problems(columns)] == [(r["problem"], r["answer"]) for r in ROWS]


def test_missing_file_and_wrong_column_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl")
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match="no column 'gold' \\(--answer-key\\)"):
        load_problems(path, answer_key="gold")


def test_prompt_templates() -> None:
    tok = byte_tokenizer()
    chat = format_prompt(tok, "What is 1+1?")
    assert SYSTEM_PROMPT in chat and chat.index(SYSTEM_PROMPT) < chat.index("What is 1+1?")
    assert chat.endswith("<|im_start|>assistant\n")
    r1 = format_prompt(tok, "What is 1+1?", "r1")
    assert r1.startswith("A conversation") and r1.endswith("<think>") and "What is 1+1?" in r1


def test_generated_sets_are_reproducible_separate_and_correct(tmp_path: Path) -> None:
    import re

    from steerlens.data.generated import generate, materialize

    train = generate("word-arith", 300, seed=0)
    assert train == generate("word-arith", 300, seed=0) != generate("word-arith", 300, seed=1)
    heldout = generate("word-arith-heldout", 300)
    assert heldout == generate("word-arith", 300, heldout=True)
    assert len({p.problem for p in train} & {p.problem for p in heldout}) < 30  # mostly different problems
    for p in train:
        a, b = map(int, re.findall(r"\d+", p.problem))
        adds = any(w in p.problem for w in ("more", "in all"))
        assert int(p.answer) == (a + b if adds else a - b) > 0, p
    path = materialize("word-arith-heldout", tmp_path, n=20)
    assert [(q.problem, q.answer) for q in load_problems(path)] == [(p.problem, p.answer) for p in heldout[:20]]
    assert materialize("some/file.jsonl", tmp_path, n=20) == "some/file.jsonl"
