"""BEV head: peak memory and time of the memory-lean variants vs the straightforward head.

Variants: the straightforward head (the (B,C,D,H,W) projection), the lean projection, and the
lean projection with the recomputing decoder. Each variant runs forward + backward of the
whole BEV head (polar projection, polar -> Cartesian, decoder) in its own subprocess, so
peak RSS (``ru_maxrss``) belongs to it alone.
Prints, per variant, the peak RSS, the peak growth over the RSS before the first forward
(head weights and inputs already allocated), the median time of forward+backward, and the
ratios to the straightforward head.

    python benchmarks/bench_bev.py                       # the paper's configuration
    python benchmarks/bench_bev.py --projection-only     # without the (shared) decoder
    python benchmarks/bench_bev.py --channels 160 --depth 16 --height 4 --width 16 --grid 16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    """Current resident set size of this process (MB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


VARIANTS = {  # name: (lean projection, recomputing decoder)
    "straightforward": (False, False),
    "lean": (True, False),
    "lean+recompute": (True, True),
}


def run_one(args: argparse.Namespace, variant: str) -> dict:
    """Forward + backward of one head variant; runs inside the child process."""
    import torch

    from ssageo.model.bev import BEVHead

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lean, recompute = VARIANTS[variant]
    head = BEVHead(args.channels, args.depth, args.grid, args.classes, lean=lean,
                   recompute_decoder=recompute)
    if args.projection_only:  # polar projection + polar -> Cartesian, no decoder
        head.decoder = torch.nn.Identity()
    features = torch.randn(args.batch, args.channels, args.height, args.width,
                           requires_grad=True)
    base = _rss_mb()
    times = []
    for _ in range(args.repeats):
        head.zero_grad(set_to_none=True)
        features.grad = None
        start = time.perf_counter()
        logits = head(features)
        logits.float().mean().backward()
        times.append(time.perf_counter() - start)
        del logits
    return {"peak_mb": _peak_mb(), "base_mb": base, "growth_mb": _peak_mb() - base,
            "time_s": statistics.median(times), "times": times}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


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
                        help="leave the decoder out (it is the same in every variant)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args, args.child)))
        return
    what = "BEV polar projection + resampling" if args.projection_only else "BEV head"
    print(f"{what}, batch {args.batch}: C={args.channels} D={args.depth} feature map "
          f"{args.height}x{args.width} -> {args.grid}x{args.grid} polar grid -> "
          f"{8 * args.grid}x{8 * args.grid} logits; forward+backward, median of {args.repeats}, "
          f"{args.threads or torch_threads()} torch threads")
    results = {}
    variants = ["straightforward", "lean"] if args.projection_only else list(VARIANTS)
    for kind in variants:
        cmd = [sys.executable, __file__, "--child", kind] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "projection_only")]
        if args.projection_only:
            cmd.append("--projection-only")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[kind] = r = json.loads(out.strip().splitlines()[-1])
        print(f"  {kind:>15}: peak RSS {r['peak_mb']:6.0f} MB  growth over start "
              f"{r['growth_mb']:6.0f} MB  time {r['time_s']:6.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in r['times'])})")
    base = results["straightforward"]
    for kind in variants[1:]:
        r = results[kind]
        print(f"  {kind} / straightforward: peak RSS {r['peak_mb'] / base['peak_mb']:.3f}  "
              f"growth {r['growth_mb'] / base['growth_mb']:.3f}  "
              f"time {r['time_s'] / base['time_s']:.3f}")


if __name__ == "__main__":
    main()
