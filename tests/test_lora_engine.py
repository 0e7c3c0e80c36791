"""LoRA training with vLLM rollouts: after every optimizer step the adapter is pushed into the engine
(vLLM's LoRA support, a new id each push) and every push is verified against the trainer's peft model.

One engine for the module: the trainer's own (`engine=vllm`, `trainable=lora`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from steerlens.backends.vllm import VERIFY_COMPLETION, VERIFY_PROMPT, hf_sequence_logprobs  # noqa: E402
from steerlens.config import build_config  # noqa: E402
from steerlens.data.generated import write_problems  # noqa: E402
from steerlens.models import load_model  # noqa: E402
from steerlens.rl.config import TrainConfig  # noqa: E402
from steerlens.rl.job import train  # noqa: E402

pytestmark = pytest.mark.vllm
STEPS = 3
ATOL = 2e-3  # the trainer's default verify_atol (fp32 engine vs fp32 trainer)


def test_lora_run_pushes_a_verified_adapter_every_step(tmp_path: Path) -> None:
    from peft import PeftModel

    problems = write_problems("toy-arith", tmp_path / "train.jsonl", n=64, seed=3)
    out = tmp_path / "run"
    cfg = build_config(
        TrainConfig,
        None,
        [
            "--data",
            str(problems),
            "--eval-data",
            "null",
            "--trainable",
            "lora",
            "--engine",
            "vllm",
            "--steps",
            str(STEPS),
            "--prompts-per-step",
            "8",
            "--generations",
            "8",
            "--max-new-tokens",
            "40",
            "--lr",
            "5e-2",
            "--verify-every",
            "1",
            "--save-every",
            str(STEPS),
            "--gpu-memory-utilization",
            "0.05",
            "--max-model-len",
            "256",
            "--no-progress",
            "--out-dir",
            str(out),
        ],
    )
    summary = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == len(rows) == STEPS
    assert any(row["grad_norm"] > 0 for row in rows)  # some group's rewards differed, so the adapter moved
    # every step's push was compared with the trainer's model (verify_push raises beyond atol)
    assert all(0 <= row["sync_max_logprob_diff"] <= ATOL for row in rows), [
        r.get("sync_max_logprob_diff") for r in rows
    ]

    # ... and the last adapter moves the model's log-probs far beyond that tolerance, so the engine
    # agreeing with the trainer means it ran the new adapter, not the base model or an older one
    base, tokenizer = load_model(cfg.model)
    prompt = list(tokenizer(VERIFY_PROMPT)["input_ids"])
    completion = list(tokenizer(VERIFY_COMPLETION, add_special_tokens=False)["input_ids"])
    before = hf_sequence_logprobs(base, None, prompt, completion)
    adapted = PeftModel.from_pretrained(base, str(out / "lora"))
    after = hf_sequence_logprobs(adapted, None, prompt, completion)
    assert float((after - before).abs().max()) > 10 * ATOL
