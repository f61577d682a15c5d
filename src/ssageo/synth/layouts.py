"""The three real on-disk layouts (CVUSA, CVACT, VIGOR), as docs/DATA.md describes them.

Each ``plan_*`` function turns worlds and places into render jobs (what to draw, where to write
it) plus a ``finish`` callable that writes the layout's index files (csv / .mat / split lists)
once every image exists. Paths are relative to the output folder, POSIX style.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssageo.constants import VIGOR_CITIES as CITIES
from ssageo.data.paths import prior_label_path, truth_label_path
from ssageo.io import atomic_write, atomic_write_text
from ssageo.synth.places import assign_splits, tile_cover
from ssageo.synth.render import TILE_CELLS
from ssageo.synth.world import World

VIGOR_CITIES = dict(zip(CITIES, (  # name -> origin (lat, lon) of its local tangent plane
    (41.8781, -87.6298), (40.7128, -74.0060), (37.7749, -122.4194), (47.6062, -122.3321),
), strict=True))
# ACT_data.mat's split structs, fields in file order. The index vector must be the SECOND field:
# Sample4Geo's and SSA's loaders read it by position (`anuData['trainSet'][0][0][1]`), OriCNN's
# and ours by name (`trainInd` / `valInd`), on the same file. The first field's name and content
# (a count here) could not be checked against the real file (its copy in the SSA, OriCNN and
# CVFT repositories is stored without content); no known reader uses it.
CVACT_SPLIT_FIELDS = {"trainSet": ("trainNum", "trainInd"), "valSet": ("valNum", "valInd"),
                      "valSetAll": ("valNum", "valInd")}
_ID_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


@dataclass
class Job:
    """One image to render: a panorama or a satellite tile at a cell corner of a world."""

    kind: str  # "pano" | "sat" | "drone" (synth/university.py)
    world: int
    row: int
    col: int
    image: str
    labels: tuple[str, ...] = ()  # pano: class map; sat: (prior, truth) or (truth,)
    key: tuple[int, ...] = ()  # seeds the per-capture randomness


@dataclass
class Plan:
    jobs: list[Job]
    finish: Callable[[Path], dict]
    preview: list[tuple[str, str, str]] = field(default_factory=list)  # (pano, sat, truth)


def _sat_job(world: int, row: int, col: int, image: str, key: tuple[int, ...]) -> Job:
    return Job("sat", world, row, col, image,
               (prior_label_path(image), truth_label_path(image)), key)


def _ids(rng: np.random.Generator, n: int) -> list[str]:
    """Distinct 22-character ids like CVACT/VIGOR panorama ids (first character alphanumeric)."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        chars = rng.integers(0, len(_ID_CHARS), 22)
        chars[0] %= 62
        s = "".join(_ID_CHARS[chars])
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def plan_cvusa(world: World, places: np.ndarray, split: str, seed: int) -> Plan:
    """CVUSA: ``splits/{train,val}-19zl.csv``, ``bingmap/19``, ``streetview/{panos,annotations}``,
    ``split_locations/all.csv``; place id i (1-based) is row i-1 of all.csv."""
    which = assign_splits(world, places, ("train", "val"), (0.2,), split,
                          np.random.default_rng([seed, 3]))
    jobs, rows = [], []
    for i, (r, c) in enumerate(places.tolist(), 1):
        sat, pano, ann = (f"bingmap/19/{i:07d}.jpg", f"streetview/panos/{i:07d}.jpg",
                          f"streetview/annotations/{i:07d}.png")
        jobs += [Job("pano", 0, r, c, pano, (ann,), (0, 0, i)), _sat_job(0, r, c, sat, (0, 1, i))]
        rows.append(f"{sat},{pano},{ann}")
    lat, lon = world.latlon(places[:, 0], places[:, 1])

    def finish(out: Path) -> dict:
        files = {}
        for k, name in enumerate(("train", "val")):
            rel = f"splits/{name}-19zl.csv"
            picked = np.flatnonzero(which == k)
            atomic_write_text(out / rel, "".join(f"{rows[i]}\n" for i in picked))
            files[name] = rel
        atomic_write_text(out / "split_locations/all.csv", "".join(
            f"{a:.8f},{b:.8f},{a:.8f},{b:.8f}\n" for a, b in zip(lat, lon, strict=True)))
        files["locations"] = "split_locations/all.csv"
        return {"files": files, "counts": {"train": int((which == 0).sum()),
                                           "val": int((which == 1).sum())}}

    preview = []
    for i in np.flatnonzero(which == 1)[:4]:
        sat, pano, _ = rows[i].split(",")
        preview.append((pano, sat, truth_label_path(sat)))
    return Plan(jobs, finish, preview)


def plan_cvact(world: World, places: np.ndarray, split: str, seed: int) -> Plan:
    """CVACT: ``ACT_data.mat`` (panoIds, utm, trainSet/valSet/valSetAll with 1-based indices),
    train/val images under ``ANU_data_small``, test (= valSetAll) images under ``ANU_data_test``."""
    which = assign_splits(world, places, ("train", "val", "test"), (0.2, 0.2), split,
                          np.random.default_rng([seed, 3]))
    ids = _ids(np.random.default_rng([seed, 4]), len(places))
    jobs, preview = [], []
    for i, ((r, c), pid) in enumerate(zip(places.tolist(), ids, strict=True)):
        top = "ANU_data_test" if which[i] == 2 else "ANU_data_small"
        pano = f"{top}/streetview/{pid}_grdView.jpg"
        sat = f"{top}/satview_polish/{pid}_satView_polish.jpg"
        jobs += [Job("pano", 0, r, c, pano, (), (0, 0, i)), _sat_job(0, r, c, sat, (0, 1, i))]
        if which[i] == 1 and len(preview) < 4:
            preview.append((pano, sat, truth_label_path(sat)))
    h, w = world.shape
    # UTM-like easting/northing (m): a fixed false origin plus the local tangent-plane metres.
    utm = np.stack([690000.0 + (places[:, 1] - w / 2) * 0.5,
                    6090000.0 + (h / 2 - places[:, 0]) * 0.5], 1)

    def finish(out: Path) -> dict:
        from scipy.io import savemat

        def split(k: int, struct: str) -> dict:
            index = (np.flatnonzero(which == k) + 1).astype(np.int32).reshape(-1, 1)
            count, ind = CVACT_SPLIT_FIELDS[struct]  # dicts keep order: savemat writes it so
            return {count: np.array([[len(index)]], np.int32), ind: index}

        mat = {"panoIds": np.array(ids), "utm": utm, "trainSet": split(0, "trainSet"),
               "valSet": split(1, "valSet"), "valSetAll": split(2, "valSetAll")}
        atomic_write(out / "ACT_data.mat", lambda tmp: savemat(str(tmp), mat))
        return {"files": {"mat": "ACT_data.mat"},
                "counts": {k: int((which == i).sum())
                           for i, k in enumerate(("train", "val", "test"))}}

    return Plan(jobs, finish, preview)


def vigor_sat_name(lat: float, lon: float) -> str:
    return f"satellite_{lat:.8f}_{lon:.8f}.png"


def plan_vigor(worlds: list[World], places: list[np.ndarray], sat_size: int, seed: int) -> Plan:
    """VIGOR: one world per city; tiles on a half-tile grid; split files with offsets.

    Offsets follow VIGOR's files (as its public loaders read them): ``dy`` = (tile lat - pano
    lat) and ``dx`` = (tile lon - pano lon), in tile pixels, so the panorama lies at pixel
    ``(row, col) = (H/2 + dy, W/2 - dx)`` of each tile.
    """
    stride = TILE_CELLS // 2
    scale = sat_size / TILE_CELLS  # tile pixels per world cell
    jobs: list[Job] = []
    cities: dict[str, dict] = {}
    preview = []
    for wi, (city, world, pts) in enumerate(zip(VIGOR_CITIES, worlds, places, strict=True)):
        h, w = world.shape
        gi = np.arange(1, 2 * (h // TILE_CELLS))  # tile centres whose footprint fits
        gj = np.arange(1, 2 * (w // TILE_CELLS))
        names = {}
        for i in gi.tolist():
            for j in gj.tolist():
                lat, lon = world.latlon(np.array(i * stride), np.array(j * stride))
                names[(i, j)] = vigor_sat_name(float(lat), float(lon))
                jobs.append(_sat_job(wi, i * stride, j * stride,
                                     f"{city}/satellite/{names[(i, j)]}", (wi, 1, i, j)))
        ids = _ids(np.random.default_rng([seed, 4, wi]), len(pts))
        lines = []
        lat, lon = world.latlon(pts[:, 0], pts[:, 1])
        for k, (r, c) in enumerate(pts.tolist()):
            pano = f"{ids[k]},{lat[k]:.8f},{lon[k]:.8f},.jpg"
            jobs.append(Job("pano", wi, r, c, f"{city}/panorama/{pano}", (), (wi, 0, k)))
            cols = [pano]
            for ti, tj in tile_cover(r, c, stride):
                dy = (r - ti * stride) * scale
                dx = (tj * stride - c) * scale
                cols += [names[(ti, tj)], f"{dy:.4f}", f"{dx:.4f}"]
            lines.append(" ".join(cols))
            if len(preview) < 4 and k == 0:
                sat = f"{city}/satellite/{cols[1]}"
                preview.append((f"{city}/panorama/{pano}", sat, truth_label_path(sat)))
        half = np.random.default_rng([seed, 3, wi]).permutation(len(lines)) < len(lines) // 2
        cities[city] = {"tiles": sorted(names.values()), "lines": lines, "test": half}

    def finish(out: Path) -> dict:
        files, counts = {}, {}
        for city, d in cities.items():
            base = f"splits/{city}"
            test, lines = d["test"], np.array(d["lines"], dtype=object)
            texts = {
                "satellite_list.txt": d["tiles"],
                "same_area_balanced_train.txt": list(lines[~test]),
                "same_area_balanced_test.txt": list(lines[test]),
                "pano_label_balanced.txt": d["lines"],
            }
            for name, lines in texts.items():
                atomic_write_text(out / base / name, "".join(f"{s}\n" for s in lines))
                files[f"{city}/{name}"] = f"{base}/{name}"
            counts[city] = {"panoramas": len(d["lines"]), "tiles": len(d["tiles"]),
                            "same_area_test": int(test.sum())}
        return {"files": files, "counts": counts}

    return Plan(jobs, finish, preview)
