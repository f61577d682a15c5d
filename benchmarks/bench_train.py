"""Training throughput (pairs/s) of the synth-cpu preset against the straightforward formulation
of the same model (naive BEV projection, no channels_last), measured in the same run; the lean
projection with and without channels_last are shown too, to separate the two options, and the
model without its BEV head: the step time no formulation of the head can go below, so
naive / no-BEV is the largest speed-up any BEV formulation could give.

One training step = forward of both views + BEV head, SSA loss, backward, gradient clipping and
an AdamW update, on an in-memory batch of real generated pairs (data loading excluded; it is
measured by bench_data.py). The two variants alternate step by step so that machine load hits
both alike; the reported figure is the median step time.

    python benchmarks/bench_train.py [--steps 8] [--batch 16] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ssageo  # noqa: F401  (before timm)
from ssageo.config import load_config
from ssageo.data.datasets import PairDataset
from ssageo.data.manifest import load_manifest
from ssageo.model import build_model, ssa_loss
from ssageo.synth import generate
from ssageo.train import seed_everything


def make_batch(root: Path, config: dict, batch: int) -> dict:
    """A real augmented batch of ``batch`` generated pairs."""
    manifest = load_manifest(root, split="train")
    dataset = PairDataset(manifest, config["data"], train=True)
    samples = [dataset[i] for i in range(batch)]
    return {k: torch.stack([s[k] for s in samples]) for k in ("query", "reference", "prior")}


def variant(lean: bool, channels_last: bool, bev: bool = True):
    """A model + optimizer + one-step closure for one formulation."""
    seed_everything(0)
    cfg = load_config("synth-cpu", [f"model.bev.lean={str(lean).lower()}",
                                    f"model.bev.enabled={str(bev).lower()}"])
    d = cfg["data"]
    model = build_model(cfg["model"], d["reference_size"], d["query_size"])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict) -> float:
        query = batch["query"].contiguous(memory_format=fmt)
        reference = batch["reference"].contiguous(memory_format=fmt)
        start = time.perf_counter()
        losses = ssa_loss(model(query, reference), batch["prior"], cfg["loss"])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        optimizer.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step (synth-cpu: 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config("synth-cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        generate(root, layout="cvusa", places=max(40, 2 * args.batch), seed=0, sat_size=64,
                 pano_size=(256, 64))
        batch = make_batch(root, config, args.batch)
    preset = load_config("synth-cpu")
    steps = {
        "synth-cpu": variant(preset["model"]["bev"]["lean"], preset["train"]["channels_last"]),
        "lean+cl": variant(lean=True, channels_last=True),
        "lean": variant(lean=True, channels_last=False),
        "naive": variant(lean=False, channels_last=False),
        "no BEV head": variant(lean=True, channels_last=True, bev=False),
    }
    for _ in range(2):  # warm-up: allocator, kernels
        for step in steps.values():
            step(batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(step(batch))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.steps} timed steps per variant (median)")
    rate = {}
    for name, ts in times.items():
        rate[name] = args.batch / statistics.median(ts)
        print(f"  {name:11s} {rate[name]:7.2f} pairs/s  (median step {statistics.median(ts):.3f} s,"
              f" min {min(ts):.3f} s)")
    for name in ("synth-cpu", "lean+cl", "lean"):
        print(f"  ratio {name} / naive: {rate[name] / rate['naive']:.2f}x")
    print(f"  bound: no BEV head / naive: {rate['no BEV head'] / rate['naive']:.2f}x (the most "
          "any BEV head formulation could give)")


if __name__ == "__main__":
    main()
