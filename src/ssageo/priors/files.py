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

from ssageo.io import DataError, open_image
from ssageo.priors.run import Tile

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
_LISTED = 20  # offending paths shown in an error before "and N more"


def _listing(paths: Sequence[str]) -> str:
    shown = "\n  ".join(paths[:_LISTED])
    more = f"\n  ... and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
    return f"\n  {shown}{more}"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy mask from its header, refusing what :func:`read_mask` cannot use:
    not 2-D (or (H, W, 1)), not bool/integer/float (object arrays would need pickle), or
    fewer bytes than the header promises (a truncated file)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f, max_header_size=1 << 16)
            start = f.tell()
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read numpy array ({exc})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(f"{path}: mask has dtype {dtype}; expected bool, integer or float "
                        "(object arrays are never loaded)")
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 1)):
        raise DataError(f"{path}: expected a 2-D mask (H, W), got shape {shape}")
    need = start + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise DataError(f"{path}: truncated numpy file ({size} bytes, its header needs {need})")
    return shape, dtype


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image or array file, reading only its header."""
    if path.suffix.lower() == ".npy":
        shape, _ = _npy_header(path)
        return int(shape[0]), int(shape[1])
    with open_image(path) as img:
        return img.height, img.width


def read_mask(path: Path) -> np.ndarray:
    """A mask file as an (H, W) array of its values: .npy as stored (checked by
    :func:`_npy_header`), images as grayscale; 16-bit, 32-bit and float images keep their
    values (not scaled to 8 bits, so a 0/1 or class-index mask stays one). Raises DataError
    naming the file for an unreadable mask or one with NaN/inf values."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        _npy_header(path)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read numpy array ({exc})") from None
        if array.ndim == 3:
            array = array[..., 0]
    else:
        with open_image(path) as img:
            wide = img.mode.startswith("I;16") or img.mode in ("I", "F")
            array = np.array(img if wide else img.convert("L"))
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise DataError(f"{path}: mask has {bad} NaN/inf value(s); a mask must be finite")
    return array


def to_label(mask: np.ndarray, keep_values: bool = False, source: str = "mask") -> np.ndarray:
    """The stored uint8 label of an imported mask (see the module docstring); ``source`` names
    the mask in errors."""
    if keep_values:
        if mask.min() < 0 or mask.max() > 255:
            raise DataError(f"{source}: values {mask.min()}..{mask.max()} do not fit a uint8 label")
        return mask.astype(np.uint8)
    # Half of the value range: 16-bit masks (values above 255) are cut at 32768, not 128.
    half = 32768 if mask.max() > 255 else 128
    foreground = mask > 0 if mask.max() <= 1 else mask >= half
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
