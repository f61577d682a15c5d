"""A timm backbone split into a trunk (stride-16 feature map) and a retrieval head (descriptor).

The split follows one general rule rather than per-model code: a supported timm model computes
``forward_features`` by running its top-level children in registration order (the classifier
parts excepted), and its ``feature_info`` names the module that ends the last stride-16 stage.
Everything up to and including that module is the trunk; the rest of the feature modules plus
timm's own ``forward_head(pre_logits=True)`` (global pooling and, for ConvNeXt, the final norm)
is the retrieval head. ``tests/test_model.py`` checks for each supported family that
trunk + head reproduces timm's ``forward_features``.

Weights: ``Encoder`` builds the architecture only and never makes a network request (a
``hf-hub:`` model's config.json comes from the hub cache). ``hub_weights`` is the one place that
may use the network: timm's own ``pretrained=True`` path for ``model.pretrained: timm``.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Importing this module has already run ssageo/__init__ (the torchvision fallbacks timm needs).
import timm
import timm.data
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import LocalEntryNotFoundError
from timm.models import get_pretrained_cfg, parse_model_name
from torch import nn

from ssageo.config import ConfigError
from ssageo.io import DataError

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
        source = _offline_name(name)
        try:
            # Never weights and never the network here: hub weights are loaded by hub_weights().
            backbone = timm.create_model(source, pretrained=False, num_classes=0)
        except (RuntimeError, ValueError, OSError) as exc:  # timm: "Unknown model (...)" etc.
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


# ``model.pretrained`` value: timm's weights for the ``model.backbone`` name (its pretrained tag),
# fetched by timm's own hub code and cached by huggingface_hub, as ``pretrained=True`` does.
HUB_WEIGHTS = "timm"


class WeightsUnavailable(DataError):
    """``model.pretrained: timm`` weights that neither the hub nor its local cache can give."""


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/..."""
    return Path(hub_constants.HF_HUB_CACHE)


def hub_repo(name: str) -> str:
    """The hub repository (``owner/name``, ``@revision`` kept) of timm's weights for ``name``."""
    return _hub_location(name)[0]


def _hub_location(name: str) -> tuple[str, list[str]]:
    """(repository, weight files timm tries in order) for ``name``'s hub weights."""
    source, model_id = _parse(name)
    if source == "hf-hub":
        return model_id, ["model.safetensors", "pytorch_model.bin"]
    try:
        cfg = None if source else get_pretrained_cfg(model_id, allow_unregistered=False)
    except RuntimeError as exc:  # timm: "Invalid pretrained tag (...)"
        raise ConfigError(f"model.backbone: {exc}") from None
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(
            f"model.pretrained: timm: timm has no weights on the Hugging Face hub for "
            f"'{name}'; set model.pretrained to a local weights file, or none"
        )
    # timm: the named file, else model.safetensors, else pytorch_model.bin
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                                 "pytorch_model.bin"]
    return cfg.hf_hub_id, files


def _offline_name(name: str) -> str:
    """``name`` for a weight-free ``timm.create_model`` that makes no network request.

    A ``hf-hub:`` model is described by its repository's config.json, which timm would download
    even without weights; here it must already be in the hub cache, and is read from there.
    """
    source, model_id = _parse(name)
    if source != "hf-hub":
        return name
    repo_id, _, revision = model_id.partition("@")
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision or None,
                                    cache_dir=hub_cache_dir())
    if not isinstance(cached, str):  # None or the "known not to exist" marker
        raise ConfigError(
            f"model.backbone '{name}': a hub model's architecture is in its config.json, which "
            f"is not in the cache folder {hub_cache_dir()}, and it is downloaded only with "
            f"model.pretrained=timm; fetch it once (`hf download {repo_id} config.json`) or "
            f"name a timm model (e.g. convnext_base.fb_in22k_ft_in1k_384)"
        )
    return f"local-dir:{Path(cached).parent}"


def _parse(name: str) -> tuple[str | None, str]:
    try:
        return parse_model_name(name)
    except ValueError as exc:
        raise ConfigError(f"model.backbone: {exc}") from None


def hub_cached(name: str) -> bool:
    """Whether timm's weights for ``name`` are in the hub cache (looked up, nothing fetched)."""
    repo, files = _hub_location(name)
    repo_id, _, revision = repo.partition("@")
    return any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None,
                                                 cache_dir=hub_cache_dir()), str)
               for f in files)


def hub_weights(name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained backbone weights for ``name`` (classifier dropped), as timm users get
    them: ``timm.create_model(name, pretrained=True)``, downloaded once into the hub cache.

    Raises WeightsUnavailable, one line naming the model, the cache folder and the way out,
    when neither the hub nor the cache has them (never random weights instead).
    """
    repo, cache = hub_repo(name), hub_cache_dir()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    # Its per-retry warnings (about 10 lines without a network) would bury the one message.
    hub_log.setLevel(logging.ERROR)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, cache_dir=cache)
    except Exception as exc:  # hub, network, cache and file errors all mean "no weights"
        raise WeightsUnavailable(_unavailable(name, repo, cache, exc)) from None
    finally:
        hub_log.setLevel(level)
    return model.state_dict()


def _unavailable(name: str, repo: str, cache: Path, exc: Exception) -> str:
    def first_line(error: BaseException) -> str:
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__

    if isinstance(exc, LocalEntryNotFoundError) and hub_constants.HF_HUB_OFFLINE:
        why = f"HF_HUB_OFFLINE is set and they are not in the cache folder {cache}"
        retry = "unset HF_HUB_OFFLINE once, with network access, to fill the cache"
    elif isinstance(exc, LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        why = (f"the hub cannot be reached ({first_line(cause) if cause else 'no network'}) and "
               f"they are not in the cache folder {cache}")
        retry = "run once with network access to fill the cache"
    else:
        why = f"{type(exc).__name__}: {first_line(exc)} (cache folder {cache})"
        retry = "check the cache folder and network access"
    return (f"model.pretrained: timm: cannot load timm's weights for {name} (hub repository "
            f"{repo}): {why}. To continue, {retry}, or download the weights file and "
            f"set model.pretrained=/path/to/model.safetensors (a timm state dict or Sample4Geo "
            f"checkpoint); model.pretrained=none trains from random weights")
