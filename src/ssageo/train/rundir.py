"""The run directory of a training run: its lock, the start-of-run checks, ``metrics.jsonl``.

One process at a time owns a run directory (or a demo folder): ``lock_run_dir`` takes an OS
file lock (``flock``) on ``.lock`` inside it and writes the holder's pid there. The kernel drops
the lock when the process ends, however it ends (``kill -9`` included), so a lock is never
stale; the file itself stays, holding the pid of the last owner.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from ssageo.io import DataError, atomic_write_text
from ssageo.report.runlog import read_records
from ssageo.train.state import PROGRESS_FILE, RESUMABLE, tidy_checkpoints

LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"

# Descriptors of the locks this process holds. A forked child (a data-loader worker) would share
# them, and an flock lasts until its last descriptor is closed: a worker outliving a killed
# trainer would keep the run directory locked. Children close their copies at once.
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    """An exclusive lock on a directory, held until ``release()`` (or the end of a ``with``)."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = Path(directory)
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_dir(directory: Path) -> RunLock:
    """Create ``directory`` if needed and lock it for this process.

    Raises DataError when the directory cannot be created, or when another process holds it
    (the message gives that process's pid).
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Read-only descriptor: an open writable file would block remounting the disk
        # read-only, and flock needs no write access.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DataError(f"{directory}: run directory is not writable ({exc.strerror or exc})"
                        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text(encoding="utf-8", errors="replace").strip() or "unknown"
        raise DataError(
            f"{directory}: in use by another ssageo process (pid {holder}, lock {path}); wait "
            "for it to end or use another output folder"
        ) from None
    try:
        # Written in place, not atomically: replacing the file would give later processes a
        # new, unlocked file to lock.
        with path.open("w", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
    except OSError as exc:
        os.close(fd)
        raise DataError(f"{directory}: run directory is not writable ({exc.strerror or exc})"
                        ) from None
    _HELD.add(fd)
    return RunLock(directory, fd)


def open_run_dir(out: Path, resume: bool) -> RunLock:
    """Lock the run directory ``out`` and check it can take this run: new (or resumed),
    writable (the lock's pid was written there). On resume, what a killed run left
    half-written in ``checkpoints/`` is tidied.

    Returns the lock; raises FileExistsError for an existing run without ``resume``, DataError
    for a busy or unwritable directory.
    """
    out = Path(out)
    lock = lock_run_dir(out)
    try:
        checkpoints = out / CHECKPOINTS
        if not resume and checkpoints.exists():
            raise FileExistsError(
                f"{out}: already holds a training run; resume it with `ssageo train --resume "
                f"{out}` (it restarts from step 0 when no complete checkpoint is there) or "
                "choose another --out"
            )
        if resume:
            tidy_checkpoints(checkpoints)
    except BaseException:
        lock.release()
        raise
    return lock


def check_free_space(out: Path, checkpoint_bytes: int) -> None:
    """Fail at start, not after an hour: the disk of ``out`` must hold ``best`` and ``last``
    plus the temporary copy written while one of them is replaced (three checkpoints of
    ``checkpoint_bytes``, less those already there, plus 64 MiB for logs)."""
    out = Path(out)
    present = sum((out / CHECKPOINTS / name / PROGRESS_FILE).is_file() for name in RESUMABLE)
    need = (3 - present) * checkpoint_bytes + 64 * 2**20
    free = shutil.disk_usage(out).free
    if free < need:
        raise DataError(
            f"{out}: only {free / 2**20:.0f} MiB free on its disk; checkpoints (best, last and "
            f"the copy written while one is replaced) need about {need / 2**20:.0f} MiB"
        )


class MetricsLog:
    """``metrics.jsonl`` kept consistent with the last checkpoint: records are buffered and the
    file is rewritten atomically at each checkpoint, so a crash never leaves records of steps
    that a resumed run will redo."""

    def __init__(self, path: Path, keep_until_step: int | None = None,
                 tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.lines: list[str] = []
        self.board = None
        if tensorboard:
            try:  # optional: TensorBoard event files beside metrics.jsonl when installed
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.board = SummaryWriter(str(self.path.parent / "tensorboard"))
        if keep_until_step is not None and self.path.is_file():
            self.lines = [json.dumps(r) for _, r in read_records(self.path)
                          if r.get("step", 0) <= keep_until_step]

    def add(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        if self.board is not None:
            for key, value in record.items():
                if isinstance(value, float) and key not in ("step", "epoch"):
                    self.board.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def flush(self) -> None:
        """Rewrite the file with every record so far (OutputError naming it on failure)."""
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")
        if self.board is not None:
            self.board.flush()
