"""``ssageo config show``: the resolved config of a preset or YAML file, with every key's doc."""

from __future__ import annotations

import typer

from ssageo.cli import app

config_app = typer.Typer(help="Inspect configs: presets, YAML files, overrides.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(
    args: list[str] = typer.Argument(
        None, metavar="[PRESET|FILE] [KEY=VALUE]...",
        help="A preset name or YAML file (default synth-cpu), then overrides as key=value."),
) -> None:
    """Print the resolved config (defaults, presets, overrides applied and checked) as YAML,
    each key with its doc as a comment. The output is itself a loadable config file."""
    from ssageo.config import load_config
    from ssageo.config.schema import render

    args = list(args or [])
    source = args.pop(0) if args and "=" not in args[0] else "synth-cpu"
    config = load_config(source, args)
    kind = "priors" if set(config) == {"priors"} else "train"
    typer.echo(render(config, kind), nl=False)
