"""Single-layer runs trained together on one vLLM engine (one vector set per run, one engine batch per step)
equal the same runs trained one after another with the same seeds, on the shipped toy model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from steerlens.config import build_config  # noqa: E402
from steerlens.data.generated import write_problems  # noqa: E402
from steerlens.rl.config import TrainConfig  # noqa: E402
from steerlens.rl.job import train  # noqa: E402
from steerlens.rl.together import train_each_layer  # noqa: E402
from steerlens.rollout import make_rollout  # noqa: E402
from steerlens.vectors import SteeringVectors  # noqa: E402

pytestmark = pytest.mark.vllm

LAYERS = [0, 1, 2, 3]


def test_runs_trained_together_equal_runs_trained_alone(tmp_path: Path) -> None:
    data = write_problems("toy-arith", tmp_path / "train.jsonl", n=100, seed=11)
    cfg = build_config(
        TrainConfig,
        None,
        [
            "--data",
            str(data),
            "--eval-data",
            "null",
            "--engine",
            "vllm",
            "--steps",
            "3",
            "--prompts-per-step",
            "8",
            "--generations",
            "8",
            "--max-new-tokens",
            "40",
            "--lr",
            "0.1",
            "--verify-every",
            "1",
            "--save-every",
            "2",
            "--no-progress",
            "--out-dir",
            str(tmp_path / "together"),
        ],
    )
    together = train_each_layer(cfg, LAYERS)

    rollout = make_rollout(cfg.model, engine="vllm", max_vector_sets=0)  # the runs alone share one engine's default set
    try:
        alone = {
            layer: train(replace(cfg, layers=[layer], out_dir=str(tmp_path / "alone" / f"layer{layer}")), rollout)
            for layer in LAYERS
        }
    finally:
        rollout.close()
    for layer in LAYERS:
        ours = SteeringVectors.load(together[layer])
        theirs = SteeringVectors.load(Path(alone[layer]["artefact"]))
        assert ours.layers == theirs.layers == (layer,)
        assert float(theirs.values.norm()) > 1e-3  # trained, so agreement is not the agreement of zeros
        assert float((ours.values - theirs.values).abs().max()) <= 1e-5, layer
        rows = [
            [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (together[layer].parent, tmp_path / "alone" / f"layer{layer}")
        ]
        assert [r["reward_mean"] for r in rows[0]] == [r["reward_mean"] for r in rows[1]]
        assert all(r["sync_max_logprob_diff"] <= cfg.verify_atol for r in rows[0])  # each run's slot verified
        assert (together[layer].parent / "checkpoints").is_dir()
    # rerunning the command keeps the finished runs
    assert train_each_layer(cfg, LAYERS) == together
