"""``ssageo synth``: generate the synthetic cross-view world in a real data set layout."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ssageo.cli import app


@app.command("synth")
def synth(
    out: Path = typer.Argument(..., help="Output folder (created; must be empty unless resumed)."),
    layout: str = typer.Option("cvusa", help="On-disk layout: cvusa, cvact, vigor or university "
                                "(University-1652: drone views and tiles per building)."),
    places: int = typer.Option(200, help="Number of places (panoramas; university: buildings)."),
    seed: int = typer.Option(0, help="World seed; the same seed gives byte-identical files."),
    sat_size: int = typer.Option(256, help="Satellite tile size in pixels (square)."),
    pano_size: str = typer.Option("512x128", help="Panorama size WIDTHxHEIGHT."),
    split: str = typer.Option("same-area", help="same-area (random) or cross-area (districts)."),
    preview: bool = typer.Option(False, help="Also write preview.png (query/reference/label)."),
    overwrite: bool = typer.Option(
        False, help="Remove the files a previous run recorded writing in OUT (synth_files.txt), "
        "then write; refused when OUT holds anything else."),
    workers: int = typer.Option(0, help="Render processes (0 = automatic, at most 2)."),
    photos: float | None = typer.Option(
        None, help="Also a pinhole photo per place with this horizontal field of view "
        "(degrees; random heading, small random pitch) into photos/, listed with its lat, lon "
        "and heading in photos/photos.csv."),
) -> None:
    """Generate a procedural city and write its panoramas, satellite tiles and labels."""
    from ssageo.synth import generate, parse_size

    summary = generate(out, layout=layout, places=places, seed=seed, sat_size=sat_size,
                       pano_size=parse_size(pano_size), split=split, overwrite=overwrite,
                       preview=preview, progress=True, workers=workers or None, photos=photos)
    console = Console()
    console.print(
        f"[green]wrote[/green] {layout} world to {out}: {places} places, "
        f"{summary['images_rendered']} render jobs done, {summary['images_present']} already on "
        f"disk, {summary['metres_per_pixel']:.3f} m/px, {summary['seconds']:.1f} s")
    console.print(f"counts: {summary['counts']}")
    if photos is not None:
        console.print(f"photos: {out / 'photos'} (photos.csv: path, lat, lon, heading, pitch, "
                      "fov, panorama)")
    if summary["preview"]:
        console.print(f"preview: {summary['preview']}")
