"""``ssageo train``: train an SSA model from a preset or YAML file, or resume a run."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from ssageo.cli import app
from ssageo.config import ConfigError, load_config


@app.command("train")
def train_command(
    overrides: list[str] = typer.Argument(
        None, help="Config overrides as key=value, e.g. train.epochs=10 data.workers=4."
    ),
    config: str = typer.Option(
        "synth-cpu", "--config", "-c", help="Preset name (synth-cpu, cvusa, cvact, vigor-same, "
        "vigor-cross) or path of a YAML file."
    ),
    data: Path = typer.Option(
        None, "--data", help="Dataset folder or pairs CSV (sets data.root)."),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory (sets train.out)."),
    resume: Path = typer.Option(
        None, "--resume", help="Continue the run in this directory from its newest checkpoint."
    ),
) -> None:
    """Train (or resume) with hard-negative batches, checkpoints and validation.

    Launch with `torchrun --nproc_per_node N -m ssageo train ...` for several processes.
    """
    from ssageo.train import NonFiniteLossError, train
    from ssageo.train.distributed import env_rank

    console = Console(stderr=True)
    if resume is not None:
        if overrides or data is not None or out is not None:
            raise ConfigError("--resume takes the run's saved config.yaml; give no overrides, "
                              "--data or --out with it")
        run_dir, cfg = resume, None
    else:
        cfg = load_config(config, overrides or [], kind="train")
        # Paths are set directly, not as YAML overrides, so any file name is taken verbatim.
        if data is not None:
            cfg["data"]["root"] = str(data)
        if out is not None:
            cfg["train"]["out"] = str(out)
        if not cfg["train"].get("out"):
            raise ConfigError("no run directory: give --out RUN_DIR (or train.out=RUN_DIR)")
        run_dir = Path(cfg["train"]["out"])
    try:
        summary = train(cfg, run_dir, resume=resume is not None)
    except NonFiniteLossError as exc:
        if env_rank() == 0:  # every rank stops at the same step; one message
            console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
    if env_rank() == 0:
        console.print(f"[green]done[/green]: {summary['steps']} steps; run directory {run_dir}")
        if summary["best_val_R@1"] is not None:
            console.print(f"best val R@1 {summary['best_val_R@1']:.2f} % at epoch "
                          f"{summary['best_epoch']} ({summary['best_checkpoint']})")
        else:
            console.print(f"validation: {summary['validation']}")
