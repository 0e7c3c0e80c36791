"""Experiment tracking: a run's config, per-step metrics and summary sent to TensorBoard and W&B (`report_to`).

`metrics.jsonl` stays the record; a tracker mirrors it so a run can be watched and compared live. Each row's
numbers go out as `train/<key>` (timings `train/time_<phase>`), each steered layer's vector norm as
`vector_norm/layer_<l>` (steering runs; LoRA and full tuning have no per-layer vectors), the config as
hyperparameters at the start, and `summary.json`'s numbers (held-out accuracy before and after included) at
the end. Only rank 0 tracks.

- `tensorboard`: event files in the run folder itself, so `tensorboard --logdir runs` names each run by its
  `out_dir`. A resumed run writes with `purge_step` at its resume step: steps logged after the last
  checkpoint by an interrupted session are dropped, and the curve continues without duplicates.
- `wandb`: always offline (local files under `<out_dir>/wandb/`; nothing leaves the machine; `wandb sync`
  uploads them), in the project `$WANDB_PROJECT` (default `steerlens`), named by `out_dir`. The run id is kept
  in `<out_dir>/wandb/run-id`, so a resumed run continues the same W&B run; steps an interrupted session
  already logged are not logged again (resume recomputes them exactly).

Both libraries are optional (`pip install 'steerlens[tracking]'`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from steerlens.errors import SteerlensError

TRACKERS = ("tensorboard", "wandb")
EXTRA = "tracking"
WANDB_PROJECT = "steerlens"
HEADLINE = ("heldout_accuracy_after", "reward_last_steps", "accuracy_last_steps")


class TrackingError(SteerlensError, RuntimeError):
    """A tracker that was asked for cannot run (its library is missing)."""


class Tracker(Protocol):
    """Where a run's config, step metrics and summary are sent."""

    def log_step(self, step: int, row: dict[str, Any]) -> None:
        """One `metrics.jsonl` row."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """`summary.json` at the end of the run."""

    def close(self) -> None:
        """Flush and release the tracker's files."""


def step_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A `metrics.jsonl` row as tracker scalars: `train/<key>` for each number, `vector_norm/layer_<l>` per layer."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "vector_norms" and isinstance(value, dict):
            out.update({f"vector_norm/layer_{layer}": float(norm) for layer, norm in value.items()})
        elif key != "step" and isinstance(value, (int, float)):
            out[f"train/{key}"] = float(value)
    return out


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """`summary.json`'s numbers (the config is logged as hyperparameters instead)."""
    return {key: float(value) for key, value in summary.items() if isinstance(value, (int, float))}


def hyperparameters(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The config as flat scalar hyperparameters: lists and nulls as their JSON text."""
    return {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value) for key, value in config.items()
    }


class TensorBoardTracker:
    """TensorBoard event files in the run folder, written with torch's `SummaryWriter`."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_step)
        self.last_step = start_step - 1
        headline = {f"summary/{key}": 0.0 for key in HEADLINE}  # the hparams table's metric columns
        for event in hparams(hyperparameters(config), headline):
            self.writer._get_file_writer().add_summary(event, start_step)  # the run's own events, not a sub-run
        self.writer.flush()

    def log_step(self, step: int, row: dict[str, Any]) -> None:
        for tag, value in step_scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # an interrupted run keeps every step up to its last checkpoint
        self.last_step = step

    def log_summary(self, summary: dict[str, Any]) -> None:
        for key, value in summary_scalars(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, max(self.last_step, 0))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """An offline W&B run in `<run_dir>/wandb/`, resumed by the id kept there."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int) -> None:
        import wandb

        root = run_dir / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "run-id"
        resuming = start_step > 0 and id_file.is_file()
        run_id = id_file.read_text().strip() if resuming else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.logged = max(wandb_steps(run_dir, run_id), default=-1) if resuming else -1
        self.run = wandb.init(
            dir=str(run_dir),
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
            name=str(config.get("out_dir", run_dir)),
            id=run_id,
            resume="allow",
            config=config,
            mode="offline",
            reinit="create_new",  # runs trained together in one process each have their own
            settings=wandb.Settings(mode="offline", silent=True, console="off"),
        )

    def log_step(self, step: int, row: dict[str, Any]) -> None:
        if step > self.logged:
            self.run.log(step_scalars(row), step=step)
            self.logged = step

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary_scalars(summary))

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every tracker a run reports to, called as one (none: every call does nothing)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_step(self, step: int, row: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_step(step, row)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_summary(summary)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def check_trackers(names: Sequence[str]) -> None:
    """Refuse in one line a tracker whose library is not installed."""
    for name in names:
        if name in TRACKERS and not installed(name):
            raise TrackingError(f"--report-to {name} needs the {name} package: pip install 'steerlens[{EXTRA}]'")


def installed(package: str) -> bool:
    """Whether `package` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules as None: import blocked
        return False


def make_trackers(names: Sequence[str], run_dir: Path, config: dict[str, Any], rank: int, start_step: int) -> Trackers:
    """The trackers `names` (`report_to`) for the run in `run_dir`, starting (or resuming) at `start_step`; none off
    rank 0. A fresh start (`start_step` 0) begins new curves; a resumed one continues the run's own."""
    chosen = [name for name in names if name != "none"]
    check_trackers(chosen)
    if rank != 0:
        return Trackers([])
    kinds: dict[str, Callable[[Path, dict[str, Any], int], Tracker]] = {
        "tensorboard": TensorBoardTracker,
        "wandb": WandbTracker,
    }
    return Trackers([kinds[name](run_dir, config, start_step) for name in chosen])


# ---- reading an offline W&B run back ---------------------------------------------------------------
_WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # ident, magic, version
_BLOCK = 32768  # leveldb log blocks; a record's 7-byte header is (crc32c, length, type)


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of one `.wandb` transaction log as wandb's own `Record` protobufs (a torn tail is ignored)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if not data.startswith(_WANDB_HEADER):
        raise TrackingError(f"{path}: not a W&B transaction log")
    pos, chunk = len(_WANDB_HEADER), b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            return
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            yield wandb_internal_pb2.Record.FromString(chunk)  # type: ignore[attr-defined]
            chunk = b""


def wandb_files(run_dir: Path, run_id: str) -> list[Path]:
    """The run's offline sessions' transaction logs, oldest first."""
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def wandb_history(run_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row the run's offline sessions logged, in order (`_step` included)."""
    rows = []
    for path in wandb_files(run_dir, run_id):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def wandb_steps(run_dir: Path, run_id: str) -> list[int]:
    """The steps the run's offline sessions logged."""
    return [int(row["_step"]) for row in wandb_history(run_dir, run_id) if "_step" in row]
