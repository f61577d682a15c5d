"""Limited field of view: FoV-wide crops of a panorama, the camera frame of a BEV label, the
per-batch FoV of random-FoV training, and pinhole photos mapped to (and rendered from) the
panorama band they cover.

Conventions (README "Conventions"): azimuths are degrees clockwise from north. A panorama
column ``u`` of ``W`` looks at ``360 * u / W - 180``. A crop of ``fov`` degrees with heading
``h`` generalises that: its column ``j`` of ``w`` looks at ``h - fov / 2 + fov * j / w``, so
its centre column ``w / 2`` looks at ``h`` (as a panorama's looks at north), and a 360-degree
crop with heading 0 is the panorama itself. The camera frame of a BEV map is the north-up
frame turned by ``h``: row 0 is straight ahead, column 0 to the camera's left.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from ssageo.config import ConfigError

HEADINGS = ("north", "random")
IGNORE = -1  # class index of BEV label cells outside the visible wedge (no loss there)
WIDTH_STEP = 8  # crop widths are multiples of this (patch embeddings need multiples of 4)
MIN_WIDTH = 32  # and at least this: a stride-32 backbone's smallest input (ConvNeXt's stages)


@dataclass(frozen=True)
class QueryCrop:
    """What part of each panorama a query sees: ``fov`` degrees centred on a heading that is
    north or random. At evaluation the random heading of query ``index`` is drawn from
    ``(seed, index)`` alone, so every run, worker count and batch size sees the same crops."""

    fov: float = 360.0
    heading: str = "north"
    seed: int = 0

    def __post_init__(self) -> None:
        check_fov(self.fov, "data.fov")
        if self.heading not in HEADINGS:
            raise ConfigError(f"data.heading must be one of {', '.join(HEADINGS)}, "
                              f"got {self.heading!r}")

    @property
    def identity(self) -> bool:
        """True when the query is the whole north-aligned panorama (nothing to do)."""
        return self.fov >= 360.0 and self.heading == "north"

    def heading_for(self, index: int, rng: np.random.Generator | None = None) -> float:
        """The heading of query ``index``: 0 (north), or uniform in [0, 360) from ``rng``
        (training) or from ``(seed, index)`` (evaluation)."""
        if self.heading == "north":
            return 0.0
        rng = rng if rng is not None else np.random.default_rng([self.seed, 19, int(index)])
        return float(rng.uniform(0.0, 360.0))

    def size(self, query_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of a crop for a model whose whole panorama is ``query_size``."""
        return int(query_size[0]), crop_width(int(query_size[1]), self.fov)

    def to_dict(self) -> dict:
        """The crop as recorded in metrics JSON."""
        return {"fov": self.fov, "heading": self.heading, "heading_seed": self.seed}


def query_crop(data_cfg: dict, seed: int = 0) -> QueryCrop:
    """The QueryCrop of a config's ``data`` section (``fov`` default 360, ``heading`` north)."""
    fov = data_cfg.get("fov", 360.0)
    return QueryCrop(360.0 if fov is None else float(fov), data_cfg.get("heading") or "north",
                     seed)


def batch_fov(seed: int, epoch: int, batch: int, fov_min: float, fov_max: float) -> float:
    """The FoV (degrees) of training batch ``batch`` of epoch ``epoch`` under ``data.fov_min``:
    uniform in [fov_min, fov_max], drawn from ``(seed, epoch, batch)`` alone, so a resumed run
    and every process of a multi-process run draw the same one."""
    return float(np.random.default_rng([int(seed), 1919, int(epoch), int(batch)])
                 .uniform(fov_min, fov_max))


class FovBatches(torch.utils.data.Sampler):
    """Random-FoV training (``data.fov_min``): the batches of ``batches`` (a batch sampler with
    ``epoch`` and ``start_batch``, the trainer's HardNegativeSampler) as ``(index, fov)`` pairs,
    one FoV per batch (``batch_fov`` of the batch's number in its epoch), which PairDataset
    crops to. One FoV per batch keeps every query of a batch the same width at the panorama's
    pixels per degree, and the BEV head one polar grid (docs/ARCHITECTURE.md)."""

    def __init__(self, batches: Any, fov_min: float, fov_max: float, seed: int) -> None:
        # batches: train.sampler.HardNegativeSampler (typed loosely: data does not import train)
        self.batches, self.fov_min, self.fov_max, self.seed = batches, fov_min, fov_max, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        start, epoch = self.batches.start_batch, self.batches.epoch
        for k, batch in enumerate(self.batches):
            fov = batch_fov(self.seed, epoch, start + k, self.fov_min, self.fov_max)
            yield [(int(i), fov) for i in batch]


def check_fov(fov: float, name: str = "fov") -> float:
    """``fov`` as a float in (0, 360]; ConfigError naming ``name`` otherwise."""
    if isinstance(fov, bool) or not isinstance(fov, int | float) or not 0 < fov <= 360:
        raise ConfigError(f"{name} must be a number of degrees in (0, 360], got {fov!r}")
    return float(fov)


def crop_width(panorama_width: int, fov: float) -> int:
    """Width of a ``fov``-degree crop of a ``panorama_width`` panorama: the panorama's own
    pixels per degree (what the encoder saw at 360 degrees), a multiple of WIDTH_STEP and at
    least MIN_WIDTH (wider than that aspect for tiny panoramas only)."""
    if fov >= 360.0:
        return int(panorama_width)
    return max(MIN_WIDTH, WIDTH_STEP * round(panorama_width * fov / 360.0 / WIDTH_STEP))


def crop_columns(width: int, fov: float, heading: float) -> np.ndarray:
    """Azimuths (degrees, -180..180) that the ``width`` columns of a crop look at."""
    az = heading - fov / 2.0 + fov * np.arange(width, dtype=np.float64) / width
    return (az + 180.0) % 360.0 - 180.0


def crop_panorama(pano: np.ndarray, fov: float, heading: float) -> np.ndarray:
    """The ``fov``-degree crop of an (H, W[, C]) north-aligned panorama centred on azimuth
    ``heading``, at the panorama's own resolution (width ``crop_width(W, fov)``, full height).

    Columns are resampled linearly, wrapping around at south; a crop whose columns fall on
    the panorama's (360 degrees, a heading on the column grid) is an exact roll of it.
    """
    h, w = pano.shape[:2]
    out_w = crop_width(w, fov)
    x = (crop_columns(out_w, fov, heading) + 180.0) * w / 360.0
    if np.allclose(x, np.round(x), atol=1e-6) and fov * w / 360.0 == out_w:
        return np.ascontiguousarray(pano[:, np.round(x).astype(np.int64) % w])
    map_x = np.broadcast_to(x.astype(np.float32)[None], (h, out_w))
    map_y = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (h, out_w))
    return cv2.remap(np.ascontiguousarray(pano), np.ascontiguousarray(map_x),
                     np.ascontiguousarray(map_y), cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


def wedge_mask(size: int, fov: float) -> np.ndarray:
    """(size, size) bool: the cells of a camera-frame BEV grid inside the visible wedge (cell
    centres within ``fov / 2`` of straight ahead); every cell for 360 degrees."""
    coords = (np.arange(size, dtype=np.float64) * 2 + 1) / size - 1
    ahead, right = -coords[:, None], coords[None, :]
    azimuth = np.degrees(np.arctan2(right, ahead))
    return np.abs(azimuth) <= fov / 2.0 if fov < 360.0 else np.ones((size, size), bool)


def camera_frame_label(label: np.ndarray, heading: float, fov: float) -> np.ndarray:
    """A north-up (S, S) class map -> int64 map in the camera frame of ``heading``: what lies
    ``heading`` degrees clockwise from north is row 0's direction. Cells outside the visible
    wedge, and those whose source falls outside the tile (corners of a turned square), are
    IGNORE. Nearest-neighbour, so classes never blend; heading 0 and 360 degrees is the label.
    """
    size = label.shape[0]
    if label.shape != (size, size):
        raise ValueError(f"expected a square label map, got {label.shape}")
    out = label.astype(np.int64)
    if heading % 360.0 != 0.0:
        coords = (np.arange(size, dtype=np.float64) * 2 + 1) / size - 1
        ahead, right = -coords[:, None], coords[None, :]
        t = math.radians(heading)  # camera (right, ahead) -> world (east, north)
        east = right * math.cos(t) + ahead * math.sin(t)
        north = -right * math.sin(t) + ahead * math.cos(t)
        col = np.floor((east + 1) * size / 2).astype(np.int64)
        row = np.floor((1 - north) * size / 2).astype(np.int64)
        inside = (row >= 0) & (row < size) & (col >= 0) & (col < size)
        out = np.where(inside, out[row.clip(0, size - 1), col.clip(0, size - 1)], IGNORE)
    if fov < 360.0:
        out = np.where(wedge_mask(size, fov), out, IGNORE)
    return out


# --- Pinhole photos: a camera looking at azimuth ``heading`` and elevation ``pitch`` (degrees,
# up positive) with horizontal field of view ``fov``, square pixels, no lens distortion.

def _rotation(heading: float, pitch: float) -> np.ndarray:
    """Camera (right, up, forward) -> world (east, up, north)."""
    h, p = math.radians(heading), math.radians(pitch)
    tilt = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    turn = np.array([[math.cos(h), 0, math.sin(h)], [0, 1, 0], [-math.sin(h), 0, math.cos(h)]])
    return turn @ tilt


def focal_pixels(width: int, fov: float) -> float:
    """Focal length in pixels of a ``width``-pixel pinhole image with horizontal ``fov``."""
    return width / 2.0 / math.tan(math.radians(fov) / 2.0)


def photo_from_panorama(pano: np.ndarray, size: tuple[int, int], fov: float, heading: float,
                        pitch: float = 0.0) -> np.ndarray:
    """Render a (H, W) = ``size`` pinhole photo from an equirectangular panorama (square
    pixels, horizon at mid-height) by sampling it along each pixel's ray (bilinear; rays
    above or below the panorama's band take its top or bottom row)."""
    ph, pw = int(size[0]), int(size[1])
    h, w = pano.shape[:2]
    f = focal_pixels(pw, fov)
    x = np.arange(pw, dtype=np.float64) + 0.5 - pw / 2.0
    y = ph / 2.0 - (np.arange(ph, dtype=np.float64) + 0.5)
    rays = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.full((1, 1), f)), -1)
    world = rays @ _rotation(heading, pitch).T  # (ph, pw, 3) east, up, north
    azimuth = np.degrees(np.arctan2(world[..., 0], world[..., 2]))
    elevation = np.arctan2(world[..., 1], np.hypot(world[..., 0], world[..., 2]))
    step = 2 * math.pi / w  # radians per panorama pixel
    map_x = ((azimuth + 180.0) * w / 360.0).astype(np.float32)
    map_y = (h / 2.0 - 0.5 - elevation / step).astype(np.float32)
    map_y = np.clip(map_y, 0, h - 1)
    return cv2.remap(np.ascontiguousarray(pano), map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_WRAP)


def photo_to_band(photo: np.ndarray, fov: float, size: tuple[int, int], vertical: float,
                  fill: tuple[int, int, int] = (124, 116, 104)) -> np.ndarray:
    """Map a level pinhole photo of horizontal ``fov`` onto the equirectangular band a query
    crop of that FoV covers: (H, W) = ``size``, W spanning ``fov`` degrees and H ``vertical``
    degrees (the model's panorama height), horizon at mid-height. What the photo does not
    cover (above and below its top and bottom edges) is ``fill`` (ImageNet's mean colour)."""
    bh, bw = int(size[0]), int(size[1])
    ph, pw = photo.shape[:2]
    f = focal_pixels(pw, fov)
    azimuth = np.radians(fov * ((np.arange(bw) + 0.5) / bw - 0.5))
    elevation = (bh / 2.0 - 0.5 - np.arange(bh)) * math.radians(vertical) / bh
    az, el = np.meshgrid(azimuth, elevation)
    forward = np.cos(el) * np.cos(az)
    ok = forward > 1e-6
    safe = np.where(ok, forward, 1.0)
    map_x = pw / 2.0 - 0.5 + f * np.cos(el) * np.sin(az) / safe
    map_y = ph / 2.0 - 0.5 - f * np.sin(el) / safe
    map_x = np.where(ok, map_x, -10.0).astype(np.float32)
    map_y = np.where(ok, map_y, -10.0).astype(np.float32)
    return cv2.remap(np.ascontiguousarray(photo), map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
