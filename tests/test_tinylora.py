"""TinyLoRA through peft's own tuner (`trainable=tinylora`): a short RLOO run trains exactly `tinylora_u`
parameters (13, the paper's), starts as the base model, saves a peft adapter that `steerlens eval --adapter`
merges into the same function, and vLLM, which serves no TinyLoRA adapter, is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlens.config import ConfigError
from steerlens.data.generated import generate
from steerlens.evaluation.config import EvalConfig
from steerlens.evaluation.runner import model_path
from steerlens.models import load_model
from steerlens.rl.config import TrainConfig
from steerlens.rl.trainer import Trainer
from steerlens.task import Task

PeftModel = pytest.importorskip("peft").PeftModel

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def run(out: Path, engine: str = "hf", steps: int = 3) -> dict:
    """A short run on the shipped toy model, rewarded by a pseudo-random function of the text (every group has
    signal from the first step)."""
    model, tokenizer = load_model("toy-arith")
    task = Task(generate("toy-arith", 16), reward=lambda texts, _: [float(sum(map(ord, t)) % 2) for t in texts])
    cfg = TrainConfig(
        trainable="tinylora", steps=steps, prompts_per_step=2, generations=4, max_new_tokens=8, lr=0.05,
        warmup_ratio=0.0, engine=engine, eval_data=None, progress=False, out_dir=str(out),
    )  # fmt: skip
    return Trainer(model, tokenizer, task, cfg).train()


def test_tinylora_trains_13_parameters_and_merges_for_evaluation(tmp_path: Path) -> None:
    summary = run(tmp_path / "run")
    assert summary["trainable_parameters"] == 13
    adapter = str(tmp_path / "run" / "tinylora")
    base, _ = load_model("toy-arith")
    adapted = PeftModel.from_pretrained(load_model("toy-arith")[0], adapter)
    merged, _ = load_model(model_path(EvalConfig(adapter=adapter), tmp_path / "eval"))
    trained = [p for name, p in adapted.named_parameters() if "tinylora_v" in name]
    assert [p.numel() for p in trained] == [13] and trained[0].abs().sum() > 0  # v started at zero and moved
    with torch.no_grad():
        moved = float((adapted(IDS).logits - base(IDS).logits).abs().max())
        assert moved > 1e-4  # the adapter changes the model, so the merge check below means something
        assert float((merged(IDS).logits - adapted(IDS).logits).abs().max()) <= 1e-4


def test_vllm_is_refused_for_tinylora_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="trainable=tinylora generates with HF .vLLM serves no TinyLoRA adapter.: use"
    ):
        run(tmp_path / "run", engine="vllm", steps=1)
