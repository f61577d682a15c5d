"""A timm backbone split into a trunk (stride-16 feature map) and a retrieval head (descriptor).

The split follows one general rule rather than per-model code: a supported timm model computes
``forward_features`` by running its top-level children in registration order (the classifier
parts excepted), and its ``feature_info`` names the module that ends the last stride-16 stage.
Everything up to and including that module is the trunk; the rest of the feature modules plus
timm's own ``forward_head(pre_logits=True)`` (global pooling and, for ConvNeXt, the final norm)
is the retrieval head. ``tests/test_model.py`` checks for each supported family that
trunk + head reproduces timm's ``forward_features``.
"""

from __future__ import annotations

# Importing this module has already run ssageo/__init__ (the torchvision fallbacks timm needs).
import timm
import timm.data
import torch
from torch import nn

from ssageo.config import ConfigError

# timm model classes whose forward_features is "run the top-level children in order".
SUPPORTED_FAMILIES = ("ConvNeXt", "ResNet", "RegNet")
# Top-level children that belong to the classifier, not to forward_features.
_HEAD_CHILDREN = ("head", "global_pool", "fc", "head_drop", "classifier")
TRUNK_REDUCTION = 16


def _split_point(model: nn.Module) -> list[str]:
    """Module path (split on '.') of the last stride-16 feature module of ``model``."""
    entries = [f for f in model.feature_info if f["reduction"] == TRUNK_REDUCTION]
    if not entries:
        raise ConfigError(
            f"{type(model).__name__}: no stride-{TRUNK_REDUCTION} stage in timm's feature_info"
        )
    return entries[-1]["module"].split(".")


class Encoder(nn.Module):
    """One timm backbone used as ``trunk`` (B,3,H,W) -> (B,C,H/16,W/16) and ``head`` -> (B,D).

    ``backbone`` keeps timm's module names, so timm state dicts load into it unchanged.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        try:
            # pretrained=False always: weights only ever come from a local file.
            backbone = timm.create_model(name, pretrained=False, num_classes=0)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise ConfigError(f"model.backbone: {exc}") from None
        family = type(backbone).__name__
        if family not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"model.backbone '{name}' is a timm {family}; supported families: "
                f"{', '.join(SUPPORTED_FAMILIES)} (e.g. convnext_base, resnet50, regnety_016)"
            )
        self.name = name
        self.family = family
        self.backbone = backbone
        self._trunk, self._rest = self._split(backbone)
        self.trunk_channels = next(
            f["num_chs"] for f in reversed(backbone.feature_info)
            if f["reduction"] == TRUNK_REDUCTION
        )
        self.descriptor_dim = int(backbone.num_features)

    @staticmethod
    def _split(backbone: nn.Module) -> tuple[list[str], list[str]]:
        """Paths of the modules before/after the split, each '<child>' or '<child>.<index>'."""
        top, *sub = _split_point(backbone)
        names = [n for n, _ in backbone.named_children() if n not in _HEAD_CHILDREN]
        if top not in names or len(sub) > 1:
            raise ConfigError(f"{type(backbone).__name__}: cannot split at '{top}'")
        cut = names.index(top)
        trunk, rest = names[:cut], names[cut + 1:]
        if sub:  # the split is inside a Sequential of stages, e.g. stages.2
            stages = getattr(backbone, top)
            k = int(sub[0])
            trunk += [f"{top}.{i}" for i in range(k + 1)]
            rest = [f"{top}.{i}" for i in range(k + 1, len(stages))] + rest
        else:
            trunk.append(top)
        return trunk, rest

    def _run(self, paths: list[str], x: torch.Tensor) -> torch.Tensor:
        for path in paths:
            x = self.backbone.get_submodule(path)(x)
        return x

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalised images -> (B,C,H/16,W/16) feature map."""
        return self._run(self._trunk, images)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) trunk features -> (B,D) descriptor (not normalised)."""
        return self.backbone.forward_head(self._run(self._rest, features), pre_logits=True)

    def stage_modules(self) -> list[tuple[str, str]]:
        """(module path, 'trunk'|'head') for every feature module, in forward order."""
        return [(p, "trunk") for p in self._trunk] + [(p, "head") for p in self._rest]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))

    def data_config(self) -> dict:
        """timm's data config for this backbone: mean, std, interpolation, input_size."""
        return timm.data.resolve_data_config({}, model=self.backbone)
