"""``ssageo demo``: the whole method on a synthetic world, within a compute budget.

Stages, each reused when a rerun finds it finished in the same output folder:

1. plan           the per-step cost of both models measured on this machine: the world's size,
                  the torch threads and the epochs' length (``ssageo.demo.plan``);
2. ``world/``     a synthetic city in the CVUSA layout (``ssageo.synth.generate``);
3. priors         oracle prior labels, corrupted to about the quality a VFM gives
                  (``ssageo.priors``), with their mIoU against the truth;
4. warm-up        the first epoch of ``runs/ssa`` (SSA: InfoNCE + BEV loss) and of
                  ``runs/baseline`` (InfoNCE only); their real wall times settle how many
                  epochs fit what is left of the budget;
5. training       the rest of both runs (stages 5 and 6): same seed, same number of steps;
6. evaluation     both final checkpoints on the held-out ``val`` split (``eval.json`` per run),
                  then ``report.html``, the visual report of the SSA run beside the baseline.

Every figure printed comes from this run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import MISSING
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ssageo.constants import REPORT_FILE
from ssageo.demo.plan import (
    PANO_SIZE,
    SAT_SIZE,
    VFM_LIKE,
    Plan,
    demo_config,
    plan_budget,
    plan_text,
    settle_epochs,
    settled_text,
    third,
)
from ssageo.io import DataError, atomic_write_text

__all__ = ["PANO_SIZE", "SAT_SIZE", "VFM_LIKE", "demo_config", "evaluate_run", "results_table",
           "run_demo", "third"]

DONE = "demo.json"

logger = logging.getLogger(__name__)


def read_state(path: Path) -> dict:
    """A demo folder's ``demo.json`` ({} when absent); DataError naming it when malformed."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); remove it to redo the demo") from None
    fields = set(Plan.__dataclass_fields__)
    # the fields with defaults came later: a demo folder written before them still reads
    required = {n for n, f in Plan.__dataclass_fields__.items() if f.default is MISSING}
    problem = None
    if not isinstance(state, dict):
        problem = "not a JSON object"
    elif not isinstance(state.get("done", []), list):
        problem = "'done' is not a list of stages"
    elif "plan" in state and (not isinstance(state["plan"], dict)
                              or not required <= set(state["plan"]) <= fields):
        problem = (f"'plan' does not have the keys {', '.join(sorted(required))} (and only "
                   f"those or {', '.join(sorted(fields - required))})")
    if problem:
        raise DataError(f"{path}: {problem}; remove it to redo the demo")
    return state


def run_demo(out: Path, budget_minutes: float = 10.0, seed: int = 0,
             console: Console | None = None) -> dict:
    """Run every stage into ``out`` (reusing finished ones); returns the final results.

    ``out`` is locked for the whole demo: a second demo into it is refused (DataError).
    """
    from ssageo.train.rundir import lock_run_dir

    with lock_run_dir(out):
        return _run_demo(Path(out), budget_minutes, seed, console or Console())


def _run_demo(out: Path, budget_minutes: float, seed: int, console: Console) -> dict:
    started = time.perf_counter()
    state_file = out / DONE
    state = read_state(state_file)
    if state and (state.get("budget_minutes"), state.get("seed")) != (budget_minutes, seed):
        raise FileExistsError(
            f"{out}: holds a demo made with budget {state.get('budget_minutes')} min, seed "
            f"{state.get('seed')}; use another --out (or remove it) for other settings")
    world = out / "world"

    def save() -> None:
        atomic_write_text(state_file, json.dumps(state, indent=1))

    def stage(name: str, text: str) -> bool:
        """Announce a stage; False when a previous run finished it."""
        done = name in state.get("done", [])
        console.rule(f"[bold]{text}" + (" (reused)" if done else ""))
        return not done

    def finish(name: str) -> None:
        state.setdefault("done", []).append(name)
        save()

    state.update(budget_minutes=budget_minutes, seed=seed)
    if "plan" not in state:
        console.rule("[bold]1/7 measuring this machine to fit the budget")
        state["plan"] = plan_budget(budget_minutes, seed, world).__dict__
        save()
    plan = Plan(**state["plan"])
    if "settled" not in state:
        logger.info("first estimate, settled after the warm-up epochs: %s",
                    plan_text(plan, budget_minutes, notice=False))

    if stage("world", "2/7 synthetic world (CVUSA layout)"):
        from ssageo.synth import generate

        summary = generate(world, layout="cvusa", places=plan.places, seed=seed,
                           sat_size=SAT_SIZE, pano_size=PANO_SIZE, progress=True)
        logger.info("%s places written to %s", summary["counts"], world)
        finish("world")

    if stage("priors", "3/7 oracle priors with VFM-like errors"):
        from ssageo.priors.oracle import Corruption, OracleBackend
        from ssageo.priors.run import list_tiles, run_priors

        backend = OracleBackend(world, Corruption(**VFM_LIKE), seed=seed)
        result = run_priors(list_tiles(world), backend, force=True)
        if not result.ok:
            raise RuntimeError(f"prior labels failed for {len(result.failed)} tiles, "
                               f"e.g. {result.failed[0][0]}: {result.failed[0][1]}")
        state["prior_miou"] = result.statistics["miou"]
        logger.info("%d labels, mIoU vs truth %.3f (corruption %s)", result.done,
                    state["prior_miou"], VFM_LIKE)
        finish("priors")

    from ssageo.train import train
    from ssageo.train.rundir import CONFIG_FILE, read_config, write_config

    runs = {"SSA": out / "runs" / "ssa", "no-SSA baseline": out / "runs" / "baseline"}
    if "ssa" in state.get("done", []) and "warmup" not in state["done"]:
        state["done"].insert(state["done"].index("ssa"), "warmup")  # an older demo: no warm-up
    if stage("warmup", "4/7 warm-up epoch of both models (it settles how many epochs fit)"):
        warmup = state.setdefault("warmup_seconds", {})
        for label, run in runs.items():
            if run.name in warmup:
                continue
            begun = time.perf_counter()
            # a run a killed demo started: continue it (from step 0 when it has no checkpoint)
            resume = (run / CONFIG_FILE).is_file()
            train(None if resume else run_config(world, seed, plan, label == "SSA"), run,
                  resume=resume, until_epoch=1)
            warmup[run.name] = round(time.perf_counter() - begun, 1)
            save()
        if "settled" not in state:  # the seconds this demo had spent when it settled
            spent = round(time.perf_counter() - started, 1)
            plan = settle_epochs(plan, warmup, budget_minutes * 60 - spent)
            state.update(plan=plan.__dict__, settled=spent)
            save()
        for run in runs.values():  # the warm-up's learning rates do not depend on the length
            config = read_config(run)
            config["train"]["epochs"] = plan.epochs
            config["eval"]["every"] = plan.eval_every
            config["train"]["sampling"]["similarity_every"] = plan.similarity_every
            write_config(run, config)
        logger.info(settled_text(plan, warmup, budget_minutes, state["settled"]))
        finish("warmup")

    for i, (label, run) in enumerate(runs.items()):
        if stage(run.name, f"{5 + i}/7 training: {label}"):
            train(None, run, resume=True)
            finish(run.name)

    results = {label: evaluate_run(run) for label, run in runs.items()}
    console.rule("[bold]7/7 evaluation and report")
    from ssageo.report import build_report

    report = build_report(runs["SSA"], out=out / REPORT_FILE, compare=runs["no-SSA baseline"],
                          checkpoint="last",
                          progress=lambda msg: logger.info("report: %s", msg))
    state["wall_seconds_this_session"] = round(time.perf_counter() - started, 1)
    state["results"] = results
    save()
    console.print(results_table(results, state.get("prior_miou")))
    console.print(f"report: [bold]{report}[/bold]")
    console.print(f"demo wall time this session: {state['wall_seconds_this_session']:.0f} s "
                  f"(budget {budget_minutes:g} min)", highlight=False)
    return state


def evaluate_run(run: Path) -> dict:
    """Held-out metrics of a run's final checkpoint (cached in ``eval.json``) + training time."""
    from ssageo.data import load_manifest
    from ssageo.evaluate.embed import evaluate_model
    from ssageo.model import load_model
    from ssageo.train.rundir import read_eval, read_run_log, read_summary, write_eval

    cached = read_eval(run)
    if cached is not None:
        return cached
    summary = read_summary(run)
    # The final weights: the val split is the one reported, so nothing is selected on it.
    checkpoint = summary["last_checkpoint"]
    model, config = load_model(checkpoint)
    manifest = load_manifest(config["data"]["root"], split="val")
    logger.info("evaluating %s on the val split", checkpoint)
    metrics = evaluate_model(model.eval(), manifest, config)
    steps = read_run_log(run).steps
    batch = config["train"]["batch_size"]  # pairs_per_s = batch / (wall time of that step)
    metrics["train_seconds"] = round(sum(batch / r["pairs_per_s"] for r in steps), 1)
    metrics["steps"] = len(steps)
    metrics["checkpoint"] = checkpoint
    write_eval(run, metrics)
    return metrics


def results_table(results: dict, prior_miou: float | None) -> Table:
    """The final comparison table (recalls in %, errors in metres, training time), with a
    caption on how far apart two runs' R@1 can be by chance alone."""
    title = "held-out (val) retrieval, synthetic CVUSA-layout world"
    if prior_miou is not None:
        title += f"; SSA priors mIoU {prior_miou:.3f}"
    queries = next(iter(results.values()), {}).get("queries")  # ten seeds of each: RESULTS.md
    caption = (f"one query = {100 / queries:.1f} points of R@1; on a gallery this size two "
               "training seeds differ by ~4 points (std), SSA or not: benchmarks/RESULTS.md"
               if queries else None)
    table = Table(title=title, caption=caption, show_edge=False)
    # every cell stays whole in 80 columns (one decimal; eval.json keeps every digit)
    for column in ("model", "R@1", "R@5", "R@10", "R@1%", "med.\nerr m", "mean\nerr m",
                   "train\nsteps", "train\ntime s"):
        table.add_column(column, justify="left" if column == "model" else "right",
                         no_wrap=True)
    for label, m in results.items():
        table.add_row(label, *(f"{m[k]:.1f}" for k in ("R@1", "R@5", "R@10", "R@1%")),
                      f"{m['median_error_m']:.0f}", f"{m['mean_error_m']:.0f}",
                      str(m["steps"]), f"{m['train_seconds']:.0f}")
    return table


def run_config(world: Path, seed: int, plan: Plan, ssa: bool) -> dict:
    """The config of one of the demo's two runs under ``plan``."""
    return demo_config(world, seed, ssa, [
        f"train.threads={plan.threads or 'auto'}",
        f"train.epochs={plan.epochs}",
        f"eval.every={plan.eval_every}",
        f"train.sampling.similarity_every={plan.similarity_every}",
    ] + ([f"train.max_steps_per_epoch={plan.max_steps_per_epoch}"]
         if plan.max_steps_per_epoch else []))
