"""The training loader's image decoding: ``read_image``'s pixels at less cost.

``ssageo.io.read_image`` opens every file with PIL first (format, mode and size checks), then
decodes it with OpenCV. In a loader worker, three images a pair, that header pass and
OpenCV's own call overhead cost ~1 ms of a CVUSA pair (benchmarks/RESULTS.md, "Data loading at
the real sizes"). :func:`decode_image` reads the bytes once and decodes the common files
directly:

- JPEG (YCbCr or grey) with simplejpeg: libjpeg-turbo's TurboJPEG API with its accurate IDCT
  and fancy upsampling, the same pixels as OpenCV and PIL (tests/test_data_decode.py), ~10 %
  faster than ``cv2.imdecode``;
- 8-bit grey or RGB PNG with OpenCV, as ``read_image`` does, without PIL's header pass.

Anything else (other formats or bit depths, a mode that needs PIL's conversion, reduced
decoding of a JPEG, a truncated, corrupt or oversized file) goes to ``read_image``, which
decodes it or raises its DataError naming the file.

In a DataLoader worker, the first call also keeps freed image buffers in the worker's heap
(:func:`_keep_freed_buffers`), which saves the page faults of mapping them anew each time.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ssageo.io import read_image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types decoded here: 0 grey, 2 RGB (8 bits). PIL opens them as "L" / "RGB", the
# modes read_image hands to OpenCV too (an RGB file asked for as "L" needs PIL's conversion).
_PNG_FLAGS = {(0, "L"): "grey", (0, "RGB"): "rgb", (2, "RGB"): "rgb"}


def decode_image(path: str | Path, mode: str = "RGB",
                 min_size: tuple[int, int] | None = None) -> np.ndarray:
    """``read_image(path, mode, min_size)``: the same uint8 array (H, W, 3) for "RGB" or (H, W)
    for "L", and the same DataError for a file it cannot decode, faster for JPEG and 8-bit
    PNG files (module docstring)."""
    _keep_freed_buffers()
    try:
        data = Path(path).read_bytes()
    except OSError:
        data = b""  # read_image names the fault
    image = None
    if data[:3] == b"\xff\xd8\xff" and min_size is None:
        image = _jpeg(data, mode)
    elif data[:8] == _PNG_SIGNATURE:
        image = _png(data, mode)
    return image if image is not None else read_image(Path(path), mode, min_size)


def _too_large(height: int, width: int) -> bool:
    """Over PIL's decompression-bomb limit, which read_image enforces (it refuses the file)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS is not None and height * width > Image.MAX_IMAGE_PIXELS


def _jpeg(data: bytes, mode: str) -> np.ndarray | None:
    import simplejpeg

    try:
        height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
        if _too_large(height, width):
            return None
        if colour == "Gray":  # PIL's "L"; as "RGB", its grey repeated in each channel
            image = simplejpeg.decode_jpeg(data, "GRAY" if mode == "L" else "RGB")
        elif colour == "YCbCr" and mode == "RGB":
            image = simplejpeg.decode_jpeg(data, "RGB")
        else:  # colour to "L" (PIL's own luma), CMYK, ...: read_image
            return None
    except ValueError:  # strict decoding: corrupt or truncated (libjpeg would pad with grey)
        return None
    return image[..., 0] if mode == "L" else image


def _png(data: bytes, mode: str) -> np.ndarray | None:
    import cv2

    if len(data) < 33 or data[12:16] != b"IHDR" or data.rfind(b"IEND") < 0:
        return None  # no header or no end chunk: read_image checks and names it
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    kind = _PNG_FLAGS.get((colour, mode))
    if depth != 8 or kind is None or _too_large(height, width):
        return None
    flags = (cv2.IMREAD_GRAYSCALE if kind == "grey"
             else cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    return image if image is not None and image.shape[:2] == (height, width) else None


_tuned_pid: int | None = None
# glibc's mallopt parameters, and the values set in loader workers (below)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 64 << 20


def _keep_freed_buffers() -> None:
    """In a DataLoader worker, once per process: :func:`keep_freed_buffers`. Elsewhere (the
    training process) nothing is set."""
    global _tuned_pid
    if _tuned_pid == os.getpid():
        return
    _tuned_pid = os.getpid()
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        keep_freed_buffers()


def keep_freed_buffers() -> bool:
    """Make glibc keep freed buffers of up to 32 MB in the heap, and up to 64 MB of free heap,
    instead of returning each decoded image's megabytes to the kernel and faulting them in
    again for the next one (~700 page faults a CVUSA pair, ~1 ms). Pixels are unchanged.
    False where the C library has no ``mallopt`` (not glibc)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit
                and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
