"""The `steerlens` command line: one subcommand per job, each a thin layer over library functions.

Jobs take `--config FILE.yaml` plus `--key value` overrides of their config dataclass; bad input is
reported in one line naming what is wrong, without a traceback. Nothing in the library imports this.
"""

from __future__ import annotations

import functools
import sys
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


if __name__ == "__main__":
    app()
