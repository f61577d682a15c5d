"""``ssageo demo`` end to end as a user runs it: a real process, the smallest budget, then a rerun
that reuses every finished stage, and a rerun with other settings that is refused."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from ssageo.io import DataError


def _demo(out, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")  # rich: one table row per line
    return subprocess.run([sys.executable, "-m", "ssageo", "demo", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_demo_runs_every_stage_prints_the_table_and_reuses_stages_on_rerun(tmp_path):
    out = tmp_path / "demo"
    first = _demo(out, "--budget-minutes", "1", "--seed", "3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = json.loads((out / "demo.json").read_text())
    assert state["done"] == ["world", "priors", "warmup", "ssa", "baseline"]
    assert 0.3 < state["prior_miou"] < 0.95  # corrupted oracle: imperfect, far from empty

    # The table shows the numbers of this run's own evaluation files.
    for label, run in (("SSA", "ssa"), ("no-SSA baseline", "baseline")):
        evaluated = json.loads((out / "runs" / run / "eval.json").read_text())
        assert evaluated == state["results"][label]
        row = next(line for line in first.stdout.splitlines()
                   if line.strip("│┃ ").startswith(label + " "))
        assert f"{evaluated['R@1']:.1f}" in row and f"{evaluated['R@5']:.1f}" in row
        assert str(evaluated["steps"]) in row
        assert evaluated["steps"] > 0
    report = out / "report.html"
    assert report.is_file() and str(report) in first.stdout.replace("\n", "")
    html = report.read_text()
    assert "<th>ssa</th>" in html and "<th>baseline</th>" in html  # the two runs side by side
    for run in ("ssa", "baseline"):  # the report shows the final weights the table reports
        evaluated = json.loads((out / "runs" / run / "eval.json").read_text())
        assert f"{evaluated['R@1']:.2f}" in html
        assert f"runs/{run}/checkpoints/last" in html

    second = _demo(out, "--budget-minutes", "1", "--seed", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("synthetic world", "oracle priors", "training: SSA", "training: no-SSA"):
        line = next(line for line in second.stdout.splitlines() if stage in line)
        assert "(reused)" in line
    assert "epoch 1/" not in second.stdout + second.stderr  # nothing was trained again
    assert json.loads((out / "demo.json").read_text())["results"] == state["results"]

    # A folder an older demo wrote (no warm-up stage; its runs planned whole) is reused as is.
    older = {k: v for k, v in state.items() if k not in ("settled", "warmup_seconds")}
    older["done"] = [name for name in state["done"] if name != "warmup"]
    (out / "demo.json").write_text(json.dumps(older))
    config = (out / "runs" / "ssa" / "config.yaml").read_text()
    fourth = _demo(out, "--budget-minutes", "1", "--seed", "3")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "epoch 1/" not in fourth.stdout + fourth.stderr
    assert (out / "runs" / "ssa" / "config.yaml").read_text() == config
    assert json.loads((out / "demo.json").read_text())["results"] == state["results"]

    # Killed between the baseline's first `best` and its first `last` (a half-written `last`
    # left behind): the rerun continues from `best` and ends with the same results.
    baseline = out / "runs" / "baseline"
    os.replace(baseline / "checkpoints" / "last", baseline / "checkpoints" / ".last.k9x2ab")
    for name in ("eval.json", "summary.json"):
        (baseline / name).unlink()
    state["done"].remove("baseline")
    (out / "demo.json").write_text(json.dumps(state))
    third = _demo(out, "--budget-minutes", "1", "--seed", "3")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert f"[train] resumed from {baseline / 'checkpoints' / 'best'}" in third.stderr
    again = json.loads((out / "demo.json").read_text())
    assert again["done"] == ["world", "priors", "warmup", "ssa", "baseline"]
    for key in ("R@1", "R@5", "R@10", "R@1%", "steps"):
        assert again["results"]["no-SSA baseline"][key] == state["results"]["no-SSA baseline"][key]
    assert sorted(p.name for p in (baseline / "checkpoints").iterdir()) == ["best", "last"]

    other = _demo(out, "--budget-minutes", "1", "--seed", "4")
    assert other.returncode == 2
    assert "seed 3" in other.stderr and str(out) in other.stderr.replace("\n", "")


def test_the_final_table_keeps_every_cell_whole_in_80_columns():
    from rich.console import Console

    from ssageo.demo import results_table

    # the widest figures a run can give: 100 % recalls, 5-digit errors, steps and seconds
    row = {"R@1": 12.5, "R@5": 40.0, "R@10": 100.0, "R@1%": 100.0, "median_error_m": 12345.0,
           "mean_error_m": 23456.0, "steps": 12000, "train_seconds": 45678.0}
    console = Console(width=80, record=True, color_system=None)
    console.print(results_table({"SSA": row, "no-SSA baseline": row}, 0.71))
    text = console.export_text()
    assert "no-SSA baseline" in text and "…" not in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    for cell in ("12.5", "100.0", "12345", "23456", "12000", "45678", "time s"):
        assert cell in text, text
    # with the gallery's size, a caption says what one query and chance are worth
    console = Console(width=80, record=True, color_system=None)
    console.print(results_table({"SSA": dict(row, queries=200)}, None))
    text = console.export_text()
    assert "one query = 0.5 points" in " ".join(text.split()), text
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_the_plan_says_when_a_slow_machine_buys_fewer_steps_than_the_regime_needs():
    from ssageo.demo.plan import FULL_STEPS, plan_from_costs, plan_text

    fast = plan_from_costs(10, {"ssa": 0.2, "baseline": 0.15})
    text = plan_text(fast, 10)
    assert "note:" not in text and f"{fast.epochs} epochs" in text
    assert fast.places == 1000 and fast.steps >= FULL_STEPS

    slow = plan_from_costs(10, {"ssa": 2.0, "baseline": 1.5})  # a busy machine: 100x slower
    assert 1 <= slow.epochs < fast.epochs
    text = plan_text(slow, 10)
    assert f"only {slow.steps} of the {FULL_STEPS} steps" in text and "expect a lower R@1" in text
    need = int(text.rsplit("--budget-minutes ", 1)[1].split()[0])
    # the budget it names buys the steps at these step times, and one minute less does not
    costs = slow.seconds_per_step
    assert plan_from_costs(need, costs).steps >= FULL_STEPS
    assert plan_from_costs(need - 1, costs).steps < FULL_STEPS


def planned_seconds(plan, cost):
    """The whole demo as the plan budgets it: its fixed part, the rest, and the steps."""
    from ssageo.demo.plan import OVERHEAD, REST_STEPS

    pair = cost["ssa"] + cost["baseline"]
    return 60 + plan.places * 0.03 + REST_STEPS * pair + plan.steps * pair * OVERHEAD


def test_where_not_even_one_epoch_fits_the_plan_trains_part_of_one_and_keeps_the_budget():
    from ssageo.demo.plan import plan_from_costs, plan_text

    # step times the plan measured on an AVX2-only Zen 1 CPU with a training beside it, where
    # one whole epoch of both models (50 steps each) took the demo to 755 s of its 600
    zen1 = {"ssa": 7.03, "baseline": 4.21}
    plan = plan_from_costs(10, zen1)
    assert plan.epochs == 1 and 10 <= plan.max_steps_per_epoch < 50
    assert plan.steps == plan.max_steps_per_epoch
    assert planned_seconds(plan, zen1) <= 600
    text = plan_text(plan, 10)
    assert f"{plan.steps} of one epoch's 50 steps per model" in text
    assert f"only {plan.steps} of the" in text


def test_the_plan_spends_the_budget_on_steps_in_epochs_cut_evenly():
    from ssageo.demo.plan import plan_from_costs, plan_text

    # step pairs of the machines the demo ran on (Zen 5, two Zen 4s, a busy one), and others
    for ssa, baseline in ((0.63, 0.28), (0.73, 0.45), (0.96, 0.56), (2.0, 1.5), (0.5, 0.3),
                          (1.3, 0.7), (0.3, 0.2)):
        cost = {"ssa": ssa, "baseline": baseline}
        plan = plan_from_costs(10, cost)
        # within the budget, and one more step per epoch would not be
        more = replace(plan, max_steps_per_epoch=plan.steps // plan.epochs + 1)
        assert planned_seconds(plan, cost) <= 600 < planned_seconds(more, cost)
        per_epoch = plan.max_steps_per_epoch or 50
        assert plan.steps == plan.epochs * per_epoch and per_epoch <= 50
        # the fewest epochs that hold the steps that fit: one epoch fewer could not (the even
        # cut leaves fewer than one step per epoch of them out)
        assert (plan.epochs - 1) * 50 < plan.steps + plan.epochs
        text = plan_text(plan, 10)
        assert (f"{plan.epochs} epochs ({plan.steps} steps)" in text if per_epoch == 50
                else f"{plan.epochs} epochs of {per_epoch} of their 50 steps ({plan.steps} "
                     "steps)" in text), text


def test_the_warm_up_epochs_settle_as_many_epochs_as_the_time_left_holds():
    from ssageo.demo.plan import FINAL_PAIRS, LATER_EPOCH, Plan, settle_epochs, settled_text

    first = Plan(1000, 11, 4, 4, {"ssa": 0.52, "baseline": 0.41}, threads=2,
                 max_steps_per_epoch=45)
    # the thirteenth session's Zen 4: the real steps ran ~1.23x the first plan's measure
    warmup = {"ssa": 31.0, "baseline": 26.0}
    for left in (0.0, 40.0, 200.0, 520.0, 5000.0):
        plan = settle_epochs(first, warmup, left)
        assert plan.max_steps_per_epoch == 45 and plan.places == 1000 and plan.threads == 2
        assert (plan.eval_every, plan.similarity_every) == (-(-plan.epochs // 3),) * 2
        final, later = FINAL_PAIRS * 57.0 / 45, LATER_EPOCH * 57.0
        if plan.epochs > 1:  # the later epochs and the last part fit; one epoch more would not
            assert (plan.epochs - 1) * later + final <= left
        assert left < plan.epochs * later + final
    assert settle_epochs(first, warmup, 0.0).epochs == 1  # the warm-up epoch is the whole run
    assert settle_epochs(first, warmup, 520.0).steps == 8 * 45
    text = settled_text(settle_epochs(first, warmup, 520.0), warmup, 10, spent=80.0)
    assert text.startswith("warm-up epochs took SSA 31 s, baseline 26 s: 1000 places, 8 epochs "
                           "of 45 of their 50 steps (360 steps) per model"), text
    assert "note:" in text and "only 360 of the 450 steps" in text
    # the budget it names settles the 450 steps (10 epochs of 45) after the same 80 s, and one
    # minute less does not: from the warm-up epochs' real times, not the first estimate's
    need = int(text.rsplit("--budget-minutes ", 1)[1].split()[0])
    assert settle_epochs(first, warmup, need * 60 - 80.0).steps >= 450
    assert settle_epochs(first, warmup, (need - 1) * 60 - 80.0).steps < 450
    assert need == 12  # 80 + 9 x 65.55 + 16.5 = 686 s


def test_the_plan_takes_more_threads_only_when_the_steps_run_clearly_faster_with_them(
        tmp_path, monkeypatch):
    from ssageo.demo import read_state
    from ssageo.demo.plan import (
        MORE_THREADS_GAIN,
        Plan,
        choose_threads,
        plan_text,
        thread_options,
    )

    idle = {1: {"ssa": 0.82, "baseline": 0.50}, 2: {"ssa": 0.51, "baseline": 0.31}}
    assert choose_threads(idle) == 2  # measured on 2 idle cores: 1.6x faster
    close = {1: {"ssa": 1.0, "baseline": 0.5},
             2: {"ssa": 1.0 / MORE_THREADS_GAIN + 0.01, "baseline": 0.5 / MORE_THREADS_GAIN}}
    assert choose_threads(close) == 1  # not enough faster to share a core with the loader
    busy = {1: {"ssa": 2.0, "baseline": 1.5}, 2: {"ssa": 6.0, "baseline": 4.0}}
    assert choose_threads(busy) == 1
    assert choose_threads({1: idle[1]}) == 1  # one core: nothing else to try
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting is not second-guessed
    assert thread_options(tmp_path, 0) == [3]
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_options(tmp_path, 0)[0] == max(1, len(os.sched_getaffinity(0)) - 1)
    plan = Plan(1000, 8, 3, 3, idle[2], threads=2)
    assert "(2 torch threads)" in plan_text(plan, 10)
    # a demo folder written before the plan recorded its threads still reads
    old = {k: v for k, v in plan.__dict__.items() if k not in ("threads", "max_steps_per_epoch")}
    (tmp_path / "demo.json").write_text(json.dumps({"done": [], "plan": old}))
    again = Plan(**read_state(tmp_path / "demo.json")["plan"])
    assert again.threads == 0 and again.max_steps_per_epoch == 0 and again.steps == 8 * 50
    for bad in ({**plan.__dict__, "speed": 1}, {k: v for k, v in old.items() if k != "epochs"}):
        (tmp_path / "demo.json").write_text(json.dumps({"done": [], "plan": bad}))
        with pytest.raises(DataError, match="demo.json: 'plan' does not have the keys epochs"):
            read_state(tmp_path / "demo.json")


def _places(budget_minutes: float) -> int:
    return int(min(4000, max(200, 100 * budget_minutes)))
