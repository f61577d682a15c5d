"""Rendering a world: north-up satellite tiles and north-aligned equirectangular panoramas.

Conventions (README "Conventions"): satellite row 0 is north, column 0 west. Panorama column
``u`` looks at azimuth ``360 * u / W - 180`` degrees clockwise from north (centre column north,
``3W/4`` east); pixels are square, so a W x H panorama spans ``360 * H / W`` degrees vertically,
centred on the horizon (512x128: +-45 degrees; VIGOR's 2:1 shape: the full sphere).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ssageo.synth.world import BUILDING, RES, TREE, World

TILE_M = 128.0  # ground footprint of a satellite tile (m), whatever its pixel size
TILE_CELLS = int(TILE_M / RES)
SKY = 5  # class index of sky in panorama annotations (after the world classes)
VIEW_M = 150.0  # ray-marching range; haze hides what lies beyond
# Sample distances along each azimuth ray: dense near the camera, geometric further out.
_DISTANCES = np.geomspace(0.4, VIEW_M, 120).astype(np.float32)
_HAZE = np.array([188, 198, 210], np.float32)
_HORIZON_SKY = np.array([206, 219, 233], np.float32)
_ZENITH_SKY = np.array([92, 138, 204], np.float32)


def sat_metres_per_pixel(sat_size: int) -> float:
    """Ground sampling distance of a ``sat_size`` tile (the footprint is always TILE_M)."""
    return TILE_M / sat_size


def render_satellite(world: World, row: int, col: int, size: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """North-up tile centred on the cell corner (row, col).

    Returns ``(rgb (size, size, 3) uint8, classes (size, size) uint8)``; the RGB has a random
    per-capture photometric shift (gain, bias, haze) drawn from ``rng``.
    """
    half = TILE_CELLS // 2
    h, w = world.shape
    if row - half < 0 or col - half < 0 or row + half > h or col + half > w:
        raise ValueError(f"tile at cell ({row}, {col}) leaves the {h}x{w} world")
    crop = world.shaded[row - half: row + half, col - half: col + half]
    labels = world.cls[row - half: row + half, col - half: col + half]
    if size != TILE_CELLS:
        interp = cv2.INTER_AREA if size < TILE_CELLS else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (size, size), interpolation=interp)
        labels = cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST)
    gain = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)
    bias = rng.uniform(-12, 12, 3)
    haze = rng.uniform(0.0, 0.15)
    rgb = crop.astype(np.float32) * gain + bias
    rgb = rgb * (1 - haze) + haze * _HAZE
    return np.clip(rgb, 0, 255).astype(np.uint8), np.ascontiguousarray(labels)


def render_panorama(world: World, row: float, col: float, size: tuple[int, int],
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Equirectangular panorama from a camera at cell coordinates (row, col), 2-2.5 m high.

    ``size`` is (W, H). Every azimuth column is ray-marched through the height field at once:
    the first sample whose top rises above a pixel's elevation is what that pixel sees.
    Returns ``(rgb (H, W, 3) uint8, classes (H, W) uint8)`` with sky = ``SKY``.
    """
    width, height = size
    cam_h = rng.uniform(2.0, 2.5)
    h, w = world.shape
    theta = np.radians(360.0 * np.arange(width) / width - 180.0)  # (W,) clockwise from north
    d = _DISTANCES[:, None]  # (K, 1)
    rows = row - np.cos(theta)[None] * d / RES  # north is -row
    cols = col + np.sin(theta)[None] * d / RES  # east is +col
    ri = np.clip(np.floor(rows).astype(np.int64), 0, h - 1)
    ci = np.clip(np.floor(cols).astype(np.int64), 0, w - 1)
    flat = ri * w + ci  # (K, W)
    top = world.height.ravel()[flat]
    cls = world.cls.ravel()[flat]

    # Elevation of each sample's top; a sample hides everything behind it below its top, so
    # the visible silhouette is the running maximum along the ray.
    elev = np.maximum.accumulate(np.arctan2(top - cam_h, d), axis=0)
    step = 2 * math.pi / width  # radians per pixel (square pixels)
    # First image row covered by sample k (rows grow downwards, horizon at H/2).
    first = np.clip(np.ceil(height / 2 - 0.5 - elev / step), 0, height).astype(np.int64)
    k_count = len(_DISTANCES)
    counts = np.bincount((np.arange(width)[None] * (height + 1) + first).ravel(),
                         minlength=width * (height + 1)).reshape(width, height + 1)
    # hit[r, u] = number of samples whose first row is below r = index of the sample seen.
    hit = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:].T  # (H, W)
    sky = hit >= k_count
    k = np.minimum(hit, k_count - 1)
    u = np.broadcast_to(np.arange(width)[None], k.shape)

    # Colours per sample: sides of buildings and crowns, sunlit ground elsewhere.
    upright = (cls == BUILDING) | (cls == TREE)
    base = np.where(upright[..., None], world.facade.reshape(-1, 3)[flat],
                    world.shaded.reshape(-1, 3)[flat]).astype(np.float32)  # (K, W, 3)
    facing = 0.72 + 0.28 * np.cos(theta + math.pi - math.radians(world.sun_azimuth))
    base[upright] *= np.broadcast_to(facing[None], cls.shape)[upright][:, None]
    rgb = base[k, u]  # (H, W, 3)

    phi = ((height / 2 - 0.5 - np.arange(height)) * step).astype(np.float32)  # row elevation
    dist = _DISTANCES[k]
    # Windows on building walls: darker panes per 3.2 m storey and 3 m bay.
    wall = cls[k, u] == BUILDING
    z = cam_h + dist[wall] * np.tan(phi)[:, None].repeat(width, 1)[wall]
    along = ((rows + cols) * RES)[k[wall], u[wall]]
    pane = ((z % 3.2) > 0.9) & ((z % 3.2) < 2.2) & ((along % 3.0) < 1.7)
    rows_w, cols_w = np.nonzero(wall)
    rgb[rows_w[pane], cols_w[pane]] *= np.array([0.55, 0.6, 0.7], np.float32)

    fog = (1.0 - np.exp(-dist / 220.0))[..., None]
    rgb = rgb * (1 - fog) + _HAZE * fog
    t = np.clip(phi / (math.pi / 2), 0, 1)[:, None, None] ** 0.6
    sky_rgb = _HORIZON_SKY * (1 - t) + _ZENITH_SKY * t + rng.uniform(-8, 8, 3)
    rgb = np.where(sky[..., None], np.broadcast_to(sky_rgb, rgb.shape), rgb)
    rgb = rgb * (rng.uniform(0.88, 1.12) * rng.uniform(0.96, 1.04, 3))
    classes = np.where(sky, SKY, cls[k, u]).astype(np.uint8)
    return np.clip(rgb, 0, 255).astype(np.uint8), classes
