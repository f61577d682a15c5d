"""The CLI starts without torch, and shows the library's log records (the library never prints)."""

import logging
import subprocess
import sys

import pytest

from ssageo.cli import console


def _imported(*args: str) -> set[str]:
    """Modules a fresh interpreter imports for ``python -X importtime ARGS``."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


@pytest.mark.parametrize("args", [
    ("-c", "import ssageo"),
    ("-m", "ssageo", "--help"),
    ("-m", "ssageo", "--version"),
    ("-m", "ssageo", "train", "--help"),
])
def test_import_and_help_do_not_import_torch(args):
    modules = _imported(*args)
    assert "ssageo" in modules  # the measurement sees our imports at all
    assert not {"torch", "torchvision", "timm"} & modules


def test_records_are_shown_on_stderr_with_training_tagged(capsys):
    console.install()
    console.install()  # once only: a second install adds no second handler
    handlers = logging.getLogger("ssageo").handlers
    assert sum(isinstance(h, console.CliHandler) for h in handlers) == 1
    long_path = "/a/" + "x" * 150
    logging.getLogger("ssageo.train.loop").info("resumed from %s", long_path)
    logging.getLogger("ssageo.priors.run").error("failed %s: %s", "t.png", "bad")
    logging.getLogger("ssageo.demo").debug("not shown")
    out, err = capsys.readouterr()
    assert out == ""
    # one line each, never wrapped (a path stays whole for grep and for tests)
    assert err.splitlines() == [f"[train] resumed from {long_path}", "failed t.png: bad"]


def test_a_record_during_a_tqdm_bar_is_written_above_it(capsys):
    from tqdm import tqdm

    console.install()
    with tqdm(total=3, file=sys.stderr, desc="bar") as bar:
        bar.update(1)
        logging.getLogger("ssageo.train.loop").info("validation: every epoch")
        bar.update(1)
    err = capsys.readouterr().err
    # the bar's line is cleared before the message, so the message starts a line of its own
    assert "\n[train] validation: every epoch\n" in err.replace("\r", "\n")
