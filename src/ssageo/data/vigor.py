"""VIGOR in its official layout or the Sample4Geo rearrangement.

Official: ``<City>/panorama/<panoid>,<lat>,<lon>,.jpg`` and ``<City>/satellite/satellite_<lat>_
<lon>.png``; Sample4Geo: ``ground/<City>/...`` and ``satellite/<City>/...``. Both keep the split
files in ``splits/<City>/``: ``satellite_list.txt`` (the gallery), ``same_area_balanced_{train,
test}.txt`` and ``pano_label_balanced.txt`` (every panorama of the city, used for cross-area).
A split line has 13 whitespace-separated columns: ``pano pos dy dx semi1 dy dx semi2 dy dx
semi3 dy dx`` (pixel offsets of the panorama location from each tile centre).

Same-area: train and test from all four cities. Cross-area: train NewYork + Seattle, test
Chicago + SanFrancisco. The gallery (references) is every tile of the split's cities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssageo.constants import VIGOR_CITIES, VIGOR_CROSS_AREA
from ssageo.data.base import (
    DatasetSpec,
    Manifest,
    SplitUnavailable,
    file_problem,
    find_prior,
    resolve_entry,
)
from ssageo.data.textfile import read_lines
from ssageo.io import DataError

COLUMNS = 13
VIGOR_MODES = ("same-area", "cross-area")
CROSS_AREA = VIGOR_CROSS_AREA

SPEC = DatasetSpec(
    name="vigor", title="VIGOR", splits=("train", "test"), held_out="test", validation=None,
    no_validation="VIGOR has no separate validation split: no validation during training and "
    "no model selection; use checkpoints/last (the test split is never used for selection)",
    expected="splits/<City>/, <City>/panorama/ + <City>/satellite/ "
             "(or ground/<City>/ + satellite/<City>/)",
    coords="tile", coords_source="panorama and tile file names",
    query="panorama", sizes={"reference": (640, 640), "query": (2048, 1024)}, modes=VIGOR_MODES,
)


def markers(root: Path) -> list[str]:
    """The VIGOR layout markers (either layout) present under ``root``."""
    return [rel for city in VIGOR_CITIES
            for rel in (f"splits/{city}", f"{city}/panorama", f"{city}/satellite",
                        f"ground/{city}", f"satellite/{city}")
            if (root / rel).exists()]


def layout(root: Path) -> str:
    """``vigor-sample4geo`` when tiles live in ``satellite/<City>``, else ``vigor-official``."""
    if any((root / "satellite" / c).is_dir() for c in VIGOR_CITIES):
        return "vigor-sample4geo"
    return "vigor-official"


def _folders(root: Path, city: str) -> tuple[str, str]:
    """Root-relative folders of a city's panoramas and tiles in the detected layout."""
    if layout(root) == "vigor-sample4geo":
        return f"ground/{city}", f"satellite/{city}"
    return f"{city}/panorama", f"{city}/satellite"


def split_plan(root: Path, split: str, mode: str) -> tuple[list[str], str, list[str]]:
    """(cities present, split file name, notes about cities of the mode that are absent)."""
    if split not in ("train", "test"):
        raise DataError(f"VIGOR has no '{split}' split: use 'train' or 'test' (with "
                        "--vigor-mode same-area or cross-area)")
    wanted: tuple[str, ...]
    if mode == "same-area":
        wanted, name = VIGOR_CITIES, f"same_area_balanced_{split}.txt"
    else:
        wanted, name = VIGOR_CROSS_AREA[split], "pano_label_balanced.txt"
    cities = [c for c in wanted if (root / "splits" / c).is_dir()]
    if not cities:
        raise SplitUnavailable(f"{root / 'splits'}: none of the {mode} {split} cities "
                        f"({', '.join(wanted)}) has a split folder")
    notes = [f"{root / 'splits' / c}: missing (city {c} left out of {mode} {split})"
             for c in wanted if c not in cities]
    return cities, name, notes


def sources(root: Path, split: str, mode: str) -> tuple[list[Path], list[Path]]:
    """Files whose content, and folders whose listing, determine the manifest."""
    cities, name, _ = split_plan(root, split, mode)
    files, folders = [], []
    for c in cities:
        files += [root / "splits" / c / "satellite_list.txt", root / "splits" / c / name]
        pano_dir, sat_dir = _folders(root, c)
        folders += [root / pano_dir, root / sat_dir,
                    root / sat_dir.replace("satellite", "sat_BEV_label")]
    return files, folders


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    rows = [(n, line.split()) for n, line in read_lines(path, "VIGOR split file")]
    if not rows:
        raise DataError(f"{path}: split file has no entries")
    return rows


def pano_latlon(name: str, where: str) -> tuple[float, float]:
    """(lat, lon) from ``<panoid>,<lat>,<lon>,.jpg``."""
    parts = name.split(",")
    try:
        return float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise DataError(f"{where}: panorama name '{name}' is not '<panoid>,<lat>,<lon>,.jpg'"
                        ) from None


def tile_latlon(name: str, where: str) -> tuple[float, float]:
    """(lat, lon) from ``satellite_<lat>_<lon>.png``."""
    parts = Path(name).stem.split("_")
    try:
        if len(parts) != 3 or parts[0] != "satellite":
            raise ValueError
        return float(parts[1]), float(parts[2])
    except ValueError:
        raise DataError(f"{where}: tile name '{name}' is not 'satellite_<lat>_<lon>.png'"
                        ) from None


def read(root: Path, split: str, vigor_mode: str = "same-area") -> Manifest:
    """Read one VIGOR split: queries of the split's cities, gallery = all their tiles."""
    cities, name, missing = split_plan(root, split, vigor_mode)
    refs: list[Path] = []
    ref_ids: list[str] = []
    ref_coords: list[tuple[float, float]] = []
    index: dict[tuple[str, str], int] = {}  # (city, tile name) -> reference index, present only
    queries: list[Path] = []
    q_ids: list[str] = []
    q_coords: list[tuple[float, float]] = []
    pos: list[int] = []
    semi: list[list[int]] = []
    offsets: list[list[list[float]]] = []
    skipped = 0  # queries dropped (``missing`` also lists absent gallery tiles and cities)
    for city in cities:
        pano_dir, sat_dir = _folders(root, city)
        tile_list = root / "splits" / city / "satellite_list.txt"
        listed: set[str] = set()
        for n, cols in _lines(tile_list):
            where = f"{tile_list}:{n}"
            if len(cols) != 1:
                raise DataError(f"{where}: expected one tile name per line, got {len(cols)} "
                                "columns")
            listed.add(cols[0])
            path = resolve_entry(root, f"{sat_dir}/{cols[0]}", where)
            problem = file_problem(path)
            if problem:
                missing.append(problem)
                continue
            index[(city, cols[0])] = len(refs)
            refs.append(path)
            ref_ids.append(f"{city}/{cols[0]}")
            ref_coords.append(tile_latlon(cols[0], where))
        split_path = root / "splits" / city / name
        for n, cols in _lines(split_path):
            where = f"{split_path}:{n}"
            if len(cols) != COLUMNS:
                raise DataError(f"{where}: expected {COLUMNS} whitespace-separated columns "
                                "(pano pos dy dx semi1 dy dx semi2 dy dx semi3 dy dx), got "
                                f"{len(cols)}")
            tiles = cols[1::3]
            unknown = [t for t in tiles if t not in listed]
            if unknown:
                raise DataError(f"{where}: tile '{unknown[0]}' is not listed in {tile_list}")
            try:
                offs = [[float(cols[i + 1]), float(cols[i + 2])] for i in range(1, COLUMNS, 3)]
            except ValueError:
                raise DataError(f"{where}: offsets (dy dx) must be numbers") from None
            pano = resolve_entry(root, f"{pano_dir}/{cols[0]}", where)
            problem = file_problem(pano)
            if problem or (city, tiles[0]) not in index:
                missing.append(problem or f"{where}: positive tile {tiles[0]} missing or empty")
                skipped += 1
                continue
            queries.append(pano)
            q_ids.append(f"{city}/{cols[0]}")
            q_coords.append(pano_latlon(cols[0], where))
            pos.append(index[(city, tiles[0])])
            semi.append([index.get((city, t), -1) for t in tiles[1:]])
            offsets.append(offs)
    if not queries:
        raise DataError(f"{root}: VIGOR {vigor_mode} {split}: no query has its panorama and "
                        f"positive tile (e.g. {missing[0] if missing else 'empty split files'})")
    return Manifest(
        dataset="vigor", split=split, root=root, layout=layout(root), vigor_mode=vigor_mode,
        query_paths=queries, reference_paths=refs,
        prior_paths=[find_prior(root, r) for r in refs],
        positive=np.asarray(pos, dtype=np.int64), semi_positive=np.asarray(semi, dtype=np.int64),
        place_ids=q_ids, reference_ids=ref_ids,
        query_coords=np.asarray(q_coords), reference_coords=np.asarray(ref_coords),
        offsets=np.asarray(offsets, dtype=np.float64), missing=missing, skipped=skipped,
    )
