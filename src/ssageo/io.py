"""Small file helpers shared by every stage: atomic writes, image reading with clear errors."""

from __future__ import annotations

import os
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

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

    16-bit and float images are scaled to 8 bits (see :func:`_to_eight_bit`). Raises DataError
    naming the file when it is missing, empty, too large or not a decodable image.
    """
    with open_image(path) as img:
        # np.array makes it writable, so torch.from_numpy never warns
        return np.array(_to_eight_bit(img, Path(path)).convert(mode))


def _to_eight_bit(img, path: Path):
    """``img`` with 16-bit, 32-bit integer or float samples scaled to an 8-bit "L" image.

    16-bit (I;16, I;16B, ...) maps 0..65535 to 0..255. Mode "I" (32-bit integer, what some
    writers use for 16-bit data) is taken as 16-bit when its values lie in 0..65535 and refused
    otherwise; mode "F" (float) is taken as 0..1 and refused outside that range or when not
    finite. Other modes are returned unchanged (PIL's own conversions are right for them).
    """
    from PIL import Image

    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    values = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise DataError(f"{path}: float image with values outside 0..1 (or NaN/inf): "
                            "save it as an 8- or 16-bit image")
        scaled = np.rint(values * 255.0)
    else:
        values = values.astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{path}: 32-bit image with values {values.min()}..{values.max()} "
                            "(not 0..65535): save it as an 8- or 16-bit image")
        scaled = (values * 255 + 32767) // 65535  # rounded; 65535 -> 255
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """The PIL image of ``path`` (lazy: header read, pixels not yet), closed on exit.

    Raises DataError naming the file when it is missing, empty, larger than PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) or not decodable, including
    decoding errors raised inside the ``with`` block (e.g. a truncated file on ``load``).
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between the limit and twice the limit; refuse both alike.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            yield img
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: image too large to decode safely, refused as a possible "
                        f"decompression bomb ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None
