"""What the report computes from a trained model: descriptors of a bounded set of held-out
places, their retrieval ranks and metre errors, Grad-CAM maps and BEV predictions.

Everything here runs on at most ``max_places`` places (queries and their positive/semi-positive
tiles), so a report of a small run builds in seconds whatever the dataset's size. The run's own
metrics on the full held-out split come from ``metrics.jsonl``, not from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ssageo.config import ConfigError, get
from ssageo.io import DataError

if TYPE_CHECKING:
    from ssageo.data.manifest import Manifest

CHECKPOINTS = ("best", "last")  # the best validation checkpoint when there is one


@dataclass
class Run:
    """A run directory's resolved config and the model of its best (else last) checkpoint."""

    run_dir: Path
    config: dict
    model: torch.nn.Module
    checkpoint: Path


def load_run(run_dir: Path, checkpoint: str = "best") -> Run:
    """Read ``RUN_DIR/config.yaml`` and load a checkpoint in eval mode: ``checkpoint="best"``
    takes ``checkpoints/best`` (else ``last``), ``"last"`` takes ``checkpoints/last``."""
    from ssageo.model import load_model
    from ssageo.model.ssa import WEIGHTS_FILE
    from ssageo.train.rundir import CHECKPOINTS as FOLDER
    from ssageo.train.rundir import checkpoint_dir, read_config

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, "
                          f"got {checkpoint!r}")
    for name in CHECKPOINTS[CHECKPOINTS.index(checkpoint):]:
        folder = checkpoint_dir(run_dir, name)
        if (folder / WEIGHTS_FILE).is_file():
            model, _ = load_model(folder)
            return Run(run_dir, config, model.eval(), folder)
    raise DataError(f"{run_dir / FOLDER}: no best/ or last/ checkpoint with "
                    f"{WEIGHTS_FILE} (has training written one yet?)")


def held_out_manifest(config: dict, data_root: Path | None = None) -> Manifest:
    """The run's held-out split (its dataset spec's ``held_out``: ``test`` for VIGOR, which has
    no val split, ``val`` otherwise).

    ``data_root`` replaces the config's ``data.root`` (for a dataset that has moved).
    """
    from ssageo.data import detect_dataset, get_spec, load_manifest

    root = Path(data_root) if data_root is not None else get(config, "data.root")
    if root is None or not Path(root).exists():
        raise DataError(f"{root}: the run's dataset folder is not there; pass the dataset with "
                        "--data ROOT")
    dataset = config["data"]["dataset"]  # a loaded config has every key
    if dataset == "auto":
        dataset = detect_dataset(root)
    split = get_spec(dataset).held_out
    return load_manifest(root, dataset=dataset, split=split,
                         vigor_mode=config["data"]["vigor_mode"])


def subset(manifest: Manifest, max_places: int, seed: int = 0) -> Manifest:
    """A manifest of at most ``max_places`` queries (a seeded random choice) whose gallery is
    their positive and semi-positive references, indices remapped."""
    n = manifest.num_queries
    chosen = np.sort(np.random.default_rng(seed).permutation(n)[: min(max_places, n)])
    semi = manifest.semi_positive[chosen]
    used = np.unique(np.concatenate([manifest.positive[chosen], semi[semi >= 0]]))
    remap = np.full(manifest.num_references, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))

    def pick(values: Any, index: np.ndarray) -> Any:
        return None if values is None else [values[i] for i in index]

    return dataclasses.replace(
        manifest,
        query_paths=pick(manifest.query_paths, chosen),
        place_ids=pick(manifest.place_ids, chosen),
        reference_paths=pick(manifest.reference_paths, used),
        reference_ids=pick(manifest.reference_ids, used),
        prior_paths=pick(manifest.prior_paths, used),
        positive=remap[manifest.positive[chosen]],
        semi_positive=np.where(semi >= 0, remap[np.maximum(semi, 0)], -1),
        query_coords=None if manifest.query_coords is None else manifest.query_coords[chosen],
        reference_coords=(None if manifest.reference_coords is None
                          else manifest.reference_coords[used]),
        utm=None if manifest.utm is None else manifest.utm[chosen],
        offsets=None if manifest.offsets is None else manifest.offsets[chosen],
        missing=[],
    )


@dataclass
class Retrieval:
    """Descriptors of a manifest's queries/references and each query's ranking."""

    manifest: object
    query: np.ndarray  # (Q, D)
    reference: np.ndarray  # (R, D)
    top: np.ndarray  # (Q, k) reference indices, most similar first
    rank: np.ndarray  # (Q,) 0-based rank of the positive (strict >, as in the metrics)
    error_m: np.ndarray | None  # (Q,) metres from the query to its top-1 tile, if coordinates


def retrieve(run: Run, manifest: Manifest, k: int = 5) -> Retrieval:
    """Embed ``manifest`` with the run's model and rank its gallery for every query."""
    from ssageo.evaluate.embed import embed_manifest
    from ssageo.evaluate.metrics import haversine_m, rank_queries

    query, reference = (np.asarray(d, dtype=np.float32)
                        for d in embed_manifest(run.model, manifest, run.config, workers=0,
                                               progress=False))
    sim = query @ reference.T  # (Q, R): small by construction (bounded subset)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    rank = rank_queries(query, reference, manifest.positive)["rank"]
    error = None
    if manifest.query_coords is not None and manifest.reference_coords is not None:
        error = haversine_m(manifest.query_coords, manifest.reference_coords[top[:, 0]])
    elif manifest.utm is not None:
        # CVACT: UTM metres per place instead of lat/lon, shared by a query and its positive.
        ref_utm = np.full((manifest.num_references, 2), np.nan)
        ref_utm[manifest.positive] = manifest.utm
        error = np.linalg.norm(manifest.utm - ref_utm[top[:, 0]], axis=1)
        error = error if np.isfinite(error).all() else None
    return Retrieval(manifest, query, reference, top, rank, error)


FOV_TABLE = (360.0, 180.0, 90.0, 70.0)  # the field's protocol (ConGeo; issue 19)


def recall_by_fov(run: Run, found: Retrieval,
                  fovs: Sequence[float] = FOV_TABLE) -> dict[str, dict[str, float]]:
    """R@1/5/10 (%) of ``found``'s queries cropped to each FoV (the run's ``data.heading``,
    seeded per query), ranked against the same reference descriptors:
    ``{"360°": {"R@1": ..}, ..}``."""
    from ssageo.data.fov import QueryCrop, query_crop
    from ssageo.evaluate.embed import embed_paths
    from ssageo.evaluate.metrics import rank_queries

    m, heading = found.manifest, query_crop(run.config["data"]).heading
    table = {}
    for fov in fovs:
        query = embed_paths(run.model, m.query_paths, get(run.config, "data.query_size"),
                            "query", workers=0, progress=False, crop=QueryCrop(fov, heading))
        rank = rank_queries(query, found.reference, m.positive)["rank"]
        table[f"{fov:g}°"] = {f"R@{k}": 100.0 * float(np.mean(rank < k)) for k in (1, 5, 10)}
    return table


def _inputs(run: Run, paths: list[Path], size_key: str) -> torch.Tensor:
    """(N, 3, H, W) model inputs for ``paths`` at the config's ``data.<size_key>`` (queries
    cropped as the run's ``data.fov`` / ``data.heading`` say)."""
    from ssageo.data import ImageDataset
    from ssageo.data.fov import query_crop

    cfg = run.model.data_config()
    crop = query_crop(run.config["data"]) if size_key == "query_size" else None
    dataset = ImageDataset(paths, get(run.config, f"data.{size_key}"), cfg["mean"], cfg["std"],
                           crop)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def _normalised_cam(features: torch.Tensor, grads: torch.Tensor) -> np.ndarray:
    """Grad-CAM: ReLU of the gradient-weighted channel sum, scaled to [0, 1] per image."""
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * features).sum(dim=1))  # (B, h, w)
    peak = cam.flatten(1).amax(dim=1).clamp(min=1e-12)
    return (cam / peak[:, None, None]).detach().numpy()


def grad_cam(run: Run, query_paths: list[Path], reference_paths: list[Path]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (N, h, w) in [0, 1] for N matching (query, reference) pairs.

    The target is the cosine similarity of each pair's descriptors; the maps are taken on the
    encoders' stride-16 feature map (the retrieval head's input), so they show which regions of
    each view the match rests on.
    """
    model = run.model
    q_enc, r_enc = model.encoder("query"), model.encoder("reference")
    with torch.no_grad():
        q_feat = q_enc.trunk(_inputs(run, query_paths, "query_size"))
        with model.view_stats("reference"):
            r_feat = r_enc.trunk(_inputs(run, reference_paths, "reference_size"))
    q_feat.requires_grad_(True)
    r_feat.requires_grad_(True)
    with torch.enable_grad():
        q_desc = F.normalize(q_enc.head(q_feat), dim=-1)
        with model.view_stats("reference"):  # the head holds the encoder's last stages
            r_desc = F.normalize(r_enc.head(r_feat), dim=-1)
        similarity = (q_desc * r_desc).sum()
        q_grad, r_grad = torch.autograd.grad(similarity, (q_feat, r_feat))
    return _normalised_cam(q_feat, q_grad), _normalised_cam(r_feat, r_grad)


def bev_probabilities(run: Run, query_paths: list[Path]) -> np.ndarray | None:
    """(N, S, S) predicted probability of the prior's "object" class (class 1) from each
    panorama, north up; None when the model has no BEV head."""
    if getattr(run.model, "bev", None) is None:
        return None
    with torch.no_grad():
        logits = run.model(_inputs(run, query_paths, "query_size"), None,
                           with_bev=True)["bev_logits"]
    return logits.softmax(dim=1)[:, 1].numpy()
