"""Checkpoints and exact resume.

A checkpoint is a directory (``checkpoints/last``, ``checkpoints/best``, ``checkpoints/debug-*``):

- ``model.safetensors`` + ``config.yaml`` written by ``ssageo.model.save_model`` (loadable alone
  by ``load_model``, so ``best`` is directly usable for evaluation);
- ``training_state.pt``: optimizer state, GradScaler state (fp16 AMP), sampler state and every
  RNG state, as tensors and plain values only, read back with ``torch.load(weights_only=True)``
  (no arbitrary unpickling);
- ``progress.json``: epoch, batch within the epoch, global step, best validation score.

Directories are replaced atomically: written under a dot-prefixed temporary name, then renamed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ssageo.io import DataError, atomic_write, atomic_write_text

STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"


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
    progress: dict,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write a complete checkpoint directory atomically (replacing any previous one).

    ``scaler``'s state (loss scale and growth counter; empty when disabled) is saved with the
    optimizer's, so a resumed fp16 run scales its losses exactly as an uninterrupted one.
    """
    from ssageo.model import save_model

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_model(tmp, model, config)
        sampler = dict(sampler_state)
        if sampler.get("neighbours") is not None:
            sampler["neighbours"] = torch.from_numpy(np.asarray(sampler["neighbours"]))
        state = {"optimizer": optimizer.state_dict(), "sampler": sampler, "rng": rng_state(),
                 "scaler": {} if scaler is None else scaler.state_dict()}
        atomic_write(tmp / STATE_FILE, lambda path: torch.save(state, path))
        atomic_write_text(tmp / PROGRESS_FILE, json.dumps(progress, indent=1))
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``; a crash in between leaves ``.<name>.old`` to fall back on."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: Path) -> Path:
    """The checkpoint at ``folder``, or the previous one a crash mid-swap left behind."""
    folder = Path(folder)
    for candidate in (folder, folder.parent / f".{folder.name}.old"):
        if (candidate / PROGRESS_FILE).is_file():
            return candidate
    raise DataError(f"{folder}: no complete checkpoint here (nothing to resume from)")


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict, dict]:
    """Load weights, optimizer and (when both are there) GradScaler state in place, restore RNG
    states.

    Returns ``(sampler_state, progress)``; the sampler's neighbours come back as a NumPy array.
    """
    from safetensors.torch import load_file

    folder = find_checkpoint(folder)
    try:
        weights = load_file(str(folder / "model.safetensors"))
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        progress = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(f"{folder}: checkpoint cannot be read ({exc})") from None
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):  # empty: saved by a disabled scaler
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    sampler = dict(state["sampler"])
    if sampler.get("neighbours") is not None:
        sampler["neighbours"] = sampler["neighbours"].numpy()
    return sampler, progress
