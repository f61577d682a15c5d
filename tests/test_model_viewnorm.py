"""Per-view BatchNorm running statistics of a shared encoder (ssageo.model.viewnorm)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssageo.config import load_config
from ssageo.model import build_model, load_model, save_model

REFERENCE, QUERY = (32, 32), (32, 64)


def _model(*overrides: str) -> tuple[torch.nn.Module, dict]:
    config = load_config("synth-cpu", ["model.backbone=resnet10t", "model.bev.enabled=false",
                                       f"data.reference_size={list(REFERENCE)}",
                                       f"data.query_size={list(QUERY)}", *overrides])
    torch.manual_seed(0)
    return build_model(config["model"], REFERENCE, QUERY), config


def _first_norm(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _train_on_shifted_views(model: torch.nn.Module) -> None:
    """Training passes whose query images are bright (+2) and reference images dark (-2)."""
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(4, 3, *QUERY) + 2, torch.randn(4, 3, *REFERENCE) - 2)


def test_each_view_updates_and_uses_its_own_running_statistics():
    model, _ = _model()
    _train_on_shifted_views(model)
    norm = _first_norm(model)  # its input is the stem conv of the images: signs follow them
    query_mean, reference_mean = norm.running_mean, norm.running_mean_reference
    assert (query_mean - reference_mean).abs().mean() > 0.5
    assert norm.num_batches_tracked == norm.num_batches_tracked_reference == 20
    # eval mode: each view is normalised by its own averages, so an image of the reference
    # distribution gets the descriptor it gets from a copy that only ever saw references
    model.eval()
    images = torch.randn(2, 3, *REFERENCE) - 2
    with torch.no_grad():
        mine = model.embed(images, "reference")
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(m.running_mean_reference)
                m.running_var.copy_(m.running_var_reference)
        torch.testing.assert_close(model.embed(images, "query"), mine)


def test_without_view_statistics_the_averages_mix_both_views():
    model, _ = _model("model.view_norm_stats=false")
    _train_on_shifted_views(model)
    norm = _first_norm(model)
    assert not hasattr(norm, "running_mean_reference")
    assert norm.num_batches_tracked == 40  # both views' passes in one average


def test_view_statistics_round_trip_and_older_weights_load(tmp_path):
    model, config = _model()
    _train_on_shifted_views(model)
    save_model(tmp_path / "new", model.eval(), config)
    loaded, _ = load_model(tmp_path / "new")
    images = torch.randn(2, 3, *REFERENCE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().embed(images, "reference"),
                                   model.embed(images, "reference"))
    # weights saved before per-view statistics: both views start from the shared ones
    state = load_file(tmp_path / "new" / "model.safetensors")
    old = {k: v for k, v in state.items() if not k.endswith("_reference")}
    save_file(old, tmp_path / "new" / "model.safetensors")
    loaded, _ = load_model(tmp_path / "new")
    norm = _first_norm(loaded)
    torch.testing.assert_close(norm.running_mean_reference, norm.running_mean)


def test_pretrained_backbone_weights_give_both_views_their_statistics(tmp_path):
    source, _ = _model()
    _train_on_shifted_views(source)
    backbone = source.encoder("query").backbone
    timm_state = {k: v for k, v in backbone.state_dict().items()
                  if not k.endswith("_reference")}
    save_file(timm_state, tmp_path / "weights.safetensors")
    model, _ = _model(f"model.pretrained={tmp_path / 'weights.safetensors'}")
    norm, trained = _first_norm(model), _first_norm(source)
    torch.testing.assert_close(norm.running_mean, trained.running_mean)
    torch.testing.assert_close(norm.running_mean_reference, trained.running_mean)


@pytest.mark.parametrize("view", ["query", "reference"])
def test_a_traced_encoder_keeps_its_views_statistics(view):
    from ssageo.evaluate.export import PixelEncoder

    model, _ = _model()
    _train_on_shifted_views(model)
    model.eval()
    size = QUERY if view == "query" else REFERENCE
    pixels = torch.randint(0, 256, (1, *size, 3), dtype=torch.uint8)
    encoder = PixelEncoder(model, view).eval()
    other = PixelEncoder(model, "reference" if view == "query" else "query").eval()
    with torch.no_grad():
        traced = torch.jit.trace(encoder, pixels)
        torch.testing.assert_close(traced(pixels), encoder(pixels))
        # ... and not the other view's statistics (they differ after the shifted training)
        assert (traced(pixels) - other(pixels)).abs().max() > 1e-2
