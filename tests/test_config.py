import pytest

from ssageo.config import ConfigError, config_hash, load_config, preset_names, save_config


def test_default_preset_loads_and_overrides_parse_as_yaml():
    cfg = load_config("synth-cpu", ["model.bev.enabled=false", "data.query_size=[32,128]"])
    assert cfg["model"]["bev"]["enabled"] is False
    assert cfg["data"]["query_size"] == [32, 128]
    assert "synth-cpu" in preset_names()


def test_unknown_key_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="did you mean 'backbone'"):
        load_config("synth-cpu", ["model.backbon=resnet18"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config("synth-cpu", ["model.backbone"])


def test_file_preset_with_base_and_roundtrip(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("_base_: synth-cpu\nmodel:\n  backbone: resnet34\n")
    cfg = load_config(f)
    assert cfg["model"]["backbone"] == "resnet34"
    assert cfg["model"]["bev"]["depth_bins"] == load_config()["model"]["bev"]["depth_bins"]
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert config_hash(cfg["model"]) != config_hash(load_config()["model"])


def test_missing_file_and_unknown_preset():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope/missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")
