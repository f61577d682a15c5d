"""Small file helpers shared by every stage: atomic writes, image reading with clear errors."""

from __future__ import annotations

import errno
import io
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


class OutputError(DataError):
    """A file could not be written (disk full, read-only, ...); the message names it.

    Callers that go on after one bad input (e.g. ``ssageo priors``) must stop on this one: the
    next write would fail the same way.
    """


# Why a write failed, in words (errno -> reason); anything else keeps the OS's own text.
WRITE_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded (no space left for this user)",
    errno.EFBIG: "file too large (the file size limit, ulimit -f, was reached)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a parent is not a folder",
    errno.EEXIST: "a parent is not a folder",
}


def write_error(path: Path, exc: OSError) -> OutputError:
    """One-line OutputError naming ``path`` and why writing it failed."""
    reason = WRITE_REASONS.get(exc.errno or 0) or exc.strerror or str(exc)
    return OutputError(f"{path}: cannot write: {reason}")


def atomic_write(path: Path, write: Callable[[Path], None], sync: bool = True) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place.

    A crash leaves either the old file or none, never a half-written one. With ``sync`` the
    temporary file is fsync'ed before the rename, so an error the file system reports late
    (quota, network file systems) still stops the rename. Any OSError becomes an OutputError
    naming ``path`` ("no space left on device", "read-only file system", ...).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        write(Path(tmp))
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_all(tmp: Path, data: bytes) -> None:
    """Write ``data`` to ``tmp``, looping over short writes; check the size on disk."""
    view = memoryview(data)
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        while view:
            view = view[os.write(fd, view):]
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)  # a network file system may report a failed write only here
    if size != len(data):  # never rename a short file into place, whatever the OS said
        raise OSError(errno.EIO, f"wrote {size} of {len(data)} bytes")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; every write is checked (no fsync: this is the
    path of many small files, where the size check catches a short write)."""
    atomic_write(path, lambda tmp: _write_all(tmp, data), sync=False)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


#: PNG label maps written with ``write_image(..., label=True)`` (2-D uint8): zlib level 3 and no
#: row filters, which decode ~3x faster than PIL's default (level 6, adaptive filters): a 750 px
#: CVUSA prior label 0.4 vs 1.3 ms, 2.6 -> 7 kB a file. The training loader decodes one label
#: a pair. The same 8-bit grey PNG, the same pixels.
LABEL_PNG_LEVEL = 3


def write_image(path: Path, image: np.ndarray, quality: int = 95, label: bool = False) -> None:
    """Write an HxW or HxWx3 (RGB) uint8 array atomically; the format follows the suffix.
    A ``label`` (a class or 0/255 map) is compressed for fast decoding (LABEL_PNG_LEVEL).

    The image is encoded in memory first: PIL's encoders write straight to a file descriptor
    and do not all notice a short write, which would leave a truncated image.
    """
    from PIL import Image

    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported image suffix (use .jpg or .png)")
    if label and fmt == "PNG" and image.ndim == 2 and image.dtype == np.uint8:
        import cv2  # PIL's PNG encoder cannot turn the row filters off

        ok, encoded = cv2.imencode(".png", image, (
            cv2.IMWRITE_PNG_COMPRESSION, LABEL_PNG_LEVEL,
            cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE))
        if ok:
            atomic_write_bytes(path, encoded.tobytes())
            return
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **kwargs)
    atomic_write_bytes(path, buffer.getvalue())


def check_output(path: Path, kind: str, is_kind: Callable[[Path], bool], force: bool = False,
                 option: str = "--out") -> Path:
    """Refuse an output path whose current content must not be replaced; returns the path.

    A folder, something that is not a regular file, or a file that ``is_kind`` does not
    recognise as a ``kind`` (e.g. a model's weights where an index goes) is always refused; an
    existing ``kind`` file is replaced only with ``force``; a folder that cannot be written is
    refused now rather than after the work. Raises OutputError (one line).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; {option} takes a file name for {kind}")
    parent = next(p for p in (*path.parents, Path(".")) if p.exists())
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):  # refuse now, not after hours of work
        read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
        reason = "read-only file system" if read_only else "permission denied"
        raise OutputError(f"{path}: cannot write: {reason} ({parent})")
    if not path.exists() and not path.is_symlink():
        return path
    if not path.is_file():
        raise OutputError(f"{path}: exists and is not a regular file; refusing to replace it")
    if not is_kind(path):
        raise OutputError(
            f"{path}: exists and is not {kind}; refusing to replace it (choose another "
            f"{option}, or move that file away)")
    if not force:
        raise OutputError(f"{path}: {kind} already exists; pass --force to replace it")
    return path


def read_image(path: Path, mode: str = "RGB",
               min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image to a uint8 array (``mode`` "RGB" -> HxWx3, "L" -> HxW).

    16-bit and float images are scaled to 8 bits (see :func:`_to_eight_bit`). Raises DataError
    naming the file when it is missing, empty, too large or not a decodable image.

    ``min_size`` (H, W): a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    OpenCV's ``IMREAD_REDUCED_*``) when the result stays at least that large: faster, but not
    the pixels of a full decode followed by a resize (``data.decode: reduced``, README).
    """
    with open_image(path) as img:
        fast = _decode_with_opencv(img, Path(path), mode, min_size)
        if fast is not None:
            return fast
        # np.array makes it writable, so torch.from_numpy never warns
        return np.array(_to_eight_bit(img, Path(path)).convert(mode))


def _decode_with_opencv(img: Image.Image, path: Path, mode: str,
                        min_size: tuple[int, int] | None) -> np.ndarray | None:
    """8-bit RGB/grey JPEG and PNG files decoded by OpenCV, else None (PIL decodes them).

    OpenCV runs the same libjpeg-turbo / libpng decoding as PIL (equal pixels, tests/
    test_io_decode.py) 1.5-3x faster (benchmarks/RESULTS.md). OpenCV decodes a truncated file
    silently, so a file without its end marker goes to PIL, which names the fault; EXIF
    orientation is ignored, as PIL does here.
    """
    import cv2

    if img.format not in ("JPEG", "PNG") or (img.mode, mode) not in _OPENCV_MODES:
        return None
    data = path.read_bytes()
    if img.format == "JPEG":  # EOI after the last start-of-scan (entropy data never holds FFD9)
        complete = data.find(b"\xff\xd9", max(data.rfind(b"\xff\xda"), 0)) >= 0
    else:
        complete = data.rfind(b"IEND") >= 0
    if not complete:
        return None
    flags = cv2.IMREAD_IGNORE_ORIENTATION | (cv2.IMREAD_COLOR_RGB if mode == "RGB"
                                             else cv2.IMREAD_GRAYSCALE)
    if min_size is not None and img.format == "JPEG":
        w, h = img.size
        for factor, reduced in ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
                                (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                                (2, cv2.IMREAD_REDUCED_GRAYSCALE_2)):
            if -(-h // factor) >= min_size[0] and -(-w // factor) >= min_size[1]:
                flags |= reduced  # libjpeg rounds the scaled size up
                break
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


# (file mode, requested mode) pairs whose OpenCV pixels equal PIL's ``convert``
_OPENCV_MODES = {("RGB", "RGB"), ("L", "L"), ("L", "RGB")}


def _to_eight_bit(img: Image.Image, path: Path) -> Image.Image:
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
