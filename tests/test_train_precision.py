"""Mixed precision (train.amp): fp16 with a GradScaler as the reference, its state in checkpoints.

The GradScaler logic runs on CPU here with a real, enabled CPU GradScaler; the CUDA fp16 run is
checked where CUDA exists.
"""

import json

import pytest
import torch

from ssageo.config import ConfigError, load_config
from ssageo.train import precision, train
from ssageo.train.state import load_checkpoint, save_checkpoint

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_amp_modes_map_to_autocast_dtypes_and_cpu_stays_fp32():
    assert precision.autocast_dtype("fp16", CUDA) is torch.float16
    assert precision.autocast_dtype("bf16", CUDA) is torch.bfloat16
    assert precision.autocast_dtype("none", CUDA) is None
    assert precision.autocast_dtype(True, CUDA) is torch.bfloat16  # what `amp: true` meant
    assert precision.autocast_dtype(None, CUDA) is None
    for mode in ("fp16", "bf16", "none"):
        assert precision.autocast_dtype(mode, CPU) is None
    with pytest.raises(ConfigError, match="train.amp must be one of fp16, bf16, none, got 'fp8'"):
        precision.autocast_dtype("fp8", CPU)
    # (a CUDA scaler disables itself without CUDA, so the enabled case is checked on CPU)
    assert precision.make_scaler(torch.float16, CPU).is_enabled()
    assert precision.make_scaler(torch.float16, CPU).get_scale() == 2.0**10  # the reference's
    assert not precision.make_scaler(torch.bfloat16, CPU).is_enabled()
    assert not precision.make_scaler(None, CPU).is_enabled()


def _setup(scale: float | None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    x = torch.randn(8, 6)
    return model, opt, scaler, x


def test_scaled_backward_unscales_before_clipping_and_steps_like_fp32():
    plain, plain_opt, off, x = _setup(None)
    scaled, scaled_opt, on, _ = _setup(2.0**10)
    clip = 0.05  # small enough to clip: a scaled (1024x) norm would be clipped very differently
    norms = []
    for model, opt, scaler in ((plain, plain_opt, off), (scaled, scaled_opt, on)):
        loss = (model(x) ** 2).sum() * 10
        norms.append(float(precision.backward(loss, model.parameters(), opt, scaler, clip)))
        precision.step(opt, scaler, apply=True)
    assert norms[0] > clip and norms[1] == pytest.approx(norms[0], rel=1e-5)
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert on.get_scale() == 2.0**10 and on.state_dict()["_growth_tracker"] == 1


def test_value_clipping_as_sample4geo_clamps_each_gradient_element():
    model, opt, scaler, x = _setup(2.0**10)
    loss = (model(x) ** 2).sum() * 10
    norm = precision.backward(loss, model.parameters(), opt, scaler, None, clip_value=0.01)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads.abs().max() == pytest.approx(0.01)  # clamped, after the unscale
    assert float(norm) > float(grads.norm()) + 0.01  # the reported norm is the unclipped one


def test_an_overflow_skips_the_update_and_halves_the_scale():
    model, opt, scaler, x = _setup(2.0**127)
    before = [p.detach().clone() for p in model.parameters()]
    norm = precision.backward((model(x) ** 2).sum() * 1e3, model.parameters(), opt, scaler, 100.0)
    assert not torch.isfinite(norm)
    precision.step(opt, scaler, apply=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**126


@pytest.mark.parametrize("scale", [None, 2.0**10])
def test_term_gradients_are_each_terms_own_gradient_on_the_weights_both_reach(scale):
    model, _, scaler, x = _setup(scale)
    trunk = model[0]
    out, features = model(x), trunk(x)
    terms = {"a": (out ** 2).mean(), "b": -(features ** 3).mean() * 3, "off": x.new_zeros(())}
    found = precision.term_gradients(terms, list(model.parameters()), scaler)
    assert set(found) == {"grad_a", "grad_b", "grad_cos_b"}  # a term with no graph is left out
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated
    expected = {}
    for name in ("a", "b"):  # on the trunk only: "b" does not reach the last layer
        grads = torch.autograd.grad(terms[name], list(trunk.parameters()), retain_graph=True)
        expected[name] = torch.cat([g.flatten() for g in grads])
        assert found[f"grad_{name}"] == pytest.approx(float(expected[name].norm()), rel=1e-5)
    cos = float(torch.nn.functional.cosine_similarity(expected["a"], expected["b"], dim=0))
    assert found["grad_cos_b"] == pytest.approx(cos, abs=1e-5) and -1 <= cos <= 1
    alone = precision.term_gradients({"a": terms["a"]}, list(model.parameters()), scaler)
    assert alone["grad_a"] > found["grad_a"]  # one term: every weight it reaches
    (terms["a"] + terms["b"]).backward()  # the graph is still there for the step's backward
    assert model[2].weight.grad is not None


@pytest.fixture(scope="module")
def small_model():
    from ssageo.model import build_model

    cfg = load_config("synth-cpu", ["model.bev.enabled=false"])
    d = cfg["data"]
    return build_model(cfg["model"], d["reference_size"], d["query_size"]), cfg


@pytest.mark.parametrize("enabled", [True, False])
def test_checkpoint_keeps_the_grad_scaler_state(small_model, tmp_path, enabled):
    model, cfg = small_model
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3, enabled=enabled)
    if enabled:  # a state that differs from a fresh scaler's: halved once, then 2 clean steps
        scaler._scale = torch.tensor(512.0)
        scaler._growth_tracker = torch.tensor(2, dtype=torch.int32)
    sampler = {"epoch": 0, "seed": 0, "start_batch": 0, "neighbour_source": "none",
               "neighbours": None}
    progress = {"epoch": 0, "batch": 0, "step": 0}
    save_checkpoint(tmp_path / "last", model, cfg, opt, sampler, progress, scaler)
    state = torch.load(tmp_path / "last" / "training_state.pt", weights_only=True)
    assert state["scaler"] == scaler.state_dict()
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=enabled)
    load_checkpoint(tmp_path / "last", model, opt, fresh)
    assert fresh.state_dict() == scaler.state_dict()
    if enabled:
        assert fresh.get_scale() == 512.0 and fresh.state_dict()["_growth_tracker"] == 2
        assert fresh.state_dict()["growth_interval"] == 3


def test_a_bad_amp_value_stops_before_any_work(synth_world, tmp_path):
    with pytest.raises(ConfigError, match="^train.amp: must be one of fp16, bf16, none"):
        load_config("synth-cpu", ["train.amp=fp32"])  # refused when the config is built
    cfg = load_config("synth-cpu", [f"data.root={synth_world('cvusa')}"])
    cfg["train"]["amp"] = "fp32"  # and by train() for a config made in code
    with pytest.raises(ConfigError, match="train.amp must be one of"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a scaler needs CUDA")
def test_fp16_training_on_cuda_scales_losses_and_checkpoints_the_scale(synth_world, tmp_path):
    cfg = load_config("synth-cpu", [
        f"data.root={synth_world('cvusa')}", "model.backbone=convnext_atto", "data.workers=0",
        "train.device=cuda", "train.amp=fp16", "train.batch_size=4", "train.epochs=1",
        "train.max_steps_per_epoch=3",
    ])
    train(cfg, tmp_path / "run")
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scales = [r["grad_scale"] for r in steps if r["kind"] == "step"]
    assert len(scales) == 3 and all(s <= 2.0**10 for s in scales)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last" / "training_state.pt",
                       weights_only=True)
    assert state["scaler"]["scale"] == scales[-1]  # the scale after the last step
