"""The procedural city: a seeded raster of semantic classes, heights and colours.

The world is a grid of square cells (``RES`` metres each), indexed ``(row, col)`` with row 0 at
the northern edge and column 0 at the western edge, so every satellite tile is a north-up crop.
Cell ``(i, j)`` spans the continuous cell coordinates ``[i, i+1) x [j, j+1)``; cameras and tile
centres sit on cell corners (integer coordinates). Geographic coordinates come from a local
tangent plane around ``origin`` (the raster centre).

This module holds the raster and its painting, texturing and shading; the city plan that paints
it (districts, streets, blocks) is ``city.py``.
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

# Relative texture amplitude per class (ground, road, building, tree, water).
_TEXTURE = np.array([0.22, 0.08, 0.05, 0.30, 0.08], np.float32)


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
