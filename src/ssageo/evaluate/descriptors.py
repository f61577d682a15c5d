"""Descriptor files (``.npz``): written by ``ssageo embed``, read by ``ssageo eval --descriptors``.

One uncompressed NumPy ``.npz`` archive with these entries (no others, so a misspelt optional
entry is an error rather than silently ignored):

- ``query``: (Q, D) float16/32/64, one L2-normalised descriptor per query (ground view)
- ``reference``: (R, D) float, one per reference (satellite tile), same D
- ``positive``: (Q,) integer, index of each query's positive in ``reference``
- ``semi_positive`` (optional): (Q, S) integer, VIGOR's semi-positive tiles (S = 3), -1 = absent
- ``query_coords`` / ``reference_coords`` (optional, together): (Q, 2) / (R, 2) float,
  latitude and longitude in degrees
- ``reference_groups`` (optional): (R,) integer group of each reference; when present, every
  reference of the positive's group is relevant (the ``groups`` protocol of University-1652:
  R@k and AP, ``ssageo.evaluate.grouped``)
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ssageo.evaluate.grouped import group_metrics
from ssageo.evaluate.metrics import retrieval_metrics
from ssageo.io import DataError, atomic_write

REQUIRED = ("query", "reference", "positive")
OPTIONAL = ("semi_positive", "query_coords", "reference_coords", "reference_groups")
NORM_TOLERANCE = 1e-2  # float16 storage alone moves a unit norm by ~1e-3


@dataclass
class DescriptorSet:
    """Descriptors of one query set and its gallery, with the ground truth to score them."""

    query: np.ndarray
    reference: np.ndarray
    positive: np.ndarray
    semi_positive: np.ndarray | None = None
    query_coords: np.ndarray | None = None
    reference_coords: np.ndarray | None = None
    reference_groups: np.ndarray | None = None

    def metrics(self, block_size: int = 4096,
                device: str | torch.device | None = None) -> dict[str, float | int]:
        """The retrieval metrics of :func:`ssageo.evaluate.metrics.retrieval_metrics`, or with
        ``reference_groups`` those of :func:`ssageo.evaluate.grouped.group_metrics`."""
        if self.reference_groups is not None:
            return group_metrics(self.query, self.reference, self.positive,
                                 self.reference_groups, block_size, device=device)
        return retrieval_metrics(
            self.query,
            self.reference,
            self.positive,
            self.semi_positive,
            self.query_coords,
            self.reference_coords,
            block_size=block_size,
            device=device,
        )

    def normalized(self) -> DescriptorSet:
        """A copy with every query and reference row scaled to unit L2 norm."""
        q, r = (_unit_rows(x, name) for x, name in ((self.query, "query"),
                                                    (self.reference, "reference")))
        kept = {f.name: getattr(self, f.name) for f in fields(self)}
        return DescriptorSet(**{**kept, "query": q, "reference": r})

    def norm_range(self) -> tuple[float, float]:
        """Smallest and largest row norm over queries and references."""
        norms = np.concatenate([_norms(self.query), _norms(self.reference)])
        return float(norms.min()), float(norms.max())


def _norms(x: np.ndarray, block: int = 1 << 15) -> np.ndarray:
    """Row norms in float64 (no float16 overflow), a block of rows at a time (memory)."""
    return np.concatenate([np.linalg.norm(x[i:i + block].astype(np.float64), axis=1)
                           for i in range(0, len(x), block)])


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    """Rows scaled to unit length, computed in float64 (a float16 norm overflows above 65504,
    which turned every row into zeros) and returned as float32 (float64 stays float64)."""
    norms = _norms(x)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise DataError(f"cannot L2-normalise descriptors: {zero.size} '{name}' rows are all "
                        f"zero (first: row {zero[0]})")
    dtype = np.float64 if x.dtype == np.float64 else np.float32  # float32 holds any float16
    return x.astype(dtype) / norms[:, None].astype(dtype)


def is_descriptor_file(path: Path) -> bool:
    """True when ``path`` is a descriptor archive (its entry names are this format's)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a descriptor file
        return False
    return set(REQUIRED) <= names <= set(REQUIRED + OPTIONAL)


def save_descriptors(path: str | Path, descriptors: DescriptorSet) -> None:
    """Write a :class:`DescriptorSet` to ``path`` as an ``.npz`` archive, atomically.

    Optional entries that are None are left out. The set is validated first, so a file written
    here always loads.
    """
    path = Path(path)
    arrays = {f.name: getattr(descriptors, f.name) for f in fields(descriptors)}
    arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    validate(arrays, path)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object, so numpy never appends ".npz" to the name
            np.savez(f, **arrays)

    atomic_write(path, write)


def load_descriptors(path: str | Path, normalize: bool = False) -> DescriptorSet:
    """Read and validate a descriptor file; DataError naming the file for anything wrong.

    Descriptors must be L2-normalised (the protocol's cosine similarity); rows that are not
    raise DataError unless ``normalize`` is True, which rescales them instead.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: descriptor file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz descriptor file ({exc})") from None
    validate(arrays, path)
    ds = DescriptorSet(**arrays)
    if normalize:
        try:
            return ds.normalized()
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
    low, high = ds.norm_range()
    if abs(low - 1) > NORM_TOLERANCE or abs(high - 1) > NORM_TOLERANCE:
        raise DataError(
            f"{path}: descriptors are not L2-normalised (row norms {low:.4g}..{high:.4g}); "
            "normalise them, or evaluate with --normalize"
        )
    return ds


def validate(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Check entry names, shapes, dtypes and index ranges; DataError naming ``path``."""
    missing = [k for k in REQUIRED if k not in arrays]
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if missing:
        raise DataError(f"{path}: missing entries {', '.join(missing)} (see the README's format)")
    if unknown:
        raise DataError(
            f"{path}: unexpected entries {', '.join(unknown)}; a descriptor file holds only "
            f"{', '.join(REQUIRED + OPTIONAL)}"
        )
    query, reference = arrays["query"], arrays["reference"]
    for name, x in (("query", query), ("reference", reference)):
        if x.ndim != 2 or 0 in x.shape or x.dtype.kind != "f":
            raise DataError(
                f"{path}: '{name}' must be a non-empty (N, D) float array, "
                f"got shape {x.shape} dtype {x.dtype}"
            )
        if not np.isfinite(x).all():
            raise DataError(f"{path}: '{name}' contains NaN or infinite values")
    n_q, n_r = len(query), len(reference)
    if query.shape[1] != reference.shape[1]:
        raise DataError(
            f"{path}: descriptor dimension mismatch: query has {query.shape[1]}, "
            f"reference {reference.shape[1]}"
        )
    _check_indices(arrays["positive"], "positive", (n_q,), 0, n_r, path)
    if "semi_positive" in arrays:
        _check_indices(arrays["semi_positive"], "semi_positive", (n_q, None), -1, n_r, path)
    if "reference_groups" in arrays:
        _check_indices(arrays["reference_groups"], "reference_groups", (n_r,), 0,
                       np.iinfo(np.int64).max, path)
    if ("query_coords" in arrays) != ("reference_coords" in arrays):
        raise DataError(f"{path}: give both query_coords and reference_coords, or neither")
    for name, n in (("query_coords", n_q), ("reference_coords", n_r)):
        if name in arrays:
            _check_coords(arrays[name], name, n, path)


def _check_indices(x: np.ndarray, name: str, shape: tuple, low: int, high: int,
                   path: Path) -> None:
    if x.dtype.kind not in "iu":
        raise DataError(f"{path}: '{name}' must hold integers, got dtype {x.dtype}")
    if x.ndim != len(shape) or any(s not in (None, n) for s, n in zip(shape, x.shape, strict=True)):
        wanted = str(shape).replace("None", "S")
        raise DataError(f"{path}: '{name}' must have shape {wanted}, got {x.shape}")
    if x.size and (x.min() < low or x.max() >= high):
        raise DataError(
            f"{path}: '{name}' indices must lie in [{low}, {high}), got {x.min()}..{x.max()}"
        )


def _check_coords(x: np.ndarray, name: str, n: int, path: Path) -> None:
    if x.shape != (n, 2) or x.dtype.kind != "f":
        raise DataError(
            f"{path}: '{name}' must be a ({n}, 2) float array of (lat, lon), "
            f"got shape {x.shape} dtype {x.dtype}"
        )
    if not np.isfinite(x).all() or np.abs(x[:, 0]).max() > 90 or np.abs(x[:, 1]).max() > 180:
        raise DataError(f"{path}: '{name}' must hold finite latitudes/longitudes in degrees")
