"""The oracle backend: a generated world's ground truth, corrupted the way a VFM errs.

For ``ssageo synth`` worlds the true semantic map of every tile is known, so the prior can be
made exactly as good or as bad as wanted, and the effect of prior quality on retrieval measured.
Per output class (by default one, ``object`` = building | tree, as in the paper) the truth mask
is corrupted, in this order:

1. **drop**: each connected object (8-connectivity) is removed with probability ``drop`` -
   missed detections;
2. **erode** / **dilate**: by ``k`` pixels with a disc - masks too tight or too loose;
3. **false positives**: disc blobs are added on the background until the added area reaches
   ``false_positives`` x the tile's true foreground area of that class - hallucinated objects
   (a tile with no true foreground gets none).

Randomness is seeded per tile from ``seed`` and the tile's path, so a result does not depend on
which tiles a run did or skipped. The quality is measured as the mIoU of the written labels
against the uncorrupted ones: the IoU of every label value (background and each class) summed
over all tiles of the run, then averaged over the values.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ssageo.config import ConfigError
from ssageo.io import DataError, read_image
from ssageo.priors.fusion import encode_label
from ssageo.priors.run import Tile

DEFAULT_CLASSES: dict[str, list[str]] = {"object": ["building", "tree"]}


@dataclass(frozen=True)
class Corruption:
    """How to corrupt a true mask; all zero = the truth itself."""

    erode: int = 0
    dilate: int = 0
    drop: float = 0.0
    false_positives: float = 0.0
    blob_radius: int = 4

    def __post_init__(self) -> None:
        if self.erode < 0 or self.dilate < 0:
            raise ConfigError("erode and dilate are pixel counts and must be >= 0")
        if not 0.0 <= self.drop <= 1.0:
            raise ConfigError(f"drop must be a fraction in [0, 1], got {self.drop}")
        if self.false_positives < 0:
            raise ConfigError(f"false_positives must be >= 0, got {self.false_positives}")
        if self.blob_radius < 1:
            raise ConfigError(f"blob_radius must be >= 1 pixel, got {self.blob_radius}")


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def drop_objects(mask: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Remove each connected object of a bool mask with probability ``fraction``."""
    count, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    dropped = np.flatnonzero(rng.random(count - 1) < fraction) + 1  # component 0 = background
    return mask & ~np.isin(components, dropped)


def add_false_positives(
    mask: np.ndarray, area: float, radius: int, rng: np.random.Generator
) -> np.ndarray:
    """Add discs of radius ``radius//2 .. radius`` on background pixels until ``area`` new
    foreground pixels are added (the last disc may overshoot); returns a new bool mask."""
    out = mask.copy()
    added = 0
    height, width = mask.shape
    while added < area:
        background = np.flatnonzero(~out)
        if background.size == 0:
            break
        centre = background[rng.integers(background.size)]
        blob = np.zeros((height, width), np.uint8)
        r = int(rng.integers(max(1, radius // 2), radius + 1))
        cv2.circle(blob, (int(centre % width), int(centre // width)), r, 1, thickness=-1)
        new = blob.astype(bool) & ~out
        added += int(new.sum())
        out |= new
    return out


def corrupt_mask(mask: np.ndarray, corruption: Corruption, rng: np.random.Generator) -> np.ndarray:
    """Apply drop, erode/dilate and false positives (in that order) to a bool (H, W) mask."""
    truth = np.asarray(mask, dtype=bool)
    out = drop_objects(truth, corruption.drop, rng) if corruption.drop > 0 else truth.copy()
    if corruption.erode:
        out = cv2.erode(out.astype(np.uint8), _disc(corruption.erode)).astype(bool)
    if corruption.dilate:
        out = cv2.dilate(out.astype(np.uint8), _disc(corruption.dilate)).astype(bool)
    if corruption.false_positives > 0:
        target = corruption.false_positives * truth.sum()
        out = add_false_positives(out, target, corruption.blob_radius, rng)
    return out


def world_class_names(root: Path) -> list[str]:
    """Class names of a generated world, index = value in its truth maps (``world.json``'s
    ``class_names``)."""
    path = Path(root) / "world.json"
    if not path.is_file():
        raise DataError(
            f"{path}: missing - the oracle backend needs a world made by `ssageo synth`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: no 'class_names' list (not a world made by `ssageo synth`?)")
    return names


def confusion(truth: np.ndarray, predicted: np.ndarray, values: int) -> np.ndarray:
    """(values, values) pixel counts, rows = truth value, columns = predicted value."""
    index = truth.astype(np.int64).ravel() * values + predicted.astype(np.int64).ravel()
    return np.bincount(index, minlength=values * values).reshape(values, values)


def mean_iou(matrix: np.ndarray) -> float:
    """Mean IoU over the label values present in truth or prediction of a confusion matrix."""
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    return float(np.mean(tp[present] / union[present])) if present.any() else 1.0


class OracleBackend:
    """Prior labels from the truth maps of an ``ssageo synth`` world, corrupted.

    ``classes`` maps each output class to the world classes it covers (default: one class,
    ``object`` = building + tree -> 0/255 labels); several output classes -> an index map.
    """

    def __init__(
        self,
        root: Path,
        corruption: Corruption = Corruption(),
        classes: Mapping[str, Sequence[str]] | None = None,
        seed: int = 0,
        batch_size: int = 16,
    ) -> None:
        self.corruption = corruption
        self.seed = int(seed)
        self.batch_size = batch_size
        names = world_class_names(root)
        self.classes: list[list[int]] = []
        for out_name, members in (classes or DEFAULT_CLASSES).items():
            unknown = [m for m in members if m not in names]
            if unknown or not members:
                raise ConfigError(
                    f"oracle class '{out_name}': {unknown or 'no'} world classes "
                    f"(the world has: {', '.join(names)})"
                )
            self.classes.append([names.index(m) for m in members])
        values = len(self.classes) + 1
        self._values = values
        self._confusion = np.zeros((values, values), dtype=np.int64)

    def _rng(self, tile: Tile) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(tile.rel.encode())])

    def predict(self, tiles: Sequence[Tile]) -> list[np.ndarray]:
        labels, matrices = [], []
        for tile in tiles:
            truth_map = read_image(tile.truth_path, mode="L")
            truth = [np.isin(truth_map, members) for members in self.classes]
            rng = self._rng(tile)
            corrupted = [corrupt_mask(mask, self.corruption, rng) for mask in truth]
            label = encode_label(corrupted)
            labels.append(label)
            matrices.append(confusion(self._index(truth), self._index(corrupted), self._values))
        # counted only once the whole batch succeeded: the driver retries a failed batch tile
        # by tile, and a tile must not count twice
        self._confusion += sum(matrices)
        return labels

    @staticmethod
    def _index(masks: list[np.ndarray]) -> np.ndarray:
        # encode_label's value order, but 0..K for one class too (0/255 would not index)
        label = encode_label(masks)
        return (label > 0).astype(np.uint8) if len(masks) == 1 else label

    def statistics(self) -> dict[str, float]:
        """``miou``: mean IoU of the labels written so far against the truth."""
        if self._confusion.sum() == 0:
            return {}
        return {"miou": mean_iou(self._confusion)}
