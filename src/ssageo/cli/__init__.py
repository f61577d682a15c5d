"""The ``ssageo`` command line: a thin layer over library functions.

Each command group lives in its own module here and is registered below.
"""

from __future__ import annotations

import sys

import typer

from ssageo import __version__
from ssageo.config import ConfigError
from ssageo.io import DataError

app = typer.Typer(
    name="ssageo",
    help="Cross-view geo-localization with Spatial Semantic Alignment (SSA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ssageo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Cross-view geo-localization with Spatial Semantic Alignment (SSA)."""


# Command modules register themselves on `app` when imported.
from ssageo.cli import (  # noqa: E402,F401
    data,
    demo,
    evaluate,
    model,
    priors,
    report,
    synth,
    train,
)


def main() -> None:
    """Entry point: bad input ends with a one-line message and exit status 2, not a traceback."""
    try:
        app()
    except (ConfigError, DataError, FileExistsError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
