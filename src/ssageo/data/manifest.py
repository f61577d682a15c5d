"""Loading a dataset split as a :class:`Manifest`, and the manifest cache.

A :class:`Manifest` (``ssageo.data.base``) is the table every reader produces (see
docs/ARCHITECTURE.md): query and reference paths, each query's positive (and, for VIGOR,
semi-positive) reference, coordinates and prior labels. ``load_manifest`` detects the dataset
(``ssageo.data.registry``), reads it with the registered reader and caches the result beside
the data; the cache key hashes the split files and the image folders' listings, so editing a
split or adding/removing images invalidates it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np

from ssageo.data.base import MAX_EXAMPLES, SPLITS, Manifest, SplitUnavailable
from ssageo.data.registry import (
    dataset_names,
    detect_dataset,
    get_spec,
    reader,
    reading_mode,
    resolve_dataset,
)
from ssageo.data.vigor import VIGOR_MODES
from ssageo.io import DataError, atomic_write_bytes

# Kept importable from here for the code that did: the names live in base/registry/vigor.
__all__ = ["DATASETS", "MAX_EXAMPLES", "SPLITS", "VIGOR_MODES", "Manifest", "SplitUnavailable",
           "cache_dir_for", "detect_dataset", "load_manifest", "resolve_dataset"]
DATASETS = dataset_names()
CACHE_VERSION = 3  # bump when the manifest's content or meaning changes


def warn_missing(name: str, missing: list[str], skipped: int) -> None:
    """Report dropped pairs loudly (count + first examples): they are never dropped silently."""
    if missing:
        shown = "; ".join(missing[:MAX_EXAMPLES])
        warnings.warn(f"{name}: {skipped} pair(s) skipped because a file is missing or "
                      f"empty ({len(missing)} file problem(s)), e.g. {shown}", stacklevel=3)


def sources_key(files: list[Path], folders: list[Path], extra: str) -> str:
    """Hash of the files' contents, the folders' modification times and ``extra``."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{extra}".encode())
    for f in files:
        h.update(str(f).encode())
        if f.is_file():
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
    for d in folders:
        h.update(str(d).encode())
        if d.is_dir():
            # A folder's mtime changes whenever an entry is added, removed or renamed.
            h.update(str(d.stat().st_mtime_ns).encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------- caching


def cache_dir_for(root: Path, cache_dir: str | Path | None = None) -> Path:
    """Where derived files for ``root`` live: ``cache_dir``, else ``<root>/.ssageo_cache`` when
    the dataset folder is writable, else ``~/.cache/ssageo/<hash of root>``."""
    if cache_dir is not None:
        return Path(cache_dir)
    local = root / ".ssageo_cache"
    if os.access(local if local.is_dir() else root, os.W_OK):
        return local
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ssageo" / tag


_PATH_LISTS = ("query_paths", "reference_paths", "prior_paths")
_ARRAYS = ("positive", "semi_positive", "query_coords", "reference_coords", "utm", "offsets",
           "reference_groups")
_SCALARS = ("dataset", "split", "layout", "place_ids", "reference_ids", "vigor_mode", "missing",
            "skipped", "key")


def save_manifest(manifest: Manifest, path: Path) -> None:
    """Write a manifest as one .npz (arrays + a JSON header), atomically; paths root-relative."""
    root = manifest.root
    meta = {k: getattr(manifest, k) for k in _SCALARS}
    for k in _PATH_LISTS:
        meta[k] = [None if p is None else p.relative_to(root).as_posix()
                   for p in getattr(manifest, k)]
    arrays = {k: getattr(manifest, k) for k in _ARRAYS if getattr(manifest, k) is not None}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_cached_manifest(path: Path, root: Path) -> Manifest:
    """Read a manifest written by :func:`save_manifest`, re-rooted at ``root``."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        arrays = {k: (data[k] if k in data else None) for k in _ARRAYS}
    paths = {k: [None if p is None else root / p for p in meta.pop(k)] for k in _PATH_LISTS}
    return Manifest(root=root, **meta, **paths, **arrays)


def load_manifest(root: str | Path, dataset: str = "auto", split: str = "train",
                  vigor_mode: str = "same-area", cache_dir: str | Path | None = None,
                  use_cache: bool = True) -> Manifest:
    """Read one split of a dataset as distributed; see docs/ARCHITECTURE.md for the fields.

    ``dataset`` is ``auto`` (detected from the layout) or a registered name
    (:func:`~ssageo.data.registry.dataset_names`); ``root`` is its folder, or for ``pairs`` the
    CSV file; ``split`` is train|val|test, among the dataset's ``SPEC.splits``. The result is
    cached (see :func:`cache_dir_for`; a CSV's cache sits beside it) and rebuilt when the split
    files or image folders change. Pairs with a missing or empty file are skipped and listed in
    ``missing`` with a warning.
    """
    root = Path(root)
    dataset = resolve_dataset(root, dataset, vigor_mode)
    vigor_mode = reading_mode(dataset, vigor_mode)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
    spec, read = get_spec(dataset), reader(dataset)
    files, folders = read.sources(root, split, vigor_mode)
    key = sources_key(files, folders, f"{dataset}|{split}|{vigor_mode}")
    base = root if root.is_dir() else root.parent  # a pairs CSV: paths are relative to its folder
    cache = cache_dir_for(base, cache_dir) / f"manifest-{dataset}-{split}-{key}.npz"
    if use_cache and cache.is_file():
        manifest = read_cached_manifest(cache, base)
    else:
        manifest = read.read(root, split, vigor_mode)
        manifest.key = key
        if use_cache:
            save_manifest(manifest, cache)
    warn_missing(f"{dataset} {split}", manifest.missing, manifest.skipped)
    if spec.coords == "gps" and split == "train" and manifest.query_coords is None:
        warnings.warn(f"{spec.coords_missing.format(root=root)}: {spec.title} without GPS, so "
                      "training has no GPS hard negatives (train.sampling.first=gps is refused)",
                      stacklevel=2)
    return manifest
