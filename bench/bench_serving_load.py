"""`steerlens serve` under sustained load, and the bank's cost when one batch spreads over many sets (issue 31,
item 8). A benchmark, not a test: it prints a table and records its figures; nothing asserts a time.

    python bench/bench_serving_load.py                                  # both parts, a tiny model, 2,000 requests
    python bench/bench_serving_load.py --parts load --requests 100      # a smoke run
    python bench/bench_serving_load.py --model smollm2-135m --requests 400 --mix-prompts 256 --rounds 3
    python bench/bench_serving_load.py --parts load --sets 0            # the same load on vLLM's stock server
    python bench/bench_serving_load.py --markdown                       # the tables of what is recorded

- load: `steerlens serve` (`LocalServer`, vLLM's OpenAI server with the steering middleware) with `--sets`
  named vector sets (random, saved with `SteeringVectors.save`) and an API key. The real `openai.AsyncOpenAI`
  client keeps `--concurrency` requests in flight until `--requests` have been sent: completions and chat
  completions, streaming and not, each under one of the sets or the base model (by model name), sampled
  with `ignore_eos` so every finished request has `--max-tokens` tokens; `--drop` of the streaming clients
  close their stream after a few chunks. Measured: requests/s and tokens/s over the whole load, p50/p99
  latency (and time to first token when streaming), errors by kind (dropped clients apart), the RSS of the
  server's processes (API server and engine core) after a warm-up, at half the load and after it, and each
  set's in-use count at half the load and at the end, plus vLLM's own running/waiting request gauges.
- mix: one `SteeredLLM` with 256 named sets; the same batch of `--mix-prompts` requests spread over K = 1,
  16, 64 and 256 distinct sets (request i under set i mod K), in alternating rounds (`bench_vector_sets.
  alternate`); throughput as a ratio to K = 1 in the same run. Prefix caching is off unless --prefix-cache:
  with it, K = 1 would also share the prompts' common prefix between requests, which distinct sets must not
  (their cache salts differ), and the ratio would mix that in with the bank's own cost.

How a set's in-use count is read: the middleware keeps it (`VectorBank.in_use`) but no endpoint lists it. A
server started with `--allow-vector-loading` refuses to reload a set while requests use it, with 409 "in use
by N running request(s)", and reloads it (200) when none does; so reloading every set with its own file
reads every count (0, or N). At half the load that shows the reading can see requests; at the end every
set must read 0.

The tiny model (`steerlens.tiny.build_tiny_model`: qwen2, 4 layers, d = 128, byte tokenizer) lets 2,000
requests finish in minutes on 2 cores; its figures are the serving path's (HTTP, middleware, scheduler), not
a real model's compute. Every finished part is recorded in --json under its part, model and settings; a rerun
skips what is recorded (--redo runs it again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_vector_sets import alternate, random_sets, requests  # noqa: E402

from steerlens.io import write_json  # noqa: E402
from steerlens.models import config_shape  # noqa: E402

HERE = Path(__file__).parent
WORK = Path(tempfile.gettempdir()) / "steerlens-bench-serving"
TINY = "tiny"  # --model value for the locally built tiny model
KEY = "bench-key"
KS = (1, 16, 64, 256)
IN_USE = re.compile(r"in use by (\d+) running request")


def model_source(model: str) -> str:
    """A model name or path to serve: the tiny model is built once into the work folder."""
    if model != TINY:
        return model
    from steerlens.tiny import build_tiny_model

    path = WORK / "tiny-qwen2"
    if not (path / "config.json").is_file():
        build_tiny_model(path)
    return str(path)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def server_rss(pid: int) -> dict[str, float]:
    """Resident MiB of the server's process and each of its descendants (the engine core), and their sum."""
    root = psutil.Process(pid)
    rss = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            rss[f"{proc.pid}:{proc.name()}"] = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return {"total_mib": sum(rss.values()), **rss}


@dataclass
class Job:
    """One request of the load: which API, set, whether it streams and whether its client drops it."""

    index: int
    api: str  # "completions" or "chat"
    model: str  # a set's name, or the base model's
    stream: bool
    drop_after: int | None  # chunks read before the client closes the stream; None: reads to the end


@dataclass
class Outcome:
    job: Job
    seconds: float = 0.0
    first_token_s: float | None = None
    tokens: int = 0
    error: str | None = None
    dropped: bool = False


def jobs(args: argparse.Namespace, base: str, sets: list[str]) -> list[Job]:
    """The load's requests, the same for the same --seed: models round robin over base and the sets."""
    rng = random.Random(args.seed)
    out = []
    models = [base, *sets]
    for i in range(args.requests):
        stream = rng.random() < args.stream_share
        drop = stream and rng.random() < args.drop
        out.append(
            Job(
                i,
                rng.choice(["completions", "chat"]),
                models[i % len(models)],
                stream,
                rng.randint(1, 4) if drop else None,
            )
        )
    return out


async def send(client: Any, job: Job, prompt: str, max_tokens: int) -> Outcome:
    """Send one request and read its answer (or drop it); exceptions become the outcome's error kind."""
    import openai

    outcome = Outcome(job)
    common: dict[str, Any] = {
        "model": job.model,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": job.index,
        "extra_body": {"ignore_eos": True},
    }
    if job.stream:
        common.update(stream=True, stream_options={"include_usage": True})
    start = time.perf_counter()
    try:
        if job.api == "chat":
            reply = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
        else:
            reply = await client.completions.create(prompt=prompt, **common)
        if not job.stream:
            outcome.tokens = reply.usage.completion_tokens
        else:
            chunks = 0
            async for chunk in reply:
                if chunk.choices and outcome.first_token_s is None:
                    outcome.first_token_s = time.perf_counter() - start
                chunks += bool(chunk.choices)
                if chunk.usage is not None:
                    outcome.tokens = chunk.usage.completion_tokens
                if job.drop_after is not None and chunks >= job.drop_after:
                    await reply.close()  # the client goes away mid-stream: the connection is closed
                    outcome.dropped = True
                    break
        if not outcome.dropped and outcome.tokens != max_tokens:
            outcome.error = f"{outcome.tokens} tokens, not {max_tokens}"
    except openai.APIStatusError as err:
        outcome.error = f"HTTP {err.status_code}"
    except Exception as err:  # noqa: BLE001 - every failure is counted by kind
        outcome.error = type(err).__name__
    outcome.seconds = time.perf_counter() - start
    return outcome


async def in_use_counts(http: Any, endpoint: str, files: dict[str, Path]) -> dict[str, int | str]:
    """Each set's in-use count, read by reloading the set with its own file (see the module doc): 200 is 0,
    409 says N; any other answer is recorded as it came."""
    counts: dict[str, int | str] = {}
    for name, path in files.items():
        reply = await http.post(
            endpoint, json={"name": name, "path": str(path)}, headers={"Authorization": f"Bearer {KEY}"}
        )
        if reply.status_code == 200:
            counts[name] = 0
        elif reply.status_code == 409 and (found := IN_USE.search(reply.text)):
            counts[name] = int(found.group(1))
        else:
            counts[name] = f"HTTP {reply.status_code}: {reply.text[:200]}"
    return counts


async def engine_gauges(http: Any, root: str) -> dict[str, float]:
    """vLLM's running and waiting request gauges from the server's /metrics."""
    text = (await http.get(f"{root}/metrics")).text
    gauges = {"running": 0.0, "waiting": 0.0}
    for line in text.splitlines():
        for gauge in gauges:
            if line.startswith(f"vllm:num_requests_{gauge}"):
                gauges[gauge] += float(line.rsplit(" ", 1)[1])
    return gauges


@dataclass
class LoadRun:
    """The load's shared state: outcomes, the RSS samples, the readings taken at half the load."""

    outcomes: list[Outcome] = field(default_factory=list)
    rss_samples: list[float] = field(default_factory=list)
    mid: dict[str, Any] = field(default_factory=dict)
    trajectory: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (requests done, RSS)
    measuring: bool = False  # the load itself, not the warm-up


async def drive(args: argparse.Namespace, server: Any, files: dict[str, Path], base: str) -> dict[str, Any]:
    """Warm up, then the load; readings before, at half and after it."""
    import httpx
    import openai

    from steerlens.data.generated import generate_problems

    prompts = [p.problem for p in generate_problems(64, seed=11)]
    client = openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=args.request_timeout)
    http = httpx.AsyncClient(timeout=120)
    root = server.url.removesuffix("/v1")
    endpoint = f"{root}/steerlens/vectors"
    pid = server.process.pid
    todo = jobs(args, base, list(files))
    run = LoadRun()

    async def worker(queue: asyncio.Queue[Job]) -> None:
        while not queue.empty():
            job = queue.get_nowait()
            run.outcomes.append(await send(client, job, prompts[job.index % len(prompts)], args.max_tokens))
            if run.measuring and len(run.outcomes) % max(1, len(todo) // 10) == 0:
                run.trajectory.append((len(run.outcomes), server_rss(pid)))
            if run.measuring and len(run.outcomes) == len(todo) // 2 and not run.mid:  # once, by one worker
                run.mid["rss"] = server_rss(pid)
                run.mid["in_use"] = await in_use_counts(http, endpoint, files)
                run.mid["gauges"] = await engine_gauges(http, root)

    async def sample_rss(stop: asyncio.Event) -> None:
        while not stop.is_set():
            run.rss_samples.append(server_rss(pid)["total_mib"])
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                pass

    async def load(batch: list[Job]) -> float:
        queue: asyncio.Queue[Job] = asyncio.Queue()
        for job in batch:
            queue.put_nowait(job)
        start = time.perf_counter()
        await asyncio.gather(*(worker(queue) for _ in range(args.concurrency)))
        return time.perf_counter() - start

    try:
        # warm-up: every set and both APIs, streaming and not, none dropped; not counted
        warm = [
            Job(-1 - i, ("completions", "chat")[i % 2], [base, *files][i % (len(files) + 1)], i % 4 < 2, None)
            for i in range(2 * args.concurrency)
        ]
        await load(warm)
        warm_errors = [o.error for o in run.outcomes if o.error]
        run.outcomes.clear()
        await asyncio.sleep(args.settle)
        rss_before = server_rss(pid)
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(stop))
        run.measuring = True
        wall = await load(todo)
        stop.set()
        await sampler
        at_end = {"in_use": await in_use_counts(http, endpoint, files), "gauges": await engine_gauges(http, root)}
        waited = 0.0
        while any(count != 0 for count in at_end["in_use"].values()) and waited < 30:  # how long until they are
            await asyncio.sleep(1.0)
            waited += 1.0
            at_end = {"in_use": await in_use_counts(http, endpoint, files), "gauges": await engine_gauges(http, root)}
        await asyncio.sleep(args.settle)
        rss_after = server_rss(pid)
    finally:
        await client.close()
        await http.aclose()
    return summarize(args, run, wall, warm_errors, rss_before, rss_after, at_end, waited)


def summarize(
    args: argparse.Namespace,
    run: LoadRun,
    wall: float,
    warm_errors: list[str | None],
    rss_before: dict[str, float],
    rss_after: dict[str, float],
    at_end: dict[str, Any],
    waited: float,
) -> dict[str, Any]:
    finished = [o for o in run.outcomes if not o.error and not o.dropped]
    errors: dict[str, int] = {}
    for o in run.outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1

    def latency(outcomes: list[Outcome]) -> dict[str, float | None]:
        seconds = [o.seconds for o in outcomes]
        return {"p50_s": percentile(seconds, 50), "p99_s": percentile(seconds, 99)}

    first = [o.first_token_s for o in finished if o.first_token_s is not None]
    mid = run.mid
    return {
        "requests": len(run.outcomes),
        "concurrency": args.concurrency,
        "sets": args.sets,
        "max_tokens": args.max_tokens,
        "streaming": sum(o.job.stream for o in run.outcomes),
        "chat": sum(o.job.api == "chat" for o in run.outcomes),
        "finished": len(finished),
        "dropped": sum(o.dropped for o in run.outcomes),
        "errors": errors,
        "warmup_errors": len([e for e in warm_errors if e]),
        "wall_s": wall,
        "requests_per_s": len(finished) / wall,
        "tokens_per_s": sum(o.tokens for o in finished) / wall,
        "latency": latency(finished),
        "latency_streaming": latency([o for o in finished if o.job.stream]),
        "latency_non_streaming": latency([o for o in finished if not o.job.stream]),
        "first_token": {"p50_s": percentile(first, 50), "p99_s": percentile(first, 99)},
        "rss_before": rss_before,
        "rss_mid": mid.get("rss"),
        "rss_after": rss_after,
        "rss_peak_mib": max(run.rss_samples, default=None),
        "rss_trajectory": run.trajectory,
        "rss_growth_mib": rss_after["total_mib"] - rss_before["total_mib"],
        "in_use_mid": mid.get("in_use"),
        "gauges_mid": mid.get("gauges"),
        "in_use_end": at_end["in_use"],
        "gauges_end": at_end["gauges"],
        "in_use_zero_after_s": waited,
    }


def bench_load(args: argparse.Namespace) -> dict[str, Any]:
    """`steerlens serve` with --sets sets under --requests requests at --concurrency (see the module doc)."""
    from steerlens import serving
    from steerlens.serving import LocalServer, steering_settings

    source = model_source(args.model)
    folder = WORK / "vectors" / Path(source).name
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        name: vectors.save(folder / f"{name}.safetensors")
        for name, vectors in random_sets(config_shape(source), args.sets).items()
    }
    # --sets 0: vLLM's stock server (no steering, no middleware), the same load on the base model, for comparison
    settings = steering_settings(source, files, api_key=KEY, allow_loading=True) if files else None
    if args.kv_cache_mib is not None:  # the server's KV cache on CPU (LocalServer's constant; 1 GiB unless set)
        serving.CPU_KV_CACHE_BYTES = args.kv_cache_mib << 20
    start = time.perf_counter()
    with LocalServer(
        source, log_path=WORK / "server.log", max_model_len=args.max_model_len, steering=settings
    ) as server:
        started = time.perf_counter() - start
        result = asyncio.run(drive(args, server, files, base=source))
        log = server.log_tail(chars=1 << 24)
    return {
        **result,
        "server_start_s": started,
        "server_log_error_lines": sum("ERROR" in line or "Traceback" in line for line in log.splitlines()),
    }


def bench_mix(args: argparse.Namespace) -> dict[str, Any]:
    """One engine, 256 named sets; the same batch over K = 1, 16, 64, 256 distinct sets, alternating rounds."""
    from transformers import AutoTokenizer

    from steerlens.backends.vllm import SteeredLLM

    source = model_source(args.model)
    sets = random_sets(config_shape(source), max(KS))
    batch = argparse.Namespace(prompts=args.mix_prompts, samples=1, max_new_tokens=args.mix_tokens)
    prompts, params = requests(batch, AutoTokenizer.from_pretrained(source))
    engine = SteeredLLM(
        source, max_vector_sets=len(sets), max_model_len=args.max_model_len, enable_prefix_caching=args.prefix_cache
    )
    for name, vectors in sets.items():
        engine.add(name, vectors)
    names = list(sets)
    try:
        seconds = alternate(
            {
                f"K={k}": (
                    lambda k=k: engine.generate(prompts, params, vectors=[names[i % k] for i in range(len(prompts))])
                )
                for k in KS
            },
            args.rounds,
        )
    finally:
        engine.close()
    tokens = len(prompts) * args.mix_tokens
    return {
        "prompts": len(prompts),
        "new_tokens": args.mix_tokens,
        "rounds": args.rounds,
        "prefix_cache": args.prefix_cache,
        "seconds": seconds,
        "tokens_per_s": {k: tokens / s for k, s in seconds.items()},
        "throughput_vs_one_set": {k: seconds["K=1"] / s - 1 for k, s in seconds.items()},
    }


def settings_of(part: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a recorded part was measured with: a rerun with the same settings skips it."""
    keys = {
        "load": (
            "requests",
            "concurrency",
            "sets",
            "max_tokens",
            "stream_share",
            "drop",
            "seed",
            "max_model_len",
            "kv_cache_mib",
        ),
        "mix": ("mix_prompts", "mix_tokens", "rounds", "prefix_cache", "max_model_len"),
    }[part]
    return {"part": part, "model": args.model, **{key: getattr(args, key) for key in keys}}


def record_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The parts recorded in --json (one row per part, model and settings)."""
    return json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else []


def machine() -> dict[str, Any]:
    import platform

    from vllm import __version__ as vllm_version

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": psutil.cpu_count(),
        "torch": torch.__version__,
        "vllm": vllm_version,
        "platform": platform.platform(),
    }


def ms(figure: dict[str, float | None]) -> str:
    """p50 / p99 in milliseconds."""
    return " / ".join("" if figure[q] is None else f"{1e3 * figure[q]:.0f}" for q in ("p50_s", "p99_s"))


def load_table(r: dict[str, Any]) -> list[str]:
    before, after = r["rss_before"]["total_mib"], r["rss_after"]["total_mib"]
    rss = f"{before:.0f} -> {after:.0f} MiB ({r['rss_growth_mib']:+.0f})"
    if r.get("rss_mid"):
        rss += f"; {r['rss_mid']['total_mib']:.0f} at half, peak {r['rss_peak_mib']:.0f}"
    if r.get("rss_trajectory"):
        steps = ", ".join(f"{done}: {rss['total_mib']:.0f}" for done, rss in r["rss_trajectory"])
        rss += f"; by requests done: {steps}"
    gauges = r["gauges_end"]
    return [
        f"{r['requests']} requests ({r['streaming']} streaming, {r['chat']} chat) at concurrency {r['concurrency']} "
        f"over {r['sets']} sets and the base model, {r['max_tokens']} tokens each",
        "",
        "| figure | value |",
        "|---|---|",
        f"| finished / dropped by their client | {r['finished']} / {r['dropped']} |",
        f"| errors (by kind) | {sum(r['errors'].values())} {r['errors'] or ''} |",
        f"| throughput | {r['requests_per_s']:.1f} req/s, {r['tokens_per_s']:.0f} tokens/s ({r['wall_s']:.0f} s) |",
        f"| latency p50 / p99, all finished (ms) | {ms(r['latency'])} |",
        f"| streaming; non-streaming p50 / p99 (ms) | {ms(r['latency_streaming'])}; {ms(r['latency_non_streaming'])} |",
        f"| time to first token p50 / p99 (ms) | {ms(r['first_token'])} |",
        f"| server RSS (API server + engine core), after warm-up -> after | {rss} |",
        f"| in-use counts at half the load | {r['in_use_mid']} |",
        f"| in-use counts at the end | {r['in_use_end']} (after {r['in_use_zero_after_s']:.0f} s) |",
        f"| vLLM running / waiting at the end | {gauges['running']:.0f} / {gauges['waiting']:.0f} |",
    ]


def mix_table(r: dict[str, Any]) -> list[str]:
    rows = [
        f"{r['prompts']} prompts x {r['new_tokens']} new tokens per batch, median of {r['rounds']} alternating rounds, "
        f"prefix cache {'on' if r['prefix_cache'] else 'off'}",
        "",
        "| distinct sets in the batch | s per batch | tokens/s | throughput vs K=1 |",
        "|---|---|---|---|",
    ]
    for k, seconds in r["seconds"].items():
        rows.append(
            f"| {k} | {seconds:.2f} | {r['tokens_per_s'][k]:.0f} | {100 * r['throughput_vs_one_set'][k]:+.1f}% |"
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The recorded parts as tables."""
    out = []
    for row in rows:
        m, part = row["machine"], row["settings"]["part"]
        out.append(f"{part}: {row['settings']['model']}, {m['cpu_count']} cores, vllm {m['vllm']}, {m['date']}; ")
        out[-1] += "\n".join((load_table if part == "load" else mix_table)(row["result"])) + "\n"
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY, help=f"{TINY!r} (built locally) or a model name or path")
    parser.add_argument("--parts", default="load,mix", help="any of load,mix")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sets", type=int, default=8, help="named vector sets the server holds (0: stock vLLM)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of requests that stream")
    parser.add_argument("--drop", type=float, default=0.05, help="share of streaming clients that drop mid-stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before each RSS reading")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-mib", type=int, default=None, help="the server's KV cache on CPU (default 1 GiB)")
    parser.add_argument("--mix-prompts", type=int, default=256, help="requests per batch in the mix part")
    parser.add_argument("--mix-tokens", type=int, default=64, help="new tokens per request in the mix part")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefix-cache", action="store_true", help="mix part: keep vLLM's prefix cache on")
    parser.add_argument(
        "--json", default=str(HERE / "serving_load.json"), help="the record: a row per part, model and settings"
    )
    parser.add_argument("--redo", action="store_true", help="run parts already recorded with these settings")
    parser.add_argument("--markdown", action="store_true", help="print the record's tables and stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(record_of(args)))
        return
    parts = {"load": bench_load, "mix": bench_mix}
    for part in args.parts.split(","):
        settings = settings_of(part, args)
        rows = record_of(args)
        if not args.redo and any(row["settings"] == settings for row in rows):
            print(f"{part}: recorded already with these settings (--redo runs it again)", file=sys.stderr)
            continue
        row = {"settings": settings, "machine": machine(), "result": parts[part](args)}
        rows = [r for r in rows if r["settings"] != settings] + [row]
        write_json(args.json, rows)
        print(markdown([row]), flush=True)


if __name__ == "__main__":
    main()
