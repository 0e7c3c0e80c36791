"""What the command line's jobs share: one-line, redacted errors (`friendly`), config-described help
(`ConfigCommand`), a job's config from YAML and flags, and the options every job takes."""

from __future__ import annotations

import functools
import pkgutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperCommand

from steerlens.errors import SteerlensError
from steerlens.redact import redact

JOB = {"allow_extra_args": True, "ignore_unknown_options": True}


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn steerlens' input errors into one clear line on stderr and exit code 2, redacted (`redact`).

    Any other exception goes on as a traceback, unless a key is in it: then its traceback is printed redacted
    and the exit code is 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SteerlensError as err:
            typer.echo(f"error: {redact(str(err))}", err=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as err:
            text = "".join(traceback.format_exception(err))
            if redact(text) == text:
                raise
            typer.echo(redact(text).rstrip("\n"), err=True)
            raise typer.Exit(1) from None

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


def job_config(cls: type, config: Path | None, args: list[str], print_config: bool) -> Any:
    """The job's config from YAML plus `--key value` overrides; None after printing it if asked to."""
    from steerlens.config import build_config, to_yaml

    cfg = build_config(cls, config, args)
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return None
    return cfg


CONFIG_FILE = typer.Option(None, "--config", "-c", help="YAML file of the job's config keys")
PRINT_CONFIG = typer.Option(False, "--print-config", help="print the resolved config as YAML and exit")
