"""Problem sets made on demand: the toy model's arithmetic and easy word problems for small real models.

`toy-arith` and `word-arith` are training streams seeded by the run's seed; `<name>-heldout` (and a
benchmark of that name) is a separate stream, offset by `HELDOUT_SEED`. A generated set is written once
into the run directory as JSONL, so the data a run used stays on disk beside its results.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from steerlens.data.problems import DataError, Problem
from steerlens.io import atomic_path

HELDOUT_SEED = 7919
HELDOUT = "-heldout"

PEOPLE = ("Tom", "Ana", "Lena", "Omar", "Mia", "Sam", "Ravi", "Zoe")
THINGS = ("apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells")
ADDITIONS = (
    "{who} has {a} {what}. {who} gets {b} more. How many {what} does {who} have now?",
    "There are {a} {what} in a box. {who} puts in {b} more. How many {what} are in the box?",
    "{who} found {a} {what} on Monday and {b} {what} on Tuesday. How many {what} did {who} find in all?",
)
SUBTRACTIONS = (
    "{who} has {a} {what} and gives away {b}. How many {what} does {who} have left?",
    "A shop had {a} {what} and sold {b}. How many {what} does the shop have left?",
    "There were {a} {what} on the table. {who} took {b}. How many {what} are still on the table?",
)


def word_problem(rng: random.Random) -> tuple[str, str]:
    """A one-step addition or subtraction story with small numbers (answers 1..29)."""
    a, b = rng.randint(2, 20), rng.randint(1, 9)
    subtract = rng.random() < 0.5 and a > b
    phrasing = rng.choice(SUBTRACTIONS if subtract else ADDITIONS)
    text = phrasing.format(who=rng.choice(PEOPLE), what=rng.choice(THINGS), a=a, b=b)
    return text, str(a - b if subtract else a + b)


MAX_OPERAND = 30
# Phrasings of one problem; {a}, {b} are operands, {op} is "+"/"-" and {word} is "plus"/"minus".
PHRASINGS = (
    "What is {a}{op}{b}?",
    "Compute {a}{op}{b}.",
    "Calculate {a} {word} {b}.",
    "{a}{op}{b} = ?",
)


@dataclass(frozen=True)
class ToyProblem:
    """One problem: its text, the expression the model writes out, and the gold answer."""

    problem: str
    expression: str
    answer: str


def make_problem(rng: random.Random) -> ToyProblem:
    """A random sum or (non-negative) difference of two numbers in 0..MAX_OPERAND."""
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    phrasing = rng.choice(PHRASINGS)
    text = phrasing.format(a=a, b=b, op=op, word="plus" if op == "+" else "minus")
    return ToyProblem(text, f"{a}{op}{b}", str(a + b if op == "+" else a - b))


def generate_problems(n: int, seed: int) -> list[ToyProblem]:
    """`n` problems drawn with a private RNG seeded by `seed` (the same seed gives the same list)."""
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def toy_problem(rng: random.Random) -> tuple[str, str]:
    """The toy model's a±b question (steerlens.toy pretrains the model that answers it)."""
    problem = make_problem(rng)
    return problem.problem, problem.answer


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "toy-arith": toy_problem,
    "word-arith": word_problem,
}


def generator_of(source: str) -> str | None:
    """The generator a source names (`word-arith`, `word-arith-heldout`), None for files and hub ids."""
    name = source.removesuffix(HELDOUT)
    return name if name in GENERATORS else None


def generate(source: str, n: int, seed: int = 0, heldout: bool = False) -> list[Problem]:
    """`n` problems of a generated source; the same (source, seed) always gives the same list."""
    name = generator_of(source)
    if name is None:
        raise DataError(f"{source!r} is not a generated set; known: {', '.join(GENERATORS)}")
    heldout = heldout or source.endswith(HELDOUT)
    rng = random.Random(seed + (HELDOUT_SEED if heldout else 0))
    make = GENERATORS[name]
    return [Problem(str(i), *make(rng)) for i in range(n)]


def write_problems(source: str, path: str | Path, n: int, seed: int = 0, heldout: bool = False) -> Path:
    """Write a generated set as JSONL rows {"problem", "answer"}, atomically."""
    path = Path(path)
    rows = generate(source, n, seed, heldout)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n" for p in rows))
    return path


def materialize(source: str, directory: Path, n: int, seed: int = 0, heldout: bool = False) -> str:
    """The file of a generated source, written into `directory` on first use; any other source unchanged."""
    if generator_of(source) is None:
        return source
    heldout = heldout or source.endswith(HELDOUT)
    path = directory / f"{source.removesuffix(HELDOUT)}{HELDOUT if heldout else ''}.jsonl"
    if not path.is_file():
        write_problems(source, path, n, seed, heldout)
    return str(path)
