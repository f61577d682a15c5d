"""The training loop end to end on a generated world: run directory, checkpoints, exact resume
after ``kill -9`` (real subprocesses of ``python -m ssageo train``)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ssageo.config import ConfigError, load_config
from ssageo.io import DataError
from ssageo.model import load_model
from ssageo.train import train

# Tiny but real: 2 epochs of 3 steps of 4 pairs, a checkpoint every 2 steps (so mid-epoch).
TINY = ["model.backbone=convnext_atto",
        "data.workers=0", "train.batch_size=4", "train.epochs=2", "train.max_steps_per_epoch=3",
        "train.checkpoint_every=2"]


def tiny_config(world, *extra):
    return load_config("synth-cpu", [f"data.root={world}", *TINY, *extra])


def cli(*args):
    return [sys.executable, "-m", "ssageo", "train", *map(str, args)]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(synth_world, tmp_path):
    world = synth_world("cvusa")
    # Data workers on: augmentation must not depend on which worker decodes a sample.
    extra = ["data.workers=1"]
    summary = train(tiny_config(world, *extra), tmp_path / "straight")
    straight = tmp_path / "straight"

    # The run directory a user gets.
    assert summary["steps"] == 6 and summary["validation"] == "val split"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["best", "last"]
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        for key in ("loss", "infonce", "bev", "lr", "logit_scale", "pairs_per_s"):
            assert math.isfinite(r[key]), key
    assert steps[0]["bev"] > 0  # the SSA term is trained (synthetic priors exist)
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]
    model, saved = load_model(straight / "checkpoints" / "best")
    assert saved["train"]["batch_size"] == 4
    assert load_config(straight / "config.yaml") == saved
    assert json.loads((straight / "summary.json").read_text())["best_epoch"] in (1, 2)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(world, *extra), straight)

    killed = tmp_path / "killed"
    args = [f"data.root={world}", *TINY, *extra]
    proc = subprocess.Popen(cli("--out", killed, *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    progress = killed / "checkpoints" / "last" / "progress.json"
    deadline = time.monotonic() + 300
    while not progress.is_file():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = json.loads(progress.read_text())
    assert proc.returncode == -signal.SIGKILL
    assert at_kill["step"] == 2 and at_kill["batch"] == 2  # mid-epoch

    done = subprocess.run(cli("--resume", killed), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a = load_file(straight / "checkpoints" / "last" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    resumed = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed if r["kind"] == "step"] == [r["loss"] for r in steps]


def test_resume_refuses_overrides_and_a_folder_without_a_run(tmp_path):
    from typer.testing import CliRunner

    from ssageo.cli import app

    with pytest.raises(DataError, match="no training run here"):
        train(None, tmp_path, resume=True)
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "train.epochs=3"])
    assert isinstance(result.exception, ConfigError)
    assert "--resume" in str(result.exception)


def test_trainer_steps_advance_the_state_and_a_new_trainer_restores_it(synth_world, tmp_path):
    from torch.utils.data import default_collate

    from ssageo.train import Trainer
    from ssageo.train.rundir import open_run_dir

    cfg = tiny_config(synth_world("cvusa"), "data.workers=0")
    run = tmp_path / "run"
    with open_run_dir(run, resume=False):
        trainer = Trainer(cfg, run)
        trainer.setup()
        trainer.restore()
        batch = default_collate([trainer.dataset[i] for i in range(4)])
        record, names = trainer.train_step(batch, epoch=0)
        assert names == ("loss", "infonce", "bev")
        assert (trainer.state.step, trainer.state.batch, record["step"]) == (1, 1, 1)
        assert record["loss"] == pytest.approx(record["infonce"] + record["bev"])
        trainer.save("last")
    with open_run_dir(run, resume=True):
        again = Trainer(cfg, run, resume=True)
        again.setup()
        again.restore()
    assert again.started_from == run / "checkpoints" / "last"
    assert again.state == trainer.state
    ours, theirs = trainer.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_run_stopped_after_its_warm_up_epoch_can_be_lengthened_and_resumed_exactly(
        synth_world, tmp_path):
    """``until_epoch`` stops after the warm-up; given more epochs in its config.yaml, the resumed
    run ends with the weights of a run planned that long from the start (what ``ssageo demo``
    does once its warm-up epochs have shown this machine's real step times)."""
    from ssageo.train.rundir import read_config, write_config

    world = synth_world("cvusa")
    straight = train(tiny_config(world, "train.epochs=3"), tmp_path / "straight")
    stopped = train(tiny_config(world), tmp_path / "stopped", until_epoch=1)
    assert stopped == {"steps": 3, "epochs_done": 1, "epochs": 2, "stopped": True}
    assert not (tmp_path / "stopped" / "summary.json").exists()
    config = read_config(tmp_path / "stopped")
    config["train"]["epochs"] = 3
    write_config(tmp_path / "stopped", config)
    resumed = train(None, tmp_path / "stopped", resume=True)
    assert resumed["steps"] == straight["steps"] == 9 and resumed["epochs"] == 3
    ours = load_file(tmp_path / "stopped" / "checkpoints" / "last" / "model.safetensors")
    theirs = load_file(tmp_path / "straight" / "checkpoints" / "last" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_bev_head_trains_on_prior_labels_coarser_than_the_tile(synth_world, tmp_path):
    """model.bev.grid_size=4 with data.prior_size=[32,32]: 32x32 logits over the 64 px tile,
    trained on the labels resized to them (the demo's cheaper head)."""
    from torch.utils.data import default_collate

    from ssageo.train import Trainer
    from ssageo.train.rundir import open_run_dir

    cfg = tiny_config(synth_world("cvusa"), "data.workers=0", "model.bev.grid_size=4",
                      "data.prior_size=[32,32]")
    assert cfg["data"]["reference_size"] == [64, 64]
    with open_run_dir(tmp_path / "run", resume=False):
        trainer = Trainer(cfg, tmp_path / "run")
        trainer.setup()
        trainer.restore()
        batch = default_collate([trainer.dataset[i] for i in range(4)])
        assert batch["prior"].shape == (4, 32, 32) and batch["reference"].shape[-2:] == (64, 64)
        query = torch.randn(2, 3, *cfg["data"]["query_size"])
        assert trainer.model(query, None, with_bev=True)["bev_logits"].shape == (2, 2, 32, 32)
        before = trainer.model.bev.decoder.classifier.weight.clone()
        record, _ = trainer.train_step(batch, epoch=0)
    assert math.isfinite(record["bev"]) and record["bev"] > 0
    assert not torch.equal(before, trainer.model.bev.decoder.classifier.weight)


@pytest.mark.slow
def test_gradient_diagnostics_are_logged_and_leave_the_training_unchanged(synth_world, tmp_path):
    world = synth_world("cvusa")
    plain, diagnosed = tmp_path / "plain", tmp_path / "diagnosed"
    train(tiny_config(world), plain)
    train(tiny_config(world, "train.grad_terms_every=2"), diagnosed)
    ours, theirs = (load_file(run / "checkpoints/last/model.safetensors")
                    for run in (plain, diagnosed))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the same trajectory
    records = [json.loads(line) for line in (diagnosed / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "step"]
    logged = [r["step"] for r in records if "grad_cos_bev" in r]
    assert logged == [2, 4, 6]
    for r in records:
        if r["step"] in logged:
            assert r["grad_infonce"] > 0 and r["grad_bev"] > 0 and -1 <= r["grad_cos_bev"] <= 1
    with pytest.raises(ConfigError, match="grad_terms_every"):
        tiny_config(world, "train.grad_terms_every=-1")
