"""Where an index's tiles come from: every satellite tile of a dataset, or a ``path,lat,lon``
CSV of the user's own tiles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ssageo.data.textfile import parse_latlon, read_csv_rows
from ssageo.io import DataError


def dataset_tiles(
    root: str | Path, dataset: str = "auto", splits: Sequence[str] | None = None,
    vigor_mode: str = "same-area",
) -> tuple[list[Path], np.ndarray, str]:
    """Every satellite tile of a dataset's ``splits`` (default: every split it has; one absent as
    a whole, e.g. a separate download or no rows of it in a pairs CSV, is left out), each once.

    Returns (paths, (N, 2) lat/lon, a description such as "cvusa train+val"). DataError when
    the dataset gives no tile coordinates (CVACT, a pairs CSV without lat,lon) or a split cannot
    be read.
    """
    from ssageo.data import get_spec, load_manifest
    from ssageo.data.base import SplitUnavailable
    from ssageo.data.registry import resolve_dataset

    root = Path(root)
    kind = resolve_dataset(root, dataset, vigor_mode)
    spec = get_spec(kind)
    every = not splits  # the default: every split the dataset has (absent ones left out)
    splits = list(splits or spec.splits)
    seen: dict[Path, tuple[float, float]] = {}
    for split in list(splits):
        try:
            manifest = load_manifest(root, kind, split, vigor_mode)
        except SplitUnavailable:
            if every and len(splits) > 1:
                splits.remove(split)
                continue
            raise
        except DataError as exc:
            hint = "" if len(splits) == 1 else f" (indexing splits {'+'.join(splits)}; give " \
                "--split to index only some)"
            raise DataError(f"{exc}{hint}") from None
        if manifest.reference_coords is None:
            raise DataError(
                f"{root}: {manifest.dataset} gives no latitude/longitude for its satellite tiles; "
                "list them in a CSV and use --tiles"
            )
        for tile, (lat, lon) in zip(manifest.reference_paths, manifest.reference_coords.tolist(),
                                    strict=True):
            seen.setdefault(Path(tile), (lat, lon))
    described = f"{kind} {'+'.join(splits)}" + (f" ({vigor_mode})" if spec.modes else "")
    return list(seen), np.asarray(list(seen.values()), dtype=np.float64), described


def read_tiles_csv(path: str | Path) -> tuple[list[Path], np.ndarray]:
    """Rows ``path,lat,lon`` (an optional header row ``path,lat,lon``) -> (paths, (N, 2) coords).

    Relative paths are relative to the CSV's folder. DataError names the file and line of any
    malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tiles CSV not found")
    paths, coords = [], []
    for line, row in read_csv_rows(path, "tiles CSV"):
        if line == 1 and [c.strip().lower() for c in row] == ["path", "lat", "lon"]:
            continue
        if len(row) != 3:
            raise DataError(f"{path}:{line}: expected 3 columns path,lat,lon, got {len(row)}")
        lat, lon = parse_latlon(row[1], row[2], f"{path}:{line}")
        tile = Path(row[0].strip())
        paths.append(tile if tile.is_absolute() else path.parent / tile)
        coords.append((lat, lon))
    if not paths:
        raise DataError(f"{path}: no tiles listed")
    return paths, np.asarray(coords, dtype=np.float64)
