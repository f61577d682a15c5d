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


# The reference values each preset must carry (docs/FIDELITY.md gives the source lines): SSA's
# model_training/train_cvusa.py, train_cvact.py, train_vigor_DP.py; Sample4Geo's train_*.py.
_SSA = {"train.epochs": 100, "train.batch_size": 32, "train.lr": 1e-4, "train.warmup_epochs": 1,
        "train.weight_decay": 0.01, "train.clip_grad_norm": 100.0, "train.clip_grad_value": None,
        "train.amp": "fp16",
        "train.sampling.neighbour_select": 32, "train.sampling.neighbour_range": 64,
        "train.sampling.similarity": True, "train.sampling.similarity_start": 4,
        "train.sampling.similarity_every": 4, "eval.every": 4, "model.bev.enabled": True,
        "loss.logit_scale_multiplier": 1.5, "loss.label_smoothing": 0.1,
        "data.reference_size": [384, 384], "data.augment.photometric": True,
        "data.augment.flip": 0.5, "data.augment.rotate": 0.75,
        "data.augment.hole_size_from": "reference"}
_S4G = {**_SSA, "train.epochs": 40, "train.batch_size": 128, "train.lr": 1e-3,
        "train.sampling.neighbour_select": 64, "train.sampling.neighbour_range": 128,
        "train.sampling.first": "gps", "model.bev.enabled": False,
        "train.clip_grad_norm": None, "train.clip_grad_value": 100.0,
        "loss.logit_scale_multiplier": 1.0, "data.augment.hole_size_from": "view"}
_CVUSA = {"data.dataset": "cvusa", "data.query_size": [140, 768]}
_VIGOR = {"data.dataset": "vigor", "data.query_size": [384, 768]}
PRESETS = {
    "cvusa": {**_SSA, **_CVUSA, "train.sampling.first": "random"},
    "cvact": {**_SSA, **_CVUSA, "data.dataset": "cvact", "train.sampling.first": "similarity"},
    "vigor-same": {**_SSA, **_VIGOR, "data.vigor_mode": "same-area",
                   "train.sampling.neighbour_range": 128, "train.sampling.first": "random"},
    "vigor-cross": {**_SSA, **_VIGOR, "data.vigor_mode": "cross-area",
                    "train.sampling.neighbour_range": 128, "train.sampling.first": "random"},
    "sample4geo-cvusa": {**_S4G, **_CVUSA},
    "sample4geo-cvact": {**_S4G, **_CVUSA, "data.dataset": "cvact"},
    "sample4geo-vigor-same": {**_S4G, **_VIGOR, "data.vigor_mode": "same-area"},
    "sample4geo-vigor-cross": {**_S4G, **_VIGOR, "data.vigor_mode": "cross-area"},
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_real_presets_carry_the_reference_values(name):
    from ssageo.config import get

    cfg = load_config(name)
    got = {key: get(cfg, key, "<missing>") for key in PRESETS[name]}
    assert got == PRESETS[name]
    assert cfg["train"]["sampling"]["gps_k"] >= cfg["train"]["sampling"]["neighbour_range"]
    # every preset names the reference script it follows
    from importlib import resources

    head = (resources.files("ssageo") / "configs" / f"{name}.yaml").read_text("utf-8")
    assert "train_" in head.split("_base_")[0]
