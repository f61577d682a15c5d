"""ImageNet weights from the Hugging Face hub (``model.pretrained: timm``), offline: a local hub
cache in huggingface_hub's own layout, real subprocesses with ``HF_HOME``/``HF_HUB_OFFLINE``
set as a user would, and a socket guard that makes any network request fail the test."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ssageo  # first: its torchvision fallbacks let timm import here
from ssageo.config import ConfigError, load_config
from ssageo.model.encoder import HUB_WEIGHTS, hub_repo
from ssageo.model.ssa import pretrained_source

TAG = "convnext_atto.d2_in1k"   # a real timm tag: timm resolves it to the hub repo timm/<TAG>
REAL_TAG = "convnext_base.fb_in22k_ft_in1k_384"  # the reference's (SSA, Sample4Geo) model
REVISION = "0123456789abcdef0123456789abcdef01234567"
BLOCKED = 97  # exit status of a process that attempted a network connection
# The real preset at test sizes: only the backbone and the input/BEV sizes differ.
SMALL = [f"model.backbone={TAG}", "data.reference_size=[64,64]", "data.query_size=[32,128]",
         "model.bev.depth_bins=4", "model.bev.grid_size=8"]

GUARD = f'''
import os, socket

_LOG = os.environ["SSAGEO_NETWORK_LOG"]


def _refuse(kind, target):
    with open(_LOG, "a") as f:
        f.write(f"{{kind}} {{target!r}}\\n")
    os._exit({BLOCKED})  # not an exception: nothing on the way can catch it and fall back


_connect = socket.socket.connect


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect", address)
    return _connect(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect
socket.getaddrinfo = lambda host, *a, **k: _refuse("getaddrinfo", host)
'''


def write_hub_cache(home: Path, repo_id: str, model: torch.nn.Module) -> Path:
    """``model`` published as timm publishes to the hub (``save_for_hf``: model.safetensors +
    config.json), stored the way huggingface_hub caches a download: blobs named by hash,
    ``snapshots/<revision>`` links to them, ``refs/main`` naming the revision. Returns the
    snapshot folder."""
    from timm.models import save_for_hf

    staging = home / "staging"
    save_for_hf(model, staging, safe_serialization=True)
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    for folder in (repo / "blobs", repo / "refs", snapshot):
        folder.mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    for file in staging.iterdir():
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
        file.unlink()
    staging.rmdir()
    return snapshot


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds timm/convnext_atto.d2_in1k: a seeded convnext_atto."""
    import timm

    home = tmp_path_factory.mktemp("hf-home")
    torch.manual_seed(1234)
    write_hub_cache(home, f"timm/{TAG}", timm.create_model("convnext_atto", pretrained=False))
    return home


def run(args: list[str], tmp_path: Path, hf_home: Path, offline: bool,
        **kwargs) -> subprocess.CompletedProcess:
    """``args`` in a fresh Python process with HF_HOME set, HF_HUB_OFFLINE set or unset, and
    the socket guard installed (sitecustomize on PYTHONPATH)."""
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    source = str(Path(ssageo.__file__).parents[1])
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), SSAGEO_NETWORK_LOG=str(tmp_path / "network.log"),
               PYTHONPATH=os.pathsep.join([str(guard), source, env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


def network_attempts(tmp_path: Path) -> str:
    log = tmp_path / "network.log"
    return log.read_text() if log.exists() else ""


def test_real_presets_name_the_references_tag_with_hub_weights_synth_stays_random():
    for preset in ("cvusa", "cvact", "vigor-same", "vigor-cross"):
        model = load_config(preset)["model"]
        assert (model["backbone"], model["pretrained"]) == (REAL_TAG, HUB_WEIGHTS), preset
    assert hub_repo(REAL_TAG) == f"timm/{REAL_TAG}"  # timm's registry, no request
    assert load_config("synth-cpu")["model"]["pretrained"] is None


def test_pretrained_values():
    for value in (None, False, "none", "None", " null ", ""):
        assert pretrained_source(value) is None, value
    assert pretrained_source("timm") == HUB_WEIGHTS
    assert pretrained_source("weights/timm") == Path("weights/timm")
    for value in (True, 3, ["timm"]):
        with pytest.raises(ConfigError, match="model.pretrained must be 'timm'"):
            pretrained_source(value)
    with pytest.raises(ConfigError, match="timm has no weights on the Hugging Face hub"):
        hub_repo("convnext_atto_rms")  # a timm model without released weights


def test_hub_weights_arrive_through_build_model_offline(hub_home, tmp_path):
    """The preset's own key, our build_model, timm's hub code, huggingface_hub's offline cache:
    every encoder holds exactly the published weights; model.pretrained=none does not."""
    script = textwrap.dedent(f"""
        import sys
        from safetensors.torch import save_file
        from ssageo.config import load_config
        from ssageo.model import build_model

        for name, extra in (("shared", []), ("separate", ["model.shared_encoder=false"]),
                            ("hf-hub", ["model.backbone=hf-hub:timm/{TAG}"]),
                            ("none", ["model.pretrained=none"])):
            cfg = load_config("cvusa", {SMALL!r} + extra)
            d = cfg["data"]
            model = build_model(cfg["model"], d["reference_size"], d["query_size"])
            save_file({{k: v.contiguous() for k, v in model.state_dict().items()}},
                      sys.argv[1] + "/" + name + ".safetensors")
    """)
    done = run(["-c", script, str(tmp_path)], tmp_path, hub_home, offline=True)
    assert done.returncode == 0, done.stderr
    assert network_attempts(tmp_path) == ""
    snapshot = hub_home / "hub" / f"models--timm--{TAG}" / "snapshots" / REVISION
    published = load_file(str(snapshot / "model.safetensors"))
    backbone = {k: v for k, v in published.items() if not k.startswith("head.fc.")}
    assert len(published) - len(backbone) == 2  # the classifier, which is dropped

    def encoders(state: dict) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for key, value in state.items():
            if key.startswith("encoders."):
                _, encoder, rest = key.split(".", 2)
                out.setdefault(encoder, {})[rest.removeprefix("backbone.")] = value
        return out

    for name, expected in (("shared", ["shared"]), ("separate", ["query", "reference"]),
                           ("hf-hub", ["shared"])):
        loaded = encoders(load_file(str(tmp_path / f"{name}.safetensors")))
        assert sorted(loaded) == expected
        for encoder in loaded.values():
            assert encoder.keys() == backbone.keys()
            assert all(torch.equal(encoder[k], backbone[k]) for k in backbone), name
    random = encoders(load_file(str(tmp_path / "none.safetensors")))["shared"]
    assert not torch.equal(random["stem.0.weight"], backbone["stem.0.weight"])


def test_train_without_the_weights_stops_before_the_run_directory(synth_world, tmp_path):
    """`ssageo train --config cvusa` offline with an empty cache: one message, exit 2, no run
    directory, no network request."""
    home, out = tmp_path / "empty-home", tmp_path / "run"
    done = run(["-m", "ssageo", "train", "--config", "cvusa", "--data",
                str(synth_world("cvusa")), "--out", str(out)], tmp_path, home, offline=True)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1, done.stderr
    message = errors[0]
    assert message.startswith(f"error: model.pretrained: timm: cannot load timm's weights for "
                              f"{REAL_TAG} (hub repository timm/{REAL_TAG}): HF_HUB_OFFLINE is "
                              f"set and they are not in the cache folder {home / 'hub'}"), message
    assert "set model.pretrained=/path/to/model.safetensors" in message
    assert not out.exists()
    assert network_attempts(tmp_path) == ""


def test_the_network_guard_catches_timms_hub_requests(tmp_path):
    """Control for the tests below: timm's own hf-hub: path requests config.json; the guard
    stops that process, so a request in the code under test cannot go unnoticed."""
    done = run(["-c", "import ssageo, timm; timm.create_model('hf-hub:timm/convnext_atto')"],
               tmp_path, tmp_path / "empty-home", offline=False)
    assert done.returncode == BLOCKED, done.stderr
    assert "huggingface.co" in network_attempts(tmp_path)


@pytest.mark.parametrize("case", ["preset", "hf-hub cached", "hf-hub not cached"])
def test_model_info_never_makes_a_network_request(case, hub_home, tmp_path):
    """`ssageo model info` with HF_HUB_OFFLINE unset: the architecture is built without weights
    (a hf-hub: model's config.json only from the cache), the weights' source is only named."""
    args = {"preset": ["--config", "cvusa"],
            "hf-hub cached": ["model.backbone=hf-hub:timm/convnext_atto.d2_in1k",
                              "model.pretrained=timm"],
            "hf-hub not cached": ["model.backbone=hf-hub:timm/convnext_femto.d1_in1k"]}[case]
    done = run(["-m", "ssageo", "model", "info", *args], tmp_path, hub_home, offline=False)
    assert network_attempts(tmp_path) == ""
    cache = hub_home / "hub"
    output = " ".join(done.stdout.split())  # rich wraps long lines
    if case == "preset":
        assert done.returncode == 0, done.stderr
        assert f"{REAL_TAG} (ConvNeXt)" in output
        assert (f"weights: timm's from the Hugging Face hub, timm/{REAL_TAG} (not in the cache "
                f"folder {cache} yet") in output
    elif case == "hf-hub cached":
        assert done.returncode == 0, done.stderr
        assert "hf-hub:timm/convnext_atto.d2_in1k (ConvNeXt)" in output
        assert f"timm/convnext_atto.d2_in1k (in the cache folder {cache})" in output
        assert "320-d" in output
    else:
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            "error: model.backbone 'hf-hub:timm/convnext_femto.d1_in1k': a hub model's "
            f"architecture is in its config.json, which is not in the cache folder {cache}, and "
            "it is downloaded only with model.pretrained=timm; fetch it once (`hf download "
            "timm/convnext_femto.d1_in1k config.json`) or name a timm model (e.g. "
            "convnext_base.fb_in22k_ft_in1k_384)"]


@pytest.mark.slow
def test_resume_takes_the_checkpoint_and_needs_no_hub_weights(synth_world, hub_home, tmp_path):
    """A run started from hub weights resumes on a machine without them (offline, empty
    cache): its weights come from checkpoints/last, and --resume takes no overrides."""
    out = tmp_path / "run"
    tiny = [f"model.backbone={TAG}", "model.pretrained=timm", "data.workers=0",
            "train.batch_size=4", "train.epochs=1", "train.max_steps_per_epoch=1"]
    first = run(["-m", "ssageo", "train", "--data", str(synth_world("cvusa")), "--out", str(out),
                 *tiny], tmp_path, hub_home, offline=True)
    assert first.returncode == 0, first.stderr
    again = run(["-m", "ssageo", "train", "--resume", str(out)], tmp_path,
                tmp_path / "empty-home", offline=True)
    assert again.returncode == 0, again.stderr
    assert network_attempts(tmp_path) == ""
