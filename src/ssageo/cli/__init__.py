"""The ``ssageo`` command line: a thin layer over library functions.

Each command group lives in its own module here and is registered below.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer

from ssageo import __version__
from ssageo.cli import console
from ssageo.cli.errors import describe, report_bug

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
    console.install()  # here, not in main(): commands invoked through typer's runner log too


# Command modules register themselves on `app` when imported.
from ssageo.cli import (  # noqa: E402,F401
    config,
    data,
    demo,
    evaluate,
    export,
    model,
    priors,
    report,
    serve,
    synth,
    train,
)


def main(args: list[str] | None = None) -> None:
    """Entry point. Every expected failure ends with one line ``error: PATH-OR-KEY: what is
    wrong`` and exit status 2; Ctrl-C with ``interrupted`` and 130; a bug with one line
    (exit 1) whose traceback is kept in a file. ``SSAGEO_DEBUG=1`` shows every traceback."""
    if os.environ.get("SSAGEO_DEBUG", "") not in ("", "0"):
        sys.exit(app(args=args))
    try:
        # Not click's standalone mode: that turns EOFError (a truncated file) into "Aborted!"
        # and Ctrl-C into a silent exit, before we could say what happened.
        code = app(args=args, standalone_mode=False)
    except _CLICK_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already shown
            sys.exit(exc.exit_code)
        # usage errors (a bad option value, a missing option): click's message, on one line
        where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
        _fail(f"{exc.format_message()}{where}", exc.exit_code)
    except typer.Abort as exc:
        if exc.__cause__ is not None and describe(exc.__cause__):
            _fail(describe(exc.__cause__), 2)
        _fail("aborted", 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - every failure gets one line; bugs say so
        message = describe(exc)
        if message is None:
            _fail(report_bug(exc), 1)
        _fail(message, 2)
    # Typer turns Ctrl-C into exit status 130 without a word; no command of ours uses 130.
    if code == 130:
        _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


# click's base error class (newer typer versions vendor their own click): found through the
# public typer.BadParameter rather than a private import path.
_CLICK_ERROR = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "ClickException")


def _fail(message: str, status: int) -> NoReturn:
    typer.secho(f"error: {message}", fg="red", err=True)
    sys.exit(status)
