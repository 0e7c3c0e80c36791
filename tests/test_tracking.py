"""Experiment tracking (`--report-to`): TensorBoard event files and an offline W&B run, read back with the
libraries' own readers and compared with `metrics.jsonl` and `summary.json`, across a resume; rank 0 only;
a missing library refused in one line. W&B never connects anywhere."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from steerlens.cli import app
from steerlens.config import build_config
from steerlens.data.generated import write_problems
from steerlens.rl.config import TrainConfig
from steerlens.rl.job import train
from steerlens.rl.tracking import TrackingError, make_trackers, wandb_files, wandb_records

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


@pytest.fixture
def offline_wandb(monkeypatch: pytest.MonkeyPatch):
    """W&B offline and quiet, its server pointed at a local socket that counts every connection attempt."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB__DISABLE_STATS": "true",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(out: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, Any]]:
    """Every scalar tag's (step, value) points and the hyperparameters, as TensorBoard's own reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    return scalars, {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()}


def wandb_run(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], list[str]]:
    """The offline W&B run's history rows (all sessions), its config, its summary and its sessions' run ids, from
    wandb's own `Record` messages."""
    run_id = (out / "wandb" / "run-id").read_text().strip()
    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    ids = []

    def key(item: Any) -> str:
        return "/".join(item.nested_key) or item.key

    for path in wandb_files(out, run_id):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
                config.update({key(i): json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({key(i): json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                history.append({key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                summary.update({key(i): json.loads(i.value_json) for i in record.summary.update})
    return history, config, summary, ids


def test_none_and_other_ranks_track_nothing(tmp_path: Path) -> None:
    assert make_trackers(["none"], tmp_path, {}, rank=0, start_step=0).trackers == []
    assert make_trackers(["tensorboard", "wandb"], tmp_path, {}, rank=1, start_step=0).trackers == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_library_is_refused_in_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(TrackingError) as err:
        make_trackers(["tensorboard", "wandb"], tmp_path, {}, rank=1, start_step=0)  # every rank checks
    assert str(err.value) == f"--report-to {name} needs the {name} package: pip install 'steerlens[tracking]'"
    data = write_problems("toy-arith", tmp_path / "train.jsonl", n=8, seed=0)
    args = ["train", "--data", str(data), "--eval-data", "null", "--engine", "hf", "--steps", "1"]
    result = CliRunner().invoke(app, [*args, "--report-to", name, "--out-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {err.value}"  # after the model's loading messages


def test_train_reports_to_tensorboard_and_wandb_and_resumes_the_same_curves(
    tmp_path: Path, offline_wandb: socket.socket
) -> None:
    data = write_problems("toy-arith", tmp_path / "train.jsonl", n=64, seed=3)
    out = tmp_path / "run"
    args = [
        *("--data", str(data), "--eval-data", "toy-arith-heldout", "--eval-problems", "4", "--engine", "hf"),
        *("--steps", "3", "--prompts-per-step", "2", "--generations", "4", "--max-new-tokens", "24"),
        *("--save-every", "2", "--no-progress", "--report-to", "tensorboard,wandb", "--out-dir", str(out)),
    ]
    train(build_config(TrainConfig, None, args))
    first_session_steps = [r["_step"] for r in wandb_run(out)[0]]
    assert first_session_steps == [0, 1, 2]
    # interrupted after step 2 was logged and before its checkpoint: the resume reruns step 2
    shutil.rmtree(out / "checkpoints" / "step_000003")
    for name in ("summary.json", "vectors.safetensors"):
        (out / name).unlink()
    train(build_config(TrainConfig, None, [*args, "--resume"]))
    metrics, summary = rows(out), json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in metrics] == [0, 1, 2]
    assert_no_connection(offline_wandb)

    # TensorBoard: every metric, each step once (the interrupted session's step 2 purged), the config, the summary
    scalars, hparams = tensorboard_scalars(out)
    for key in [k for k in metrics[0] if k not in ("step", "vector_norms")]:
        assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(float(r[key]), rel=1e-6)) for r in metrics], key
    for layer in metrics[0]["vector_norms"]:
        points = [(r["step"], pytest.approx(r["vector_norms"][layer], rel=1e-6)) for r in metrics]
        assert scalars[f"vector_norm/layer_{layer}"] == points
    for key in ("heldout_accuracy_before", "heldout_accuracy_after", "reward_last_steps", "mean_step_seconds"):
        assert scalars[f"summary/{key}"][-1][1] == pytest.approx(summary[key], rel=1e-6)
    assert hparams["lr"] == pytest.approx(summary["config"]["lr"])
    assert hparams["out_dir"] == str(out) and hparams["report_to"] == '["tensorboard", "wandb"]'

    # W&B: two offline sessions of one run; each step once, equal to metrics.jsonl (timings differ on the rerun)
    history, config, wandb_summary, ids = wandb_run(out)
    assert len(ids) == 2 and len(set(ids)) == 1
    assert [h["_step"] for h in history] == [0, 1, 2]
    for h, r in zip(history, metrics):
        expected = {f"train/{k}": float(v) for k, v in r.items() if k not in ("step", "vector_norms")}
        expected |= {f"vector_norm/layer_{layer}": v for layer, v in r["vector_norms"].items()}
        logged = {k: v for k, v in h.items() if not k.startswith("_")}
        assert logged.keys() == expected.keys()
        assert {k: v for k, v in logged.items() if "time_" not in k} == {
            k: pytest.approx(v) for k, v in expected.items() if "time_" not in k
        }
    assert config["lr"] == summary["config"]["lr"] and config["report_to"] == ["tensorboard", "wandb"]
    for key in ("heldout_accuracy_before", "heldout_accuracy_after", "steps", "reward_last_steps"):
        assert wandb_summary[key] == pytest.approx(summary[key])
