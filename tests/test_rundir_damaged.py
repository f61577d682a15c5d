"""Damaged run-directory files a user meets: truncated, garbage, pickled or non-finite
checkpoints, malformed logs and demo state, checkpoints of a newer format. Each is one error
line naming the file and what is wrong, and no pickle ever runs."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runs import TINY, error_lines, run_cli
from ssageo.config import load_config
from ssageo.demo import run_demo
from ssageo.io import DataError
from ssageo.model import build_model, load_model, save_model
from ssageo.train import TrainState, train
from ssageo.train.rundir import read_run_log
from ssageo.train.state import FORMAT, read_progress

# --- damaged files: one line naming the file and what is wrong ---------------------------


class Payload:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def finished_run(synth_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    train(load_config("synth-cpu", [f"data.root={synth_world('cvusa')}", *TINY,
                                    "train.epochs=1", "train.max_steps_per_epoch=2"]), run)
    shutil.rmtree(run / "checkpoints" / "best")
    return run


def test_killed_mid_swap_resumes_from_the_previous_last(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    checkpoints = run / "checkpoints"
    # between the two renames of a swap: the old `last` put aside, the new one still temporary
    os.replace(checkpoints / "last", checkpoints / ".last.old")
    (checkpoints / ".last.x7c9qz").mkdir()
    summary = train(None, run, resume=True)
    assert summary["steps"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan(path):
    weights = load_file(path)
    name = sorted(weights)[3]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, path)
    return name


def _payload(path):
    with path.open("wb") as handle:
        pickle.dump(Payload(path.parent / "PWNED"), handle, protocol=2)


DAMAGE = {
    "truncated weights": ("model.safetensors", _truncate, "cannot read weights"),
    "garbage weights": ("model.safetensors", lambda p: p.write_bytes(os.urandom(4096)),
                        "cannot read weights"),
    "pickle as weights": ("model.safetensors", _payload, "cannot read weights"),
    "NaN weights": ("model.safetensors", _nan, r"non-finite weights \(NaN or inf\) in 1 "),
    "empty state": ("training_state.pt", lambda p: p.write_bytes(b""), "empty"),
    "truncated state": ("training_state.pt", _truncate, "cannot read the training state"),
    "pickle payload state": ("training_state.pt", _payload, "objects other than tensors"),
    "tensor file, not a state": ("training_state.pt",
                                 lambda p: torch.save({"x": torch.zeros(1)}, p),
                                 "not a training state for this model"),
    "bad progress": ("progress.json", lambda p: p.write_text('{"step": "two"}'),
                     "not a checkpoint progress record"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_on_resume_is_one_error_naming_the_file(finished_run, tmp_path, case):
    name, damage, message = DAMAGE[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "checkpoints" / "last" / name
    tensor = damage(path)
    with pytest.raises(DataError, match=message) as err:
        train(None, run, resume=True)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    if case == "NaN weights":
        assert tensor in text
    assert not (path.parent / "PWNED").exists()  # the pickle never ran


@pytest.mark.slow
def test_damaged_checkpoint_from_the_cli_exits_2_with_one_line(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "checkpoints" / "last" / "training_state.pt"
    _payload(path)
    done = run_cli("train", "--resume", run)
    assert done.returncode == 2
    assert error_lines(done.stderr)[-1].startswith(f"error: {path}: not a training state saved")
    assert "Traceback" not in done.stderr and not (path.parent / "PWNED").exists()


MALFORMED_LOG = {
    "not JSON": ("{oops", ":2: not valid JSON"),
    "not an object": ("[1, 2]", ":2: expected a JSON object"),
    "kind not a string": ('{"kind": ["step"], "step": 3}', ":2: unknown record kind"),
    "step not a number": ('{"kind": "step", "step": "3"}', ":2: step must be a whole number"),
    "binary": (b"\xff\xfe\x00garbage", ":2: not UTF-8"),
}


@pytest.mark.parametrize("case", MALFORMED_LOG)
def test_malformed_metrics_log_on_resume_and_in_log(finished_run, tmp_path, case):
    line, message = MALFORMED_LOG[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "metrics.jsonl"
    first = path.read_bytes().splitlines()[0]
    path.write_bytes(first + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    for read in (lambda: read_run_log(run), lambda: train(None, run, resume=True)):
        with pytest.raises(DataError, match=f"^{path}{message}"):
            read()


def test_non_finite_weights_are_refused_at_evaluation(tmp_path):
    cfg = load_config("synth-cpu", ["model.backbone=convnext_atto"])
    model = build_model(cfg["model"], cfg["data"]["reference_size"], cfg["data"]["query_size"])
    with torch.no_grad():
        model.logit_scale.fill_(float("inf"))
    save_model(tmp_path / "ckpt", model, cfg)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'ckpt' / 'model.safetensors'}: "
                                        r"non-finite weights .* 1 tensor\(s\): logit_scale$"):
        load_model(tmp_path / "ckpt")


BAD_DEMO_STATE = {
    "truncated": ('{"budget_minutes": 1, "se', "not valid JSON"),
    "a list": ("[]", "not a JSON object"),
    "plan of another version": ('{"plan": {"places": 200}}', "'plan' does not have the keys"),
    "done not a list": ('{"done": "world"}', "'done' is not a list"),
}


@pytest.mark.parametrize("case", BAD_DEMO_STATE)
def test_corrupt_demo_state_is_one_error_naming_it(tmp_path, case):
    text, message = BAD_DEMO_STATE[case]
    (tmp_path / "demo.json").write_text(text)
    with pytest.raises(DataError, match=f"^{tmp_path / 'demo.json'}: .*{message}"):
        run_demo(tmp_path, budget_minutes=1)


# --- versioned checkpoints -------------------------------------------------------------------


def _state_file(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


NEWER = {
    "progress.json": lambda p: p.write_text(json.dumps(
        dict(json.loads(p.read_text()), format=FORMAT + 1))),
    "training_state.pt": lambda p: _state_file(p, lambda s: s.update(format=FORMAT + 1)),
}


@pytest.mark.parametrize("name", NEWER)
def test_a_checkpoint_of_a_newer_format_is_refused_naming_the_file_and_both_formats(
        finished_run, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = run / "checkpoints" / "last"
    assert json.loads((last / "progress.json").read_text())["format"] == FORMAT
    assert torch.load(last / "training_state.pt", weights_only=True)["format"] == FORMAT
    NEWER[name](last / name)
    with pytest.raises(DataError) as err:
        train(None, run, resume=True)
    assert str(err.value) == (
        f"{last / name}: checkpoint format {FORMAT + 1} is newer than this ssageo reads "
        f"(format {FORMAT}); resume it with the ssageo version that wrote it")


def test_a_checkpoint_without_a_format_number_still_resumes(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = run / "checkpoints" / "last"
    progress = json.loads((last / "progress.json").read_text())
    del progress["format"]  # as written before checkpoints had a format
    (last / "progress.json").write_text(json.dumps(progress))
    _state_file(last / "training_state.pt", lambda s: s.pop("format"))
    assert read_progress(last) == TrainState(**progress)
    assert train(None, run, resume=True)["steps"] == 2


# --- the run directory's files: written and read by one module --------------------------------
