"""The training pipeline's ops: drawn independently per sample (as the reference), and the JPEG
quality op's faster decoding giving albumentations' pixels."""

from collections import Counter

import albumentations as A
import numpy as np
import pytest
from albumentations.augmentations.pixel import functional as fpixel

from ssageo.data.augment import ImageCompression
from ssageo.data.transforms import train_pipeline
from test_io_decode import _textured


@pytest.mark.parametrize("shape", [(75, 125, 3), (224, 300, 3)])
def test_jpeg_quality_op_gives_albumentations_pixels(shape):
    img = _textured(*shape[:2], seed=shape[0])
    op = ImageCompression(quality_range=(90, 100), p=1.0)
    for quality in range(90, 101):
        want = fpixel.image_compression(img, quality, ".jpg")  # cv2.imencode + cv2.imdecode
        assert np.array_equal(op.apply(img, quality=quality, image_type=".jpg"), want)
    # and the op's draws are albumentations': quality 90..100 with p 0.5
    assert isinstance(op, A.ImageCompression) and op.quality_range == (90, 100)


def _applied(pipeline, img, seed):
    """The names of the ops that ran on ``img`` with the pipeline seeded by ``seed``."""
    pipeline.set_random_seed(seed)
    out = pipeline(image=img)
    return frozenset(name for name, _ in out["applied_transforms"]) - {"Resize"}


def test_ops_are_drawn_independently_per_sample():
    img = _textured(32, 32)
    pipeline = train_pipeline("reference", (32, 32), 32)
    pipeline.save_applied_params = True
    runs = [_applied(pipeline, img, seed) for seed in range(1500)]
    rate = Counter(name for ops in runs for name in ops)
    n = len(runs)
    jpeg, jitter = rate["ImageCompression"] / n, rate["ColorJitter"] / n
    blur = (rate["AdvancedBlur"] + rate["Sharpen"]) / n
    drop = (rate["GridDropout"] + rate["CoarseDropout"]) / n
    for got, p in ((jpeg, 0.5), (jitter, 0.5), (blur, 0.3), (drop, 0.3)):
        assert abs(got - p) < 0.05
    # independent coin flips: each pair of ops together at the product of their rates (one
    # seed for every op made JPEG and colour jitter all-or-none, and dropout never without them)
    both = sum("ImageCompression" in ops and "ColorJitter" in ops for ops in runs) / n
    alone = sum(bool(ops & {"GridDropout", "CoarseDropout"}) and "ColorJitter" not in ops
                for ops in runs) / n
    assert abs(both - 0.25) < 0.05 and abs(alone - 0.15) < 0.04
    # a seed still reproduces its sample
    pipeline.set_random_seed(7)
    first = pipeline(image=img)["image"]
    pipeline.set_random_seed(7)
    assert np.array_equal(pipeline(image=img)["image"], first)
