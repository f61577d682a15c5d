"""CVUSA as distributed: ``splits/{train,val}-19zl.csv`` and ``split_locations/all.csv``.

Each split line is ``bingmap/19/0000001.jpg,streetview/panos/0000001.jpg[,annotation]``; the
7-digit number of the satellite file is the place id, and row ``id - 1`` of ``all.csv``
(``sat_lat, sat_lon, ground_lat, ground_lon, ...``) holds its GPS. CVUSA has train and val only;
val is the standard test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssageo.data.base import DatasetSpec, Manifest, file_problem, find_prior, resolve_entry
from ssageo.data.textfile import read_lines
from ssageo.io import DataError

SPLIT_FILES = {"train": "splits/train-19zl.csv", "val": "splits/val-19zl.csv"}
GPS_FILE = "split_locations/all.csv"
MARKERS = ("splits/train-19zl.csv", "splits/val-19zl.csv", "bingmap", "streetview/panos")

SPEC = DatasetSpec(
    name="cvusa", title="CVUSA", splits=("train", "val"), held_out="val", validation="val",
    no_validation="",
    expected="splits/train-19zl.csv, splits/val-19zl.csv, bingmap/, streetview/panos/",
    coords="gps", coords_source=f"{{root}}/{GPS_FILE}",
    coords_missing=f"{{root}}/{GPS_FILE} is missing", coords_file=GPS_FILE,
    query="panorama", sizes={"reference": (750, 750), "query": (1232, 224)},
)


def markers(root: Path) -> list[str]:
    """The CVUSA layout markers present under ``root``."""
    return [rel for rel in MARKERS if (root / rel).exists()]


def split_file(root: Path, split: str) -> Path:
    """The csv of a split; DataError for ``test`` (CVUSA has none) or a missing file."""
    if split not in SPLIT_FILES:
        raise DataError(f"CVUSA has no separate '{split}' split: use 'train', or 'val' "
                        "(CVUSA's standard test set)")
    path = root / SPLIT_FILES[split]
    if not path.is_file():
        raise DataError(f"{path}: CVUSA split file is missing")
    return path


def sources(root: Path, split: str, vigor_mode: str) -> tuple[list[Path], list[Path]]:
    """Files whose content, and folders whose listing, determine the manifest."""
    files = [split_file(root, split), root / GPS_FILE]
    folders = [root / "bingmap" / "19", root / "streetview" / "panos",
               root / "sat_BEV_label" / "19"]
    return files, folders


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_pairs(path: Path, root: Path) -> list[tuple[Path, Path]]:
    """(satellite, panorama) paths of every line of a split csv, validated.

    A first line of 2-3 columns none of which looks like a path (no folder, no image suffix,
    e.g. ``sat,pano,annotation``) is a header and skipped.
    """
    pairs: list[tuple[Path, Path]] = []
    for n, line in read_lines(path, "CVUSA split file"):
        cols = [c.strip() for c in line.split(",")]
        where = f"{path}:{n}"
        if not pairs and len(cols) in (2, 3) and not any(
                "/" in c or "\\" in c or c.lower().endswith(IMAGE_SUFFIXES) for c in cols):
            continue  # a header row, as a spreadsheet or pandas writes one
        if len(cols) not in (2, 3) or not all(cols[:2]):
            raise DataError(f"{where}: malformed line, expected 'satellite,panorama[,annotation]' "
                            f"(3 comma-separated paths), got {line.strip()!r}")
        pairs.append((resolve_entry(root, cols[0], where), resolve_entry(root, cols[1], where)))
    if not pairs:
        raise DataError(f"{path}: split file has no entries")
    return pairs


def read_gps(root: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(reference, query) lat/lon of each place id from all.csv; None when the file is absent."""
    path = root / GPS_FILE
    if not path.is_file():
        return None
    rows = []
    for n, line in read_lines(path, "CVUSA GPS file"):
        try:
            rows.append([float(v) for v in line.split(",")[:4]])
        except ValueError:
            if not rows and not any(_is_number(v) for v in line.split(",")[:4]):
                continue  # a header row (sat_lat,sat_lon,...): rows still count from id 1
            raise DataError(f"{path}:{n}: malformed line, expected 'sat_lat,sat_lon,ground_lat,"
                            f"ground_lon,...' numbers, got {line.strip()!r}") from None
        if len(rows[-1]) != 4:
            raise DataError(f"{path}:{n}: malformed line, expected at least 4 columns")
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    rows_of = []
    for pid in ids:
        if not pid.isdigit() or not 1 <= int(pid) <= len(table):
            raise DataError(f"{path}: no row for place id {pid} (the file has {len(table)} rows; "
                            "row id-1 belongs to id)")
        rows_of.append(int(pid) - 1)
    sel = table[rows_of]
    return sel[:, 0:2], sel[:, 2:4]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read(root: Path, split: str, vigor_mode: str = "same-area") -> Manifest:
    """Read one CVUSA split into a Manifest (pairs with missing/empty files are skipped)."""
    pairs = read_pairs(split_file(root, split), root)
    kept, missing = [], []
    for sat, pano in pairs:
        problems = [p for p in (file_problem(sat), file_problem(pano)) if p]
        if problems:
            missing.extend(problems)
        else:
            kept.append((sat, pano))
    if not kept:
        raise DataError(f"{root}: CVUSA {split}: none of the {len(pairs)} pairs has its images "
                        f"(e.g. {missing[0]})")
    refs = [s for s, _ in kept]
    ids = [s.stem for s in refs]
    gps = read_gps(root, ids)
    n = len(kept)
    return Manifest(
        dataset="cvusa", split=split, root=root, layout="cvusa",
        query_paths=[p for _, p in kept], reference_paths=refs,
        prior_paths=[find_prior(root, s) for s in refs],
        positive=np.arange(n), semi_positive=np.full((n, 3), -1),
        place_ids=ids, reference_ids=list(ids),
        query_coords=None if gps is None else gps[1],
        reference_coords=None if gps is None else gps[0],
        missing=missing, skipped=len(pairs) - n,
    )
