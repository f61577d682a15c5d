"""``pairs``: your own data as one CSV file of ground-query / satellite-tile pairs.

The header is ``query,reference,split`` optionally followed by ``lat,lon`` (of the place) and
``prior`` (the tile's prior label); paths are relative to the CSV's folder, ``split`` is train,
val or test. The CSV file itself is the dataset root (``ssageo data check pairs.csv``, ``ssageo
train --data pairs.csv``). Several queries may share one tile (its coordinates are then the
mean of theirs); a query is listed once. An empty or absent ``prior`` uses the tile's
``sat_BEV_label`` location when it sits in a satellite folder (``ssageo.data.paths``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssageo.data.base import (
    SPLITS,
    DatasetSpec,
    Manifest,
    SplitUnavailable,
    file_problem,
    find_prior,
    resolve_entry,
)
from ssageo.data.textfile import parse_latlon, read_csv_rows
from ssageo.io import DataError

REQUIRED = ("query", "reference", "split")
HEADERS = (REQUIRED, (*REQUIRED, "lat", "lon"), (*REQUIRED, "prior"),
           (*REQUIRED, "lat", "lon", "prior"))
HEADER_TEXT = "query,reference,split[,lat,lon][,prior]"

SPEC = DatasetSpec(
    name="pairs", title="pairs CSV", splits=SPLITS, held_out="val", validation="val",
    no_validation="", expected=f"a .csv file with the header {HEADER_TEXT}",
    coords="gps", coords_source="lat,lon columns of {root}",
    coords_missing="{root} has no lat,lon columns", query="panorama",
)


@dataclass(frozen=True)
class Row:
    """One validated CSV row; ``where`` is "file:line"."""

    where: str
    query: Path
    reference: Path
    split: str
    latlon: tuple[float, float] | None
    prior: Path | None


def markers(root: Path) -> list[str]:
    """``[file name]`` when ``root`` is a ``.csv`` file (the CSV is the dataset), else none."""
    return [root.name] if root.suffix.lower() == ".csv" and root.is_file() else []


def read_rows(path: Path) -> list[Row]:
    """Every row of a pairs CSV, validated; DataError names the file and line of a bad one."""
    try:
        stamp = path.stat()
    except OSError:
        raise DataError(f"{path}: pairs CSV is missing") from None
    return _rows(path, stamp.st_mtime_ns, stamp.st_size)


@functools.lru_cache(maxsize=4)  # sources() and read() both need the rows: parse once
def _rows(path: Path, mtime: int, size: int) -> list[Row]:
    lines = read_csv_rows(path, "pairs CSV")
    if not lines:
        raise DataError(f"{path}: pairs CSV is empty (expected the header {HEADER_TEXT})")
    first, header = lines[0]
    columns = tuple(c.strip().lower() for c in header)
    if columns not in HEADERS:
        raise DataError(f"{path}:{first}: header must be {HEADER_TEXT}, got {','.join(header)!r}")
    folder, rows, seen = path.parent, [], {}
    for n, fields in lines[1:]:
        where = f"{path}:{n}"
        if len(fields) != len(columns):
            raise DataError(f"{where}: expected {len(columns)} columns ({','.join(columns)}), "
                            f"got {len(fields)}")
        cell = dict(zip(columns, (f.strip() for f in fields), strict=True))
        if cell["split"] not in SPLITS:
            raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}, got "
                            f"{cell['split']!r}")
        query = resolve_entry(folder, cell["query"], where)
        if query in seen:
            raise DataError(f"{where}: query {cell['query']} is already listed on line "
                            f"{seen[query]} (each query is one pair)")
        seen[query] = n
        rows.append(Row(
            where, query, resolve_entry(folder, cell["reference"], where), cell["split"],
            parse_latlon(cell["lat"], cell["lon"], where) if "lat" in cell else None,
            resolve_entry(folder, cell["prior"], where) if cell.get("prior") else None,
        ))
    if not rows:
        raise DataError(f"{path}: pairs CSV has a header but no pairs")
    return rows


def sources(root: Path, split: str, vigor_mode: str) -> tuple[list[Path], list[Path]]:
    """The CSV, and the folders of its images and labels (their listings key the cache)."""
    folders = {p.parent for r in read_rows(root) for p in (r.query, r.reference, r.prior) if p}
    return [root], sorted(folders)


def _split_rows(root: Path, split: str) -> list[Row]:
    rows = read_rows(root)
    picked = [r for r in rows if r.split == split]
    if not picked:
        present = ", ".join(s for s in SPLITS if any(r.split == s for r in rows))
        raise SplitUnavailable(f"{root}: no pairs with split '{split}' (it lists {present})")
    return picked


def read(root: Path, split: str, vigor_mode: str = "same-area") -> Manifest:
    """Read the ``split`` rows of a pairs CSV into a Manifest (pairs with a missing or empty
    file are skipped and listed)."""
    rows = _split_rows(root, split)
    folder = root.parent
    kept, missing = [], []
    for r in rows:
        problems = [p for p in map(file_problem, filter(None, (r.query, r.reference, r.prior)))
                    if p]
        missing.extend(problems)
        if not problems:
            kept.append(r)
    if not kept:
        raise DataError(f"{root}: {split}: none of the {len(rows)} pairs has its images "
                        f"(e.g. {missing[0]})")
    index: dict[Path, int] = {}  # reference -> its index, in order of first listing
    labelled: dict[Path, Row] = {}  # reference -> the first row that names its prior
    for r in kept:
        index.setdefault(r.reference, len(index))
        first = labelled.setdefault(r.reference, r) if r.prior else r
        if first.prior != r.prior:
            rel = [p.relative_to(folder).as_posix() for p in (r.reference, first.prior, r.prior)]
            raise DataError(f"{r.where}: tile {rel[0]} has the prior {rel[1]} on line "
                            f"{first.where.rsplit(':', 1)[1]}, here {rel[2]}")
    priors = [labelled[t].prior if t in labelled else find_prior(folder, t) for t in index]
    positive = np.asarray([index[r.reference] for r in kept], dtype=np.int64)
    refs = list(index)
    query_coords = reference_coords = None
    if kept[0].latlon is not None:
        query_coords = np.asarray([r.latlon for r in kept], dtype=np.float64)
        sums = np.zeros((len(refs), 2))
        np.add.at(sums, positive, query_coords)
        reference_coords = sums / np.bincount(positive, minlength=len(refs))[:, None]
    return Manifest(
        dataset="pairs", split=split, root=folder, layout="pairs",
        query_paths=[r.query for r in kept], reference_paths=refs, prior_paths=priors,
        positive=positive, semi_positive=np.full((len(kept), 3), -1),
        place_ids=[r.reference.stem for r in kept], reference_ids=[p.stem for p in refs],
        query_coords=query_coords, reference_coords=reference_coords,
        missing=missing, skipped=len(rows) - len(kept),
    )
