"""Transforms: synchronised geometry for a (tile, prior, panorama) triple, photometric noise per
view, resizing and normalisation.

Orientation convention (README "Conventions"): tiles are north-up, east right; panoramas are
north-aligned with north at column W/2 and azimuth growing clockwise left to right, so column u
looks at azimuth ``360 * u / W - 180`` degrees. Hence:

- rotating the tile counter-clockwise by k*90 degrees (``np.rot90(tile, k)``) puts what was east
  at north, which is the panorama rolled by ``-k * W // 4`` columns;
- mirroring the tile east-west (``np.fliplr``) turns azimuth a into -a, so panorama column u must
  show old column ``(W - u) % W``: a left-right flip followed by a roll of one column, which keeps
  the north column W/2 (and the south column 0) in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from ssageo.io import DataError

if TYPE_CHECKING:
    import albumentations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# OpenCV's flip and rotation give np.fliplr / np.rot90's pixels, already contiguous, 5-10x
# faster than copying numpy's strided views of a 750 px tile (benchmarks/RESULTS.md)
_ROTATIONS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def _fliplr(image: np.ndarray) -> np.ndarray:
    return cv2.flip(np.ascontiguousarray(image), 1)


def rot90(image: np.ndarray, k: int) -> np.ndarray:
    """``np.rot90(image, k)`` (counter-clockwise) as a contiguous array."""
    k %= 4
    return np.ascontiguousarray(image) if k == 0 else cv2.rotate(np.ascontiguousarray(image),
                                                                  _ROTATIONS[k])


def flip_pair(tile: np.ndarray, pano: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a tile east-west and its panorama about the north column."""
    return _fliplr(tile), np.roll(_fliplr(pano), 1, axis=1)


def rotate_pair(tile: np.ndarray, pano: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a tile by k*90 degrees counter-clockwise and roll its panorama to match."""
    return rot90(tile, k), np.roll(pano, -k * pano.shape[1] // 4, axis=1)


def _turn(image: np.ndarray, flip: bool, k: int) -> np.ndarray:
    """``rot90(fliplr(image) if flip else image, k)`` in one pass where one will do: a mirror
    then a quarter turn is a transpose (k 1) or an upside-down flip (k 2)."""
    if not flip:
        return rot90(image, k)
    image = np.ascontiguousarray(image)
    if k == 1:
        return cv2.transpose(image)
    if k == 3:
        return cv2.flip(cv2.transpose(image), -1)
    return cv2.flip(image, 0 if k == 2 else 1)


@dataclasses.dataclass(frozen=True)
class Turn:
    """A drawn east-west mirror (``flip``) then ``k`` quarter turns counter-clockwise of a tile
    or label; calling it applies them in one pass (the identity returns the image itself)."""

    flip: bool = False
    k: int = 0

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return _turn(image, self.flip, self.k) if self.flip or self.k % 4 else image


def draw_turn(rng: np.random.Generator, p_flip: float = 0.5, p_rotate: float = 0.75) -> Turn:
    """The pair's geometric draws: a mirror with ``p_flip``, then with ``p_rotate`` a turn by
    k in {1, 2, 3} (uniform)."""
    flip = bool(rng.random() < p_flip)
    k = int(rng.integers(1, 4)) if rng.random() < p_rotate else 0
    return Turn(flip, k)


def _turn_query(pano: np.ndarray, turn: Turn, panorama: bool) -> np.ndarray:
    """The query of a tile turned by ``turn``: a panorama mirrored about its north column and
    rolled, a perspective query only mirrored; contiguous."""
    w = pano.shape[1]
    shift = ((1 if turn.flip else 0) + (-turn.k * w // 4 if turn.k else 0)) % w if panorama else 0
    if not shift:
        return _fliplr(pano) if turn.flip else np.ascontiguousarray(pano)
    return _rolled(pano, shift, turn.flip)


def _rolled(pano: np.ndarray, shift: int, mirror: bool) -> np.ndarray:
    """``np.roll(np.fliplr(pano) if mirror else pano, shift, axis=1)`` (0 < shift < W), each
    pixel copied once into the result (numpy's roll of a mirrored copy moves it three times:
    ~1 ms of a CVUSA panorama, ~7 ms of a VIGOR one)."""
    w = pano.shape[1]
    out = np.empty(pano.shape, pano.dtype)
    if not mirror:
        out[:, shift:] = pano[:, :w - shift]
        out[:, :shift] = pano[:, w - shift:]
        return out
    # column j shows mirrored column (j - shift) % W, i.e. pano column W - 1 - (j - shift) % W:
    # columns shift.. are pano's shift.. mirrored, columns ..shift pano's ..shift mirrored
    for part, dst in ((pano[:, shift:], out[:, shift:]), (pano[:, :shift], out[:, :shift])):
        if not np.shares_memory(cv2.flip(part, 1, dst=dst), out):  # OpenCV reallocated
            dst[...] = part[:, ::-1]
    return out


def geometric_augment(
    tile: np.ndarray, prior: np.ndarray | None, pano: np.ndarray, rng: np.random.Generator,
    p_flip: float = 0.5, p_rotate: float = 0.75, panorama: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The one place where a tile (H, W[, 3]), its prior label (H', W') and its query
    (Hq, Wq[, 3]) are flipped and rotated together, so the three cannot drift apart.

    A ``panorama`` query is mirrored about its north column and rolled with the tile's
    rotation; a perspective query (a drone view: ``panorama=False``) is mirrored plainly with
    the tile and not turned, while the tile turns alone (as Sample4Geo's University-1652
    training: a synchronised flip, RandomRotate90 of the satellite tile only).
    Returns contiguous (tile, prior, query); ``prior`` may be None.

    The pixels of :func:`flip_pair` then :func:`rotate_pair`, each image moved once: the
    tile's mirror and turn are one OpenCV op, the panorama's two rolls one (they add up).
    PairDataset turns the tile and the label later: :func:`geometric_augment_deferred`.
    """
    turn = draw_turn(rng, p_flip, p_rotate)
    prior = None if prior is None else _turn(prior, turn.flip, turn.k)
    return _turn(tile, turn.flip, turn.k), prior, _turn_query(pano, turn, panorama)


def geometric_augment_deferred(
    tile: np.ndarray, prior: np.ndarray | None, pano: np.ndarray, rng: np.random.Generator,
    p_flip: float = 0.5, p_rotate: float = 0.75, panorama: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, Turn]:
    """:func:`geometric_augment`'s draws in the reference's order (SSA's ``cvusa_v2.py``,
    ``cvact_v2.py``, ``vigor_npy_v2.py``): tile and label are mirrored here, on the native
    grid, and come back with the quarter turn (a :class:`Turn`) to apply after their resizes
    to a square size (SSA turns the resized tensors). The query moves here, as before.

    For the tile that gives :func:`geometric_augment`'s pixels: the ``INTER_LINEAR_EXACT``
    resize commutes with quarter turns bit for bit (tests/test_data_transforms.py), and a
    384 px tile has 4x fewer pixels to move than a 750 px one. The label's nearest-neighbour
    resize does not commute with them: turned after it, the label is SSA's.
    """
    turn = draw_turn(rng, p_flip, p_rotate)
    mirror = Turn(turn.flip, 0)
    prior = None if prior is None else mirror(np.ascontiguousarray(prior))
    tile = mirror(np.ascontiguousarray(tile))
    return tile, prior, _turn_query(pano, turn, panorama), Turn(False, turn.k)


# Photometric training noise of the reference (SSA ``model_training/sample4geo/transforms.py``
# ``get_transforms_train``, the same values as Sample4Geo's): the probability of each op, and the
# CoarseDropout hole side as a fraction of a height (38-76 px at the 384 px working size).
HOLE_FRACTION = (0.1, 0.2)
GRID_DROPOUT_RATIO = {"query": 0.5, "reference": 0.4}
# OpenCV's bit-exact bilinear resize, used by the reference at training and at evaluation.
RESIZE_INTERPOLATION = cv2.INTER_LINEAR_EXACT


def hole_range(height: int) -> tuple[int, int]:
    """CoarseDropout hole side range in pixels for a base ``height`` (at least 1 px)."""
    low, high = (max(1, int(f * height)) for f in HOLE_FRACTION)
    return low, high


def train_pipeline(view: str, size: tuple[int, int], hole_height: int) -> albumentations.Compose:
    """The reference's training pipeline for ``view`` ("query" or "reference"), resize included.

    JPEG compression (q 90-100, p 0.5) on the input pixels, then the resize to ``size`` (H, W)
    with ``cv2.INTER_LINEAR_EXACT``, then (reference view) the tile's drawn quarter turn, given
    per call as ``pipeline(image=tile, turn=...)``, then colour jitter (0.15 each,
    p 0.5), blur or sharpen (p 0.3), and grid dropout (ratio 0.5 ground / 0.4 satellite) or
    coarse dropout (10-25 holes of side ``hole_range(hole_height)``) (p 0.3). No other op moves
    pixels, so geometry and the prior label stay aligned.

    The ops are albumentations', drawn independently from one generator pair per sample
    (``set_random_seed``), the JPEG one decoded faster: :mod:`ssageo.data.augment`.
    """
    import albumentations as A

    from ssageo.data.augment import ImageCompression, SampleCompose, TileTurn

    holes = hole_range(hole_height)
    # the reference view's quarter turn after the resize (geometric_augment_deferred)
    turn = [TileTurn()] if view == "reference" else []
    return SampleCompose([
        ImageCompression(quality_range=(90, 100), p=0.5),
        A.Resize(int(size[0]), int(size[1]), interpolation=RESIZE_INTERPOLATION, p=1.0),
        *turn,
        A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.15, p=0.5),
        A.OneOf([A.AdvancedBlur(p=1.0), A.Sharpen(p=1.0)], p=0.3),
        A.OneOf([
            A.GridDropout(ratio=GRID_DROPOUT_RATIO[view], p=1.0),
            A.CoarseDropout(num_holes_range=(10, 25), hole_height_range=holes,
                            hole_width_range=holes, p=1.0),
        ], p=0.3),
    ])


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W[, 3]) image to ``size`` = (H, W) with ``cv2.INTER_LINEAR_EXACT`` (as the
    reference at training and evaluation)."""
    h, w = int(size[0]), int(size[1])
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=RESIZE_INTERPOLATION)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map, so classes never blend."""
    h, w = int(size[0]), int(size[1])
    if label.shape[:2] == (h, w):
        return label
    return cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)


def label_to_classes(label: np.ndarray, classes: int = 2, source: str = "prior label",
                     dtype: type = np.int64) -> np.ndarray:
    """A stored prior label -> ``dtype`` (int64, or uint8 when ``classes`` <= 256) class map for
    a ``classes``-way BEV head (``model.bev.classes``).

    A label whose values are all below ``classes`` is a class-index map, kept as it is. Otherwise
    it must be a binary label (object 255 -> class 1): with two classes, one reaching above 127,
    where any value above 127 is object (JPEG labels carry compression noise); with more
    classes, exactly 0/255. Anything else, e.g. an 8-class map given to a 2-class head, raises
    DataError naming ``source``.
    """
    top = int(label.max()) if label.size else 0
    if top < classes:
        return label.astype(dtype)
    binary = top > 127 if classes == 2 else bool(np.isin(label, (0, 255)).all())
    if binary:
        return (label > 127).astype(dtype)
    values = np.unique(label)
    found = ", ".join(str(v) for v in values[values >= classes][:5])
    raise DataError(f"{source}: holds value(s) {found}, but model.bev.classes is {classes}: a "
                    f"label must hold class indices 0..{classes - 1} or be a binary 0/255 label")


def _affine(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """float32 (scale, offset) per channel: normalised = uint8 value * scale + offset."""
    std = np.asarray(std, np.float32)
    return 1.0 / (255.0 * std), -np.asarray(mean, np.float32) / std


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalised with ``mean``/``std`` (0-1 scale)."""
    # numpy, not torch: in DataLoader workers torch's intra-op threads only contend with the
    # other workers for the same cores (6x slower on 2 cores in bench_data.py).
    # The channels are moved first, on the uint8 pixels, and the arithmetic runs in place: the
    # same values as (x * scale + offset).transpose, 10x cheaper at 384 px (RESULTS.md).
    scale, offset = _affine(mean, std)
    x = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W)
    x *= scale[:, None, None]
    x += offset[:, None, None]
    return torch.from_numpy(x)


def to_uint8_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) uint8 tensor, normalised later by
    :func:`to_device_normalised` (a quarter of to_tensor's bytes to collate and copy)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    out = np.empty((3, *image.shape[:2]), np.uint8)
    # OpenCV's split writes each channel into its plane of ``out``: the bytes of
    # np.ascontiguousarray(image.transpose(2, 0, 1)), 4x faster at 384 px
    planes = cv2.split(image, list(out))
    if not all(np.shares_memory(p, out) for p in planes):  # an OpenCV that reallocated
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return torch.from_numpy(out)


#: the image keys of a PairDataset / ImageDataset sample
IMAGE_KEYS = ("query", "reference", "image")


def to_device_normalised(batch: dict, device: torch.device | str, mean: Sequence[float],
                         std: Sequence[float],
                         memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """A loader batch on ``device``, ready for the model: uint8 images (``normalise=False``
    datasets) become float32 normalised with ``mean``/``std`` there, to the same values as
    :func:`to_tensor` (the same float32 product, then sum); float images are moved as they are;
    a prior label becomes int64. Training and evaluation both move their batches through here.
    """
    out = dict(batch)
    scale, offset = (torch.from_numpy(v).view(3, 1, 1).to(device) for v in _affine(mean, std))
    for key in IMAGE_KEYS:
        if key not in batch:
            continue
        x = batch[key].to(device, non_blocking=True)
        # mul_ then add_, two roundings as in to_tensor (a fused multiply-add would round once)
        out[key] = (x.to(torch.float32, memory_format=memory_format).mul_(scale).add_(offset)
                    if x.dtype == torch.uint8 else x.to(memory_format=memory_format))
    if "prior" in batch:
        out["prior"] = batch["prior"].to(device, non_blocking=True).long()
    return out
