"""``ssageo eval``, ``ssageo embed``, ``ssageo index build`` and ``ssageo locate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from ssageo.cli import app
from ssageo.data.registry import dataset_choices, mode_help
from ssageo.io import atomic_write_text, check_output

if TYPE_CHECKING:  # the data stage imports torch: the CLI imports it when a command runs
    import numpy as np

    from ssageo.data.fov import QueryCrop
    from ssageo.data.manifest import Manifest

index_app = typer.Typer(help="Geo-referenced indexes of satellite tiles.", no_args_is_help=True)
app.add_typer(index_app, name="index")

DATASET_HELP = dataset_choices()
MODE_HELP = mode_help()
SPLIT_HELP = "train | val | test (default: the dataset's held-out split: test for VIGOR, val " \
    "otherwise)"
DEVICE_HELP = "auto | cpu | cuda[:N] | mps (auto: a GPU when torch sees one)"


def _device(name: str) -> str:
    from ssageo.device import resolve_device

    return resolve_device(name, "--device")


def _manifest(data: Path, dataset: str, split: str | None, vigor_mode: str) -> Manifest:
    from ssageo.data import detect_dataset, get_spec, load_manifest

    if split is None:
        split = get_spec(detect_dataset(data) if dataset == "auto" else dataset).held_out
    return load_manifest(data, dataset, split, vigor_mode)


def _embed_checkpoint(
    checkpoint: Path,
    data: Path,
    dataset: str,
    split: str | None,
    vigor_mode: str,
    batch_size: int | None,
    workers: int | None,
    device: str,
    fov: float | None = None,
    heading: str | None = None,
) -> tuple[Manifest, np.ndarray, np.ndarray, QueryCrop]:
    """(manifest, query, reference descriptors, QueryCrop): ``fov`` / ``heading`` default to
    the checkpoint's ``data.fov`` / ``data.heading``."""
    from ssageo.data.fov import QueryCrop, query_crop
    from ssageo.evaluate.embed import embed_manifest
    from ssageo.model import load_model

    model, config = load_model(checkpoint, map_location=_device(device))
    trained = query_crop(config["data"])
    crop = QueryCrop(trained.fov if fov is None else fov, heading or trained.heading)
    manifest = _manifest(data, dataset, split, vigor_mode)
    query, reference = embed_manifest(model, manifest, config, batch_size, workers, crop=crop)
    return manifest, query, reference, crop


FORCE_HELP = "Replace an existing file of the same kind (anything else is never replaced)."


def _is_metrics_json(path: Path) -> bool:
    """True for a metrics file written by ``ssageo eval --json`` (a JSON object with R@1)."""
    try:
        if path.stat().st_size > 1 << 20:
            return False
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(metrics, dict) and {"R@1", "queries", "gallery"} <= set(metrics)


def print_metrics(metrics: dict, title: str, console: Console) -> None:
    """Render a metrics dict (percentages, metre errors, sizes) as a rich table."""
    table = Table("metric", "value", title=title)
    for key, value in metrics.items():
        if key.startswith("R@") or key in ("hit_rate", "AP"):
            text = f"{value:.2f} %"
        elif key.endswith("_m"):
            text = f"{value:,.1f} m"
        else:
            text = str(value)
        table.add_row(key, text)
    console.print(table)


def _check_crop(fov: float | None, heading: str | None) -> None:
    """ConfigError naming --fov / --heading for a value no crop can have (before any work)."""
    from ssageo.config import ConfigError
    from ssageo.data.fov import HEADINGS, check_fov

    if fov is not None:
        check_fov(fov, "--fov")
    if heading is not None and heading not in HEADINGS:
        raise ConfigError(f"--heading must be one of {', '.join(HEADINGS)}, got {heading!r}")


@app.command("eval")
def evaluate(
    checkpoint: Path | None = typer.Option(None, help="Checkpoint folder (with --data)."),
    data: Path | None = typer.Option(
        None, help="Dataset folder or pairs CSV (with --checkpoint)."),
    descriptors: Path | None = typer.Option(None, help="Evaluate a saved .npz descriptor file."),
    dataset: str = typer.Option("auto", help=DATASET_HELP),
    split: str | None = typer.Option(None, help=SPLIT_HELP),
    vigor_mode: str = typer.Option("same-area", help=MODE_HELP),
    normalize: bool = typer.Option(False, help="L2-normalise saved descriptors before scoring."),
    block_size: int = typer.Option(
        4096, min=1, help="Queries scored per block (memory: 4 x this x R B)"
    ),
    batch_size: int | None = typer.Option(
        None, min=1, help="Images per batch (default eval.batch_size)"),
    workers: int | None = typer.Option(
        None, min=0, help="Loader processes (default data.workers)"),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the metrics here."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    fov: float | None = typer.Option(
        None, help="Query field of view in degrees: a crop of each panorama (default: the "
        "checkpoint's data.fov, 360 = whole panoramas)."),
    heading: str | None = typer.Option(
        None, help="north | random: the crop's centre (random: seeded per query, "
        "reproducible; default: the checkpoint's data.heading)."),
) -> None:
    """Exact R@1/5/10/1% (VIGOR: hit rate; with coordinates: metre error of the top-1 tile)."""
    from ssageo.evaluate.descriptors import load_descriptors
    from ssageo.evaluate.embed import manifest_metrics

    device = _device(device)  # a bad --device fails before any loading
    _check_crop(fov, heading)
    if json_out is not None:  # before any work: a refused output must not cost an evaluation
        check_output(json_out, "an `ssageo eval` metrics file", _is_metrics_json, force, "--json")

    if descriptors is not None:
        if checkpoint is not None or data is not None:
            raise typer.BadParameter("give either --descriptors or --checkpoint with --data")
        if fov is not None or heading is not None:
            raise typer.BadParameter("--fov and --heading crop images: give --checkpoint and "
                                     "--data, not --descriptors")
        loaded = load_descriptors(descriptors, normalize=normalize)
        metrics = loaded.metrics(block_size, _device(device))
        title = str(descriptors)
    else:
        if checkpoint is None or data is None:
            raise typer.BadParameter("give --checkpoint and --data (or --descriptors FILE.npz)")
        manifest, query, reference, crop = _embed_checkpoint(
            checkpoint, data, dataset, split, vigor_mode, batch_size, workers, device, fov,
            heading)
        metrics = {**manifest_metrics(manifest, query, reference, block_size, _device(device)),
                   **crop.to_dict()}
        mode = f" {manifest.vigor_mode}" if manifest.vigor_mode else ""
        title = f"{manifest.dataset} {manifest.split}{mode} ({checkpoint})"
    print_metrics(metrics, title, Console())
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(metrics, indent=2) + "\n")


@app.command("embed")
def embed(
    checkpoint: Path = typer.Option(..., help="Checkpoint folder."),
    data: Path = typer.Option(..., help="Dataset folder or pairs CSV."),
    out: Path = typer.Option(..., help="Descriptor file to write (.npz)."),
    dataset: str = typer.Option("auto", help=DATASET_HELP),
    split: str | None = typer.Option(None, help=SPLIT_HELP),
    vigor_mode: str = typer.Option("same-area", help=MODE_HELP),
    batch_size: int | None = typer.Option(
        None, min=1, help="Images per batch (default eval.batch_size)"),
    workers: int | None = typer.Option(
        None, min=0, help="Loader processes (default data.workers)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Save query and reference descriptors with their ground truth to a .npz file."""
    from ssageo.evaluate.descriptors import is_descriptor_file, save_descriptors
    from ssageo.evaluate.embed import descriptor_set

    check_output(out, "a descriptor file", is_descriptor_file, force)

    manifest, query, reference, _ = _embed_checkpoint(
        checkpoint, data, dataset, split, vigor_mode, batch_size, workers, device
    )
    save_descriptors(out, descriptor_set(manifest, query, reference))
    Console().print(
        f"wrote {len(query)} query and {len(reference)} reference descriptors "
        f"(D = {query.shape[1]}) to {out}"
    )


@index_app.command("build")
def index_build(
    checkpoint: Path | None = typer.Option(None, help="Checkpoint folder (or --onnx)."),
    out: Path = typer.Option(
        ..., help="Index to write: FILE.npz (one exact file) or a folder (sharded, any kind)."
    ),
    data: Path | None = typer.Option(
        None, help="Dataset folder or pairs CSV: index its satellite tiles."),
    tiles: Path | None = typer.Option(None, help="CSV of path,lat,lon rows: index these tiles."),
    dataset: str = typer.Option("auto", help=DATASET_HELP),
    split: list[str] = typer.Option(
        None, "--split", help="With --data: only these splits' tiles (repeatable); default all."
    ),
    vigor_mode: str = typer.Option("same-area", help=MODE_HELP),
    kind: str = typer.Option(
        "auto", help="auto | exact | ivfpq (auto: exact up to 250,000 tiles, ivfpq above)"
    ),
    shard_size: int = typer.Option(65536, min=1, help="Tiles per shard (folder indexes)."),
    lists: int | None = typer.Option(
        None, min=1, help="ivfpq: inverted lists (default about 4 sqrt(tiles))."),
    pq_bytes: int = typer.Option(32, min=1, help="ivfpq: code bytes per tile."),
    pca: int = typer.Option(
        0, min=0, help="ivfpq: lists and codes of the descriptors projected on their first PCA "
        "directions (e.g. 256 for 1024-d descriptors; 0: off); re-ranking uses whole ones."),
    rerank_store: str = typer.Option(
        "float32", help="ivfpq: what to keep for re-ranking (locate --rerank): float32 "
        "descriptors (exact scores), sq12 / sq8 (residuals in 12 / 8 bits: 3/8 / 1/4 of "
        "the bytes) or none."
    ),
    extend: bool = typer.Option(False, "--extend", help="Add these tiles to an existing folder."),
    batch_size: int = typer.Option(64, min=1, help="Tiles per batch."),
    workers: int = typer.Option(0, min=0, help="Loader processes."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP + " (.npz only)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    onnx: Path | None = typer.Option(
        None, "--onnx", help="Embed with this exported reference encoder (onnxruntime, CPU)."),
) -> None:
    """Embed satellite tiles with their coordinates into a geo index (a file or shards)."""
    from ssageo.evaluate.index import build_index, is_index_file
    from ssageo.evaluate.shards import AUTO_EXACT_MAX, build_tile_index
    from ssageo.evaluate.tiles import TileList, TilesCsv, dataset_tiles

    if (data is None) == (tiles is None):
        raise typer.BadParameter("give exactly one of --data ROOT or --tiles TILES.csv")
    if (checkpoint is None) == (onnx is None):
        raise typer.BadParameter("give exactly one of --checkpoint CKPT or --onnx FILE")
    device = _device(device) if onnx is None else "cpu"
    single = out.suffix == ".npz"
    if single:
        if kind == "ivfpq" or extend:
            raise typer.BadParameter("--kind ivfpq and --extend need a folder --out, not .npz")
        check_output(out, "an ssageo index", is_index_file, force)
    if tiles is not None:
        table = TilesCsv(tiles)  # streamed: rows are read shard by shard
        source = str(tiles.resolve())
    else:
        paths, coords, described = dataset_tiles(data, dataset, split or None, vigor_mode)
        table = TileList(paths, coords)
        source = f"{data.resolve()} ({described})"
        Console().print(f"{described}: {len(paths)} distinct satellite tiles", highlight=False)
    if onnx is not None:
        from ssageo.evaluate.deploy import build_onnx_index

        if kind == "auto":
            kind = "exact" if len(table) <= AUTO_EXACT_MAX else "ivfpq"
        meta = build_onnx_index(onnx, table, out, source, kind, shard_size, lists,
                                pq_bytes, rerank_store, extend, batch_size, Console().print,
                                pca=pca)
        count, dim, what = meta["count"], meta["descriptor_dim"], "exact" if single else kind
    elif single:
        paths, coords = table.rows(0, len(table))
        index = build_index(checkpoint, paths, coords, out, source, batch_size, workers,
                            device=device)
        count, dim, what = len(paths), index.descriptors.shape[1], "exact"
    else:
        if kind == "auto":
            kind = "exact" if len(table) <= AUTO_EXACT_MAX else "ivfpq"
        manifest = build_tile_index(
            checkpoint, table, out, source, kind, shard_size, lists, pq_bytes,
            rerank_store, extend, batch_size, workers, device, log=Console().print, pca=pca,
        )
        count, dim, what = manifest["count"], manifest["metadata"]["descriptor_dim"], kind
    Console().print(f"indexed {count} tiles ({what}, D = {dim}) into {out}")


@app.command("locate")
def locate(
    images: list[Path] = typer.Argument(
        ..., help="Query panoramas (north-aligned), or photos with --fov / --photo."),
    index: Path = typer.Option(..., help="Index file or folder from `ssageo index build`."),
    checkpoint: Path | None = typer.Option(
        None, help="Checkpoint (default: the one the index was built from)."
    ),
    top_k: int = typer.Option(5, min=1, help="Tiles to list per image."),
    nprobe: int = typer.Option(32, min=1, help="ivfpq: inverted lists visited per query."),
    rerank: int = typer.Option(
        100, min=0, help="ivfpq: candidates re-scored from the re-ranking store (0: none)."
    ),
    in_memory: bool = typer.Option(
        False, "--in-memory", help="ivfpq: read the re-ranking store into RAM first (for many "
        "queries; a memory-mapped store is read from disk where the OS does not cache it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    onnx: Path | None = typer.Option(
        None, "--onnx", help="Embed with this exported query encoder (onnxruntime, CPU; "
        "torch is not loaded)."),
    fov: float | None = typer.Option(
        None, help="The images are ordinary (pinhole) photos with this horizontal field of "
        "view in degrees (overrides their EXIF)."),
    photo: bool = typer.Option(
        False, "--photo", help="The images are ordinary photos; their field of view from EXIF "
        "(35 mm-equivalent focal length, or focal length and sensor width)."),
) -> None:
    """Rank the index's tiles for each image: lat, lon and cosine score of the best ones.

    A photo (--fov or --photo) is mapped onto the panorama band it covers, assumed level.
    """
    if onnx is not None:
        from ssageo.evaluate.deploy import OnnxLocalizer

        if checkpoint is not None:
            raise typer.BadParameter("give --checkpoint or --onnx, not both")
        if fov is not None or photo:
            raise typer.BadParameter("--fov/--photo need the PyTorch model (drop --onnx)")
        localizer, fovs = OnnxLocalizer(index, onnx, in_memory), None
        results = localizer.locate_many(images, top_k, nprobe=nprobe, rerank=rerank)
    else:
        from ssageo.evaluate.index import Localizer
        from ssageo.evaluate.photos import photo_fovs

        if fov is not None:
            _check_crop(fov, None)
        fovs = photo_fovs(images, fov) if fov is not None or photo else None
        localizer = Localizer(index, checkpoint, _device(device), in_memory)
        results = localizer.locate_many(images, top_k, nprobe=nprobe, rerank=rerank,
                                        fovs=None if fovs is None else [f for f, _ in fovs])
        if fovs is not None and localizer.model.bev is not None:  # each candidate's heading
            from ssageo.evaluate.heading import add_headings

            classes = int(localizer.config["model"]["bev"]["classes"])
            for image, (value, _), hits in zip(images, fovs, results, strict=True):
                add_headings(localizer.model, localizer.query_tensor(image, value), value, hits,
                             classes)
    if as_json:
        payload = [{"image": str(p), "results": r, "time_s": t}
                   for p, r, t in zip(images, results, localizer.timings, strict=True)]
        for item, (value, source) in zip(payload, fovs or (), strict=False):
            item.update(fov=value, fov_source=source)
        typer.echo(json.dumps(payload, indent=2))
        return
    console = Console()
    for image, hits in zip(images, results, strict=True):
        headings = any("heading" in hit for hit in hits)
        columns = ("rank", "lat", "lon", "score", *(("heading",) if headings else ()), "tile")
        table = Table(*columns, title=str(image))
        for hit in hits:
            heading = hit.get("heading")
            shown = (() if not headings else ("-",) if heading is None else
                     (f"{heading:.0f}° ({hit['heading_confidence']:.2f})",))
            table.add_row(str(hit["rank"]), f"{hit['lat']:.6f}", f"{hit['lon']:.6f}",
                          f"{hit['score']:.4f}", *shown, hit["tile"])
        console.print(table)
