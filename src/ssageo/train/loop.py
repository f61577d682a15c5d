"""The entry point of training (docs/METHOD.md section 5): ``train(config, out)``.

``train`` checks the config, sets up the processes (torchrun), locks the run directory and runs
a ``ssageo.train.trainer.Trainer`` in it, which writes (through ``ssageo.train.rundir``):

- ``config.yaml``: the resolved config; ``metrics.jsonl``: one record per step
  (``kind: step``: loss and each loss term by name, lr, logit_scale, pairs_per_s), per
  validation (``kind: eval``) and per skipped non-finite step (``kind: nonfinite``);
- ``checkpoints/last`` every ``train.checkpoint_every`` steps and at each epoch end,
  ``checkpoints/best`` at the best validation R@1; ``summary.json`` at the end.

Everything that decides the future (weights, optimizer, sampler position, RNG states) is in
every checkpoint, and every random choice is a function of it, so ``train(..., resume=True)``
after a crash continues from the newest of ``last`` and ``best`` exactly as an uninterrupted run
would. Only rank 0 writes, holding the run directory's lock (``ssageo.train.rundir``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ssageo.config import ConfigError
from ssageo.io import DataError
from ssageo.train import precision
from ssageo.train.distributed import fail_once, on_main, setup_distributed
from ssageo.train.rundir import open_run_dir, read_config
from ssageo.train.sampler import first_source


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient more often than allowed."""


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at a global step: linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


_FLOATS = ("lr", "weight_decay", "warmup_epochs", "clip_grad_norm", "clip_grad_value")
_INTS = ("seed", "epochs", "batch_size", "checkpoint_every", "max_nonfinite_skips",
         "max_steps_per_epoch", "grad_terms_every")


def _numbers(t: dict) -> dict:
    """The ``train`` section with its numbers as numbers: YAML reads ``1e-4`` (no dot) as a
    string, and a string learning rate must fail here, by name, not deep inside the optimizer."""
    out = dict(t)
    for keys, kind in ((_FLOATS, float), (_INTS, int)):
        for key in keys:
            if out.get(key) is None and key in ("clip_grad_norm", "clip_grad_value",
                                                "max_steps_per_epoch"):
                continue
            try:
                out[key] = kind(out[key])
            except (TypeError, ValueError):
                raise ConfigError(f"train.{key} must be a number, got {out[key]!r}") from None
    precision.amp_mode(out["amp"])  # the named choices too, before any work
    first_source(out["sampling"])
    return out


def train(config: dict | None, out: Path, resume: bool = False,
          until_epoch: int | None = None) -> dict:
    """Train per ``config`` into run directory ``out`` (or resume the run in ``out``).

    Resuming continues from the newest complete checkpoint (``last`` or ``best``), or starts
    the run over from step 0 with its saved config when it has none. The run directory is
    locked for the whole run (only one process trains into it).

    ``until_epoch`` k stops the run after its epoch k (``Trainer.fit``; resume it to go on).
    Returns the run summary (also written to ``summary.json``). Raises DataError/ConfigError
    for bad input or a run directory in use, FileExistsError for an existing run without
    ``resume``, and NonFiniteLossError when the loss or gradient is non-finite more than
    ``train.max_nonfinite_skips`` times.
    """
    out = Path(out)
    if resume:
        config = read_config(out)
    t, d = _numbers(config["train"]), config["data"]
    if d.get("root") is None:
        raise DataError("no dataset: set data.root=FOLDER (or `ssageo train --data FOLDER`)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if t["batch_size"] % world_size:
        fail_once(ConfigError(
            f"train.batch_size={t['batch_size']} (the global batch) must be divisible by the "
            f"number of processes ({world_size})"))
    if not resume:
        # Absolute, so that `--resume` and `report` read the same data from any directory.
        config = {**config, "data": {**d, "root": str(Path(d["root"]).expanduser().resolve())}}
        d = config["data"]
    dist_info = setup_distributed(t["device"])
    if not resume:  # weights that cannot be had stop the run before its directory exists
        from ssageo.model import ensure_weights

        on_main(lambda: ensure_weights(config["model"]), dist_info)
    lock = on_main(lambda: open_run_dir(out, resume), dist_info)
    try:
        from ssageo.train.trainer import Trainer  # it builds on this module's helpers

        return Trainer(config, out, resume, t, dist_info).run(until_epoch)
    finally:
        if lock is not None:
            lock.release()
