"""The run directory of a training run, written and read here and nowhere else.

A run directory holds:

- ``config.yaml``: the resolved config (``write_config`` / ``read_config``);
- ``metrics.jsonl``: one JSON record per line, written through ``MetricsLog`` and read by
  ``read_records`` / ``read_run_log``: ``kind: step`` (``step``, ``epoch``, ``loss`` and each
  loss term by name, ``lr``, ``logit_scale``, ``grad_norm``, ``pairs_per_s``[, ``grad_scale``]),
  ``kind: eval`` (a validation: ``R@1``... in percent) and ``kind: nonfinite`` (a skipped or
  fatal non-finite step);
- ``summary.json`` at the end of a run (``write_summary`` / ``read_summary``);
- ``eval.json``: held-out metrics cached by ``ssageo demo`` (``write_eval`` / ``read_eval``);
- ``checkpoints/last``, ``checkpoints/best``, ``checkpoints/debug-stepN``
  (``checkpoint_dir``; what is inside one is ``ssageo.train.state``'s);
- ``.lock``: the lock below.

One process at a time owns a run directory (or a demo folder): ``lock_run_dir`` takes an OS
file lock (``flock``) on ``.lock`` inside it and writes the holder's pid there. The kernel drops
the lock when the process ends, however it ends (``kill -9`` included), so a lock is never
stale; the file itself stays, holding the pid of the last owner.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ssageo.config import load_config, save_config
from ssageo.constants import CONFIG_FILE, EVAL_FILE, METRICS_FILE, SUMMARY_FILE
from ssageo.io import DataError, atomic_write_text
from ssageo.train.state import PROGRESS_FILE, RESUMABLE, tidy_checkpoints

LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
# Record kinds of metrics.jsonl and the RunLog list each is collected in.
RECORD_KINDS = {"step": "steps", "eval": "evals", "nonfinite": "nonfinite"}

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


def checkpoint_dir(run_dir: Path, name: str) -> Path:
    """``RUN_DIR/checkpoints/NAME`` (``last``, ``best`` or ``debug-stepN``)."""
    return Path(run_dir) / CHECKPOINTS / name


def write_config(run_dir: Path, config: dict) -> None:
    """Write the run's resolved config (atomically; OutputError naming it on failure)."""
    save_config(config, Path(run_dir) / CONFIG_FILE)


def read_config(run_dir: Path) -> dict:
    """The run's ``config.yaml``; DataError when ``run_dir`` holds no training run."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"{run_dir}: no training run here ({CONFIG_FILE} is missing)")
    return load_config(path)


@dataclass
class RunLog:
    """The records of one run in file order, each a plain dict: training ``steps``,
    ``evals`` (validations) and ``nonfinite`` (steps skipped for a non-finite loss)."""

    run_dir: Path
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    nonfinite: list[dict] = field(default_factory=list)

    def series(self, key: str, source: str = "steps") -> tuple[list[float], list[float]]:
        """(x, y) of ``key`` over the run: x is the global step (or the epoch when absent)."""
        xs, ys = [], []
        for i, rec in enumerate(getattr(self, source)):
            value = rec.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                xs.append(float(rec.get("step", rec.get("epoch", i))))
                ys.append(float(value))
        return xs, ys


def read_records(path: Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` for each record of a ``metrics.jsonl`` file.

    Raises DataError naming ``path:line`` for a line that is not JSON (or not UTF-8), not an
    object, of an unknown ``kind``, or whose ``step``/``epoch`` is not a whole number.
    """
    path = Path(path)
    records = []
    # Decoded line by line, so that an error names the line that is not text.
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number}: not UTF-8 text (is this a metrics.jsonl "
                            "file?)") from None
        if line.strip():
            records.append((number, _record(path, number, line)))
    return records


def _record(path: Path, number: int, line: str) -> dict:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {line.strip()[:80]!r}")
    kind = record.get("kind", "step")
    if not isinstance(kind, str) or kind not in RECORD_KINDS:
        raise DataError(f"{where}: unknown record kind {kind!r} "
                        f"(expected one of {', '.join(RECORD_KINDS)})")
    for key in ("step", "epoch"):
        value = record.get(key, 0)
        if type(value) is not int or value < 0:
            raise DataError(f"{where}: {key} must be a whole number >= 0, got {value!r}")
    return record


def read_run_log(run_dir: Path) -> RunLog:
    """Parse ``RUN_DIR/metrics.jsonl``; a missing file or a malformed line raises DataError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found (is {run_dir} a training run?)")
    log = RunLog(run_dir)
    for _, record in read_records(path):
        getattr(log, RECORD_KINDS[record.get("kind", "step")]).append(record)
    return log


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None when absent; DataError naming it when malformed."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


def write_summary(run_dir: Path, summary: dict) -> None:
    """Write ``RUN_DIR/summary.json`` (atomically)."""
    atomic_write_text(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=1))


def read_summary(run_dir: Path) -> dict:
    """``RUN_DIR/summary.json`` as a dict, or ``{}`` while a run has not written it yet."""
    return _read_json(Path(run_dir) / SUMMARY_FILE) or {}


def write_eval(run_dir: Path, metrics: dict) -> None:
    """Cache held-out metrics of the run in ``RUN_DIR/eval.json`` (atomically)."""
    atomic_write_text(Path(run_dir) / EVAL_FILE, json.dumps(metrics, indent=1))


def read_eval(run_dir: Path) -> dict | None:
    """The metrics cached by ``write_eval``, or None when there are none yet."""
    return _read_json(Path(run_dir) / EVAL_FILE)
