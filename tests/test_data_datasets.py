"""PairDataset / ImageDataset on a synthetic world: shapes, priors, synchronised augmentation."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssageo.config import load_config
from ssageo.data import ImageDataset, PairDataset, load_manifest


@pytest.fixture(scope="module")
def manifest(synth_world):
    return load_manifest(synth_world("cvusa"))


def _cfg(**augment):
    cfg = load_config()["data"]
    cfg["augment"] = {**cfg["augment"], **augment}
    return cfg


def test_eval_samples_have_the_configured_shapes_and_a_binary_prior(manifest):
    cfg = _cfg()
    ds = PairDataset(manifest, cfg, train=False)
    s = ds[3]
    assert s["index"] == 3 and len(ds) == manifest.num_queries
    assert s["query"].shape == (3, *cfg["query_size"]) and s["query"].dtype == torch.float32
    assert s["reference"].shape == (3, *cfg["reference_size"])
    assert s["prior"].shape == tuple(cfg["reference_size"]) and s["prior"].dtype == torch.int64
    assert set(s["prior"].unique().tolist()) <= {0, 1} and s["prior"].sum() > 0
    # the eval transform is the one ImageDataset applies
    img = ImageDataset([manifest.query_paths[3]], cfg["query_size"])[0]["image"]
    assert torch.equal(img, s["query"])
    small = PairDataset(manifest, {**cfg, "prior_size": [16, 16]}, train=False)
    assert small[0]["prior"].shape == (16, 16)


def _ops(x: torch.Tensor):
    """The 8 flips/rotations of a (..., H, W) tile tensor, keyed (flip, k)."""
    return {(f, k): torch.rot90(x.flip(-1) if f else x, k, dims=(-2, -1))
            for f in (False, True) for k in range(4)}


def test_training_geometry_moves_tile_prior_and_panorama_together(manifest):
    ev = PairDataset(manifest, _cfg(), train=False)
    tr = PairDataset(manifest, _cfg(flip=0.5, rotate=0.75, photometric=False), train=True)
    torch.manual_seed(0)
    seen = set()
    for i in range(12):
        a, b = ev[i], tr[i]
        ops = [op for op, t in _ops(a["reference"]).items() if torch.equal(t, b["reference"])]
        assert len(ops) == 1
        flip, k = ops[0]
        seen.add(ops[0])
        assert torch.equal(_ops(a["prior"])[(flip, k)], b["prior"])
        pano = a["query"]
        if flip:  # mirror about the north column W/2
            pano = torch.roll(pano.flip(-1), 1, dims=-1)
        pano = torch.roll(pano, -k * pano.shape[-1] // 4, dims=-1)
        assert torch.equal(pano, b["query"])
    assert len(seen) >= 4


def test_augmentation_is_reproducible_from_the_torch_seed(manifest):
    cfg = _cfg(flip=0.5, rotate=0.75, photometric=True)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        ds = PairDataset(manifest, cfg, train=True)
        runs.append(torch.stack([ds[i]["query"] for i in range(6)]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # photometric noise changes the pixels but not the value range of a normalised image
    assert runs[0].abs().max() < 5


def test_dataloader_batches(manifest):
    cfg = _cfg()
    batch = next(iter(DataLoader(PairDataset(manifest, cfg, train=True), batch_size=4)))
    assert batch["query"].shape == (4, 3, *cfg["query_size"])
    assert batch["prior"].shape == (4, *cfg["reference_size"])
    assert np.array_equal(batch["index"].numpy(), np.arange(4))


def test_seeded_augmentation_depends_only_on_seed_epoch_and_index(manifest):
    cfg = _cfg(flip=0.5, rotate=0.75, photometric=True)
    a, b = (PairDataset(manifest, cfg, train=True, seed=7) for _ in range(2))
    for _ in range(3):
        b[5]  # draws made before must not matter
    same = [torch.equal(a[i]["query"], b[i]["query"]) for i in range(8)]
    assert all(same)
    b.epoch = 1  # another epoch: other flips/rotations/noise for most samples
    assert sum(not torch.equal(a[i]["query"], b[i]["query"]) for i in range(8)) >= 6
    other = PairDataset(manifest, cfg, train=True, seed=8)
    assert sum(not torch.equal(a[i]["reference"], other[i]["reference"]) for i in range(8)) >= 6


def test_reduced_decoding_is_an_option_close_to_full_decoding(tmp_path):
    from ssageo.config import ConfigError
    from ssageo.io import read_image
    from ssageo.synth import generate

    generate(tmp_path / "w", layout="cvusa", places=8, seed=0, sat_size=256, pano_size=(512, 128))
    manifest = load_manifest(tmp_path / "w")
    full = PairDataset(manifest, load_config()["data"], train=False)
    cfg = load_config(overrides=["data.decode=reduced"])["data"]
    reduced = PairDataset(manifest, cfg, train=False)
    # 256 px tiles and 512x128 panoramas decode at 1/4 and 1/2 for 64x64 / 64x256
    assert read_image(manifest.reference_paths[0], min_size=reduced._min_sizes[1]).shape[0] == 64
    assert read_image(manifest.query_paths[0], min_size=reduced._min_sizes[0]).shape[0] == 64
    a, b = full[0], reduced[0]
    for view in ("query", "reference"):
        assert a[view].shape == b[view].shape
        diff = (a[view] - b[view]).abs().mean().item()  # normalised units (1 grey level ~ 0.017)
        assert diff < 0.15, (view, diff)
    # the query's exact 2x reduction equals the bilinear 2x resize; the tile's 4x one does not
    assert not torch.equal(a["reference"], b["reference"])
    assert torch.equal(a["prior"], b["prior"])  # labels always decode in full
    with pytest.raises(ConfigError, match="data.decode must be 'full' or 'reduced'"):
        PairDataset(manifest, {**cfg, "decode": "half"}, train=False)
    with pytest.raises(ConfigError, match="decode"):
        load_config(overrides=["data.decode=half"])


def test_samples_are_the_normalised_pixels_channels_first():
    from ssageo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor

    rgb = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    x = to_tensor(rgb, IMAGENET_MEAN, IMAGENET_STD)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = ((torch.from_numpy(rgb).float() / 255 - mean) / std).permute(2, 0, 1)
    assert x.shape == (3, 48, 80) and x.is_contiguous() and x.dtype == torch.float32
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_uint8_handover_normalised_on_the_device_equals_the_float_samples(manifest):
    """Training and evaluation hand uint8 over (normalise=False) and normalise after the move:
    the model sees bit for bit the floats the float datasets give, and the same labels."""
    from ssageo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_device_normalised

    cfg = _cfg(flip=0.5, rotate=0.75, photometric=True)
    floats = PairDataset(manifest, cfg, train=True, seed=3)
    small = PairDataset(manifest, cfg, train=True, seed=3, normalise=False)
    sample = small[5]
    assert sample["query"].dtype == torch.uint8 and sample["prior"].dtype == torch.uint8
    assert sample["query"].shape == (3, *cfg["query_size"]) and sample["query"].is_contiguous()
    batches = [next(iter(DataLoader(ds, batch_size=4))) for ds in (floats, small)]
    moved = to_device_normalised(batches[1], "cpu", IMAGENET_MEAN, IMAGENET_STD,
                                 torch.channels_last)
    for key in ("query", "reference", "prior"):
        assert moved[key].dtype == batches[0][key].dtype
        assert torch.equal(moved[key], batches[0][key]), key
    assert moved["query"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(moved["index"], batches[0]["index"])
    # a float batch is moved as it is; evaluation images too
    again = to_device_normalised(batches[0], "cpu", IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(again["query"], batches[0]["query"])
    paths = manifest.reference_paths[:3]
    images = [next(iter(DataLoader(ImageDataset(paths, (40, 40), normalise=n), batch_size=3)))
              for n in (True, False)]
    assert images[1]["image"].dtype == torch.uint8
    assert torch.equal(to_device_normalised(images[1], "cpu", IMAGENET_MEAN,
                                            IMAGENET_STD)["image"], images[0]["image"])


def test_tile_and_label_turn_after_their_resizes_as_the_reference(manifest, monkeypatch):
    """PairDataset mirrors on the native grid and turns tile and label after their resizes (as
    SSA's datasets, 4x fewer pixels to move at the real sizes): with the photometric ops on and
    the JPEG op off, the tile is the one of turning it first (same draws, same pixels); the
    label is SSA's: mirrored, resized (nearest), then turned."""
    import cv2

    import ssageo.data.datasets as datasets
    from ssageo.data.transforms import Turn, draw_turn, geometric_augment
    from ssageo.io import read_image

    cfg = {**_cfg(flip=0.5, rotate=0.75, photometric=True), "reference_size": [40, 40]}
    now, before = (PairDataset(manifest, cfg, train=True, seed=0) for _ in range(2))
    for ds in (now, before):
        ds._views["reference"].transforms[0].p = 0.0  # the JPEG op: its grid would differ
    new = [now[i] for i in range(20)]
    monkeypatch.setattr(datasets, "geometric_augment_deferred",
                        lambda *a: (*geometric_augment(*a), Turn()))
    turns = set()
    for i, sample in enumerate(new):
        assert all(torch.equal(sample[k], before[i][k]) for k in ("query", "reference"))
        turn = draw_turn(np.random.default_rng([0, 0, i]))  # the sample's first draws
        label = read_image(manifest.prior_paths[int(manifest.positive[i])], mode="L")
        label = cv2.resize(Turn(turn.flip)(label), (40, 40), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(sample["prior"].numpy(), Turn(False, turn.k)(label) > 127)
        turns.add(turn)
    assert len({t.k for t in turns}) == 4 and len({t.flip for t in turns}) == 2
    # a non-square working size: tile and label turn on the native grid, shapes stay
    odd = PairDataset(manifest, {**cfg, "reference_size": [40, 48]}, train=True, seed=0)
    assert {(tuple(s["reference"].shape), tuple(s["prior"].shape))
            for s in (odd[i] for i in range(12))} == {((3, 40, 48), (40, 48))}
