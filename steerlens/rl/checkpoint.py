"""Training checkpoints: trainable tensors, optimizer state, RNG state, step and config, no pickle.

Each checkpoint is a directory written atomically; `latest` names the newest one and is replaced
atomically after it, so a run killed at any moment resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from steerlens.io import atomic_dir, write_json, write_text
from steerlens.rl.policy import Policy, save_tensors

LATEST = "latest"


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


def save_checkpoint(out_dir: Path, step: int, policy: Policy, optimizer: torch.optim.Optimizer,
                    config_yaml: str, extra: dict[str, Any]) -> Path:
    """Write checkpoint `step` under `out_dir/checkpoints` and point `latest` at it."""
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
    write_text(root / LATEST, target.name + "\n")
    return target


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = out_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    target = out_dir / "checkpoints" / pointer.read_text().strip()
    return target if (target / "state.json").is_file() else None


def load_checkpoint(path: Path, policy: Policy, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable tensors, optimizer and RNG state from `path`; returns its state.json."""
    policy.load_state(load_file(str(path / "trainable.safetensors")))
    _load_optimizer(optimizer, path / "optimizer.safetensors")
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "state.json").read_text())
