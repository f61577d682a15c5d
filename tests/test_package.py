"""The package's shape: public exports, and constants that live in one place."""

import ast
import subprocess
import sys
from pathlib import Path

import ssageo
import ssageo.constants
import ssageo.evaluate

SRC = Path(ssageo.__file__).parent


def test_evaluate_exports_its_public_functions():
    for name in ("evaluate_model", "retrieval_metrics", "Localizer", "build_index", "open_index",
                 "save_descriptors", "load_descriptors", "build_tile_index", "embed_manifest"):
        assert name in ssageo.evaluate.__all__
    for name in ssageo.evaluate.__all__:  # each resolves, and says what it does
        assert getattr(ssageo.evaluate, name).__doc__, name


def test_shared_constants_are_written_once():
    def flat(value):  # the scalars inside a constant (a tuple, or the values of a dict)
        if isinstance(value, dict):
            value = tuple(value.values())
        if isinstance(value, tuple):
            return {x for v in value for x in flat(v)}
        return {value}

    literals = set().union(*(flat(v) for k, v in vars(ssageo.constants).items() if k.isupper()))
    assert {"metrics.jsonl", "config.yaml", "eval.json", "Chicago", 6_371_008.8} <= literals
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "constants.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in literals \
                    and type(node.value) in (str, float):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
    assert not found, "use ssageo.constants instead:\n" + "\n".join(found)


def test_the_quick_run_leaves_out_the_slow_tests():
    root = SRC.parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "not slow", "--collect-only",
                           "-q", "-p", "no:cacheprovider", "tests/test_demo.py"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected == [
        "tests/test_demo.py::test_the_final_table_keeps_every_cell_whole_in_80_columns",
        "tests/test_demo.py::test_the_plan_says_when_a_slow_machine_buys_fewer_steps_than_the"
        "_regime_needs",
        "tests/test_demo.py::test_where_not_even_one_epoch_fits_the_plan_trains_part_of_one_and"
        "_keeps_the_budget",
        "tests/test_demo.py::test_the_plan_spends_the_budget_on_steps_in_epochs_cut_evenly",
        "tests/test_demo.py::test_the_warm_up_epochs_settle_as_many_epochs_as_the_time_left_holds",
        "tests/test_demo.py::test_the_plan_takes_more_threads_only_when_the_steps_run_clearly"
        "_faster_with_them"]
    assert "1 deselected" in done.stdout  # the slow demo run
