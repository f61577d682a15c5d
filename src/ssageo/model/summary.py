"""What a configured model is made of: parameters and per-stage feature shapes of both views.

Shapes are traced on the meta device, so even convnext_base at 384 x 768 costs no memory or
time and no weights are read.
"""

from __future__ import annotations

import copy

import torch

from ssageo.model.bev import polar_to_cartesian
from ssageo.model.ssa import VIEWS, SSAModel, _sizes


def model_info(config: dict) -> dict:
    """Summary of the model a full config describes.

    Returns {"backbone", "family", "shared_encoder", "descriptor_dim", "parameters",
    "trainable", "parts": {part: parameters}, "stages": [{"module", "part", "query",
    "reference"}] (per-sample output shapes; "reference" None for the BEV rows)}.
    """
    reference_size, query_size = _sizes(config)
    model_cfg = dict(copy.deepcopy(config["model"]), pretrained=None)
    with torch.device("meta"):
        model = SSAModel(model_cfg, reference_size, query_size)
        stages = _stage_shapes(model, {"query": query_size, "reference": reference_size})
    parts = {"encoder": sum(p.numel() for p in model.encoders.parameters()),
             "bev": sum(p.numel() for p in model.bev.parameters()) if model.bev else 0,
             "logit_scale": 1}
    encoder = model.encoder("query")
    return {
        "backbone": encoder.name, "family": encoder.family,
        "shared_encoder": "shared" in model.encoders, "descriptor_dim": encoder.descriptor_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parts": parts, "stages": stages,
    }


def _stage_shapes(model: SSAModel, sizes: dict) -> list[dict]:
    encoder = model.encoder("query")
    stages = {view: model.encoder(view).stages(torch.empty(1, 3, *sizes[view])) for view in VIEWS}
    rows = []
    for i, (module, part, _) in enumerate(stages["query"]):
        rows.append({"module": module, "part": part if part == "descriptor" else f"encoder {part}",
                     **{view: tuple(stages[view][i][2].shape[1:]) for view in VIEWS}})
    if model.bev is not None:
        trunk = encoder.trunk(torch.empty(1, 3, *sizes["query"]))
        polar = model.bev.projection(trunk)
        grid = polar_to_cartesian(polar, model.bev.grid_size)
        logits = model.bev.decoder(grid)
        for name, t in (("polar projection (C,D,W)", polar), ("polar -> Cartesian", grid),
                        ("decoder logits", logits)):
            rows.append({"module": name, "part": "bev", "query": tuple(t.shape[1:]),
                         "reference": None})
    return rows
