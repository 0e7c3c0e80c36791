"""The verifiable reward: answer extraction and math-verify equivalence, through the process pool too."""

from __future__ import annotations

import pytest

from steerlens.reward import RewardScorer, extract_answer, extract_boxed, extract_last_number, is_correct


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("nested \\boxed{\\frac{1}{2}} ok", "\\frac{1}{2}"),
        ("\\fbox{7}", "7"),
        ("no box here, 42", None),
        ("unbalanced \\boxed{3", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_answer_tag_format_reads_the_last_answer_block() -> None:
    text = "<think>maybe 3</think> <answer>\\boxed{5}</answer> <answer>6</answer>"
    assert extract_answer(text, "answer_tag") == "6"
    assert extract_answer("<answer>\\boxed{5}</answer>", "answer_tag") == "5"
    assert extract_answer("\\boxed{5}", "answer_tag") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7 apples.", "7"),
        ("#### 1,234", "1234"),
        ("she has -2.5 left, or 3/4 of it", "3/4"),
        ("no digits", None),
    ],
)
def test_extract_last_number(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


def test_last_number_fallback_applies_only_without_a_formatted_answer() -> None:
    assert extract_answer("3 + 4 = 7. #### 7 The answer is \\boxed{}.", "boxed", "last_number") == "7"
    assert extract_answer("7 apples, so \\boxed{8} (I checked 9 times)", "boxed", "last_number") == "8"
    assert extract_answer("<answer>5</answer> 6", "answer_tag", "last_number") == "5"
    assert is_correct("Tom has 3 + 4 = 7 apples.", "7", fallback="last_number")
    assert not is_correct("Tom has 3 + 4 = 7 apples.", "7")
    with RewardScorer(fallback="last_number", in_process_below=1) as scorer:  # through the process pool
        assert scorer.score(["so 7 apples", "so \\boxed{7}", "so 6", "none"], ["7"] * 4) == [True, True, False, False]
        assert [scorer.formatted(t) for t in ("so 7", "\\boxed{7}", "\\boxed{}")] == [False, True, False]


@pytest.mark.parametrize(
    "completion, gold, ok",
    [
        ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
        ("\\boxed{0.5}", "\\frac12", True),
        ("\\boxed{2}", "3", False),
        ("The answer is 3.", "3", False),  # right number, not boxed: no reward
        ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
        ("\\boxed{\\sqrt{4}}", "2", True),
        ("\\boxed{(1, 2]}", "(1,2]", True),
        ("\\boxed{[1, 2]}", "(1,2]", False),  # an interval's brackets matter
        ("\\boxed{3} then \\boxed{4}", "4", True),  # the last box counts
    ],
)
def test_math_verify_decides_equivalence(completion: str, gold: str, ok: bool) -> None:
    assert is_correct(completion, gold) is ok


def test_scorer_pool_agrees_with_in_process_verdicts() -> None:
    completions = [f"x \\boxed{{{i % 7}}}" for i in range(40)] + ["nothing", "\\boxed{}"]
    golds = [str(i % 5) for i in range(40)] + ["1", "1"]
    expected = [is_correct(c, g) for c, g in zip(completions, golds)]
    assert any(expected) and not all(expected)
    with RewardScorer(workers=2) as scorer:
        assert scorer.score(completions, golds) == expected
        assert scorer.score(completions[:3], golds[:3]) == expected[:3]  # small batch: in-process
    with pytest.raises(ValueError, match="2 completions for 1 gold"):
        RewardScorer().score(["a", "b"], ["1"])


def test_huge_outputs_are_scored_quickly() -> None:
    import time

    huge = "blah " * 400_000 + "\\boxed{7}"  # 2 MB: only the tail can hold the final answer
    start = time.perf_counter()
    with RewardScorer(workers=2) as scorer:
        verdicts = scorer.score([huge] * 8 + ["{" * 100_000], ["7"] * 8 + ["1"])
    assert verdicts == [True] * 8 + [False]
    assert time.perf_counter() - start < 60
