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
    python benchmarks/bench_embed.py --onnx              # + the `ssageo export` ONNX encoder

``--onnx`` adds rows for the encoder as ``ssageo export`` writes it, run by onnxruntime (CPU,
1 and 2 intra-op threads), timed in the same rounds; its input is uint8 pixels, so its time
includes the normalisation the PyTorch rows are spared. On a busy machine the ratio moves with
the load (each row is a median over rounds taken turn about, which evens most of it out).
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


def onnx_runner(model: torch.nn.Module, view: str, size, threads: int):
    """A function timing one batch of uint8 pixels through the exported ONNX encoder."""
    import numpy as np
    import onnxruntime

    from ssageo.evaluate.export import PixelEncoder, _onnx_bytes

    encoder = PixelEncoder(model, view).eval()
    with torch.no_grad():
        data = _onnx_bytes(encoder, torch.zeros(2, *size, 3, dtype=torch.uint8), {})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).integers(0, 256, (256, *size, 3), dtype=np.uint8)

    def run_onnx(batch: int) -> float:
        start = time.perf_counter()
        session.run(None, {"pixels": pixels[:batch]})
        return time.perf_counter() - start

    return run_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cvusa")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2, help="timed batches per setting")
    parser.add_argument("--views", nargs="+", default=["reference", "query"],
                        choices=["reference", "query"])
    parser.add_argument("--onnx", action="store_true",
                        help="also time the exported ONNX encoder in onnxruntime")
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
        onnx = {f"onnxruntime, {t} thread{'s' * (t > 1)}": (onnx_runner(model, view, size, t), t)
                for t in (1, 2)} if args.onnx else {}
        times: dict[str, list[float]] = {s[0]: [] for s in table}
        times.update({name: [] for name in onnx})
        for i in range(args.batches + 1):  # round 0 warms each setting up
            for s in table:
                seconds = run(model, view, s, images)
                if i:
                    times[s[0]].append(seconds / s[1])
            torch.set_num_threads(1)
            for name, (run_onnx, _) in onnx.items():
                seconds = run_onnx(args.batch)
                if i:
                    times[name].append(seconds / args.batch)
        base = 1 / statistics.median(times[table[0][0]])
        for name in times:
            rate = 1 / statistics.median(times[name])
            print(f"{view} {size[0]}x{size[1]}: {name:34s} {rate:7.2f} images/s  "
                  f"x{rate / base:.2f}")
        for name, (_, threads) in onnx.items():
            torch_name = next(s[0] for s in table if s[2] == threads and s[1] == args.batch
                              and s[3] == "contiguous")
            ratio = statistics.median(times[torch_name]) / statistics.median(times[name])
            print(f"  ONNX / PyTorch ({threads} thread{'s' * (threads > 1)}, batch "
                  f"{args.batch}): x{ratio:.2f} images/s")
        print(f"  (load average {os.getloadavg()[0]:.1f} after {view})")


if __name__ == "__main__":
    main()
