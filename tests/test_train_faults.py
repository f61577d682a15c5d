"""Faults the training loop must report loudly: non-finite losses, unusable run directories."""

import json
import os

import pytest

from ssageo.config import load_config
from ssageo.io import DataError
from ssageo.model import load_model
from ssageo.train import NonFiniteLossError, check_free_space, open_run_dir, train

# An absurd learning rate blows the weights up after the first update: a real non-finite loss.
EXPLODE = ["model.backbone=convnext_atto",
           "data.workers=0", "train.batch_size=4", "train.epochs=1", "train.max_steps_per_epoch=4",
           "train.warmup_epochs=0", "train.lr=1e30", "train.clip_grad_norm=null"]


def test_non_finite_loss_stops_naming_the_step_and_saves_a_debug_checkpoint(synth_world, tmp_path):
    cfg = load_config("synth-cpu", [f"data.root={synth_world('cvusa')}", *EXPLODE])
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(epoch 1, batch 2\): loss=") as err:
        train(cfg, tmp_path / "run")
    assert "infonce=" in str(err.value) and "bev=" in str(err.value)
    debug = tmp_path / "run" / "checkpoints" / "debug-step2"
    load_model(debug)  # the weights that produced it, for inspection
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "nonfinite" and records[-1]["action"] == "stopped"


def test_non_finite_steps_can_be_skipped_up_to_a_budget_each_logged(synth_world, tmp_path):
    cfg = load_config("synth-cpu", [f"data.root={synth_world('cvusa')}", *EXPLODE,
                                    "train.max_nonfinite_skips=1"])
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*after 1 skipped step"):
        train(cfg, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [(r["step"], r["action"]) for r in records if r["kind"] == "nonfinite"]
    assert events == [(2, "skipped"), (3, "stopped")]


def test_unwritable_or_full_run_directory_fails_at_start(synth_world, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = load_config("synth-cpu", [f"data.root={synth_world('cvusa')}", "data.workers=0"])
    with pytest.raises(DataError, match="run directory is not writable"):
        train(cfg, blocker / "run")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(DataError, match="not writable"):
            open_run_dir(locked / "run", resume=False)
    # A disk that cannot hold best + last + the swap copy: the real free space of this disk is
    # too small for what we ask, so the check must refuse before any work.
    (tmp_path / "big").mkdir()
    with pytest.raises(DataError, match=r"MiB free on its disk; checkpoints \(best, last and "):
        check_free_space(tmp_path / "big", checkpoint_bytes=2**61)
    assert not (tmp_path / "run").exists()
