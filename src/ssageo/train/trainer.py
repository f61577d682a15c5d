"""The Trainer: one training run (METHOD.md section 5) in named steps over a ``TrainState``.

``setup`` builds the data, model, optimizer, sampler and mixed precision; ``restore`` continues
a resumed run from its newest checkpoint; ``train_epoch`` runs ``train_step`` on each batch and
``save``s ``checkpoints/last`` every ``train.checkpoint_every`` steps; ``validate`` evaluates on
the held-out split and tells whether ``checkpoints/best`` is to be replaced; ``fit`` runs the
remaining epochs and writes the summary. ``ssageo.train.train`` builds and runs one.

Everything that decides the future (weights, optimizer, GradScaler, sampler position, RNG
states, the ``TrainState``) is in every checkpoint, and every random choice is a function of it,
so a run resumed after a crash continues exactly as an uninterrupted one would. Only the main
process writes (``on_main``); every decision that changes control flow is agreed on by all
processes (``all_true``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ssageo.data.base import Manifest, SplitUnavailable
from ssageo.data.datasets import PairDataset
from ssageo.data.transforms import to_device_normalised
from ssageo.io import DataError
from ssageo.model.losses import ssa_loss
from ssageo.train import precision
from ssageo.train.distributed import (
    DistInfo,
    all_true,
    cpu_threads,
    fail_once,
    on_main,
    setup_distributed,
)
from ssageo.train.loop import NonFiniteLossError, _numbers, lr_at
from ssageo.train.rundir import (
    CHECKPOINTS,
    METRICS_FILE,
    MetricsLog,
    check_free_space,
    checkpoint_dir,
    write_config,
    write_summary,
)
from ssageo.train.sampler import HardNegativeSampler, epoch_neighbours, plan_epoch
from ssageo.train.state import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)

logger = logging.getLogger(__name__)


class Trainer:
    """A training run into the run directory ``out``, which the caller has opened and locked
    (``ssageo.train.rundir.open_run_dir``; ``ssageo.train.train`` does all of this).

    ``config`` is the resolved config; ``settings`` its ``train`` section with the numbers
    checked (by default checked here); ``dist_info`` this process's place among the processes
    (by default set up here). Call ``run()``, or ``setup()``, ``restore()`` and ``fit()`` in
    turn; ``state`` is where the run stands.
    """

    def __init__(self, config: dict, out: Path, resume: bool = False,
                 settings: dict | None = None, dist_info: DistInfo | None = None) -> None:
        self.config, self.out, self.resume = config, Path(out), resume
        self.settings = _numbers(config["train"]) if settings is None else settings
        self.dist = dist_info or setup_distributed(self.settings["device"])
        self.state = TrainState()
        self.started_from: Path | None = None

    def log(self, message: str) -> None:
        """A progress line (main process only), logged (the CLI shows it above the bar)."""
        if self.dist.is_main:
            logger.info(message)

    def run(self, until_epoch: int | None = None) -> dict:
        """Set up, restore (when resuming) and train (see ``fit``); returns the summary."""
        self.setup()
        self.restore()
        return self.fit(until_epoch)

    # --- setup / restore / save -------------------------------------------------------------

    def setup(self) -> None:
        """Build the training data, model, optimizer, sampler and mixed precision, write the
        run's config (a new run), check the disk can take the checkpoints."""
        from ssageo.data.manifest import load_manifest
        from ssageo.model import build_model

        d, t, device = self.config["data"], self.settings, self.dist.device
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads(t.get("threads", "auto"), int(d["workers"]),
                                              self.dist.world_size))
            self.log(f"CPU: {torch.get_num_threads()} torch thread(s), {d['workers']} loader "
                     "worker(s)")
        seed_everything(t["seed"])
        self.manifest = load_manifest(d["root"], dataset=d["dataset"], split="train",
                                      vigor_mode=d["vigor_mode"])
        # A resumed run's weights come from its checkpoint: model.pretrained is not read.
        model_cfg = self.config["model"]
        self.model = build_model(dict(model_cfg, pretrained=None) if self.resume else model_cfg,
                                 d["reference_size"], d["query_size"],
                                 self.config["loss"]["logit_scale_init"]).to(device)
        self.model.set_query_fov(d["fov"])  # the BEV head's columns span data.fov degrees
        on_main(self._prepare_run_dir, self.dist)
        self.val_manifest, self.val_note = validation_manifest(self.manifest, self.config)
        self.log(f"validation: {self.val_note}")
        if t["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        if t["grad_checkpointing"]:
            for encoder in self.model.encoders.values():
                encoder.backbone.set_grad_checkpointing(True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t["lr"],
                                           weight_decay=t["weight_decay"])
        s = t["sampling"]
        self.sampler = HardNegativeSampler(
            self.manifest.positive, t["batch_size"], s["neighbour_select"], s["neighbour_range"],
            t["seed"], self.dist.world_size, self.dist.rank, t["max_steps_per_epoch"],
        )
        self.amp_dtype = precision.autocast_dtype(t["amp"], device)
        self.scaler = precision.make_scaler(self.amp_dtype, device)
        norm = self.norm = self.model.data_config()
        # Augmentation depends only on (seed, epoch, index): each place is drawn at most once
        # per epoch, so it is independent of worker count and of where a resumed run starts.
        self.dataset = PairDataset(self.manifest, d, True, norm["mean"], norm["std"],
                                   seed=t["seed"], classes=model_cfg["bev"]["classes"],
                                   normalise=False)  # uint8 from the loader: to_device_normalised
        # An epoch takes every place (query) once, in batches of distinct tiles: about Q / B
        # batches, not (distinct tiles) / B, far fewer where many queries share a tile
        # (University-1652: ~54 drone views per satellite tile); the lr schedule's length
        # counts the batches of a neighbour-free plan of the same places.
        planned = plan_epoch(self.manifest.positive, t["batch_size"], None, 0, 0,
                             np.random.default_rng([t["seed"], 0]))
        self.steps_per_epoch = min(len(planned), t["max_steps_per_epoch"] or math.inf)
        self.total_steps = t["epochs"] * self.steps_per_epoch
        self.warmup_steps = max(1, round(t["warmup_epochs"] * self.steps_per_epoch))

    def _prepare_run_dir(self) -> None:
        # weights + AdamW's two moments, all of the parameters' size
        check_free_space(self.out, 3 * sum(p.numel() * p.element_size()
                                           for p in self.model.parameters()))
        if not self.resume:
            write_config(self.out, self.config)

    def restore(self) -> None:
        """Continue from the newest complete checkpoint of a resumed run (weights, optimizer,
        scaler, sampler, RNG states, TrainState), and open the metrics log, keeping only the
        records up to that checkpoint. A resumed run without one starts over from step 0.
        Under torchrun the model is then wrapped for DistributedDataParallel."""
        start = None
        try:  # every rank reads the checkpoint; a bad one is reported once
            start = latest_checkpoint(self.out / CHECKPOINTS) if self.resume else None
            if start is not None:
                sampler_state, self.state = load_checkpoint(start, self.model, self.optimizer,
                                                            self.scaler)
                self.sampler.load_state_dict(sampler_state)
            self.metrics = MetricsLog(self.out / METRICS_FILE,
                                      self.state.step if self.resume else None,
                                      self.dist.is_main)
        except DataError as exc:
            fail_once(exc)
        self.started_from = start
        self.net = (DistributedDataParallel(self.model) if self.dist.world_size > 1
                    else self.model)
        if start is not None:
            self.log(f"resumed from {start} at epoch {self.state.epoch + 1}, batch "
                     f"{self.state.batch}, step {self.state.step}")
            if start.name != "last":
                self.save("last")  # resumed from `best`: it is the last state now
        elif self.resume:
            self.log(f"{self.out}: no complete checkpoint (killed before the first one was "
                     "written, or only a debug checkpoint); starting the run over from step 0 "
                     "with its config.yaml")

    def save(self, folder: str) -> None:
        """Write ``checkpoints/folder`` (main process); every process learns that it worked."""
        def write() -> None:
            # The log first: a kill between the two leaves records past the checkpoint, which
            # a resumed run drops; the other order would lose the records up to it.
            self.metrics.flush()
            save_checkpoint(checkpoint_dir(self.out, folder), self.model, self.config,
                            self.optimizer, self.sampler.state_dict(self.state.batch),
                            self.state, self.scaler)

        on_main(write, self.dist)

    # --- training ---------------------------------------------------------------------------

    def fit(self, until_epoch: int | None = None) -> dict:
        """Train the remaining epochs (validating and checkpointing), write ``summary.json``
        and return the summary. With ``until_epoch`` k < ``train.epochs``, stop after epoch k
        (its ``last`` checkpoint written, no summary) and return where the run stands: a
        resumed run goes on from there as if never stopped, and may then be given another
        ``train.epochs`` where its learning rate has not yet depended on it (the warm-up)."""
        t = self.settings
        started = time.perf_counter()
        end = t["epochs"] if until_epoch is None else min(t["epochs"], until_epoch)
        for epoch in range(self.state.epoch, end):
            self.train_epoch(epoch)
            self.state.epoch, self.state.batch = epoch + 1, 0
            self.sampler.set_epoch(epoch + 1)
            last_epoch = epoch + 1 == t["epochs"]
            every = self.config["eval"]["every"]
            if self.val_manifest is not None and ((epoch + 1) % every == 0 or last_epoch):
                if self.validate(epoch):
                    self.save("best")
            self.save("last")
        if self.state.epoch < t["epochs"]:
            return {"steps": self.state.step, "epochs_done": self.state.epoch,
                    "epochs": t["epochs"], "stopped": True}
        best = self.state.best_r1 is not None
        summary = {
            "steps": self.state.step, "epochs": t["epochs"], "world_size": self.dist.world_size,
            "validation": self.val_note, "best_val_R@1": self.state.best_r1,
            "best_epoch": self.state.best_epoch, "nonfinite_skips": self.state.nonfinite_skips,
            "neighbours": self.sampler.neighbour_source,
            "train_seconds_this_session": round(time.perf_counter() - started, 2),
            "last_checkpoint": str(checkpoint_dir(self.out, "last")),
            "best_checkpoint": str(checkpoint_dir(self.out, "best")) if best else None,
        }
        on_main(lambda: write_summary(self.out, summary), self.dist)
        return summary

    def train_epoch(self, epoch: int) -> None:
        """The rest of epoch ``epoch`` (0-based): a ``train_step`` per batch, each logged."""
        t, d, device = self.settings, self.config["data"], self.dist.device
        if self.state.batch == 0:
            epoch_neighbours(self.sampler, self.model, self.manifest, self.config, epoch,
                             self.log)
            self.sampler.set_epoch(epoch)
        self.dataset.epoch = epoch
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.dataset.batches(self.sampler),
            num_workers=d["workers"], pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(t["seed"] * 100_003 + epoch),
        )
        self.net.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{t['epochs']}",
                   disable=not self.dist.is_main, initial=self.state.batch,
                   total=len(self.sampler.plan()), leave=False)
        tick = time.perf_counter()
        for batch in bar:
            record, losses = self.train_step(batch, epoch)
            now = time.perf_counter()
            record["pairs_per_s"] = t["batch_size"] / (now - tick)
            tick = now
            self.metrics.add(record)
            bar.set_postfix(**{k: f"{record[k]:.3f}" for k in losses}, lr=f"{record['lr']:.2e}",
                            pairs_s=f"{record['pairs_per_s']:.1f}")
            if self.state.step % t["checkpoint_every"] == 0:
                self.save("last")
        bar.close()

    def train_step(self, batch: dict, epoch: int) -> tuple[dict, tuple[str, ...]]:
        """One optimisation step on ``batch``: forward, the objective's terms, backward with
        clipping, the update (skipped when non-finite). Returns the step's ``metrics.jsonl``
        record (without its speed) and the names of its loss values (total, then terms)."""
        t, device = self.settings, self.dist.device
        lr = lr_at(self.state.step, t["lr"], self.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        fmt = torch.channels_last if t["channels_last"] else torch.contiguous_format
        batch = to_device_normalised(batch, device, self.norm["mean"], self.norm["std"], fmt)
        query, reference, prior = batch["query"], batch["reference"], batch.get("prior")
        fov = {"fov": float(batch["fov"][0])} if "fov" in batch else {}  # data.fov_min
        if fov:  # the BEV head's polar grid spans this batch's FoV
            self.model.set_query_fov(fov["fov"])
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            outputs = self.net(query, reference)
            losses = ssa_loss(outputs, prior, self.config["loss"])
        every = int(t.get("grad_terms_every") or 0)
        terms = {k: v for k, v in losses.items() if k != "loss"}
        diagnostics = (precision.term_gradients(terms, list(self.model.encoder("query")
                                                            .parameters()), self.scaler)
                       if every and (self.state.step + 1) % every == 0 else {})
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = precision.backward(losses["loss"], self.model.parameters(), self.optimizer,
                                       self.scaler, t["clip_grad_norm"], t.get("clip_grad_value"))
        values = _mean_over_ranks(losses, device)
        # Under fp16 an overflowed gradient is routine: the scaler skips that update and
        # lowers its scale, as in the reference. Only a non-finite loss is a fault then.
        finite = all_true(
            all(math.isfinite(v) for v in values.values())
            and (self.scaler.is_enabled() or bool(torch.isfinite(grad_norm))), device,
        )
        self.state.step += 1
        self.state.batch += 1
        if not finite:
            self._non_finite(values, epoch)
        precision.step(self.optimizer, self.scaler, finite)
        record = {
            "kind": "step", "step": self.state.step, "epoch": epoch + 1, **values, "lr": lr,
            "logit_scale": float(outputs["logit_scale"].detach().exp()),
            "grad_norm": float(grad_norm), **diagnostics, **fov,
        }
        if self.scaler.is_enabled():
            record["grad_scale"] = self.scaler.get_scale()
        return record, tuple(values)

    def _non_finite(self, values: dict, epoch: int) -> None:
        """Skip a non-finite step (logged) while the budget lasts; otherwise stop loudly."""
        state, budget = self.state, self.settings["max_nonfinite_skips"]
        losses = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        where = f"step {state.step} (epoch {epoch + 1}, batch {state.batch})"
        if state.nonfinite_skips < budget:
            state.nonfinite_skips += 1
            self.metrics.add({"kind": "nonfinite", "step": state.step, "epoch": epoch + 1,
                              "action": "skipped", **values})
            self.log(f"non-finite loss or gradient at {where}: {losses}; step skipped "
                     f"({state.nonfinite_skips}/{budget})")
            return
        self.metrics.add({"kind": "nonfinite", "step": state.step, "epoch": epoch + 1,
                          "action": "stopped", **values})
        name = f"debug-step{state.step}"
        self.save(name)
        raise NonFiniteLossError(
            f"non-finite loss or gradient at {where}: {losses}; stopped after "
            f"{state.nonfinite_skips} skipped step(s) (train.max_nonfinite_skips={budget}); "
            f"debug checkpoint: checkpoints/{name}"
        )

    def validate(self, epoch: int) -> bool:
        """Evaluate on the validation split (main process), log it, and tell every process
        whether this epoch is the best so far (``checkpoints/best`` is then replaced)."""
        from ssageo.evaluate.embed import evaluate_model

        main = self.dist.is_main
        result = on_main(lambda: evaluate_model(self.model, self.val_manifest, self.config),
                         self.dist)
        if main:
            self.metrics.add({"kind": "eval", "split": "val", "step": self.state.step,
                              "epoch": epoch + 1, **result})
            self.log(f"epoch {epoch + 1} val: " + ", ".join(
                f"{k} {result[k]:.2f}" for k in ("R@1", "R@5", "R@10", "R@1%")))
            if self.state.best_r1 is None or result["R@1"] > self.state.best_r1:
                self.state.best_r1, self.state.best_epoch = result["R@1"], epoch + 1
        # the main process decides (only it evaluated); the others follow its decision
        return all_true(self.state.best_epoch == epoch + 1 or not main, self.dist.device)


def _mean_over_ranks(losses: dict, device: torch.device) -> dict[str, float]:
    """Loss values averaged over processes (each rank holds an equal share of the batch)."""
    keys = tuple(losses)
    packed = torch.stack([losses[k].detach().float() for k in keys]).to(device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(packed)
        packed /= torch.distributed.get_world_size()
    return dict(zip(keys, packed.tolist(), strict=True))


def validation_manifest(train_manifest: Manifest,
                        config: dict) -> tuple[Manifest | None, str]:
    """The dataset spec's validation split, or None (with the reason) where it has none."""
    from ssageo.data.manifest import load_manifest
    from ssageo.data.registry import get_spec

    spec = get_spec(train_manifest.dataset)
    if spec.validation is None:
        return None, spec.no_validation
    d = config["data"]
    try:
        return load_manifest(d["root"], dataset=train_manifest.dataset,
                             split=spec.validation), f"{spec.validation} split"
    except SplitUnavailable as exc:  # e.g. a pairs CSV without val rows
        return None, f"{exc}: no validation during training; use checkpoints/last"
