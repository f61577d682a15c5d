"""The procedural city: a seeded raster of semantic classes, heights and colours.

The world is a grid of square cells (``RES`` metres each), indexed ``(row, col)`` with row 0 at
the northern edge and column 0 at the western edge, so every satellite tile is a north-up crop.
Cell ``(i, j)`` spans the continuous cell coordinates ``[i, i+1) x [j, j+1)``; cameras and tile
centres sit on cell corners (integer coordinates). Geographic coordinates come from a local
tangent plane around ``origin`` (the raster centre).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from ssageo.constants import EARTH_RADIUS_M

RES = 0.5  # metres per world cell
CLASS_NAMES = ("ground", "road", "building", "tree", "water")
GROUND, ROAD, BUILDING, TREE, WATER = range(5)
DISTRICT_TYPES = ("dense", "suburban", "rural")
DISTRICT_M = 256.0  # side of one district; arterial roads run along district edges
DEFAULT_ORIGIN = (40.1106, -88.2073)  # a plausible US town (CVUSA-like)

# Street grid per district type: spacing (m), street width (m), share of districts.
_STREETS = {"dense": (60.0, 9.0), "suburban": (76.0, 7.0), "rural": (128.0, 6.0)}
_TYPE_SHARE = (0.35, 0.40, 0.25)
_ARTERIAL_W = 14.0
# Relative texture amplitude per class (ground, road, building, tree, water).
_TEXTURE = np.array([0.22, 0.08, 0.05, 0.30, 0.08], np.float32)
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


@dataclass
class World:
    """A generated world. Arrays are (H, W) or (H, W, 3), row 0 north, column 0 west.

    ``albedo`` is the colour seen from above, ``facade`` the colour of walls and crowns seen from
    the side, ``shaded`` the albedo lit by the sun with cast shadows (what a satellite sees).
    """

    seed: int
    origin: tuple[float, float]
    cls: np.ndarray
    height: np.ndarray
    albedo: np.ndarray
    facade: np.ndarray
    district: np.ndarray  # (H, W) uint8 index into DISTRICT_TYPES
    district_id: np.ndarray  # (H, W) int32 id of the district a cell lies in
    sun_azimuth: float = 150.0  # degrees clockwise from north
    sun_elevation: float = 50.0  # degrees above the horizon
    shaded: np.ndarray | None = None
    candidates: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        return self.cls.shape

    def latlon(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latitude/longitude (degrees) of continuous cell coordinates (local tangent plane)."""
        h, w = self.shape
        north = (h / 2 - np.asarray(rows, np.float64)) * RES
        east = (np.asarray(cols, np.float64) - w / 2) * RES
        lat0, lon0 = self.origin
        lat = lat0 + np.degrees(north / EARTH_RADIUS_M)
        lon = lon0 + np.degrees(east / (EARTH_RADIUS_M * math.cos(math.radians(lat0))))
        return lat, lon


def blank_world(shape: tuple[int, int], seed: int = 0,
                origin: tuple[float, float] = DEFAULT_ORIGIN) -> World:
    """An empty world of plain grass, ``shape`` = (H, W) cells; paint on it, then ``finish``."""
    h, w = shape
    return World(
        seed=seed, origin=origin,
        cls=np.full((h, w), GROUND, np.uint8),
        height=np.zeros((h, w), np.float32),
        albedo=np.broadcast_to(np.array([96, 128, 66], np.uint8), (h, w, 3)).copy(),
        facade=np.broadcast_to(np.array([96, 128, 66], np.uint8), (h, w, 3)).copy(),
        district=np.zeros((h, w), np.uint8),
        district_id=np.zeros((h, w), np.int32),
    )


def paint_building(world: World, r0: int, r1: int, c0: int, c1: int, height: float,
                   roof: np.ndarray, wall: np.ndarray) -> None:
    """Paint a flat-roofed building on cells [r0, r1) x [c0, c1) (clipped to the world)."""
    h, w = world.shape
    r0, r1, c0, c1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    if r0 >= r1 or c0 >= c1:
        return
    world.cls[r0:r1, c0:c1] = BUILDING
    world.height[r0:r1, c0:c1] = height
    world.albedo[r0:r1, c0:c1] = roof
    world.facade[r0:r1, c0:c1] = wall


def paint_flat(world: World, r0: int, r1: int, c0: int, c1: int, cls: int,
               colour: np.ndarray) -> None:
    """Paint a flat patch (ground, road or water) of one class and colour."""
    h, w = world.shape
    r0, r1, c0, c1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    world.cls[r0:r1, c0:c1] = cls
    world.height[r0:r1, c0:c1] = 0.0
    world.albedo[r0:r1, c0:c1] = colour
    world.facade[r0:r1, c0:c1] = colour


def paint_tree(world: World, row: float, col: float, radius: float, height: float,
               colour: np.ndarray) -> None:
    """Paint a tree crown: a dome of ``radius`` metres whose top is ``height`` metres high."""
    rc = radius / RES
    h, w = world.shape
    r0, r1 = max(int(row - rc), 0), min(int(row + rc) + 1, h)
    c0, c1 = max(int(col - rc), 0), min(int(col + rc) + 1, w)
    if r0 >= r1 or c0 >= c1:
        return
    rr, cc = np.ogrid[r0:r1, c0:c1]
    d2 = ((rr + 0.5 - row) ** 2 + (cc + 0.5 - col) ** 2) / (rc * rc)
    inside = d2 < 1.0
    crown = 0.45 * height
    dome = (height - crown + crown * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))).astype(np.float32)
    # Crowns may overhang roads and lawns but never poke through a taller roof.
    hv = world.height[r0:r1, c0:c1]
    grow = inside & (dome > hv)
    hv[grow] = dome[grow]
    world.cls[r0:r1, c0:c1][grow] = TREE
    shade = (0.8 + 0.2 * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)))[..., None]
    world.albedo[r0:r1, c0:c1][grow] = (colour * shade).astype(np.uint8)[grow]
    world.facade[r0:r1, c0:c1][grow] = (colour * 0.8).astype(np.uint8)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Smooth value noise in about [-1, 1] with features about ``cell`` cells wide."""
    h, w = shape
    small = rng.uniform(-1.0, 1.0, (h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def finish(world: World) -> World:
    """Add per-class texture and compute ``shaded`` (sun shading and cast shadows)."""
    rng = np.random.default_rng([world.seed, 7])
    shape = world.shape
    # Brightness factor per cell: texture (grain + two scales of blotches) times sunlight.
    factor = _noise(rng, shape, 6)
    factor += _noise(rng, shape, 40)
    factor *= 0.35
    factor += rng.random(shape, dtype=np.float32) - 0.5
    factor *= _TEXTURE[world.cls]
    factor += 1.0

    az, el = math.radians(world.sun_azimuth), math.radians(world.sun_elevation)
    sun = (math.sin(az), math.cos(az), math.tan(el))  # east, north, up (unnormalised)
    gy, gx = np.gradient(world.height * np.float32(1 / RES))
    # Lambert shading from the height gradient (tree domes); rows grow southwards, so the
    # northward slope is -gy.
    lambert = (gy * sun[1] - gx * sun[0] + sun[2]) / (np.sqrt(gx * gx + gy * gy + 1) * sun[2])
    del gx, gy
    factor *= np.clip(lambert, 0.55, 1.15)
    del lambert
    factor[_shadow_mask(world.height, az, el)] *= 0.55
    shaded = np.empty_like(world.albedo)
    for a in range(0, shape[0], 256):  # in row chunks: keeps float temporaries small
        part = world.albedo[a:a + 256] * factor[a:a + 256, :, None]
        shaded[a:a + 256] = np.clip(part, 0, 255)
    world.shaded = shaded
    return world


def _shadow_mask(height: np.ndarray, az: float, el: float) -> np.ndarray:
    """Cells lying in the shadow of something taller between them and the sun.

    The sun ray is marched on a 2x coarser (1 m) max-pooled grid, which is plenty for the look
    and 8x cheaper; each full-resolution cell is then compared with the ray height above it.
    """
    h, w = height.shape
    hs, ws = h // 2, w // 2
    coarse = height[: 2 * hs, : 2 * ws].reshape(hs, 2, ws, 2).max(axis=(1, 3))
    top = float(coarse.max())
    ray = np.zeros((hs, ws), np.float32)
    drop = 2 * RES * math.tan(el)
    dr, dc = -math.cos(az), math.sin(az)  # one coarse cell towards the sun, in (row, col)
    for k in range(1, int(top / drop) + 2):
        sr, sc = int(round(k * dr)), int(round(k * dc))
        if abs(sr) >= hs or abs(sc) >= ws:
            break
        # The sun ray reaching p passes k cells sunwards at height (that height - k * drop).
        src = coarse[max(sr, 0): hs + min(sr, 0), max(sc, 0): ws + min(sc, 0)]
        dst = ray[max(-sr, 0): hs + min(-sr, 0), max(-sc, 0): ws + min(-sc, 0)]
        np.maximum(dst, src - np.float32(k * drop), out=dst)
    full = np.zeros((h, w), np.float32)
    full[: 2 * hs, : 2 * ws] = np.repeat(np.repeat(ray, 2, axis=0), 2, axis=1)
    return full > height + 0.3


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
