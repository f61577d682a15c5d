"""``ssageo demo``: the whole method end to end on a synthetic world, within a time budget."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from ssageo.cli import app


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("ssageo-demo"), "--out", help="Output folder (reused on rerun)."),
    budget_minutes: float = typer.Option(10.0, "--budget-minutes", help="Compute budget."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world and of both trainings."),
) -> None:
    """Synthetic world -> oracle priors -> SSA and no-SSA training -> evaluation -> report."""
    from ssageo.config import ConfigError
    from ssageo.demo import run_demo

    if not math.isfinite(budget_minutes):  # nan passes every comparison further on
        raise ConfigError(f"--budget-minutes: must be a finite number of minutes, "
                          f"got {budget_minutes}")
    run_demo(out, budget_minutes=budget_minutes, seed=seed)
