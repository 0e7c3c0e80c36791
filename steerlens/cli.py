"""The `steerlens` command line: one subcommand per job, each a thin layer over library functions.

Each job module exposes a typer-compatible function; this file only wires them together, so nothing
in the library imports the CLI.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])


@app.callback()
def main() -> None:
    """steerlens: train and study steering vectors (one vector per layer, base weights frozen)."""


if __name__ == "__main__":
    app()
