"""Embedding throughput (images/s) on CPU: memory format, grad mode, batch size and threads.

The forward pass that ``ssageo embed`` / ``ssageo eval`` run per batch (``model.embed`` in eval
mode), on in-memory random images of each view's configured size (image decoding is measured by
bench_data.py), random weights (``model.pretrained=null``: nothing is downloaded). Settings
take turns batch by batch in the same process, so machine load hits them alike; each figure is
the median batch time, and each ratio is against the baseline setting (the first row:
contiguous tensors, inference mode, 1 thread). "channels_last input" converts only the batch:
the convolutions then run channels_last without touching the model's weights.

    python benchmarks/bench_embed.py                     # paper sizes: cvusa preset, convnext_base
    python benchmarks/bench_embed.py --views reference   # the satellite view only
    python benchmarks/bench_embed.py --config synth-cpu --batch 64 --batches 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import ssageo  # noqa: F401  (before timm)
from ssageo.config import load_config
from ssageo.model import build_model

CL = torch.channels_last


def settings(batch: int) -> list[tuple[str, int, int, str, bool]]:
    """(name, batch, threads, memory format: contiguous | input | model, inference_mode)."""
    return [
        ("contiguous (baseline)", batch, 1, "contiguous", True),
        ("channels_last input", batch, 1, "input", True),
        ("channels_last model + input", batch, 1, "model", True),
        ("channels_last input, no_grad", batch, 1, "input", False),
        ("contiguous, batch 1", 1, 1, "contiguous", True),
        ("channels_last input, batch 1", 1, 1, "input", True),
        (f"channels_last input, batch {2 * batch}", 2 * batch, 1, "input", True),
        ("contiguous, 2 threads", batch, 2, "contiguous", True),
        ("channels_last input, 2 threads", batch, 2, "input", True),
    ]


def run(model: torch.nn.Module, view: str, setting, images: torch.Tensor) -> float:
    """Seconds for one batch under ``setting``."""
    _, batch, threads, fmt, inference = setting
    torch.set_num_threads(threads)
    model.to(memory_format=CL if fmt == "model" else torch.contiguous_format)
    x = images[:batch]
    x = x.contiguous(memory_format=CL) if fmt != "contiguous" else x.contiguous()
    with torch.inference_mode() if inference else torch.no_grad():
        start = time.perf_counter()
        model.embed(x, view=view)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cvusa")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2, help="timed batches per setting")
    parser.add_argument("--views", nargs="+", default=["reference", "query"],
                        choices=["reference", "query"])
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    cfg = load_config(args.config, ["model.pretrained=null", *args.overrides])
    d = cfg["data"]
    model = build_model(cfg["model"], d["reference_size"], d["query_size"]).eval()
    table = settings(args.batch)
    print(f"{cfg['model']['backbone']} (random weights), {args.batches} timed batches per "
          f"setting after one warm-up, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    for view in args.views:
        size = d[f"{view}_size"]
        images = torch.randn(max(s[1] for s in table), 3, *size)
        times: dict[str, list[float]] = {s[0]: [] for s in table}
        for i in range(args.batches + 1):  # round 0 warms each setting up
            for s in table:
                seconds = run(model, view, s, images)
                if i:
                    times[s[0]].append(seconds / s[1])
        base = 1 / statistics.median(times[table[0][0]])
        for s in table:
            rate = 1 / statistics.median(times[s[0]])
            print(f"{view} {size[0]}x{size[1]}: {s[0]:34s} {rate:7.2f} images/s  "
                  f"x{rate / base:.2f}")
        print(f"  (load average {os.getloadavg()[0]:.1f} after {view})")


if __name__ == "__main__":
    main()
