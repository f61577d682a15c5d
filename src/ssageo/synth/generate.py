"""``generate``: build a world, render every place and write one of the real layouts.

Resume and overwrite: an output folder whose ``world.json`` holds the same parameters is resumed
(images already on disk are kept, the rest are rendered, index files are rewritten). Any other
non-empty folder is refused unless ``overwrite`` is set. Every run first records the files it
will write in ``synth_files.txt``; ``overwrite`` removes exactly the files that record lists
and refuses (removing nothing) when the folder holds anything else: files synth did not
write, or symbolic links (whose targets may be the user's own data).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from ssageo.config import ConfigError
from ssageo.io import atomic_write_text, read_image, write_error, write_image
from ssageo.synth.layouts import VIGOR_CITIES, Job, Plan, plan_cvact, plan_cvusa, plan_vigor
from ssageo.synth.photos import PHOTO_CSV, check_photo_fov, photo_paths, render_photos
from ssageo.synth.places import world_for_places
from ssageo.synth.render import (
    SKY,
    TILE_CELLS,
    TILE_M,
    VIEW_M,
    render_panorama,
    render_satellite,
    sat_metres_per_pixel,
)
from ssageo.synth.university import plan_university, render_drone
from ssageo.synth.world import (
    BUILDING,
    CLASS_NAMES,
    DEFAULT_ORIGIN,
    DISTRICT_M,
    DISTRICT_TYPES,
    RES,
    TREE,
    World,
)

GENERATOR_VERSION = "1.0"
LAYOUTS = ("cvusa", "cvact", "vigor", "university")
SPLITS = ("same-area", "cross-area")
MIN_PLACES = 8
MAX_PLACES = 200_000
# The record of every file a run writes (read by --overwrite); its first line says what it is.
FILE_RECORD = "synth_files.txt"
_RECORD_HEADER = "# ssageo synth: the files this run writes (--overwrite removes these only)"
_CACHE = ".ssageo_cache"  # derived files of the readers (keyed by content): neither ours nor theirs
_PALETTE = np.array([[176, 164, 120], [90, 90, 96], [214, 64, 56], [46, 150, 52],
                     [52, 96, 214], [150, 190, 235]], np.uint8)  # classes + sky, for previews

_WORLDS: list[World] = []  # read by forked workers (copy-on-write, never pickled)
_RUN: dict = {}


def check_parameters(layout: str, places: int, sat_size: int, pano_size: tuple[int, int],
                     split: str) -> None:
    """Raise ConfigError (one line, saying what is wrong) for impossible parameters."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if not MIN_PLACES <= places <= MAX_PLACES:
        raise ConfigError(f"--places {places} is impossible: use {MIN_PLACES}..{MAX_PLACES}")
    if not 16 <= sat_size <= 2048:
        raise ConfigError(f"--sat-size {sat_size} is impossible: use 16..2048 pixels")
    w, h = pano_size
    if not (32 <= w <= 8192 and 8 <= h <= w // 2 and w % 4 == 0):
        raise ConfigError(
            f"--pano-size {w}x{h} is impossible: width 32..8192 and a multiple of 4 (so a "
            "quarter turn is a whole number of columns), height 8..width/2 (at most 180 deg)")


def parse_size(text: str) -> tuple[int, int]:
    """``"512x128"`` -> (512, 128); ConfigError for anything else."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--pano-size '{text}' is not of the form WIDTHxHEIGHT (e.g. 512x128)")
    return int(parts[0]), int(parts[1])


def generate(out: Path, layout: str = "cvusa", places: int = 200, seed: int = 0,
             sat_size: int = 256, pano_size: tuple[int, int] = (512, 128),
             split: str = "same-area", overwrite: bool = False, preview: bool = False,
             progress: bool = False, workers: int | None = None,
             origin: tuple[float, float] | None = None, photos: float | None = None) -> dict:
    """Generate a synthetic data set in one of the real layouts under ``out``.

    ``pano_size`` is (W, H). ``workers`` processes render images (default: 2 for large runs,
    else 1; the output is byte-identical either way). ``origin`` (lat, lon) anchors the local
    tangent plane (VIGOR uses each city's own origin). ``photos`` (degrees): also a pinhole
    photo of that horizontal FoV per place (:mod:`ssageo.synth.photos`). Returns a summary:
    counts, files, world parameters, seconds, and how many images were rendered or already
    present.
    """
    t0 = time.perf_counter()
    out = Path(out)
    pano_size = (int(pano_size[0]), int(pano_size[1]))
    check_parameters(layout, places, sat_size, pano_size, split)
    origin = (origin[0], origin[1]) if origin is not None else DEFAULT_ORIGIN
    params = {"layout": layout, "places": places, "seed": seed, "sat_size": sat_size,
              "pano_size": list(pano_size), "split": split, "origin": list(origin)}
    if photos is not None:  # recorded only when asked, so older worlds still resume
        params["photos"] = check_photo_fov(photos)
    _prepare(out, params, overwrite)
    meta = _metadata(params)

    if layout == "vigor":
        per_city = np.full(4, places // 4) + (np.arange(4) < places % 4)
        made = [world_for_places(int(k), seed * 4 + i, VIGOR_CITIES[c], avoid_grid=TILE_CELLS // 2)
                for i, (c, k) in enumerate(zip(VIGOR_CITIES, per_city, strict=True))]
        worlds = [m[0] for m in made]
        plan = plan_vigor(worlds, [m[1] for m in made], sat_size, seed)
    else:
        world, pts = world_for_places(places, seed, origin)
        worlds = [world]
        planner = {"cvusa": plan_cvusa, "cvact": plan_cvact, "university": plan_university}
        plan = planner[layout](world, pts, split, seed)
    planned = ["world.json", *(["preview.png"] if preview else []),
               *(p for job in plan.jobs for p in (job.image, *job.labels)),
               *(photo_paths(plan) if photos is not None else ())]
    _write_record(out, planned)  # before anything else, so an interrupted run is removable too
    atomic_write_text(out / "world.json", json.dumps({**meta, "complete": False}, indent=2))

    rendered = _render_all(out, worlds, plan, seed, sat_size, pano_size, progress, workers)
    # The layout's index files are known once written: recorded as they are (a kill between
    # the two leaves them unrecorded, so --overwrite refuses to guess and names them).
    index = plan.finish(out)
    if photos is not None:
        render_photos(out, worlds, plan, seed, params["photos"], pano_size)
        index["files"]["photos"] = PHOTO_CSV
    _write_record(out, [*planned, *index["files"].values()])
    if preview:
        write_preview(out, plan)
    meta.update(complete=True, counts=index["counts"], files=index["files"], record=FILE_RECORD,
                worlds=[{"cells": list(w.shape), "districts": _district_counts(w)} for w in worlds])
    atomic_write_text(out / "world.json", json.dumps(meta, indent=2))
    return {**meta, "out": str(out), "images_rendered": rendered,
            "images_present": len(plan.jobs) - rendered,
            "preview": str(out / "preview.png") if preview else None,
            "seconds": time.perf_counter() - t0}


def _prepare(out: Path, params: dict, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(p.name != _CACHE for p in out.iterdir()):
        if overwrite:
            _remove_recorded(out)
        elif not _same_run(out, params):
            raise FileExistsError(
                f"{out}: exists and is not empty; pass --overwrite to replace what `ssageo synth` "
                "wrote there (a folder made by `ssageo synth` with the same parameters is resumed "
                "instead)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc) from None


def _write_record(out: Path, rels: list[str]) -> None:
    lines = [_RECORD_HEADER, FILE_RECORD, *sorted(set(rels))]
    atomic_write_text(out / FILE_RECORD, "".join(f"{line}\n" for line in lines))


def _read_record(out: Path) -> set[str]:
    """The relative paths ``synth_files.txt`` lists; empty when there is no such record."""
    path = out / FILE_RECORD
    if not path.is_file() or path.is_symlink():
        return set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return set()
    return set(lines[1:]) if lines and lines[0] == _RECORD_HEADER else set()


def _our_temporary(rel: str, recorded: set[str]) -> bool:
    """True for ``dir/.name.XXXXXXXX.ext``: the temporary file of a recorded ``dir/name.ext``
    that an interrupted write left (see ssageo.io.atomic_write)."""
    path = Path(rel)
    name, suffix = path.name, path.suffix
    if not name.startswith(".") or len(name) < 11 + len(suffix):
        return False
    original = name[1:len(name) - len(suffix) - 9]
    return original.endswith(suffix) and (path.parent / original).as_posix() in recorded


def _remove_recorded(out: Path) -> None:
    """--overwrite: delete the files synth's record lists, after checking that nothing else is
    there; refuse (deleting nothing) when the folder holds a symlink or a file synth did not
    write. Folders that held recorded files and are left empty are removed."""
    recorded = _read_record(out)
    ours, foreign = [], []
    for base, dirs, files in os.walk(out):
        here = Path(base)
        if here == out:
            dirs[:] = [d for d in dirs if d != _CACHE]
        for name in sorted(dirs + files):
            path = here / name
            rel = path.relative_to(out).as_posix()
            if path.is_symlink():
                raise FileExistsError(
                    f"{path}: is a symbolic link; --overwrite removes only files `ssageo synth` "
                    f"wrote, never through a link - remove the link yourself or use another folder")
            if name in dirs:
                continue
            (ours if rel in recorded or _our_temporary(rel, recorded) else foreign).append(path)
    if foreign:
        why = (f"not listed in {out / FILE_RECORD}" if recorded
               else f"{out} has no {FILE_RECORD} record of what `ssageo synth` wrote")
        more = f" and {len(foreign) - 1} other files" if len(foreign) > 1 else ""
        raise FileExistsError(
            f"{foreign[0]}{more}: --overwrite refused, not written by `ssageo synth` ({why}); "
            "nothing was removed - move them away or use another folder")
    for path in ours:
        if path.name != FILE_RECORD:
            path.unlink()
    # folders that held recorded files and are now empty (never one synth did not write into)
    folders = {parent for path in ours for parent in path.parents if out in parent.parents}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    (out / FILE_RECORD).unlink(missing_ok=True)  # last: an interrupted removal can be redone


def _same_run(out: Path, params: dict) -> bool:
    meta_path = out / "world.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return meta.get("parameters") == params and meta.get("generator_version") == GENERATOR_VERSION


def _metadata(params: dict) -> dict:
    w, h = params["pano_size"]
    meta = {
        "generator": "ssageo.synth", "generator_version": GENERATOR_VERSION,
        "parameters": params, "layout": params["layout"], "split": params["split"],
        "seed": params["seed"], "class_names": list(CLASS_NAMES),
        "pano_class_names": [*CLASS_NAMES, "sky"],
        "metres_per_pixel": sat_metres_per_pixel(params["sat_size"]),
        "tile_metres": TILE_M, "world_cell_metres": RES,
        "origin": {"lat": params["origin"][0], "lon": params["origin"][1]},
        "camera_height_m": [2.0, 2.5], "view_distance_m": VIEW_M,
        "pano_vertical_fov_deg": 360.0 * h / w,
        "prior_rule": "building OR tree -> 255, else 0",
    }
    if params["layout"] == "vigor":
        meta["cities"] = {c: {"lat": o[0], "lon": o[1]} for c, o in VIGOR_CITIES.items()}
    return meta


def _district_counts(world: World) -> dict:
    step = int(DISTRICT_M / RES)
    kinds = world.district[::step, ::step].ravel()
    return {name: int((kinds == i).sum()) for i, name in enumerate(DISTRICT_TYPES)}


def _job_done(out: Path, job: Job) -> bool:
    return all((out / p).is_file() for p in (job.image, *job.labels))


def _render_job(index: int) -> int:
    """Render and write one job (in a worker); return how many files it wrote."""
    out, seed, sat_size, pano_size = _RUN["out"], _RUN["seed"], _RUN["sat"], _RUN["pano"]
    job = _RUN["jobs"][index]
    if _job_done(out, job):
        return 0
    world = _WORLDS[job.world]
    rng = np.random.default_rng([seed, 11, *job.key])
    if job.kind == "pano":
        rgb, classes = render_panorama(world, job.row, job.col, pano_size, rng)
        write_image(out / job.image, rgb)
        if job.labels:
            write_image(out / job.labels[0], classes, label=True)
    elif job.kind == "drone":
        write_image(out / job.image, render_drone(world, job.row, job.col, sat_size, rng))
    else:
        rgb, classes = render_satellite(world, job.row, job.col, sat_size, rng)
        write_image(out / job.image, rgb)
        if len(job.labels) == 2:  # (prior, truth); a University tile has the truth only
            prior = np.where((classes == BUILDING) | (classes == TREE), 255, 0).astype(np.uint8)
            write_image(out / job.labels[0], prior, label=True)
        write_image(out / job.labels[-1], classes, label=True)
    return 1


def _render_all(out: Path, worlds: list[World], plan: Plan, seed: int, sat_size: int,
                pano_size: tuple[int, int], progress: bool, workers: int | None) -> int:
    """Render every job not already on disk; returns the number of jobs rendered."""
    _WORLDS[:] = worlds
    _RUN.update(out=out, seed=seed, sat=sat_size, pano=pano_size, jobs=plan.jobs)
    n = len(plan.jobs)
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if n >= 400 else 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="rendering", unit="img")
    done = 0
    try:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for k in pool.imap_unordered(_render_job, range(n), chunksize=16):
                    done += k
                    if bar is not None:
                        bar.update(1)
        else:
            for i in range(n):
                done += _render_job(i)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        _WORLDS.clear()
        _RUN.clear()
    return done


def colourise(classes: np.ndarray) -> np.ndarray:
    """Class-index map -> RGB with the preview palette (sky included)."""
    return _PALETTE[np.minimum(classes, SKY)]


def write_preview(out: Path, plan: Plan) -> Path:
    """A PNG sheet of up to 4 (panorama | satellite | truth) triples, read back from disk."""
    import cv2

    rows = []
    for pano_rel, sat_rel, truth_rel in plan.preview:
        pano = read_image(out / pano_rel)
        sat = read_image(out / sat_rel)
        truth = colourise(read_image(out / truth_rel, mode="L"))
        side = 160
        pano = cv2.resize(pano, (int(pano.shape[1] * side / pano.shape[0]), side))
        pano[:, pano.shape[1] // 2] = (255, 0, 0)  # the north-facing column
        sat = cv2.resize(sat, (side, side), interpolation=cv2.INTER_AREA)
        truth = cv2.resize(truth, (side, side), interpolation=cv2.INTER_NEAREST)
        for img in (sat, truth):
            img[side // 2 - 2: side // 2 + 2, side // 2 - 2: side // 2 + 2] = (255, 0, 0)
        gap = np.full((side, 6, 3), 255, np.uint8)
        rows.append(np.concatenate([pano, gap, sat, gap, truth], 1))
    width = max(r.shape[1] for r in rows)
    sheet = np.full((len(rows) * 166, width, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        sheet[i * 166: i * 166 + r.shape[0], : r.shape[1]] = r
    path = out / "preview.png"
    write_image(path, sheet)
    return path
