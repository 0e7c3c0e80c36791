"""`steerlens study ...`: the studies over many vector sets and the mechanisms analyses, each a thin command
over a library function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from steerlens.cli_common import CONFIG_FILE, JOB, TRAIN_COMMAND, friendly, job_config

study = typer.Typer(
    no_args_is_help=True,
    help="Studies over many vector sets (evaluated with steerlens eval's "
    "options, given as --key value after the study's own options).",
)
STUDY_OUT = typer.Option(..., "--out", "-o", help="output directory (tables as CSV, figures as HTML, evaluations)")


def _study_eval(ctx: typer.Context, config: Path | None) -> Any:
    from steerlens.evaluation.config import EvalConfig

    return job_config(EvalConfig, config, ctx.args, False)


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

    cfg = job_config(TrainConfig, config, ctx.args + ["--out-dir", str(out)], False)
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
