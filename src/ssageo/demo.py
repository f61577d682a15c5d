"""``ssageo demo``: the whole method on a synthetic world, within a compute budget.

Stages, each reused when a rerun finds it finished in the same output folder:

1. ``world/``     a synthetic city in the CVUSA layout (``ssageo.synth.generate``);
2. priors         oracle prior labels, corrupted to about the quality a VFM gives
                  (``ssageo.priors``), with their mIoU against the truth;
3. ``runs/ssa``   SSA training (InfoNCE + BEV loss) and ``runs/baseline`` (InfoNCE only), same
                  seed, same number of steps;
4. evaluation     both final checkpoints on the held-out ``val`` split (``eval.json`` per run);
5. ``report.html`` the visual report of the SSA run compared with the baseline.

Sizes and epochs come from the budget: the per-step cost of both models is measured on this
machine first, so every figure printed comes from this run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import MISSING, dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ssageo.config import ConfigError, load_config
from ssageo.constants import REPORT_FILE
from ssageo.io import DataError, atomic_write_text

DONE = "demo.json"
# The oracle corruption that stands in for a vision foundation model's errors.
VFM_LIKE = {"erode": 1, "drop": 0.15, "false_positives": 0.15}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What the budget buys: world size and training length (shared by both runs)."""

    places: int
    epochs: int
    eval_every: int
    similarity_every: int
    seconds_per_step: dict[str, float]
    threads: int = 0  # torch threads of both trainings (0: train.threads auto; older demos)
    max_steps_per_epoch: int = 0  # each epoch cut to this many steps to fit the budget (0: all)

    @property
    def steps(self) -> int:
        """Optimisation steps per model."""
        return self.epochs * (self.max_steps_per_epoch or _steps_per_epoch(self.places))


# The world the demo renders (the model reads it at data.reference_size / data.query_size).
SAT_SIZE = 128
PANO_SIZE = (512, 128)
# The demo's regime on top of synth-cpu (docs/FIDELITY.md; RESULTS.md, "The demo's regime, sixth
# session" and "Smaller panoramas, twelfth session"): lr 3e-3, no tile rotation, and 48x192
# panoramas (step pairs 0.75-0.82x those of 64x256, no less learnt per step). FULL_STEPS: the
# steps it was measured with; FULL_R1: the SSA model's mean R@1 with them, over four seeds.
REGIME = ["train.lr=3e-3", "data.augment.rotate=0", "data.query_size=[48,192]"]
FULL_STEPS = 450
FULL_R1 = 23.6
# The steps' time x OVERHEAD: data loading beside the steps, logging, checkpoints (measured
# 1.10x with 2 threads on 2 idle cores, where the whole demo took 0.94x its budget).
OVERHEAD = 1.15
# The rest of the demo (world, priors, validation, similarity neighbours, evaluation, report)
# takes about 60 s + 30 ms per place + the time of REST_STEPS step pairs: fitted on two whole
# demos, 115 s beside step pairs of 0.91 s (2 idle cores, sixth session) and 284 s beside ones
# of 11.2 s (an AVX2-only Zen 1 CPU with a training beside it, seventh session).
REST_STEPS = 17
# Fewest steps a plan trains when not even that many fit the budget (then it cannot be kept).
MIN_STEPS = 10
# Torch threads beyond the default (the cores minus the loader worker) are used only when the
# measured steps are at least this much faster with them: the measurement leaves out the
# loader worker, which then shares a core with them (benchmarks/RESULTS.md, issue 18).
MORE_THREADS_GAIN = 1.2


def demo_config(root: Path, seed: int, bev: bool, extra: list[str] | None = None) -> dict:
    """The demo's training config: synth-cpu + the demo regime + this run's settings."""
    return load_config("synth-cpu", [
        *REGIME, f"data.root={root}", f"train.seed={seed}",
        f"model.bev.enabled={str(bev).lower()}", "data.workers=1", *(extra or [])])


class StepTimer:
    """One optimisation step of ``config``'s model on random inputs of its sizes, timed."""

    def __init__(self, config: dict) -> None:
        from ssageo.model import build_model

        d, t = config["data"], config["train"]
        torch.manual_seed(0)
        self.model = build_model(config["model"], d["reference_size"], d["query_size"]).train()
        if t["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        b = int(t["batch_size"])
        self.query = torch.randn(b, 3, *d["query_size"])
        self.reference = torch.randn(b, 3, *d["reference_size"])
        self.prior = torch.randint(0, 2, (b, *d["reference_size"]))
        self.loss = config["loss"]

    def step(self) -> float:
        """Seconds of one forward + backward + AdamW step."""
        from ssageo.model.losses import ssa_loss

        start = time.perf_counter()
        losses = ssa_loss(self.model(self.query, self.reference), self.prior, self.loss)
        self.optimizer.zero_grad()
        losses["loss"].backward()
        self.optimizer.step()
        return time.perf_counter() - start


def _step_seconds(config: dict, steps: int = 3) -> float:
    """Median wall time of one optimisation step of ``config``'s model on random inputs."""
    from ssageo.train.distributed import cpu_threads

    d, t = config["data"], config["train"]
    torch.set_num_threads(cpu_threads(t["threads"], int(d["workers"])))  # as training will
    timer = StepTimer(config)
    times = [timer.step() for _ in range(steps + 1)][1:]  # the first warms up allocators
    return sorted(times)[len(times) // 2]


def thread_options(root: Path, seed: int) -> list[int]:
    """Torch thread counts the plan tries: the training default (``train.threads: auto``:
    the cores minus the loader worker) first, then every core of this process; only the
    default where ``OMP_NUM_THREADS`` sets it."""
    from ssageo.train.distributed import cpu_threads

    config = demo_config(root, seed, True)
    default = cpu_threads(config["train"]["threads"], int(config["data"]["workers"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mine = os.environ.get("OMP_NUM_THREADS", "").isdigit()
    return [default] + ([cores] if cores and cores > default and not mine else [])


def choose_threads(costs: dict[int, dict[str, float]]) -> int:
    """The thread count of ``costs`` ({threads: {"ssa": s, "baseline": s}}; the first is the
    default) whose step pair is fastest, taking more threads than the default only when that
    is :data:`MORE_THREADS_GAIN` faster."""
    default, *more = costs
    pair = {t: c["ssa"] + c["baseline"] for t, c in costs.items()}
    best = min(more, key=pair.__getitem__, default=default)
    return best if pair[default] >= MORE_THREADS_GAIN * pair[best] else default


def plan_budget(budget_minutes: float, seed: int, root: Path) -> Plan:
    """Choose torch threads, world size and epochs so that the whole demo fits
    ``budget_minutes``, from step times measured on this machine."""
    if budget_minutes < 1:
        raise ConfigError(f"--budget-minutes {budget_minutes}: the demo needs at least 1 minute")
    costs = {threads: {name: _step_seconds(demo_config(root, seed, bev,
                                                       [f"train.threads={threads}"]))
                       for name, bev in (("ssa", True), ("baseline", False))}
             for threads in thread_options(root, seed)}
    threads = choose_threads(costs)
    return replace(plan_from_costs(budget_minutes, costs[threads]), threads=threads)


def _places(budget_minutes: float) -> int:
    return int(min(4000, max(200, 100 * budget_minutes)))


@functools.cache
def _batch_size() -> int:
    return int(demo_config(Path("."), 0, True)["train"]["batch_size"])


def _steps_per_epoch(places: int) -> int:
    return int(places * 0.8) // _batch_size()


def _training_seconds(budget_minutes: float, cost: dict[str, float]) -> float:
    """The part of the budget left for the two trainings' steps at step times ``cost``: the
    rest of the demo is budgeted here (see REST_STEPS), the steps' own overhead (OVERHEAD) in
    ``plan_from_costs`` (benchmarks/RESULTS.md, issue 18)."""
    pair = cost["ssa"] + cost["baseline"]
    return budget_minutes * 60 - 60 - _places(budget_minutes) * 0.03 - REST_STEPS * pair


def plan_from_costs(budget_minutes: float, cost: dict[str, float]) -> Plan:
    """The plan for measured step times ``cost`` (seconds per step, keys ``ssa``/``baseline``):
    every step that fits the budget, in as few epochs as hold them, each epoch cut to the same
    number of steps where whole ones would leave part of the budget unused (or not fit)."""
    places = _places(budget_minutes)
    pair = (cost["ssa"] + cost["baseline"]) * OVERHEAD
    seconds = _training_seconds(budget_minutes, cost)
    whole = _steps_per_epoch(places)
    fits = max(MIN_STEPS, math.floor(seconds / pair))
    epochs = math.ceil(fits / whole)
    each = fits // epochs
    return Plan(places=places, epochs=epochs, eval_every=third(epochs),
                similarity_every=third(epochs), seconds_per_step=cost,
                max_steps_per_epoch=each if each < whole else 0)


def third(epochs: int) -> int:
    """Epochs between validations and between similarity-neighbour updates in a run of
    ``epochs``: three of each, the last at the end."""
    return max(1, math.ceil(epochs / 3))


def plan_text(plan: Plan, budget_minutes: float) -> str:
    """What the plan trains, and, when the budget buys fewer steps than the regime was measured
    with, a notice of what that means and which budget would buy them on this machine."""
    steps, cost, whole = plan.steps, plan.seconds_per_step, _steps_per_epoch(plan.places)
    length = (f"{plan.epochs} epochs ({steps} steps)" if not plan.max_steps_per_epoch
              else f"{steps} of one epoch's {whole} steps" if plan.epochs == 1
              else f"{plan.epochs} epochs of {plan.max_steps_per_epoch} of their {whole} steps "
                   f"({steps} steps)")
    text = (f"budget {budget_minutes:g} min: {plan.places} places, {length} per model; "
            f"measured step time SSA {cost['ssa']:.2f} s, baseline {cost['baseline']:.2f} s"
            + (f" ({plan.threads} torch threads)" if plan.threads else ""))
    if steps >= FULL_STEPS:
        return text
    # the smallest budget (in whole minutes) whose plan reaches FULL_STEPS at these step times
    need = math.ceil(budget_minutes)
    while need < 10_000 and plan_from_costs(need, cost).steps < FULL_STEPS:
        need += 1
    return (f"{text}\nnote: this machine runs these steps slower than the 2-core machine "
            f"the demo was sized on, so only {steps} of the {FULL_STEPS} steps per model that "
            f"gave SSA R@1 {FULL_R1:g} % on average fit in {budget_minutes:g} min: expect a lower "
            f"R@1 (benchmarks/RESULTS.md). --budget-minutes {need} trains them here.")


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
        console.rule("[bold]1/6 measuring this machine to fit the budget")
        state["plan"] = plan_budget(budget_minutes, seed, world).__dict__
        save()
    plan = Plan(**state["plan"])
    logger.info(plan_text(plan, budget_minutes))

    if stage("world", "2/6 synthetic world (CVUSA layout)"):
        from ssageo.synth import generate

        summary = generate(world, layout="cvusa", places=plan.places, seed=seed,
                           sat_size=SAT_SIZE, pano_size=PANO_SIZE, progress=True)
        logger.info("%s places written to %s", summary["counts"], world)
        finish("world")

    if stage("priors", "3/6 oracle priors with VFM-like errors"):
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
    from ssageo.train.rundir import CONFIG_FILE

    runs = {"SSA": out / "runs" / "ssa", "no-SSA baseline": out / "runs" / "baseline"}
    for i, (label, run) in enumerate(runs.items()):
        if stage(run.name, f"{4 + i}/6 training: {label}"):
            config = demo_config(world, seed, label == "SSA", [
                f"train.threads={plan.threads or 'auto'}",
                f"train.epochs={plan.epochs}",
                f"eval.every={plan.eval_every}",
                f"train.sampling.similarity_every={plan.similarity_every}",
            ] + ([f"train.max_steps_per_epoch={plan.max_steps_per_epoch}"]
                 if plan.max_steps_per_epoch else []))
            # a run a killed demo started: continue it (from step 0 when it has no checkpoint)
            resume = (run / CONFIG_FILE).is_file()
            train(None if resume else config, run, resume=resume)
            finish(run.name)

    results = {label: evaluate_run(run) for label, run in runs.items()}
    console.rule("[bold]report")
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
