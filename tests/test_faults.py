"""Fault injection: damaged checkpoints, torn logs, changed settings, non-finite vectors, full disks.

Every case goes through the real command line. A refusal is exit code 2 and one `error:` line naming
the file; no run directory loses a byte it had; nothing is written from non-finite inputs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from steerlens.cli import app
from steerlens.rl.checkpoint import MANIFEST, newest_valid
from steerlens.vectors import FORMAT, TENSOR_KEY, ModelShape, SteeringVectors

TRAIN = [
    "train",
    "--engine",
    "hf",
    "--save-every",
    "2",
    "--prompts-per-step",
    "4",
    "--generations",
    "2",
    "--max-new-tokens",
    "8",
    "--eval-data",
    "null",
    "--no-progress",
]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def assert_refused(code: int, output: str, names: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and names in errors[0] and "Traceback" not in output, output


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step toy run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("faults") / "run"
    code, output = run(*TRAIN, "--steps", "4", "--out-dir", str(out))
    assert code == 0, output
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def metric_lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


# ---- checkpoints -----------------------------------------------------------------------------------
DAMAGE = {
    "manifest missing": lambda d: (d / MANIFEST).unlink(),
    "state.json missing": lambda d: (d / "state.json").unlink(),
    "state.json garbled": lambda d: (d / "state.json").write_text("{not json"),
    "tensor file truncated": lambda d: (d / "trainable.safetensors").write_bytes(
        (d / "trainable.safetensors").read_bytes()[:40]
    ),
    "tensor file flipped": lambda d: (d / "optimizer.safetensors").write_bytes(
        (d / "optimizer.safetensors").read_bytes()[:-1] + b"\x00"
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_skips_a_damaged_newest_checkpoint_and_says_why(run_copy: Path, damage: str) -> None:
    before = metric_lines(run_copy)
    DAMAGE[damage](run_copy / "checkpoints" / "step_000004")
    code, output = run(*TRAIN, "--steps", "4", "--out-dir", str(run_copy), "--resume")
    assert code == 0, output
    assert "skipped checkpoint step_000004" in output and "step_000002 (step 2)" in output, output
    after = metric_lines(run_copy)
    assert after[:2] == before[:2] and [json.loads(line)["step"] for line in after] == [0, 1, 2, 3]


@pytest.mark.parametrize("pointer", ["missing", "dangling"])
def test_resume_does_not_need_the_latest_pointer(run_copy: Path, pointer: str) -> None:
    latest = run_copy / "checkpoints" / "latest"
    latest.unlink() if pointer == "missing" else latest.write_text("step_000099\n")
    before = snapshot(run_copy / "checkpoints")
    code, output = run(*TRAIN, "--steps", "4", "--out-dir", str(run_copy), "--resume")
    assert code == 0 and "step_000004 (step 4)" in output, output
    assert len(metric_lines(run_copy)) == 4
    assert {k: v for k, v in snapshot(run_copy / "checkpoints").items() if k.startswith("step_")} == {
        k: v for k, v in before.items() if k.startswith("step_")
    }


def unverifiable(run: Path) -> None:
    for step in ("step_000002", "step_000004"):
        (run / "checkpoints" / step / MANIFEST).unlink()


def checkpointless(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")


@pytest.mark.parametrize(
    "damage, why",
    [(unverifiable, "the checkpoint is incomplete"), (checkpointless, "the run finished without writing one")],
    ids=["none-verifies", "finished-without-any"],
)
def test_nothing_valid_left_stops_without_touching_the_run(
    run_copy: Path, damage: Callable[[Path], None], why: str
) -> None:
    damage(run_copy)
    before = snapshot(run_copy)
    code, output = run(*TRAIN, "--steps", "4", "--out-dir", str(run_copy), "--resume")
    assert_refused(code, output, str(run_copy))
    assert "no checkpoint can be resumed" in output and why in output and snapshot(run_copy) == before


def test_run_stopped_before_its_first_checkpoint_starts_again(run_copy: Path) -> None:
    checkpointless(run_copy)
    (run_copy / "summary.json").unlink()
    step0 = metric_lines(run_copy)[0]
    (run_copy / "metrics.jsonl").write_text(step0 + "\n")
    code, output = run(*TRAIN, "--steps", "4", "--out-dir", str(run_copy), "--resume")
    assert code == 0 and "stopped before its first checkpoint" in output, output

    def untimed(line: str) -> dict[str, object]:
        return {k: v for k, v in json.loads(line).items() if not k.startswith("time_")}

    rows = [untimed(line) for line in metric_lines(run_copy)]
    assert [row["step"] for row in rows] == [0, 1, 2, 3] and rows[0] == untimed(step0)  # step 0 again, once
    assert (run_copy / "summary.json").is_file()


def test_torn_metrics_tail_is_dropped_on_resume(run_copy: Path) -> None:
    shutil.rmtree(run_copy / "checkpoints" / "step_000004")
    with open(run_copy / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "reward_m')
    code, output = run(*TRAIN, "--steps", "4", "--out-dir", str(run_copy), "--resume")
    assert code == 0 and "dropped a torn last line" in output, output
    assert [json.loads(line)["step"] for line in metric_lines(run_copy)] == [0, 1, 2, 3]


def test_changed_settings_are_refused_unless_allowed_and_then_recorded(run_copy: Path) -> None:
    before = snapshot(run_copy)
    code, output = run(*TRAIN, "--steps", "6", "--lr", "0.01", "--out-dir", str(run_copy), "--resume")
    assert_refused(code, output, str(run_copy))
    assert "lr: 0.05 -> 0.01" in output and "steps: 4 -> 6" in output and snapshot(run_copy) == before
    code, output = run(
        *TRAIN, "--steps", "6", "--lr", "0.01", "--out-dir", str(run_copy), "--resume", "--allow-config-change"
    )
    assert code == 0, output
    (change,) = [json.loads(line) for line in (run_copy / "config_changes.jsonl").read_text().splitlines()]
    assert change["step"] == 4 and change["changes"]["lr"] == [0.05, 0.01]
    assert len(metric_lines(run_copy)) == 6


def test_an_existing_run_is_refused_before_the_model_loads(run_copy: Path) -> None:
    before = snapshot(run_copy)
    code, output = run(*TRAIN, "--steps", "4", "--model", "/no/such/model", "--out-dir", str(run_copy))
    assert_refused(code, output, str(run_copy))  # the run directory, not the missing model, is reported
    assert "already holds a run" in output and snapshot(run_copy) == before


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    code, output = run(*TRAIN, "--steps", "6", "--keep-last", "1", "--out-dir", str(tmp_path / "run"))
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()) == ["step_000006"]


# ---- full disk -------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root can mount one here; elsewhere the test is skipped with the reason)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    """Take every free byte of `disk` (unbuffered: nothing is left to flush, and fail, when the file closes)."""
    with open(disk / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass


def test_full_disk_during_training_is_one_line_and_keeps_checkpoints(finished_run: Path, small_disk: Path) -> None:
    out = Path(shutil.copytree(finished_run, small_disk / "run"))
    fill(small_disk)
    before = snapshot(out)
    code, output = run(*TRAIN, "--steps", "6", "--out-dir", str(out), "--resume", "--allow-config-change")
    assert_refused(code, output, str(out))
    assert "No space left on device" in output
    assert snapshot(out) == before and newest_valid(out)[0] == out / "checkpoints" / "step_000004"


EVAL = [
    "eval",
    "--engine",
    "hf",
    "--benchmarks",
    "toy-arith",
    "--limit",
    "6",
    "--decoding",
    "sample",
    "--samples",
    "2",
    "--seeds",
    "0",
    "--chunk-problems",
    "2",
    "--max-new-tokens",
    "8",
    "--no-progress",
]


def test_a_problem_is_done_only_when_all_its_samples_are_on_disk(tmp_path: Path) -> None:
    code, output = run(*EVAL, "--out-dir", str(tmp_path / "straight"))
    assert code == 0, output
    samples = tmp_path / "straight" / "samples" / "toy-arith.seed0.jsonl"
    expected = samples.read_text()
    lines = expected.splitlines()
    samples.write_text("\n".join(lines[:-1]) + "\n")  # the disk filled after the last problem's first sample
    code, output = run(*EVAL, "--out-dir", str(tmp_path / "straight"))
    assert code == 0 and "1 problem(s) with fewer than 2 samples" in output, output
    assert samples.read_text() == expected


def test_full_disk_during_evaluation_is_one_line_and_leaves_no_partial_problem(small_disk: Path) -> None:
    out = small_disk / "eval"
    code, output = run(*EVAL, "--out-dir", str(out))
    assert code == 0, output
    shutil.rmtree(out / "samples")
    (out / "summary.csv").unlink()
    fill(small_disk)
    code, output = run(*EVAL, "--out-dir", str(out))
    assert_refused(code, output, str(out))
    samples = out / "samples" / "toy-arith.seed0.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()] if samples.exists() else []
    assert all(sum(r["index"] == i for r in rows) == 2 for i in {r["index"] for r in rows})


# ---- vectors ---------------------------------------------------------------------------------------
def bad_vectors(path: Path, values: torch.Tensor, **header: str) -> Path:
    meta = {
        "format": FORMAT,
        "layers": json.dumps(list(range(values.shape[0]))),
        "num_layers": "4",
        "hidden_size": str(values.shape[1]),
        **header,
    }
    save_file({TENSOR_KEY: values}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "nan",
        "inf",
        "int values",
        "layers null",
        "layers a string",
        "layers floats",
        "num_layers not a number",
        "provenance not an object",
    ],
)
def test_bad_vectors_files_are_refused_everywhere_with_nothing_written(tmp_path: Path, case: str) -> None:
    values = torch.randn(4, 128)
    header: dict[str, str] = {}
    if case == "nan":
        values[2, 5] = float("nan")
    elif case == "inf":
        values[0, 0] = float("inf")
    elif case == "int values":
        values = torch.ones(4, 128, dtype=torch.int32)
    else:
        header = {
            "layers null": {"layers": "null"},
            "layers a string": {"layers": '"0,1,2,3"'},
            "layers floats": {"layers": "[0.5, 1, 2, 3]"},
            "num_layers not a number": {"num_layers": "four"},
            "provenance not an object": {"provenance": "[1]"},
        }[case]
    path = bad_vectors(tmp_path / "bad.safetensors", values, **header)
    code, output = run(*EVAL, "--vectors", str(path), "--out-dir", str(tmp_path / "eval"))
    assert_refused(code, output, str(path))
    assert not (tmp_path / "eval").exists()
    code, output = run(
        "analyze", str(path), "--model", "toy-arith", "--out", str(tmp_path / "report"), "--analyses", "stats"
    )
    assert_refused(code, output, str(path))
    assert not (tmp_path / "report").exists()


def test_training_never_writes_non_finite_vectors() -> None:
    with pytest.raises(Exception, match="not finite"):
        SteeringVectors(torch.full((1, 8), float("nan")), (0,), 2)
    assert SteeringVectors.zeros(ModelShape(2, 8)).values.isfinite().all()


# ---- gold answers ----------------------------------------------------------------------------------
def test_unreadable_gold_answers_are_reported_before_the_run(tmp_path: Path) -> None:
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)]
    rows += [{"question": "Name a colour.", "answer": "\\frac{"}, {"question": "And another?", "answer": "\\sqrt{"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "eval",
        "--engine",
        "hf",
        "--benchmarks",
        f"gsm8k={data}",
        "--decoding",
        "greedy",
        "--seeds",
        "0",
        "--max-new-tokens",
        "8",
        "--no-progress",
    ]
    code, output = run(*args, "--out-dir", str(tmp_path / "refused"))
    assert_refused(code, output, str(data))
    assert "2 of 6 gold answers" in output and "--bad-answers drop" in output
    assert not (tmp_path / "refused" / "samples").exists()
    code, output = run(*args, "--bad-answers", "drop", "--out-dir", str(tmp_path / "dropped"))
    assert code == 0 and "dropped them" in output, output
    written = (tmp_path / "dropped" / "samples" / "gsm8k.seed0.jsonl").read_text().splitlines()
    assert len(written) == 4
