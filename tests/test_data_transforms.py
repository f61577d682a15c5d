"""The synchronised geometric augmentation keeps tile, prior and panorama consistent; the
photometric pipeline and the resize are the reference's.

Ground truth comes from the synthetic renderer: an augmented (tile, panorama) pair must equal
the pair rendered from the correspondingly mirrored/rotated world.
"""

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from ssageo.data.transforms import (
    flip_pair,
    geometric_augment,
    hole_range,
    label_to_classes,
    resize,
    rotate_pair,
    train_pipeline,
)
from ssageo.synth.city import generate_world
from ssageo.synth.render import TILE_CELLS, render_panorama, render_satellite

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


def _describe(pipeline):
    """(name, p, parameters) of each op of a training pipeline, in order."""
    out = []
    for t in pipeline.transforms:
        name = type(t).__name__
        if name == "OneOf":
            out.append((name, t.p, [_op(u) for u in t.transforms]))
        else:
            out.append(_op(t))
    return out


def _op(t):
    name = type(t).__name__
    keys = {"ImageCompression": ("quality_range",), "Resize": ("height", "width", "interpolation"),
            "ColorJitter": ("brightness", "contrast", "saturation", "hue"),
            "GridDropout": ("ratio",),
            "CoarseDropout": ("num_holes_range", "hole_height_range", "hole_width_range")}
    return (name, t.p, {k: getattr(t, k) for k in keys.get(name, ())})


def _reference_pipeline(ratio, size, holes, turn=False):
    """SSA's get_transforms_train (model_training/sample4geo/transforms.py), written out; with
    ``turn`` (the satellite view), our tile's mirror and quarter turn after the resize."""
    jitter = {"brightness": (0.85, 1.15), "contrast": (0.85, 1.15), "saturation": (0.85, 1.15),
              "hue": (-0.15, 0.15)}
    return [
        ("ImageCompression", 0.5, {"quality_range": (90, 100)}),
        ("Resize", 1.0, {"height": size[0], "width": size[1],
                         "interpolation": cv2.INTER_LINEAR_EXACT}),
        *([("TileTurn", 1.0, {})] if turn else []),
        ("ColorJitter", 0.5, jitter),
        ("OneOf", 0.3, [("AdvancedBlur", 1.0, {}), ("Sharpen", 1.0, {})]),
        ("OneOf", 0.3, [("GridDropout", 1.0, {"ratio": ratio}),
                        ("CoarseDropout", 1.0, {"num_holes_range": (10, 25),
                                                "hole_height_range": holes,
                                                "hole_width_range": holes})]),
    ]


def test_training_pipelines_are_the_references_with_holes_scaled_to_the_working_size():
    assert hole_range(384) == (38, 76)
    assert hole_range(192) == (19, 38) and hole_range(8) == (1, 1)
    assert _describe(train_pipeline("query", (140, 768), 384)) == \
        _reference_pipeline(0.5, (140, 768), (38, 76))
    assert _describe(train_pipeline("reference", (384, 384), 384)) == \
        _reference_pipeline(0.4, (384, 384), (38, 76), turn=True)


@pytest.mark.parametrize("hole_size_from, query_holes", [("reference", (19, 38)),
                                                         ("view", (7, 14))])
def test_pair_dataset_sizes_holes_from_the_satellite_or_each_view(synth_world, hole_size_from,
                                                                  query_holes):
    from ssageo.config import load_config
    from ssageo.data import PairDataset, load_manifest

    cfg = load_config("synth-cpu", ["data.augment.photometric=true",
                                    f"data.augment.hole_size_from={hole_size_from}",
                                    "data.reference_size=[192,192]", "data.query_size=[70,384]",
                                    "model.bev.grid_size=24"])
    ds = PairDataset(load_manifest(synth_world("cvusa")), cfg["data"], train=True)
    for view, size, holes in (("query", (70, 384), query_holes),
                              ("reference", (192, 192), (19, 38))):
        ratio = {"query": 0.5, "reference": 0.4}[view]
        assert _describe(ds._views[view]) == _reference_pipeline(ratio, size, holes,
                                                                 turn=view == "reference")
    sample = ds[0]
    assert sample["query"].shape == (3, 70, 384) and sample["reference"].shape == (3, 192, 192)
    from ssageo.config import ConfigError

    cfg["data"]["augment"]["hole_size_from"] = "sky"
    with pytest.raises(ConfigError, match="hole_size_from must be 'reference' or 'view'"):
        PairDataset(load_manifest(synth_world("cvusa")), cfg["data"], train=True)


def _image(h=97, w=203):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resizing_is_inter_linear_exact_at_training_and_evaluation(tmp_path):
    from ssageo.data import ImageDataset
    from ssageo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
    from ssageo.io import write_image

    img = _image()
    want = {size: cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR_EXACT)
            for size in ((40, 90), (150, 300))}  # shrink and enlarge
    for size, expected in want.items():
        assert np.array_equal(resize(img, size), expected)
        others = (cv2.INTER_LINEAR, cv2.INTER_AREA)
        assert not any(np.array_equal(cv2.resize(img, size[::-1], interpolation=i), expected)
                       for i in others)  # the comparison can tell them apart
        # evaluation: ImageDataset (what embed/eval use)
        path = tmp_path / "x.png"
        write_image(path, img)
        got = ImageDataset([path], size)[0]["image"]
        assert np.array_equal(got.numpy(), to_tensor(expected, IMAGENET_MEAN, IMAGENET_STD).numpy())
        # training: the photometric pipeline with every noise op off is exactly that resize
        pipeline = train_pipeline("query", size, 384)
        for t in pipeline.transforms:
            t.p = 1.0 if type(t).__name__ == "Resize" else 0.0
        assert np.array_equal(pipeline(image=img)["image"], expected)


def test_jpeg_compression_comes_before_the_resize():
    import albumentations as A

    img, size = _image(200, 400), (50, 100)
    pipeline = train_pipeline("reference", size, 384)
    for t in pipeline.transforms:
        name = type(t).__name__
        t.p = 1.0 if name in ("Resize", "ImageCompression") else 0.0
        if name == "ImageCompression":
            t.quality_range = (90, 90)
    jpeg = A.ImageCompression(quality_range=(90, 90), p=1.0)
    before = cv2.resize(jpeg(image=img)["image"], size[::-1], interpolation=cv2.INTER_LINEAR_EXACT)
    after = jpeg(image=resize(img, size))["image"]
    got = pipeline(image=img)["image"]
    assert np.array_equal(got, before) and not np.array_equal(got, after)


def test_a_perspective_query_is_flipped_with_its_tile_but_never_rolled_or_turned():
    # Sample4Geo's University-1652 recipe: drone view and tile flipped together, tile turned alone
    from ssageo.data.transforms import geometric_augment, rot90

    tile = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    drone = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    seen = set()
    for seed in range(40):
        t, _, q = geometric_augment(tile, None, drone, np.random.default_rng(seed), 0.5, 0.75,
                                    panorama=False)
        flipped = np.array_equal(q, drone[:, ::-1])
        assert flipped or np.array_equal(q, drone)  # never rolled: only a plain mirror
        base = tile[:, ::-1] if flipped else tile
        k = next(k for k in range(4) if np.array_equal(t, rot90(base, k)))
        seen.add((flipped, k))
    assert {k for _, k in seen} == {0, 1, 2, 3} and {f for f, _ in seen} == {True, False}


@pytest.mark.parametrize("panorama", [True, False])
def test_one_pass_geometry_equals_the_flip_then_the_rotation(panorama):
    """geometric_augment moves each image once; the pixels and the draws are those of a flip
    (flip_pair) followed by a rotation (rotate_pair), for every (flip, k)."""
    from ssageo.data.transforms import _fliplr, rot90

    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # not square: transposes show
    prior = rng.integers(0, 2, (6, 10), dtype=np.uint8)
    pano = rng.integers(0, 256, (5, 30, 3), dtype=np.uint8)  # W % 4 != 0: -k*W//4 floors
    seen = set()
    for seed in range(60):
        draws = np.random.default_rng(seed)
        flip = draws.random() < 0.5
        k = int(draws.integers(1, 4)) if draws.random() < 0.75 else 0
        t, p, q = tile, prior, pano
        if flip:
            t, q = flip_pair(t, q) if panorama else (_fliplr(t), _fliplr(q))
            p = _fliplr(p)
        if k:
            t, q = rotate_pair(t, q, k) if panorama else (rot90(t, k), q)
            p = rot90(p, k)
        got = geometric_augment(tile, prior, pano, np.random.default_rng(seed), 0.5, 0.75,
                                panorama)
        for a, b in zip(got, (t, p, q), strict=True):
            assert a.flags.c_contiguous and np.array_equal(a, b), (flip, k)
        seen.add((flip, k))
    assert len(seen) == 8


# the satellite tile sizes of the datasets (CVUSA 750, VIGOR 640, CVACT 1200, University 512,
# synthetic 256 and 64) to the working sizes (384, synth-cpu 64)
TILE_RESIZES = [(750, 384), (640, 384), (1200, 384), (512, 384), (256, 64), (64, 64)]


@pytest.mark.parametrize("native, working", TILE_RESIZES)
def test_the_tiles_resize_commutes_with_its_turns_and_the_labels_does_not(native, working):
    """Why the tile may turn after its resize (geometric_augment_deferred) and the label not:
    INTER_LINEAR_EXACT gives the same pixels either way for all 8 (flip, k), the label's
    nearest-neighbour resize does not."""
    from ssageo.data.transforms import Turn, resize_label

    rng = np.random.default_rng(native)
    tile = rng.integers(0, 256, (native, native, 3), dtype=np.uint8)
    label = rng.integers(0, 2, (native, native), dtype=np.uint8) * 255
    moved = set()
    for flip in (False, True):
        for k in range(4):
            turn = Turn(flip, k)
            assert np.array_equal(resize(turn(tile), (working, working)),
                                  turn(resize(tile, (working, working)))), (flip, k)
            if not np.array_equal(resize_label(turn(label), (working, working)),
                                  turn(resize_label(label, (working, working)))):
                moved.add((flip, k))
    assert moved or native == working  # some turn would move the label's samples


def test_deferred_geometry_has_the_same_draws_and_turns_tile_and_label_later():
    """The mirror now, the quarter turn after the resizes (the reference's order)."""
    from ssageo.data.transforms import Turn, geometric_augment_deferred

    rng = np.random.default_rng(3)
    tile = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    prior = rng.integers(0, 2, (12, 12), dtype=np.uint8)
    pano = rng.integers(0, 256, (5, 32, 3), dtype=np.uint8)
    seen = set()
    for seed in range(40):
        t, p, q = geometric_augment(tile, prior, pano, np.random.default_rng(seed))
        t2, p2, q2, turn = geometric_augment_deferred(tile, prior, pano,
                                                      np.random.default_rng(seed))
        flip = not np.array_equal(t2, tile)
        assert np.array_equal(t2, Turn(flip)(tile)) and np.array_equal(p2, Turn(flip)(prior))
        assert not turn.flip and np.array_equal(turn(t2), t) and np.array_equal(turn(p2), p)
        assert np.array_equal(q2, q)
        seen.add((flip, turn.k))
    assert len(seen) == 8


def test_the_tile_turns_after_the_resize_with_the_jpeg_grid_on_the_native_tile():
    """In the satellite pipeline the turn comes after the JPEG op and the resize: the JPEG
    grid lies on the native tile (not turning first: other pixels where the op fires)."""
    import albumentations as A

    from ssageo.data.transforms import Turn

    img, size, turn = _image(200, 200), (96, 96), Turn(True, 1)
    pipeline = train_pipeline("reference", size, 384)
    jpeg = A.ImageCompression(quality_range=(90, 90), p=1.0)
    for t in pipeline.transforms:
        name = type(t).__name__
        t.p = 1.0 if name in ("Resize", "ImageCompression", "TileTurn") else 0.0
        if name == "ImageCompression":
            t.quality_range = (90, 90)
    got = pipeline(image=img, turn=turn)["image"]
    assert np.array_equal(got, turn(resize(jpeg(image=img)["image"], size)))
    assert not np.array_equal(got, resize(jpeg(image=turn(img))["image"], size))
    assert np.array_equal(pipeline(image=img)["image"], resize(jpeg(image=img)["image"], size))


def test_uint8_handover_moves_the_channels_first_with_the_same_bytes():
    from ssageo.data.transforms import to_uint8_tensor

    img = _image(37, 53)
    for x in (img, img[3:30, ::-1], np.ascontiguousarray(img[:, :5])):  # views too
        got = to_uint8_tensor(x)
        assert got.dtype == torch.uint8 and got.is_contiguous()
        assert np.array_equal(got.numpy(), x.transpose(2, 0, 1))
    with pytest.raises(ValueError):  # not (H, W, C): refused as before
        to_uint8_tensor(img[..., 0])


@pytest.mark.parametrize("shape", [(7, 40, 3), (5, 30), (3, 1232, 3)])
def test_one_copy_roll_of_the_panorama_equals_numpys(shape):
    from ssageo.data.transforms import _rolled

    pano = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for mirror in (False, True):
        for shift in (1, 2, shape[1] // 4 + 1, shape[1] // 2, shape[1] - 1):
            got = _rolled(pano, shift, mirror)
            want = np.roll(pano[:, ::-1] if mirror else pano, shift, axis=1)
            assert got.flags.c_contiguous and np.array_equal(got, want), (mirror, shift)
