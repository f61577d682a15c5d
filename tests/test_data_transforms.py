"""The synchronised geometric augmentation keeps tile, prior and panorama consistent.

Ground truth comes from the synthetic renderer: an augmented (tile, panorama) pair must equal
the pair rendered from the correspondingly mirrored/rotated world.
"""

import dataclasses

import numpy as np
import pytest

from ssageo.data.transforms import flip_pair, geometric_augment, label_to_classes, rotate_pair
from ssageo.synth.render import TILE_CELLS, render_panorama, render_satellite
from ssageo.synth.world import generate_world

PANO = (256, 64)  # (W, H)


@pytest.fixture(scope="module")
def world():
    return generate_world(3, 256.0)


def _transform_world(world, flip: bool, k: int):
    """The world mirrored east-west (if ``flip``) and then rotated k*90 degrees CCW."""
    def op(a):
        a = np.fliplr(a) if flip else a
        return np.ascontiguousarray(np.rot90(a, k))
    fields = ("cls", "height", "albedo", "facade", "shaded", "district", "district_id")
    return dataclasses.replace(world, **{f: op(getattr(world, f)) for f in fields})


def _transform_point(world, row: float, col: float, flip: bool, k: int):
    h, w = world.shape
    if flip:
        col = w - col
    for _ in range(k):  # rot90 CCW: (r, c) -> (W - c, r), shape (H, W) -> (W, H)
        row, col, h, w = w - col, row, w, h
    return row, col


def _place(world, rank: int):
    """A street camera position whose tile lies inside the world (``rank``-th nearest centre)."""
    centre = np.array(world.shape) / 2
    order = np.argsort(np.abs(world.candidates - centre).max(axis=1), kind="stable")
    return tuple(int(v) for v in world.candidates[order[rank]])


def _render(world, row, col, flip=False, k=0):
    """Tile and panorama classes at corner (row, col) of ``world`` transformed by (flip, k)."""
    # The camera sits off the cell corner so no ray runs exactly along a cell boundary.
    cam = _transform_point(world, row + 0.3, col + 0.37, flip, k)
    corner = _transform_point(world, row, col, flip, k)
    moved = _transform_world(world, flip, k)
    rng = np.random.default_rng(0)
    _, tile_cls = render_satellite(moved, int(corner[0]), int(corner[1]), TILE_CELLS, rng)
    _, pano_cls = render_panorama(moved, *cam, PANO, np.random.default_rng(0))
    return tile_cls, pano_cls


def _identify(original: np.ndarray, augmented: np.ndarray) -> tuple[bool, int]:
    """Which (flip, k) turns ``original`` into ``augmented`` (unique for a generic map)."""
    matches = [(f, k) for f in (False, True) for k in range(4)
               if np.array_equal(np.rot90(np.fliplr(original) if f else original, k), augmented)]
    assert len(matches) == 1, matches
    return matches[0]


def test_augmented_pair_matches_the_pair_rendered_from_the_transformed_world(world):
    row, col = _place(world, 0)
    tile_cls, pano_cls = _render(world, row, col)
    rgb = np.random.default_rng(0).integers(0, 255, (*tile_cls.shape, 3), dtype=np.uint8)
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(12):
        tile, prior, pano = geometric_augment(rgb, tile_cls, pano_cls, rng, 0.5, 0.75)
        flip, k = _identify(tile_cls, prior)
        seen.add((flip, k))
        # tile and prior moved together
        assert np.array_equal(tile, np.rot90(np.fliplr(rgb) if flip else rgb, k))
        want_tile, want_pano = _render(world, row, col, flip, k)
        assert np.array_equal(prior, want_tile)
        agree = (pano == want_pano).mean()
        assert agree > 0.999, (flip, k, agree)
    assert len(seen) >= 4  # flips and several rotations were exercised


def test_wrong_conventions_would_be_caught(world):
    """The test above can fail: rolling the other way, or a plain flip, disagrees more."""
    row, col = _place(world, 10)
    _, pano_cls = _render(world, row, col)
    _, want = _render(world, row, col, False, 1)
    _, right = rotate_pair(np.zeros((2, 2)), pano_cls, 1)
    wrong = np.roll(pano_cls, PANO[0] // 4, axis=1)
    assert (right == want).mean() > 0.999 > 0.95 > (wrong == want).mean()

    _, want = _render(world, row, col, True, 0)
    _, right = flip_pair(np.zeros((2, 2)), pano_cls)
    plain = np.fliplr(pano_cls)
    # a plain left-right flip is one column off: close, but not right
    assert (right == want).mean() > 0.999 > 0.99 > (plain == want).mean()
    # north (column W/2) stays north
    assert np.array_equal(right[:, PANO[0] // 2], pano_cls[:, PANO[0] // 2])


def test_prior_labels_become_binary_classes():
    label = np.array([[0, 3, 130], [255, 252, 120]], np.uint8)  # JPEG noise around 0/255
    assert label_to_classes(label).tolist() == [[0, 0, 1], [1, 1, 0]]
