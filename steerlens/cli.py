"""The `steerlens` command line: one subcommand per job, each a thin layer over library functions.

Jobs take `--config FILE.yaml` plus `--key value` overrides of their config dataclass; bad input is
reported in one line naming what is wrong, without a traceback. Commands only turn paths and names into
objects, call a library function, save what it returns and print where. Nothing in the library imports this.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from steerlens.analysis.llm_client import ChatConfig
from steerlens.cli_common import CONFIG_FILE, EVAL_COMMAND, JOB, PRINT_CONFIG, TRAIN_COMMAND, friendly, job_config
from steerlens.cli_study import study
from steerlens.errors import SteerlensError
from steerlens.redact import RedactingFilter, remember

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="steerlens: train and study steering vectors (one vector per layer, base weights frozen).",
)


QUIET_ENV = "VLLM_LOGGING_LEVEL"
LOG_STREAM_ENV = "VLLM_LOGGING_STREAM"  # vLLM logs to stdout unless told; its processes inherit the setting


@app.callback()
def main(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="show vLLM's and transformers' INFO logs "
        "(e.g. vLLM's ~80 lines of engine configuration); default: only their "
        "warnings and errors",
    ),
) -> None:
    """steerlens: train and study steering vectors (one vector per layer, base weights frozen)."""
    if not verbose:
        quiet_libraries()
    os.environ.setdefault(LOG_STREAM_ENV, "ext://sys.stderr")  # stdout is the results (tables, summaries, paths)
    show_messages()


def show_messages() -> None:
    """steerlens's own messages (a checkpoint skipped, a torn log repaired, answers dropped) on stderr,
    one plain line each; replaces the handler of an earlier command in the same process. Every record is
    redacted (`steerlens.redact`), and so are other libraries' warnings that reach Python's last-resort handler."""
    logger = logging.getLogger("steerlens")
    logger.handlers = [h for h in logger.handlers if h.get_name() != "steerlens-cli"]
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("steerlens-cli")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    last_resort = logging.lastResort
    if last_resort is not None and not any(isinstance(f, RedactingFilter) for f in last_resort.filters):
        last_resort.addFilter(RedactingFilter())


def quiet_libraries() -> None:
    """Keep vLLM and transformers to warnings and errors, unless the user set $VLLM_LOGGING_LEVEL.

    vLLM reads the variable once, when it is imported, and its worker processes inherit the environment,
    so this runs before any vLLM import; the loggers cover what is imported already.
    """
    if QUIET_ENV not in os.environ:
        os.environ[QUIET_ENV] = "WARNING"
        logging.getLogger("vllm").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.WARNING)


@app.command(cls=TRAIN_COMMAND, context_settings=JOB)
@friendly
def train(ctx: typer.Context, config: Path | None = CONFIG_FILE, print_config: bool = PRINT_CONFIG) -> None:
    """Train steering vectors with RLOO (default: the toy demo, a few minutes on a CPU)."""
    from steerlens.rl.config import TrainConfig

    cfg = job_config(TrainConfig, config, ctx.args, print_config)
    if cfg is None:
        return
    from steerlens.rl.job import train as run_training
    from steerlens.rl.report import format_report

    summary = run_training(cfg)
    if summary:
        typer.echo(format_report(summary))


@app.command("eval", cls=EVAL_COMMAND, context_settings=JOB)
@friendly
def eval_(ctx: typer.Context, config: Path | None = CONFIG_FILE, print_config: bool = PRINT_CONFIG) -> None:
    """Evaluate a model with or without steering vectors on math benchmarks (resumable; writes tables)."""
    from steerlens.evaluation.config import EvalConfig

    cfg = job_config(EvalConfig, config, ctx.args, print_config)
    if cfg is None:
        return
    from steerlens.evaluation.runner import evaluate

    tables = evaluate(cfg)
    typer.echo(tables["summary"].to_markdown(index=False, floatfmt=".4f"))
    typer.echo(f"samples and tables: {cfg.out_dir}")


@app.command()
@friendly
def table(
    runs: list[Path] = typer.Argument(..., help="evaluation directories (from steerlens eval)"),
    out: Path = typer.Option(Path("table1"), "--out", "-o", help="output prefix: writes PREFIX.csv, .md and .html"),
) -> None:
    """Combine evaluations into the paper's Table 1 layout (model x setup x benchmark, mean ± std)."""
    from steerlens.evaluation.tables import combine_runs

    typer.echo(combine_runs(runs, out).to_markdown())
    typer.echo(f"written: {out.with_suffix('.csv')}, {out.with_suffix('.md')}, {out.with_suffix('.html')}")


@app.command()
@friendly
def analyze(
    vectors: Path = typer.Argument(..., help="steering vectors file (.safetensors)"),
    model: str = typer.Option(..., "--model", "-m", help="base model: short name, local directory or hub id"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (report.html, tables/, figures/)"),
    analyses: str = typer.Option("logit_lens,stats,clustering", "--analyses", help="comma-separated analyses"),
    top_k: int = typer.Option(50, "--top-k", help="top/bottom tokens per layer in the logit lens"),
    final_norm: bool = typer.Option(False, "--final-norm", help="pass vectors through the model's final norm first"),
    endpoint: str | None = typer.Option(
        None,
        "--endpoint",
        help="OpenAI-compatible URL for LLM clustering (default $OPENAI_BASE_URL; none: offline clustering)",
    ),
    llm_model: str | None = typer.Option(
        None,
        "--llm-model",
        help="chat model for clustering (default: the endpoint's only model); the key comes from $OPENAI_API_KEY",
    ),
    llm_timeout: float = typer.Option(
        ChatConfig.deadline_s,
        "--llm-timeout",
        metavar="SECONDS",
        help="most seconds one clustering request may take, retries and the whole answer included",
    ),
    compare: list[Path] = typer.Option(
        [], "--compare", metavar="PATH", help="another run's vectors (e.g. a seed) to compare per layer; repeatable"
    ),
) -> None:
    """Analyse steering vectors (logit lens, statistics, token clustering) into one HTML report."""
    from steerlens.analysis.clustering import ClusteringConfig
    from steerlens.analysis.report import analyze as run_analyses
    from steerlens.models import load_model
    from steerlens.vectors import SteeringVectors

    chosen = [name.strip() for name in analyses.split(",") if name.strip()]
    clustering = ClusteringConfig(model=llm_model, base_url=endpoint, deadline_s=llm_timeout)
    steering = SteeringVectors.load(vectors)
    others = {str(path): SteeringVectors.load(path) for path in compare}
    hf_model, tokenizer = load_model(model)
    result = run_analyses(
        steering,
        hf_model,
        tokenizer,
        chosen,
        name=str(vectors),
        top_k=top_k,
        final_norm=final_norm,
        compare=others,
        clustering=clustering,
    )
    result.save(out)
    typer.echo(f"report: {out / 'report.html'}")
    typer.echo(f"tables: {', '.join(sorted(result.tables))} in {out / 'tables'}")


@app.command()
@friendly
def serve(
    model: str = typer.Option(
        ..., "--model", "-m", help="model to serve: short name (smollm2-135m), local directory or hub id"
    ),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="address to listen on (loopback by default; another "
        "address exposes the server to the network: set --api-key)",
    ),
    max_model_len: int = typer.Option(4096, "--max-model-len", help="context length the server accepts"),
    vectors: list[str] = typer.Option(
        [],
        "--vectors",
        help="NAME=FILE: serve these steering vectors as model NAME "
        "(repeat, or comma-separate); requests may also send "
        '{"steerlens": {"vectors": NAME, "scale": S}}',
    ),
    api_key: str | None = typer.Option(None, "--api-key", help="require this key (Authorization: Bearer KEY)"),
    allow_vector_loading: bool = typer.Option(
        False,
        "--allow-vector-loading",
        help="open POST /steerlens/vectors {name, path, scale}: load vector files at run time",
    ),
    max_vector_sets: int | None = typer.Option(
        None, "--max-vector-sets", help="named sets the engine can hold (default: 8, or as many as --vectors gives)"
    ),
    log: Path | None = typer.Option(
        None, "--log", help="file for the server's output (default: steerlens-serve-PORT.log in the temp folder)"
    ),
    placement: str | None = typer.Option(
        None,
        "--placement",
        help="where the engine adds vectors (default: where --vectors' files do, else layer_output)",
    ),
) -> None:
    """Serve a model with vLLM's OpenAI-compatible server, e.g. for token clustering; with --vectors, each
    vector set is its own model name beside the base model. The server's output goes to --log and, once it
    answers, to stderr (while it starts only with --verbose); a server that cannot start is one line saying why.
    Ctrl-C stops it; the exit code is the server's."""
    from steerlens.serving import serve_in_foreground, steering_settings

    remember(api_key)
    files = dict(entry.split("=", 1) for item in vectors for entry in item.split(",") if "=" in entry)
    if len(files) != sum(len(item.split(",")) for item in vectors):
        raise SteerlensError(f"--vectors takes NAME=FILE with distinct names, got {', '.join(vectors)}")
    steering = (
        steering_settings(model, files, api_key, allow_vector_loading, max_vector_sets, placement)
        if files or allow_vector_loading or api_key or placement
        else None
    )
    code = serve_in_foreground(model, port, host=host, max_model_len=max_model_len, steering=steering, log_path=log)
    raise typer.Exit(code)


@app.command()
@friendly
def convert(
    source: Path = typer.Argument(..., help="vectors file to read"),
    target: Path = typer.Argument(..., help="file to write"),
    to: str = typer.Option(
        "auto", "--to", help="format to write: steerlens, llama.cpp, easysteer, vllm-lens (auto: from TARGET's suffix)"
    ),
    source_format: str = typer.Option("auto", "--from", help="format of SOURCE (auto: from its suffix)"),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="the model the vectors steer: gives the layer count to formats that lack it and checks the vectors fit",
    ),
    num_layers: int | None = typer.Option(None, "--num-layers", help="the model's layer count, without --model"),
    drop_layer0: bool = typer.Option(
        False,
        "--drop-layer0",
        help="llama.cpp: leave out layer 0's vector, which it cannot express (this changes the steering)",
    ),
) -> None:
    """Convert steering vectors between steerlens, llama.cpp (GGUF control vectors, also repeng's files),
    EasySteer and vllm-lens; layer n means "after decoder block n" in every one (docs/formats.md)."""
    from steerlens.formats import detect_format, read_vectors, write_vectors
    from steerlens.models import config_shape

    shape = config_shape(model) if model else None
    vectors = read_vectors(source, source_format, num_layers or (shape.num_layers if shape else None))
    if shape is not None:
        vectors.check_fits(shape)
    written = write_vectors(vectors, target, to, **({"drop_layer0": True} if drop_layer0 else {}))
    dropped = "; layer 0 left out" if drop_layer0 and 0 in vectors.layers else ""
    typer.echo(f"wrote {written} ({to if to != 'auto' else detect_format(target)}{dropped})")


app.add_typer(study, name="study")

if __name__ == "__main__":
    app()
