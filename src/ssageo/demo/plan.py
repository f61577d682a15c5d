"""The demo's regime and its budget plan: what ``ssageo demo`` trains, and for how long.

A first plan comes from step times measured on random inputs (``plan_budget``): the world's
size, the torch threads and the length of an epoch. Its number of epochs is only an estimate:
on 2-core machines the real steps ran 0.95x to 1.25x that measure. So both models train their
warm-up epoch first, whose learning rates do not depend on the run's length, and
``settle_epochs`` fixes the number of epochs from those epochs' real wall times and the time
left (benchmarks/RESULTS.md, issue 18).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ssageo.config import ConfigError, load_config

# The oracle corruption that stands in for a vision foundation model's errors.
VFM_LIKE = {"erode": 1, "drop": 0.15, "false_positives": 0.15}


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
# session", "Smaller panoramas, twelfth session" and "A coarser BEV grid, thirteenth session"):
# lr 3e-3, no tile rotation, 48x192 panoramas (step pairs 0.75-0.82x those of 64x256, no less
# learnt per step) and a 4x4 BEV grid whose 32x32 logits cover the 64 px tile at half its
# resolution, trained on the prior labels at that size (SSA steps 0.65-0.75x). FULL_STEPS: the
# steps it was measured with; FULL_R1: the SSA model's mean R@1 with them, over four seeds.
REGIME = ["train.lr=3e-3", "data.augment.rotate=0", "data.query_size=[48,192]",
          "model.bev.grid_size=4", "data.prior_size=[32,32]"]
FULL_STEPS = 450
FULL_R1 = 25.2
# The first plan's steps take their measured time x OVERHEAD (data loading beside them,
# logging, checkpoints); it only sizes the epochs: ``settle_epochs`` counts them from real ones.
OVERHEAD = 1.05
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
        if t["channels_last"]:  # Module.to's stubs lack the memory_format it takes
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        b = int(t["batch_size"])
        self.query = torch.randn(b, 3, *d["query_size"])
        self.reference = torch.randn(b, 3, *d["reference_size"])
        self.prior = torch.randint(0, 2, (b, *(d["prior_size"] or d["reference_size"])))
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


def step_seconds(configs: dict, rounds: int = 5) -> dict:
    """Median wall time of one optimisation step of each config's model on random inputs (the
    values of ``configs``, under the same keys), each with the torch threads it will train with.
    The steps are interleaved, one of each config per round, so that a machine whose speed
    drifts for seconds at a time (2-core cloud machines: the same step measured 0.69 s, then
    0.56 s) slows them all alike: the thread choice compares them."""
    from ssageo.train.distributed import cpu_threads

    def threads(config: dict) -> int:
        return cpu_threads(config["train"]["threads"], int(config["data"]["workers"]))

    timers = {key: StepTimer(config) for key, config in configs.items()}
    times: dict = {key: [] for key in configs}
    for round_ in range(rounds + 1):  # the first round warms up the allocators
        for key, timer in timers.items():
            torch.set_num_threads(threads(configs[key]))  # as training will
            seconds = timer.step()
            if round_:
                times[key].append(seconds)
    return {key: sorted(t)[len(t) // 2] for key, t in times.items()}


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
    models = (("ssa", True), ("baseline", False))
    measured = step_seconds({(threads, name): demo_config(root, seed, bev,
                                                          [f"train.threads={threads}"])
                             for threads in thread_options(root, seed) for name, bev in models})
    costs: dict[int, dict[str, float]] = {}
    for (threads, name), seconds in measured.items():
        costs.setdefault(threads, {})[name] = seconds
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


def plan_text(plan: Plan, budget_minutes: float, notice: bool = True,
              reaches: Callable[[int], bool] | None = None) -> str:
    """What the plan trains, and, when the budget buys fewer steps than the regime was measured
    with (and ``notice``), a notice of what that means and which budget would buy them on this
    machine: the fewest whole minutes that ``reaches`` (default: whose first plan, at the
    measured step times, does)."""
    steps, cost, whole = plan.steps, plan.seconds_per_step, _steps_per_epoch(plan.places)
    length = (f"{plan.epochs} epochs ({steps} steps)" if not plan.max_steps_per_epoch
              else f"{steps} of one epoch's {whole} steps" if plan.epochs == 1
              else f"{plan.epochs} epochs of {plan.max_steps_per_epoch} of their {whole} steps "
                   f"({steps} steps)")
    text = (f"budget {budget_minutes:g} min: {plan.places} places, {length} per model; "
            f"measured step time SSA {cost['ssa']:.2f} s, baseline {cost['baseline']:.2f} s"
            + (f" ({plan.threads} torch threads)" if plan.threads else ""))
    if steps >= FULL_STEPS or not notice:
        return text
    reaches = reaches or (lambda minutes: plan_from_costs(minutes, cost).steps >= FULL_STEPS)
    need = math.ceil(budget_minutes)
    while need < 10_000 and not reaches(need):
        need += 1
    return (f"{text}\nnote: this machine runs these steps slower than the 2-core machine "
            f"the demo was sized on, so only {steps} of the {FULL_STEPS} steps per model that "
            f"gave SSA R@1 {FULL_R1:g} % on average fit in {budget_minutes:g} min: expect a lower "
            f"R@1 (benchmarks/RESULTS.md). --budget-minutes {need} trains them here.")


# Each later epoch takes LATER_EPOCH x its run's warm-up epoch: the later ones add the
# validation and similarity-neighbour passes and more checkpoints (1.13x SSA, 1.15x baseline:
# 2-core Zen 4, thirteenth session). The demo's last part (evaluating both runs, the report)
# takes about FINAL_PAIRS pairs of the runs' steps (14 s beside step pairs of 1.07 s there).
LATER_EPOCH = 1.15
FINAL_PAIRS = 13


def settle_epochs(plan: Plan, warmup: dict[str, float], seconds_left: float) -> Plan:
    """``plan`` with as many epochs as fit ``seconds_left`` (after the warm-up epochs) when each
    later epoch of the two runs takes LATER_EPOCH x what their warm-up epochs took (``warmup``:
    wall seconds per run, keys ``ssa``/``baseline``) and the evaluation and report FINAL_PAIRS
    step pairs; at least the warm-up epoch."""
    steps = plan.max_steps_per_epoch or _steps_per_epoch(plan.places)
    both = warmup["ssa"] + warmup["baseline"]
    more = math.floor((seconds_left - FINAL_PAIRS * both / steps) / (LATER_EPOCH * both))
    epochs = 1 + max(0, more)
    return replace(plan, epochs=epochs, eval_every=third(epochs), similarity_every=third(epochs))


def settled_text(plan: Plan, warmup: dict[str, float], budget_minutes: float,
                 spent: float) -> str:
    """What the warm-up epochs showed and how many epochs that leaves room for; a notice
    names the budget whose settling, after the same ``spent`` seconds, trains FULL_STEPS."""
    def reaches(minutes: int) -> bool:
        return settle_epochs(plan, warmup, minutes * 60 - spent).steps >= FULL_STEPS

    return (f"warm-up epochs took SSA {warmup['ssa']:.0f} s, baseline {warmup['baseline']:.0f} s: "
            + plan_text(plan, budget_minutes, reaches=reaches).split(": ", 1)[1])
