"""The driver shared by every prior backend: list tiles, skip done ones, write labels, summarise.

A backend turns a batch of satellite tiles into label arrays; this module decides which tiles to
do, writes each label atomically where the dataset readers look for it
(``ssageo.data.paths.prior_label_path``), shows progress, keeps going past a tile that fails
(reporting it by path) and returns a summary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ssageo.data.paths import prior_label_path, truth_label_path
from ssageo.io import DataError, OutputError, write_image
from ssageo.priors.record import LabelRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    """One satellite tile of a dataset: the dataset root and the tile's path relative to it."""

    root: Path
    rel: str

    @property
    def path(self) -> Path:
        """The satellite image."""
        return self.root / self.rel

    @property
    def prior_path(self) -> Path:
        """Where its prior label is written (and read by the dataset readers)."""
        return self.root / prior_label_path(self.rel)

    @property
    def truth_path(self) -> Path:
        """Its ground-truth class map (generated worlds only)."""
        return self.root / truth_label_path(self.rel)


class PriorBackend(Protocol):
    """What the driver needs from a backend."""

    batch_size: int

    def predict(self, tiles: Sequence[Tile]) -> list[np.ndarray]:
        """Labels for ``tiles``: one (H, W) uint8 array per tile, the tile's own size."""

    def statistics(self) -> dict[str, float]:
        """Backend figures for the summary (e.g. the oracle's mIoU); may be empty."""


@dataclass
class PriorSummary:
    """What a run did. ``failed`` holds ``(tile path, reason)``; ``foreground`` is the mean
    fraction of non-background pixels over the labels written (NaN when none were)."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    foreground: float = float("nan")
    statistics: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def tiles_from_paths(root: Path, paths: Sequence[Path | str]) -> list[Tile]:
    """Tiles for satellite image paths (absolute, or relative to ``root``) under ``root``."""
    root = Path(root)
    tiles = []
    for path in paths:
        path = Path(path)
        rel = path.relative_to(root) if path.is_absolute() else path
        tiles.append(Tile(root, rel.as_posix()))
    return tiles


def list_tiles(
    root: Path, dataset: str = "auto", splits: Sequence[str] | None = None
) -> list[Tile]:
    """Every satellite tile of the dataset at ``root`` (``splits``, default all), once, sorted.

    Uses the dataset readers, so a malformed dataset or an absent split raises their DataError.
    The splits of the dataset's spec together hold every tile (VIGOR: the same-area train and
    test galleries are each every tile of the cities present).
    """
    from ssageo.data import detect_dataset, get_spec, load_manifest

    root = Path(root)
    if dataset == "auto":
        dataset = detect_dataset(root)
    every = get_spec(dataset).splits
    if not root.is_dir():  # a pairs CSV: labels are listed in its prior column instead
        raise DataError(f"{root}: ssageo priors writes labels into a dataset folder; for a "
                        "pairs CSV, give each tile's label in its prior column")
    rels: set[str] = set()
    for split in splits or every:
        try:
            manifest = load_manifest(root, dataset, split)
        except DataError as exc:
            if splits:
                raise
            others = " ".join(f"--split {s}" for s in every if s != split)
            raise DataError(f"{exc} - to label only the other splits, pass {others}") from None
        rels.update(Path(p).relative_to(manifest.root).as_posix() for p in manifest.reference_paths)
    return [Tile(root, rel) for rel in sorted(rels)]


def _batches(items: Sequence[Tile], size: int) -> Iterator[list[Tile]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _check_label(tile: Tile, label: np.ndarray) -> None:
    if not isinstance(label, np.ndarray) or label.ndim != 2 or label.dtype != np.uint8:
        raise DataError(f"{tile.path}: backend returned a label that is not an (H, W) uint8 array")


def run_priors(
    tiles: Sequence[Tile],
    backend: PriorBackend,
    force: bool = False,
    progress: bool = True,
    console: Console | None = None,  # where the progress bar is drawn (default: stderr)
    record: LabelRecord | None = None,
    whole_dataset: bool = False,
) -> PriorSummary:
    """Write a prior label for every tile in ``tiles`` with ``backend``; returns the summary.

    Tiles whose label already exists are skipped unless ``force``. When a batch fails, its tiles
    are retried one by one so that only the tiles that really fail are reported (by path, logged
    as they happen, and in the summary); the run goes on with the next tiles. An OutputError
    (disk full, read-only folder) stops it: every next tile would fail the same way.

    ``record`` (from ``LabelRecord.open``) is written first and tracks an unfinished ``--force``
    run; ``whole_dataset``: ``tiles`` are every tile, so a run without failures completes it.
    """
    console = console or Console(stderr=True)
    summary = PriorSummary()
    todo = [t for t in tiles if force or not t.prior_path.is_file()
            or (record is not None and not record.is_current(t.rel))]
    summary.skipped = len(tiles) - len(todo)
    if record is not None:
        record.start(force)
        if summary.skipped and not record.existed:
            logger.warning("%d existing label(s) kept although nothing records how they were "
                           "made (pass --force to redo them)", summary.skipped)
    fractions: list[float] = []

    def write(tile: Tile, label: np.ndarray) -> None:
        _check_label(tile, label)
        # an OutputError when it cannot: stops the run
        write_image(tile.prior_path, label, label=True)
        if record is not None:
            record.mark([tile.rel])
        fractions.append(float(np.count_nonzero(label)) / label.size)
        summary.done += 1

    def fail(tile: Tile, exc: Exception) -> None:
        summary.failed.append((str(tile.path), f"{type(exc).__name__}: {exc}"))
        logger.error("failed %s: %s", tile.path, exc)

    columns = (TextColumn("priors"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("priors", total=len(todo))
        for batch in _batches(todo, max(1, int(backend.batch_size))):
            try:
                labels = backend.predict(batch)
                pairs = list(zip(batch, labels, strict=True))
            except Exception:  # noqa: BLE001 - narrowed down tile by tile just below
                pairs = []
                for tile in batch:
                    try:
                        pairs.append((tile, backend.predict([tile])[0]))
                    except Exception as exc:  # noqa: BLE001 - reported by path, run goes on
                        fail(tile, exc)
            for tile, label in pairs:
                try:
                    write(tile, label)
                except OutputError:  # disk full or read-only: every next tile would fail too
                    raise
                except Exception as exc:  # noqa: BLE001 - reported by path, run goes on
                    fail(tile, exc)
            bar.advance(task, len(batch))
    if record is not None and whole_dataset and not summary.failed:
        record.finish()
    if fractions:
        summary.foreground = float(np.mean(fractions))
    summary.statistics = backend.statistics()
    return summary
