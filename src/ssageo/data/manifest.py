"""The dataset-agnostic manifest, layout detection, and the manifest cache.

A :class:`Manifest` is the table every reader produces (see docs/ARCHITECTURE.md): query and
reference paths, each query's positive (and, for VIGOR, semi-positive) reference, coordinates
and prior labels. ``load_manifest`` detects the dataset, reads it with the matching adapter and
caches the result beside the data; the cache key hashes the split files and the image folders'
listings, so editing a split or adding/removing images invalidates it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssageo.constants import VIGOR_CITIES as VIGOR_CITIES  # re-exported (its readers use it)
from ssageo.io import DataError, atomic_write_bytes

DATASETS = ("cvusa", "cvact", "vigor")
SPLITS = ("train", "val", "test")
VIGOR_MODES = ("same-area", "cross-area")
CACHE_VERSION = 2  # bump when the manifest's content or meaning changes
MAX_EXAMPLES = 5  # problems are reported as a count plus this many examples


@dataclass
class Manifest:
    """One split of one dataset: Q queries, R references, positives and metadata.

    ``positive[i]`` indexes ``reference_paths`` for query ``i``; ``semi_positive`` (Q, 3) holds
    VIGOR semi-positive reference indices (-1 where absent) and ``offsets`` (Q, 4, 2) the
    (dy, dx) pixel offsets of the query location from the positive and semi-positive tile
    centres (NaN where absent; None outside VIGOR). Coordinates are (lat, lon) degrees; CVACT
    has none and gives ``utm`` (Q, 2) easting/northing instead. ``missing`` lists the files
    whose absence (or emptiness) dropped a pair or tile ("path: reason"); ``skipped`` counts the
    pairs (queries) dropped, which can be fewer (both files of a pair may be missing).
    """

    dataset: str
    split: str
    root: Path
    layout: str
    query_paths: list[Path]
    reference_paths: list[Path]
    prior_paths: list[Path | None]
    positive: np.ndarray
    semi_positive: np.ndarray
    place_ids: list[str]
    reference_ids: list[str]
    query_coords: np.ndarray | None = None
    reference_coords: np.ndarray | None = None
    utm: np.ndarray | None = None
    offsets: np.ndarray | None = None
    vigor_mode: str | None = None
    missing: list[str] = field(default_factory=list)
    skipped: int = 0
    key: str = ""  # content hash of the split's sources (cache key)

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    @property
    def num_references(self) -> int:
        return len(self.reference_paths)

    @property
    def prior_coverage(self) -> float:
        """Fraction of references that have a prior label file."""
        n = len(self.prior_paths)
        return sum(p is not None for p in self.prior_paths) / n if n else 0.0

    @property
    def has_priors(self) -> bool:
        """True when every reference has a prior label (training needs all or none)."""
        return bool(self.prior_paths) and all(p is not None for p in self.prior_paths)


# ---------------------------------------------------------------- helpers shared by the readers


def resolve_entry(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` for a path read from a split file, refusing entries that leave the root.

    ``where`` names the source ("file:line") for the error message.
    """
    rel = rel.strip()
    if not rel:
        raise DataError(f"{where}: empty path entry")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise DataError(f"{where}: absolute path '{rel}' is not allowed (paths are relative "
                        f"to the dataset root {root})")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise DataError(f"{where}: path '{rel}' escapes the dataset root {root}")
    return root / Path(*parts)


class SplitUnavailable(DataError):
    """A split whose files are absent as a whole because they are a separate download (CVACT's
    ``ANU_data_test``, VIGOR's cities), as opposed to present but broken."""


def file_problem(path: Path) -> str | None:
    """None when ``path`` is a non-empty file, else "path: reason" (one stat call; a missing
    file costs a cached listing of its folder, to say when only the name's case differs)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        other = _names_by_case(path.parent).get(path.name.lower())
        if other:
            return f"{path}: missing; {other} exists - file name case differs"
        return f"{path}: missing"
    except OSError as exc:
        return f"{path}: cannot stat ({exc.strerror})"
    return f"{path}: empty (0 bytes)" if size == 0 else None


def _names_by_case(folder: Path) -> dict[str, str]:
    """Lower-cased name -> name of the entries of ``folder`` (cached while it is unchanged)."""
    try:
        stamp = folder.stat().st_mtime_ns
    except OSError:
        return {}
    return _listing(str(folder), stamp)


@functools.lru_cache(maxsize=64)
def _listing(folder: str, stamp: int) -> dict[str, str]:
    with os.scandir(folder) as entries:
        return {e.name.lower(): e.name for e in entries}


def find_prior(root: Path, reference: Path) -> Path | None:
    """The SSA prior label of a satellite tile, when one exists at a known location."""
    from ssageo.data.paths import prior_label_candidates

    rel = reference.relative_to(root).as_posix()
    for cand in prior_label_candidates(rel):
        path = root / cand
        if path.is_file():
            return path
    return None


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


# ------------------------------------------------------------------------------ detection


def _markers(root: Path) -> dict[str, list[str]]:
    """For each dataset, the layout markers found under ``root`` (relative paths)."""
    found: dict[str, list[str]] = {d: [] for d in DATASETS}
    for rel in ("splits/train-19zl.csv", "splits/val-19zl.csv", "bingmap", "streetview/panos"):
        if (root / rel).exists():
            found["cvusa"].append(rel)
    for rel in ("ACT_data.mat", "ANU_data_small", "ANU_data_test"):
        if (root / rel).exists():
            found["cvact"].append(rel)
    for city in VIGOR_CITIES:
        for rel in (f"splits/{city}", f"{city}/panorama", f"{city}/satellite",
                    f"ground/{city}", f"satellite/{city}"):
            if (root / rel).exists():
                found["vigor"].append(rel)
    return found


EXPECTED = {
    "cvusa": "splits/train-19zl.csv, splits/val-19zl.csv, bingmap/, streetview/panos/",
    "cvact": "ACT_data.mat, ANU_data_small/, ANU_data_test/",
    "vigor": "splits/<City>/, <City>/panorama/ + <City>/satellite/ "
             "(or ground/<City>/ + satellite/<City>/)",
}


def detect_dataset(root: str | Path) -> str:
    """Name of the dataset laid out under ``root`` (cvusa, cvact or vigor).

    Raises DataError when the folder is missing, matches no layout, or matches several.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    found = {d: m for d, m in _markers(root).items() if m}
    if len(found) == 1:
        return next(iter(found))
    if not found:
        expected = "; ".join(f"{d.upper()}: {e}" for d, e in EXPECTED.items())
        # A common slip is to give the folder that holds the dataset: name what is inside.
        inside = [f"{sub.name}/ ({d.upper()})" for sub in sorted(root.iterdir())
                  if sub.is_dir() and not sub.name.startswith(".")
                  for d, m in _markers(sub).items() if m]
        hint = f"; datasets found in subfolders: {', '.join(inside)}" if inside else ""
        raise DataError(f"{root}: does not look like any supported dataset layout "
                        f"(expected one of - {expected}){hint}")
    seen = "; ".join(f"{d.upper()} ({', '.join(m[:3])})" for d, m in found.items())
    raise DataError(f"{root}: ambiguous layout, found markers of several datasets: {seen}; "
                    "pass --dataset explicitly")


def check_layout(root: Path, dataset: str) -> None:
    """Refuse a folder whose layout is another dataset's, saying which one it looks like."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}' (use auto, {', '.join(DATASETS)})")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    markers = _markers(root)
    if markers[dataset]:
        return
    others = [d for d in DATASETS if markers[d]]
    if others:
        other = others[0]
        raise DataError(f"{root}: expected a {dataset.upper()} layout ({EXPECTED[dataset]}) but "
                        f"this looks like {other.upper()} (found {', '.join(markers[other][:3])});"
                        f" use --dataset {other} or --dataset auto")
    raise DataError(f"{root}: not a {dataset.upper()} layout: none of {EXPECTED[dataset]} found")


def resolve_dataset(root: Path, dataset: str, vigor_mode: str = "same-area") -> str:
    """The dataset under ``root``: detected for ``auto``, else checked against the layout."""
    if vigor_mode not in VIGOR_MODES:
        raise DataError(f"unknown VIGOR mode '{vigor_mode}' (use {', '.join(VIGOR_MODES)})")
    if dataset == "auto":
        return detect_dataset(root)
    check_layout(root, dataset)
    return dataset


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
_ARRAYS = ("positive", "semi_positive", "query_coords", "reference_coords", "utm", "offsets")
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

    ``dataset`` is ``auto`` (detected from the layout) or cvusa|cvact|vigor; ``split`` is
    train|val|test (CVUSA has no test split, VIGOR no val split). The result is cached (see
    :func:`cache_dir_for`) and rebuilt when the split files or image folders change. Pairs with
    a missing or empty file are skipped and listed in ``missing`` with a warning.
    """
    from ssageo.data import cvact, cvusa, vigor

    root = Path(root)
    dataset = resolve_dataset(root, dataset, vigor_mode)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
    reader = {"cvusa": cvusa, "cvact": cvact, "vigor": vigor}[dataset]
    files, folders = reader.sources(root, split, vigor_mode)
    key = sources_key(files, folders, f"{dataset}|{split}|{vigor_mode}")
    cache = cache_dir_for(root, cache_dir) / f"manifest-{dataset}-{split}-{key}.npz"
    if use_cache and cache.is_file():
        manifest = read_cached_manifest(cache, root)
    else:
        manifest = reader.read(root, split, vigor_mode)
        manifest.key = key
        if use_cache:
            save_manifest(manifest, cache)
    warn_missing(f"{dataset} {split}", manifest.missing, manifest.skipped)
    if dataset == "cvusa" and split == "train" and manifest.query_coords is None:
        warnings.warn(f"{root / 'split_locations' / 'all.csv'} is missing: CVUSA without GPS, "
                      "so training has no GPS hard negatives (train.sampling.first=gps is refused)",
                      stacklevel=2)
    return manifest
