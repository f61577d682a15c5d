"""The reference's photometric training ops (albumentations), drawn independently and decoded
faster; ``transforms.train_pipeline`` builds them.

- :class:`SampleCompose`: ``set_random_seed(seed)`` gives every op of the pipeline ONE shared
  pair of generators seeded by ``seed``, so each op's coin flip and parameters are successive
  draws, independent of the others', as in the reference (albumentations' global randomness).
  ``albumentations.Compose.set_random_seed`` seeds every op with the same seed instead: each op
  then draws the same first number, so JPEG compression (p 0.5) and colour jitter (p 0.5) were
  applied always together and blur/sharpen and dropout (p 0.3) only with both, always paired
  (docs/FIDELITY.md).
- :class:`TileTurn`: the tile's drawn quarter turn, right after the resize.
- :class:`ImageCompression`: the reference's op, OpenCV's encoder at the drawn quality, with the
  re-encoded image decoded by simplejpeg (the same libjpeg-turbo decoder, the same pixels as
  ``cv2.imdecode``; tests/test_data_decode.py), ~10 % faster.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import albumentations as A
import cv2
import numpy as np


class SampleCompose(A.Compose):
    """``albumentations.Compose`` whose ``set_random_seed`` seeds one generator pair shared by
    all its ops (see the module docstring). ``pipeline(image=..., turn=t)`` hands the sample's
    drawn :class:`~ssageo.data.transforms.Turn` to its :class:`TileTurn` op (the identity
    without ``turn``)."""

    def set_random_seed(self, seed: int | None) -> None:
        self.seed = seed
        self.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, *args: Any, turn: Callable[[np.ndarray], np.ndarray] | None = None,
                 **data: Any) -> dict[str, Any]:
        for op in self.transforms:
            if isinstance(op, TileTurn):
                op.turn = turn
        return super().__call__(*args, **data)


class TileTurn(A.ImageOnlyTransform):
    """The satellite tile's quarter turn, drawn with the pair's geometry
    (``transforms.geometric_augment_deferred``) and applied after the resize, as the reference
    turns the resized tile (on 4x fewer pixels than the native tile). With p 1 it draws
    nothing, so every other op draws what it would without it; ``SampleCompose`` sets
    ``turn`` per call."""

    def __init__(self) -> None:
        super().__init__(p=1.0)
        self.turn: Callable[[np.ndarray], np.ndarray] | None = None

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return img if self.turn is None else self.turn(img)


class ImageCompression(A.ImageCompression):
    """``albumentations.ImageCompression`` (JPEG): OpenCV's encoding, simplejpeg's decoding of
    it (what ``cv2.imdecode(..., IMREAD_UNCHANGED)`` returns, pixel for pixel)."""

    def apply(self, img: np.ndarray, quality: int, image_type: str, **params: Any) -> np.ndarray:
        if image_type != ".jpg" or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            return super().apply(img, quality=quality, image_type=image_type, **params)
        import simplejpeg

        ok, encoded = cv2.imencode(".jpg", img, (cv2.IMWRITE_JPEG_QUALITY, int(quality)))
        if not ok:
            return super().apply(img, quality=quality, image_type=image_type, **params)
        # OpenCV takes the array as BGR: decoding to "BGR" gives the channels back in the
        # order they came, as imdecode does
        return simplejpeg.decode_jpeg(encoded, "BGR")
