"""Losses of SSA (docs/METHOD.md section 4): symmetric InfoNCE with a learnable temperature and an
optional all-gather across processes, and the BEV term 0.5 CE + 0.5 Dice.

The objective is the sum of the named terms in ``LOSS_TERMS``. Everything downstream (the
training loop, ``metrics.jsonl``, the progress bar, ``ssageo log`` and the report's curves)
iterates over that table, so adding a term is adding one ``LossTerm`` to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssageo.data.fov import IGNORE  # label cells outside a limited FoV's wedge: no loss there


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``x`` concatenated (gradient flows back to each rank), and this rank.

    Without an initialised process group of size > 1 this is ``x`` itself and rank 0.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank()


class InfoNCE(nn.Module):
    """Symmetric InfoNCE over in-batch negatives.

    ``forward(query, reference, logit_scale)`` takes (B,D) descriptors (normalised here again,
    which is a no-op for the model's outputs) and the learnable log-scale; the similarity scale
    is ``min(exp(logit_scale), max_scale) * multiplier``: the clamp bounds the learnt value as
    CLIP does, the fixed multiplier (1.5 in the paper) applies on top. With ``gather`` and
    several processes, every rank scores its own rows against all ranks' rows; its positives
    sit at offset rank * B. The mean of the ranks' losses equals the single-process loss on the
    concatenated batch, and (after DDP's gradient averaging) so do the gradients.
    """

    def __init__(self, label_smoothing: float = 0.1, multiplier: float = 1.0,
                 max_scale: float = 100.0, gather: bool = True) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.multiplier = multiplier
        self.max_scale = max_scale
        self.gather = gather

    def scale(self, logit_scale: torch.Tensor) -> torch.Tensor:
        """The similarity scale applied to cosine similarities."""
        return logit_scale.exp().clamp(max=self.max_scale) * self.multiplier

    def forward(self, query: torch.Tensor, reference: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        query, reference = F.normalize(query, dim=-1), F.normalize(reference, dim=-1)
        if self.gather:
            all_query, rank = _gather(query)
            all_reference, _ = _gather(reference)
        else:
            all_query, all_reference, rank = query, reference, 0
        scale = self.scale(logit_scale)
        labels = torch.arange(query.shape[0], device=query.device) + rank * query.shape[0]
        loss_q = F.cross_entropy(scale * query @ all_reference.t(), labels,
                                 label_smoothing=self.label_smoothing)
        loss_r = F.cross_entropy(scale * reference @ all_query.t(), labels,
                                 label_smoothing=self.label_smoothing)
        return (loss_q + loss_r) / 2


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Multi-class Dice on softmax probabilities, the SSA authors' form (``MultiClassDiceLoss``
    in ``model_training/sample4geo/loss.py``, fed softmax outputs by their trainer): for every
    sample b and class k, over the H x W pixels,
    ``1 - (2 sum p*y + eps) / (sum p + sum y + eps)``, averaged over all (b, k).

    ``logits`` (B,K,H,W); ``target`` (B,H,W) int64 class indices. Per sample, not pooled over
    the batch: a class absent from a sample's labels counts there with its own (small) Dice.
    Pixels labelled IGNORE count in neither sum.
    """
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    if bool((target < 0).any()):
        keep = (target >= 0).unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * keep, onehot * keep
    inter = (probs * onehot).sum((2, 3))  # (B,K)
    total = probs.sum((2, 3)) + onehot.sum((2, 3))
    return (1 - (2 * inter + eps) / (total + eps)).mean()


def resize_prior(prior: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,H,W) class map -> (B,*size) by nearest-neighbour (class indices stay classes)."""
    if tuple(prior.shape[-2:]) == tuple(size):
        return prior.long()
    resized = F.interpolate(prior[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].long()


def bev_loss(logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """0.5 cross-entropy + 0.5 Dice of (B,K,S,S) logits against a (B,H,W) class-map prior
    (cells labelled IGNORE, outside a limited field of view, take no part)."""
    target = resize_prior(prior, tuple(logits.shape[-2:]))
    if int(target.max()) >= logits.shape[1] or int(target.min()) < IGNORE:
        raise ValueError(f"prior holds class {int(target.max())}, outside the model's "
                         f"{logits.shape[1]} BEV classes")
    return (0.5 * F.cross_entropy(logits, target, ignore_index=IGNORE)
            + 0.5 * dice_loss(logits, target))


@dataclass(frozen=True)
class LossTerm:
    """One named term of the training objective.

    ``compute(outputs, prior, loss_cfg)`` returns the term already weighted (a scalar tensor;
    zero where it does not apply, e.g. the BEV term without priors). ``name`` is its key in the
    loss dict and in ``metrics.jsonl``; ``label`` heads its ``ssageo log`` column; ``title``
    heads its curve in the report.
    """

    name: str
    label: str
    title: str
    compute: Callable[[dict, torch.Tensor | None, dict], torch.Tensor]


def infonce_term(outputs: dict, prior: torch.Tensor | None, loss_cfg: dict) -> torch.Tensor:
    """Symmetric InfoNCE of the two views' descriptors (the config's ``loss`` settings)."""
    return InfoNCE(
        label_smoothing=float(loss_cfg.get("label_smoothing", 0.0)),
        multiplier=float(loss_cfg.get("logit_scale_multiplier", 1.0)),
        max_scale=float(loss_cfg.get("logit_scale_max", 100.0)),
        gather=bool(loss_cfg.get("gather", True)),
    )(outputs["query"], outputs["reference"], outputs["logit_scale"])


def bev_term(outputs: dict, prior: torch.Tensor | None, loss_cfg: dict) -> torch.Tensor:
    """``ssa_weight * (0.5 CE + 0.5 Dice)`` of the BEV logits against the prior; 0 when the
    prior or the BEV logits are absent."""
    logits = outputs.get("bev_logits")
    if prior is None or logits is None:
        return outputs["logit_scale"].new_zeros((), dtype=torch.float32)
    return float(loss_cfg.get("ssa_weight", 1.0)) * bev_loss(logits, prior.to(logits.device))


# The objective's terms, in the order they are logged and drawn. "infonce" and "bev" are also
# the keys of every metrics.jsonl written so far: renaming one would orphan old runs' curves.
LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm("infonce", "InfoNCE", "InfoNCE loss", infonce_term),
    LossTerm("bev", "BEV", "BEV loss (0.5 CE + 0.5 Dice)", bev_term),
)


def loss_terms() -> tuple[LossTerm, ...]:
    """The objective's terms (read at call time, so every consumer sees one table)."""
    return LOSS_TERMS


def ssa_loss(outputs: dict, prior: torch.Tensor | None, loss_cfg: dict) -> dict:
    """The training objective from model outputs: the sum of the terms of ``loss_terms()``,
    for SSA ``InfoNCE + ssa_weight * (0.5 CE + 0.5 Dice)``.

    ``outputs``: the model's dict (query, reference, bev_logits, logit_scale); ``prior``:
    (B,H,W) class map or None; ``loss_cfg``: the config's ``loss`` section. Returns tensors:
    ``loss``, the sum of the terms, then each term of ``loss_terms()`` by name
    (``infonce``, ``bev``).
    """
    terms = {term.name: term.compute(outputs, prior, loss_cfg) for term in loss_terms()}
    return {"loss": sum(terms.values()), **terms}
