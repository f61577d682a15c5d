"""Torch datasets over a Manifest: training/eval pairs and single-view images, decoded lazily.

Images are decoded in the DataLoader workers with ``ssageo.data.decode.decode_image`` (the
pixels and errors of ``ssageo.io.read_image``, faster): a missing, empty or
corrupt file raises DataError naming it, so a broken file stops training instead of being
skipped. Randomness is derived from (torch's per-worker seed, index, draw count), so a seeded
DataLoader reproduces its augmentations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from ssageo.config import ConfigError
from ssageo.data.base import MAX_EXAMPLES, Manifest
from ssageo.data.decode import decode_image
from ssageo.data.fov import (
    FovBatches,
    QueryCrop,
    camera_frame_label,
    crop_panorama,
    query_crop,
)
from ssageo.data.registry import get_spec
from ssageo.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Turn,
    geometric_augment,
    geometric_augment_deferred,
    label_to_classes,
    resize,
    resize_label,
    to_tensor,
    to_uint8_tensor,
    train_pipeline,
)
from ssageo.io import DataError

if TYPE_CHECKING:
    import albumentations


def _size(data_cfg: dict, key: str) -> tuple[int, int]:
    value = data_cfg.get(key)
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and v > 0 for v in value)):
        raise ConfigError(f"data.{key} must be [height, width] (positive integers), got {value!r}")
    return int(value[0]), int(value[1])


class PairDataset(Dataset):
    """(query, positive reference[, prior]) per query of a manifest.

    ``data_cfg`` is the config's ``data`` section: ``query_size``, ``reference_size`` (H, W),
    optional ``prior_size`` (default: the reference size), ``decode`` ("full", default, or
    "reduced": see :func:`ssageo.io.read_image`'s ``min_size``), ``augment`` (``flip``,
    ``rotate`` probabilities, ``photometric`` bool), used when ``train`` is True, and ``fov`` /
    ``heading`` (:func:`ssageo.data.fov.query_crop`). A sample is
    ``{"query": (3, Hq, Wq') float32, "reference": (3, Hr, Wr) float32, "index": int}`` plus
    ``"prior": (Hp, Wp) int64`` class map when every reference has a prior label: ``classes``
    is ``model.bev.classes``, which decides how a stored label is read (``label_to_classes``).
    With ``normalise=False`` (training) the images are (3, H, W) uint8 and the prior uint8, a
    quarter and an eighth of the bytes to collate and copy: ``to_device_normalised`` makes
    the same float32 / int64 values on the device.

    With a limited FoV or a random heading the query is the crop of the (flipped, rotated)
    panorama, Wq' = ``crop_width(Wq, fov)``, and the prior is in the crop's camera frame with
    the cells outside the visible wedge set to ``fov.IGNORE`` (docs/ARCHITECTURE.md, "Limited
    field of view"). The heading is drawn per sample at training, from ``(crop_seed, index)``
    otherwise. With ``fov_min`` below ``fov`` (training), the loader's batch sampler is
    wrapped by ``batches`` and each item is ``(index, fov)``: the query is cropped to that
    batch's FoV and the sample gains ``"fov"`` (float).

    Augmentation randomness: with ``seed``, sample ``index`` of epoch ``self.epoch`` (set it
    before each epoch) is augmented by a generator of ``(seed, epoch, index)`` alone, the same in
    any worker and after a resume; without it, by torch's per-worker seed and a draw counter.
    """

    def __init__(self, manifest: Manifest, data_cfg: dict, train: bool,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 seed: int | None = None, classes: int = 2, crop_seed: int = 0,
                 normalise: bool = True):
        if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= 256:
            raise ConfigError(f"model.bev.classes must be an integer 2..256, got {classes!r}")
        self.classes = classes
        self.manifest = manifest
        self.seed, self.epoch = seed, 0
        self.train = train
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalise = normalise
        self.panorama_size = _size(data_cfg, "query_size")
        self.crop: QueryCrop = query_crop(data_cfg, crop_seed)
        self.query_size = self.crop.size(self.panorama_size)
        fov_min = data_cfg.get("fov_min")  # checked by the config schema
        self.fov_min = None if fov_min is None or fov_min >= self.crop.fov else float(fov_min)
        self.reference_size = _size(data_cfg, "reference_size")
        self.prior_size = (_size(data_cfg, "prior_size") if data_cfg.get("prior_size")
                           else self.reference_size)
        decode = data_cfg.get("decode", "full")
        if decode not in ("full", "reduced"):
            raise ConfigError(f"data.decode must be 'full' or 'reduced', got {decode!r}")
        # reduced: JPEGs decode at 1/2..1/8 scale while still >= the working size (the tile
        # may be rotated by 90 degrees, so at least its longer side both ways)
        side = max(self.reference_size)
        self._min_sizes = ((self.panorama_size, (side, side)) if decode == "reduced"
                           else (None, None))
        aug = data_cfg.get("augment") or {}
        self.p_flip = float(aug.get("flip", 0.0)) if train else 0.0
        self.p_rotate = float(aug.get("rotate", 0.0)) if train else 0.0
        self.panorama = get_spec(manifest.dataset).query == "panorama"  # else perspective
        # tile and label turn after their resizes when that keeps their shapes, as the
        # reference does (geometric_augment_deferred)
        self._turn_after_resize = all(s[0] == s[1] for s in (self.reference_size,
                                                             self.prior_size))
        self.photometric = bool(aug.get("photometric", False)) and train
        without = [r for r, p in zip(manifest.reference_paths, manifest.prior_paths, strict=True)
                   if p is None]
        if without and len(without) < manifest.num_references:
            shown = ", ".join(str(p) for p in without[:MAX_EXAMPLES])
            raise DataError(f"{manifest.root}: {len(without)} of {manifest.num_references} "
                            f"satellite tiles have no prior label (e.g. {shown}); write the "
                            "missing ones with `ssageo priors` or remove sat_BEV_label/")
        self.use_priors = manifest.has_priors
        self._views = self._train_pipelines(aug.get("hole_size_from", "reference")) \
            if self.photometric else {}
        self._query_views: dict = {}  # random FoV: query size -> its pipeline, made when used
        self._draws = 0

    def _train_pipelines(self, hole_size_from: str) -> dict:
        """Per-view photometric pipelines (resize included). CoarseDropout holes are sized from
        the satellite tile's height in both views (``reference``, SSA) or from each view's own
        height (``view``, Sample4Geo)."""
        if hole_size_from not in ("reference", "view"):
            raise ConfigError("data.augment.hole_size_from must be 'reference' or 'view', got "
                              f"{hole_size_from!r}")
        sizes = {"query": self.query_size, "reference": self.reference_size}
        self._hole_height = (self.reference_size if hole_size_from == "reference"
                             else self.query_size)[0]  # the query's, whatever its width
        return {name: train_pipeline(name, size, (self.reference_size if hole_size_from
                                                  == "reference" else size)[0])
                for name, size in sizes.items()}

    def _query_pipeline(self, size: tuple[int, int]) -> albumentations.Compose:
        """The query's photometric pipeline resizing to ``size``: a random-FoV batch's query
        width differs from ``query_size``'s; its holes stay those of the configured query
        (sized from a height, which the FoV does not change)."""
        if size == self.query_size:
            return self._views["query"]
        if size not in self._query_views:
            self._query_views[size] = train_pipeline("query", size, self._hole_height)
        return self._query_views[size]

    def batches(self, sampler: torch.utils.data.Sampler) -> torch.utils.data.Sampler:
        """The loader's batch sampler for ``sampler``: itself, or (random-FoV training) its
        batches as ``(index, fov)`` items, one FoV per batch (``fov.FovBatches``)."""
        if self.fov_min is None:
            return sampler
        return FovBatches(sampler, self.fov_min, self.crop.fov, self.seed or 0)

    def __len__(self) -> int:
        return self.manifest.num_queries

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is not None:
            return np.random.default_rng([self.seed, self.epoch, index])
        self._draws += 1
        return np.random.default_rng([torch.initial_seed() % 2**63, index, self._draws])

    def __getitem__(self, item: int | tuple[int, float]) -> dict:
        index, fov = item if isinstance(item, tuple) else (item, None)
        crop = self.crop if fov is None else dataclasses.replace(self.crop, fov=fov)
        query_size = crop.size(self.panorama_size)
        m = self.manifest
        ref = int(m.positive[index])
        query = decode_image(m.query_paths[index], min_size=self._min_sizes[0])
        tile = decode_image(m.reference_paths[ref], min_size=self._min_sizes[1])
        prior = decode_image(m.prior_paths[ref], mode="L") if self.use_priors else None
        turn = Turn()  # the quarter turn of tile and label, applied after their resizes
        if self.train:
            rng = self._rng(index)
            # Geometry first, on the native pixel grid, where the panorama's north column is
            # exactly W/2; resizing afterwards moves both views consistently. The quarter turn
            # of tile and label waits for their resizes, as in the reference (the tile's
            # resize commutes with it exactly: the same pixels, 4x fewer to move).
            geometry = (geometric_augment_deferred(tile, prior, query, rng, self.p_flip,
                                                   self.p_rotate, self.panorama)
                        if self._turn_after_resize else
                        (*geometric_augment(tile, prior, query, rng, self.p_flip, self.p_rotate,
                                            self.panorama), turn))
            tile, prior, query, turn = geometry
        if not crop.identity:  # the crop of the panorama as augmented
            heading = crop.heading_for(index, rng if self.train else None)
            query = crop_panorama(query, crop.fov, heading)
        if self.photometric:  # JPEG on the input pixels, then the resize, then the rest
            images = {"query": query, "reference": tile}
            for name in ("query", "reference"):
                view = self._query_pipeline(query_size) if name == "query" else self._views[name]
                view.set_random_seed(int(rng.integers(2**31)))
                images[name] = view(image=images[name],
                                    turn=turn if name == "reference" else None)["image"]
            query, tile = images["query"], images["reference"]
        else:
            query = resize(query, query_size)
            tile = turn(resize(tile, self.reference_size))
        if prior is not None:
            prior = turn(resize_label(prior, self.prior_size))
        sample = {"query": _image_tensor(query, self), "reference": _image_tensor(tile, self),
                  "index": index}
        if prior is not None:
            # classes <= 256: a uint8 label holds every class index (a FoV crop's camera-frame
            # label is int64: its cells outside the wedge are IGNORE, -1)
            classes = label_to_classes(prior, self.classes, str(m.prior_paths[ref]),
                                       np.int64 if self.normalise else np.uint8)
            if not crop.identity:
                classes = camera_frame_label(classes, heading, crop.fov)
            sample["prior"] = torch.from_numpy(classes)
        if fov is not None:
            sample["fov"] = float(fov)
        return sample


def _image_tensor(image: np.ndarray, ds: PairDataset | ImageDataset) -> torch.Tensor:
    """``ds``'s sample tensor of an (H, W, 3) uint8 image: normalised float32, or uint8."""
    return to_tensor(image, ds.mean, ds.std) if ds.normalise else to_uint8_tensor(image)


class ImageDataset(Dataset):
    """Eval-time images: ``{"image": (3, H, W) float32 resized to ``size`` and normalised,
    "index": int}`` for each path (uint8, not normalised, with ``normalise=False``: see
    PairDataset).

    With a ``crop`` (panoramas only), image ``index`` is first cropped to its FoV at the
    heading ``crop.heading_for(index)`` (reproducible), and resized to ``crop.size(size)``.
    """

    def __init__(self, paths: Sequence[str | Path], size: tuple[int, int],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 crop: QueryCrop | None = None, normalise: bool = True):
        self.paths = [Path(p) for p in paths]
        self.normalise = normalise
        self.crop = None if crop is None or crop.identity else crop
        size = (int(size[0]), int(size[1]))
        self.size = size if self.crop is None else self.crop.size(size)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = decode_image(self.paths[index])
        if self.crop is not None:
            image = crop_panorama(image, self.crop.fov, self.crop.heading_for(index))
        return {"image": _image_tensor(resize(image, self.size), self), "index": index}
