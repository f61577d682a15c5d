"""How the command line reports a failure: one line naming the path or key and what is wrong.

``describe`` turns an expected failure (bad input, a full or read-only disk, a corrupt file a
library refused) into that line; it returns None for anything else, which is a bug in ssageo
and is reported by ``report_bug`` with its traceback kept in a file.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import traceback
from pathlib import Path

from ssageo.config import ConfigError
from ssageo.io import WRITE_REASONS, DataError

# errno -> what the line says: the write reasons of ssageo.io, and those of reading
_ERRNO_TEXT = {
    **WRITE_REASONS,
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error (a failing disk or network drive?)",
}

# errors about where a file is created rather than about the file itself
_FOLDER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

# (module, class name, what the line says before the library's own message). Looked up in
# sys.modules only: an error class from a module that was never imported cannot be the cause.
_LIBRARY_ERRORS = (
    ("PIL.Image", "DecompressionBombError",
     "image too large to decode safely (Pillow's decompression-bomb limit)"),
    ("safetensors", "SafetensorError", "not a readable .safetensors file"),
    ("pickle", "UnpicklingError", "not a readable checkpoint file"),
    ("zipfile", "BadZipFile", "not a readable zip / .npz / .pt file"),
    ("json", "JSONDecodeError", "not valid JSON"),
    ("yaml", "YAMLError", "not valid YAML"),
    ("torch", "OutOfMemoryError", "out of GPU memory (lower the batch size)"),
)
_BUILTIN_ERRORS = (
    (EOFError, "a file ended early (truncated or empty?)"),
    (UnicodeDecodeError, "not UTF-8 text"),
    (MemoryError, "out of memory (lower the batch size or the number of workers)"),
)


def _worker_message(text: str) -> str:
    """A DataLoader worker's error comes back with the worker's traceback inside its message:
    keep the original message (the traceback's last line, after the class name)."""
    marker = "Original Traceback (most recent call last):"
    if marker not in text:
        return text
    last = [line for line in text.split(marker, 1)[1].splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _first_line(exc: BaseException) -> str:
    text = _worker_message(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_os_error(exc: OSError) -> str:
    """``PATH: what is wrong`` for an OSError (the message alone where it names no path)."""
    reason = _ERRNO_TEXT.get(exc.errno or 0) or (exc.strerror or "").lower()
    if exc.filename is None or not reason:
        return reason if exc.errno is not None and reason else _first_line(exc)
    if exc.filename2 is not None:  # a rename: its target is the path the user gave
        return f"{exc.filename2}: {reason}"
    if not isinstance(exc.filename, str | bytes | os.PathLike):  # e.g. a file descriptor
        return f"{exc.filename}: {reason}"
    path = Path(os.fsdecode(exc.filename))
    if path.name.startswith(".") and not path.exists() and exc.errno in _FOLDER_ERRNOS:
        path = path.parent  # a temporary name (atomic writes) the folder refused
    return f"{path}: {reason}"


def describe(exc: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for an unexpected one (a bug)."""
    if isinstance(exc, ConfigError | DataError):
        return _worker_message(str(exc))
    for module, name, what in _LIBRARY_ERRORS:
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and isinstance(exc, kind):
            return f"{what}: {_first_line(exc)}"
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    for kind, what in _BUILTIN_ERRORS:
        if isinstance(exc, kind):
            return f"{what}: {_first_line(exc)}"
    return None


def report_bug(exc: BaseException) -> str:
    """One line for an unexpected error; its traceback goes to a new temporary file, so a bug
    in a long run can be reported without running it again."""
    text = "".join(traceback.format_exception(exc))
    try:
        fd, path = tempfile.mkstemp(prefix="ssageo-traceback-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        where = f"traceback saved to {path}"
    except OSError:
        where = "traceback not saved"
    return (f"internal error (a bug in ssageo, please report it): {type(exc).__name__}: "
            f"{_first_line(exc)} ({where}; SSAGEO_DEBUG=1 prints it)")
