"""A second readout of an SSA ablation (``ablation.py``): every finished run's last weights on
the places of another city, with a gallery five times the val split's.

The ablation's val split has about 200 places, so one query is half a point of R@1 and a run's
R@1 moves by a few points with any perturbation of its training (``vfm-l0.01`` in
benchmarks/RESULTS.md). Here each finished run (a run folder of ``--study`` with ``eval.json``)
is evaluated on the first ``--places`` x 0.8 places (the ``train`` split) of a world made by
the same generator at the same sizes from another world seed: a city none of the runs has
seen, every district type, a gallery of that many tiles. The tables are the ablation's
(mean +- std per arm, and each SSA arm minus ``none`` paired by seed, with its 95 % CI and p
values).

    python benchmarks/ablation_city.py --study /tmp/abl-x --world-seed 1 --places 1250

Writes each run's metrics to ``RUN/city<seed>.json`` (reused), ``STUDY/city<seed>.json``,
``STUDY/city<seed>.md`` and ``STUDY/city<seed>.png`` (each SSA arm minus ``none``, seed by seed,
on the val split and on the other city); the world goes to ``STUDY/worlds/city<seed>``. With
``--length L`` only the runs of ``runs/L`` (e.g. an ``ablation.py --tag`` study's ``e9-T``) are
read, and the tables go to ``STUDY/city<seed>-L.*``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

import ssageo  # noqa: F401  (before timm)
from ssageo.demo import PANO_SIZE, SAT_SIZE
from ssageo.io import atomic_write, atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import ARMS, aggregate, markdown, paired, paired_markdown  # noqa: E402


def finished_runs(study: Path, length: str = "*") -> list[dict]:
    """``{"split", "arm", "seed", "run"}`` of every evaluated run under ``study/runs``
    (``runs/<length>/<split>/<arm>/seed<N>``; only those of ``length`` when given), sorted."""
    found = []
    for evaluated in sorted(study.glob(f"runs/{length}/*/*/seed*/eval.json")):
        run = evaluated.parent
        if run.parent.name in ARMS:
            found.append({"split": run.parents[1].name, "arm": run.parent.name,
                          "seed": int(run.name.removeprefix("seed")), "run": str(run)})
    return found


def city_metrics(run: Path, world: Path, name: str) -> dict:
    """Metrics of ``run``'s last weights on ``world``'s train split (cached in
    ``run/<name>.json``), with the run's training wall time."""
    from ssageo.data import load_manifest
    from ssageo.evaluate.embed import evaluate_model
    from ssageo.model import load_model

    cached = run / f"{name}.json"
    if not cached.is_file():
        model, config = load_model(run / "checkpoints" / "last")
        config["data"]["root"] = str(world)
        metrics = evaluate_model(model.eval(), load_manifest(world, split="train"), config)
        atomic_write_text(cached, json.dumps(metrics, indent=1))
    metrics = json.loads(cached.read_text())
    timing = run / "timing.json"
    metrics["train_wall_s"] = (json.loads(timing.read_text())["train_wall_s"]
                               if timing.is_file() else float("nan"))
    return metrics


def plot_differences(readouts: dict[str, list[dict]], path: Path) -> None:
    """Each SSA arm minus ``none`` in R@1, seed by seed (dots) with the mean and its 95 % CI
    (bar), one panel per readout ({title: ``paired`` rows})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(readouts), figsize=(5.2 * len(readouts), 3.8), sharey=True)
    for ax, (title, rows) in zip(axes, readouts.items(), strict=True):
        for x, r in enumerate(rows):
            m = r["R@1"]
            ax.scatter([x + 0.12] * len(m["each"]), m["each"], s=14, color="tab:blue", alpha=0.6)
            if len(m["each"]) > 1:
                low, high = m["ci95"]
                ax.errorbar(x - 0.12, m["mean"], yerr=[[m["mean"] - low], [high - m["mean"]]],
                            fmt="o", color="black", capsize=4)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(rows)),
                      [f"{r['arm']}\n({len(r['seeds'])} seeds)" for r in rows], fontsize=8)
        ax.set_title(title, fontsize=9)
    # the seeds' own spread sets the scale (a 2-seed CI runs far off it: clipped)
    reach = max((abs(x) for rows in readouts.values() for r in rows for x in r["R@1"]["each"]),
                default=0.0) or 1.0
    axes[0].set_ylim(-1.3 * reach, 1.3 * reach)
    axes[0].set_ylabel("R@1 minus no SSA (points), paired by seed")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="an ablation.py --out folder")
    parser.add_argument("--world-seed", type=int, default=1,
                        help="seed of the other city (the ablation's worlds use 0)")
    parser.add_argument("--places", type=int, default=1250,
                        help="places of the other city; its train split (80 %%) is evaluated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--length", default=None, help="only the runs in runs/LENGTH (e.g. "
                        "e9-q48 from ablation.py --tag q48); tables to city<seed>-LENGTH.*")
    args = parser.parse_args()
    if args.world_seed == 0:
        parser.error("--world-seed 0 is the ablation's own city")
    console = Console()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    name = f"city{args.world_seed}"
    world = args.study / "worlds" / name
    if not (world / "world.json").is_file():
        from ssageo.synth import generate

        console.print(f"generating {world} ({args.places} places)", highlight=False)
        generate(world, layout="cvusa", places=args.places, seed=args.world_seed,
                 sat_size=SAT_SIZE, pano_size=PANO_SIZE, overwrite=True, progress=True)
    worlds = json.loads((args.study / "worlds.json").read_text())
    runs = finished_runs(args.study, args.length or "*")
    if not runs:
        raise SystemExit(f"{args.study}: no finished runs "
                         f"(runs/{args.length or '*'}/*/*/seed*/eval.json)")
    for i, r in enumerate(runs, 1):
        r["metrics"] = city_metrics(Path(r["run"]), world, name)
        console.print(f"{i}/{len(runs)} {r['split']} {r['arm']} seed {r['seed']}: R@1 "
                      f"{r['metrics']['R@1']:.2f} R@5 {r['metrics']['R@5']:.2f}",
                      highlight=False)
    splits = sorted({r["split"] for r in runs})
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    rows = aggregate(runs, arms, worlds, splits)
    differences = paired(runs, arms, splits)
    gallery = runs[0]["metrics"]["gallery"]
    header = (f"The ablation's runs (trained on world seed 0's {splits}) on world seed "
              f"{args.world_seed}'s train split: {gallery} queries, a gallery of {gallery}; "
              "mean ± std (ddof 1) over seeds")
    table = markdown(rows, header) + "\n" + paired_markdown(differences)
    out = name + (f"-{args.length}" if args.length else "")  # the tables' file names
    atomic_write_text(args.study / f"{out}.json", json.dumps(
        {"world": str(world), "world_seed": args.world_seed, "places": args.places,
         "runs": runs, "aggregate": rows, "paired": differences,
         "wall_s": round(time.perf_counter() - started, 1)}, indent=1))
    atomic_write_text(args.study / f"{out}.md", table)
    val = [dict(r, metrics=json.loads((Path(r["run"]) / "eval.json").read_text()))
           for r in runs]
    val_queries = val[0]["metrics"]["queries"]
    plot_differences({f"the study's val split ({val_queries} queries)":
                      paired(val, arms, splits),
                      f"world seed {args.world_seed} ({gallery} queries)": differences},
                     args.study / f"{out}.png")
    console.print(table, highlight=False)
    console.print(f"wrote {args.study}/{out}.json, {out}.md, {out}.png", highlight=False)


if __name__ == "__main__":
    main()
