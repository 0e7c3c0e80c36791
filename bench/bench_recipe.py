"""Does a training recipe learn on every seed? Base-model signal, then N seeds trained and evaluated.

    python bench/bench_recipe.py probe --config analyses/presets/smollm2-135m-word-arith.yaml \
        --set temperature=1.0,max_new_tokens=48 --set temperature=0.7,max_new_tokens=96
    python bench/bench_recipe.py seeds --config analyses/presets/smollm2-135m-word-arith.yaml --seeds 0 1 2 3 4

- `probe`: the base model's sampled completions under each setting (`--set key=value,...` overrides the
  config), on the config's training problems: success, truncation, and the share of prompt groups whose
  rewards are all equal (no RLOO signal), with the rollout's tokens per second. One engine for all settings.
- `seeds`: trains the config once per training seed (`seed`; the data seed stays fixed, so every seed sees
  the same problems) into `--out/seed<N>`, and prints one row per seed: reward, no-signal share and
  truncation (first -> last fifth of steps), held-out greedy accuracy before -> after on the config's fixed
  held-out set, minutes per run. Resumable: a finished seed (its summary.json) is not rerun, a stopped one
  resumes from its newest checkpoint; rows accumulate in `--out/seeds.jsonl`.
Prints Markdown; `--json FILE` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from steerlens.config import build_config, parse_overrides
from steerlens.data.generated import generate
from steerlens.io import append_jsonl, read_jsonl, write_json
from steerlens.rl.config import TrainConfig
from steerlens.rl.job import train
from steerlens.rl.report import no_signal_share
from steerlens.rollout import make_rollout, sample_seed
from steerlens.task import MathReward, is_success, template_prompt


def settings(text: str) -> dict[str, str]:
    """`key=value,key=value` -> overrides."""
    return dict(part.split("=", 1) for part in text.split(",") if part)


def probe(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The base model's signal under each setting, on one engine."""
    base = build_config(TrainConfig, args.config, parse_overrides(args.override))
    problems = generate(base.data, args.problems, seed=base.data_seed)
    rollout = make_rollout(base.model, engine="vllm", seed=0)
    prompt = template_prompt(rollout.tokenizer, base.template)
    reward = MathReward.for_template(rollout.tokenizer, base.template, base.answer_fallback)
    rows = []
    try:
        for text in args.set or [""]:
            cfg = build_config(TrainConfig, args.config, {**parse_overrides(args.override), **settings(text)})
            start = time.perf_counter()
            groups = rollout.generate(
                [prompt(p) for p in problems],
                cfg.generations,
                cfg.sampling(),
                seeds=[sample_seed(0, 0, i) for i in range(len(problems))],
            )
            seconds = time.perf_counter() - start
            values = reward([c.text for g in groups for c in g], [p for p, g in zip(problems, groups) for _ in g])
            ok = [is_success(reward, v) for v in values]
            tokens = sum(len(c.token_ids) for g in groups for c in g)
            rows.append(
                {
                    "setting": text or "config",
                    "generations": cfg.generations,
                    "temperature": cfg.temperature,
                    "max_new_tokens": cfg.max_new_tokens,
                    "success": sum(ok) / len(ok),
                    "truncated": sum(c.truncated for g in groups for c in g) / len(ok),
                    "no_signal_groups": no_signal_share([float(v) for v in values], cfg.generations),
                    "mean_tokens": tokens / len(ok),
                    "tokens_per_s": tokens / seconds,
                    "seconds": seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        rollout.close()
        reward.close()
    return rows


FORWARD_GFLOP_PER_TOKEN = 0.269  # SmolLM2-135M, one forward pass per token (2 x parameters)
MATMUL_GFLOPS = 217.0  # torch fp32 matmul on these 2 cores (bench figure quoted in issue 28)


def seed_row(seed: int, run: Path, minutes: float | None) -> dict[str, Any]:
    """One seed's line of the table, from its run folder (summary.json, metrics.jsonl). The floors count one
    forward per completion token for sampling and two (forward + input-gradient backward) for the update."""
    summary = json.loads((run / "summary.json").read_text())
    rows = read_jsonl(run / "metrics.jsonl")[0]
    cfg = summary["config"]
    tokens = [r["completion_len_mean"] * cfg["prompts_per_step"] * cfg["generations"] for r in rows]
    floor = [t * FORWARD_GFLOP_PER_TOKEN / MATMUL_GFLOPS for t in tokens]
    return {
        "seed": seed,
        "reward": [summary["reward_first_steps"], summary["reward_last_steps"]],
        "no_signal": [summary.get("no_signal_share_first_steps"), summary.get("no_signal_share_last_steps")],
        "truncated": [summary.get("truncation_first_steps"), summary.get("truncation_last_steps")],
        "heldout": [summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]],
        "step_seconds": summary["mean_step_seconds"],
        "minutes": minutes,
        "rollout_floor_share": sum(floor) / sum(r["time_rollout"] for r in rows),
        "update_floor_share": 2 * sum(floor) / sum(r["time_forward_backward"] for r in rows),
    }


def seeds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train each seed (or resume it, or keep it when finished) and collect its row."""
    out = Path(args.out)
    log = out / "seeds.jsonl"
    minutes = {row["seed"]: row["minutes"] for row in read_jsonl(log)[0]} if log.is_file() else {}
    base = build_config(TrainConfig, args.config, parse_overrides(args.override))
    for seed in args.seeds:
        run = out / f"seed{seed}"
        if (run / "summary.json").is_file():
            continue
        cfg = replace(base, seed=seed, out_dir=str(run), resume=run.exists(), progress=args.progress)
        start = time.perf_counter()
        train(cfg)
        minutes[seed] = (time.perf_counter() - start) / 60
        append_jsonl(log, {"seed": seed, "minutes": minutes[seed]})
    return [seed_row(s, out / f"seed{s}", minutes.get(s)) for s in args.seeds]


def fmt(pair: list[float | None], digits: int = 2, sign: bool = False) -> str:
    if pair[0] is None or pair[1] is None:
        return "-"
    spec = f"+.{digits}f" if sign else f".{digits}f"
    return f"{pair[0]:{spec}} -> {pair[1]:{spec}}"


def seeds_markdown(rows: list[dict[str, Any]]) -> str:
    """The per-seed table with the held-out gain's mean, std and worst seed."""
    lines = [
        "| seed | reward (first -> last fifth) | no-signal groups | truncated | held-out greedy | s/step | "
        "floor / rollout | floor / update | min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
        lines.append(
            f"| {r['seed']} | {fmt(r['reward'], sign=True)} | {fmt(r['no_signal'])} | {fmt(r['truncated'])} | "
            f"{fmt(r['heldout'], 3)} | {r['step_seconds']:.1f} | {r['rollout_floor_share']:.0%} | "
            f"{r['update_floor_share']:.0%} | {minutes} |"
        )
    gains = [100 * (r["heldout"][1] - r["heldout"][0]) for r in rows]
    if gains:
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        worst = min(rows, key=lambda r: r["heldout"][1] - r["heldout"][0])
        lines.append(
            f"\nheld-out gain: {statistics.mean(gains):+.1f} ± {spread:.1f} points over {len(gains)} seeds; "
            f"worst seed {worst['seed']}: {min(gains):+.1f}; rises on {sum(g > 0 for g in gains)} of {len(gains)}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["probe", "seeds"])
    parser.add_argument("--config", default="analyses/presets/smollm2-135m-word-arith.yaml")
    parser.add_argument("--set", action="append", help="probe: one setting, key=value,... (repeatable)")
    parser.add_argument("--problems", type=int, default=32, help="probe: training problems sampled")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="bench/recipe/smollm2-135m-word-arith", help="seeds: where the runs go")
    parser.add_argument("--progress", action="store_true", help="seeds: show each run's progress bar")
    parser.add_argument("--json", help="also write the rows to this file")
    args, args.override = parser.parse_known_args()
    rows = probe(args) if args.mode == "probe" else seeds(args)
    if args.mode == "seeds":
        print(seeds_markdown(rows))
    if args.json:
        write_json(Path(args.json), rows)


if __name__ == "__main__":
    main()
