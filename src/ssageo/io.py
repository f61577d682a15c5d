"""Small file helpers shared by every stage: atomic writes, image reading with clear errors."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


class DataError(ValueError):
    """Bad input data; the message names the file and what is wrong."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place.

    A crash leaves either the old file or none, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_image(path: Path, image: np.ndarray, quality: int = 95) -> None:
    """Write an HxW or HxWx3 (RGB) uint8 array atomically; the format follows the suffix."""
    from PIL import Image

    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported image suffix (use .jpg or .png)")
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format=fmt, **kwargs))


def read_image(path: Path, mode: str = "RGB") -> np.ndarray:
    """Decode an image to a uint8 array (``mode`` "RGB" -> HxWx3, "L" -> HxW).

    Raises DataError naming the file when it is missing, empty or not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: image file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            return np.array(img.convert(mode))  # writable, so torch.from_numpy never warns
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None
