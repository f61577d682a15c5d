"""Helpers the run-directory tests share: the CLI in a real process, a run's logged steps, and
two checkpoints' weights compared."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = ["model.backbone=convnext_atto", "data.workers=0", "train.batch_size=4",
        "train.epochs=2", "train.max_steps_per_epoch=3"]


def cli(*args, cwd=None, **kwargs):
    env = dict(os.environ, COLUMNS="400")  # one error line, not wrapped
    return [sys.executable, "-m", "ssageo", *map(str, args)], dict(env=env, cwd=cwd, **kwargs)


def run_cli(*args, cwd=None, timeout=600):
    cmd, kw = cli(*args, cwd=cwd)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def start_cli(*args):
    cmd, kw = cli(*args)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **kw)


def wait_for(path: Path, proc, seconds=300):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def steps(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "step"]


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key

