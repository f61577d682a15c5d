"""Data loading throughput: samples/s through the training transforms, 2 DataLoader workers.

    python benchmarks/bench_data.py                      # 200 places, 256 px tiles, 512x128 panos
    python benchmarks/bench_data.py --root WORLD         # an existing `ssageo synth` CVUSA world
    python benchmarks/bench_data.py --photometric        # with the real-data presets' colour ops
    python benchmarks/bench_data.py --real-sizes         # the datasets' real image sizes, 1 worker
    python benchmarks/bench_data.py --profile            # only their per-step cost table
    python benchmarks/bench_data.py --flops              # FLOPs of one paper-size training step

A CVUSA-layout world is generated at the `ssageo synth` default image sizes (256x256 tiles,
512x128 panoramas), then each configuration loads the whole training split (repeated to
``--samples``) in batches of ``--batch`` pairs resized to the synth-cpu preset's model sizes.
Baseline, in the same run: decoding the two JPEGs of each pair and nothing else, in the main
process. Ratios are against it. Last, the consumer: training steps of the synth-cpu model on
one loaded batch (pairs/s), and the ratio of the 2-worker loader's rate to it.

``--real-sizes`` (real_sizes.py): the distributed sizes and formats through the cvusa /
vigor-same presets' training transforms in one worker process, with a per-step cost table
(``--profile``: the table alone, for the library as it is); ``--flops``: what one GPU step
of the paper's model costs, to size the loader against.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ssageo.config import load_config
from ssageo.data import PairDataset, load_manifest
from ssageo.io import read_image


class _Repeat(Dataset):
    """``base`` repeated to ``n`` items, so short splits still give a steady-state timing."""

    def __init__(self, base: Dataset, n: int):
        self.base, self.n = base, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.base[i % len(self.base)]


class _DecodeOnly(Dataset):
    def __init__(self, manifest):
        self.m = manifest

    def __len__(self) -> int:
        return self.m.num_queries

    def __getitem__(self, i: int) -> int:
        read_image(self.m.query_paths[i])
        read_image(self.m.reference_paths[self.m.positive[i]])
        return i


def rate(dataset: Dataset, samples: int, batch: int, workers: int) -> float:
    """Samples per second through a DataLoader, timed after the first batch (worker start-up)."""
    loader = DataLoader(_Repeat(dataset, samples + batch), batch_size=batch, shuffle=True,
                        num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += len(b["index"]) if isinstance(b, dict) else len(b)
    return n / (time.perf_counter() - t0)


def train_step_rate(cfg: dict, batch: dict, steps: int) -> float:
    """Pairs per second consumed by forward + SSA loss + backward + AdamW on one batch, with
    the synth-cpu model (random init): the rate the loader has to keep up with."""
    from ssageo.model import build_model, ssa_loss

    model = build_model(cfg["model"], tuple(cfg["data"]["reference_size"]),
                        tuple(cfg["data"]["query_size"]))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(batch["query"], batch["reference"])
        loss = ssa_loss(out, batch.get("prior"), cfg["loss"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(batch["index"]) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="existing CVUSA-layout world (else generated)")
    ap.add_argument("--places", type=int, default=200)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--photometric", action="store_true",
                    help="add the photometric augmentations (on in the real-data presets, off in "
                         "synth-cpu)")
    ap.add_argument("--real-sizes", action="store_true",
                    help="CVUSA 750 px JPEG tiles + 1232x224 panoramas, VIGOR 640 px PNG tiles + "
                         "2048x1024 panoramas, through the cvusa / vigor-same presets")
    ap.add_argument("--profile", action="store_true",
                    help="the real sizes' per-step CPU cost table only (no worker runs)")
    ap.add_argument("--flops", action="store_true",
                    help="FLOPs of one cvusa / vigor-same training step (forward + backward)")
    args = ap.parse_args()
    if args.real_sizes or args.flops or args.profile:
        import real_sizes

        return real_sizes.main(args.real_sizes, args.flops, args.profile)
    overrides = ["data.augment.photometric=true"] if args.photometric else []
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from ssageo.synth import generate

            root = Path(tmp) / "world"
            t0 = time.perf_counter()
            generate(root, layout="cvusa", places=args.places, seed=0)
            print(f"generated {args.places} places (256 px tiles, 512x128 panoramas) in "
                  f"{time.perf_counter() - t0:.1f} s")
        manifest = load_manifest(root, split="train")
        full = load_config("synth-cpu", overrides)
        cfg = full["data"]
        print(f"train split: {manifest.num_queries} pairs -> query {cfg['query_size']}, "
              f"reference {cfg['reference_size']}, prior {'yes' if manifest.has_priors else 'no'}"
              f", photometric {'on' if cfg['augment']['photometric'] else 'off'}"
              f"; {args.samples} samples, batch {args.batch}, torch threads 1")
        runs = [
            ("decode only (baseline), main process", _DecodeOnly(manifest), 0),
            ("eval transforms, main process", PairDataset(manifest, cfg, train=False), 0),
            ("train transforms, main process", PairDataset(manifest, cfg, train=True), 0),
            ("train transforms, 2 workers", PairDataset(manifest, cfg, train=True), 2),
        ]
        base = None
        for name, ds, workers in runs:
            r = rate(ds, args.samples, args.batch, workers)
            base = base or r
            print(f"{name:40s} {r:8.1f} samples/s   x{r / base:.2f}")
        batch = next(iter(DataLoader(runs[-1][1], batch_size=args.batch)))
        torch.set_num_threads(2)
        consumed = train_step_rate(full, batch, args.steps)
        print(f"{'training step (synth-cpu model, 2 threads)':40s} {consumed:8.1f} pairs/s     "
              f"loader / consumer = {r / consumed:.2f}")


if __name__ == "__main__":
    main()
