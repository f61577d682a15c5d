"""Synthetic world generation speed: places per second for ``ssageo synth`` at default sizes.

Baseline (same run): one render process on a quarter of the places. Then the full job with the
requested number of processes. Target (issue 2): 2,000 places at 256 px / 512x128 in <= 60 s on
2 cores. Besides wall time it reports CPU seconds (this process and its workers), which say what
the job costs when the cores are not shared with other work.

    python benchmarks/bench_synth.py [--places 2000] [--workers 2] [--layout cvusa]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ssageo.synth import generate
from ssageo.synth.places import world_for_places


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _run(root: Path, name: str, places: int, workers: int, layout: str) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), _cpu()
    summary = generate(root / name, layout=layout, places=places, seed=0, workers=workers)
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    print(f"{name:>9}: {places:5d} places, {workers} process(es): {seconds:6.1f} s wall, "
          f"{places / seconds:6.1f} places/s; {cpu:6.1f} CPU s = {1000 * cpu / places:.1f} CPU ms"
          f"/place; {summary['images_rendered']} render jobs")
    return places / seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--places", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--layout", default="cvusa", choices=["cvusa", "cvact", "vigor"])
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0, c0 = time.perf_counter(), _cpu()
        world, _ = world_for_places(args.places, 0)
        world_cpu = _cpu() - c0
        print(f"world alone: {time.perf_counter() - t0:.1f} s wall, {world_cpu:.1f} CPU s for "
              f"{world.shape[0]}x{world.shape[1]} cells (included in the full run below)")
        del world
        base, _ = _run(root, "baseline", max(args.places // 4, 8), 1, args.layout)
        full, full_cpu = _run(root, "full", args.places, args.workers, args.layout)
    print(f"full / baseline throughput: {full / base:.2f}x")
    print(f"time for {args.places} places: {args.places / full:.1f} s wall (target <= 60 s)")
    # The world is built in one process, images in `workers`: on otherwise idle cores the job
    # takes about this long.
    idle = world_cpu + (full_cpu - world_cpu) / args.workers
    print(f"on {args.workers} idle cores (from CPU time): about {idle:.1f} s")


if __name__ == "__main__":
    main()
