"""Pinhole photos of the synthetic places (``ssageo synth --photos FOV``): what a user's phone
would take at each place, with its true position and heading, so that ``ssageo locate --fov``
can be tested end to end.

Each photo is resampled from the place's rendered panorama through a pinhole camera
(:func:`ssageo.data.fov.photo_from_panorama`): horizontal field of view ``fov``, heading
uniform in [0, 360), pitch uniform in +-MAX_PITCH degrees, at the panorama's pixels per
radian in the image centre. Its height is 3/4 of its width, or less where the panorama's band
would not cover the tilted photo's top and bottom rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ssageo.config import ConfigError
from ssageo.data.fov import photo_from_panorama
from ssageo.io import atomic_write_text, read_image, write_image
from ssageo.synth.layouts import Plan
from ssageo.synth.world import World

PHOTO_DIR = "photos"
PHOTO_CSV = f"{PHOTO_DIR}/photos.csv"
CSV_HEADER = "path,lat,lon,heading,pitch,fov,panorama"
MAX_PITCH = 5.0  # degrees
MAX_FOV = 150.0  # a pinhole camera's image grows without bound towards 180 degrees


def check_photo_fov(fov: float) -> float:
    """``--photos`` as a float; ConfigError for a FoV no pinhole photo here can have."""
    if not 10.0 <= fov <= MAX_FOV:
        raise ConfigError(f"--photos {fov:g}: the photos' horizontal field of view must be "
                          f"10..{MAX_FOV:g} degrees")
    return float(fov)


def photo_size(pano_size: tuple[int, int], fov: float) -> tuple[int, int]:
    """(H, W) of the photos of a (W, H) panorama at horizontal ``fov``."""
    width, height = pano_size
    f = width / (2 * math.pi)  # the panorama's pixels per radian
    w = max(8, 2 * round(f * math.tan(math.radians(fov) / 2)))
    half_band = math.pi * height / width  # half the panorama's vertical span (radians)
    fit = 2 * f * math.tan(max(0.0, half_band - math.radians(MAX_PITCH)))
    return max(4, min(round(0.75 * w), math.floor(fit))), w


def photo_paths(plan: Plan) -> list[str]:
    """The files ``render_photos`` writes for ``plan``: one photo per panorama, and the CSV."""
    count = sum(job.kind == "pano" for job in plan.jobs)
    return [f"{PHOTO_DIR}/{k:07d}.jpg" for k in range(1, count + 1)] + [PHOTO_CSV]


def render_photos(out: Path, worlds: list[World], plan: Plan, seed: int, fov: float,
                  pano_size: tuple[int, int]) -> int:
    """Write a photo per panorama of ``plan`` (already on disk) and ``photos/photos.csv``;
    photos already present (a resumed run) are kept. Returns the number written."""
    size = photo_size(pano_size, fov)
    lines, written = [CSV_HEADER], 0
    panos = [job for job in plan.jobs if job.kind == "pano"]
    for job, rel in zip(panos, photo_paths(plan), strict=False):  # the CSV last
        rng = np.random.default_rng([seed, 19, *job.key])
        heading, pitch = rng.uniform(0.0, 360.0), rng.uniform(-MAX_PITCH, MAX_PITCH)
        if not (out / rel).is_file():
            photo = photo_from_panorama(read_image(out / job.image), size, fov, heading, pitch)
            write_image(out / rel, photo)
            written += 1
        lat, lon = worlds[job.world].latlon(np.array(job.row), np.array(job.col))
        lines.append(f"{Path(rel).name},{float(lat):.8f},{float(lon):.8f},{heading:.3f},"
                     f"{pitch:.3f},{fov:g},{job.image}")
    atomic_write_text(out / PHOTO_CSV, "\n".join(lines) + "\n")
    return written


def read_photo_csv(path: Path) -> list[dict]:
    """Rows of a ``photos.csv``: path (absolute), lat, lon, heading, pitch, fov, panorama."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        name, lat, lon, heading, pitch, fov, pano = line.split(",")
        rows.append({"path": Path(path).parent / name, "lat": float(lat), "lon": float(lon),
                     "heading": float(heading), "pitch": float(pitch), "fov": float(fov),
                     "panorama": pano})
    return rows
