"""The failure catalogue of the command line: every expected failure is one line naming the key
or path, exit status 2, no traceback; Ctrl-C is ``interrupted`` (130); a bug is one line with
its traceback kept in a file. Real commands, real files, real signals."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from ssageo.cli import main
from ssageo.cli.errors import describe, report_bug


def run_main(argv, capsys):
    """Run the real entry point in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def assert_one_line(code, err, *names, status=2):
    assert code == status, err
    assert "Traceback" not in err
    # the one error line ends stderr; lines before it are the run's log (e.g. "[train] ...")
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert not any(line.startswith("error: ") for line in lines[:-1]), err
    err = lines[-1]
    for name in names:
        assert name in err, err


# Refused at start, before any data is read or anything is written.
START_CASES = [
    (["train", "train.batch_size=8.7"], "train.batch_size", "whole number"),
    (["train", "train.batch_size=0"], "train.batch_size", "at least 1"),
    (["train", "train.lr=-1e-3"], "train.lr", "at least 0"),
    (["train", "train.lr=nan"], "train.lr", "finite"),
    (["train", "model.bev.grid_size=0"], "model.bev.grid_size", "at least 1"),
    (["train", "model.bev.depth_bins=-4"], "model.bev.depth_bins", "at least 1"),
    (["train", "data.workers=-1"], "data.workers", "at least 0"),
    (["train", "data.query_size=[64]"], "data.query_size", "two positive whole numbers"),
    (["train", "data.reference_size=big"], "data.reference_size", "two positive"),
    (["train", "eval.every=0"], "eval.every", "at least 1"),
    (["train", "train.checkpoint_every=0"], "train.checkpoint_every", "at least 1"),
    (["train", "train.sampling.similarity=maybe"], "train.sampling.similarity", "true or false"),
    (["train", "train.bacth_size=4"], "train.bacth_size", "did you mean 'batch_size'"),
    (["train", "train.device=tpu"], "train.device", "cuda:N"),
    (["train", "train.lr=!!python/object/apply:os.system ['touch {tmp}/pwned']"],
     "train.lr", "YAML tags are not allowed"),
    (["eval", "--descriptors", "{tmp}/d.npz", "--device", "tpu"], "--device", "unknown device"),
    (["eval", "--descriptors", "{tmp}/d.npz", "--workers", "-1"], "--workers", "0"),
    (["embed", "--checkpoint", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/e.npz",
      "--workers", "-1"], "--workers", "0"),
    (["index", "build", "--checkpoint", "{tmp}", "--out", "{tmp}/i.npz", "--data", "{tmp}",
      "--device", "cuda:x"], "--device", "unknown device"),
    (["index", "build", "--checkpoint", "{tmp}", "--out", "{tmp}/i.npz", "--data", "{tmp}",
      "--workers", "-2"], "--workers", "0"),
    (["locate", "{tmp}/p.jpg", "--index", "{tmp}/i.npz", "--device", "tpu"], "--device", "tpu"),
    (["priors", "{tmp}", "--backend", "oracle", "--threads", "0"], "--threads", "1"),
    (["demo", "--out", "{tmp}/demo", "--budget-minutes", "nan"], "--budget-minutes", "finite"),
    (["demo", "--out", "{tmp}/demo", "--budget-minutes", "inf"], "--budget-minutes", "finite"),
]


@pytest.mark.parametrize(("argv", "key", "what"), START_CASES,
                         ids=[" ".join(c[0][:1] + c[0][-1:]) for c in START_CASES])
def test_bad_values_are_refused_at_start_naming_the_key(argv, key, what, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    code, _, err = run_main(argv, capsys)
    assert_one_line(code, err, key, what)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, nothing run


def test_a_device_this_machine_lacks_is_refused_before_training(tmp_path, capsys):
    # cuda:99 exists nowhere: "no CUDA GPU" here, "has N GPU(s)" on a GPU machine
    code, _, err = run_main(["train", "--data", tmp_path, "--out", tmp_path / "run",
                             "train.device=cuda:99"], capsys)
    assert_one_line(code, err, "train.device=cuda:99")
    code, _, err = run_main(["eval", "--descriptors", tmp_path / "d.npz", "--device", "cuda:99"],
                            capsys)
    assert_one_line(code, err, "--device=cuda:99")


@pytest.mark.parametrize(("args", "key"), [
    (["--device", "tpu"], "--device"),
    (["--set", "priors.device=tpu"], "priors.device"),
    (["--set", "priors.box_threshold=2"], "priors.box_threshold"),
    (["--set", "priors.prompts=[]"], "priors.prompts"),
])
def test_langsam_settings_are_refused_before_any_model_loads(args, key, synth_world, capsys):
    world = synth_world("cvusa")
    code, _, err = run_main(["priors", world, "--backend", "langsam", *args, "--no-progress"],
                            capsys)
    assert_one_line(code, err, key)
    assert not (world / "priors-run.json").exists()


def test_a_batch_larger_than_the_training_places_is_refused(synth_world, tmp_path, capsys):
    code, _, err = run_main(["train", "--data", synth_world("cvusa"), "--out", tmp_path / "run",
                             "train.batch_size=64", "data.workers=0"], capsys)
    assert_one_line(code, err, "train.batch_size=64", "distinct training places")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture()
def mount(tmp_path):
    """``mount(options) -> Path``: a small tmpfs (root only; skipped elsewhere)."""
    mounted = []

    def make(options):
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        if shutil.which("mount") is None or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_a_read_only_output_is_one_line_naming_the_path(mount, capsys):
    read_only = mount("size=64k,ro")
    code, _, err = run_main(["synth", read_only / "world", "--places", "8"], capsys)
    assert_one_line(code, err, str(read_only / "world"))
    assert "read-only" in err.lower()


def test_priors_on_read_only_labels_stop_at_the_first_write(synth_world, mount, tmp_path,
                                                            capsys):
    world = tmp_path / "world"
    shutil.copytree(synth_world("cvusa"), world)
    shutil.rmtree(world / "sat_BEV_label")
    (world / "sat_BEV_label").symlink_to(mount("size=64k,ro"))
    code, out, err = run_main(["priors", world, "--backend", "oracle", "--no-progress"], capsys)
    assert_one_line(code, err, str(world / "sat_BEV_label"), "read-only file system")
    assert "mIoU" not in out


def _descriptors(path: Path) -> Path:
    unit = np.eye(4, dtype=np.float32)
    np.savez(path, query=unit, reference=unit, positive=np.arange(4))
    return path


def test_metrics_json_into_a_directory_or_a_read_only_folder(mount, tmp_path, capsys):
    descriptors = _descriptors(tmp_path / "d.npz")
    (tmp_path / "folder").mkdir()
    code, _, err = run_main(["eval", "--descriptors", descriptors, "--json", tmp_path / "folder"],
                            capsys)
    assert_one_line(code, err, str(tmp_path / "folder"))
    read_only = mount("size=64k,ro")
    code, _, err = run_main(["eval", "--descriptors", descriptors, "--json",
                             read_only / "m.json"], capsys)
    assert_one_line(code, err, str(read_only))
    assert "read-only" in err.lower()


def test_a_full_disk_is_one_line(mount, capsys):
    full = mount("size=16k")
    with pytest.raises(OSError):  # fill it up
        (full / "filler").write_bytes(b"\0" * 2**20)
    code, _, err = run_main(["synth", full / "world", "--places", "8", "--sat-size", "64",
                             "--pano-size", "256x64"], capsys)
    assert_one_line(code, err)
    assert "no space left" in err.lower()


def _bomb_png(path: Path, side: int = 30000) -> None:
    """A valid PNG header claiming side x side pixels: Pillow refuses it at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_decompression_bomb_mask_is_one_line(synth_world, tmp_path, capsys):
    world = tmp_path / "world"
    shutil.copytree(synth_world("cvusa"), world)
    masks = tmp_path / "masks"
    masks.mkdir()
    tile = sorted((world / "bingmap").rglob("*.jpg"))[0]
    _bomb_png(masks / f"{tile.stem}.png")
    code, _, err = run_main(["priors", world, "--backend", "files", "--masks", masks,
                             "--no-progress"], capsys)
    assert_one_line(code, err, "decompression")


def _library_errors(tmp_path: Path):
    """Real exceptions of the loaders we use, from real bad bytes."""
    from PIL import Image
    from safetensors.numpy import load_file

    def bomb():
        _bomb_png(tmp_path / "bomb.png")
        Image.open(tmp_path / "bomb.png")

    def safetensors():
        (tmp_path / "m.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        load_file(tmp_path / "m.safetensors")

    def torch_payload():
        import torch

        class Payload:
            def __reduce__(self):
                return (os.getcwd, ())

        torch.save({"x": Payload()}, tmp_path / "state.pt")
        torch.load(tmp_path / "state.pt", weights_only=True)

    def truncated_npz():
        np.savez(tmp_path / "d.npz", a=np.zeros(1000))
        data = (tmp_path / "d.npz").read_bytes()
        (tmp_path / "d.npz").write_bytes(data[: len(data) // 2])
        np.load(tmp_path / "d.npz")["a"]

    return {
        "decompression bomb": (bomb, "decompression-bomb"),
        "safetensors": (safetensors, ".safetensors"),
        "pickle payload": (torch_payload, "checkpoint"),
        "truncated npz": (truncated_npz, "zip"),
        "empty pickle": (lambda: pickle.loads(b""), "ended early"),
        "bad zip": (lambda: zipfile.ZipFile(BytesIO(b"nope")), "zip"),
        "json": (lambda: json.loads('{"a": '), "JSON"),
        "binary text": (lambda: b"\xff\xfe\x00".decode("utf-8"), "UTF-8"),
        "directory": (lambda: open(tmp_path, "w"), f"{tmp_path}: is a directory"),
        "no folder": (lambda: open(tmp_path / "no" / "x", "w"), "no such file"),
    }


@pytest.mark.parametrize("case", list(_library_errors(Path("."))))
def test_library_errors_become_one_line(case, tmp_path):
    raise_it, expected = _library_errors(tmp_path)[case]
    with pytest.raises(Exception) as info:  # noqa: PT011 - each case raises its own kind
        raise_it()
    message = describe(info.value)
    assert message is not None and expected in message and "\n" not in message, message


def test_an_error_in_a_loader_worker_keeps_only_its_message():
    import torch

    from ssageo.io import DataError

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise DataError("/data/x.jpg: cannot decode image")

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)  # what torch hands back
    assert describe(info.value) == "/data/x.jpg: cannot decode image"


def test_a_bug_is_one_line_with_the_traceback_kept(tmp_path):
    try:
        {}["missing"]
    except KeyError as exc:
        assert describe(exc) is None  # not an expected failure
        line = report_bug(exc)
    assert "\n" not in line and "internal error" in line and "KeyError" in line
    saved = Path(line.split("traceback saved to ")[1].split(";")[0])
    assert "Traceback" in saved.read_text() and "missing" in saved.read_text()
    saved.unlink()


SCRIPT = textwrap.dedent("""
    import sys, time
    from ssageo.cli import app, main

    @app.command("wait")
    def wait():
        print("ready", flush=True)
        time.sleep(60)

    @app.command("boom")
    def boom():
        return 1 / 0

    main(sys.argv[1:])
""")


def _default_sigint() -> None:
    # As at a terminal: a job started in the background (CI under `cmd &`) inherits SIGINT
    # ignored, and a process that starts with it ignored rightly keeps ignoring Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _script(*args, env=None):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=_default_sigint)


def test_ctrl_c_is_interrupted_and_status_130():
    proc = _script("wait")
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip() == "error: interrupted"


def test_a_bug_in_a_command_is_one_line_unless_debugging():
    proc = _script("boom")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err and err.strip().count("\n") == 0
    assert "internal error" in err and "ZeroDivisionError" in err
    Path(err.split("traceback saved to ")[1].split(";")[0]).unlink()
    proc = _script("boom", env={"SSAGEO_DEBUG": "1"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" in err and "ZeroDivisionError" in err


def test_usage_errors_are_one_line(capsys):
    code, _, err = run_main(["eval", "--no-such-option"], capsys)
    assert_one_line(code, err, "--no-such-option", "eval --help")
