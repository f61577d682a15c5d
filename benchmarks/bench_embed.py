"""Embedding throughput (images/s) of a preset's model, contiguous vs channels_last.

The forward pass that ``ssageo embed`` / ``ssageo eval`` run per batch (``model.embed`` in eval
mode under inference mode), on in-memory random images of each view's configured size (image
decoding is measured by bench_data.py). The two memory formats alternate batch by batch in the
same process, so machine load hits both alike; the figure is the median batch time.

    python benchmarks/bench_embed.py [--config synth-cpu] [--batch 64] [--batches 8]
                                     [--threads N] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ssageo  # noqa: F401  (before timm)
from ssageo.config import load_config
from ssageo.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="synth-cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    d = cfg["data"]
    model = build_model(cfg["model"], d["reference_size"], d["query_size"]).eval()
    print(f"{cfg['model']['backbone']}, batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    for view, size in (("query", d["query_size"]), ("reference", d["reference_size"])):
        images = torch.randn(args.batch, 3, *size)
        times: dict[str, list[float]] = {name: [] for name in formats}
        with torch.inference_mode():
            for i in range(args.batches + 1):  # batch 0 of each format warms up
                for name, fmt in formats.items():
                    model.to(memory_format=fmt)
                    x = images.contiguous(memory_format=fmt)
                    start = time.perf_counter()
                    model.embed(x, view=view)
                    if i:
                        times[name].append(time.perf_counter() - start)
        rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
        print(f"{view} {size[0]}x{size[1]}: contiguous {rate['contiguous']:.1f} images/s, "
              f"channels_last {rate['channels_last']:.1f} images/s, "
              f"ratio {rate['channels_last'] / rate['contiguous']:.2f}x")


if __name__ == "__main__":
    main()
