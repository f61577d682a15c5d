"""The SSA model: timm encoder split, BEV head, losses, weights load/save."""

from ssageo.model.encoder import Encoder
from ssageo.model.losses import InfoNCE, bev_loss, dice_loss, ssa_loss
from ssageo.model.ssa import (
    SSAModel,
    build_model,
    ensure_weights,
    load_model,
    load_pretrained,
    load_weights,
    save_model,
)

__all__ = [
    "Encoder",
    "InfoNCE",
    "SSAModel",
    "bev_loss",
    "build_model",
    "dice_loss",
    "ensure_weights",
    "load_model",
    "load_pretrained",
    "load_weights",
    "save_model",
    "ssa_loss",
]
