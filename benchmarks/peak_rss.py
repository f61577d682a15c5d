"""Peak resident memory of the running process (Linux /proc), for the memory benchmarks.

    rss = reset_peak()          # peak := current RSS; returns it (bytes)
    ...                         # the work measured
    growth = peak() - rss       # bytes the work added at its peak
"""

from __future__ import annotations

from pathlib import Path

MB = 1024**2


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (these benchmarks need Linux)")


def reset_peak() -> int:
    """Reset the peak RSS (``VmHWM``) to the current RSS; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS:")


def peak() -> int:
    """Peak RSS in bytes since the last :func:`reset_peak`."""
    return _status("VmHWM:")
