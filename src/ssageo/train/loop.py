"""The training loop (docs/METHOD.md section 5), in one file.

``train(config, out)`` trains an SSA model on ``data.root`` and writes the run directory:

- ``config.yaml``: the resolved config; ``metrics.jsonl``: one record per step
  (``kind: step``: loss, infonce, bev, lr, logit_scale, pairs_per_s), per validation
  (``kind: eval``) and per skipped non-finite step (``kind: nonfinite``);
- ``checkpoints/last`` every ``train.checkpoint_every`` steps and at each epoch end,
  ``checkpoints/best`` at the best validation R@1; ``summary.json`` at the end.

Everything that decides the future (weights, optimizer, sampler position, RNG states) is in
every checkpoint, and every random choice is a function of it, so ``train(..., resume=True)``
after a crash continues from the newest of ``last`` and ``best`` exactly as an uninterrupted run
would. Only rank 0 writes, holding the run directory's lock (``ssageo.train.rundir``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ssageo.config import ConfigError, load_config, save_config
from ssageo.constants import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from ssageo.data.datasets import PairDataset
from ssageo.io import DataError, atomic_write_text
from ssageo.train import precision
from ssageo.train.distributed import (
    DistInfo,
    all_true,
    cpu_threads,
    fail_once,
    on_main,
    setup_distributed,
)
from ssageo.train.rundir import CHECKPOINTS, MetricsLog, check_free_space, open_run_dir
from ssageo.train.sampler import HardNegativeSampler, epoch_neighbours, first_source
from ssageo.train.state import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)

logger = logging.getLogger(__name__)


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
         "max_steps_per_epoch")


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


def _validation_manifest(train_manifest, config: dict):
    """The val split, or None (with the reason) where the dataset has none (VIGOR)."""
    from ssageo.data.manifest import load_manifest

    if train_manifest.dataset == "vigor":
        return None, (
            "VIGOR has no separate validation split: no validation during training and no "
            "model selection; use checkpoints/last (the test split is never used for selection)"
        )
    d = config["data"]
    return load_manifest(d["root"], dataset=train_manifest.dataset, split="val"), "val split"


def train(config: dict | None, out: Path, resume: bool = False) -> dict:
    """Train per ``config`` into run directory ``out`` (or resume the run in ``out``).

    Resuming continues from the newest complete checkpoint (``last`` or ``best``), or starts
    the run over from step 0 with its saved config when it has none. The run directory is
    locked for the whole run (only one process trains into it).

    Returns the run summary (also written to ``summary.json``). Raises DataError/ConfigError
    for bad input or a run directory in use, FileExistsError for an existing run without
    ``resume``, and NonFiniteLossError when the loss or gradient is non-finite more than
    ``train.max_nonfinite_skips`` times.
    """
    out = Path(out)
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise DataError(f"{out}: no training run here ({CONFIG_FILE} is missing; nothing "
                            "to resume)")
        config = load_config(out / CONFIG_FILE)
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
        return _train(config, out, resume, t, dist_info)
    finally:
        if lock is not None:
            lock.release()


def _train(config: dict, out: Path, resume: bool, t: dict, dist_info: DistInfo) -> dict:
    """``train`` once the run directory is locked."""
    from ssageo.data.manifest import load_manifest
    from ssageo.evaluate.embed import evaluate_model
    from ssageo.model import build_model
    from ssageo.model.losses import ssa_loss

    d = config["data"]
    main, device = dist_info.is_main, dist_info.device
    log = logger.info if main else (lambda msg: None)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(t.get("threads", "auto"), int(d["workers"]),
                                          dist_info.world_size))
        log(f"CPU: {torch.get_num_threads()} torch thread(s), {d['workers']} loader worker(s)")
    seed_everything(t["seed"])

    manifest = load_manifest(d["root"], dataset=d["dataset"], split="train",
                             vigor_mode=d["vigor_mode"])
    # A resumed run's weights come from its checkpoint: model.pretrained is not read (or fetched).
    model = build_model(dict(config["model"], pretrained=None) if resume else config["model"],
                        d["reference_size"], d["query_size"],
                        config["loss"]["logit_scale_init"]).to(device)

    def prepare() -> None:
        # weights + AdamW's two moments, all of the parameters' size
        check_free_space(out, 3 * sum(p.numel() * p.element_size() for p in model.parameters()))
        if not resume:
            save_config(config, out / CONFIG_FILE)

    on_main(prepare, dist_info)
    val_manifest, val_note = _validation_manifest(manifest, config)
    log(f"validation: {val_note}")
    if t["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if t["grad_checkpointing"]:
        for encoder in model.encoders.values():
            encoder.backbone.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    s = t["sampling"]
    sampler = HardNegativeSampler(
        manifest.positive, t["batch_size"], s["neighbour_select"], s["neighbour_range"],
        t["seed"], dist_info.world_size, dist_info.rank, t["max_steps_per_epoch"],
    )
    amp_dtype = precision.autocast_dtype(t["amp"], device)
    scaler = precision.make_scaler(amp_dtype, device)
    progress = {"epoch": 0, "batch": 0, "step": 0, "best_r1": None, "best_epoch": None,
                "nonfinite_skips": 0}
    try:  # every rank reads the checkpoint; a bad one is reported once
        start = latest_checkpoint(out / CHECKPOINTS) if resume else None
        if start is not None:
            sampler_state, progress = load_checkpoint(start, model, optimizer, scaler)
            sampler.load_state_dict(sampler_state)
        metrics = MetricsLog(out / METRICS_FILE, progress["step"] if resume else None, main)
    except DataError as exc:
        fail_once(exc)
    if start is not None:
        log(f"resumed from {start} at epoch {progress['epoch'] + 1}, batch {progress['batch']}, "
            f"step {progress['step']}")
    elif resume:
        log(f"{out}: no complete checkpoint (killed before the first one was written, or only "
            "a debug checkpoint); starting the run over from step 0 with its config.yaml")
    net = DistributedDataParallel(model) if dist_info.world_size > 1 else model
    norm = model.data_config()
    # Augmentation depends only on (seed, epoch, index): each place is drawn at most once per
    # epoch, so this is independent of worker count and of where a resumed run starts.
    dataset = PairDataset(manifest, d, True, norm["mean"], norm["std"], seed=t["seed"],
                          classes=config["model"]["bev"]["classes"])
    steps_per_epoch = min(len(np.unique(manifest.positive)) // t["batch_size"],
                          t["max_steps_per_epoch"] or math.inf)
    total_steps = t["epochs"] * steps_per_epoch
    warmup_steps = max(1, round(t["warmup_epochs"] * steps_per_epoch))

    def checkpoint(folder: str) -> None:
        """Write ``checkpoints/folder`` (main process); every process learns that it worked."""
        def write() -> None:
            # The log first: a kill between the two leaves records past the checkpoint, which
            # a resumed run drops; the other order would lose the records up to it.
            metrics.flush()
            save_checkpoint(out / CHECKPOINTS / folder, model, config, optimizer,
                            sampler.state_dict(progress["batch"]), progress, scaler)

        on_main(write, dist_info)

    if start is not None and start.name != "last":
        checkpoint("last")  # resumed from `best`: it is the last state now (and may stay so)
    started = time.perf_counter()
    for epoch in range(progress["epoch"], t["epochs"]):
        if progress["batch"] == 0:
            epoch_neighbours(sampler, model, manifest, config, epoch, log)
            sampler.set_epoch(epoch)
        dataset.epoch = epoch
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=d["workers"],
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(t["seed"] * 100_003 + epoch),
        )
        net.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{t['epochs']}", disable=not main,
                   initial=progress["batch"], total=len(sampler.plan()), leave=False)
        tick = time.perf_counter()
        for batch in bar:
            lr = lr_at(progress["step"], t["lr"], warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            fmt = torch.channels_last if t["channels_last"] else torch.contiguous_format
            query = batch["query"].to(device, non_blocking=True, memory_format=fmt)
            reference = batch["reference"].to(device, non_blocking=True, memory_format=fmt)
            prior = batch["prior"].to(device) if "prior" in batch else None
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                enabled=amp_dtype is not None):
                outputs = net(query, reference)
                losses = ssa_loss(outputs, prior, config["loss"])
            optimizer.zero_grad(set_to_none=True)
            grad_norm = precision.backward(losses["loss"], model.parameters(), optimizer, scaler,
                                           t["clip_grad_norm"], t.get("clip_grad_value"))
            values = _mean_over_ranks(losses, device)
            # Under fp16 an overflowed gradient is routine: the scaler skips that update and
            # lowers its scale, as in the reference. Only a non-finite loss is a fault then.
            finite = all_true(
                all(math.isfinite(v) for v in values.values())
                and (scaler.is_enabled() or bool(torch.isfinite(grad_norm))), device,
            )
            progress["step"] += 1
            progress["batch"] += 1
            if not finite:
                _non_finite(progress, values, epoch, t, metrics, log, checkpoint)
            precision.step(optimizer, scaler, finite)
            now = time.perf_counter()
            record = {
                "kind": "step", "step": progress["step"], "epoch": epoch + 1, **values,
                "lr": lr, "logit_scale": float(outputs["logit_scale"].detach().exp()),
                "grad_norm": float(grad_norm), "pairs_per_s": t["batch_size"] / (now - tick),
            }
            if scaler.is_enabled():
                record["grad_scale"] = scaler.get_scale()
            tick = now
            metrics.add(record)
            bar.set_postfix(loss=f"{values['loss']:.3f}", bev=f"{values['bev']:.3f}",
                            lr=f"{lr:.2e}", pairs_s=f"{record['pairs_per_s']:.1f}")
            if progress["step"] % t["checkpoint_every"] == 0:
                checkpoint("last")
        bar.close()
        progress["epoch"], progress["batch"] = epoch + 1, 0
        sampler.set_epoch(epoch + 1)
        last_epoch = epoch + 1 == t["epochs"]
        if val_manifest is not None and ((epoch + 1) % config["eval"]["every"] == 0 or last_epoch):
            result = on_main(lambda: evaluate_model(model, val_manifest, config), dist_info)
            if main:
                metrics.add({"kind": "eval", "split": "val", "step": progress["step"],
                             "epoch": epoch + 1, **result})
                log(f"epoch {epoch + 1} val: " + ", ".join(
                    f"{k} {result[k]:.2f}" for k in ("R@1", "R@5", "R@10", "R@1%")))
                if progress["best_r1"] is None or result["R@1"] > progress["best_r1"]:
                    progress["best_r1"], progress["best_epoch"] = result["R@1"], epoch + 1
            # the main process decides (only it evaluated); the others follow its decision
            if all_true(progress["best_epoch"] == epoch + 1 or not main, device):
                checkpoint("best")
        checkpoint("last")

    summary = {
        "steps": progress["step"], "epochs": t["epochs"], "world_size": dist_info.world_size,
        "validation": val_note, "best_val_R@1": progress["best_r1"],
        "best_epoch": progress["best_epoch"], "nonfinite_skips": progress["nonfinite_skips"],
        "neighbours": sampler.neighbour_source,
        "train_seconds_this_session": round(time.perf_counter() - started, 2),
        "last_checkpoint": str(out / CHECKPOINTS / "last"),
        "best_checkpoint": str(out / CHECKPOINTS / "best") if progress["best_r1"] is not None
        else None,
    }
    on_main(lambda: atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1)),
            dist_info)
    return summary


def _mean_over_ranks(losses: dict, device: torch.device) -> dict[str, float]:
    """Loss terms averaged over processes (each rank holds an equal share of the batch)."""
    keys = ("loss", "infonce", "bev")
    packed = torch.stack([losses[k].detach().float() for k in keys]).to(device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(packed)
        packed /= torch.distributed.get_world_size()
    return dict(zip(keys, packed.tolist(), strict=True))


def _non_finite(progress: dict, values: dict, epoch: int, t: dict, metrics: MetricsLog, log,
                checkpoint) -> None:
    """Skip a non-finite step (logged) while the budget lasts; otherwise stop loudly."""
    losses = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    where = f"step {progress['step']} (epoch {epoch + 1}, batch {progress['batch']})"
    if progress["nonfinite_skips"] < t["max_nonfinite_skips"]:
        progress["nonfinite_skips"] += 1
        metrics.add({"kind": "nonfinite", "step": progress["step"], "epoch": epoch + 1,
                     "action": "skipped", **values})
        log(f"non-finite loss or gradient at {where}: {losses}; step skipped "
            f"({progress['nonfinite_skips']}/{t['max_nonfinite_skips']})")
        return
    metrics.add({"kind": "nonfinite", "step": progress["step"], "epoch": epoch + 1,
                 "action": "stopped", **values})
    name = f"debug-step{progress['step']}"
    checkpoint(name)
    raise NonFiniteLossError(
        f"non-finite loss or gradient at {where}: {losses}; stopped after "
        f"{progress['nonfinite_skips']} skipped step(s) (train.max_nonfinite_skips="
        f"{t['max_nonfinite_skips']}); debug checkpoint: checkpoints/{name}"
    )

