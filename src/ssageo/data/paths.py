"""Where things live beside a dataset: SSA prior labels and (for generated worlds) the truth.

One rule for every layout: the prior label of a satellite tile sits at the tile's path with the
satellite folder component replaced by ``sat_BEV_label`` and the suffix ``.png``:

- CVUSA  ``bingmap/19/0000001.jpg`` -> ``sat_BEV_label/19/0000001.png``
- CVACT  ``ANU_data_small/satview_polish/X_satView_polish.jpg``
         -> ``ANU_data_small/sat_BEV_label/X_satView_polish.png``
- VIGOR  ``Chicago/satellite/satellite_41.8_-87.6.png``
         -> ``Chicago/sat_BEV_label/satellite_41.8_-87.6.png``
         (Sample4Geo layout ``satellite/Chicago/...`` -> ``sat_BEV_label/Chicago/...``)

Readers also accept a ``.jpg`` label at the same place (the SSA release ships CVUSA labels as JPEG).
The ground-truth semantic map of a generated (``ssageo synth``) tile is a class-index PNG at the
tile's path under ``synth_truth/`` (e.g. ``synth_truth/bingmap/19/0000001.png``).
"""

from __future__ import annotations

from pathlib import PurePosixPath

SATELLITE_FOLDERS = ("bingmap", "satview_polish", "satellite")
PRIOR_FOLDER = "sat_BEV_label"
TRUTH_FOLDER = "synth_truth"


def prior_label_path(sat_rel: str) -> str:
    """Relative path of the SSA prior label for a satellite tile's relative path."""
    parts = list(PurePosixPath(sat_rel).parts)
    for i in range(len(parts) - 2, -1, -1):  # the last folder component that names satellites
        if parts[i] in SATELLITE_FOLDERS:
            parts[i] = PRIOR_FOLDER
            return str(PurePosixPath(*parts).with_suffix(".png"))
    raise ValueError(f"{sat_rel}: no satellite folder ({', '.join(SATELLITE_FOLDERS)}) in the path")


def prior_label_candidates(sat_rel: str) -> list[str]:
    """The label paths a reader looks for, preferred first (.png, then .jpg)."""
    png = prior_label_path(sat_rel)
    return [png, str(PurePosixPath(png).with_suffix(".jpg"))]


def truth_label_path(sat_rel: str) -> str:
    """Relative path of a generated tile's ground-truth class-index map."""
    return str(PurePosixPath(TRUTH_FOLDER, sat_rel).with_suffix(".png"))
