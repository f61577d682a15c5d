"""The run directory under faults a user meets: two processes on one folder, runs killed before
their first checkpoint, a disk that fills up or turns read-only, and another working directory.
Real processes where the fault is about processes. Damaged files: test_rundir_damaged.py."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from faults import needs_namespaces
from runs import TINY, cli, error_lines, run_cli, same_weights, start_cli, steps, wait_for
from ssageo.config import load_config
from ssageo.demo import run_demo
from ssageo.io import DataError
from ssageo.train import NonFiniteLossError, lock_run_dir, train
from ssageo.train.rundir import (
    METRICS_FILE,
    MetricsLog,
    read_config,
    read_eval,
    read_run_log,
    read_summary,
    write_eval,
    write_summary,
)

# --- one process per run directory -------------------------------------------------------


@pytest.mark.slow
def test_second_train_on_a_busy_run_directory_is_refused_and_kill_9_leaves_no_stale_lock(
        synth_world, tmp_path):
    world, run = synth_world("cvusa"), tmp_path / "run"
    # a data-loader worker too: a forked child must not keep the lock after the trainer dies
    args = ["--data", world, *TINY, "train.epochs=20", "data.workers=1"]
    first = start_cli("train", "--out", run, *args)
    try:
        wait_for(run / "config.yaml", first)  # written while holding the lock
        second = run_cli("train", "--out", run, *args)
        assert first.poll() is None  # still training: the refusal was not a stale leftover
        assert second.returncode == 2
        assert error_lines(second.stderr) == [
            f"error: {run}: in use by another ssageo process (pid {first.pid}, lock "
            f"{run / '.lock'}); wait for it to end or use another output folder"]
    finally:
        first.kill()  # SIGKILL: the kernel drops the lock with the process
        first.wait()
    assert first.returncode == -signal.SIGKILL
    # The lock is not stale: the next process gets it at once.
    with lock_run_dir(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())


@pytest.mark.slow
def test_second_demo_on_a_busy_folder_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "demo"
    first = start_cli("demo", "--out", out, "--budget-minutes", "1")
    try:
        lock = out / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(DataError, match=rf"in use by another ssageo process \(pid {first.pid}"):
            run_demo(out, budget_minutes=1)
    finally:
        first.kill()
        first.wait()


# --- resume after a kill before the first `last`, or after a non-finite stop -------------


@pytest.mark.slow
def test_killed_between_first_best_and_first_last_resumes_from_best_exactly(synth_world,
                                                                            tmp_path):
    world = synth_world("cvusa")
    args = [f"data.root={world}", *TINY, "train.checkpoint_every=1000"]  # first last: epoch end
    straight = tmp_path / "straight"
    train(load_config("synth-cpu", args), straight)

    killed = tmp_path / "killed"
    proc = start_cli("train", "--out", killed, *args)
    best = killed / "checkpoints" / "best"
    wait_for(best / "progress.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((best / "progress.json").read_text())["step"] == 3  # epoch 1's
    last = killed / "checkpoints" / "last"
    half_written = killed / "checkpoints" / ".last.k9x2ab"
    if last.exists():  # the kill came a little late: put `last` back to its temporary name
        os.replace(last, half_written)
    else:  # or it came mid-write, which leaves a temporary folder of its own
        half_written.mkdir(exist_ok=True)
    rerun = run_cli("train", "--out", killed, *args)
    assert rerun.returncode == 2 and f"--resume {killed}" in rerun.stderr

    done = run_cli("train", "--resume", killed)
    assert done.returncode == 0, done.stderr[-3000:]
    # the library logs it; the CLI shows it on stderr with training's tag
    assert f"[train] resumed from {best} at epoch 2, batch 0, step 3" in done.stderr
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["best", "last"]
    same_weights(straight / "checkpoints" / "last", last)
    assert [r["loss"] for r in steps(killed)] == [r["loss"] for r in steps(straight)]


@pytest.mark.slow
def test_non_finite_stop_with_only_a_debug_checkpoint_restarts_from_step_0(synth_world,
                                                                           tmp_path):
    explode = ["train.epochs=1", "train.max_steps_per_epoch=4", "train.warmup_epochs=0",
               "train.lr=1e30", "train.clip_grad_norm=null"]
    cfg = load_config("synth-cpu", [f"data.root={synth_world('cvusa')}", *TINY, *explode])
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"at step 2 "):
        train(cfg, run)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["debug-step2"]
    with pytest.raises(FileExistsError, match="restarts from step 0 when no complete checkpoint"):
        train(cfg, run)
    # debug-step2 is not resumed from (it would be step 3 next): the run starts over, and the
    # log holds this session's records only.
    with pytest.raises(NonFiniteLossError, match=r"at step 2 "):
        train(None, run, resume=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("step", 1), ("nonfinite", 2)]


# --- disk full, read-only disk ----------------------------------------------------------


# Inside a private mount namespace: a tmpfs, training into it, and once the run has started,
# the disk is filled up or remounted read-only (faults.run_faulty sets its fault up before the
# command starts; these faults must come after the start-of-run checks).
FAULT_SCRIPT = """
set -u
mount -t tmpfs -o size="$SIZE" tmpfs "$DISK"
"$@" &
pid=$!
while [ ! -f "$DISK/run/config.yaml" ]; do
  kill -0 $pid 2>/dev/null || break
  sleep 0.05
done
# full: 2 MiB left, room for the small log files but not for a checkpoint
if [ "$FAULT" = none ]; then :
elif [ "$FAULT" = full ]; then
  head -c $(( $(df --output=avail -B1 "$DISK" | tail -1) - 2097152 )) /dev/zero > "$DISK/filler"
else mount -o remount,ro "$DISK" || echo "remount failed" >&2
fi
wait $pid
"""


@pytest.mark.slow
@needs_namespaces
# A disk with room for one checkpoint (45 MiB here) but not for best + last + the swap copy is
# refused at start. Later, a full disk (2 MiB left) fails at the checkpoint, or at the log when
# a checkpoint being written while the disk was filled took the last 2 MiB (seen on a fast
# machine); a read-only one at the first file written then, the log, which goes first so that
# it is never behind the checkpoint.
@pytest.mark.parametrize(("fault", "size", "failed"), [
    ("none", "150m", r"only 150 MiB free on its disk; checkpoints \(best, last and the copy "
                     r"written while one is replaced\) need about 2\d\d MiB"),
    ("full", "400m", r"(checkpoints/last/(model\.safetensors|training_state\.pt)|metrics\.jsonl): "
                     r"cannot write: no space left on device"),
    ("read-only", "400m", r"metrics.jsonl: cannot write: read-only file system")])
def test_checkpoint_write_on_a_small_full_or_read_only_disk_is_one_line(synth_world, tmp_path,
                                                                        fault, size, failed):
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd, kw = cli("train", "--out", disk / "run", "--data", synth_world("cvusa"), *TINY,
                  "train.checkpoint_every=1")
    kw["env"].update(DISK=str(disk), FAULT=fault, SIZE=size)
    done = subprocess.run(["unshare", "-rm", "bash", "-c", FAULT_SCRIPT, "fault", *cmd],
                          capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.fullmatch(f"error: {disk / 'run'}[:/]( )?{failed}", error_lines(done.stderr)[-1])
    assert "Traceback" not in done.stderr


# --- the dataset a run used, whatever the working directory ------------------------------


def test_resume_from_another_directory_reads_the_runs_dataset(synth_world, tmp_path,
                                                               monkeypatch):
    (tmp_path / "here").mkdir()
    shutil.copytree(synth_world("cvusa"), tmp_path / "here" / "world")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "world").mkdir(parents=True)  # a folder of the same name, not a dataset
    monkeypatch.chdir(tmp_path / "here")
    cfg = load_config("synth-cpu", ["data.root=world", *TINY, "train.epochs=1",
                                    "train.max_steps_per_epoch=1"])
    train(cfg, tmp_path / "run")
    monkeypatch.chdir(elsewhere)
    # config.yaml is what `report` reads too
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved["data"]["root"] == str((tmp_path / "here" / "world").resolve())
    assert train(None, tmp_path / "run", resume=True)["steps"] == 1  # not ./world from here


def test_run_directory_files_round_trip_and_a_damaged_one_is_one_line(tmp_path):
    log = MetricsLog(tmp_path / METRICS_FILE)
    log.add({"kind": "step", "step": 1, "epoch": 1, "loss": 2.5, "infonce": 2.0, "bev": 0.5})
    log.add({"kind": "eval", "step": 1, "epoch": 1, "R@1": 50.0})
    log.flush()
    read = read_run_log(tmp_path)
    assert [r["loss"] for r in read.steps] == [2.5] and read.evals[0]["R@1"] == 50.0
    assert read_summary(tmp_path) == {} and read_eval(tmp_path) is None
    write_summary(tmp_path, {"steps": 1})
    write_eval(tmp_path, {"R@1": 12.5})
    assert read_summary(tmp_path) == {"steps": 1} and read_eval(tmp_path) == {"R@1": 12.5}
    (tmp_path / "eval.json").write_text("{oops")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'eval.json'}: not valid JSON \(.*\)$"):
        read_eval(tmp_path)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nothing'}: no training run here"):
        read_config(tmp_path / "nothing")
