"""The toy task: two-digit arithmetic, and a tiny model in which boxing the answer is a latent skill.

`steerlens train` with no config must show RL on steering vectors working on a CPU within minutes,
without downloading anything. So we pretrain a tiny Qwen2 model (byte tokenizer, ~0.7M parameters)
on chat-formatted arithmetic where the answer is usually written plainly ("The answer is 68.") and
only rarely as "\\boxed{68}". The base model therefore boxes a few percent of its samples: enough
reward signal for RLOO, and a clear ceiling to climb towards by steering alone.

`python -m steerlens.toy` regenerates the shipped checkpoint `steerlens/assets/toy-arith/`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlens.data.generated import ToyProblem, generate_problems, make_problem
from steerlens.data.prompts import SYSTEM_PROMPT, format_prompt
from steerlens.io import atomic_dir
from steerlens.reward import extract_boxed, extract_last_number

SHIPPED = Path(__file__).parent / "assets" / "toy-arith"


def answer_text(problem: ToyProblem, boxed: bool) -> str:
    """The assistant's reply: the worked expression, then the answer, plain or boxed."""
    final = f"\\boxed{{{problem.answer}}}" if boxed else problem.answer
    return f"{problem.expression}={problem.answer}. The answer is {final}."


def _system_block(tokenizer: Any) -> str:
    """The chat text of the system message alone: the prefix every pretraining document shares."""
    return tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}], tokenize=False)


def _batch(tokenizer: Any, rng: random.Random, size: int, box_rate: float) -> tuple[torch.Tensor, ...]:
    """A right-padded batch of fresh documents minus their shared system block (see `_document_loss`);
    the labels cover only the assistant's reply and its <|im_end|>."""
    skip = len(_system_block(tokenizer))
    rows = []
    for _ in range(size):
        problem = make_problem(rng)
        prompt = tokenizer(format_prompt(tokenizer, problem.problem)[skip:], add_special_tokens=False)["input_ids"]
        reply = tokenizer(answer_text(problem, rng.random() < box_rate), add_special_tokens=False)["input_ids"]
        rows.append((prompt, reply + [tokenizer.eos_token_id]))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((size, width), tokenizer.pad_token_id)
    mask = torch.zeros(size, width, dtype=torch.long)
    labels = torch.full((size, width), -100)
    for i, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        ids[i, :n] = torch.tensor(prompt + reply)
        mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(reply)
    return ids, mask, labels


def _document_loss(
    model: nn.Module, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Next-token loss of `prefix + ids[i]` for each row, running the shared prefix once.

    The system block is more than half of every document; computing its keys and values once and
    expanding them to the batch gives the same loss and gradients as the full forward, twice as fast.
    """
    batch, width = ids.shape
    cache = model(input_ids=prefix[None], use_cache=True).past_key_values
    cache.batch_repeat_interleave(batch)
    start = prefix.numel()
    logits = model(
        input_ids=ids,
        attention_mask=torch.cat([torch.ones(batch, start, dtype=mask.dtype), mask], dim=1),
        position_ids=torch.arange(start, start + width).expand(batch, -1),
        past_key_values=cache,
        use_cache=False,
    ).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate_base(model: nn.Module, tokenizer: Any, n: int = 256, seed: int = 1234) -> dict[str, float]:
    """Greedy accuracy (last number of the reply) and the boxed rate at temperature 1, on `n` problems
    from `seed` (a stream separate from pretraining's)."""
    from steerlens.rollout import HFRollout, Sampling

    problems = generate_problems(n, seed)
    prompts = [format_prompt(tokenizer, p.problem) for p in problems]
    engine = HFRollout(model, tokenizer, batch_size=128)
    greedy = [group[0].text for group in engine.generate(prompts, 1, Sampling(48, temperature=0.0))]
    sampled = [group[0].text for group in engine.generate(prompts, 1, Sampling(48, temperature=1.0, seed=seed))]
    return {
        "greedy_accuracy": sum(extract_last_number(t) == p.answer for t, p in zip(greedy, problems)) / n,
        "greedy_boxed_rate": sum(extract_boxed(t) is not None for t in greedy) / n,
        "sampled_accuracy": sum(extract_last_number(t) == p.answer for t, p in zip(sampled, problems)) / n,
        "sampled_boxed_rate": sum(extract_boxed(t) is not None for t in sampled) / n,
        "sampled_boxed_correct_rate": sum(extract_boxed(t) == p.answer for t, p in zip(sampled, problems)) / n,
    }


def pretrain(
    out_dir: str | Path = SHIPPED,
    steps: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    box_rate: float = 0.05,
    layers: int = 4,
    intermediate: int = 256,
    threads: int = 2,
    log_every: int = 50,
) -> dict[str, Any]:
    """Train the tiny model from scratch on freshly generated documents and save it (weights, config,
    tokenizer, README) atomically to `out_dir`. Returns the training settings and measured behaviour."""
    from transformers import AutoModelForCausalLM

    from steerlens.tiny import byte_tokenizer, tiny_config

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(
        tiny_config("qwen2", layers=layers, intermediate=intermediate, max_positions=256), dtype=torch.float32
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(seed)
    prefix = torch.tensor(tokenizer(_system_block(tokenizer), add_special_tokens=False)["input_ids"])
    warmup = max(1, steps // 20)
    start = time.time()
    model.train()
    for step in range(steps):
        ids, mask, labels = _batch(tokenizer, rng, batch_size, box_rate)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        loss = _document_loss(model, prefix, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    seconds = time.time() - start
    model.eval()
    report = {
        "settings": dict(
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            box_rate=box_rate,
            layers=layers,
            intermediate=intermediate,
            threads=threads,
        ),
        "pretrain_seconds": round(seconds, 1),
        "base_behaviour": evaluate_base(model, tokenizer),
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    """`python -m steerlens.toy`: regenerate the shipped toy checkpoint (or write one elsewhere)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED, help="checkpoint directory to (over)write")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--box-rate", type=float, default=0.05)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=256)
    args = parser.parse_args(argv)
    report = pretrain(
        args.out,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        box_rate=args.box_rate,
        layers=args.layers,
        intermediate=args.intermediate,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
