"""``ssageo data check``: report what a dataset folder holds and whether it is usable."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ssageo.cli import app
from ssageo.data.check import check_dataset

data_app = typer.Typer(help="Inspect datasets (CVUSA, CVACT, VIGOR).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def check(
    root: Path = typer.Argument(..., help="Dataset folder, as downloaded."),
    dataset: str = typer.Option("auto", help="auto | cvusa | cvact | vigor"),
    vigor_mode: str = typer.Option("same-area", help="VIGOR only: same-area | cross-area"),
    strict: bool = typer.Option(False, help="Treat missing or empty files as unusable."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a dataset: layout, splits, missing/unreadable images, sizes, priors, GPS.

    Exit status 0 when the dataset is usable, 1 otherwise.
    """
    report = check_dataset(root, dataset, vigor_mode, strict=strict, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report, Console())
    raise typer.Exit(0 if report["usable"] else 1)


def print_report(report: dict, console: Console) -> None:
    """Render a :func:`check_dataset` report as rich tables."""
    head = f"{report['dataset'].upper()} ({report['layout']}) at {report['root']}"
    if report["vigor_mode"]:
        head += f", {report['vigor_mode']}"
    console.print(f"[bold]{head}[/bold]")
    splits = Table("split", "queries", "references", "skipped pairs", "prior coverage", "error")
    for name, info in report["splits"].items():
        if "error" in info:
            splits.add_row(name, "-", "-", "-", "-", f"[red]{info['error']}[/red]")
        else:
            splits.add_row(name, str(info["queries"]), str(info["references"]),
                           str(info["skipped"]), f"{info['prior_coverage']:.1%}", "")
    console.print(splits)
    files = Table("check", "count", "first examples")
    for key, label in (("missing_files", "missing files"), ("empty_files", "zero-byte files"),
                       ("unreadable_images", "unreadable images"),
                       ("unexpected_sizes", "unexpected image sizes")):
        entry = report[key]
        style = "green" if entry["count"] == 0 else "yellow"
        files.add_row(label, f"[{style}]{entry['count']}[/{style}]", "\n".join(entry["examples"]))
    console.print(files)
    info = Table("item", "value")
    for view, sizes in report["image_sizes"].items():
        if sizes:
            official = report["official_sizes"].get(view)
            text = ", ".join(f"{s} ({n})" for s, n in sizes.items())
            info.add_row(f"{view} sizes", text + (f"; as distributed: {official}" if official
                                                  else ""))
    pri = report["priors"]
    info.add_row("prior labels", f"{pri['with_label']} / {pri['tiles']} tiles "
                                 f"({pri['coverage']:.1%})")
    gps = report["gps"]
    info.add_row("GPS", ("yes: " if gps["available"] else "no: ") + gps["source"])
    console.print(info)
    if report["usable"]:
        console.print("[green]usable[/green]")
    else:
        console.print("[red]not usable:[/red] " + "; ".join(report["problems"]))
