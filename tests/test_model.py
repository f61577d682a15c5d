"""The SSA model: forward/embed, paper-size shapes, save/load, pretrained weights."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from ssageo.config import ConfigError, load_config
from ssageo.io import DataError
from ssageo.model import build_model, load_model, load_pretrained, load_weights, save_model

REF, QUERY = (64, 64), (64, 256)


@pytest.fixture(scope="module")
def config() -> dict:
    return load_config("synth-cpu", ["model.backbone=convnext_atto"])


def _model(config: dict, **changes):
    cfg = copy.deepcopy(config["model"])
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    torch.manual_seed(0)
    return build_model(cfg, REF, QUERY)


def test_forward_gives_normalised_descriptors_and_bev_only_in_training(config):
    model = _model(config)
    query, reference = torch.randn(3, 3, *QUERY), torch.randn(3, 3, *REF)
    out = model.train()(query, reference)
    assert out["query"].shape == out["reference"].shape == (3, 320)
    torch.testing.assert_close(out["query"].norm(dim=1), torch.ones(3))
    side = 8 * config["model"]["bev"]["grid_size"]
    assert out["bev_logits"].shape == (3, 2, side, side)
    assert out["logit_scale"].item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
    model.eval()
    with torch.no_grad():
        out = model(query, None)
        assert out["bev_logits"] is None and out["reference"] is None
        torch.testing.assert_close(out["query"], model.embed(query, "query"))
        assert model(None, reference, with_bev=True)["query"] is None


def test_bev_disabled_and_separate_encoders(config):
    model = _model(config, **{"bev.enabled": False, "shared_encoder": False}).train()
    assert model.bev is None
    assert model.encoder("query") is not model.encoder("reference")
    out = model(torch.randn(2, 3, *QUERY), torch.randn(2, 3, *REF))
    assert out["bev_logits"] is None
    shared = _model(config, **{"bev.enabled": False})
    assert shared.encoder("query") is shared.encoder("reference")
    encoder_params = sum(p.numel() for p in shared.encoder("query").parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in shared.parameters()) + encoder_params


def test_data_config_comes_from_timm(config):
    import timm
    import timm.data

    expected = timm.data.resolve_data_config({}, model=timm.create_model("convnext_atto"))
    cfg = _model(config).data_config()
    assert cfg["mean"] == tuple(expected["mean"]) and cfg["std"] == tuple(expected["std"])


def test_paper_configuration_shapes_on_the_meta_device():
    cfg = {"backbone": "convnext_base", "pretrained": None, "shared_encoder": True,
           "bev": {"enabled": True, "depth_bins": 96, "grid_size": 48, "classes": 2,
                   "lean": False}}
    with torch.device("meta"):
        model = build_model(cfg, (384, 384), (384, 768)).train()
        # depth conv 25,214,976 + the reference decoder (SSA's MLSP) 3,781,954
        assert sum(p.numel() for p in model.bev.parameters()) == 28_996_930
        query, reference = torch.empty(2, 3, 384, 768), torch.empty(2, 3, 384, 384)
        assert model.encoder("query").trunk(query).shape == (2, 512, 24, 48)
        assert model.encoder("reference").trunk(reference).shape == (2, 512, 24, 24)
        out = model(query, reference)
    assert out["query"].shape == out["reference"].shape == (2, 1024)
    assert out["bev_logits"].shape == (2, 2, 384, 384)


def test_save_and_load_round_trip(tmp_path, config):
    model = _model(config).eval()
    save_model(tmp_path / "ckpt", model, config)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.yaml", "model.safetensors"]
    loaded, loaded_cfg = load_model(tmp_path / "ckpt")
    assert loaded_cfg == config
    images = torch.randn(2, 3, *QUERY)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(images), model.embed(images))
    # the weights file itself also works
    assert load_model(tmp_path / "ckpt" / "model.safetensors")[0].bev is not None


def test_weights_of_another_configuration_are_refused_with_the_keys(tmp_path, config):
    save_model(tmp_path, _model(config), config)
    other = _model(config, **{"bev.depth_bins": 8})
    with pytest.raises(DataError, match=r"bev\.projection\.depth\.weight: file \(2560, 160"):
        load_weights(other, tmp_path / "model.safetensors")
    no_bev = _model(config, **{"bev.enabled": False})
    with pytest.raises(DataError, match=r"not in model: bev\."):
        load_weights(no_bev, tmp_path / "model.safetensors")


def test_save_refuses_a_config_that_does_not_describe_the_model(tmp_path, config):
    other = copy.deepcopy(config)
    other["model"]["backbone"] = "resnet18"
    with pytest.raises(ConfigError):
        save_model(tmp_path, _model(config), other)


def test_pretrained_sample4geo_checkpoint_and_timm_state_dict(tmp_path, config):
    import timm

    source = timm.create_model("convnext_atto", pretrained=False)
    # Sample4Geo layout: the timm model under "model.", plus its logit_scale
    ckpt = {f"model.{k}": v for k, v in source.state_dict().items() if not k.startswith("head.fc")}
    ckpt["logit_scale"] = torch.tensor(2.5)
    torch.save(ckpt, tmp_path / "s4g.pth")
    model = _model(config, pretrained=str(tmp_path / "s4g.pth"))
    torch.testing.assert_close(model.encoder("query").backbone.stem[0].weight,
                               source.stem[0].weight)
    assert model.logit_scale.item() == pytest.approx(2.5)
    # a plain timm state dict with its classifier and one tensor left out
    state = {k: v for k, v in source.state_dict().items() if k != "stem.1.bias"}
    save_file(state, str(tmp_path / "timm.safetensors"))
    report = load_pretrained(_model(config), tmp_path / "timm.safetensors")
    assert report == {"missing": ["stem.1.bias"], "unexpected": []}


def test_pretrained_weights_of_another_backbone_fail_clearly(tmp_path, config):
    import timm

    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(DataError, match="no key matches a convnext_atto"):
        _model(config, pretrained=str(tmp_path / "r18.pth"))
    with pytest.raises(DataError, match="weights file not found"):
        _model(config, pretrained=str(tmp_path / "missing.pth"))
