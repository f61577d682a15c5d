"""What every dataset reader builds on: the :class:`Manifest` it returns, the
:class:`DatasetSpec` it declares, and the checks shared by the readers.

This module imports no reader, so readers, the registry and the loader import it without a
circle (readers -> base; registry -> readers; manifest (the loader) -> registry).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssageo.data.paths import prior_label_candidates
from ssageo.io import DataError

SPLITS = ("train", "val", "test")
MAX_EXAMPLES = 5  # problems are reported as a count plus this many examples
COORD_KINDS = ("gps", "utm", "tile")
QUERY_KINDS = ("panorama", "perspective")
# positive: one positive reference per query (R@k, R@1%, VIGOR's hit rate, metre errors);
# groups: every reference of the query's group is relevant (R@k of the first, and AP:
# docs/UNIVERSITY.md), from the manifest's ``reference_groups``
PROTOCOLS = ("positive", "groups")


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of ssageo asks about a dataset instead of branching on its name.

    A reader module defines one as ``SPEC`` beside ``markers(root) -> list[str]`` (the layout
    markers found at ``root``: how ``data.dataset: auto`` recognises it), ``sources(root, split,
    mode)`` (the files and folders the cache key hashes) and ``read(root, split, mode) ->
    Manifest``; ``ssageo.data.registry`` lists the modules.
    """

    name: str  # the data.dataset / --dataset value
    title: str  # how messages and reports name it
    splits: tuple[str, ...]  # the splits it defines (data check, priors, index: all of them)
    held_out: str  # evaluated by default (``ssageo eval``/``embed``, the report)
    validation: str | None  # validated on during training; None: no validation
    no_validation: str  # why there is none (shown by training), when ``validation`` is None
    expected: str  # the layout in words, for "not a <title> layout" errors
    coords: str  # gps: query lat/lon; utm: planar easting/northing; tile: positive tile centre
    coords_source: str  # where coordinates come from ("{root}" is the dataset root)
    coords_missing: str = ""  # "gps": what is missing when a split has none ("{root}")
    coords_file: str | None = None  # "gps": the root-relative file that holds them, if one
    query: str = "panorama"  # panorama (360 degrees) | perspective
    sizes: dict[str, tuple[int, int]] | None = None  # (width, height) per view as distributed
    modes: tuple[str, ...] = ()  # reading modes, the first the default (VIGOR: same-area, ...)
    protocol: str = "positive"  # the evaluation protocol (PROTOCOLS)

    def __post_init__(self) -> None:
        if (self.coords not in COORD_KINDS or self.query not in QUERY_KINDS
                or self.protocol not in PROTOCOLS):
            raise ValueError(f"{self.name}: coords must be one of {COORD_KINDS}, query one of "
                             f"{QUERY_KINDS} and protocol one of {PROTOCOLS}")
        if self.held_out not in self.splits or self.validation not in (*self.splits, None):
            raise ValueError(f"{self.name}: held_out/validation must be among {self.splits}")


@dataclass
class Manifest:
    """One split of one dataset: Q queries, R references, positives and metadata.

    ``positive[i]`` indexes ``reference_paths`` for query ``i``; ``semi_positive`` (Q, 3) holds
    VIGOR semi-positive reference indices (-1 where absent) and ``offsets`` (Q, 4, 2) the
    (dy, dx) pixel offsets of the query location from the positive and semi-positive tile
    centres (NaN where absent; None outside VIGOR). ``reference_groups`` (R,) int: the group
    (University-1652: building) of each reference, for a ``groups`` protocol: query ``i`` is
    relevant to every reference of group ``reference_groups[positive[i]]``. Coordinates are
    (lat, lon) degrees; CVACT has none and gives ``utm`` (Q, 2) easting/northing instead.
    ``missing`` lists the files whose absence (or emptiness) dropped a pair or tile ("path:
    reason"); ``skipped`` counts the pairs (queries) dropped, which can be fewer (both files of
    a pair may be missing).
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
    reference_groups: np.ndarray | None = None
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
    """The SSA prior label of a satellite tile, when one exists at a known location (None also
    for a tile outside any satellite folder, which has no known location)."""
    rel = reference.relative_to(root).as_posix()
    try:
        candidates = prior_label_candidates(rel)
    except ValueError:
        return None
    for cand in candidates:
        path = root / cand
        if path.is_file():
            return path
    return None
