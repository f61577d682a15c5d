"""Descriptor extraction: a model over image paths or a whole Manifest, and its evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ssageo.data.datasets import ImageDataset
from ssageo.data.fov import QueryCrop, query_crop
from ssageo.data.manifest import Manifest
from ssageo.data.registry import get_spec
from ssageo.data.transforms import to_device_normalised
from ssageo.evaluate.descriptors import DescriptorSet
from ssageo.evaluate.metrics import retrieval_metrics
from ssageo.io import DataError

if TYPE_CHECKING:  # the model stage imports timm
    from ssageo.model.ssa import SSAModel

DEFAULT_BATCH_SIZE = 64


def embed_paths(
    model: SSAModel,
    paths: Sequence[str | Path],
    size: Sequence[int],
    view: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 0,
    progress: bool = True,
    crop: QueryCrop | None = None,
) -> np.ndarray:
    """(N, D) float32 L2-normalised descriptors of the images at ``paths``.

    Each image (with a ``crop``: its reproducible FoV crop, see ImageDataset) is resized to
    ``size`` (H, W), normalised with ``model.data_config()`` and fed to
    ``model.embed(x, view=view)`` in eval mode under inference mode, on the model's device; the
    model's train/eval mode is restored afterwards. An unreadable image raises DataError naming it.
    """
    norm = model.data_config()
    dataset = ImageDataset(paths, tuple(size), norm["mean"], norm["std"], crop,
                           normalise=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=f"embed {view}", unit="batch", disable=not progress):
                x = to_device_normalised(batch, device, norm["mean"], norm["std"])["image"]
                desc = model.embed(x, view=view)
                chunks.append(desc.float().cpu().numpy())
    except DataError as exc:
        # a loader worker re-raises with its whole traceback in the message: keep the last line
        raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError(f"no {view} images to embed")
    return np.concatenate(chunks)


def embed_manifest(
    model: SSAModel,
    manifest: Manifest,
    config: dict,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    crop: QueryCrop | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(query (Q, D), reference (R, D)) float32 descriptors of every image of a manifest.

    Input sizes come from ``config["data"]`` (``query_size``, ``reference_size``); the batch size
    defaults to ``eval.batch_size`` and the loader workers to ``data.workers``. The queries are
    the FoV crops of ``crop`` (default: the config's ``data.fov`` and ``data.heading``, each
    query's random heading seeded by its index).
    """
    crop = crop if crop is not None else query_crop(config["data"])
    batch_size = batch_size or config["eval"]["batch_size"]  # a loaded config has every key
    workers = config["data"]["workers"] if workers is None else workers
    kwargs: dict[str, Any] = {"batch_size": batch_size, "workers": workers, "progress": progress}
    query = embed_paths(
        model, manifest.query_paths, config["data"]["query_size"], "query", **kwargs, crop=crop
    )
    reference = embed_paths(
        model, manifest.reference_paths, config["data"]["reference_size"], "reference", **kwargs
    )
    return query, reference


def descriptor_set(manifest: Manifest, query: np.ndarray, reference: np.ndarray) -> DescriptorSet:
    """Pack a manifest's descriptors and ground truth for :func:`save_descriptors`.

    Semi-positives are kept only where the manifest has any (VIGOR); coordinates only where both
    views have (lat, lon) ones; reference groups where the dataset's protocol is ``groups``.
    """
    grouped = get_spec(manifest.dataset).protocol == "groups"
    semi = manifest.semi_positive
    has_coords = manifest.query_coords is not None and manifest.reference_coords is not None
    return DescriptorSet(
        query=query,
        reference=reference,
        positive=np.asarray(manifest.positive, dtype=np.int64),
        semi_positive=np.asarray(semi, dtype=np.int64) if (np.asarray(semi) >= 0).any() else None,
        query_coords=manifest.query_coords if has_coords else None,
        reference_coords=manifest.reference_coords if has_coords else None,
        reference_groups=manifest.reference_groups if grouped else None,
    )


def manifest_metrics(
    manifest: Manifest,
    query: np.ndarray,
    reference: np.ndarray,
    block_size: int = 4096,
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """Retrieval metrics of a manifest's descriptors, with the metre error where it can be had:
    from (lat, lon) coordinates, or for CVACT from its UTM easting/northing; the similarity
    products run on ``device`` (default CPU)."""
    ds = descriptor_set(manifest, query, reference)
    if ds.query_coords is None and manifest.utm is not None:
        # CVACT: the UTM of each place belongs to its query and to its positive reference
        ref_utm = np.full((len(reference), 2), np.nan)
        ref_utm[manifest.positive] = manifest.utm
        if np.isfinite(ref_utm).all():
            return retrieval_metrics(
                query,
                reference,
                ds.positive,
                ds.semi_positive,
                manifest.utm,
                ref_utm,
                block_size,
                planar_coords=True,
                device=device,
            )
    return ds.metrics(block_size, device)


def evaluate_model(
    model: torch.nn.Module, manifest: Manifest, config: dict, block_size: int = 4096
) -> dict[str, float | int]:
    """Embed a manifest with ``model`` and return :func:`manifest_metrics` (for validation),
    ranking on the model's device."""
    query, reference = embed_manifest(model, manifest, config)
    device = next(model.parameters()).device
    return manifest_metrics(manifest, query, reference, block_size, device)
