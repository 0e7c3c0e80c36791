"""Fault injection at the engine: over-long problems, a stray weights file in a model's folder, and a model
vLLM refuses, through the real command line (and `LocalServer` for serving), with real files and engines.

Each stops in one `error:` line that names what is wrong and where (exit code 2, no traceback on the
terminal), or, where the user asked for it, carries on and says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from steerlens.cli import app
from steerlens.errors import ModelError
from steerlens.models import WEIGHTS_INDEX, stray_weight_files
from steerlens.serving import LocalServer, ServerError, free_port
from steerlens.tiny import byte_tokenizer, tiny_config
from steerlens.vectors import SteeringVectors

# printed whatever steerlens does: vLLM's import notice on this machine, transformers' bar as train loads the HF model
NOTICES = ("Triton is installed", "Loading weights")
SHORT = ["--max-new-tokens", "4", "--no-progress"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def one_line(code: int, output: str, *needles: str) -> str:
    """Exit code 2 and one line, `error: ...` with every needle (vLLM's import notice aside), no traceback."""
    lines = [line for line in output.strip().splitlines() if not line.startswith(NOTICES)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
    assert "Traceback" not in output and all(needle in lines[0] for needle in needles), lines[0]
    return lines[0]


# ---- over-long problems (item 1) -------------------------------------------------------------------
@pytest.fixture
def long_benchmark(tmp_path: Path) -> Path:
    """Four problems; problem 2 is ~300 KB, far past the toy model's context of 256 tokens."""
    rows = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)]
    rows[2]["problem"] = "What is 1+1? " * 23_000
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_an_over_long_problem_stops_evaluation_in_one_line_before_the_engine(
    tmp_path: Path, long_benchmark: Path, engine: str
) -> None:
    code, output = run(
        "eval", "--engine", engine, "--benchmarks", f"mine={long_benchmark}", "--out-dir", str(tmp_path / "e"), *SHORT
    )
    line = one_line(code, output, f"{long_benchmark}: 1 of 4 prompts", "problem 2 (", "--too-long skip")
    assert "the model's context of 256 tokens (at most 252 prompt tokens)" in line
    assert not (tmp_path / "e" / "samples").exists()


def test_an_over_long_training_problem_stops_training_in_one_line(tmp_path: Path, long_benchmark: Path) -> None:
    code, output = run(
        "train",
        "--engine",
        "hf",
        "--data",
        str(long_benchmark),
        "--eval-data",
        "null",
        "--out-dir",
        str(tmp_path),
        *SHORT,
    )
    one_line(code, output, f"{long_benchmark}: 1 of 4 prompts", "problem 2 (")


def test_a_skipped_over_long_problem_is_scored_wrong_and_listed(tmp_path: Path, long_benchmark: Path) -> None:
    out = tmp_path / "e"
    args = ["eval", "--engine", "hf", "--benchmarks", f"mine={long_benchmark}", "--decoding", "greedy", *SHORT]
    code, output = run(*args, "--too-long", "skip", "--out-dir", str(out))
    assert code == 0, output
    warning = next(line for line in output.splitlines() if "prompts leave no room" in line)
    assert "problem 2 (" in warning and "skipped them" in warning
    rows = [json.loads(line) for line in (out / "samples" / "mine.seed0.jsonl").read_text().splitlines()]
    assert sorted(row["index"] for row in rows) == [0, 1, 2, 3]
    (skipped,) = [row for row in rows if row["index"] == 2]
    assert skipped["correct"] is False and skipped["skipped"].startswith("too long: ") and skipped["completion"] == ""
    assert all("skipped" not in row for row in rows if row["index"] != 2)


# ---- a stray weights file (item 5) -----------------------------------------------------------------
def test_a_vectors_file_in_the_model_folder_is_named_before_any_engine_starts(
    tmp_path: Path, tiny_qwen_dir: Path
) -> None:
    model = Path(shutil.copytree(tiny_qwen_dir, tmp_path / "model"))
    stray = SteeringVectors(torch.randn(4, 128), (0, 1, 2, 3), 4).save(model / "vectors.safetensors")
    needles = (f"{stray} is a steerlens vectors file, inside the model folder {model}", "move it out of the folder")
    code, output = run("eval", "--engine", "vllm", "--model", str(model), "--out-dir", str(tmp_path / "e"), *SHORT)
    one_line(code, output, *needles)
    one_line(*run("serve", "--model", str(model)), *needles)
    (model / WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"lm_head.weight": "model.safetensors"}}))
    assert stray_weight_files(model) == []  # vLLM loads only the shards an index lists
    (model / WEIGHTS_INDEX).unlink()
    stray.rename(model / "adapter.safetensors")
    shutil.copy(model / "model.safetensors", model / "copy.safetensors")
    assert [(p.name, what.split(",")[0]) for p, what in stray_weight_files(model)] == [
        ("adapter.safetensors", "a steerlens vectors file"),
        ("copy.safetensors", "not a shard of the model (its weights are model.safetensors)"),
    ]


# ---- a model vLLM refuses (item 7) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def refused_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma2 with untied embeddings: HF loads it, vLLM 0.32 has no `lm_head` for it."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("gemma2")
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("refused") / "gemma2-untied"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


CAUSE = "There is no module or parameter named 'lm_head' in SteeredGemma2ForCausalLM"
COMMANDS = {
    "eval": ["eval", "--benchmarks", "toy-arith", "--limit", "2", "--decoding", "greedy"],
    "train": ["train", "--steps", "1", "--prompts-per-step", "2", "--generations", "2", "--eval-data", "null"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_refused_model_is_one_line_with_the_cause_and_the_log(
    tmp_path: Path, refused_model: Path, command: str
) -> None:
    """A real process: the engine processes' tracebacks must not reach its stdout or stderr, only the log."""
    args = [*COMMANDS[command], "--engine", "vllm", "--model", str(refused_model), "--out-dir", str(tmp_path), *SHORT]
    done = subprocess.run(
        [sys.executable, "-m", "steerlens.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )
    line = one_line(done.returncode, done.stdout + done.stderr, f"vLLM cannot run {refused_model}", CAUSE)
    assert "ERROR" not in done.stdout + done.stderr and len(line) < 600, line
    log = Path(line.rsplit("(engine log: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text() and CAUSE in log.read_text()


@pytest.mark.slow
def test_a_server_that_refuses_the_model_says_why(tmp_path: Path, refused_model: Path) -> None:
    with pytest.raises(ServerError) as refused:
        LocalServer(str(refused_model), log_path=tmp_path / "serve.log", max_model_len=256)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "no module or parameter named 'lm_head' in Gemma2ForCausalLM" in message
    assert message.endswith(f"(log: {tmp_path / 'serve.log'})") and "Traceback" in (tmp_path / "serve.log").read_text()


@pytest.mark.slow
def test_serve_on_a_refused_model_is_one_line_with_the_cause_and_the_log(tmp_path: Path, refused_model: Path) -> None:
    """`steerlens serve` runs the server as its child: the tracebacks of the server's processes go to the log."""
    log = tmp_path / "serve.log"
    args = ["serve", "--model", str(refused_model), "--port", str(free_port()), "--max-model-len", "256"]
    done = subprocess.run(
        [sys.executable, "-m", "steerlens.cli", *args, "--log", str(log)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    needles = (
        f"vllm serve {refused_model} did not start",
        "no module or parameter named 'lm_head' in Gemma2ForCausalLM",
    )
    line = one_line(done.returncode, done.stdout + done.stderr, *needles)
    assert line in done.stderr and line.endswith(f"(log: {log})") and len(line) < 600, line
    assert "ERROR" not in done.stdout + done.stderr and "Traceback" in log.read_text()


def test_analyze_needs_no_engine_for_a_model_vllm_refuses(tmp_path: Path, refused_model: Path) -> None:
    vectors = SteeringVectors(torch.randn(4, 128), (0, 1, 2, 3), 4).save(tmp_path / "v.safetensors")
    code, output = run(
        "analyze", str(vectors), "--model", str(refused_model), "--analyses", "stats", "--out", str(tmp_path / "r")
    )
    assert code == 0 and (tmp_path / "r" / "report.html").is_file(), output
    assert ModelError.__name__ not in output and "ERROR" not in output
