"""Peak memory of one full SSA training step at the paper's sizes, without the arithmetic.

One step as ``ssageo train`` runs it (train/loop.py): forward of both views through the shared
encoder and of the BEV head under autocast, InfoNCE + 0.5 CE + 0.5 Dice, ``zero_grad`` after
the forward pass (the previous step's gradients live through it), backward, gradient-norm
clipping, AdamW step. The step runs under ``FakeTensorMode`` (shapes only, nothing is computed)
and torch's ``MemTracker`` counts every tensor storage from creation to release: parameters,
gradients, optimizer states, activations, temporaries. The model is built for real outside the
fake mode (timm cannot build inside it), then its parameters are swapped for fake ones. The
previous step's gradients and AdamW's states are made first (zero gradients, one optimizer
step), then the step is measured (the steady state). The peak is what a GPU's
``torch.cuda.max_memory_allocated`` would report, less the caching allocator's rounding and
the kernels' workspaces (cuDNN), which no tracker sees.

Mixed precision: the presets train with fp16 autocast on CUDA (``train.amp``). Fake CUDA
tensors cannot take gradients in a CPU build of torch, so the step runs CPU autocast with
float16, with CUDA's float32 policy applied to the ops of this step that CUDA autocast runs in
float32 and CPU autocast does not (softmax, log_softmax, layer_norm, group_norm; ``_fp32_ops``):
the straightforward head's (B,C,D,H,W) softmax is float32 on a GPU. The GradScaler is left out
(it multiplies the loss and unscales the gradients in place). AdamW runs its foreach
implementation, CUDA's default.

The estimator is validated (``--validate``) at a small size: the same step for real on this
CPU, RSS growth over the step with glibc's mmap threshold pinned (bench_bev.PINNED) against
the tracker's growth over the same step under fake tensors.

    python benchmarks/bench_memory.py                  # every configuration, batch search
    python benchmarks/bench_memory.py --no-search      # batch 32 lines only
    python benchmarks/bench_memory.py --validate       # estimator vs a real CPU step
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import peak_rss
import torch
import torch.nn.functional as F
from bench_bev import PINNED
from peak_rss import MB
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

GB = 1e9
SIZES = {"cvusa": ((384, 384), (140, 768)), "vigor": ((384, 384), (384, 768))}
# label: (BEV enabled, lean head, encoder activation checkpointing)
CONFIGS = {
    "straightforward": (True, False, False),
    "straightforward + encoder checkpointing": (True, False, True),
    "lean": (True, True, False),
    "lean + encoder checkpointing": (True, True, True),
    "BEV off": (False, True, False),
    "BEV off + encoder checkpointing": (False, True, True),
}
# the batch search (SSA with the lean head, and BEV off; each with and without checkpointing)
SEARCHED = ["lean", "lean + encoder checkpointing", "BEV off", "BEV off + encoder checkpointing"]
_FP32_OPS = [(F, "layer_norm"), (F, "group_norm"), (F, "softmax"), (F, "log_softmax"),
             (torch.Tensor, "softmax"), (torch.Tensor, "log_softmax")]


@contextlib.contextmanager
def _fp32_ops():
    """CUDA autocast's float32 policy for the ops CPU autocast leaves in low precision: those
    functions patched for the duration (a function mode would be off during backward, where
    activation checkpointing recomputes under autocast)."""
    def policy(func):
        def run(*args, **kwargs):
            if not torch.is_autocast_enabled("cpu") or "out" in kwargs:
                return func(*args, **kwargs)
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
            with torch.autocast("cpu", enabled=False):
                return func(*up, **kwargs)
        return run

    originals = [(owner, name, getattr(owner, name)) for owner, name in _FP32_OPS]
    try:
        for owner, name, func in originals:
            setattr(owner, name, policy(func))
        yield
    finally:
        for owner, name, func in originals:
            setattr(owner, name, func)


class _Tracker(MemTracker):
    """MemTracker keeping the global peak only. Its per-module peaks (a walk over every module
    it has seen, at every operator) take 80 % of the run time, and only the global peak is
    read here; the peak itself is computed as MemTracker computes it."""

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


def build(bev: bool, lean: bool, checkpointing: bool, sizes: tuple, depth: int, grid: int,
          backbone: str):
    """The cvusa preset's model (random weights) with the given head and sizes, and its config."""
    from ssageo.config import load_config
    from ssageo.model import build_model

    (ref, query) = sizes
    # The config's tile is the BEV grid's (a config rule); the model below is built at `ref`,
    # which --validate makes smaller than the paper's grid covers, on purpose.
    cfg = load_config("cvusa", [
        "model.pretrained=none", f"model.backbone={backbone}",
        f"model.bev.enabled={str(bev).lower()}", f"model.bev.lean={str(bool(lean)).lower()}",
        f"model.bev.depth_bins={depth}", f"model.bev.grid_size={grid}",
        f"data.reference_size=[{8 * grid},{8 * grid}]", f"data.query_size=[{query[0]},{query[1]}]",
    ])
    torch.manual_seed(0)
    model = build_model(cfg["model"], ref, query, cfg["loss"]["logit_scale_init"]).train()
    if checkpointing:  # what train.grad_checkpointing does
        for encoder in model.encoders.values():
            encoder.backbone.set_grad_checkpointing(True)
    return model.to(memory_format=torch.channels_last), cfg


def step(model, optimizer, batch: int, sizes: tuple, cfg: dict, amp: torch.dtype | None):
    """One training step in the order of train/loop.py (see the module docstring)."""
    from ssageo.model.losses import InfoNCE, dice_loss

    (ref, query), grid = sizes, 8 * model.bev.grid_size if model.bev is not None else 0
    q = torch.randn(batch, 3, *query).contiguous(memory_format=torch.channels_last)
    r = torch.randn(batch, 3, *ref).contiguous(memory_format=torch.channels_last)
    prior = torch.zeros(batch, grid, grid, dtype=torch.long)
    lc = cfg["loss"]
    with _fp32_ops():  # also over backward: checkpointing recomputes under autocast there
        with torch.autocast("cpu", dtype=amp or torch.float16, enabled=amp is not None):
            out = model(q, r)
            loss = InfoNCE(lc["label_smoothing"], lc["logit_scale_multiplier"],
                           lc["logit_scale_max"])(out["query"], out["reference"],
                                                  out["logit_scale"])
            if out["bev_logits"] is not None:  # losses.bev_loss without its data check
                logits = out["bev_logits"]
                loss = loss + lc["ssa_weight"] * (0.5 * F.cross_entropy(logits, prior)
                                                  + 0.5 * dice_loss(logits, prior))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["train"]["clip_grad_norm"])
    optimizer.step()


def _optimizer(model, cfg):
    t = cfg["train"]
    return torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"],
                             foreach=True)


def estimate(config: str, batch: int, sizes: tuple, depth: int = 96, grid: int = 48,
             backbone: str = "convnext_base.fb_in22k_ft_in1k_384",
             amp: torch.dtype | None = torch.float16) -> dict:
    """Tracker figures (bytes) of the measured step: peak total, total before it, breakdown."""
    bev, lean, checkpointing = CONFIGS[config]
    model, cfg = build(bev, lean, checkpointing, sizes, depth, grid, backbone)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        for module in model.modules():  # real parameters -> fake ones (the real ones are freed)
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(
                        fake.from_tensor(p), requires_grad=p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = fake.from_tensor(b)
        optimizer = _optimizer(model, cfg)
        for p in model.parameters():  # the previous step's gradients, and AdamW's states
            p.grad = torch.zeros_like(p)
        optimizer.step()
        tracker = _Tracker()
        tracker.track_external(model, optimizer)
        with tracker:
            before = sum(v["Total"] for v in tracker.get_tracker_snapshot("current").values())
            step(model, optimizer, batch, sizes, cfg, amp)
        peak = {k: v for snap in tracker.get_tracker_snapshot("peak").values()
                for k, v in snap.items()}
    return {"peak": peak["Total"], "before": before, "breakdown": peak}


def largest_batch(config: str, sizes: tuple, budget: float, known: dict,
                  verify: bool = True) -> int:
    """Largest batch whose estimated peak is <= budget bytes: a linear guess from the known
    estimates, then (``verify``) checked and stepped one batch at a time to the boundary."""
    def peak(b: int) -> float:
        if b not in known:
            known[b] = estimate(config, b, sizes)["peak"]
        return known[b]

    (b0, p0), (b1, p1) = sorted(known.items())[:2]
    per_sample = (p1 - p0) / (b1 - b0)
    b = max(1, int((budget - (p0 - b0 * per_sample)) // per_sample))
    print(f"  {config}, {budget / GB:.0f} GB: {(p0 - b0 * per_sample) / GB:.2f} GB + "
          f"{per_sample / GB:.3f} GB per pair -> batch {b} (linear)"
          + (", checking" if verify else ""), flush=True)
    if not verify:
        return b
    while b > 1 and peak(b) > budget:
        b -= 1
    while peak(b + 1) <= budget:
        b += 1
    return b


def child_real(args: argparse.Namespace) -> dict:
    """The validation step for real on this CPU: RSS growth over the measured step."""
    model, cfg = build(True, args.lean, False, SIZES_SMALL, args.depth, args.grid,
                       args.backbone)
    optimizer = _optimizer(model, cfg)
    amp = None if args.amp == "none" else getattr(torch, args.amp)
    step(model, optimizer, args.batch, SIZES_SMALL, cfg, amp)
    base = peak_rss.reset_peak()
    start = time.perf_counter()
    step(model, optimizer, args.batch, SIZES_SMALL, cfg, amp)
    return {"growth": peak_rss.peak() - base, "seconds": time.perf_counter() - start}


SIZES_SMALL = ((128, 128), (128, 256))  # large enough for the lean code paths


def validate(args: argparse.Namespace) -> None:
    amp = None if args.amp == "none" else getattr(torch, args.amp)
    for lean in (True, False):
        config = "lean" if lean else "straightforward"
        est = estimate(config, args.batch, SIZES_SMALL, args.depth, args.grid, args.backbone,
                       amp)
        cmd = [sys.executable, __file__, "--child-real", f"--batch={args.batch}",
               f"--depth={args.depth}", f"--grid={args.grid}", f"--backbone={args.backbone}",
               f"--amp={args.amp}", f"--lean={int(lean)}"]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **PINNED})
        if done.returncode:
            sys.exit(f"bench_memory: the real step failed:\n{done.stderr}")
        real = json.loads(done.stdout.strip().splitlines()[-1])
        growth = est["peak"] - est["before"]
        print(f"validation, {config}, {args.backbone}, batch {args.batch}, satellite "
              f"{SIZES_SMALL[0][0]}², ground {SIZES_SMALL[1][0]}x{SIZES_SMALL[1][1]}, "
              f"D={args.depth} N={args.grid}, amp {args.amp}: estimated growth "
              f"{growth / MB:.0f} MiB, measured (RSS, mmap threshold pinned) "
              f"{real['growth'] / MB:.0f} MiB, estimate/measured {growth / real['growth']:.3f} "
              f"(real step {real['seconds']:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--depth", type=int, default=96)
    parser.add_argument("--grid", type=int, default=48)
    parser.add_argument("--backbone", default="convnext_base.fb_in22k_ft_in1k_384")
    parser.add_argument("--amp", choices=["float16", "bfloat16", "none"], default="float16")
    parser.add_argument("--no-search", action="store_true", help="skip the batch search")
    parser.add_argument("--datasets", default="cvusa,vigor", help="comma-separated")
    parser.add_argument("--linear", action="store_true",
                        help="batch search: the linear fit of batch 16 and 32 only, unchecked")
    parser.add_argument("--validate", action="store_true",
                        help="compare the estimate with a real CPU step at a small size")
    parser.add_argument("--child-real", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lean", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_real:
        print(json.dumps(child_real(args)))
        return
    if args.validate:
        validate(args)
        return
    print(f"one SSA training step, {args.backbone}, BEV D={args.depth} N={args.grid} -> "
          f"{8 * args.grid}² logits, fp16 autocast (CUDA's float32 ops), AdamW (foreach); "
          "peak of parameters + gradients + AdamW states + activations (FakeTensorMode + "
          "MemTracker)")
    found: dict[str, dict[str, dict]] = {}
    sizes_of = {d: SIZES[d] for d in args.datasets.split(",")}
    for dataset, sizes in sizes_of.items():
        for config in CONFIGS:
            start = time.perf_counter()
            est = estimate(config, args.batch, sizes, args.depth, args.grid, args.backbone)
            found.setdefault(dataset, {})[config] = est
            parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in est["breakdown"].items()
                              if k != "Total" and v)
            print(f"{dataset} batch {args.batch}, {config}: {est['peak'] / GB:.2f} GB "
                  f"({parts}; {time.perf_counter() - start:.0f} s)", flush=True)
    if not args.no_search:
        for dataset, sizes in sizes_of.items():
            for config in SEARCHED:
                known = {args.batch: found[dataset][config]["peak"],
                         args.batch // 2: estimate(config, args.batch // 2, sizes)["peak"]}
                fits = {gb: largest_batch(config, sizes, gb * GB, known, not args.linear)
                        for gb in (24, 80)}
                print(f"{dataset}, {config}: largest batch in 24 GB {fits[24]}, "
                      f"in 80 GB {fits[80]}", flush=True)
    if "cvusa" not in found:
        return
    cvusa = found["cvusa"]
    print(f"cvusa batch {args.batch}: lean {cvusa['lean']['peak'] / GB:.2f} GB, "
          f"straightforward {cvusa['straightforward']['peak'] / GB:.2f} GB")


if __name__ == "__main__":
    main()
