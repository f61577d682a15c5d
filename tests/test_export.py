"""``ssageo export`` (ONNX, TorchScript) and the torch-free deployment path (``--onnx``)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.data.transforms import resize, to_tensor
from ssageo.evaluate.index import GeoIndex, Localizer
from ssageo.io import DataError, read_image, write_image
from ssageo.model import load_model
from test_index import make_checkpoint

ort = pytest.importorskip("onnxruntime", reason="pip install 'ssageo[onnx]'")

N_TILES = 6


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Six tiles with coordinates, a small checkpoint (query input 64x64, like its tiles), its
    query encoder as ONNX and TorchScript and its reference encoder as ONNX."""
    from ssageo.evaluate.export import export_encoder

    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(1)
    lines = ["path,lat,lon"]
    for i in range(N_TILES):
        tile = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((16, 16, 1))).astype(np.uint8)
        write_image(root / "tiles" / f"t{i}.png", tile)
        lines.append(f"tiles/t{i}.png,{46 + i * 1e-3},{7 + i * 2e-3}")
    (root / "tiles.csv").write_text("\n".join(lines) + "\n")
    checkpoint = make_checkpoint(root / "ckpt")
    runner = CliRunner()
    for fmt, name in (("onnx", "query.onnx"), ("torchscript", "query.pt")):
        result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--format", fmt,
                                     "--view", "query", "--out", str(root / name)])
        assert result.exit_code == 0, result.output
        assert "max difference to PyTorch" in " ".join(result.output.split())
    export_encoder(checkpoint, "onnx", "reference", root / "reference.onnx")
    return {"root": root, "checkpoint": checkpoint,
            "tiles": [root / "tiles" / f"t{i}.png" for i in range(N_TILES)]}


def _torch_descriptors(checkpoint, images, view="query"):
    model, config = load_model(checkpoint)
    norm = model.data_config()
    size = config["data"][f"{view}_size"]
    x = torch.stack([to_tensor(resize(im, size), norm["mean"], norm["std"]) for im in images])
    with torch.inference_mode():
        return model.eval().embed(x, view=view).numpy()


def _odd_images():
    """Five images of another size than the model's input: the caller resizes them."""
    rng = np.random.default_rng(2)
    return [np.kron(rng.integers(0, 256, (5, 4, 3)), np.ones((16, 20, 1))).astype(np.uint8)
            for _ in range(5)]


def test_onnx_file_runs_in_onnxruntime_and_equals_pytorch(exported):
    path = exported["root"] / "query.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,), (out,) = session.get_inputs(), session.get_outputs()
    assert (feed.name, feed.type, feed.shape[1:]) == ("pixels", "tensor(uint8)", [64, 64, 3])
    assert isinstance(feed.shape[0], str) and out.name == "descriptors"  # dynamic batch
    record = json.loads(session.get_modelmeta().custom_metadata_map["ssageo"])
    assert record["input_size"] == [64, 64] and record["view"] == "query"
    assert record["checkpoint"] == str(exported["checkpoint"].resolve())

    images = _odd_images()  # a batch of 5: neither the traced 2 nor the checked 3
    pixels = np.stack([resize(im, (64, 64)) for im in images])
    got = session.run(None, {"pixels": pixels})[0]
    expected = _torch_descriptors(exported["checkpoint"], images)
    assert got.shape == (5, 320)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_file_equals_pytorch_and_records_its_input(exported):
    path = exported["root"] / "query.pt"
    extra = {"ssageo.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    record = json.loads(extra["ssageo.json"])
    assert record["input_size"] == [64, 64] and record["kind"] == "torchscript"
    images = _odd_images()[:4]
    pixels = torch.from_numpy(np.stack([resize(im, (64, 64)) for im in images]))
    with torch.inference_mode():
        got = module(pixels).numpy()
    np.testing.assert_allclose(got, _torch_descriptors(exported["checkpoint"], images),
                               atol=1e-4, rtol=0)
    assert zipfile.is_zipfile(path)


def test_export_refuses_to_replace_without_force(exported, tmp_path):
    runner = CliRunner()
    base = ["export", "--checkpoint", str(exported["checkpoint"])]
    result = runner.invoke(app, [*base, "--out", str(exported["root"] / "query.onnx")])
    assert result.exit_code != 0 and "already exists; pass --force" in str(result.exception)
    notes = tmp_path / "notes.onnx"
    notes.write_text("mine")
    result = runner.invoke(app, [*base, "--out", str(notes), "--force"])
    assert "is not an `ssageo export` file" in str(result.exception)
    assert notes.read_text() == "mine"
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "x.onnx"), "--view", "side"])
    assert "--view must be one of query, reference" in str(result.exception)
    assert not (tmp_path / "x.onnx").exists()


# A fresh interpreter in which torch cannot be imported: the deployment path must not need it.
_NO_TORCH = """
import json, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError("torch is not available here: " + name)
sys.meta_path.insert(0, NoTorch())
from ssageo.cli import main
try:
    main(sys.argv[1:])
finally:
    assert not any(m.split(".")[0] == "torch" for m in sys.modules)
"""


def _no_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True,
                          text=True, timeout=120)


def test_onnx_index_build_equals_pytorch_and_locate_runs_without_torch(exported):
    root = exported["root"]
    runner = CliRunner()
    built = runner.invoke(app, ["index", "build", "--onnx", str(root / "reference.onnx"), "--tiles",
                                str(root / "tiles.csv"), "--out", str(root / "onnx.npz")])
    assert built.exit_code == 0, built.output
    onnx_index = GeoIndex.load(root / "onnx.npz")
    assert onnx_index.metadata["checkpoint"] == str(exported["checkpoint"].resolve())
    # the PyTorch index of the same tiles holds the same descriptors
    result = runner.invoke(app, ["index", "build", "--checkpoint", str(exported["checkpoint"]),
                                      "--tiles", str(root / "tiles.csv"),
                                      "--out", str(root / "torch.npz")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(onnx_index.descriptors, GeoIndex.load(root / "torch.npz")
                               .descriptors, atol=1e-4, rtol=0)

    query = root / "odd.png"  # 80x80: resized by each path before the encoder
    write_image(query, resize(read_image(exported["tiles"][3]), (80, 80)))
    located = _no_torch("locate", "--onnx", str(root / "query.onnx"), "--index",
                        str(root / "torch.npz"), "--json", "--top-k", "3", str(query))
    assert located.returncode == 0, located.stderr
    got = json.loads(located.stdout)[0]["results"]
    expected = Localizer(root / "torch.npz").locate(query, top_k=3)
    assert [h["tile"] for h in got] == [h["tile"] for h in expected]
    assert got[0]["tile"] == str(exported["tiles"][3])
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in expected],
                               atol=1e-4)


def test_onnx_files_that_do_not_fit_are_refused_in_one_line(exported, tmp_path):
    from ssageo.evaluate.deploy import OnnxLocalizer

    root = exported["root"]
    with pytest.raises(DataError, match=r"reference\.onnx: holds the reference encoder; "
                                        r"--onnx here needs the query encoder"):
        OnnxLocalizer(root / "torch.npz", root / "reference.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage")
    located = _no_torch("locate", "--onnx", str(junk), "--index", str(root / "torch.npz"),
                        str(exported["tiles"][0]))
    assert located.returncode == 2
    assert located.stderr.startswith(f"error: {junk}: not a usable ONNX model")
    assert len(located.stderr.strip().splitlines()) == 1
