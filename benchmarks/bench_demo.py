"""Wall time and final table of ``ssageo demo`` against its budget.

Runs the demo as a user does (``python -m ssageo demo``, a real process) into a fresh folder,
times it, and prints the wall time, its ratio to the budget (target <= 1.10) and the final
table read back from ``OUT/demo.json``, as a Markdown block for ``benchmarks/RESULTS.md``.

    python benchmarks/bench_demo.py [--budget-minutes 10] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLUMNS = ("R@1", "R@5", "R@10", "R@1%", "median_error_m", "mean_error_m", "steps",
           "train_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="demo folder, emptied first [default: a new temporary folder]")
    args = parser.parse_args()
    args.out = args.out or Path(tempfile.mkdtemp(prefix="bench-demo-")) / "demo"
    if args.out.exists():
        shutil.rmtree(args.out)  # a fresh run: reused stages would not be timed
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ssageo", "demo", "--out", str(args.out),
                    "--budget-minutes", str(args.budget_minutes), "--seed", str(args.seed)],
                   check=True)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    state = json.loads((args.out / "demo.json").read_text())
    budget = args.budget_minutes * 60
    plan = state["plan"]

    print("\n## ssageo demo (`benchmarks/bench_demo.py`)\n")
    print(f"Command: `python benchmarks/bench_demo.py --budget-minutes {args.budget_minutes:g} "
          f"--seed {args.seed}`; {os.cpu_count()} CPU cores, {platform.python_version()}, "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.\n")
    print(f"- wall time {wall:.0f} s for a budget of {budget:.0f} s: "
          f"**{wall / budget:.2f}x the budget** (target <= 1.10)")
    print(f"- plan: {plan['places']} places, {plan['epochs']} epochs per model; measured step "
          f"time SSA {plan['seconds_per_step']['ssa']:.2f} s, baseline "
          f"{plan['seconds_per_step']['baseline']:.2f} s")
    print(f"- prior mIoU vs truth: {state['prior_miou']:.3f}\n")
    print("| model | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for label, metrics in state["results"].items():
        cells = [f"{metrics[c]:.2f}" if isinstance(metrics[c], float) else str(metrics[c])
                 for c in COLUMNS]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
