"""The text index files of the datasets (split CSVs, VIGOR lists, tile CSVs), read strictly.

UTF-8 with or without a byte-order mark (a BOM is skipped, as pandas and Excel do); a file with
binary data, a UTF-16 encoding or bytes that are not UTF-8 is refused with one line naming the
file and line, instead of turning into paths that do not exist.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterator
from pathlib import Path

from ssageo.io import DataError


def read_lines(path: Path, what: str = "text file") -> list[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line of ``path``, line ends stripped.

    ``what`` names the file's role in errors (e.g. "CVUSA split file"). Raises DataError for
    a missing file, binary data (a NUL byte), UTF-16, or bytes that are not UTF-8.
    """
    return [(n, text) for n, _, text in iter_lines(path, what)]


def iter_lines(path: Path, what: str = "text file", offset: int = 0,
               first_line: int = 1) -> Iterator[tuple[int, int, str]]:
    """:func:`read_lines` streamed: (line number, byte offset of the line, text) of each
    non-blank line, reading from byte ``offset`` (the start of line ``first_line``), so a
    file of any size is read with bounded memory and a later read can seek to a line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} is missing")
    with path.open("rb") as f:
        f.seek(offset)
        n, where = first_line, offset
        for raw in f:
            if n == 1:
                if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    raise DataError(f"{path}: {what} is UTF-16 encoded; save it as UTF-8")
                if raw.startswith(codecs.BOM_UTF8):
                    raw, where = raw[len(codecs.BOM_UTF8):], where + len(codecs.BOM_UTF8)
            if b"\x00" in raw:
                raise DataError(f"{path}:{n}: binary data (NUL byte), not a {what}")
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{n}: byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1} is not UTF-8 text; a {what} must be a UTF-8 "
                                "text file") from None
            if text.strip():
                yield n, where, text
            n, where = n + 1, where + len(raw)


def read_csv_rows(path: Path, what: str = "CSV file") -> list[tuple[int, list[str]]]:
    """(1-based line number, fields) of every non-blank line of a comma-separated file, read
    with :func:`read_lines` (so a BOM is skipped and binary data refused); quoting as the
    ``csv`` module does, one record per line."""
    return [(n, next(csv.reader([text]))) for n, text in read_lines(path, what)]


def parse_latlon(lat: str, lon: str, where: str) -> tuple[float, float]:
    """(lat, lon) degrees from two CSV fields; DataError at ``where`` ("file:line") when they
    are not numbers or out of range."""
    try:
        values = float(lat), float(lon)
    except ValueError:
        raise DataError(f"{where}: lat/lon are not numbers: {lat!r}, {lon!r}") from None
    if not (-90 <= values[0] <= 90 and -180 <= values[1] <= 180):
        raise DataError(f"{where}: lat/lon out of range: {values[0]}, {values[1]}")
    return values
