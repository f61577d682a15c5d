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
import torch

from ssageo.evaluate.metrics import rank_queries, retrieval_metrics
from ssageo.io import atomic_write_text

MB = 1024**2


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak RSS to the current RSS; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS:")


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


def bare_matmul(query: torch.Tensor, reference: torch.Tensor, block: int) -> float:
    """Seconds for the blockwise query x reference^T products alone (the FLOPs of the metric)."""
    buffer = torch.empty(min(block, len(query)), len(reference))
    start_time = time.perf_counter()
    for start in range(0, len(query), block):
        stop = min(start + block, len(query))
        torch.mm(query[start:stop], reference.T, out=buffer[: stop - start])
    return time.perf_counter() - start_time


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
    rss = reset_peak()
    mm_s = bare_matmul(query, reference, args.block_size)
    mm_peak = (_status("VmHWM:") - rss) / MB
    print(
        f"bare blockwise matmul: {mm_s:8.1f} s  ({flops / mm_s / 1e9:6.1f} GFLOP/s), "
        f"peak +{mm_peak:,.0f} MB"
    )

    rss = reset_peak()
    start_time = time.perf_counter()
    metrics = retrieval_metrics(query, reference, positive, block_size=args.block_size)
    metric_s = time.perf_counter() - start_time
    peak = (_status("VmHWM:") - rss) / MB
    ratio = metric_s / mm_s
    print(
        f"exact retrieval_metrics: {metric_s:6.1f} s  ({flops / metric_s / 1e9:6.1f} GFLOP/s), "
        f"peak +{peak:,.0f} MB beyond the descriptors (target <= 2048 MB)"
    )
    print(f"ratio to the bare matmul: {ratio:.3f}x (target <= 1.2x)")
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
            "metric_s": metric_s,
            "matmul_s": mm_s,
            "ratio": ratio,
            "peak_mb": peak,
            "matmul_peak_mb": mm_peak,
            "descriptors_mb": descriptors_mb,
            "metrics": metrics,
        }
        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
