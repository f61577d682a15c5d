"""GPS neighbour lists for the hard-negative sampler (docs/METHOD.md section 5), cached beside
the data.

For each query, the k nearest other queries, never one with the same positive tile, on the
coordinates its dataset's spec names (``DatasetSpec.coords``): great-circle distance on the
query's (lat, lon) (``gps``: CVUSA, pairs) or on its positive tile's centre (``tile``: VIGOR),
Euclidean distance on easting/northing (``utm``: CVACT). The search uses a k-d tree on unit
vectors of the sphere: the chord length ``2 sin(d / 2)`` grows monotonically with the haversine
angle d (radians), so the order is exactly the haversine order, without a Q x Q distance matrix.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from ssageo.constants import EARTH_RADIUS_M as EARTH_RADIUS_M  # re-exported (ssageo.data)
from ssageo.data.base import Manifest
from ssageo.data.manifest import cache_dir_for
from ssageo.data.registry import get_spec
from ssageo.io import DataError, atomic_write_bytes


def haversine(lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike) -> np.ndarray:
    """Great-circle angle in radians between points given in **degrees** (broadcasts).

    Multiply by :data:`EARTH_RADIUS_M` for metres.
    """
    p1, l1, p2, l2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
    return 2 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _unit_vectors(latlon: np.ndarray) -> np.ndarray:
    lat, lon = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def _points_and_groups(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Search points (Q, 2|3) and exclusion groups (Q,): queries of one group never neighbour."""
    spec, groups = get_spec(manifest.dataset), np.asarray(manifest.positive)
    if spec.coords == "utm":
        if manifest.utm is None:
            raise DataError(f"{manifest.root}: {spec.title} manifest has no UTM coordinates")
        return np.asarray(manifest.utm, dtype=np.float64), groups
    if spec.coords == "tile":
        return _unit_vectors(manifest.reference_coords[manifest.positive]), groups
    if manifest.query_coords is None:
        why = f" ({spec.coords_file} is missing)" if spec.coords_file else ""
        raise DataError(f"{manifest.root}: no GPS for {spec.title} {manifest.split}{why}, so GPS "
                        "neighbour lists cannot be built")
    return _unit_vectors(np.asarray(manifest.query_coords, dtype=np.float64)), groups


def compute_neighbours(points: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """(Q, k') indices of the nearest points of other groups, nearest first.

    k' = min(k, Q - largest group), so every row is full.
    """
    from scipy.spatial import cKDTree

    n = len(points)
    largest = int(np.bincount(np.unique(groups, return_inverse=True)[1]).max()) if n else 0
    k_eff = min(k, n - largest)
    if k_eff < 1:
        raise DataError(f"GPS neighbours need at least two places in different groups (have {n})")
    candidates = min(k_eff + largest, n)
    _, idx = cKDTree(points).query(points, k=candidates)
    idx = idx.reshape(n, candidates)
    other = groups[idx] != groups[:, None]
    # Stable sort of "same group" flags keeps the distance order among the others.
    order = np.argsort(~other, axis=1, kind="stable")[:, :k_eff]
    return np.take_along_axis(idx, order, axis=1).astype(np.int64)


def gps_neighbours(manifest: Manifest, k: int = 128, cache_dir: str | Path | None = None
                   ) -> np.ndarray:
    """(Q, k') int64: for each query of ``manifest`` its nearest other queries, nearest first.

    Cached as ``neighbours-<dataset>-<split>-<key>-k<k>.npy`` in :func:`cache_dir_for`; the key
    changes with the split files, so an edited split is recomputed. k' = min(k, places - 1) (for
    VIGOR, minus the largest number of queries sharing a tile).
    """
    use_cache = bool(manifest.key)
    name = f"neighbours-{manifest.dataset}-{manifest.split}-{manifest.key}-k{k}.npy"
    path = cache_dir_for(manifest.root, cache_dir) / name
    if use_cache and path.is_file():
        return np.load(path, allow_pickle=False)
    points, groups = _points_and_groups(manifest)
    result = compute_neighbours(points, groups, k)
    if use_cache:
        buf = io.BytesIO()
        np.save(buf, result)
        atomic_write_bytes(path, buf.getvalue())
    return result
