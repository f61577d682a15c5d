"""Ordinary photos as queries (``ssageo locate --fov``): their horizontal field of view (given,
or from EXIF) and the panorama band they cover, in the model's query geometry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ssageo.data.fov import crop_width, photo_to_band
from ssageo.io import DataError

# EXIF tags (Exif sub-IFD): focal length (mm), its 35 mm-film equivalent (mm), the focal-plane
# resolution (pixels per unit) with its unit, and the pixel width the camera recorded.
_FOCAL, _FOCAL_35 = 37386, 41989
_PLANE_X_RES, _PLANE_UNIT, _EXIF_WIDTH = 41486, 41488, 40962
_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}  # inch, cm, mm, micrometre


def exif_fov(path: str | Path) -> float | None:
    """Horizontal field of view (degrees) from a photo's EXIF, or None when it does not say.

    From the 35 mm-equivalent focal length (a 36 x 24 mm frame, long side horizontal for a
    landscape photo), else from the focal length and the sensor width, which EXIF gives as
    the recorded pixel width over the focal-plane resolution.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            exif = image.getexif()
            tags = {**exif, **exif.get_ifd(0x8769)}
    except (OSError, UnidentifiedImageError):
        return None
    f35 = _positive(tags.get(_FOCAL_35))
    if f35 is not None:
        side = 36.0 if width >= height else 24.0
        return math.degrees(2 * math.atan(side / (2 * f35)))
    focal = _positive(tags.get(_FOCAL))
    resolution = _positive(tags.get(_PLANE_X_RES))
    unit = _UNIT_MM.get(tags.get(_PLANE_UNIT, 2))
    if focal is None or resolution is None or unit is None:
        return None
    sensor_mm = (_positive(tags.get(_EXIF_WIDTH)) or width) / resolution * unit
    return math.degrees(2 * math.atan(sensor_mm / (2 * focal)))


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # EXIF rationals convert
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def photo_fovs(paths: list[Path], fov: float | None) -> list[tuple[float, str]]:
    """(horizontal FoV in degrees, where it came from) per photo: ``fov`` when given (it
    overrides EXIF), else the EXIF's; DataError naming the first photo that has neither."""
    if fov is not None:
        return [(float(fov), "--fov")] * len(paths)
    found = []
    for path in paths:
        value = exif_fov(path)
        if value is None:
            raise DataError(f"{path}: no field of view in its EXIF (35 mm-equivalent focal "
                            "length, or focal length with focal-plane resolution); give "
                            "--fov DEGREES, the photo's horizontal field of view")
        found.append((value, "exif"))
    return found


def photo_band(photo: np.ndarray, fov: float, query_size: tuple[int, int]) -> np.ndarray:
    """A level pinhole ``photo`` of horizontal ``fov`` as the model's query crop of that FoV:
    (Hq, crop_width(Wq, fov)) uint8, the band spanning the panorama's vertical extent
    (360 * Hq / Wq degrees, square pixels)."""
    if not 0 < fov < 180:
        raise DataError(f"a pinhole photo's horizontal field of view must be below 180 "
                        f"degrees, got {fov:g}")
    hq, wq = int(query_size[0]), int(query_size[1])
    return photo_to_band(photo, fov, (hq, crop_width(wq, fov)), vertical=360.0 * hq / wq)
