"""TrainConfig: every knob of `steerlens train`, as YAML keys, CLI flags and documentation at once.

The defaults are the embedded demo: the shipped toy arithmetic model, whose ability to box its answer
is latent, trained for a few minutes on this CPU. The paper's setups live in `analyses/presets/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from steerlens.config import ConfigError, option


@dataclass
class TrainConfig:
    """RLOO training of steering vectors (or the paper's LoRA / full-tuning baselines)."""

    # what is trained
    model: str = option("toy-arith", "base model: a short name (toy-arith, smollm2-135m), a local checkpoint directory, or a hub id")
    trainable: Literal["steering", "lora", "full"] = option("steering", "what is trained: steering vectors (default), rank-r LoRA on MLP down_proj, or every weight")
    layers: list[int] | None = option(None, "steered layers (default: all); one index trains a single-layer vector")
    lora_rank: int = option(1, "LoRA rank r (trainable=lora)")
    lora_alpha: float = option(2.0, "LoRA alpha (trainable=lora)")
    # data
    data: str = option("toy-arith", "training problems: a generated set (toy-arith, word-arith: easy word problems for small real models), a local JSONL/JSON/parquet/CSV file, or a hub dataset id")
    problem_key: str | None = option(None, "column holding the problem (default: recognised from common names)")
    answer_key: str | None = option(None, "column holding the gold answer (default: recognised from common names)")
    eval_data: str | None = option("toy-arith-heldout", "held-out problems for the before/after accuracy report: a file or a generated <name>-heldout set (none: skip)")
    eval_problems: int = option(64, "how many held-out problems the before/after report uses")
    template: Literal["auto", "chat", "r1"] = option("auto", "prompt template: chat (system prompt asks for \\boxed{}), r1 (plain, for base models), auto")
    # the RLOO step
    steps: int = option(40, "optimiser steps")
    prompts_per_step: int = option(32, "prompts per step, across all ranks (paper: 128)")
    generations: int = option(8, "completions sampled per prompt (paper: 16)")
    max_new_tokens: int = option(48, "completion length cap (tokens)")
    temperature: float = option(1.0, "sampling temperature for rollouts")
    top_p: float = option(1.0, "nucleus sampling for rollouts")
    baseline: Literal["rloo", "group_mean", "grpo"] = option("rloo", "advantage: leave-one-out (RLOO), group mean, or GRPO std-normalised")
    answer_fallback: Literal["none", "last_number"] = option("none", "a completion without a \\boxed{} (or <answer>) answer: none = wrong (the paper), last_number = its last number is verified instead (for models that compute but never box; formatted_rate in metrics.jsonl tracks the boxed share)")
    reward_correct: float = option(1.0, "reward for a verified-correct boxed answer (reference: +1)")
    reward_wrong: float = option(-1.0, "reward otherwise: wrong, unboxed, or unparsable (reference: -1; 0 is also common)")
    kl_coef: float = option(0.0, "coefficient of a per-token KL penalty to the base policy (off by default, as in the paper)")
    lr: float = option(5e-2, "AdamW learning rate (paper: 1e-3 for all-layer steering on Qwen2.5-1.5B/7B)")
    warmup_ratio: float = option(0.03, "fraction of steps with linear LR warmup, then constant")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(2.0, "gradient-norm clipping (reference: 2.0)")
    micro_batch: int = option(64, "sequences per forward/backward pass (gradient accumulation over the step)")
    # engines and hardware
    engine: Literal["auto", "vllm", "hf"] = option("auto", "rollout engine: vLLM (colocated, steering updated in place) or HF generate; auto = vLLM if installed")
    verify_every: int = option(10, "compare engine and trainer log-probs after a push every N steps (0: only at start)")
    verify_atol: float = option(2e-3, "largest allowed per-token log-prob difference between vLLM and the trainer")
    gpu_memory_utilization: float = option(0.3, "vLLM memory fraction (GPU) / KV-cache share (CPU)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "trainer model dtype (log-probs are always computed in fp32)")
    device: str = option("auto", "trainer device: auto, cpu, cuda, cuda:N")
    # bookkeeping
    seed: int = option(0, "seed for data order, sampling and initialisation")
    out_dir: str = option("runs/toy-arith", "where checkpoints, metrics.jsonl and the final vectors go")
    save_every: int = option(10, "checkpoint every N steps (and at the end)")
    resume: bool = option(False, "continue from the latest checkpoint in out_dir")
    progress: bool = option(True, "show a live progress bar")

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.generations >= (2 if self.baseline == "rloo" else 1), "generations must be >= 2 for the rloo baseline"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.micro_batch >= 1, "micro_batch must be >= 1"),
            (self.save_every >= 1, "save_every must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 for RL rollouts"),
            (self.trainable == "steering" or self.layers is None, "layers applies only to trainable=steering"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError("TrainConfig: " + "; ".join(problems))
