"""TrainConfig: every knob of `steerlens train`, as YAML keys, CLI flags and documentation at once.

The defaults are the embedded demo: the shipped toy arithmetic model, whose ability to box its answer
is latent, trained for a few minutes on this CPU. The paper's setups live in `analyses/presets/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from steerlens.config import ConfigError, option
from steerlens.options import SharedOptions, option_checks
from steerlens.rl.parametrisations import Form
from steerlens.vectors import Placement

# Settings a resumed run may change without changing any number it computes.
RESUME_FREE_FIELDS = (
    "out_dir",
    "resume",
    "allow_config_change",
    "progress",
    "engine",
    "gpu_memory_utilization",
    "verify_every",
    "verify_atol",
    "save_every",
    "keep_last",
    "device",
    "micro_batch",
    "max_tokens_per_micro_batch",
    "logprob_chunk_tokens",
    "activation_checkpointing",
    "share_prompt_forward",
    "report_to",
)


@dataclass
class TrainConfig(SharedOptions):
    """RLOO training of steering vectors (or the paper's LoRA / full-tuning baselines).

    The model, engine, data, reward-fallback and sampling options come from `steerlens.options`
    (`ModelOptions`, `DataOptions`, `SamplingOptions`); this class adds the rest.

    **What is trained**

    - `trainable`: steering vectors (the default), rank-r LoRA on the MLP's `down_proj`, TinyLoRA, or every weight.
    - `layers`: the steered layers (default: all); one index trains a single-layer vector.
    - `placement`: where each vector is added (`steerlens.vectors.PLACEMENTS`): the residual stream after the
      layer (the papers'), or the output of the layer's attention, its MLP, or the norm before either.
    - `lora_rank`, `lora_alpha`: LoRA's rank r and alpha (with `trainable=lora`).
    - `tinylora_u`, `tinylora_rank`, `tinylora_tying`: TinyLoRA (`trainable=tinylora`, peft's own tuner on every
      linear layer, arXiv 2602.04118): the trained vector's size, the frozen SVD rank, and the share of layers
      that share one vector (1.0, the default: `u` parameters in all, 13 as in the paper). Generated with HF.
    - `parametrisation`: how the steered layers' vectors are trained (`steerlens.rl.parametrisations`): one
      free vector per layer (`dense`, k d parameters), a low-rank stack `A[k x r] @ B[r x d]` (`low_rank`,
      r (k + d)), or `shared` directions with per-layer coefficients (n (k + d) trained, n k fixed).
    - `rank`: `low_rank`'s rank r, or `shared`'s number of directions n.
    - `direction`: `shared`'s directions: `trained` (from random), fixed `random`, or the fixed logit-lens
      direction of `lens_token` (`lens`, one direction: k parameters).
    - `lens_token`: the token whose logit-lens direction `direction=lens` steers along.
    - `param_budget`: pick the parametrisation by a parameter count instead: the largest of one fixed random
      direction (k), low rank r = 1, 2, ... (r (k + d), while below dense) and dense (k d) that does not
      exceed the budget (`Form.within_budget`).

    **Data**

    - `data`: the training problems: a generated set (`toy-arith`, or `word-arith`: easy word problems for
      small real models), a local JSONL/JSON/parquet/CSV file, or a hub dataset id.
    - `eval_data`: held-out problems for the before/after accuracy report: a file or a generated
      `<name>-heldout` set; none skips the report.
    - `eval_problems`: how many held-out problems that report uses.

    **The RLOO step**

    - `steps`: optimiser steps.
    - `prompts_per_step`: prompts per step, across all ranks (the paper: 128).
    - `generations`: completions sampled per prompt (the paper: 16).
    - `baseline`: the advantage: leave-one-out (`rloo`), the group mean, or GRPO's std-normalised one.
    - `reward_correct`: the reward of a verified-correct boxed answer (the reference: +1).
    - `reward_wrong`: the reward otherwise: wrong, unboxed or unparsable (the reference: -1; 0 is also common).
    - `kl_coef`: the coefficient of a per-token KL penalty to the base policy (off by default, as in the paper).
    - `lr`: AdamW's learning rate (the paper: 1e-3 for all-layer steering on Qwen2.5-1.5B/7B).
    - `warmup_ratio`: the fraction of steps with a linear learning-rate warmup; constant after it.
    - `weight_decay`: AdamW's weight decay.
    - `max_grad_norm`: gradient-norm clipping (the reference: 2.0).

    **Engines and hardware** (how the step runs; only `update_autocast` changes its numbers)

    - `micro_batch`: at most this many sequences per forward/backward pass; gradients accumulate over the step.
    - `max_tokens_per_micro_batch`: the token budget of one forward/backward pass: sequences are sorted by
      length and grouped so that each group, padded, holds at most this many tokens (a longer sequence goes
      alone).
    - `logprob_chunk_tokens`: completion tokens unembedded at a time, recomputed in the backward pass: bounds
      the log-prob step's memory at this many x vocab fp32 values.
    - `update_autocast`: `bfloat16` runs the update's forward and backward under bf16 autocast (weights and
      trained parameters stay in their dtype, log-softmax in fp32): ~1.4x faster on CPUs with avx512_bf16;
      log-probs differ from fp32 by up to ~0.25 on rare tokens.
    - `activation_checkpointing`: recompute each decoder layer's activations in the backward pass instead of
      keeping them: less memory for about one more forward (on in the GPU presets).
    - `share_prompt_forward`: run each prompt's forward once for all its generations: their completions
      attend to its cached keys and values and gradients flow back through them, so the prompt's
      generations - 1 copies are not computed. Applies without `activation_checkpointing`, which keeps no
      cache.
    - `verify_every`: compare the engine's and the trainer's log-probs after a push every N steps (0: only at
      the start).
    - `verify_atol`: the largest per-token log-prob difference allowed between vLLM and the trainer.
    - `device`: the trainer's device: `auto`, `cpu`, `cuda`, `cuda:N`.

    **Bookkeeping**

    - `seed`: the seed of the data order, sampling and initialisation.
    - `data_seed`: the seed of generated problem sets (training and held-out), fixed across `seed`s.
    - `out_dir`: where checkpoints, `metrics.jsonl` and the final vectors go.
    - `save_every`: checkpoint every N steps (and at the end).
    - `keep_last`: keep only the newest N checkpoints (0: all; full-tuning checkpoints hold the whole model).
    - `resume`: continue from the newest valid checkpoint in `out_dir`; a run never restarts over an existing
      one.
    - `allow_config_change`: let `resume` continue with changed result-affecting settings; the change is
      recorded in `config_changes.jsonl`.
    - `progress`: show a live progress bar.
    - `report_to`: experiment trackers that mirror `metrics.jsonl`, the config and the summary, as in TRL:
      `tensorboard` (event files in `out_dir`), `wandb` (an offline run in `out_dir/wandb`), both, or `none`
      (needs `pip install 'steerlens[tracking]'`; see `steerlens.rl.tracking`).
    """

    # what is trained
    trainable: Literal["steering", "lora", "tinylora", "full"] = option(
        "steering", "what is trained: steering vectors, rank-r LoRA on MLP down_proj, TinyLoRA, or every weight"
    )
    layers: list[int] | None = option(None, "steered layers (default: all); one index trains a single-layer vector")
    placement: Placement = option(
        "layer_output", "where each vector is added: the layer's output, or its attention's or MLP's input or output"
    )
    lora_rank: int = option(1, "LoRA rank r (trainable=lora)")
    lora_alpha: float = option(2.0, "LoRA alpha (trainable=lora)")
    tinylora_u: int = option(13, "TinyLoRA's trained vector size u per tied group (trainable=tinylora)")
    tinylora_rank: int = option(2, "TinyLoRA's frozen SVD rank (trainable=tinylora)")
    tinylora_tying: float = option(1.0, "share of TinyLoRA's layers tied to one vector (1.0: all: u parameters)")
    parametrisation: Literal["dense", "low_rank", "shared"] = option(
        "dense", "steering's form: a vector per layer, a low-rank stack, or shared directions"
    )
    rank: int = option(1, "low_rank's rank r, or shared's number of directions")
    direction: Literal["trained", "random", "lens"] = option(
        "trained", "shared's directions: trained, fixed random, or the fixed logit-lens direction of lens_token"
    )
    lens_token: str | None = option(None, "the token whose logit-lens direction direction=lens uses")
    param_budget: int | None = option(
        None, "pick the parametrisation with the most parameters not above this count (see the docs)"
    )
    # data
    data: str = option(
        "toy-arith", "training problems: a generated set, a JSONL/JSON/parquet/CSV file, or a hub dataset id"
    )
    eval_data: str | None = option(
        "toy-arith-heldout", "held-out problems for the before/after accuracy report (none: skip)"
    )
    eval_problems: int = option(64, "how many held-out problems the before/after report uses")
    # the RLOO step
    steps: int = option(40, "optimiser steps")
    prompts_per_step: int = option(32, "prompts per step, across all ranks (paper: 128)")
    generations: int = option(8, "completions sampled per prompt (paper: 16)")
    baseline: Literal["rloo", "group_mean", "grpo"] = option(
        "rloo", "advantage: leave-one-out (RLOO), group mean, or GRPO std-normalised"
    )
    reward_correct: float = option(1.0, "reward for a verified-correct boxed answer (reference: +1)")
    reward_wrong: float = option(
        -1.0, "reward otherwise: wrong, unboxed, or unparsable (reference: -1; 0 is also common)"
    )
    kl_coef: float = option(
        0.0, "coefficient of a per-token KL penalty to the base policy (off by default, as in the paper)"
    )
    lr: float = option(5e-2, "AdamW learning rate (paper: 1e-3 for all-layer steering on Qwen2.5-1.5B/7B)")
    warmup_ratio: float = option(0.03, "fraction of steps with linear LR warmup, then constant")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(2.0, "gradient-norm clipping (reference: 2.0)")
    # engines and hardware
    micro_batch: int = option(
        64, "at most this many sequences per forward/backward pass (gradient accumulation over the step)"
    )
    max_tokens_per_micro_batch: int = option(
        16384, "token budget of one forward/backward pass, in length-sorted padded groups"
    )
    logprob_chunk_tokens: int = option(
        1024, "completion tokens unembedded at a time (bounds the log-prob step's memory)"
    )
    update_autocast: Literal["off", "bfloat16"] = option(
        "off", "run the update's forward and backward under bf16 autocast (faster on bf16 CPUs; not bit-equal)"
    )
    activation_checkpointing: bool = option(
        False, "recompute each decoder layer's activations in the backward pass (less memory)"
    )
    share_prompt_forward: bool = option(
        True, "run each prompt's forward once for all its generations (without activation_checkpointing)"
    )
    verify_every: int = option(10, "compare engine and trainer log-probs after a push every N steps (0: only at start)")
    verify_atol: float = option(2e-3, "largest allowed per-token log-prob difference between vLLM and the trainer")
    device: str = option("auto", "trainer device: auto, cpu, cuda, cuda:N")
    # bookkeeping
    seed: int = option(0, "seed for data order, sampling and initialisation")
    data_seed: int = option(0, "seed of generated problem sets (training and held-out); fixed across seeds")
    out_dir: str = option("runs/toy-arith", "where checkpoints, metrics.jsonl and the final vectors go")
    save_every: int = option(10, "checkpoint every N steps (and at the end)")
    keep_last: int = option(
        0, "keep only the newest N checkpoints (0: all; full-tuning checkpoints hold the whole model)"
    )
    resume: bool = option(
        False, "continue from the newest valid checkpoint in out_dir (never restarts over an existing run)"
    )
    allow_config_change: bool = option(
        False, "let --resume continue with changed result-affecting settings (recorded in config_changes.jsonl)"
    )
    progress: bool = option(True, "show a live progress bar")
    report_to: list[Literal["none", "tensorboard", "wandb"]] = option(
        ["none"], "experiment trackers: none, tensorboard, wandb (offline), or several, comma-separated"
    )

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (
                self.generations >= (2 if self.baseline == "rloo" else 1),
                "generations must be >= 2 for the rloo baseline",
            ),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.micro_batch >= 1, "micro_batch must be >= 1"),
            (
                self.max_tokens_per_micro_batch >= 1 and self.logprob_chunk_tokens >= 1,
                "max_tokens_per_micro_batch and logprob_chunk_tokens must be >= 1",
            ),
            (self.save_every >= 1, "save_every must be >= 1"),
            (self.keep_last >= 0, "keep_last must be >= 0"),
            (self.lora_rank >= 1 and self.lora_alpha > 0, "lora_rank must be >= 1 and lora_alpha > 0"),
            (
                self.tinylora_u >= 1 and self.tinylora_rank >= 1 and 0 <= self.tinylora_tying <= 1,
                "tinylora_u and tinylora_rank must be >= 1 and tinylora_tying in [0, 1]",
            ),
            (
                self.trainable != "tinylora" or self.engine != "vllm",
                "trainable=tinylora generates with HF (vLLM serves no TinyLoRA adapter): use engine=hf or auto",
            ),
            (self.eval_problems >= 1, "eval_problems must be >= 1 (use --eval-data null for none)"),
            (self.kl_coef >= 0 and self.weight_decay >= 0, "kl_coef and weight_decay must be >= 0"),
            (self.max_grad_norm > 0 and self.verify_atol > 0, "max_grad_norm and verify_atol must be > 0"),
            (self.verify_every >= 0, "verify_every must be >= 0"),
            (
                self.trainable == "steering" or (self.layers is None and self.placement == "layer_output"),
                "layers and placement apply only to trainable=steering",
            ),
            (
                self.trainable == "steering" or (self.parametrisation == "dense" and self.param_budget is None),
                "parametrisation and param_budget apply only to trainable=steering",
            ),
            (
                self.rank >= 1 and (self.param_budget is None or self.param_budget >= 1),
                "rank and param_budget must be >= 1",
            ),
            (
                self.param_budget is None or (self.parametrisation == "dense" and self.rank == 1),
                "param_budget picks the parametrisation and rank itself: leave them unset",
            ),
            (
                (self.direction == "lens") == (self.lens_token is not None)
                and (self.direction == "trained" or self.parametrisation == "shared"),
                "direction applies to parametrisation=shared, and lens_token goes with direction=lens",
            ),
            (
                len(set(self.report_to)) == len(self.report_to)
                and ("none" not in self.report_to or len(self.report_to) == 1),
                "report_to lists each tracker once, and none alone",
            ),
        ]
        problems = [message for ok, message in checks + option_checks(self) if not ok]
        if problems:
            raise ConfigError("TrainConfig: " + "; ".join(problems))

    def adapter(self) -> Any:
        """The peft config of trainable=lora or tinylora (seeded by `seed`), else None."""
        from steerlens.rl.policy import lora_config, tinylora_config  # torch and peft, only when training

        if self.trainable == "lora":
            return lora_config(self.lora_rank, self.lora_alpha)
        if self.trainable == "tinylora":
            return tinylora_config(self.tinylora_u, self.tinylora_rank, self.tinylora_tying, self.seed)
        return None

    def steering_form(self) -> Form:
        """What `parametrisation`, `rank`, `direction`, `lens_token` and `param_budget` ask for (seeded by `seed`)."""
        return Form(self.parametrisation, self.rank, self.direction, self.lens_token, self.param_budget, self.seed)
