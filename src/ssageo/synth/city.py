"""The city plan of a synthetic world: districts (dense, suburban, rural) on a grid with
arterial roads along their edges, each filled with its street grid, blocks of buildings,
gardens, parks, fields and water (``generate_world``). The raster it paints and the painting
primitives are in ``world.py``.
"""

from __future__ import annotations

import math

import numpy as np

from ssageo.synth.world import (
    DEFAULT_ORIGIN,
    DISTRICT_M,
    DISTRICT_TYPES,
    GROUND,
    RES,
    ROAD,
    WATER,
    World,
    blank_world,
    finish,
    paint_building,
    paint_flat,
    paint_tree,
)

# Street grid per district type: spacing (m), street width (m), share of districts.
_STREETS = {"dense": (60.0, 9.0), "suburban": (76.0, 7.0), "rural": (128.0, 6.0)}
_TYPE_SHARE = (0.35, 0.40, 0.25)
_ARTERIAL_W = 14.0
_ROOFS = np.array(
    [[120, 118, 115], [150, 146, 138], [92, 90, 95], [165, 95, 70], [125, 80, 60],
     [178, 170, 150], [70, 74, 82], [140, 128, 105], [200, 196, 188], [96, 110, 120]],
    np.float32,
)
_WALLS = np.array(
    [[196, 186, 168], [170, 110, 85], [150, 150, 155], [120, 140, 165], [215, 210, 200],
     [165, 150, 120], [110, 100, 95], [185, 170, 140]],
    np.float32,
)


def _streets(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray, float]:
    """District-local street centre lines (m) along each axis and the street width."""
    spacing, width = _STREETS[kind]
    out = []
    for _ in range(2):
        s = spacing * rng.uniform(0.85, 1.15)
        n = max(int(DISTRICT_M / s) - 1, 0)
        pos = (np.arange(1, n + 1) * DISTRICT_M / (n + 1)) + rng.uniform(-6, 6, n)
        out.append(np.round(pos / RES) * RES)
    return out[0], out[1], width


def generate_world(seed: int, side_m: float, origin: tuple[float, float] = DEFAULT_ORIGIN,
                   place_step_m: float = 2.0) -> World:
    """Build a finished world about ``side_m`` metres square (whole districts) from ``seed``.

    ``world.candidates`` holds camera positions (row, col corners) along street centre lines,
    ``place_step_m`` apart, from which places are sampled.
    """
    rng = np.random.default_rng([seed, 1])
    nd = max(int(math.ceil(side_m / DISTRICT_M)), 1)
    dc = int(DISTRICT_M / RES)
    world = blank_world((nd * dc, nd * dc), seed, origin)
    kinds = rng.choice(len(DISTRICT_TYPES), size=(nd, nd), p=_TYPE_SHARE)
    cands = []
    for di in range(nd):
        for dj in range(nd):
            kind = DISTRICT_TYPES[kinds[di, dj]]
            r0, c0 = di * dc, dj * dc
            world.district[r0:r0 + dc, c0:c0 + dc] = kinds[di, dj]
            world.district_id[r0:r0 + dc, c0:c0 + dc] = di * nd + dj
            cands.append(_district(world, rng, kind, r0, c0, place_step_m))
    _arterials(world, nd, dc)
    world.candidates = np.concatenate(cands).astype(np.int64)
    return finish(world)


def _arterials(world: World, nd: int, dc: int) -> None:
    """Wide roads along every inner district edge, with a double yellow centre line."""
    hw = int(_ARTERIAL_W / RES / 2)
    asphalt = np.array([62, 63, 66], np.uint8)
    yellow = np.array([214, 186, 60], np.uint8)
    n = world.shape[0]
    for k in range(1, nd):
        e = k * dc
        paint_flat(world, e - hw, e + hw, 0, n, ROAD, asphalt)
        paint_flat(world, 0, n, e - hw, e + hw, ROAD, asphalt)
    for k in range(1, nd):
        e = k * dc
        for off in (-1, 1):
            world.albedo[e + off - (off < 0), :] = yellow
            world.albedo[:, e + off - (off < 0)] = yellow


def _district(world: World, rng: np.random.Generator, kind: str, r0: int, c0: int,
              place_step_m: float) -> np.ndarray:
    """Paint one district's streets and blocks; return its camera candidates (row, col)."""
    ys, xs, width = _streets(rng, kind)
    dc = int(DISTRICT_M / RES)
    hw = int(width / RES / 2)
    asphalt = (np.array([78, 78, 80]) + rng.integers(-8, 8)).astype(np.uint8)
    for y in ys:
        r = r0 + int(y / RES)
        paint_flat(world, r - hw, r + hw, c0, c0 + dc, ROAD, asphalt)
    for x in xs:
        c = c0 + int(x / RES)
        paint_flat(world, r0, r0 + dc, c - hw, c + hw, ROAD, asphalt)
    # Dashed white centre lines (3 m on, 3 m off).
    dash = (np.arange(dc) // int(3 / RES)) % 2 == 0
    for y in ys:
        r = r0 + int(y / RES)
        row = world.albedo[r, c0:c0 + dc]
        row[dash & (world.cls[r, c0:c0 + dc] == ROAD)] = 225
    for x in xs:
        c = c0 + int(x / RES)
        col = world.albedo[r0:r0 + dc, c]
        col[dash & (world.cls[r0:r0 + dc, c] == ROAD)] = 225

    # Blocks between streets (district edges carry arterials).
    ah = _ARTERIAL_W / 2
    bounds_y = [(0.0, ah)] + [(y, width / 2) for y in ys] + [(DISTRICT_M, ah)]
    bounds_x = [(0.0, ah)] + [(x, width / 2) for x in xs] + [(DISTRICT_M, ah)]
    fill = {"dense": _dense_block, "suburban": _suburban_block, "rural": _rural_block}[kind]
    for (ya, ha), (yb, hb) in zip(bounds_y[:-1], bounds_y[1:], strict=True):
        for (xa, wa), (xb, wb) in zip(bounds_x[:-1], bounds_x[1:], strict=True):
            fill(world, rng, r0 + int((ya + ha) / RES), r0 + int((yb - hb) / RES),
                 c0 + int((xa + wa) / RES), c0 + int((xb - wb) / RES))

    step = max(int(place_step_m / RES), 1)
    along = np.arange(int(ah / RES) + 4, dc - int(ah / RES) - 4, step)
    pts = [np.stack([np.full_like(along, r0 + int(y / RES)), c0 + along], 1) for y in ys]
    pts += [np.stack([r0 + along, np.full_like(along, c0 + int(x / RES))], 1) for x in xs]
    return np.concatenate(pts) if pts else np.zeros((0, 2), np.int64)


def _roof(rng: np.random.Generator) -> np.ndarray:
    return np.clip(_ROOFS[rng.integers(len(_ROOFS))] * rng.uniform(0.85, 1.15, 3), 0, 255)


def _wall(rng: np.random.Generator) -> np.ndarray:
    return np.clip(_WALLS[rng.integers(len(_WALLS))] * rng.uniform(0.85, 1.1, 3), 0, 255)


def _tree_colour(rng: np.random.Generator) -> np.ndarray:
    base = np.array([52, 96, 44], np.float32)
    return np.clip(base * rng.uniform(0.7, 1.3, 3), 0, 255)


def _split(rng: np.random.Generator, a: int, b: int, n: int) -> list[tuple[int, int]]:
    """Cut [a, b) into ``n`` parts with jittered cut points."""
    cuts = np.linspace(a, b, n + 1)
    cuts[1:-1] += rng.uniform(-0.15, 0.15, n - 1) * (b - a) / n
    cuts = cuts.astype(int)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _dense_block(world: World, rng: np.random.Generator, r0: int, r1: int, c0: int,
                 c1: int) -> None:
    """Paved block with a few tall buildings (or, rarely, a small park)."""
    if r1 - r0 < 8 or c1 - c0 < 8:
        return
    paint_flat(world, r0, r1, c0, c1, GROUND, np.array([150, 146, 138], np.uint8))
    if rng.random() < 0.12:
        _park(world, rng, r0 + 4, r1 - 4, c0 + 4, c1 - 4)
        return
    for ra, rb in _split(rng, r0 + 4, r1 - 4, int(rng.integers(1, 3))):
        for ca, cb in _split(rng, c0 + 4, c1 - 4, int(rng.integers(1, 4))):
            s = int(rng.integers(2, 7))
            height = float(np.clip(rng.lognormal(math.log(22), 0.45), 9, 70))
            paint_building(world, ra + s, rb - s, ca + s, cb - s, height, _roof(rng), _wall(rng))
            if rng.random() < 0.5 and rb - ra > 30 and cb - ca > 30:
                # Rooftop plant room: a small raised box with a lighter top.
                rr, cc = int(rng.integers(ra + s + 4, rb - s - 14)), int(
                    rng.integers(ca + s + 4, cb - s - 14))
                paint_building(world, rr, rr + 10, cc, cc + 10, height + 3.0,
                               np.array([205, 205, 200]), _wall(rng))


def _park(world: World, rng: np.random.Generator, r0: int, r1: int, c0: int, c1: int) -> None:
    paint_flat(world, r0, r1, c0, c1, GROUND, np.array([88, 132, 60], np.uint8))
    n = int((r1 - r0) * (c1 - c0) * RES * RES / 90)
    for _ in range(n):
        paint_tree(world, rng.uniform(r0, r1), rng.uniform(c0, c1), rng.uniform(2.5, 5),
                   rng.uniform(7, 14), _tree_colour(rng))


def _suburban_block(world: World, rng: np.random.Generator, r0: int, r1: int, c0: int,
                    c1: int) -> None:
    """Houses on lots facing the street, gardens, garden trees, street trees, a few pools."""
    if r1 - r0 < 8 or c1 - c0 < 8:
        return
    lawn = (np.array([92, 136, 64]) + rng.integers(-10, 10, 3)).astype(np.uint8)
    paint_flat(world, r0, r1, c0, c1, GROUND, lawn)
    rows = _split(rng, r0, r1, max(int((r1 - r0) * RES / 30), 1))
    for ra, rb in rows:
        for ca, cb in _split(rng, c0, c1, max(int((c1 - c0) * RES / 18), 1)):
            if rng.random() < 0.1:
                continue  # an empty lot
            hr = int(rng.uniform(0.4, 0.6) * (rb - ra))
            hc = int(rng.uniform(0.45, 0.7) * (cb - ca))
            rr = ra + int(rng.integers(2, max(rb - ra - hr - 1, 3)))
            cc = ca + int(rng.integers(2, max(cb - ca - hc - 1, 3)))
            paint_building(world, rr, rr + hr, cc, cc + hc, float(rng.uniform(4, 9)),
                           _roof(rng), _wall(rng))
            if rng.random() < 0.12:
                pr = rb - 12 if rb - 12 > rr + hr else ra + 2
                paint_flat(world, pr, pr + 8, cb - 14, cb - 4, WATER,
                           np.array([70, 160, 200], np.uint8))
            for _ in range(int(rng.integers(0, 4))):
                paint_tree(world, rng.uniform(ra, rb), rng.uniform(ca, cb), rng.uniform(2, 4),
                           rng.uniform(6, 11), _tree_colour(rng))
    # Street trees along the block edge.
    for r in (r0 + 3, r1 - 3):
        for c in range(c0 + 8, c1 - 8, 24):
            if rng.random() < 0.6:
                paint_tree(world, r, c, rng.uniform(2, 3), rng.uniform(6, 9), _tree_colour(rng))


def _rural_block(world: World, rng: np.random.Generator, r0: int, r1: int, c0: int,
                 c1: int) -> None:
    """Fields with crop stripes, tree rows and clusters, ponds and the odd farm."""
    if r1 - r0 < 8 or c1 - c0 < 8:
        return
    for ra, rb in _split(rng, r0, r1, 2):
        for ca, cb in _split(rng, c0, c1, 2):
            field = np.array([118, 140, 70], np.float32) * rng.uniform(0.75, 1.25, 3)
            paint_flat(world, ra, rb, ca, cb, GROUND, np.clip(field, 0, 255).astype(np.uint8))
            if rng.random() < 0.5:  # ploughed stripes
                period = int(rng.integers(4, 10))
                stripes = ((np.arange(ra, rb) // period) % 2 == 0)
                world.albedo[ra:rb, ca:cb][stripes] = (field * 0.8).astype(np.uint8)
    if rng.random() < 0.35:  # a pond
        cr, cc = rng.uniform(r0 + 20, r1 - 20), rng.uniform(c0 + 20, c1 - 20)
        ar, ac = rng.uniform(8, 30), rng.uniform(8, 30)
        rr, cc2 = np.ogrid[r0:r1, c0:c1]
        pond = ((rr - cr) / ar) ** 2 + ((cc2 - cc) / ac) ** 2 < 1
        world.cls[r0:r1, c0:c1][pond] = WATER
        world.albedo[r0:r1, c0:c1][pond] = (48, 92, 130)
        world.facade[r0:r1, c0:c1][pond] = (48, 92, 130)
    if rng.random() < 0.5:  # a farm with a barn
        fr, fc = rng.uniform(r0 + 10, r1 - 40), rng.uniform(c0 + 10, c1 - 50)
        if fr > r0 and fc > c0:
            paint_building(world, int(fr), int(fr + 24), int(fc), int(fc + 40),
                           float(rng.uniform(5, 9)), _roof(rng), _wall(rng))
    # A tree row along the northern edge and a cluster somewhere.
    for c in range(c0 + 6, c1 - 6, int(rng.integers(10, 18))):
        paint_tree(world, r0 + 5, c, rng.uniform(2.5, 4), rng.uniform(8, 14), _tree_colour(rng))
    cr, cc = rng.uniform(r0, r1), rng.uniform(c0, c1)
    for _ in range(int(rng.integers(3, 15))):
        paint_tree(world, cr + rng.normal(0, 14), cc + rng.normal(0, 14), rng.uniform(2.5, 5),
                   rng.uniform(8, 16), _tree_colour(rng))
