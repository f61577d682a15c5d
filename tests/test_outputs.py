"""What the commands that write a user-named file do with the path: never replace a file of
another kind (a checkpoint's weights, a run's config) or write into a folder name; replace a
file of their own kind only with --force; a full disk or a read-only folder ends in one line
naming the path (exit 2), with no partial file left under the real name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from faults import needs_namespaces, run_faulty, ssageo
from ssageo.cli import app, main
from ssageo.evaluate.descriptors import save_descriptors
from ssageo.evaluate.index import GeoIndex
from ssageo.io import read_image, write_image
from ssageo.report.html import page
from test_descriptors import vigor_like
from test_index import make_checkpoint


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A checkpoint, a tiles CSV, a descriptor file and one genuine file of each output kind."""
    root = tmp_path_factory.mktemp("outputs")
    lines = []
    rng = np.random.default_rng(0)
    for i in range(4):
        tile = np.kron(rng.integers(0, 256, size=(4, 4, 3)), np.ones((16, 16, 1)))
        write_image(root / f"t{i}.png", tile.astype(np.uint8))
        lines.append(f"t{i}.png,47.{i},8.{i}")
    (root / "tiles.csv").write_text("\n".join(lines) + "\n")
    checkpoint = make_checkpoint(root / "ckpt")
    save_descriptors(root / "d.npz", vigor_like())
    kinds = root / "kinds"
    kinds.mkdir()
    index = ["index", "build", "--checkpoint", checkpoint, "--tiles", root / "tiles.csv"]
    for args in ([*index, "--out", kinds / "index.npz"],
                 ["eval", "--descriptors", root / "d.npz", "--json", kinds / "metrics.json"]):
        result = CliRunner().invoke(app, list(map(str, args)))
        assert result.exit_code == 0, result.output
    shutil.copy(root / "d.npz", kinds / "descriptors.npz")
    (kinds / "report.html").write_text(page("ssageo report: run", "written now", []))
    commands = {  # command line up to its output option, and the genuine file of its kind
        "index build": ([*index, "--out"], "index.npz"),
        "embed": (["embed", "--checkpoint", checkpoint, "--data", root / "no-data", "--out"],
                  "descriptors.npz"),
        "eval --json": (["eval", "--descriptors", root / "d.npz", "--json"], "metrics.json"),
        "report": (["report", root / "no-run", "--out"], "report.html"),
    }
    return {"root": root, "checkpoint": checkpoint, "kinds": kinds, "commands": commands}


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(*args)``: the real ``ssageo`` entry point in this process -> CompletedProcess."""

    def run(*args) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["ssageo", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run


def _one_line_error(result, *needles) -> None:
    """Exit 2 and one ``error:`` line (the last; progress bars may come before), no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error") for line in lines) == 1, result.stderr
    for needle in needles:
        assert str(needle) in lines[-1], result.stderr


COMMANDS = ("index build", "embed", "eval --json", "report")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("target", ["weights", "config", "folder", "same kind"])
def test_an_existing_output_is_never_replaced_silently(made, cli, tmp_path, command, target):
    argv, kind = made["commands"][command]
    if target == "folder":
        out = tmp_path / "a-folder"
        out.mkdir()
        if command == "index build":  # a folder is a sharded index: one with other files is not
            (out / "notes.txt").write_text("mine")
            _one_line_error(cli(*argv, out), out, "exists and is not an ssageo index folder")
            assert [p.name for p in out.iterdir()] == ["notes.txt"]
            return
        _one_line_error(cli(*argv, out), out, "is a folder")
        return
    source = {"weights": made["checkpoint"] / "model.safetensors",
              "config": made["checkpoint"] / "config.yaml",
              "same kind": made["kinds"] / kind}[target]
    out = tmp_path / source.name
    shutil.copy(source, out)
    before = out.read_bytes()
    result = cli(*argv, out)
    if target == "same kind":
        _one_line_error(result, out, "already exists; pass --force")
    else:
        _one_line_error(result, out, "exists and is not", "refusing to replace it")
        # --force does not change that: it replaces files of the command's own kind only
        _one_line_error(cli(*argv, out, "--force"), out, "exists and is not")
    assert out.read_bytes() == before


def test_force_replaces_a_file_of_the_same_kind(made, cli, tmp_path):
    argv, _ = made["commands"]["index build"]
    out = tmp_path / "index.npz"
    shutil.copy(made["kinds"] / "index.npz", out)
    before = out.stat().st_ino
    assert cli(*argv, out, "--force").returncode == 0
    # rebuilt: a new file renamed into place (the bytes can be equal within the same second)
    assert out.stat().st_ino != before
    GeoIndex.load(out)
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"R@1": 0.0, "queries": 1, "gallery": 1}')
    argv, _ = made["commands"]["eval --json"]
    assert cli(*argv, metrics, "--force").returncode == 0
    assert json.loads(metrics.read_text())["queries"] == 30


@needs_namespaces
@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_output_folder_is_refused_before_any_work(made, tmp_path, command):
    argv, kind = made["commands"][command]
    folder = tmp_path / "read-only"
    result, left = run_faulty("read_only", folder, [*ssageo(*argv), folder / kind])
    _one_line_error(result, folder / kind, "cannot write: read-only file system")
    assert left == {}


@needs_namespaces
@pytest.mark.slow
@pytest.mark.parametrize("command", ["index build", "eval --json"])
def test_a_full_disk_ends_in_one_line_and_leaves_no_file(made, tmp_path, command):
    argv, kind = made["commands"][command]
    folder = tmp_path / "full"
    result, left = run_faulty("full", folder, [*ssageo(*argv), folder / kind], fill=True)
    _one_line_error(result, folder / kind, "no space left on device")
    assert left == {}  # neither the output nor a temporary file


@needs_namespaces
@pytest.mark.slow
def test_embed_on_a_full_disk(synth_world, made, tmp_path):
    folder = tmp_path / "full"
    argv = ssageo("embed", "--checkpoint", made["checkpoint"], "--data", synth_world("cvusa"),
                  "--workers", "0", "--device", "cpu", "--out", folder / "d.npz")
    result, left = run_faulty("full", folder, argv, size_kb=8)  # room for a part of the file
    _one_line_error(result, folder / "d.npz", "no space left on device")
    assert left == {}


@needs_namespaces
@pytest.mark.slow
def test_synth_on_a_full_disk_stops_with_one_line_and_only_whole_images(tmp_path):
    folder = tmp_path / "full"
    argv = ssageo("synth", folder / "world", "--places", "8", "--sat-size", "64",
                  "--pano-size", "256x64", "--workers", "1")
    result, left = run_faulty("full", folder, argv, size_kb=96)
    _one_line_error(result, "no space left on device", folder / "world")
    images = {k: v for k, v in left.items() if k.endswith((".jpg", ".png"))}
    assert images, "the disk filled before any image: make size_kb larger"
    assert all(state == "ok" for _, state in images.values()), images  # no truncated image
    assert not [k for k in left if k.rsplit("/", 1)[-1].startswith(".")]  # no temporary file


@needs_namespaces
@pytest.mark.slow
def test_synth_and_priors_into_a_read_only_folder_or_a_full_disk(synth_world, tmp_path):
    folder = tmp_path / "read-only"
    result, _ = run_faulty("read_only", folder, ssageo("synth", folder / "w", "--places", "8"))
    _one_line_error(result, folder / "w", "read-only file system")
    world = shutil.copytree(synth_world("cvusa"), tmp_path / "world")
    result, _ = run_faulty("read_only", world, ssageo(
        "priors", world, "--backend", "oracle", "--force", "--no-progress"))
    # the first write is the run's record of its parameters, or else a label
    _one_line_error(result, world, "read-only file system")
    assert "failed" not in result.stdout  # stopped at the first tile, not one failure per tile
    labels = world / "sat_BEV_label"  # now a full disk where the labels go
    result, left = run_faulty("full", labels, ssageo(
        "priors", world, "--backend", "oracle", "--force", "--no-progress"), fill=True)
    _one_line_error(result, labels, "no space left on device")
    assert "failed" not in result.stdout and left == {}


def test_a_short_write_never_renames_a_truncated_image_into_place(tmp_path):
    """RLIMIT_FSIZE (``ulimit -f``; Python ignores SIGXFSZ, so the write fails with EFBIG): the
    encoder's write is cut short, as on a disk that fills up in the middle of a file."""
    script = (
        "import resource, sys, numpy as np\n"
        "from ssageo.io import write_image, OutputError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)\n"
        "try:\n"
        "    write_image(sys.argv[1], image)\n"
        "except OutputError as exc:\n"
        "    print(exc)\n")
    out = tmp_path / "big.jpg"
    write_image(out, np.zeros((8, 8, 3), np.uint8))  # the previous, whole image
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{out}: cannot write: file too large" in result.stdout
    assert read_image(out).shape == (8, 8, 3)  # the old image, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jpg"]
