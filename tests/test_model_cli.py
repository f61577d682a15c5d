"""``ssageo model info`` and the model summary behind it."""

from __future__ import annotations

from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.config import ConfigError, load_config
from ssageo.model import build_model
from ssageo.model.summary import model_info


def test_model_info_counts_parameters_and_traces_the_paper_shapes():
    cfg = load_config("synth-cpu", ["model.backbone=convnext_base", "model.bev.depth_bins=96",
                                    "model.bev.grid_size=48", "data.query_size=[384,768]",
                                    "data.reference_size=[384,384]"])
    info = model_info(cfg)
    rows = {row["module"]: row for row in info["stages"]}
    assert rows["stages.2"]["query"] == (512, 24, 48)
    assert rows["stages.2"]["reference"] == (512, 24, 24)
    assert rows["forward_head (pool + norm)"]["query"] == (1024,)
    assert rows["decoder logits"]["query"] == (2, 384, 384)
    assert info["parameters"] == sum(info["parts"].values())


def test_model_info_parameters_match_the_built_model():
    cfg = load_config("synth-cpu")
    model = build_model(cfg["model"], cfg["data"]["reference_size"], cfg["data"]["query_size"])
    assert model_info(cfg)["parameters"] == sum(p.numel() for p in model.parameters())


def test_cli_prints_the_table_and_refuses_a_model_without_a_stride_16_map():
    runner = CliRunner()
    result = runner.invoke(app, ["model", "info", "--config", "synth-cpu",
                                 "model.backbone=resnet18", "model.bev.enabled=false"])
    assert result.exit_code == 0, result.output
    assert "resnet18 (ResNet)" in result.output and "layer3" in result.output
    assert "256 x 4 x 16" in result.output  # layer3 of a 64 x 256 panorama
    bad = runner.invoke(app, ["model", "info", "model.backbone=vit_small_patch32_224"])
    assert bad.exit_code != 0 and "no stride-16 feature map" in str(bad.exception)


def test_cli_names_where_the_weights_come_from_without_reading_them(tmp_path):
    runner = CliRunner()
    weights = tmp_path / "w.safetensors"
    for overrides, expected in (
        ([], "weights: random initialisation (model.pretrained: none)"),
        ([f"model.pretrained={weights}"], f"weights: local file {weights} (not found)"),
        (["model.pretrained=true"], "model.pretrained must be 'timm'"),
        (["model.pretrained=timm", "model.backbone=convnext_atto_rms"],
         "timm has no weights on the Hugging Face hub for 'convnext_atto_rms'"),
    ):
        result = runner.invoke(app, ["model", "info", "model.bev.enabled=false", *overrides])
        assert result.exit_code == 0, result.output
        # rich folds long lines, also inside a path: compare without whitespace
        assert "".join(expected.split()) in "".join(result.output.split()), result.output
    weights.write_bytes(b"")
    result = runner.invoke(app, ["model", "info", f"model.pretrained={weights}"])
    packed = "".join(result.output.split())  # rich folds long paths
    assert f"weights:localfile{weights}" in packed and "(notfound)" not in packed


def test_a_hub_repo_id_without_the_hf_hub_prefix_is_a_config_error():
    bad = CliRunner().invoke(app, ["model", "info", "model.backbone=timm/resnet18.a1_in1k"])
    assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError)
    assert "Use 'hf-hub:timm/resnet18.a1_in1k'" in str(bad.exception)
