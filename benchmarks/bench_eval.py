"""Exact R@1/5/10/1% at CVACT_test scale: time, peak memory, ratio to a bare matrix multiply.

    python benchmarks/bench_eval.py                  # 92,800 x 92,800, D = 1024, 2 threads
    python benchmarks/bench_eval.py --n 20000        # a quicker run

Queries are random unit vectors correlated with a random positive (so the recalls are neither
0 nor 100 %), references random unit vectors, all float32. The baseline is the same blockwise
``torch.mm`` (same FLOPs, same block buffer) with no ranking, timed in the same run. Peak memory
beyond the descriptors is the growth of the process's peak resident set (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs``) over its size once the descriptors exist.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import peak_rss
import torch
from peak_rss import MB

from ssageo.evaluate.metrics import rank_queries, retrieval_metrics
from ssageo.io import atomic_write_text


def unit_rows_(x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """L2-normalise rows in place, a chunk at a time (no full-size temporaries)."""
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        part.div_(part.norm(dim=1, keepdim=True))
    return x


def make_descriptors(n: int, dim: int, noise: float, seed: int):
    """(query, reference, positive): references random unit vectors; query i is its positive
    plus ``noise`` times a random unit vector, renormalised."""
    gen = torch.Generator().manual_seed(seed)
    reference = unit_rows_(torch.randn(n, dim, generator=gen))
    positive = torch.randperm(n, generator=gen)
    query = torch.empty(n, dim)
    for start in range(0, n, 8192):
        stop = min(start + 8192, n)
        noise_part = unit_rows_(torch.randn(stop - start, dim, generator=gen))
        query[start:stop] = reference[positive[start:stop]] + noise * noise_part
    return unit_rows_(query), reference, positive.numpy()


class Timer:
    """Wall-clock and process CPU seconds (all threads) of a ``with`` block.

    On a shared machine the wall clock depends on the other users' load; the CPU time mostly
    does not, so ratios are given for both.
    """

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def bare_matmul(query: torch.Tensor, reference: torch.Tensor, block: int) -> None:
    """The blockwise query x reference^T products alone (the FLOPs of the metric)."""
    buffer = torch.empty(min(block, len(query)), len(reference))
    for start in range(0, len(query), block):
        stop = min(start + block, len(query))
        torch.mm(query[start:stop], reference.T, out=buffer[: stop - start])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=92_800, help="queries = references")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--noise", type=float, default=7.0, help="query noise (sets the recalls)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", type=int, default=200, help="queries re-ranked by brute force")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    query, reference, positive = make_descriptors(args.n, args.dim, args.noise, args.seed)
    descriptors_mb = (query.numel() + reference.numel()) * 4 / MB
    flops = 2.0 * args.n * args.n * args.dim
    print(
        f"{args.n:,} x {args.n:,} descriptors, D = {args.dim}, float32 ({descriptors_mb:,.0f}"
        f" MB), block {args.block_size}, {torch.get_num_threads()} threads"
    )

    bare_matmul(query[: args.block_size], reference, args.block_size)  # warm-up
    rss = peak_rss.reset_peak()
    with Timer() as mm:
        bare_matmul(query, reference, args.block_size)
    mm_peak = (peak_rss.peak() - rss) / MB
    print(
        f"bare blockwise matmul:   wall {mm.wall:7.1f} s ({flops / mm.wall / 1e9:6.1f} GFLOP/s)"
        f", CPU {mm.cpu:7.1f} s, peak +{mm_peak:,.0f} MB"
    )

    rss = peak_rss.reset_peak()
    with Timer() as run:
        metrics = retrieval_metrics(query, reference, positive, block_size=args.block_size)
    peak = (peak_rss.peak() - rss) / MB
    print(
        f"exact retrieval_metrics: wall {run.wall:7.1f} s ({flops / run.wall / 1e9:6.1f} GFLOP/s)"
        f", CPU {run.cpu:7.1f} s, peak +{peak:,.0f} MB beyond the descriptors (target <= 2048)"
    )
    print(
        f"ratio to the bare matmul: wall {run.wall / mm.wall:.3f}x, CPU {run.cpu / mm.cpu:.3f}x"
        " (target <= 1.2x)"
    )
    print(
        "  ".join(f"{k} {metrics[k]:.2f}" for k in ("R@1", "R@5", "R@10", "R@1%"))
        + f"  (k_1% = {metrics['k_1%']})"
    )

    # spot check: a few queries ranked over the full gallery by a direct computation
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(args.n, size=min(args.check, args.n), replace=False)
    sim = query[picked] @ reference.T
    expected = (sim > sim[np.arange(len(picked)), positive[picked]][:, None]).sum(1).numpy()
    got = rank_queries(query[picked], reference, positive[picked])["rank"]
    print(
        f"brute-force spot check of {len(picked)} queries: "
        + ("ranks identical" if np.array_equal(got, expected) else "MISMATCH")
    )

    if args.json:
        figures = {
            "n": args.n,
            "dim": args.dim,
            "block_size": args.block_size,
            "threads": torch.get_num_threads(),
            "metric_wall_s": run.wall,
            "matmul_wall_s": mm.wall,
            "metric_cpu_s": run.cpu,
            "matmul_cpu_s": mm.cpu,
            "wall_ratio": run.wall / mm.wall,
            "cpu_ratio": run.cpu / mm.cpu,
            "peak_mb": peak,
            "matmul_peak_mb": mm_peak,
            "descriptors_mb": descriptors_mb,
            "metrics": metrics,
        }
        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
