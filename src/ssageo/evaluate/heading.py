"""Heading of a photo from the BEV head: the head predicts the layout of the visible wedge in
the camera's frame; turning a candidate tile's prior label into the camera frame of every
heading and correlating it with the prediction over the wedge gives the heading under which
the tile explains the photo best (docs/ARCHITECTURE.md, "Limited field of view")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssageo.data.fov import IGNORE, camera_frame_label
from ssageo.data.paths import prior_label_candidates
from ssageo.data.transforms import label_to_classes, resize_label
from ssageo.io import read_image

HEADING_STEP = 5.0  # degrees between the headings tried
CONFIDENCE_WINDOW = 20.0  # degrees either side of the best heading counted as agreeing with it
TEMPERATURE = 0.05  # correlation units: sharpness of the softmax over headings


def object_probability(model: torch.nn.Module, query: torch.Tensor, fov: float) -> np.ndarray:
    """(S, S) probability of "object" (any class but 0) in the camera frame of a (3, H, W)
    query crop spanning ``fov`` degrees; ``model`` must have a BEV head."""
    model.set_query_fov(fov)
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(query[None].to(device), None, with_bev=True)["bev_logits"]
    return (1.0 - logits.float().softmax(dim=1)[0, 0]).cpu().numpy()


def heading_scores(probability: np.ndarray, prior: np.ndarray, fov: float,
                   step: float = HEADING_STEP) -> tuple[np.ndarray, np.ndarray]:
    """(headings, scores): the Pearson correlation over the visible wedge between the
    predicted object probability (S, S, camera frame) and the north-up binary ``prior``
    (S, S) turned to each heading; NaN where the label is constant there."""
    headings = np.arange(0.0, 360.0, step)
    scores = np.full(len(headings), np.nan)
    for i, heading in enumerate(headings):
        label = camera_frame_label(prior, heading, fov)
        seen = label != IGNORE
        x, y = probability[seen], label[seen].astype(np.float64)
        if seen.sum() > 2 and y.std() > 0 and x.std() > 0:
            scores[i] = float(np.corrcoef(x, y)[0, 1])
    return headings, scores


def best_heading(headings: np.ndarray, scores: np.ndarray) -> dict | None:
    """``{"heading", "heading_confidence", "heading_score"}``: the best-correlated heading, the
    share of a softmax over headings within CONFIDENCE_WINDOW of it (1/72 = no preference at
    5-degree steps, 1 = certain), its correlation; None when no heading could be scored."""
    valid = np.isfinite(scores)
    if not valid.any():
        return None
    best = int(np.nanargmax(scores))
    weights = np.where(valid, np.exp((np.nan_to_num(scores, nan=-1.0) - scores[best])
                                     / TEMPERATURE), 0.0)
    near = np.abs((headings - headings[best] + 180.0) % 360.0 - 180.0) <= CONFIDENCE_WINDOW
    return {"heading": float(headings[best]),
            "heading_confidence": float(weights[near].sum() / weights.sum()),
            "heading_score": float(scores[best])}


def tile_prior(tile: str | Path, size: int, classes: int) -> np.ndarray | None:
    """A tile's prior label (``sat_BEV_label``) as a binary (size, size) object map, or None
    when the tile has none."""
    try:
        found = [Path(p) for p in prior_label_candidates(Path(tile).as_posix())]
    except ValueError:  # not in a dataset's satellite folder: no label beside it
        return None
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        return None
    label = label_to_classes(resize_label(read_image(path, mode="L"), (size, size)), classes,
                             str(path))
    return (label > 0).astype(np.int64)


def add_headings(model: torch.nn.Module, query: torch.Tensor, fov: float, hits: list[dict],
                 classes: int) -> None:
    """Add each hit's best heading (``best_heading``'s keys, None where its tile has no prior
    label) in place."""
    probability = object_probability(model, query, fov)
    for hit in hits:
        prior = tile_prior(hit["tile"], probability.shape[0], classes)
        found = None if prior is None else best_heading(*heading_scores(probability, prior, fov))
        hit.update(found or {"heading": None, "heading_confidence": None, "heading_score": None})
