"""``ssageo model info``: parameters and per-stage feature shapes of a configured model."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ssageo.cli import app
from ssageo.config import ConfigError, load_config

model_app = typer.Typer(help="Inspect the SSA model a config describes.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def _shape(shape: tuple | None) -> str:
    return "-" if shape is None else " x ".join(str(v) for v in shape)


@model_app.command("info")
def info_command(
    overrides: list[str] = typer.Argument(
        None, help="Config overrides as key=value, e.g. model.backbone=resnet50."
    ),
    config: str = typer.Option(
        "synth-cpu", "--config", "-c", help="Preset name or path of a YAML file."
    ),
) -> None:
    """Print total/trainable parameters, the feature shape after every stage and where the
    weights come from. Builds the architecture only: no weights read, no network request."""
    from ssageo.model.ssa import describe_weights
    from ssageo.model.summary import model_info

    cfg = load_config(config, overrides or [], kind="train")
    info = model_info(cfg)
    console = Console()
    data = cfg["data"]
    console.print(
        f"[bold]{info['backbone']}[/bold] ({info['family']}), "
        f"{'shared' if info['shared_encoder'] else 'separate'} encoder, "
        f"descriptor {info['descriptor_dim']}-d; query {_shape(data['query_size'])}, "
        f"reference {_shape(data['reference_size'])}"
    )
    console.print(
        f"parameters: {info['parameters']:,} total, {info['trainable']:,} trainable ("
        + ", ".join(f"{k} {v:,}" for k, v in info["parts"].items()) + ")"
    )
    try:
        weights = describe_weights(cfg["model"])
    except ConfigError as exc:  # a pretrained setting training would refuse: say so, go on
        weights = f"[red]{exc}[/red]"
    console.print(f"weights: {weights}")
    table = Table("stage", "part", "query (C x H x W)", "reference (C x H x W)")
    for row in info["stages"]:
        table.add_row(row["module"], row["part"], _shape(row["query"]), _shape(row["reference"]))
    console.print(table)
