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


@app.command(context_settings=JOB, epilog=_epilog(__import__("steerlens.rl.config", fromlist=["TrainConfig"]).TrainConfig))
@friendly
def train(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of TrainConfig keys"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config as YAML and exit"),
) -> None:
    """Train steering vectors with RLOO (default: the toy demo, a few minutes on a CPU)."""
    from steerlens.config import build_config, to_yaml
    from steerlens.rl.config import TrainConfig

    cfg = build_config(TrainConfig, config, ctx.args)
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return
    from steerlens.rl.trainer import format_report, train as run_training

    summary = run_training(cfg)
    if summary:
        typer.echo(format_report(summary))


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
