"""The `steerlens` command line: one subcommand per job, each a thin layer over library functions.

Jobs take `--config FILE.yaml` plus `--key value` overrides of their config dataclass; bad input is
reported in one line naming what is wrong, without a traceback. Nothing in the library imports this.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from steerlens.errors import SteerlensError

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="steerlens: train and study steering vectors (one vector per layer, base weights frozen).")

JOB = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.callback()
def main() -> None:
    """steerlens: train and study steering vectors (one vector per layer, base weights frozen)."""


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


def _epilog(cls: type) -> str:
    from steerlens.config import describe

    return "Options of the config (YAML keys, or --key value on the command line):\n\n" + describe(cls).replace("\n", "\n\n")


def _job_config(cls: type, config: Optional[Path], args: list[str], print_config: bool) -> Any:
    """The job's config from YAML plus `--key value` overrides; None after printing it if asked to."""
    from steerlens.config import build_config, to_yaml

    cfg = build_config(cls, config, args)
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return None
    return cfg


CONFIG_FILE = typer.Option(None, "--config", "-c", help="YAML file of the job's config keys")
PRINT_CONFIG = typer.Option(False, "--print-config", help="print the resolved config as YAML and exit")


@app.command(context_settings=JOB, epilog=_epilog(__import__("steerlens.rl.config", fromlist=["TrainConfig"]).TrainConfig))
@friendly
def train(ctx: typer.Context, config: Optional[Path] = CONFIG_FILE, print_config: bool = PRINT_CONFIG) -> None:
    """Train steering vectors with RLOO (default: the toy demo, a few minutes on a CPU)."""
    from steerlens.rl.config import TrainConfig

    cfg = _job_config(TrainConfig, config, ctx.args, print_config)
    if cfg is None:
        return
    from steerlens.rl.trainer import format_report, train as run_training

    summary = run_training(cfg)
    if summary:
        typer.echo(format_report(summary))


@app.command("eval", context_settings=JOB,
             epilog=_epilog(__import__("steerlens.evaluation.config", fromlist=["EvalConfig"]).EvalConfig))
@friendly
def eval_(ctx: typer.Context, config: Optional[Path] = CONFIG_FILE, print_config: bool = PRINT_CONFIG) -> None:
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
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="OpenAI-compatible URL for LLM clustering "
                                           "(default $OPENAI_BASE_URL; none: offline clustering)"),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="chat model for clustering (default: the "
                                            "endpoint's only model); the key comes from $OPENAI_API_KEY"),
    compare: list[Path] = typer.Option([], "--compare", metavar="PATH", help="another run's vectors (e.g. a "
                                       "seed) to compare per layer; repeatable"),
) -> None:
    """Analyse steering vectors (logit lens, statistics, token clustering) into one HTML report."""
    from steerlens.analysis.clustering import ClusteringConfig
    from steerlens.analysis.report import analyze as run_analyses

    chosen = [name.strip() for name in analyses.split(",") if name.strip()]
    result = run_analyses(vectors, model, out, chosen, top_k=top_k, final_norm=final_norm, compare=compare,
                          clustering=ClusteringConfig(model=llm_model, base_url=endpoint))
    typer.echo(f"report: {result.report}")
    typer.echo(f"tables: {', '.join(sorted(result.tables))} in {out / 'tables'}")


if __name__ == "__main__":
    app()
