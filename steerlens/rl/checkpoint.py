"""Training checkpoints: trainable tensors, optimizer state, RNG state, step and config, no pickle.

Each checkpoint is a directory written atomically, with a `manifest.json` (every file's size and
SHA-256) written last, so it can be verified before it is trusted. Resume takes the newest
checkpoint that verifies and says why it skipped any newer one; `latest` names the newest one for
people and other tools, and is not needed to resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from steerlens.errors import SteerlensError
from steerlens.io import atomic_dir, atomic_path, write_json, write_text
from steerlens.rl.policy import Policy

LATEST = "latest"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(SteerlensError, ValueError):
    """A checkpoint is missing, damaged, or does not fit the run."""


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    state = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["optimizer"])
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    write_json(directory / MANIFEST, {p.name: {"bytes": p.stat().st_size, "sha256": _digest(p)} for p in files})


def save_checkpoint(
    out_dir: Path,
    step: int,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    config_yaml: str,
    extra: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write checkpoint `step` under `out_dir/checkpoints`, point `latest` at it, and delete all but the
    newest `keep_last` checkpoints (0: keep every one)."""
    root = out_dir / "checkpoints"
    target = root / f"step_{step:06d}"
    with atomic_dir(target) as tmp:
        save_tensors(tmp / "trainable.safetensors", policy.named_state())
        vectors = policy.vectors()
        if vectors is not None:
            vectors.provenance.update(step=step)
            vectors.save(tmp / "vectors.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_tensors(tmp / "optimizer.safetensors", opt_tensors, {"optimizer": opt_meta})
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_tensors(tmp / "rng.safetensors", rng)
        write_json(tmp / "state.json", {"step": step, **extra})
        write_text(tmp / "config.yaml", config_yaml)
        _write_manifest(tmp)
    write_text(root / LATEST, target.name + "\n")
    if keep_last > 0:
        for old in checkpoint_dirs(out_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Every `step_*` directory of a run, newest first (valid or not)."""
    root = out_dir / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if root.is_dir() else []
    return sorted(found, key=checkpoint_step, reverse=True)


def checkpoint_step(directory: Path) -> int:
    """How many steps the run had taken when the checkpoint `directory` (`step_NNNNNN`) was written."""
    match = STEP_DIR.match(directory.name)
    if match is None:
        raise CheckpointError(f"{directory}: not a checkpoint directory (step_NNNNNN)")
    return int(match[1])


def problem(directory: Path) -> str | None:
    """Why a checkpoint directory cannot be trusted, or None when its manifest verifies."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (written last: the checkpoint is incomplete)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable ({err})"
    if not isinstance(manifest, dict) or "state.json" not in manifest:
        return f"{MANIFEST} does not list the checkpoint's files"
    for name, entry in manifest.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes"):
            expected = entry.get("bytes") if isinstance(entry, dict) else "?"
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected}"
        if _digest(path) != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def newest_valid(out_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and one line per newer one that did not ("step_… : why")."""
    skipped = []
    for directory in checkpoint_dirs(out_dir):
        reason = problem(directory)
        if reason is None:
            return directory, skipped
        skipped.append(f"{directory.name}: {reason}")
    return None, skipped


def load_checkpoint(path: Path, policy: Policy, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable tensors, optimizer and RNG state from `path`; returns its state.json."""
    try:
        policy.load_state(load_file(str(path / "trainable.safetensors")))
        _load_optimizer(optimizer, path / "optimizer.safetensors")
        rng = load_file(str(path / "rng.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: cannot be restored ({type(err).__name__}: {err}); it does not fit "
            "this run (another model, trainable or layers?)"
        ) from err
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return dict(state)
