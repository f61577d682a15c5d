"""Checkpoints and exact resume.

A checkpoint is a directory (``checkpoints/last``, ``checkpoints/best``, ``checkpoints/debug-*``):

- ``model.safetensors`` + ``config.yaml`` written by ``ssageo.model.save_model`` (loadable alone
  by ``load_model``, so ``best`` is directly usable for evaluation);
- ``training_state.pt``: optimizer state, GradScaler state (fp16 AMP), sampler state and every
  RNG state, as tensors and plain values only, read back with ``torch.load(weights_only=True)``
  (no arbitrary unpickling);
- ``progress.json``: the ``TrainState`` (epoch, batch within the epoch, global step, best
  validation score, skipped non-finite steps).

Both files carry the checkpoint ``FORMAT`` number. A checkpoint of a newer format is refused
with one line naming the file and both numbers; one without a number (written before formats
were numbered) is format 0, which holds exactly what format 1 holds.

Directories are replaced atomically: written under a dot-prefixed temporary name, then renamed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ssageo.io import (
    DataError,
    OutputError,
    atomic_write_bytes,
    atomic_write_text,
    write_error,
)

STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"
# Checkpoints a run can continue from, in order of preference at equal steps.
RESUMABLE = ("last", "best")
# The checkpoint format written here. Raise it when what a checkpoint holds changes meaning (and
# convert the older formats where they are read).
FORMAT = 1


@dataclass
class TrainState:
    """Where a run stands (``progress.json``): ``epoch`` epochs done, ``batch`` batches of the
    next one done, ``step`` global steps done, the best validation R@1 and its epoch, and the
    non-finite steps skipped so far."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_r1: float | None = None
    best_epoch: int | None = None
    nonfinite_skips: int = 0

    @classmethod
    def from_dict(cls, record: dict) -> TrainState:
        """The state of a ``progress.json`` record (its other keys, like ``format``, ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    def to_dict(self) -> dict:
        """The ``progress.json`` record: the state and the checkpoint format."""
        return {"format": FORMAT, **asdict(self)}


def _check_format(path: Path, record: dict) -> None:
    """Refuse a checkpoint file written in a newer format than this code reads (one line)."""
    found = record.get("format", 0)  # no number: written before formats were numbered
    if type(found) is not int or found < 0:
        raise DataError(f"{path}: checkpoint format must be a whole number >= 0, got {found!r}")
    if found > FORMAT:
        raise DataError(f"{path}: checkpoint format {found} is newer than this ssageo reads "
                        f"(format {FORMAT}); resume it with the ssageo version that wrote it")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) in one call.

    With ``deterministic``, cuDNN autotuning is off and cuDNN picks deterministic kernels; CPU
    kernels used in training are deterministic already.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def rng_state() -> dict:
    """Every global RNG state, as tensors and plain values (safe for ``weights_only`` loading)."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
         npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: object) -> object:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    config: dict,
    optimizer: torch.optim.Optimizer,
    sampler_state: dict,
    progress: TrainState | dict,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write a complete checkpoint directory atomically (replacing any previous one).

    ``scaler``'s state (loss scale and growth counter; empty when disabled) is saved with the
    optimizer's, so a resumed fp16 run scales its losses exactly as an uninterrupted one. A write
    that fails (disk full, read-only disk) raises DataError naming ``folder`` and the reason;
    the previous checkpoint stays as it was.
    """
    from ssageo.model import save_model

    folder = Path(folder)
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        save_model(tmp, model, config)
        sampler = dict(sampler_state)
        if sampler.get("neighbours") is not None:
            sampler["neighbours"] = torch.from_numpy(np.asarray(sampler["neighbours"]))
        state = {"format": FORMAT, "optimizer": optimizer.state_dict(), "sampler": sampler,
                 "rng": rng_state(), "scaler": {} if scaler is None else scaler.state_dict()}
        # Serialised in memory first: torch.save to a file reports a full disk as an opaque
        # RuntimeError of its zip writer, a plain write reports the OSError.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(tmp / STATE_FILE, buffer.getbuffer())
        if isinstance(progress, dict):
            progress = TrainState.from_dict(progress)
        atomic_write_text(tmp / PROGRESS_FILE, json.dumps(progress.to_dict(), indent=1))
        _replace_dir(tmp, folder)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        error = _write_failure(exc, folder, tmp)
        if error is None:
            raise
        raise error from None


def _write_failure(exc: BaseException, folder: Path, tmp: Path | None) -> OutputError | None:
    """The one-line error of a checkpoint write that the file system refused (disk full,
    read-only, ...), naming the file at its place in ``folder`` rather than in the temporary
    folder it was being written to; None for any other exception."""
    from ssageo.model.ssa import WEIGHTS_FILE

    if isinstance(exc, OutputError):  # from the atomic writes of the files inside
        text = str(exc)
    elif isinstance(exc, OSError):
        text = str(write_error(folder, exc))
    else:  # safetensors reports the OS error in its text: "... (os error 28)"
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            return None
        code = int(found.group(1))
        text = str(write_error(folder / WEIGHTS_FILE, OSError(code, os.strerror(code))))
    return OutputError(text.replace(str(tmp), str(folder)) if tmp is not None else text)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``; a crash in between leaves ``.<name>.old`` to fall back on."""
    old = _old(target)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _old(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.old"


def read_progress(folder: Path) -> TrainState:
    """``folder/progress.json`` as a TrainState; DataError naming it when malformed or of a
    newer checkpoint format."""
    path = Path(folder) / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the checkpoint's progress ({_first_line(exc)})"
                        ) from None
    if isinstance(progress, dict):
        _check_format(path, progress)
    if not isinstance(progress, dict) or not all(
            type(progress.get(k)) is int and progress[k] >= 0 for k in ("epoch", "batch", "step")):
        raise DataError(f"{path}: not a checkpoint progress record (needs epoch, batch and step "
                        "as non-negative integers)")
    return TrainState.from_dict(progress)


def tidy_checkpoints(checkpoints: Path) -> list[Path]:
    """Undo what a killed run left in ``checkpoints``: a ``.<name>.old`` whose ``<name>`` is
    missing (killed mid-swap) is renamed back, half-written temporary folders (``.last.*``,
    ``.best.*``, ``.debug-step*.*``) are deleted. Returns the deleted folders."""
    checkpoints = Path(checkpoints)
    removed: list[Path] = []
    if not checkpoints.is_dir():
        return removed
    for path in sorted(checkpoints.glob(".*.old")):
        target = path.parent / path.name[1:-len(".old")]
        if not target.exists() and (path / PROGRESS_FILE).is_file():
            os.replace(path, target)
    for path in sorted(checkpoints.iterdir()):
        if path.name.startswith(".") and path.is_dir():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint a resumed run continues from: the newest (highest step) complete one of
    ``last`` and ``best`` (``last`` on a tie), or None when there is none.

    ``debug-step*`` folders are never resumed from: they hold the state that produced a
    non-finite loss, kept for inspection, and resuming from it would only repeat the failure.
    """
    complete = [Path(checkpoints) / name for name in RESUMABLE
                if (Path(checkpoints) / name / PROGRESS_FILE).is_file()]
    if not complete:
        return None
    return max(complete, key=lambda c: read_progress(c).step)  # max keeps the first of ties


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict, TrainState]:
    """Load weights, optimizer and (when both are there) GradScaler state in place, restore RNG
    states.

    Returns ``(sampler_state, progress)``; the sampler's neighbours come back as a NumPy array.
    Raises DataError naming the file and what is wrong when a file is missing, truncated,
    not what it should be (a pickle payload in ``training_state.pt`` is refused unread:
    ``weights_only``), or holds non-finite weights.
    """
    from ssageo.model.ssa import WEIGHTS_FILE, load_weights

    folder = Path(folder)
    progress = read_progress(folder)
    load_weights(model, folder / WEIGHTS_FILE)
    path = folder / STATE_FILE
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: training state file is empty (0 bytes)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: not a training state saved by ssageo (it holds objects other "
                        "than tensors and plain values; not loaded)") from None
    except DataError:
        raise
    except Exception as exc:  # torch.load raises many types; all mean "not readable"
        raise DataError(f"{path}: cannot read the training state ({_first_line(exc)})") from None
    if isinstance(state, dict):
        _check_format(path, state)
    try:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):  # empty: saved by a disabled scaler
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        sampler = dict(state["sampler"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        raise DataError(f"{path}: not a training state for this model and optimizer "
                        f"({_first_line(exc)})") from None
    if sampler.get("neighbours") is not None:
        sampler["neighbours"] = sampler["neighbours"].numpy()
    return sampler, progress
