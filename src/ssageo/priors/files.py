"""The ``files`` backend: import folders of existing masks (e.g. the SSA release's priors).

Masks are matched to tiles by file stem (``0000001.jpg`` -> tile ``bingmap/19/0000001.jpg``),
searched recursively under the folder(s) (dot-files ignored: they are unfinished atomic
writes); several folders act as one (VIGOR's ``map_repro`` labels sit in one folder per city).
Images (.png/.jpg/.jpeg) and per-tile numpy arrays (.npy, as the SSA release ships for VIGOR)
are accepted. Before anything is written the whole folder is checked: names that match no tile,
stems that occur twice, and masks whose size differs from their tile's are all listed, with
paths, in one error. By default masks are binarised to the 0/255 two-class label (values >= 128
are foreground, or > 0 when a mask's values are all 0/1, e.g. boolean arrays); with
``keep_values`` a class-index map is imported unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ssageo.io import DataError, read_image
from ssageo.priors.run import Tile

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
_LISTED = 20  # offending paths shown in an error before "and N more"


def _listing(paths: Sequence[str]) -> str:
    shown = "\n  ".join(paths[:_LISTED])
    more = f"\n  ... and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
    return f"\n  {shown}{more}"


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image or array file, reading only its header."""
    if path.suffix.lower() == ".npy":
        shape = np.load(path, mmap_mode="r").shape
        return int(shape[0]), int(shape[1])
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def read_mask(path: Path) -> np.ndarray:
    """A mask file as an (H, W) array (images as grayscale; .npy must be 2-D)."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        return read_image(path, mode="L")
    try:
        array = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read numpy array ({exc})") from None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2-D mask, got shape {array.shape}")
    return array


def to_label(mask: np.ndarray, keep_values: bool = False, source: str = "mask") -> np.ndarray:
    """The stored uint8 label of an imported mask (see the module docstring); ``source`` names
    the mask in errors."""
    if keep_values:
        if mask.min() < 0 or mask.max() > 255:
            raise DataError(f"{source}: values {mask.min()}..{mask.max()} do not fit a uint8 label")
        return mask.astype(np.uint8)
    foreground = mask > 0 if mask.max() <= 1 else mask >= 128
    return np.where(foreground, 255, 0).astype(np.uint8)


def scan_masks(folder: Path) -> list[Path]:
    """Mask files under ``folder`` (recursively, dot-files and dot-folders skipped), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: mask folder not found")
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in MASK_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


class FilesBackend:
    """Copies masks from ``folder`` (one or several) into the prior layout, after checking names
    and sizes.

    Raises DataError at construction, listing paths, when a mask name matches no tile, two masks
    share a stem, or a mask's size differs from its tile's. Tiles without a mask fail at
    ``predict`` (reported by the driver, the run goes on).
    """

    def __init__(
        self, folder: Path | Sequence[Path], tiles: Sequence[Tile], keep_values: bool = False,
        batch_size: int = 32,
    ) -> None:
        folders = [Path(folder)] if isinstance(folder, (str, Path)) else [Path(f) for f in folder]
        self.folders = folders
        self.where = ", ".join(map(str, folders))  # names the folder(s) in errors
        self.keep_values = keep_values
        self.batch_size = batch_size
        by_stem = {Path(t.rel).stem: t for t in tiles}
        masks = [path for f in folders for path in scan_masks(f)]
        self.masks: dict[str, Path] = {}
        unknown, duplicates = [], []
        for path in masks:
            if path.stem not in by_stem:
                unknown.append(str(path))
            elif path.stem in self.masks:
                duplicates.append(f"{path} (also {self.masks[path.stem]})")
            else:
                self.masks[path.stem] = path
        if unknown:
            raise DataError(
                f"{self.where}: {len(unknown)} mask file(s) match no satellite tile of the "
                f"dataset by name:{_listing(unknown)}"
            )
        if duplicates:
            raise DataError(
                f"{self.where}: {len(duplicates)} mask file(s) share a tile name:"
                f"{_listing(duplicates)}"
            )
        wrong = []
        for stem, path in self.masks.items():
            tile = by_stem[stem]
            want, got = _image_size(tile.path), _image_size(path)
            if want != got:
                wrong.append(f"{path}: {got[1]}x{got[0]}, tile {tile.path} is {want[1]}x{want[0]}")
        if wrong:
            raise DataError(
                f"{self.where}: {len(wrong)} mask(s) differ in size (W x H) from their tile:"
                f"{_listing(wrong)}"
            )

    def predict(self, tiles: Sequence[Tile]) -> list[np.ndarray]:
        labels = []
        for tile in tiles:
            path = self.masks.get(Path(tile.rel).stem)
            if path is None:
                raise DataError(f"{tile.path}: no mask {Path(tile.rel).stem}.* in {self.where}")
            labels.append(to_label(read_mask(path), self.keep_values, str(path)))
        return labels

    def statistics(self) -> dict[str, float]:
        return {}
