"""`steerlens eval`: metric maths, every sample file, toy model before/after training, resume after a kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from steerlens.config import build_config
from steerlens.data import load_problems
from steerlens.evaluation import EvalConfig, benchmark_scores, combine_runs, evaluate, parse_benchmark, summarize
from steerlens.evaluation.benchmarks import SIX

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "samples"


def verdict_rows(benchmark: str, seed: int, verdicts: list[list[bool]]) -> list[dict]:
    return [
        {
            "benchmark": benchmark,
            "seed": seed,
            "index": i,
            "sample": j,
            "correct": ok,
            "tokens": 10 + j,
            "truncated": False,
        }
        for i, problem in enumerate(verdicts)
        for j, ok in enumerate(problem)
    ]


def test_pass_at_1_and_avg_at_k_from_constructed_verdicts() -> None:
    rows = verdict_rows("math500", 0, [[True], [False], [True], [True]])
    rows += verdict_rows("aime24", 0, [[True, False, False, False], [True, True, True, True]])
    scores = benchmark_scores(pd.DataFrame(rows)).set_index("benchmark")
    assert scores.loc["math500", "score"] == pytest.approx(3 / 4)
    assert scores.loc["aime24", "score"] == pytest.approx((1 / 4 + 1) / 2)  # per-problem means, then mean
    assert scores.loc["aime24", "samples"] == 8 and scores.loc["aime24", "problems"] == 2


def test_mean_std_over_seeds_and_the_six_benchmark_average() -> None:
    per_seed = {0: [1.0, 0.5, 0.25, 0.75, 0.5, 0.0], 1: [0.5, 0.5, 0.75, 0.25, 0.5, 1.0]}
    scores = pd.DataFrame(
        [
            {"benchmark": b, "seed": seed, "score": s, "problems": 4, "samples": 4}
            for seed, values in per_seed.items()
            for b, s in zip(SIX, values)
        ]
        + [{"benchmark": "gsm8k", "seed": 0, "score": 0.9, "problems": 4, "samples": 16}]
    )
    summary = summarize(scores).set_index("benchmark")
    assert summary.loc["aime24", "mean"] == pytest.approx(0.75)
    assert summary.loc["aime24", "std"] == pytest.approx(pd.Series([1.0, 0.5]).std(ddof=1))
    averages = [sum(v) / 6 for v in per_seed.values()]
    assert summary.loc["Average", "mean"] == pytest.approx(sum(averages) / 2)
    assert summary.loc["Average", "std"] == pytest.approx(pd.Series(averages).std(ddof=1))
    assert summary.loc["gsm8k", "std"] == 0.0 and summary.loc["gsm8k", "seeds"] == 1
    assert list(summary.index)[-1] == "Average"


def test_without_all_six_there_is_no_average() -> None:
    scores = pd.DataFrame([{"benchmark": "aime24", "seed": 0, "score": 0.5, "problems": 2, "samples": 2}])
    assert "Average" not in set(summarize(scores)["benchmark"])


@pytest.mark.parametrize(
    "name, count, first_answer",
    [
        ("aime24.jsonl", 8, "56"),
        ("aime25.jsonl", 8, "\\frac{1}{4}"),
        ("amc23.jsonl", 8, "14"),
        ("math500.jsonl", 24, "56"),
        ("minerva.parquet", 24, "56"),
        ("olympiadbench.csv", 24, "56"),
        ("gsm8k.jsonl", 6, "29"),
        ("math.json", 12, "56"),
    ],
)
def test_every_sample_file_reads_with_its_protocol(name: str, count: int, first_answer: str) -> None:
    spec = parse_benchmark(str(SAMPLES / name))
    problems = load_problems(spec.source, dataset=spec.name)
    assert len(problems) == count and problems[0].answer == first_answer
    assert spec.name == Path(name).stem and spec.protocol.k == (
        32 if spec.name.startswith(("aime", "amc")) else 4 if spec.name in ("gsm8k", "math") else 1
    )
    assert parse_benchmark(f"MATH-500={SAMPLES / name}").name == "math500"


def eval_args(out: Path, *extra: str) -> list[str]:
    return ["--engine", "hf", "--no-progress", "--out-dir", str(out), *extra]


@pytest.mark.slow
def test_trained_vectors_score_higher_than_the_base_model(tmp_path: Path, trained_toy_vectors: Path) -> None:
    common = ("--decoding", "greedy", "--limit", "64", "--max-new-tokens", "40")
    base = evaluate(build_config(EvalConfig, None, eval_args(tmp_path / "base", *common)))
    steered = evaluate(
        build_config(
            EvalConfig,
            None,
            eval_args(tmp_path / "steered", *common, "--model-label", "toy", "--vectors", str(trained_toy_vectors)),
        )
    )
    before = base["summary"].set_index("benchmark").loc["toy-arith", "mean"]
    after = steered["summary"].set_index("benchmark").loc["toy-arith", "mean"]
    assert after > before + 0.2, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "steered" / "samples" / "toy-arith.seed0.jsonl").open()]
    assert len(rows) == 64 and {"prompt", "completion", "extracted", "gold", "correct"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) / 64 == pytest.approx(after)

    table = combine_runs([tmp_path / "base", tmp_path / "steered"], tmp_path / "table1")
    assert list(table.index) == [("toy-arith", "base"), ("toy", "steering")]  # --model-label names the row's model
    assert table.loc[("toy", "steering"), "toy-arith"] == f"{100 * after:.1f} ± 0.0"
    markdown = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in (tmp_path / "table1.md").read_text().splitlines()
    ]
    assert markdown[0][:2] == ["model", "setup"] and markdown[3] == ["toy", "steering", f"{100 * after:.1f} ± 0.0"]
    assert "plotly" in (tmp_path / "table1.html").read_text()


def test_killed_evaluation_resumes_to_the_same_samples(tmp_path: Path) -> None:
    bench = tmp_path / "math500.jsonl"
    bench.write_text((SAMPLES / "math500.jsonl").read_text())
    args = [
        "--benchmarks",
        str(bench),
        "--decoding",
        "sample",
        "--samples",
        "2",
        "--seeds",
        "0,1",
        "--chunk-problems",
        "2",
        "--max-new-tokens",
        "16",
    ]
    straight = evaluate(build_config(EvalConfig, None, eval_args(tmp_path / "straight", *args)))

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "steerlens.cli", "eval", *eval_args(killed, *args)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "samples" / "math500.seed0.jsonl"
    deadline = time.time() + 300
    while (
        not (first.is_file() and len(first.read_text().splitlines()) >= 8)
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.02)
    assert proc.poll() is None, "the evaluation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with first.open("a") as handle:  # as if the kill had landed mid-write
        handle.write('{"benchmark": "math500", "seed": 0, "ind')
    assert not (killed / "scores.csv").exists()

    done_before = len(first.read_text().splitlines()) - 1
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for seed in (0, 1):
        a = (tmp_path / "straight" / "samples" / f"math500.seed{seed}.jsonl").read_text().splitlines()
        b = (killed / "samples" / f"math500.seed{seed}.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in a] == [json.loads(x) for x in b]
    assert done_before >= 8
    assert pd.read_csv(killed / "scores.csv").equals(straight["scores"])


def test_changed_settings_in_the_same_directory_are_refused(tmp_path: Path) -> None:
    bench = f"aime24={SAMPLES / 'aime24.jsonl'}"
    evaluate(
        build_config(
            EvalConfig,
            None,
            eval_args(tmp_path, "--benchmarks", bench, "--decoding", "greedy", "--max-new-tokens", "4"),
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "steerlens.cli",
            "eval",
            *eval_args(tmp_path, "--benchmarks", bench, "--decoding", "greedy", "--max-new-tokens", "8"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "max_new_tokens: 4 -> 8" in result.stderr and "Traceback" not in result.stderr
    saved = json.loads((tmp_path / "eval_config.json").read_text())
    del saved["answer_fallback"]  # a run written before that field existed had its default
    (tmp_path / "eval_config.json").write_text(json.dumps(saved))
    evaluate(
        build_config(
            EvalConfig,
            None,
            eval_args(tmp_path, "--benchmarks", bench, "--decoding", "greedy", "--max-new-tokens", "4"),
        )
    )


def test_bad_benchmark_file_is_reported_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "steerlens.cli",
            "eval",
            *eval_args(tmp_path / "out", "--benchmarks", str(tmp_path / "missing.jsonl")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "missing.jsonl does not exist" in result.stderr


def test_verdicts_follow_the_template_answer_format(tmp_path: Path) -> None:
    """With the r1 template the answer is read from `<answer>` blocks, for the verdict as for `extracted`."""
    from steerlens.reward import extract_answer, is_correct

    evaluate(
        build_config(
            EvalConfig,
            None,
            eval_args(
                tmp_path,
                "--benchmarks",
                f"aime24={SAMPLES / 'aime24.jsonl'}",
                "--template",
                "r1",
                "--decoding",
                "greedy",
                "--max-new-tokens",
                "8",
                "--max-model-len",  # r1's prompts (~440 tokens) are longer than the toy model's 256 positions
                "1024",
            ),
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "samples" / "aime24.seed0.jsonl").open()]
    assert len(rows) == 8 and all(r["prompt"].startswith("A conversation") for r in rows)
    for r in rows:
        assert r["extracted"] == extract_answer(r["completion"], "answer_tag")
        assert r["correct"] == is_correct(r["completion"], r["gold"], "answer_tag")


def test_several_named_vector_files_are_evaluated_in_one_pass(tmp_path: Path) -> None:
    import torch

    from steerlens.models import config_shape
    from steerlens.vectors import SteeringVectors

    shape = config_shape("toy-arith")
    files = {}
    for name, seed in (("up", 1), ("down", 2)):
        values = torch.randn(shape.num_layers, shape.hidden_size, generator=torch.Generator().manual_seed(seed))
        files[name] = SteeringVectors(values, tuple(range(shape.num_layers)), shape.num_layers).save(
            tmp_path / f"{name}.safetensors"
        )
    common = ["--decoding", "greedy", "--limit", "6", "--max-new-tokens", "12"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "steerlens.cli",
            "eval",
            *eval_args(tmp_path / "many", *common, "--vectors", f"up={files['up']},down={files['down']}"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(tmp_path / "many" / "table.csv")
    assert list(table["setup"]) == ["base", "up", "down"]
    alone = evaluate(
        build_config(EvalConfig, None, eval_args(tmp_path / "alone", *common, "--vectors", str(files["down"])))
    )
    rows = [json.loads(line) for line in (tmp_path / "many" / "down" / "samples" / "toy-arith.seed0.jsonl").open()]
    assert [r["completion"] for r in rows] == [
        json.loads(line)["completion"] for line in (tmp_path / "alone" / "samples" / "toy-arith.seed0.jsonl").open()
    ]
    assert pd.read_csv(tmp_path / "many" / "down" / "scores.csv").equals(alone["scores"])
    bad = subprocess.run(
        [sys.executable, "-m", "steerlens.cli", "eval", *eval_args(tmp_path / "bad", "--vectors", "a=x,a=y")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "distinct names" in bad.stderr and "Traceback" not in bad.stderr


def test_one_named_set_is_reported_beside_the_base_model_unless_no_base(tmp_path: Path) -> None:
    """One rule for named sets: the base model is evaluated beside them, one named set or several."""
    import torch

    from steerlens.models import config_shape
    from steerlens.vectors import SteeringVectors

    shape = config_shape("toy-arith")
    values = torch.randn(shape.num_layers, shape.hidden_size, generator=torch.Generator().manual_seed(3))
    path = SteeringVectors(values, tuple(range(shape.num_layers)), shape.num_layers).save(tmp_path / "v.safetensors")
    common = ["--decoding", "greedy", "--limit", "4", "--max-new-tokens", "8", "--vectors", f"up={path}"]
    with_base = evaluate(build_config(EvalConfig, None, eval_args(tmp_path / "one", *common)))
    assert list(with_base["summary"]["setup"]) == ["base", "up"]
    alone = evaluate(build_config(EvalConfig, None, eval_args(tmp_path / "one", *common, "--no-base")))
    assert list(alone["summary"]["setup"]) == ["up"]  # the same folder: the set's samples are reused
    assert (tmp_path / "one" / "base" / "scores.csv").is_file()
