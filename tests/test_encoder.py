"""The encoder split through timm's uniform API: trunk (stride-16 map) + retrieval head = timm's
own forward for one model of each family, the ground view's size, refusals, weights, training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.config import ConfigError, load_config
from ssageo.model import Encoder, build_model, load_pretrained
from ssageo.model.encoder import timm  # imported after ssageo's torchvision fallbacks

# What ssageo changes in timm's model, said here independently of the code: ViTs and Swin take
# any input size; a ViT that pools its class token averages its patch tokens instead.
_VIT = {"dynamic_img_size": True, "dynamic_img_pad": True, "global_pool": "avg",
        "fc_norm": False}
FAMILIES = {
    # name: (timm options, trunk map of a 140 x 768 panorama (C, h, w))
    "convnext_atto": ({}, (160, 8, 48)),
    "resnet18": ({}, (256, 9, 48)),
    "efficientnet_b0": ({}, (112, 9, 48)),
    # TF "same" padding layers, no SE: the model of model.pretrained=package (test_pretrained)
    "tf_efficientnet_lite0": ({}, (112, 9, 48)),
    "vit_tiny_patch16_224": (_VIT, (192, 9, 48)),  # 140 rows padded to 144: 9 patches
    "swin_tiny_patch4_window7_224": ({"dynamic_img_size": True}, (384, 9, 48)),
    "vit_small_patch14_dinov2": (_VIT, (384, 10, 55)),  # stride 14 (see encoder.py)
    # beyond the named families: forward_head has a conv after pooling (descriptor 1024-d)
    "mobilenetv3_small_100": ({}, (48, 9, 48)),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trunk_then_head_is_timms_own_forward(name):
    options, ground_map = FAMILIES[name]
    encoder = Encoder(name).eval()
    timms = timm.create_model(name, pretrained=False, num_classes=0, **options).eval()
    timms.load_state_dict(encoder.backbone.state_dict())
    images = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = encoder.trunk(images)
        descriptor = encoder.head(features)
        expected = timms(images)  # num_classes=0: timm's pre-logits descriptor
        assert descriptor.shape == (2, encoder.descriptor_dim)
        torch.testing.assert_close(descriptor, expected, atol=1e-5, rtol=1e-5)
        stride = encoder.trunk_stride
        assert features.shape[:2] == (2, encoder.trunk_channels)
        if stride == 16:
            assert features.shape[2:] == (4, 8)
        # the ground view's size (CVUSA/CVACT 140 x 768) goes through the same encoder
        assert tuple(encoder.trunk(torch.zeros(1, 3, 140, 768)).shape[1:]) == ground_map


def test_the_convnext_descriptor_is_stem_stages_0_to_2_then_stage_3_norm_pool():
    """Sample4Geo's split, written out by hand from timm's modules."""
    encoder = Encoder("convnext_atto").eval()
    net = encoder.backbone
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trunk = net.stages[2](net.stages[1](net.stages[0](net.stem(images))))
        torch.testing.assert_close(encoder.trunk(images), trunk, atol=0, rtol=0)
        pooled = net.stages[3](trunk).mean(dim=(2, 3))
        expected = net.head.norm(pooled[:, :, None, None]).flatten(1)
        torch.testing.assert_close(encoder.head(trunk), expected, atol=1e-5, rtol=1e-5)


def test_models_without_a_usable_stride_16_map_are_refused_with_the_reason():
    with torch.device("meta"):
        with pytest.raises(ConfigError, match=r"model.backbone 'vit_small_patch32_224': .* no "
                                              r"stride-16 feature map \(its maps have strides 32"):
            Encoder("vit_small_patch32_224")
        with pytest.raises(ConfigError, match="Eva is a token model other than VisionTransf"):
            Encoder("eva02_tiny_patch14_224")
        with pytest.raises(ConfigError, match=r"model.backbone: Unknown model \(no_such_net\)"):
            Encoder("no_such_net")
        # DeiT's distilled head reads its class and distillation tokens after the last block
        with pytest.raises(ConfigError, match=r"'deit_tiny_distilled_patch16_224': timm's Vision"
                                              r"TransformerDistilled cannot be built with"):
            Encoder("deit_tiny_distilled_patch16_224")


def test_a_size_the_patch_embedding_cannot_take_is_refused_naming_the_key():
    cfg = dict(load_config("synth-cpu")["model"], backbone="swin_tiny_patch4_window7_224")
    with torch.device("meta"):
        with pytest.raises(ConfigError, match=r"data.query_size \[138, 768\]: swin_tiny_patch4"
                                              r"_window7_224 takes .* multiples of its patch size"):
            build_model(cfg, (384, 384), (138, 768))
        build_model(cfg, (384, 384), (140, 768))
        # a ViT pads to its patch size instead
        build_model(dict(cfg, backbone="vit_tiny_patch16_224"), (384, 384), (138, 770))


def test_gradient_checkpointing_keeps_values_and_gradients():
    encoder = Encoder("vit_tiny_patch16_224").train()
    images = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(3))

    calls = []
    encoder.backbone.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def run():
        encoder.zero_grad()
        calls.clear()
        out = encoder(images)
        out.square().sum().backward()
        return out.detach(), encoder.backbone.blocks[0].attn.qkv.weight.grad.clone()

    plain = run()
    assert len(calls) == 1
    encoder.backbone.set_grad_checkpointing(True)
    for a, b in zip(plain, run(), strict=True):
        torch.testing.assert_close(a, b)
    assert len(calls) == 2  # the trunk's block ran again in the backward pass: checkpointed


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224"])
def test_a_sample4geo_checkpoint_loads_with_no_missing_keys(tmp_path, name):
    source = timm.create_model(name, pretrained=False)  # with its classifier, as trained
    ckpt = {f"module.model.{k}": v for k, v in source.state_dict().items()}
    ckpt["logit_scale"] = torch.tensor(3.0)
    save_file(ckpt, str(tmp_path / "s4g.safetensors"))
    cfg = dict(load_config("synth-cpu")["model"], backbone=name)
    model = build_model(cfg, (32, 32), (32, 64))
    report = load_pretrained(model, tmp_path / "s4g.safetensors")
    assert report == {"missing": [], "unexpected": []}
    assert model.logit_scale.item() == pytest.approx(3.0)
    state = model.encoder("query").backbone.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith(("head.fc.", "head.weight", "head.bias")):
            torch.testing.assert_close(state[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("name, trunk_row", [
    ("vit_tiny_patch16_224", ("blocks.11", "192 x 4 x 16")),
    ("efficientnet_b0", ("blocks.4", "112 x 4 x 16")),
])
def test_cli_model_info_for_other_families(name, trunk_row):
    result = CliRunner().invoke(app, ["model", "info", f"model.backbone={name}"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(trunk_row[0] in line and trunk_row[1] in line and "encoder trunk" in line
               for line in lines), result.output
    assert "polar projection" in result.output  # the BEV head reads that map


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "efficientnet_b0", pytest.param(
    "swin_tiny_patch4_window7_224", marks=pytest.mark.slow)])  # swin: about 13 s
def test_a_short_training_run_with_the_bev_head(synth_world, tmp_path, name):
    import json

    from ssageo.model import load_model
    from ssageo.train import train

    cfg = load_config("synth-cpu", [
        f"data.root={synth_world()}", f"model.backbone={name}", "data.workers=0",
        "train.batch_size=4", "train.epochs=1", "train.max_steps_per_epoch=2",
        "train.checkpoint_every=1000", "train.sampling.similarity=false",
    ])
    assert cfg["model"]["bev"]["enabled"]
    assert train(cfg, tmp_path / "run")["steps"] == 2
    steps = [row for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if (row := json.loads(line))["kind"] == "step"]
    assert len(steps) == 2 and all(0 < row["bev"] < 10 for row in steps)  # the BEV loss ran
    model, _ = load_model(tmp_path / "run" / "checkpoints" / "last")
    with torch.no_grad():
        assert model.eval().embed(torch.zeros(1, 3, 64, 256)).shape == (1, model.descriptor_dim)
