"""``ssageo report RUN_DIR`` (the HTML report) and ``ssageo log RUN_DIR`` (the log table)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ssageo.cli import app


@app.command("report")
def report(
    run_dir: Path = typer.Argument(..., help="Training run directory (written by ssageo train)."),
    compare: Path | None = typer.Option(
        None, "--compare", help="Another run to show beside this one (curves, metrics, errors)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="HTML file to write [default: RUN_DIR/report.html]."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Dataset folder, when it is no longer at the run's data.root."
    ),
    places: int = typer.Option(100, "--places", min=2, help="Held-out places to embed."),
    examples: int = typer.Option(6, "--examples", min=1, help="Rows per example figure."),
    checkpoint: str = typer.Option(
        "best", "--checkpoint", help="best (best validation epoch, else last) or last."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing report at --out (never any other file)."
    ),
) -> None:
    """Write a self-contained HTML report of a training run (opens offline in any browser).

    RUN_DIR/report.html, the run's own report, is refreshed on every run; a report already at
    an --out path is replaced only with --force; any other file there, never.
    """
    from ssageo.constants import REPORT_FILE
    from ssageo.io import check_output
    from ssageo.report import build_report, is_report

    check_output(out or run_dir / REPORT_FILE, "an `ssageo report` page", is_report,
                 force=force or out is None)
    console = Console(stderr=True)
    with console.status("building the report") as status:
        path = build_report(run_dir, out=out, compare=compare, data_root=data,
                            max_examples=examples, max_places=places, checkpoint=checkpoint,
                            progress=lambda message: status.update(f"report: {message}"))
    Console().print(f"report written: [bold]{path}[/bold]")


@app.command("log")
def log(
    run_dir: Path = typer.Argument(..., help="Training run directory (written by ssageo train)."),
) -> None:
    """Print a run's training log as a table: one row per epoch with losses, lr and metrics."""
    from ssageo.report import log_table, read_run_log

    table = log_table(read_run_log(run_dir))
    # Never truncate numbers: a table wider than the terminal is printed whole (and wraps).
    needed = Console(width=1000).measure(table).maximum
    console = Console()
    Console(width=max(console.width, needed)).print(table)
