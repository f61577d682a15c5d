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
        # keys the old schema did not check: each key's type now comes with it
        ("model.backbone=123", "model.backbone", "must be text"),
        ("train.amp=fp32", "train.amp", "one of fp16, bf16, none"),
        ("train.sampling.first=nearest", "train.sampling.first", "one of random, gps"),
        ("data.augment.hole_size_from=sky", "data.augment.hole_size_from", "one of reference"),
        ("model.shared_encoder=1", "model.shared_encoder", "true or false"),
        ("data.root=[a]", "data.root", "text or null"),
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
        "train.sampling.similarity": False, "data.augment.rotate": 0.75},
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


# --- Typed config: one dataclass per section (ssageo.config.schema)


def test_every_key_is_declared_with_a_type_a_default_and_a_doc():
    import dataclasses

    from ssageo.config import schema
    from ssageo.config.checks import BY_TYPE

    for kind, cls in schema.KINDS.items():
        fields = schema.keys(cls)
        assert fields and all(f.metadata["doc"].strip() for f in fields.values())
        for dotted, f in fields.items():
            if "section" not in f.metadata:  # a check of its own or one its type implies
                assert f.metadata["check"] or str(f.type) in BY_TYPE, dotted
        # the declared defaults pass their own checks
        assert dataclasses.asdict(schema.build(cls, schema.defaults(kind))) == \
            schema.defaults(kind)
    # the default preset only names itself: its values are the declared defaults
    assert load_config("synth-cpu") == schema.defaults("train")


def test_a_file_without_base_overrides_the_defaults_and_old_run_configs_still_load(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model:\n  backbone: resnet34\n")
    cfg = load_config(f)
    assert cfg["model"]["backbone"] == "resnet34" and cfg == load_config(
        "synth-cpu", ["model.backbone=resnet34"])
    f.write_text("tarin:\n  lr: 0.1\n")  # a misspelt section is no longer ignored
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown config key 'tarin' "
                                          r"\(did you mean 'train'\?\)"):
        load_config(f)
    # a run directory's config.yaml from before train.sampling.first / the lean head
    old = load_config("synth-cpu")
    old["train"]["sampling"].pop("first")
    old["train"]["sampling"]["gps"] = False
    old["model"]["bev"]["recompute_decoder"] = False
    old["train"]["amp"] = True
    save_config(old, f)
    cfg = load_config(f)
    assert cfg["train"]["sampling"]["first"] == "random" and cfg["train"]["amp"] == "bf16"
    assert "gps" not in cfg["train"]["sampling"] and "recompute_decoder" not in cfg["model"]["bev"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.reference_size=[128,128]"], r"^model.bev.grid_size: 8 gives 64x64 BEV logits.*"
                                        r"\[128, 128\].*use model.bev.grid_size=16"),
    (["data.reference_size=[64,96]"], r"^model.bev.grid_size: .*a square tile"),
    (["data.prior_size=[32,32]"], r"^model.bev.grid_size: 8 gives 64x64 BEV logits, which must "
                                  r"cover the prior labels \(data.prior_size \[32, 32\]\); use "
                                  r"model.bev.grid_size=4"),
    (["data.prior_size=[32,48]"], r"^model.bev.grid_size: .*square prior labels"),
    (["train.sampling.neighbour_select=40"], r"^train.sampling.neighbour_select: must be at "
                                             r"most train.sampling.neighbour_range \(32\)"),
    (["train.sampling.neighbour_range=200"], r"^train.sampling.gps_k: must be at least "
                                             r"train.sampling.neighbour_range \(200\)"),
])
def test_rules_between_keys_are_checked_when_the_config_is_built(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("synth-cpu", overrides)


def test_consistent_combinations_pass():
    assert load_config("synth-cpu", ["data.reference_size=[128,128]",
                                     "model.bev.grid_size=16"])["model"]["bev"]["grid_size"] == 16
    load_config("synth-cpu", ["data.reference_size=[64,96]", "model.bev.enabled=false"])
    load_config("synth-cpu", ["data.prior_size=[32,32]", "model.bev.grid_size=4"])
    load_config("synth-cpu", ["train.sampling.neighbour_range=200", "train.sampling.first=random"])


def test_the_global_batch_must_split_over_the_torchrun_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    load_config("synth-cpu", ["train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"^train.batch_size=5 \(the global batch\) must be "
                                          r"divisible by the number of processes \(2\)$"):
        load_config("synth-cpu", ["train.batch_size=5"])
    monkeypatch.setenv("RANK", "1")  # the other ranks stop silently: one message in all
    with pytest.raises(SystemExit) as stop:
        load_config("synth-cpu", ["train.batch_size=5"])
    assert stop.value.code == 2


def test_config_show_prints_the_resolved_config_with_each_keys_doc(tmp_path, capsys):
    import yaml

    from ssageo.cli import main

    with pytest.raises(SystemExit) as done:
        main(["config", "show", "cvusa", "train.lr=2e-4"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "  lr: 0.0002  # peak learning rate (AdamW)\n" in out
    assert "  bev:  # the BEV head supervised by satellite priors\n" in out
    assert "    grid_size: 48  # N: BEV grid" in out
    expected = load_config("cvusa", ["train.lr=2e-4"])
    assert yaml.safe_load(out) == expected  # the output is the config, as YAML
    (tmp_path / "shown.yaml").write_text(out)
    assert load_config(tmp_path / "shown.yaml") == expected  # and loads back as it is
    with pytest.raises(SystemExit):
        main(["config", "show", "train.epochs=2"])  # overrides alone: the default preset
    assert "  epochs: 2  # training epochs\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["config", "show", "priors-langsam"])
    out = capsys.readouterr().out
    assert out.startswith("priors:  # ") and "train" not in yaml.safe_load(out)
    assert "  box_threshold: 0.24  # GroundingDINO box threshold\n" in out
    with pytest.raises(SystemExit) as done:
        main(["config", "show", "model.bev.grid_size=4"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: model.bev.grid_size: 4 gives")


def test_the_priors_config_holds_priors_settings_only(tmp_path):
    cfg = load_config("priors-langsam")
    assert list(cfg) == ["priors"] and cfg["priors"]["box_threshold"] == 0.24
    f = tmp_path / "mine.yaml"
    f.write_text("priors:\n  box_threshold: 0.3\n")  # a priors section alone: no _base_
    assert load_config(f, kind="priors") == load_config(
        "priors-langsam", ["priors.box_threshold=0.3"])
    f.write_text("_base_: synth-cpu\npriors:\n  batch_size: 2\n")  # the old way still reads
    assert load_config(f)["priors"]["batch_size"] == 2
    f.write_text("_base_: cvusa\npriors:\n  batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: 'priors' settings belong in their own "
                                          r"config .* not beside data, eval, loss, model, train"):
        load_config(f)
    with pytest.raises(ConfigError, match="preset cvusa: holds train settings, but a priors "
                                          "config is needed"):
        load_config("cvusa", kind="priors")
    with pytest.raises(ConfigError, match="holds priors settings, but a train config"):
        load_config("priors-langsam", kind="train")
    with pytest.raises(ConfigError, match="unknown config key 'data.root'"):
        load_config("priors-langsam", ["data.root=x"])
    with pytest.raises(ConfigError, match=r"^priors.classes: must be a mapping of names"):
        load_config("priors-langsam", ["priors.classes=[paper]"])


def test_the_priors_command_takes_a_priors_only_config_file(synth_world, tmp_path, capsys):
    from ssageo.cli import main

    world = synth_world("cvusa")
    for text, key in (("priors:\n  box_threshold: 2\n", "priors.box_threshold"),
                      ("_base_: cvusa\npriors:\n  batch_size: 2\n", "'priors' settings")):
        (tmp_path / "p.yaml").write_text(text)
        with pytest.raises(SystemExit) as done:
            main(["priors", str(world), "--backend", "langsam", "--config",
                  str(tmp_path / "p.yaml"), "--no-progress"])
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.startswith("error: ") and key in err, err
    assert not (world / "priors-run.json").exists()
