"""``ssageo data check``: report what a dataset folder holds and whether it is usable."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ssageo.cli import app
from ssageo.data.registry import dataset_choices, get_spec, mode_help

data_app = typer.Typer(help="Inspect datasets (CVUSA, CVACT, VIGOR, a pairs CSV).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def check(
    root: Path = typer.Argument(..., help="Dataset folder, as downloaded, or a pairs CSV."),
    dataset: str = typer.Option("auto", help=dataset_choices()),
    vigor_mode: str = typer.Option("same-area", help=mode_help()),
    strict: bool = typer.Option(False, help="Treat missing or empty files as unusable."),
    full: bool = typer.Option(False, "--full", help="Decode every image in full (slower; by "
                              "default headers and file ends are read, which finds truncated "
                              "files but not damage inside one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a dataset: layout, splits, missing/unreadable images, sizes, priors, GPS.

    Exit status 0 when the dataset is usable (splits that are absent as a whole, e.g. a separate
    download, are named but allowed), 1 otherwise.
    """
    from ssageo.data.check import check_dataset  # here: it imports torch (the CLI starts fast)

    report = check_dataset(root, dataset, vigor_mode, strict=strict, progress=not as_json,
                           full=full)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        console = Console()
        if not console.is_terminal:  # piped: never wrap a path across lines (grep must find it)
            console = Console(width=1 << 16)
        print_report(report, console)
    raise typer.Exit(0 if report["usable"] else 1)


def print_report(report: dict, console: Console) -> None:
    """Render a :func:`check_dataset` report as rich tables."""
    head = f"{get_spec(report['dataset']).title} ({report['layout']}) at {report['root']}"
    if report["vigor_mode"]:
        head += f", {report['vigor_mode']}"
    console.print(f"[bold]{escape(head)}[/bold]")
    splits = Table("split", "queries", "references", "skipped pairs", "prior coverage", "error")
    for name, info in report["splits"].items():
        if "error" in info:
            splits.add_row(name, "-", "-", "-", "-", f"[red]{escape(info['error'])}[/red]")
        elif "unavailable" in info:
            splits.add_row(name, "-", "-", "-", "-",
                           f"[yellow]{escape(info['unavailable'])}[/yellow]")
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
        files.add_row(label, f"[{style}]{entry['count']}[/{style}]",
                      escape("\n".join(entry["examples"])))
    console.print(files)
    info = Table("item", "value")
    for view, sizes in report["image_sizes"].items():
        if sizes:
            official = report["official_sizes"].get(view)
            text = ", ".join(f"{s} ({n})" for s, n in sizes.items())
            info.add_row(f"{view} sizes", text + (f"; as distributed: {official}" if official
                                                  else ""))
    info.add_row("queries", report["query_kind"])
    pri = report["priors"]
    info.add_row("prior labels", f"{pri['with_label']} / {pri['tiles']} tiles "
                                 f"({pri['coverage']:.1%})")
    gps = report["gps"]
    info.add_row("GPS", escape(("yes: " if gps["available"] else "no: ") + gps["source"]))
    console.print(info)
    if report["usable"]:
        absent = report["unavailable_splits"]
        console.print("[green]usable[/green]" + (
            f" (split(s) not available: {', '.join(absent)}; see the table above)"
            if absent else ""))
    else:
        console.print("[red]not usable:[/red] " + escape("; ".join(report["problems"])))
