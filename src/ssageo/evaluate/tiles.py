"""Where an index's tiles come from: every satellite tile of a dataset, or a ``path,lat,lon``
CSV of the user's own tiles (streamed: :class:`TilesCsv`)."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ssageo.data.textfile import iter_lines, parse_latlon
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


class TileTable(Protocol):
    """Tiles an index is built from, read by row range (:class:`TileList`, :class:`TilesCsv`)."""

    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> tuple[list[str], np.ndarray]: ...

    def paths_at(self, rows: np.ndarray) -> list[str]: ...


class TileList:
    """Tiles held in memory: paths and (N, 2) lat/lon (a dataset's tiles, a test's list)."""

    def __init__(self, paths: Sequence[str | Path], coords: np.ndarray) -> None:
        if len(paths) != len(coords):
            raise ValueError(f"{len(paths)} tile paths but {len(coords)} coordinates")
        self.paths, self.coords = [str(p) for p in paths], np.asarray(coords, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self, start: int, stop: int) -> tuple[list[str], np.ndarray]:
        """Paths and (n, 2) lat/lon of rows ``start:stop``."""
        return self.paths[start:stop], self.coords[start:stop]

    def paths_at(self, rows: np.ndarray) -> list[str]:
        """Paths of the given (sorted) rows."""
        return [self.paths[r] for r in rows.tolist()]


class TilesCsv:
    """The ``path,lat,lon`` rows of a tiles CSV (an optional header row ``path,lat,lon``;
    relative paths are relative to the CSV's folder), read on demand so memory stays bounded
    whatever the tile count: one validating pass counts the rows and keeps the byte offset of
    every ``block``-th one; :meth:`rows` then reads only the rows asked for. DataError names
    the file and line of any malformed row."""

    def __init__(self, path: str | Path, block: int = 16384) -> None:
        self.path, self.block = Path(path), block
        if not self.path.is_file():
            raise DataError(f"{self.path}: tiles CSV not found")
        self.offsets: list[tuple[int, int]] = []  # (line number, byte offset) of row k*block
        self.count = 0
        for line, offset, text in iter_lines(self.path, "tiles CSV"):
            if line == 1 and _is_header(text):
                continue
            self._parse(line, text, paths=False)
            if self.count % block == 0:
                self.offsets.append((line, offset))
            self.count += 1
        if not self.count:
            raise DataError(f"{self.path}: no tiles listed")

    def __len__(self) -> int:
        return self.count

    def _parse(self, line: int, text: str, paths: bool = True) -> tuple[str, float, float]:
        row = text.split(",") if '"' not in text else next(csv.reader([text]))
        where = f"{self.path}:{line}"
        if len(row) != 3:
            raise DataError(f"{where}: expected 3 columns path,lat,lon, got {len(row)}")
        lat, lon = parse_latlon(row[1], row[2], where)
        if not paths:  # the counting pass only validates
            return "", lat, lon
        tile = Path(row[0].strip())
        return str(tile if tile.is_absolute() else self.path.parent / tile), lat, lon

    def _iter_from(self, row: int) -> Iterator[tuple[int, str, float, float]]:
        """(row number, path, lat, lon) from the start of ``row``'s block onwards."""
        line, offset = self.offsets[row // self.block]
        k = row // self.block * self.block
        for n, _, text in iter_lines(self.path, "tiles CSV", offset, line):
            yield (k, *self._parse(n, text))
            k += 1

    def rows(self, start: int, stop: int) -> tuple[list[str], np.ndarray]:
        """Paths and (n, 2) lat/lon of rows ``start:stop``, read from the file."""
        stop = min(stop, self.count)
        paths, coords = [], []
        if start < stop:
            for k, tile, lat, lon in self._iter_from(start):
                if k >= stop:
                    break
                if k >= start:
                    paths.append(tile)
                    coords.append((lat, lon))
        return paths, np.asarray(coords, dtype=np.float64).reshape(-1, 2)

    def paths_at(self, rows: np.ndarray) -> list[str]:
        """Paths of the given sorted rows, each block of the file read once."""
        out: list[str] = []
        for block in np.unique(rows // self.block).tolist():
            wanted = rows[rows // self.block == block]
            paths, _ = self.rows(int(wanted[0]), int(wanted[-1]) + 1)
            out += [paths[r - int(wanted[0])] for r in wanted.tolist()]
        return out


def _is_header(text: str) -> bool:
    return [c.strip().lower() for c in next(csv.reader([text]))] == ["path", "lat", "lon"]


def read_tiles_csv(path: str | Path) -> tuple[list[Path], np.ndarray]:
    """Rows ``path,lat,lon`` of a tiles CSV (see :class:`TilesCsv`) -> (paths, (N, 2) coords),
    all in memory (a single-file index holds them all anyway)."""
    table = TilesCsv(path)
    paths, coords = table.rows(0, len(table))
    return [Path(p) for p in paths], coords
