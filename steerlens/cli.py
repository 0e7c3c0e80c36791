"""The `steerlens` command line: one subcommand per job, each a thin layer over library functions.

Jobs take `--config FILE.yaml` plus `--key value` overrides of their config dataclass; bad input is
reported in one line naming what is wrong, without a traceback. Commands only turn paths and names into
objects, call a library function, save what it returns and print where. Nothing in the library imports this.
"""

from __future__ import annotations

import functools
import logging
import os
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperCommand

from steerlens.analysis.llm_client import ChatConfig
from steerlens.errors import SteerlensError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="steerlens: train and study steering vectors (one vector per layer, base weights frozen).",
)

JOB = {"allow_extra_args": True, "ignore_unknown_options": True}


QUIET_ENV = "VLLM_LOGGING_LEVEL"


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
    show_messages()


def show_messages() -> None:
    """steerlens's own messages (a checkpoint skipped, a torn log repaired, answers dropped) on stderr,
    one plain line each; replaces the handler of an earlier command in the same process."""
    logger = logging.getLogger("steerlens")
    logger.handlers = [h for h in logger.handlers if h.get_name() != "steerlens-cli"]
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("steerlens-cli")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def quiet_libraries() -> None:
    """Keep vLLM and transformers to warnings and errors, unless the user set $VLLM_LOGGING_LEVEL.

    vLLM reads the variable once, when it is imported, and its worker processes inherit the environment,
    so this runs before any vLLM import; the loggers cover what is imported already.
    """
    if QUIET_ENV not in os.environ:
        os.environ[QUIET_ENV] = "WARNING"
        logging.getLogger("vllm").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.WARNING)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn steerlens' input errors into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SteerlensError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


class ConfigCommand(TyperCommand):
    """A job's command whose help ends with its config's options, described only when the help is shown:
    the config modules import torch, which `steerlens --help` and the other commands need not wait for."""

    config = ""  # the job's config dataclass as "module:Class"

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from steerlens.config import describe

        options = describe(pkgutil.resolve_name(self.config)).replace("\n", "\n\n")
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text("Options of the config (YAML keys, or --key value on the command line):\n\n" + options)


def config_command(config: str) -> type[ConfigCommand]:
    """The command class of a job configured by `config` ("module:Class")."""
    return type(f"ConfigCommand({config})", (ConfigCommand,), {"config": config})


TRAIN_COMMAND = config_command("steerlens.rl.config:TrainConfig")  # steerlens train and study singles
EVAL_COMMAND = config_command("steerlens.evaluation.config:EvalConfig")


def _job_config(cls: type, config: Path | None, args: list[str], print_config: bool) -> Any:
    """The job's config from YAML plus `--key value` overrides; None after printing it if asked to."""
    from steerlens.config import build_config, to_yaml

    cfg = build_config(cls, config, args)
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return None
    return cfg


CONFIG_FILE = typer.Option(None, "--config", "-c", help="YAML file of the job's config keys")
PRINT_CONFIG = typer.Option(False, "--print-config", help="print the resolved config as YAML and exit")


@app.command(cls=TRAIN_COMMAND, context_settings=JOB)
@friendly
def train(ctx: typer.Context, config: Path | None = CONFIG_FILE, print_config: bool = PRINT_CONFIG) -> None:
    """Train steering vectors with RLOO (default: the toy demo, a few minutes on a CPU)."""
    from steerlens.rl.config import TrainConfig

    cfg = _job_config(TrainConfig, config, ctx.args, print_config)
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

    cfg = _job_config(EvalConfig, config, ctx.args, print_config)
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
        help="most seconds one clustering request may take, retries included",
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
) -> None:
    """Serve a model with vLLM's OpenAI-compatible server, e.g. for token clustering; with --vectors, each
    vector set is its own model name beside the base model."""
    import os

    from steerlens.serving import server_command, server_environment, steering_settings

    files = dict(entry.split("=", 1) for item in vectors for entry in item.split(",") if "=" in entry)
    if len(files) != sum(len(item.split(",")) for item in vectors):
        raise SteerlensError(f"--vectors takes NAME=FILE with distinct names, got {', '.join(vectors)}")
    steering = (
        steering_settings(model, files, api_key, allow_vector_loading, max_vector_sets)
        if files or allow_vector_loading or api_key
        else None
    )
    names = ", ".join([model, *files])
    typer.echo(
        f"serving {names} at http://{host}:{port}/v1 (export OPENAI_BASE_URL=http://{host}:{port}/v1); Ctrl-C stops it",
        err=True,
    )
    command = server_command(model, port, host=host, max_model_len=max_model_len, steering=steering)
    os.execve(command[0], command, server_environment(steering))


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


study = typer.Typer(
    no_args_is_help=True,
    help="Studies over many vector sets (evaluated with steerlens eval's "
    "options, given as --key value after the study's own options).",
)
app.add_typer(study, name="study")
STUDY_OUT = typer.Option(..., "--out", "-o", help="output directory (tables as CSV, figures as HTML, evaluations)")


def _study_eval(ctx: typer.Context, config: Path | None) -> Any:
    from steerlens.evaluation.config import EvalConfig

    return _job_config(EvalConfig, config, ctx.args, False)


def _report(written: list[Path]) -> None:
    typer.echo("written: " + ", ".join(str(p) for p in written))


@study.command("swap", context_settings=JOB)
@friendly
def study_swap(
    ctx: typer.Context,
    run: list[str] = typer.Option(
        ...,
        "--run",
        metavar="NAME:MODEL:VECTORS",
        help="a model and its own trained vectors; repeat for every model / seed / dataset",
    ),
    out: Path = STUDY_OUT,
    config: Path | None = CONFIG_FILE,
) -> None:
    """Apply every run's vectors to every run's model: a donor x recipient accuracy matrix, raw and normalised."""
    from steerlens.analysis.studies import run_swap
    from steerlens.vectors import SteeringVectors

    runs = {}
    for entry in run:
        name, _, rest = entry.partition(":")
        model, _, vectors = rest.rpartition(":")
        if not (name and model and vectors):
            raise typer.BadParameter(f"{entry!r}: expected NAME:MODEL:VECTORS", param_hint="--run")
        runs[name] = (model, SteeringVectors.load(vectors))
    _report(run_swap(runs, _study_eval(ctx, config), out).save(out))


@study.command("pairs", context_settings=JOB)
@friendly
def study_pairs(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="base model"),
    vectors: Path = typer.Option(..., "--vectors", help="all-layer vectors (the reference score)"),
    single: list[Path] = typer.Option(
        [],
        "--single",
        help="a single-layer vectors file (steerlens train "
        "--layers i); repeat per layer. None: each layer of --vectors alone",
    ),
    out: Path = STUDY_OUT,
    config: Path | None = CONFIG_FILE,
) -> None:
    """Evaluate each single-layer vector and every pair; relative improvement over the better single."""
    from steerlens.analysis.studies import run_pairs
    from steerlens.vectors import SteeringVectors, VectorsError

    singles = {}
    for path in single:
        part = SteeringVectors.load(path)
        if len(part.layers) != 1:
            raise VectorsError(f"{path}: --single needs a single-layer vectors file, this one steers {part.layers}")
        singles[part.layers[0]] = part
    result = run_pairs(model, SteeringVectors.load(vectors), _study_eval(ctx, config), out, singles)
    _report(result.save(out))


@study.command("singles", cls=TRAIN_COMMAND, context_settings=JOB)
@friendly
def study_singles(
    ctx: typer.Context,
    layers: str | None = typer.Option(None, "--layers", help="comma-separated layers (default: all)"),
    one_by_one: bool = typer.Option(
        False,
        "--one-by-one",
        help="train the runs one after another instead of together (one engine batch per step for all of them)",
    ),
    out: Path = STUDY_OUT,
    config: Path | None = CONFIG_FILE,
) -> None:
    """Train one single-layer vector per layer (steerlens train's options after these), for `study pairs`;
    the runs train together, each with its own parameters, optimizer, checkpoints and metrics."""
    from steerlens.rl.config import TrainConfig
    from steerlens.rl.together import train_each_layer

    cfg = _job_config(TrainConfig, config, ctx.args + ["--out-dir", str(out)], False)
    try:
        chosen = [int(layer) for layer in layers.split(",") if layer.strip()] if layers else None
    except ValueError:
        raise typer.BadParameter(
            f"{layers!r}: expected layer indices separated by commas", param_hint="--layers"
        ) from None
    files = train_each_layer(cfg, chosen, together=not one_by_one)
    _report(list(files.values()))
    typer.echo(
        "next: steerlens study pairs --model "
        + cfg.model
        + " --vectors ALL_LAYER_VECTORS "
        + " ".join(f"--single {path}" for path in files.values())
        + " --out PAIRS_DIR"
    )


@study.command("magnitude", context_settings=JOB)
@friendly
def study_magnitude(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="base model"),
    vectors: Path = typer.Option(..., "--vectors", help="trained vectors to scale"),
    factors: str = typer.Option("0,0.5,1,1.5,2", "--factors", help="comma-separated scale factors"),
    out: Path = STUDY_OUT,
    config: Path | None = CONFIG_FILE,
) -> None:
    """Accuracy with all vectors scaled by each factor."""
    from steerlens.analysis.studies import run_magnitude
    from steerlens.vectors import SteeringVectors

    try:
        values = [float(f) for f in factors.split(",") if f.strip()]
    except ValueError:
        raise typer.BadParameter(f"{factors!r}: expected numbers separated by commas", param_hint="--factors") from None
    _report(run_magnitude(model, SteeringVectors.load(vectors), values, _study_eval(ctx, config), out).save(out))


STUDY_MODEL = typer.Option(..., "--model", "-m", help="base model: short name, local directory or hub id")
STUDY_VECTORS = typer.Option(..., "--vectors", help="steering vectors file (.safetensors)")
STUDY_DATA = typer.Option(
    "toy-arith", "--data", help="problems to prompt with: a benchmark file or a generated set (toy-arith, word-arith)"
)
STUDY_PROMPTS = typer.Option(8, "--prompts", help="how many problems")
STUDY_TOKENS = typer.Option(48, "--max-new-tokens", help="greedy completion length")


def _study_inputs(model: str, vectors: Path, data: str, prompts: int) -> tuple[Any, Any, Any, list[str]]:
    """The unsteered model, its tokenizer, the vectors, and chat-formatted prompts from `data`."""
    from steerlens.data import format_prompt, load_problems
    from steerlens.data.generated import generate, generator_of
    from steerlens.models import load_model
    from steerlens.vectors import SteeringVectors

    found = generate(data, prompts, heldout=True) if generator_of(data) else load_problems(data, limit=prompts)
    problems = [p.problem for p in found]
    hf_model, tokenizer = load_model(model)
    return hf_model, tokenizer, SteeringVectors.load(vectors), [format_prompt(tokenizer, p) for p in problems]


@study.command("patching")
@friendly
def study_patching(
    model: str = STUDY_MODEL,
    vectors: Path = STUDY_VECTORS,
    layer: int = typer.Option(..., "--layer", help="the steered layer l; layer l+1 is patched"),
    data: str = STUDY_DATA,
    prompts: int = STUDY_PROMPTS,
    max_new_tokens: int = STUDY_TOKENS,
    out: Path = STUDY_OUT,
) -> None:
    """Head patching on layer l+1 with the vector of layer l, scored on the steered run's own completions."""
    from steerlens.analysis.mechanisms import run_patching

    hf_model, tokenizer, steering, texts = _study_inputs(model, vectors, data, prompts)
    _report(run_patching(hf_model, tokenizer, steering, texts, layer, max_new_tokens=max_new_tokens).save(out))


@study.command("first-token")
@friendly
def study_first_token(
    model: str = STUDY_MODEL,
    vectors: Path = STUDY_VECTORS,
    data: str = STUDY_DATA,
    prompts: int = STUDY_PROMPTS,
    max_new_tokens: int = STUDY_TOKENS,
    out: Path = STUDY_OUT,
) -> None:
    """Change in next-token probabilities at every generated position; the first-token prefix control."""
    from steerlens.analysis.mechanisms import run_first_token

    hf_model, tokenizer, steering, texts = _study_inputs(model, vectors, data, prompts)
    _report(run_first_token(hf_model, tokenizer, steering, texts, max_new_tokens=max_new_tokens).save(out))


@study.command("propagation")
@friendly
def study_propagation(
    model: str = STUDY_MODEL,
    vectors: Path = STUDY_VECTORS,
    data: str = STUDY_DATA,
    prompts: int = STUDY_PROMPTS,
    max_new_tokens: int = STUDY_TOKENS,
    out: Path = STUDY_OUT,
) -> None:
    """For each layer's vector alone: the hidden-state change at every later layer (the L x L grids)."""
    from steerlens.analysis.mechanisms import run_propagation

    hf_model, tokenizer, steering, texts = _study_inputs(model, vectors, data, prompts)
    _report(run_propagation(hf_model, tokenizer, steering, texts, max_new_tokens=max_new_tokens).save(out))


if __name__ == "__main__":
    app()
