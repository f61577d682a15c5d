"""BEV head: peak memory and time of the lean head vs the straightforward one (Linux).

Memory: each variant runs forward + backward of the whole BEV head (polar projection,
polar -> Cartesian, decoder) in its own subprocess, twice; "growth" is the peak resident set
size of the second pass minus the RSS before it (the first pass's gradients freed). The first
pass is a warm-up: it pages in the libtorch code its kernels run (file-backed RSS, ~25 MiB
for the lean head) and builds oneDNN's kernels, which stay; neither is tensor memory. The
former figure, over both passes from the RSS before the first ("cold"), is printed beside it.
It is measured twice: with glibc's default malloc, whose heap keeps freed blocks resident
(fragmentation, so RSS overstates what the pass needs), and with glibc's mmap threshold
pinned at 1 MiB (MALLOC_MMAP_THRESHOLD_), so every tensor of 1 MiB or more is returned to the
system when freed and RSS follows the live tensor memory.
Live tensors: each variant in its own subprocess runs a warm-up pass, then one pass under
``live_tensors.LiveTensors`` (every tensor storage created in the pass counted until freed:
what a GPU's max_memory_allocated reports, the issue's definition); printed with what is alive
at the lean head's peak.
Time: one subprocess builds every variant (same weights) and runs them interleaved, a
warm-up round then ``--repeats`` rounds, so machine load hits all variants alike; it prints
the median forward+backward time. "lean, BLAS matmuls" is the lean head with the projection's
products on torch.mm instead of oneDNN, to show what the kernel choice contributes.
"lean + malloc_trim" is an experiment, not the package's code: the lean head with glibc's
``malloc_trim(0)`` called at its stage boundaries (before each full-resolution decoder part,
before the full-resolution lean layers' backward steps and before the projection's backward
pass), to measure what handing the heap's freed blocks back to the system costs in time.

    python benchmarks/bench_bev.py                       # the paper's configuration
    python benchmarks/bench_bev.py --threads 1
    python benchmarks/bench_bev.py --projection-only     # without the decoder
    python benchmarks/bench_bev.py --channels 160 --depth 16 --height 4 --width 16 --grid 16
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import peak_rss
from peak_rss import MB

PINNED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
TRIM = "lean + malloc_trim"
MEMORY_VARIANTS = ["straightforward", "lean", TRIM]
TIME_VARIANTS = ["straightforward", "lean", "lean, BLAS matmuls", TRIM]


def _build(args: argparse.Namespace, variant: str):
    """The head of ``variant`` with seed-0 weights, and a feature map that needs gradients."""
    import torch

    from ssageo.model import bev

    torch.manual_seed(0)
    head = bev.BEVHead(args.channels, args.depth, args.grid, args.classes,
                       lean=variant != "straightforward")
    if args.projection_only:  # polar projection + polar -> Cartesian, no decoder
        head.decoder = torch.nn.Identity()
    features = torch.randn(args.batch, args.channels, args.height, args.width,
                           requires_grad=True)
    return head, features


@contextlib.contextmanager
def _trimming(enabled: bool):
    """The lean head with ``malloc_trim(0)`` at its stage boundaries (the TRIM experiment)."""
    from ssageo.model import decoder, decoder_lean, polar_lean

    if not enabled:
        yield
        return
    trim = ctypes.CDLL("libc.so.6").malloc_trim

    def before(original, full_resolution_only):
        def run(first, *args):  # first: the module, or the autograd context; args[0]: input
            pixels = args[0].shape[0] * args[0].shape[-2] * args[0].shape[-1]
            if not full_resolution_only or pixels >= 1 << 17:
                trim(0)
            return original(first, *args)
        return run

    patches = [  # class, function, static, only at full resolution (>= 2^17 pixels)
        (decoder.BEVDecoder, "_lean_top", False, False),
        (polar_lean.LeanPolar, "backward", True, False),
        (decoder_lean._NormReLUConv, "backward", True, True),
    ]
    originals = [(cls, name, cls.__dict__[name]) for cls, name, _, _ in patches]
    try:
        for cls, name, static, full_resolution_only in patches:
            wrapped = before(getattr(cls, name), full_resolution_only)
            setattr(cls, name, staticmethod(wrapped) if static else wrapped)
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


def _pass(head, features, variant: str) -> float:
    """Forward + backward; returns seconds."""
    from ssageo.model import polar_lean

    head.zero_grad(set_to_none=True)
    features.grad = None
    onednn = polar_lean._HAS_ONEDNN_LINEAR
    polar_lean._HAS_ONEDNN_LINEAR = onednn and variant != "lean, BLAS matmuls"
    try:
        with _trimming(variant == TRIM):
            start = time.perf_counter()
            logits = head(features)
            logits.float().mean().backward()
            seconds = time.perf_counter() - start
    finally:
        polar_lean._HAS_ONEDNN_LINEAR = onednn
    del logits
    return seconds


def child_memory(args: argparse.Namespace) -> dict:
    head, features = _build(args, args.child_memory)
    base = peak_rss.reset_peak()
    _pass(head, features, args.child_memory)  # cold: pages in code, builds oneDNN kernels
    cold = peak_rss.peak() - base
    head.zero_grad(set_to_none=True)
    features.grad = None
    warm = peak_rss.reset_peak()  # what the first pass left behind is the second's start
    _pass(head, features, args.child_memory)
    growth = peak_rss.peak() - warm
    return {"base_mb": base / MB, "cold_mb": max(cold, warm - base + growth) / MB,
            "growth_mb": growth / MB}


def child_live(args: argparse.Namespace) -> dict:
    from live_tensors import LiveTensors

    head, features = _build(args, args.child_live)
    _pass(head, features, args.child_live)  # warm-up: oneDNN kernels, thread pools
    head.zero_grad(set_to_none=True)
    features.grad = None
    with LiveTensors() as live:
        _pass(head, features, args.child_live)
    return {"peak_mb": live.peak / MB, "at_peak": [(n / MB, op) for n, op in live.at_peak],
            "where": live.where}


def child_time(args: argparse.Namespace) -> dict:
    variants = TIME_VARIANTS[:2] if args.projection_only else TIME_VARIANTS
    built = {v: _build(args, v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.repeats + 1):
        for v in variants:
            seconds = _pass(*built[v], v)
            if round_:  # round 0 warms up (thread pools, oneDNN kernels)
                times[v].append(seconds)
    return times


def _run_child(args: argparse.Namespace, extra: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, *extra] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k not in ("child_memory", "child_time", "child_live", "projection_only", "no_time")]
    if args.projection_only:
        cmd.append("--projection-only")
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        sys.exit(f"bench_bev: the child {' '.join(extra)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--depth", type=int, default=96)
    parser.add_argument("--height", type=int, default=24)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--grid", type=int, default=48)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--projection-only", action="store_true",
                        help="leave the decoder out")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--child-memory", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-time", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-live", choices=MEMORY_VARIANTS[:2], help=argparse.SUPPRESS)
    parser.add_argument("--no-time", action="store_true", help="memory figures only")
    args = parser.parse_args()
    if args.child_live:
        print(json.dumps(child_live(args)))
        return
    if args.child_memory or args.child_time:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = child_memory(args) if args.child_memory else child_time(args)
        print(json.dumps(result))
        return
    import torch

    what = "BEV polar projection + resampling" if args.projection_only else "BEV head"
    print(f"{what}, batch {args.batch}: C={args.channels} D={args.depth} feature map "
          f"{args.height}x{args.width} -> {args.grid}x{args.grid} polar grid -> "
          f"{8 * args.grid}x{8 * args.grid} logits; forward+backward; "
          f"{args.threads or torch.get_num_threads()} torch threads")
    print("peak RSS growth (MiB) of a pass after a warm-up pass, over the RSS before it; in "
          "brackets over both passes from the RSS before the first (cold):")
    for label, env in (("glibc default malloc", None), ("mmap threshold 1 MiB", PINNED)):
        runs = {v: _run_child(args, ["--child-memory", v], env) for v in MEMORY_VARIANTS}
        growth = {v: run["growth_mb"] for v, run in runs.items()}
        cold = {v: run["cold_mb"] for v, run in runs.items()}
        base = growth["straightforward"]
        print(f"  {label:>21}: straightforward {base:6.0f} [{cold['straightforward']:.0f}]  "
              + "  ".join(f"{v} {growth[v]:6.0f} (ratio {growth[v] / base:.3f}) "
                          f"[{cold[v]:.0f}, {cold[v] / cold['straightforward']:.3f}]"
                          for v in MEMORY_VARIANTS[1:]))
    # with the threshold pinned (the loop's last run), RSS growth follows the live tensor memory
    print(f"cold (both passes, library code and first-use kernels included): lean/"
          f"straightforward {cold['lean'] / cold['straightforward']:.3f}")
    print(f"live peak lean/straightforward: {growth['lean'] / growth['straightforward']:.3f}")
    live = {v: _run_child(args, ["--child-live", v]) for v in MEMORY_VARIANTS[:2]}
    print(f"live tensors (storage tracker, one pass after a warm-up): straightforward "
          f"{live['straightforward']['peak_mb']:.0f} MB, lean {live['lean']['peak_mb']:.0f} MB, "
          f"ratio {live['lean']['peak_mb'] / live['straightforward']['peak_mb']:.3f}")
    print("  alive at the lean peak (MB, creating operator): " + ", ".join(
        f"{mb:.1f} {op}" for mb, op in live["lean"]["at_peak"]))
    print("  in: " + " < ".join(reversed(live["lean"]["where"])))
    if args.no_time:
        return
    times = _run_child(args, ["--child-time"])
    base = statistics.median(times["straightforward"])
    print(f"time, median of {args.repeats} interleaved rounds after a warm-up round:")
    for v, runs in times.items():
        med = statistics.median(runs)
        print(f"  {v:>21}: {med:6.2f} s  ratio {med / base:.3f}  "
              f"(runs: {', '.join(f'{t:.2f}' for t in runs)})")


if __name__ == "__main__":
    main()
