"""The SSA ablation on the synthetic benchmark: does the BEV auxiliary loss improve retrieval,
and how does that depend on the quality of the prior labels?

Fixed benchmark: CVUSA layout, world seed 0, ``--places`` places (80 % train / 20 % val),
rendered at the demo's sizes (``ssageo.demo.SAT_SIZE`` tiles, ``PANO_SIZE`` panoramas), one
world per split (same-area, cross-area). Every run trains in the demo's regime
(``ssageo.demo.demo_config``: its preset, overrides and one loader worker; similarity
neighbours and validation every ceil(epochs / 3) epochs, as the demo's plan sets them). The
worlds are fixed; the seeds vary model initialisation, batch sampling and augmentation.

Arms (equal compute: every run trains the same ``--epochs`` whole epochs, or ``--steps`` steps
of each when given):

- ``none``      InfoNCE only (``model.bev.enabled=false``);
- ``oracle``    SSA with the true prior labels, lambda 1;
- ``vfm``       SSA with oracle labels corrupted like a VFM (``ssageo.demo.VFM_LIKE``), lambda 1;
- ``vfm-l0.1``  the same priors, lambda 0.1;
- ``vfm-l0.3``, ``vfm-l3`` (only with ``--arms``) the same priors, lambda 0.3 and 3 (a sweep);
- ``vfm-l0.01`` (only with ``--arms``) lambda 0.01: a control, the BEV gradient a few hundredths
  of a percent of InfoNCE's on the trunk, so its difference from ``none`` measures how far a
  tiny perturbation moves a run, not what SSA adds;
- ``heavy``     (only with ``--arms``) SSA with heavily corrupted labels, lambda 1.

Each prior variant lives in its own world folder (hard links to the images, its own labels)
and its mIoU against the truth is recorded. The val split is the reported split, so nothing is
selected on it: the ``checkpoints/last`` weights are evaluated. Finished runs (``eval.json``)
are reused; a half-finished run is resumed with ``--resume``, otherwise redone.

    python benchmarks/ablation.py --out /tmp/ablation --epochs 9
    python benchmarks/ablation.py --out /tmp/abl-smoke --places 100 --epochs 1 --steps 3 --seeds 0

Writes ``OUT/results.json``, ``OUT/ablation.md`` (mean +- std per arm, and each SSA arm's
difference from ``none`` paired by seed, with its 95 % CI and p values) and
``OUT/r1_vs_miou.png`` (``--set`` overrides with ``--tag T``: ``results-T.json`` etc., its runs
in ``runs/e<epochs>-T``). ``ablation_city.py`` reads the same runs out on another city's 1,000
places.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import ssageo  # noqa: F401  (before timm)
from ssageo.demo import PANO_SIZE, SAT_SIZE, VFM_LIKE, demo_config, third
from ssageo.io import atomic_write, atomic_write_text

SPLITS = ("same-area", "cross-area")
HEAVY = {"erode": 2, "drop": 0.4, "false_positives": 0.8}
# arm -> (prior variant or None, BEV loss weight or None for no BEV head)
ARMS = {"none": (None, None), "oracle": ("oracle", 1.0), "vfm": ("vfm", 1.0),
        "vfm-l0.1": ("vfm", 0.1), "vfm-l0.3": ("vfm", 0.3), "vfm-l3": ("vfm", 3.0),
        "vfm-l0.01": ("vfm", 0.01),
        "heavy": ("heavy", 1.0)}
MARKERS = {0.01: "v", 0.1: "s", 0.3: "^", 1.0: "o", 3.0: "D"}  # by lambda
DEFAULT_ARMS = ("none", "oracle", "vfm", "vfm-l0.1")
CORRUPTIONS = {"oracle": {}, "vfm": VFM_LIKE, "heavy": HEAVY}
METRICS = ("R@1", "R@5", "R@10", "R@1%", "median_error_m")
WORLD_SEED = 0


def make_worlds(out: Path, places: int, variants: set[str], console: Console,
                splits: list[str]) -> dict:
    """Generate each split's world once and a hard-linked copy per prior variant with its own
    labels; returns ``{split: {"base": path, variant: {"root", "miou"}}}`` (cached on disk)."""
    from ssageo.priors.oracle import Corruption, OracleBackend
    from ssageo.priors.run import list_tiles, run_priors
    from ssageo.synth import generate

    state_file = out / "worlds.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state and state.get("places") != places:
        raise FileExistsError(f"{out}: worlds were made with {state.get('places')} places; "
                              "use another --out for other sizes")
    state["places"] = places
    for split in splits:
        entry = state.setdefault(split, {})
        base = out / "worlds" / split / "base"
        if "base" not in entry:
            console.print(f"generating the {split} world ({places} places)", highlight=False)
            generate(base, layout="cvusa", places=places, seed=WORLD_SEED, sat_size=SAT_SIZE,
                     pano_size=PANO_SIZE, split=split, overwrite=True)
            entry["base"] = str(base)
            atomic_write_text(state_file, json.dumps(state, indent=1))
        for variant in sorted(variants - set(entry)):
            root = out / "worlds" / split / variant
            if root.exists():
                shutil.rmtree(root)  # a copy whose labels were never recorded
            # hard links: the images are shared; run_priors replaces labels by rename
            shutil.copytree(base, root, copy_function=os.link,
                            ignore=shutil.ignore_patterns(".*"))
            backend = OracleBackend(root, Corruption(**CORRUPTIONS[variant]), seed=WORLD_SEED)
            result = run_priors(list_tiles(root), backend, force=True, progress=False)
            if not result.ok:
                raise RuntimeError(f"{root}: prior labels failed, e.g. {result.failed[0]}")
            entry[variant] = {"root": str(root), "miou": result.statistics["miou"],
                              "corruption": CORRUPTIONS[variant]}
            console.print(f"{split} {variant} priors: mIoU {entry[variant]['miou']:.3f}",
                          highlight=False)
            atomic_write_text(state_file, json.dumps(state, indent=1))
    return state


def run_config(root: str, arm: str, seed: int, epochs: int, steps: int | None,
               threads: int, grad_every: int = 0, more: list[str] | None = None) -> dict:
    """One run's config: the demo's (``demo_config``) with the plan's per-epoch settings for
    ``epochs`` epochs, ``threads`` torch threads, the arm's BEV head and loss weight, the
    loss terms' gradients logged every ``grad_every`` steps (0: not; same trajectory), then
    the study's own overrides ``more`` (``--set``)."""
    _, weight = ARMS[arm]
    every = third(epochs)
    extra = [f"train.epochs={epochs}", f"train.threads={threads}", f"eval.every={every}",
             f"train.sampling.similarity_every={every}", f"train.grad_terms_every={grad_every}"]
    extra += [f"train.max_steps_per_epoch={steps}"] if steps else []
    extra += [f"loss.ssa_weight={weight}"] if weight is not None else []
    return demo_config(Path(root), seed, weight is not None, extra + (more or []))


def worker(run: Path) -> None:
    """Train (or resume) the run described by ``run/job.json``, then evaluate its last weights
    (``ssageo.demo.evaluate_run`` writes ``eval.json``); the training wall time goes to
    ``timing.json`` (summed over sessions of a resumed run)."""
    from ssageo.demo import evaluate_run
    from ssageo.train import train

    job = json.loads((run / "job.json").read_text())
    timing_file = run / "timing.json"
    if not (run / "summary.json").is_file():
        before = json.loads(timing_file.read_text())["train_wall_s"] if timing_file.is_file() \
            else 0.0
        start = time.perf_counter()
        if job["resume"]:
            train(None, run, resume=True)
        else:
            train(job["config"], run)
        wall = before + time.perf_counter() - start
        atomic_write_text(timing_file, json.dumps({"train_wall_s": round(wall, 1)}))
    evaluate_run(run)


def launch(run: Path, config: dict, resume: bool) -> dict:
    """Run one training + evaluation in a subprocess (its log in ``run/log.txt``)."""
    evaluated = run / "eval.json"
    if not evaluated.is_file():
        half = (run / "checkpoints" / "last").is_dir() and not (run / "summary.json").is_file()
        if run.exists() and not (resume and half) and not (run / "summary.json").is_file():
            shutil.rmtree(run)  # a half-finished run is redone unless --resume
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "job.json", json.dumps(
            {"config": config, "resume": resume and half}, indent=1))
        threads = str(config["train"]["threads"])
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        with open(run / "log.txt", "a") as log:  # a log, not a result: appended as it goes
            command = [sys.executable, __file__, "--out", str(run), "--worker", str(run)]
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"{run}: run failed (exit {done.returncode}), see {run}/log.txt")
    metrics = json.loads(evaluated.read_text())
    metrics.update(json.loads((run / "timing.json").read_text()))
    return metrics


def aggregate(runs: list[dict], arms: list[str], worlds: dict,
              splits: list[str]) -> list[dict]:
    """Mean and sample standard deviation (ddof 1) over seeds per arm and split."""
    rows = []
    for split in splits:
        for arm in arms:
            group = [r for r in runs if r["arm"] == arm and r["split"] == split]
            variant = ARMS[arm][0]
            row = {"arm": arm, "split": split, "seeds": len(group),
                   "miou": worlds[split][variant]["miou"] if variant else None}
            for key in (*METRICS, "train_wall_s"):
                values = np.array([r["metrics"][key] for r in group], dtype=float)
                row[key] = {"mean": float(values.mean()),
                            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
            rows.append(row)
    return rows


def paired(runs: list[dict], arms: list[str], splits: list[str]) -> list[dict]:
    """Each SSA arm minus ``none`` in R@1 and R@5, seed by seed (same seed: same initial
    weights of the shared parts, same first batches): mean, std (ddof 1), and the differences."""
    rows = []
    by = {(r["split"], r["arm"], r["seed"]): r["metrics"] for r in runs}
    for split in splits:
        for arm in (a for a in arms if a != "none"):
            seeds = sorted(s for (sp, a, s) in by if sp == split and a == arm
                           and (split, "none", s) in by)
            row = {"split": split, "arm": arm, "seeds": seeds}
            for key in ("R@1", "R@5"):
                d = np.array([by[split, arm, s][key] - by[split, "none", s][key]
                              for s in seeds], dtype=float)
                row[key] = {"mean": float(d.mean()) if len(d) else float("nan"),
                            "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                            "each": [round(float(x), 2) for x in d], **significance(d)}
            rows.append(row)
    return rows


def significance(d: np.ndarray) -> dict:
    """For paired differences ``d``: the 95 % confidence interval of their mean (Student's t),
    the paired t-test's two-sided p and the exact sign test's (ties left out); NaN with fewer
    than two seeds."""
    from scipy import stats

    nan = {"ci95": [float("nan")] * 2, "p_t": float("nan"), "p_sign": float("nan")}
    if len(d) < 2:
        return nan
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    signs = d[d != 0]
    return {"ci95": [float(d.mean()) - half, float(d.mean()) + half],
            "p_t": float(stats.ttest_1samp(d, 0.0).pvalue) if d.std() > 0 else float("nan"),
            "p_sign": float(stats.binomtest(int((signs > 0).sum()), len(signs)).pvalue)
            if len(signs) else 1.0}


def paired_markdown(rows: list[dict]) -> str:
    """The paired differences: SSA arm minus no SSA, per split."""
    lines = ["| split | arm - none | seeds | R@1 difference | 95 % CI | p (t, sign) | each seed "
             "| R@5 difference | 95 % CI | p (t, sign) |", "|---" * 10 + "|"]

    def cells(m: dict) -> str:
        if len(m["each"]) < 2:  # one seed: no spread
            return f"{m['mean']:+.2f} | - | -"
        low, high = m["ci95"]
        return (f"{m['mean']:+.2f} ± {m['std']:.2f} | {low:+.2f} .. {high:+.2f} | "
                f"{m['p_t']:.2f}, {m['p_sign']:.2f}")

    for r in rows:
        lines.append(f"| {r['split']} | {r['arm']} | {len(r['seeds'])} | {cells(r['R@1'])} | "
                     + ", ".join(f"{x:+.1f}" for x in r["R@1"]["each"])
                     + f" | {cells(r['R@5'])} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], header: str) -> str:
    """The ablation table: arm x split, mean +- std over seeds."""
    lines = [header, "", "| split | arm | prior mIoU | seeds | R@1 | R@5 | R@10 | R@1% | "
             "median error (m) | train wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]['mean']:.2f} ± {r[k]['std']:.2f}" for k in METRICS[:4]]
        cells.append(f"{r['median_error_m']['mean']:.0f} ± {r['median_error_m']['std']:.0f}")
        miou = "-" if r["miou"] is None else f"{r['miou']:.3f}"
        lines.append(f"| {r['split']} | {r['arm']} | {miou} | {r['seeds']} | "
                     + " | ".join(cells) + f" | {r['train_wall_s']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def gradient_markdown(runs: list[dict]) -> str:
    """Per SSA run that logged them (``--grad-every``), in each third of its steps: the median
    norm of the (weighted) BEV term's gradient on the shared trunk over the InfoNCE term's, and
    the median cosine of the two; empty when no run logged them."""
    lines = []
    for r in runs:
        path = Path(r["run"]) / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        logged = [x for x in records if x["kind"] == "step" and "grad_cos_bev" in x]
        if not logged:
            continue
        cells = []
        for part in np.array_split(np.arange(len(logged)), 3):
            chunk = [logged[i] for i in part]
            if not chunk:
                cells.append("-")
                continue
            ratio = np.median([x["grad_bev"] / x["grad_infonce"] for x in chunk])
            cosine = np.median([x["grad_cos_bev"] for x in chunk])
            cells.append(f"{ratio:.2f} / {cosine:+.3f}")
        lines.append(f"| {r['split']} | {r['arm']} | {r['seed']} | {len(logged)} | "
                     + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ["", "Gradients on the shared trunk (median per third of training): BEV norm / "
            "InfoNCE norm, and their cosine", "",
            "| split | arm | seed | steps logged | first third | second third | last third |",
            "|---|---|---|---|---|---|---|"]
    return "\n".join(head + lines) + "\n"


def plot(rows: list[dict], path: Path, splits: list[str]) -> None:
    """R@1 (mean +- std) against prior mIoU per split; no-SSA as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for split, colour in zip(splits, ("tab:blue", "tab:orange"), strict=False):
        for r in (r for r in rows if r["split"] == split):
            mean, std = r["R@1"]["mean"], r["R@1"]["std"]
            if r["miou"] is None:
                ax.axhline(mean, color=colour, linestyle="--", label=f"{split}: no SSA")
                ax.axhspan(mean - std, mean + std, color=colour, alpha=0.12)
                continue
            lam = ARMS[r["arm"]][1]
            order = sorted(MARKERS)
            shift = 0.01 * (order.index(lam) - order.index(1.0)) if lam in MARKERS else 0.0
            ax.errorbar(r["miou"] + shift, mean, yerr=std, color=colour,
                        marker=MARKERS.get(lam, "o"), capsize=3, linestyle="none",
                        label=f"{split}: SSA λ={lam:g}")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlabel("prior mIoU against the truth")
    ax.set_ylabel("val R@1 (%)")
    ax.set_title("SSA ablation, synthetic CVUSA-layout worlds")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="study folder (reused: finished runs are kept)")
    parser.add_argument("--places", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=9, help="whole epochs per run")
    parser.add_argument("--steps", type=int, default=None,
                        help="cut each epoch to this many steps [default: whole epochs]")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at the same time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per training [default: the cores / --jobs]")
    parser.add_argument("--resume", action="store_true", help="resume half-finished runs")
    parser.add_argument("--grad-every", type=int, default=0, metavar="K",
                        help="log each loss term's gradient on the shared trunk every K steps "
                        "(train.grad_terms_every; tabled in thirds of training)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides of every run, e.g. another input size; the "
                        "runs go to runs/e<epochs>-<--tag>")
    parser.add_argument("--tag", default=None, help="the name of --set's runs (required then)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if bool(args.set) != bool(args.tag):
        parser.error("--set and --tag go together: the tag names the overridden runs' folder")
    if args.worker:
        return worker(args.worker)
    console = Console()
    started = time.perf_counter()
    variants = {ARMS[a][0] for a in args.arms} - {None}
    worlds = make_worlds(args.out, args.places, variants, console, args.splits)
    jobs = [(split, arm, seed) for seed in args.seeds for split in args.splits
            for arm in args.arms]
    name = (f"e{args.epochs}" + (f"x{args.steps}" if args.steps else "")
            + (f"-{args.tag}" if args.tag else ""))
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

    def one(job: tuple[str, str, int]) -> dict:
        split, arm, seed = job
        variant = ARMS[arm][0]
        root = worlds[split][variant]["root"] if variant else worlds[split]["base"]
        run = args.out / "runs" / name / split / arm / f"seed{seed}"
        metrics = launch(run, run_config(root, arm, seed, args.epochs, args.steps, threads,
                                         args.grad_every, args.set), args.resume)
        bar.advance(task)
        console.print(f"{split:10s} {arm:9s} seed {seed}: R@1 {metrics['R@1']:.2f} "
                      f"R@5 {metrics['R@5']:.2f} ({metrics['train_wall_s']:.0f} s)",
                      highlight=False)
        return {"split": split, "arm": arm, "seed": seed, "run": str(run), "metrics": metrics}

    columns = (TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("runs", total=len(jobs))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(one, jobs))
    rows = aggregate(runs, args.arms, worlds, args.splits)
    differences = paired(runs, args.arms, args.splits)
    steps = {r["split"]: r["metrics"]["steps"] for r in runs}
    settings = {"places": args.places, "epochs": args.epochs, "steps_per_epoch": args.steps,
                "steps": steps, "seeds": args.seeds, "arms": args.arms, "jobs": args.jobs,
                "threads": threads, "splits": args.splits, "set": args.set,
                "world_seed": WORLD_SEED, "wall_s": round(time.perf_counter() - started, 1),
                "load_average": os.getloadavg()}
    tag = f"-{args.tag}" if args.tag else ""  # a --set study's files beside the plain one's
    atomic_write_text(args.out / f"results{tag}.json", json.dumps(
        {"settings": settings, "worlds": worlds, "runs": runs, "aggregate": rows,
         "paired": differences}, indent=1))
    header = (f"{args.places} places (80 % train / 20 % val), {args.epochs} epochs, steps per "
              f"run {steps}, seeds {args.seeds}; mean ± std (ddof 1) over seeds"
              + (f"; overrides {' '.join(args.set)}" if args.set else ""))
    table = markdown(rows, header) + "\n" + paired_markdown(differences)
    table += gradient_markdown(runs)
    atomic_write_text(args.out / f"ablation{tag}.md", table)
    plot(rows, args.out / f"r1_vs_miou{tag}.png", args.splits)
    console.print(table, highlight=False)
    console.print(f"wrote {args.out}/results{tag}.json, ablation{tag}.md, r1_vs_miou{tag}.png "
                  f"({settings['wall_s']:.0f} s)", highlight=False)


if __name__ == "__main__":
    main()
