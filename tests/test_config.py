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


@pytest.mark.parametrize(
    ("override", "key", "what"),
    [
        ("train.batch_size=8.7", "train.batch_size", "whole number"),
        ("train.batch_size=0", "train.batch_size", "at least 1"),
        ("train.batch_size=true", "train.batch_size", "must be a number"),
        ("train.lr=-0.1", "train.lr", "at least 0"),
        ("train.lr=.inf", "train.lr", "finite"),
        ("train.lr=fast", "train.lr", "must be a number"),
        ("model.bev.grid_size=0", "model.bev.grid_size", "at least 1"),
        ("model.bev.depth_bins=-1", "model.bev.depth_bins", "at least 1"),
        ("data.workers=-1", "data.workers", "at least 0"),
        ("data.query_size=[64]", "data.query_size", "two positive whole numbers"),
        ("data.query_size=[64,-256]", "data.query_size", "two positive whole numbers"),
        ("data.reference_size=[64.5,64]", "data.reference_size", "two positive whole numbers"),
        ("data.prior_size=8", "data.prior_size", "two positive whole numbers"),
        ("eval.every=0", "eval.every", "at least 1"),
        ("train.checkpoint_every=0", "train.checkpoint_every", "at least 1"),
        ("data.augment.flip=1.5", "data.augment.flip", "at most 1"),
        ("data.dataset=kitti", "data.dataset", "one of auto, cvusa"),
        ("train.device=tpu", "train.device", "unknown device"),
        ("train.device=cuda:", "train.device", "unknown device"),
        ("train.threads=0", "train.threads", "at least 1"),
        ("train.clip_grad_norm=0", "train.clip_grad_norm", "above 0"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key, what):
    with pytest.raises(ConfigError, match=f"^{key}: .*{what}"):
        load_config("synth-cpu", [override])


def test_values_are_normalised_once_at_load(tmp_path):
    cfg = load_config("synth-cpu", ["train.batch_size=8.0", "train.clip_grad_norm=null",
                                    "train.device=cuda:1", "train.threads=2"])
    assert cfg["train"]["batch_size"] == 8 and isinstance(cfg["train"]["batch_size"], int)
    assert cfg["train"]["clip_grad_norm"] is None and cfg["train"]["device"] == "cuda:1"
    f = tmp_path / "mine.yaml"
    f.write_text("_base_: synth-cpu\ntrain:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as text
    assert load_config(f)["train"]["lr"] == pytest.approx(1e-4)


def test_every_preset_is_valid():
    for name in preset_names():
        load_config(name)


def test_yaml_tags_in_overrides_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    for value in (f"!!python/object/apply:os.system ['touch {marker}']",
                  "!!python/name:os.system", "!custom 1"):
        with pytest.raises(ConfigError, match="train.lr: YAML tags are not allowed"):
            load_config("synth-cpu", [f"train.lr={value}"])
    assert not marker.exists()


def test_a_misspelt_key_in_a_yaml_file_is_refused(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("_base_: synth-cpu\ntrain:\n  bacth_size: 4\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown config key 'train.bacth_size' "
                                          r"\(did you mean 'train.batch_size'\?\)"):
        load_config(f)
    f.write_text("_base_: synth-cpu\ntrain:\n")
    with pytest.raises(ConfigError, match="'train' is a section of settings, not None"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"^train: is a section of settings.*train.out"):
        load_config("synth-cpu", ["train=5"])
    bev = load_config("synth-cpu", ["model.bev={enabled: false}"])["model"]["bev"]
    assert bev["enabled"] is False and bev["grid_size"] == 8  # the other keys are kept
    with pytest.raises(ConfigError, match="unknown config key 'model.bev.grid'"):
        load_config("synth-cpu", ["model.bev={grid: 4}"])
    classes = {"building": "artificial buildings", "tree": "trees"}  # the user's own names
    cfg = load_config("priors-langsam", [f"priors.classes={classes}"])
    assert cfg["priors"]["classes"] == classes
    f.write_text(f"_base_: priors-langsam\npriors:\n  classes: {classes}\n")
    assert load_config(f)["priors"]["classes"] == classes
    f.write_text("_base_: synth-cpu\ntrain:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match="train.batch_size: must be at least 1"):
        load_config(f)


def test_device_resolution():
    import torch

    from ssageo.device import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("tpu", "gpu", "cuda:-1", "CPU", 3):
        with pytest.raises(ConfigError, match="--device: unknown device"):
            resolve_device(name)
    with pytest.raises(ConfigError, match=r"train.device=cuda:99: "):
        resolve_device("cuda:99", "train.device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


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
    "sample4geo-university": {
        **_S4G, "data.dataset": "university", "data.vigor_mode": "drone-satellite",
        "data.query_size": [384, 384], "train.epochs": 1, "train.warmup_epochs": 0.1,
        "train.sampling.neighbour_select": 0, "train.sampling.first": "random",
        "train.sampling.similarity": False, "data.augment.rotate": 0.0},
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
