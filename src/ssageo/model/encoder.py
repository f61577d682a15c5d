"""A timm backbone split into a trunk (stride-16 feature map) and a retrieval head (descriptor).

The split uses timm's uniform model API, not per-family code. ``feature_info`` lists the
model's feature maps with their reductions; the trunk is timm's own ``forward_intermediates``
stopped at the last map with reduction 16 (NCHW). The retrieval head runs the rest of
``forward_features`` (the later stages and norm, the model's top-level feature modules after
the split, in order) and timm's ``forward_head(pre_logits=True)`` (global pooling and, for
ConvNeXt, the final norm). For ConvNeXt that is stem + stages 0-2 | stage 3 + norm + pool,
Sample4Geo's split. Models whose maps are NHWC (Swin) are permuted back for the head.

A plain ViT's map is its patch grid: patch 16 gives stride 16; patch 14 (DINOv2) gives a
stride-14 grid, which is accepted because the BEV head needs only C channels and an h x w map
(its polar projection takes the grid's columns as azimuth bins, any number). The head of a ViT
is its final norm + average pooling of the patch tokens: the class token after the last block
is not in the patch grid the head receives, so a model that pools its class token ("token") is
built with ``global_pool="avg"`` instead (its weights are unchanged). ViTs and Swin are built
with ``dynamic_img_size`` (ViTs also pad to a patch multiple), so one encoder takes both views'
sizes, e.g. 140 x 768 panoramas and 384 x 384 tiles.

Every real (not meta-device) build checks on a small image that trunk + head gives timm's own
``forward_head(forward_features(x), pre_logits=True)``; a model for which it does not, or that
has no stride-16 map, is refused with the reason (one ConfigError line naming model.backbone).

Weights: ``Encoder`` builds the architecture only and never makes a network request (a
``hf-hub:`` model's config.json comes from the hub cache). ``hub_weights`` is the one place that
may use the network: timm's own ``pretrained=True`` path for ``model.pretrained: timm``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Importing this module has already run ssageo/__init__, whose import hook installs the
# torchvision fallbacks timm needs (ssageo._compat) when timm imports torchvision.
import timm
import timm.data
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import LocalEntryNotFoundError
from timm.models import VisionTransformer, get_pretrained_cfg, parse_model_name
from torch import nn

from ssageo.config import ConfigError
from ssageo.io import DataError

TRUNK_REDUCTION = 16
# Patch sizes whose grid a plain ViT's trunk may end on (see the module docstring).
PATCH_GRID_REDUCTIONS = (14, 16)
# Top-level children where forward_head's part of a model begins (pooling, classifier).
_HEAD_CHILDREN = ("head", "global_pool", "fc", "head_drop", "classifier")
# The build-time check's image (B,3,H,W): small, non-square, a multiple of every stride.
_CHECK_SHAPE = (1, 3, 32, 64)


def create_backbone(source: str, name: str = "", **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(source, num_classes=0)`` built to take any input size (see above).

    The model's class decides the size options, so a weight-free copy is first built on the
    meta device (no memory, no weights) to look at it. ``name``: the user's model name
    for messages; ``timm_kwargs`` go to both builds' ``create_model`` (e.g. ``pretrained=True``).
    """
    with torch.device("meta"):
        probe = timm.create_model(source, num_classes=0, **dict(timm_kwargs, pretrained=False))
    options: dict = {}
    if getattr(probe, "dynamic_img_size", True) is False:  # ViT, Swin: any size, not only 224
        options["dynamic_img_size"] = True
    if isinstance(probe, VisionTransformer):
        options["dynamic_img_pad"] = True  # 140 rows with patch 16: padded to 144, not refused
        if probe.global_pool == "token":
            # fc_norm=False keeps the final norm where the weights have it (``norm.*``).
            options.update(global_pool="avg", fc_norm=False)
    if not options:
        return timm.create_model(source, num_classes=0, **timm_kwargs)
    try:
        return timm.create_model(source, num_classes=0, **options, **timm_kwargs)
    except (AssertionError, TypeError, ValueError) as exc:  # the class refuses an option
        raise ConfigError(
            f"model.backbone '{name or source}': timm's {type(probe).__name__} cannot be built "
            f"with {options} ({_first_line(exc)}), which the split at its stride-16 map needs"
        ) from None


def _split_index(name: str, backbone: nn.Module, patch_grid: bool) -> int:
    """Index (in ``feature_info`` and ``forward_intermediates``) of the trunk's last map."""
    family = type(backbone).__name__
    info = getattr(backbone, "feature_info", None)
    if not info or not hasattr(backbone, "forward_intermediates"):
        raise ConfigError(f"model.backbone '{name}': timm's {family} has no feature_info / "
                          f"forward_intermediates, so its stride-16 map cannot be taken")
    allowed = PATCH_GRID_REDUCTIONS if patch_grid else (TRUNK_REDUCTION,)
    hits = [i for i, f in enumerate(info) if f["reduction"] in allowed]
    if not hits:
        strides = ", ".join(str(r) for r in sorted({f["reduction"] for f in info}))
        raise ConfigError(
            f"model.backbone '{name}': timm's {family} has no stride-{TRUNK_REDUCTION} feature "
            f"map (its maps have strides {strides}); the trunk must end at stride "
            f"{TRUNK_REDUCTION}{' (a ViT: patch 16 or 14)' if patch_grid else ''}, where the "
            f"BEV head reads the ground view"
        )
    return hits[-1]


def _rest_modules(name: str, backbone: nn.Module, split: str) -> list[str]:
    """Paths of the feature modules after ``split`` (a feature_info module), in forward order:
    the later entries of its container (``stages.3``) then the later top-level children up to
    the first one of forward_head."""
    top, *sub = split.split(".")
    names = []
    for child, _ in backbone.named_children():
        if child in _HEAD_CHILDREN:  # forward_head's part begins (MobileNetV3: pool, conv_head)
            break
        names.append(child)
    if top not in names or len(sub) > 1:
        raise ConfigError(f"model.backbone '{name}': timm's {type(backbone).__name__} cannot "
                          f"be split after its module '{split}' (not a top-level stage)")
    rest = names[names.index(top) + 1:]
    if sub:  # the split is inside a container of stages, e.g. stages.2
        count = len(getattr(backbone, top))
        rest = [f"{top}.{i}" for i in range(int(sub[0]) + 1, count)] + rest
    return rest


class Encoder(nn.Module):
    """One timm backbone used as ``trunk`` (B,3,H,W) -> (B,C,h,w) and ``head`` -> (B,D).

    h, w = H/16, W/16 (rounded as the model rounds; a patch-14 ViT: H/14, W/14).
    ``backbone`` is the timm model itself with timm's module names, so timm state dicts and
    Sample4Geo checkpoints load into it unchanged, and ``backbone.set_grad_checkpointing``
    applies to the trunk as to timm's own forward.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        source = _offline_name(name)
        try:
            # Never weights and never the network here: hub weights are loaded by hub_weights().
            backbone = create_backbone(source, name, pretrained=False)
        except ConfigError:
            raise
        except (RuntimeError, ValueError, OSError, TypeError) as exc:  # "Unknown model (...)"
            raise ConfigError(f"model.backbone: {exc}") from None
        self.name = name
        self.family = type(backbone).__name__
        self.backbone = backbone
        # Token models (ViTs): forward_intermediates' NCHW map drops the prefix tokens.
        self._tokens = getattr(backbone, "num_prefix_tokens", None) is not None
        if self._tokens and not isinstance(backbone, VisionTransformer):
            raise ConfigError(
                f"model.backbone '{name}': timm's {self.family} is a token model other than "
                f"VisionTransformer; its head cannot be run from the patch grid (supported "
                f"token models: vit_*, deit_*, DINOv2 such as vit_small_patch14_dinov2)"
            )
        self._index = _split_index(name, backbone, patch_grid=self._tokens)
        split = backbone.feature_info[self._index]
        self.trunk_stride = int(split["reduction"])
        self.trunk_channels = int(split["num_chs"])
        self._nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
        self._rest = [] if self._tokens else _rest_modules(name, backbone, split["module"])
        # forward_head's width (MobileNetV3's head has a conv after pooling), else the trunk's end
        self.descriptor_dim = int(getattr(backbone, "head_hidden_size", None)
                                  or backbone.num_features)
        if not any(p.is_meta for p in backbone.parameters()):
            self._check_split()

    def _check_split(self) -> None:
        """Refuse a model whose trunk + head is not timm's own forward (on a small image)."""
        image = torch.randn(_CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
        model, training = self.backbone, self.backbone.training
        model.eval()  # no dropout, no BatchNorm statistics updated
        try:
            with torch.no_grad():
                expected = model.forward_head(model.forward_features(image), pre_logits=True)
                ours = self.head(self.trunk(image))
            ok = (ours.shape == expected.shape == (1, self.descriptor_dim)
                  and torch.allclose(ours, expected, atol=1e-4))
            why = "does not give timm's own descriptor"
        except Exception as exc:  # any failure of the model on this image is the reason
            ok, why = False, (f"fails on a {_CHECK_SHAPE[2]} x {_CHECK_SHAPE[3]} image "
                              f"({type(exc).__name__}: {_first_line(exc)})")
        finally:
            model.train(training)
        if not ok:
            raise ConfigError(
                f"model.backbone '{self.name}': timm's {self.family} split at its stride-"
                f"{self.trunk_stride} map ({self.backbone.feature_info[self._index]['module']}) "
                f"{why}; choose another backbone (e.g. convnext_base, resnet50, "
                f"efficientnet_b0, vit_base_patch16_224, swin_tiny_patch4_window7_224)"
            )

    def check_size(self, size: tuple[int, int], key: str) -> None:
        """ConfigError naming config key ``key`` when images of ``size`` (H, W) cannot enter
        the model: a patch embedding that does not pad (Swin: patch 4) needs multiples."""
        embed = getattr(self.backbone, "patch_embed", None)
        patch = tuple(getattr(embed, "patch_size", ()) or ())
        if patch and not getattr(embed, "dynamic_img_pad", True) and any(
                v % p for v, p in zip(size, patch, strict=True)):
            raise ConfigError(f"{key} {list(size)}: {self.name} takes images whose height and "
                              f"width are multiples of its patch size {list(patch)}")

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalised images -> (B,C,h,w) feature map (timm's forward_intermediates)."""
        return self.backbone.forward_intermediates(
            images, indices=[self._index], output_fmt="NCHW", intermediates_only=True,
            stop_early=True,
        )[0]

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) trunk features -> (B,D) descriptor (not normalised)."""
        return self._head(features)

    def _head(self, features: torch.Tensor,
              visit: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
        """``head``; ``visit(path, NCHW output)`` is called after each feature module."""
        x = features
        if self._tokens:
            b, c = x.shape[:2]
            tokens = x.flatten(2).transpose(1, 2)
            # Placeholders where the prefix tokens were: timm's average pooling skips them and
            # the norm is per token, so they change nothing and timm's own head code runs.
            prefix = tokens.new_zeros(b, self.backbone.num_prefix_tokens, c)
            x = self.backbone.norm(torch.cat([prefix, tokens], dim=1))
            if visit:
                visit("norm", x[:, self.backbone.num_prefix_tokens:].transpose(1, 2)
                      .reshape(features.shape))
        else:
            if self._nhwc:
                x = x.permute(0, 2, 3, 1)
            for path in self._rest:
                x = self.backbone.get_submodule(path)(x)
                if visit:
                    visit(path, x.permute(0, 3, 1, 2) if self._nhwc and x.ndim == 4 else x)
        return self.backbone.forward_head(x, pre_logits=True)

    def stages(self, images: torch.Tensor) -> list[tuple[str, str, torch.Tensor]]:
        """(module, 'trunk'|'head'|'descriptor', output) in forward order: every feature_info
        map up to the split, every head module, the descriptor (maps NCHW)."""
        maps = self.backbone.forward_intermediates(
            images, indices=list(range(self._index + 1)), output_fmt="NCHW",
            intermediates_only=True, stop_early=True,
        )
        info = self.backbone.feature_info[: self._index + 1]
        rows = [(f["module"], "trunk", m) for f, m in zip(info, maps, strict=True)]
        descriptor = self._head(maps[-1], lambda path, x: rows.append((path, "head", x)))
        return rows + [("forward_head (pool + norm)", "descriptor", descriptor)]

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
        model = create_backbone(name, pretrained=True, cache_dir=cache)
    except Exception as exc:  # hub, network, cache and file errors all mean "no weights"
        raise WeightsUnavailable(_unavailable(name, repo, cache, exc)) from None
    finally:
        hub_log.setLevel(level)
    return model.state_dict()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unavailable(name: str, repo: str, cache: Path, exc: Exception) -> str:
    if isinstance(exc, LocalEntryNotFoundError) and hub_constants.HF_HUB_OFFLINE:
        why = f"HF_HUB_OFFLINE is set and they are not in the cache folder {cache}"
        retry = "unset HF_HUB_OFFLINE once, with network access, to fill the cache"
    elif isinstance(exc, LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        why = (f"the hub cannot be reached ({_first_line(cause) if cause else 'no network'}) and "
               f"they are not in the cache folder {cache}")
        retry = "run once with network access to fill the cache"
    else:
        why = f"{type(exc).__name__}: {_first_line(exc)} (cache folder {cache})"
        retry = "check the cache folder and network access"
    return (f"model.pretrained: timm: cannot load timm's weights for {name} (hub repository "
            f"{repo}): {why}. To continue, {retry}, or download the weights file and "
            f"set model.pretrained=/path/to/model.safetensors (a timm state dict or Sample4Geo "
            f"checkpoint); model.pretrained=none trains from random weights")
