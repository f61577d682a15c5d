"""Places: camera positions sampled along roads with a minimum spacing, and their splits."""

from __future__ import annotations

import math

import numpy as np

from ssageo.config import ConfigError
from ssageo.synth.city import generate_world
from ssageo.synth.render import TILE_CELLS
from ssageo.synth.world import DEFAULT_ORIGIN, RES, World

MIN_SPACING_M = 25.0  # no two places closer than this
AREA_PER_PLACE_M2 = 2600.0  # world area per place (random packing on streets: ~2300 m^2)
MARGIN_M = 80.0  # places keep this far from the world edge so tiles and views stay inside


def world_for_places(n: int, seed: int, origin: tuple[float, float] = DEFAULT_ORIGIN,
                     avoid_grid: int = 0) -> tuple[World, np.ndarray]:
    """Generate a world big enough for ``n`` places and sample them.

    Returns the world and an (n, 2) int array of camera cell corners (row, col). ``avoid_grid``
    (cells, e.g. a VIGOR half-tile) keeps places off the lines where a place would sit exactly on
    a tile border. The world grows (deterministically) until enough places fit.
    """
    side = math.sqrt(n * AREA_PER_PLACE_M2) + 2 * MARGIN_M
    for _ in range(8):
        world = generate_world(seed, side, origin)
        places = sample_places(world, n, np.random.default_rng([seed, 2]), avoid_grid)
        if len(places) == n:
            return world, places
        side *= 1.3
    raise RuntimeError(f"could not fit {n} places in a {side:.0f} m world")  # pragma: no cover


def sample_places(world: World, n: int, rng: np.random.Generator,
                  avoid_grid: int = 0) -> np.ndarray:
    """Up to ``n`` road candidates in random order, each at least MIN_SPACING_M from the rest."""
    margin = int(MARGIN_M / RES)
    h, w = world.shape
    cand = world.candidates
    keep = ((cand[:, 0] >= margin) & (cand[:, 0] <= h - margin)
            & (cand[:, 1] >= margin) & (cand[:, 1] <= w - margin))
    if avoid_grid:
        keep &= (cand[:, 0] % avoid_grid != 0) & (cand[:, 1] % avoid_grid != 0)
    cand = cand[keep][rng.permutation(int(keep.sum()))]
    cell = MIN_SPACING_M / RES
    limit = cell * cell
    buckets: dict[tuple[int, int], list[tuple[int, int]]] = {}
    chosen: list[tuple[int, int]] = []
    for r, c in cand.tolist():
        gi, gj = int(r // cell), int(c // cell)
        near = (p for di in (-1, 0, 1) for dj in (-1, 0, 1)
                for p in buckets.get((gi + di, gj + dj), ()))
        if any((r - pr) ** 2 + (c - pc) ** 2 < limit for pr, pc in near):
            continue
        buckets.setdefault((gi, gj), []).append((r, c))
        chosen.append((r, c))
        if len(chosen) == n:
            break
    return np.array(chosen, np.int64).reshape(-1, 2)


def assign_splits(world: World, places: np.ndarray, names: tuple[str, ...], fractions: tuple,
                  split: str, rng: np.random.Generator) -> np.ndarray:
    """Split index per place: ``names[0]`` gets the rest, ``names[i]`` about ``fractions[i-1]``.

    ``same-area`` draws places at random; ``cross-area`` assigns whole districts, so the splits
    are spatially disjoint. Every split gets at least one place.
    """
    n = len(places)
    out = np.zeros(n, np.int64)
    if split == "same-area":
        order = rng.permutation(n)
        start = 0
        for i, frac in enumerate(fractions, 1):
            k = max(int(round(n * frac)), 1)
            out[order[start:start + k]] = i
            start += k
        return out
    district = world.district_id[places[:, 0] - 1, places[:, 1] - 1]
    ids = rng.permutation(np.unique(district))
    if len(ids) < len(names):
        raise ConfigError(f"--split cross-area needs places in at least {len(names)} districts; "
                          f"this world has {len(ids)} (ask for more --places)")
    pos = 0
    for i, frac in enumerate(fractions, 1):
        got = 0
        # Leave enough districts for the remaining splits.
        while pos < len(ids) - (len(fractions) - i + 1) and (got == 0 or got < n * frac):
            mask = district == ids[pos]
            out[mask] = i
            got += int(mask.sum())
            pos += 1
    return out


def tile_cover(row: int, col: int, stride: int = TILE_CELLS // 2) -> list[tuple[int, int]]:
    """VIGOR-style half-overlapping tiles holding a point: positive first, then 3 semi-positives.

    Tiles are centred on multiples of ``stride`` (half a tile), so a point lies in 4 tiles; the
    positive is the one whose central quarter holds it (the nearest centre). Returns grid indices.
    """
    i0, j0 = row // stride, col // stride
    tiles = [(i, j) for i in (i0, i0 + 1) for j in (j0, j0 + 1)]
    return sorted(tiles, key=lambda t: max(abs(row - t[0] * stride), abs(col - t[1] * stride)))
