"""The loader code ``real_sizes.py`` compares the library with: "baseline", the code before
2026-12-01 (PIL decoding, numpy flips/rotations, float32 normalised handover, albumentations'
own JPEG-quality op), and "previous", the code before tile and label turned after their resizes
(see ``real_sizes.py``'s docstring). Each is a context manager that patches
``ssageo.data.datasets`` (forked loader workers inherit the patch)."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import ssageo.data.datasets as datasets
from ssageo.data.transforms import Turn, draw_turn
from ssageo.io import read_image, write_image


def _pil_decode(path, mode="RGB", min_size=None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img.convert(mode))


def _numpy_geometry(tile, prior, pano, rng, p_flip, p_rotate, panorama=True):  # noqa: ARG001
    if rng.random() < p_flip:
        tile, pano = np.fliplr(tile), np.roll(np.fliplr(pano), 1, axis=1)
        prior = None if prior is None else np.fliplr(prior)
    if rng.random() < p_rotate:
        k = int(rng.integers(1, 4))
        tile, pano = np.rot90(tile, k), np.roll(pano, -k * pano.shape[1] // 4, axis=1)
        prior = None if prior is None else np.rot90(prior, k)
    c = np.ascontiguousarray
    return c(tile), None if prior is None else c(prior), c(pano)


def _hwc_to_tensor(image, mean, std) -> torch.Tensor:
    std = np.asarray(std, np.float32)
    x = image.astype(np.float32) * (1.0 / (255.0 * std)) - np.asarray(mean, np.float32) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _albumentations_pipeline(view, size, hole_height):
    """The pipeline before this change: albumentations' Compose (each op seeded alike) and
    its JPEG-quality op (OpenCV decoding)."""
    import albumentations as A

    from ssageo.data.transforms import train_pipeline

    ops = train_pipeline(view, size, hole_height).transforms
    return A.Compose([A.ImageCompression(quality_range=ops[0].quality_range, p=ops[0].p),
                      *ops[1:]])


@contextmanager
def _patched(**names):
    """``datasets`` with ``names`` replaced (forked workers inherit the patch)."""
    saved = {name: getattr(datasets, name) for name in names}
    for name, value in names.items():
        setattr(datasets, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(datasets, name, value)


def _former_geometry(tile, prior, pano, rng, p_flip, p_rotate, panorama=True):
    """geometric_augment before 2026-12-02's last pass: every image turned on its native grid,
    the panorama mirrored then rolled by numpy."""
    from ssageo.data.transforms import _fliplr, _turn

    turn = draw_turn(rng, p_flip, p_rotate)
    tile = _turn(tile, turn.flip, turn.k)
    prior = None if prior is None else _turn(prior, turn.flip, turn.k)
    if turn.flip:
        pano = _fliplr(pano)
    if panorama:
        shift = (1 if turn.flip else 0) + (-turn.k * pano.shape[1] // 4 if turn.k else 0)
        if shift % pano.shape[1]:
            pano = np.roll(pano, shift, axis=1)
    return tile, prior, np.ascontiguousarray(pano), Turn()


def _transposed_uint8(image) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def previous():
    """Tile and label turned on their native grid with the panorama (mirrored, then rolled by
    numpy); the uint8 handover by numpy's transposed copy."""
    return _patched(geometric_augment_deferred=_former_geometry,
                    to_uint8_tensor=_transposed_uint8)


def baseline():
    return _patched(decode_image=_pil_decode,
                    geometric_augment_deferred=lambda *a: (*_numpy_geometry(*a), Turn()),
                    to_tensor=_hwc_to_tensor, train_pipeline=_albumentations_pipeline)


def default_level_labels(manifest, root: Path):
    """``manifest`` reading copies of its labels written at PIL's default zlib level (6), as
    labels were written before (the same pixels)."""
    paths = []
    for path in manifest.prior_paths:
        copy = root / Path(path).relative_to(manifest.root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        write_image(copy, read_image(path, mode="L"))
        paths.append(copy)
    return dataclasses.replace(manifest, prior_paths=paths)
