"""``ssageo priors``: write the satellite prior labels that supervise the SSA BEV head."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from ssageo.cli import app
from ssageo.config import ConfigError, load_config
from ssageo.data.registry import dataset_choices

if TYPE_CHECKING:  # the priors stage imports the data stage, which imports torch
    from ssageo.priors.run import PriorSummary


class Backend(str, Enum):
    langsam = "langsam"
    oracle = "oracle"
    files = "files"


def _langsam_section(config: str, overrides: list[str], detector: Path | None,
                     segmenter: Path | None, device: str | None, batch_size: int | None) -> dict:
    """The ``priors`` section with the command's options applied and its device checked."""
    from ssageo.device import resolve_device

    section = load_config(config, overrides, kind="priors")["priors"]
    for key, value in (("detector", detector), ("segmenter", segmenter), ("device", device),
                       ("batch_size", batch_size)):
        if value is not None:
            section[key] = str(value) if isinstance(value, Path) else value
    section["device"] = resolve_device(section["device"],
                                       "--device" if device is not None else "priors.device")
    return section


def _where(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _print_summary(console: Console, summary: PriorSummary) -> None:
    foreground = "n/a" if summary.done == 0 else f"{summary.foreground:.3f}"
    console.print(
        f"tiles done [bold]{summary.done}[/bold], skipped (already there) {summary.skipped}, "
        f"failed [bold]{len(summary.failed)}[/bold]{' (listed above)' if summary.failed else ''}; "
        f"mean foreground fraction {foreground}",
        highlight=False,
    )
    if "miou" in summary.statistics:
        console.print(f"oracle mIoU of the written labels vs the truth: "
                      f"{summary.statistics['miou']:.4f}", highlight=False)


@app.command("priors")
def priors(
    root: Path = typer.Argument(..., help="Dataset folder (CVUSA, CVACT, VIGOR or a synth world)."),
    backend: Backend = typer.Option(..., "--backend", help="Where the labels come from."),
    dataset: str = typer.Option(
        "auto", help=f"{dataset_choices()} (pairs: labels go in the CSV's prior column)"),
    split: list[str] = typer.Option(
        None, "--split", help="Only these splits' tiles (repeatable); default every tile."),
    force: bool = typer.Option(False, "--force", help="Redo tiles whose label already exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    config: str = typer.Option(
        "priors-langsam", help="langsam: preset or YAML file holding a 'priors' section only."),
    overrides: list[str] = typer.Option(
        None, "--set", help="langsam: config override, e.g. --set priors.box_threshold=0.3."),
    detector: Path = typer.Option(
        None, help="langsam: local GroundingDINO directory (IDEA-Research/grounding-dino-base)."),
    segmenter: Path = typer.Option(
        None, help="langsam: local SAM directory (facebook/sam-vit-huge)."),
    device: str = typer.Option(None, help="langsam: auto | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(None, min=1, help="langsam: tiles per model call."),
    threads: int = typer.Option(
        None, min=1, help="langsam on CPU: torch threads (1 is fastest on a busy shared machine)."),
    masks: list[Path] = typer.Option(
        None, help="files: folder of existing masks to import (repeatable, e.g. one per city)."),
    keep_values: bool = typer.Option(
        False, help="files: import class-index masks unchanged instead of binarising to 0/255."),
    truth_classes: list[str] = typer.Option(
        None, help="oracle: world classes forming one output class, comma separated "
        "(repeat for a multi-class map); default building,tree."),
    erode: int = typer.Option(0, help="oracle: erode every object by this many pixels."),
    dilate: int = typer.Option(0, help="oracle: dilate every object by this many pixels."),
    drop: float = typer.Option(0.0, help="oracle: probability of dropping each object."),
    false_positives: float = typer.Option(
        0.0, help="oracle: add blobs covering this fraction of the true foreground area."),
    blob_radius: int = typer.Option(4, help="oracle: radius in pixels of false-positive blobs."),
    seed: int = typer.Option(0, help="oracle: seed of the corruption."),
) -> None:
    """Write a prior label for every satellite tile of a dataset, where the readers look for it.

    A rerun skips tiles already done, and is refused when the labels there were made with other
    parameters (recorded in ROOT/priors-run.json) unless --force; the exit status is 1 when any
    tile failed.
    """
    from ssageo.priors.record import LabelRecord
    from ssageo.priors.run import list_tiles, run_priors

    console = Console()
    tiles = list_tiles(root, dataset, split or None)
    # What the labels depend on, recorded beside them: checked before any model is loaded.
    if backend is Backend.langsam:
        section = _langsam_section(config, overrides or [], detector, segmenter, device,
                                   batch_size)
        parameters = {k: section.get(k) for k in (
            "prompts", "classes", "box_threshold", "text_threshold")}
        parameters.update(detector=_where(section.get("detector")),
                          segmenter=_where(section.get("segmenter")))
    elif backend is Backend.oracle:
        groups = truth_classes or ["building,tree"]
        classes = {g: [c.strip() for c in g.split(",") if c.strip()] for g in groups}
        parameters = {"classes": classes, "erode": erode, "dilate": dilate, "drop": drop,
                      "false_positives": false_positives, "blob_radius": blob_radius,
                      "seed": seed}
    else:
        if not masks:
            raise ConfigError("--backend files needs --masks FOLDER (the masks to import)")
        parameters = {"masks": [_where(m) for m in masks], "keep_values": keep_values}
    record = LabelRecord.open(root, {"backend": backend.value, **parameters}, force)
    if backend is Backend.langsam:
        from ssageo.priors.langsam import LangSamBackend

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        source = LangSamBackend.from_config(section)
    elif backend is Backend.oracle:
        from ssageo.priors.oracle import Corruption, OracleBackend

        corruption = Corruption(erode=erode, dilate=dilate, drop=drop,
                                false_positives=false_positives, blob_radius=blob_radius)
        source = OracleBackend(root, corruption, classes, seed=seed)
    else:
        from ssageo.priors.files import FilesBackend

        source = FilesBackend(masks, tiles, keep_values=keep_values)
    console.print(f"{len(tiles)} satellite tiles under {root}; backend {backend.value}",
                  highlight=False)
    summary = run_priors(tiles, source, force=force, progress=progress, console=console,
                         record=record, whole_dataset=not split)
    _print_summary(console, summary)
    if not summary.ok:
        raise typer.Exit(1)
