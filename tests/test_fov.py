"""Limited field of view: crop geometry, camera-frame labels, the BEV wedge, seeded crops."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ssageo.config import ConfigError, load_config
from ssageo.data.datasets import ImageDataset, PairDataset
from ssageo.data.fov import (
    IGNORE,
    FovBatches,
    QueryCrop,
    batch_fov,
    camera_frame_label,
    crop_panorama,
    crop_width,
    photo_from_panorama,
    photo_to_band,
    query_crop,
    wedge_mask,
)
from ssageo.data.manifest import load_manifest
from ssageo.data.transforms import flip_pair, rotate_pair
from ssageo.model.bev import polar_to_cartesian
from ssageo.model.losses import bev_loss

W, H = 720, 16  # half a degree per column


def _pano_with_post(azimuth: float) -> np.ndarray:
    """A dark panorama with one bright column at ``azimuth`` (degrees clockwise from north)."""
    pano = np.zeros((H, W, 3), np.uint8)
    pano[:, round((azimuth + 180) * W / 360) % W] = 255
    return pano


@pytest.mark.parametrize("theta,heading,fov", [(30, 0, 90), (-100, -80, 70), (170, -170, 90),
                                               (-100, 200, 180), (95, 95, 360), (0, 320, 120)])
def test_a_feature_at_azimuth_theta_lands_where_the_heading_puts_it(theta, heading, fov):
    crop = crop_panorama(_pano_with_post(theta), fov, heading)
    w = crop_width(W, fov)
    assert crop.shape == (H, w, 3)
    offset = (theta - heading + 180) % 360 - 180  # degrees right of straight ahead
    expected = w / 2 + offset * w / fov  # column j looks at heading - fov/2 + fov*j/w
    assert abs(int(crop[0, :, 0].argmax()) - expected) <= 1


def test_a_feature_outside_the_fov_is_not_in_the_crop():
    crop = crop_panorama(_pano_with_post(120), 90, 0)
    assert crop.max() == 0


def test_a_whole_panorama_at_north_is_unchanged_and_a_roll_elsewhere():
    pano = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    np.testing.assert_array_equal(crop_panorama(pano, 360, 0), pano)
    np.testing.assert_array_equal(crop_panorama(pano, 360, 90), np.roll(pano, -W // 4, axis=1))


def test_synchronised_flip_and_rotation_hold_before_the_crop():
    """Augment then crop == crop of the augmented world: a post east of north, after the
    tile's quarter turn counter-clockwise, is at north; after a flip, west of north."""
    tile = np.zeros((8, 8, 3), np.uint8)
    _, rolled = rotate_pair(tile, _pano_with_post(90), 1)
    crop = crop_panorama(rolled, 90, 0)
    assert abs(int(crop[0, :, 0].argmax()) - crop.shape[1] / 2) <= 1
    _, flipped = flip_pair(tile, _pano_with_post(30))
    crop = crop_panorama(flipped, 90, 0)
    assert abs(int(crop[0, :, 0].argmax()) - (crop.shape[1] / 2 - 30 * crop.shape[1] / 90)) <= 1


def test_camera_frame_label_turns_the_tile_and_masks_the_wedge():
    size = 16
    label = np.zeros((size, size), np.uint8)
    label[7:9, 13:16] = 1  # due east of the camera
    east = camera_frame_label(label, 90, 360)  # facing east: it is straight ahead
    assert east[0:3, 7:9].all() and east.max() == 1
    assert not (east == IGNORE).any()  # a quarter turn keeps the square
    assert (camera_frame_label(label, 45, 360) == IGNORE).any()  # corners leave the tile
    np.testing.assert_array_equal(camera_frame_label(label, 0, 360), label)
    ahead = camera_frame_label(label, 90, 60)
    assert ahead[0:3, 7:9].all()
    np.testing.assert_array_equal(ahead == IGNORE, ~wedge_mask(size, 60))
    behind = camera_frame_label(label, 270, 60)  # facing west: it is behind, not visible
    assert not (behind == 1).any()


def test_the_bev_wedge_maps_crop_columns_to_their_azimuths():
    """A feature in the crop column looking 20 degrees right of ahead lands on the BEV cells at
    20 degrees right of ahead (camera frame), and only there."""
    fov, w, n = 90.0, 90, 64
    polar = torch.zeros(1, 1, 4, w)
    polar[..., 64:67] = 1  # columns covering [64, 67) of 90 look at 19..22 degrees
    bev = polar_to_cartesian(polar, n, fov=fov)[0, 0].numpy()
    rows, cols = np.nonzero(bev > 0.5)
    coords = (np.arange(n) * 2 + 1) / n - 1
    azimuth = np.degrees(np.arctan2(coords[cols], -coords[rows]))
    assert len(rows) > 20 and np.abs(azimuth - 20.5).max() < 3


def test_bev_loss_ignores_cells_outside_the_wedge():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = torch.from_numpy(np.stack([camera_frame_label(
        np.random.default_rng(i).integers(0, 2, (8, 8)), 30 * i, 90) for i in range(2)]))
    loss = bev_loss(logits, target)
    changed = logits.clone()
    changed[target.unsqueeze(1).expand_as(changed) == IGNORE] = 100.0
    assert torch.isfinite(loss) and torch.allclose(bev_loss(changed, target), loss)


def test_fov_and_heading_config_keys():
    cfg = load_config("synth-cpu", ["data.fov=70", "data.heading=random"])
    crop = query_crop(cfg["data"])
    assert (crop.fov, crop.heading, crop.size((64, 256))) == (70.0, "random", (64, 48))
    assert query_crop(load_config("synth-cpu")["data"]).identity
    with pytest.raises(ConfigError, match="data.fov"):
        load_config("synth-cpu", ["data.fov=0"])
    with pytest.raises(ConfigError, match="data.heading"):
        load_config("synth-cpu", ["data.heading=east"])
    assert load_config("synth-cpu")["data"]["fov_min"] is None
    for bad in (["data.fov_min=0"], ["data.fov_min=400"], ["data.fov=90", "data.fov_min=120"]):
        with pytest.raises(ConfigError, match=r"^data\.fov_min: [^\n]*$"):
            load_config("synth-cpu", bad)


def test_random_fov_batches_share_a_seeded_fov_that_covers_the_range_and_resumes():
    from ssageo.train.sampler import HardNegativeSampler

    drawn = [batch_fov(0, epoch, b, 60, 360) for epoch in range(4) for b in range(50)]
    assert all(60 <= f <= 360 for f in drawn) and min(drawn) < 70 and max(drawn) > 350
    assert np.histogram(drawn, bins=3, range=(60, 360))[0].min() > 40  # uniform-ish, 200 draws
    assert drawn == [batch_fov(0, epoch, b, 60, 360) for epoch in range(4) for b in range(50)]
    assert batch_fov(1, 0, 0, 60, 360) != drawn[0]  # the seed decides
    sampler = HardNegativeSampler(np.arange(40), 4, seed=0)
    sampler.set_epoch(2)
    whole = list(FovBatches(sampler, 60, 360, seed=0))
    assert len(whole) == 10 and all(len({f for _, f in batch}) == 1 for batch in whole)
    assert [b[0][1] for b in whole] == [batch_fov(0, 2, b, 60, 360) for b in range(10)]
    # a run resumed at batch 3 of the epoch (the sampler's checkpoint state) replays the rest
    resumed = HardNegativeSampler(np.arange(40), 4, seed=0)
    resumed.load_state_dict(sampler.state_dict(position=3))
    assert list(FovBatches(resumed, 60, 360, seed=0)) == whole[3:]


def test_a_drawn_fov_crops_the_query_and_masks_the_label_to_its_wedge(synth_world):
    """A batch item (index, fov): the query is the panorama's fov-wide crop at its pixels per
    degree, the prior the label masked to that wedge; the BEV head's wedge follows the batch's
    FoV (the trainer's ``set_query_fov``), one polar grid per batch."""
    from ssageo.data.transforms import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        label_to_classes,
        resize,
        resize_label,
        to_tensor,
    )
    from ssageo.io import read_image

    manifest = load_manifest(synth_world("cvusa"), split="train")
    data = load_config("synth-cpu", ["data.fov_min=60", "data.augment.flip=0",
                                     "data.augment.rotate=0"])["data"]
    ds = PairDataset(manifest, data, train=True, seed=0)
    assert ds.fov_min == 60.0
    fov = batch_fov(0, 0, 5, 60, 360)
    sample = ds[(3, fov)]
    width = crop_width(256, fov)
    assert sample["fov"] == fov and sample["query"].shape == (3, 64, width)
    expected = resize(crop_panorama(read_image(manifest.query_paths[3]), fov, 0.0), (64, width))
    torch.testing.assert_close(sample["query"], to_tensor(expected, IMAGENET_MEAN, IMAGENET_STD))
    ref = int(manifest.positive[3])
    label = label_to_classes(resize_label(read_image(manifest.prior_paths[ref], mode="L"),
                                          (64, 64)))
    np.testing.assert_array_equal(sample["prior"].numpy(), np.where(wedge_mask(64, fov), label,
                                                                    IGNORE))
    assert "fov" not in PairDataset(manifest, data, train=True, seed=0)[3]  # no FoV: data.fov


def test_seeded_evaluation_crops_are_reproducible(synth_world):
    manifest = load_manifest(synth_world("cvusa"), split="val")
    paths = manifest.query_paths[:4]
    crop = QueryCrop(90, "random", seed=3)
    one = [ImageDataset(paths, (64, 256), crop=crop)[i]["image"] for i in range(4)]
    again = [ImageDataset(paths, (64, 256), crop=QueryCrop(90, "random", 3))[i]["image"]
             for i in (3, 2, 1, 0)][::-1]  # another dataset, another order: the same crops
    assert one[0].shape == (3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(one, again, strict=True))
    other = ImageDataset(paths, (64, 256), crop=QueryCrop(90, "random", 4))[0]["image"]
    assert not torch.equal(one[0], other)
    headings = {crop.heading_for(i) for i in range(4)}
    assert len(headings) == 4 and all(0 <= h < 360 for h in headings)


def test_training_pairs_have_cropped_queries_and_camera_frame_priors(synth_world, tmp_path):
    from ssageo.priors import list_tiles, run_priors
    from ssageo.priors.oracle import OracleBackend

    root = shutil.copytree(synth_world("cvusa"), tmp_path / "world")
    run_priors(list_tiles(root), OracleBackend(root), progress=False)
    manifest = load_manifest(root, split="train")
    data = load_config("synth-cpu", ["data.fov=90", "data.heading=random"])["data"]
    sample = PairDataset(manifest, data, train=True, seed=0)[0]
    assert sample["query"].shape == (3, 64, 64)
    prior = sample["prior"].numpy()
    assert prior.shape == (64, 64) and (prior[~wedge_mask(64, 90)] == IGNORE).all()
    assert set(np.unique(prior[wedge_mask(64, 90)])) <= {IGNORE, 0, 1}


def test_a_pinhole_photo_maps_back_onto_its_panorama_band():
    """Render a level photo from a panorama, map it to the band of its FoV: the band matches
    the panorama's own crop where the photo covers it."""
    rng = np.random.default_rng(1)
    pano = np.kron(rng.integers(0, 256, (8, 72, 3)), np.ones((16, 10, 1))).astype(np.uint8)
    photo = photo_from_panorama(pano, (120, 160), 90, heading=40)
    crop = crop_panorama(pano, 90, 40)
    band = photo_to_band(photo, 90, crop.shape[:2], vertical=360 * 128 / 720)
    rows = slice(40, 88)  # within the photo's +-36.9 degrees vertically
    diff = np.abs(band[rows, 5:-5].astype(int) - crop[rows, 5:-5].astype(int))
    assert np.median(diff) < 10


def _checkpoint(path, overrides=()):
    """A random-weights convnext_atto checkpoint for 64x256 panoramas (BEV head on)."""
    from ssageo.model import build_model, save_model

    config = load_config("synth-cpu", ["model.backbone=convnext_atto", "model.bev.grid_size=8",
                                       "model.bev.depth_bins=4", *overrides])
    torch.manual_seed(0)
    model = build_model(config["model"], config["data"]["reference_size"],
                        config["data"]["query_size"])
    return save_model(path, model, config)


def test_eval_fov_and_heading_are_applied_and_recorded(synth_world, tmp_path):
    import json

    from typer.testing import CliRunner

    from ssageo.cli import app

    checkpoint = _checkpoint(tmp_path / "ckpt")
    common = ["eval", "--checkpoint", str(checkpoint), "--data", str(synth_world("cvusa")),
              "--workers", "0", "--device", "cpu"]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--fov", "90", "--heading", "random",
                                 "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (metrics["fov"], metrics["heading"], metrics["queries"]) == (90.0, "random", 8)
    for bad, key in ((["--fov", "400"], "--fov"), (["--heading", "up"], "--heading")):
        result = runner.invoke(app, [*common, *bad])
        assert isinstance(result.exception, ConfigError) and key in str(result.exception)


def test_synth_photos_localize_end_to_end_through_locate_fov(tmp_path):
    """``synth --photos`` -> ``index build`` -> ``locate --fov`` (and ``--photo`` from EXIF):
    the pipeline, not the accuracy of a random model."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from ssageo.cli import app
    from ssageo.io import DataError
    from ssageo.synth.photos import read_photo_csv

    world, runner = tmp_path / "world", CliRunner()
    result = runner.invoke(app, ["synth", str(world), "--places", "8", "--sat-size", "64",
                                 "--pano-size", "256x64", "--photos", "80"])
    assert result.exit_code == 0, result.output
    photos = read_photo_csv(world / "photos" / "photos.csv")
    assert len(photos) == 8 and all(p["path"].is_file() and 0 <= p["heading"] < 360
                                    for p in photos)
    assert "photos/photos.csv" in (world / "synth_files.txt").read_text()
    checkpoint = _checkpoint(tmp_path / "ckpt")
    index = tmp_path / "index.npz"
    result = runner.invoke(app, ["index", "build", "--checkpoint", str(checkpoint), "--data",
                                 str(world), "--out", str(index), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    images = [str(p["path"]) for p in photos[:2]]
    result = runner.invoke(app, ["locate", *images, "--index", str(index), "--fov", "80",
                                 "--top-k", "3", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    located = json.loads(result.output)
    assert [r["fov"] for r in located] == [80.0, 80.0]
    for hit in located[0]["results"]:
        assert {"lat", "lon", "score"} <= set(hit) and -1 <= hit["score"] <= 1
        assert 0 <= hit["heading"] < 360 and 0 < hit["heading_confidence"] <= 1  # BEV head
    # a photo whose EXIF gives a 35 mm-equivalent focal length of 21 mm: 2 atan(18/21) = 81.2
    exif = Image.Exif()
    exif[41989] = 21
    Image.open(images[0]).save(tmp_path / "exif.jpg", exif=exif)
    result = runner.invoke(app, ["locate", str(tmp_path / "exif.jpg"), "--index", str(index),
                                 "--photo", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["fov"] == pytest.approx(81.2, abs=0.1)
    result = runner.invoke(app, ["locate", images[0], "--index", str(index), "--photo"])
    assert isinstance(result.exception, DataError) and "--fov" in str(result.exception)
    assert "\n" not in str(result.exception)


def test_the_heading_search_finds_the_heading_a_wedge_was_seen_from():
    from ssageo.evaluate.heading import best_heading, heading_scores

    rng = np.random.default_rng(0)
    prior = np.kron(rng.integers(0, 2, (8, 8)), np.ones((8, 8), np.int64))  # blocks, 64 x 64
    for heading in (0.0, 35.0, 190.0, 300.0):
        seen = camera_frame_label(prior, heading, 90)
        probability = np.where(seen == IGNORE, 0.5, 0.1 + 0.8 * seen)  # a good prediction
        found = best_heading(*heading_scores(probability, prior, 90))
        assert abs((found["heading"] - heading + 180) % 360 - 180) <= 5
        assert found["heading_score"] > 0.9 and found["heading_confidence"] > 0.5
    flat = best_heading(*heading_scores(np.full((64, 64), 0.5), prior, 90))
    assert flat is None  # a prediction without structure says nothing about the heading


def test_random_fov_training_from_the_cli_draws_per_batch_and_resumes_exactly(synth_world,
                                                                              tmp_path):
    """``ssageo train data.fov_min=60`` on a tiny world: each step's FoV (metrics.jsonl) is
    drawn in [60, 360], a rerun draws the same ones, and a run resumed from its epoch-1
    checkpoint ends with the uninterrupted run's weights."""
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from ssageo.cli import app

    args = [f"data.root={synth_world('cvusa')}", "model.backbone=convnext_atto",
            "data.workers=0", "data.query_size=[32,128]", "data.reference_size=[32,32]",
            "model.bev.grid_size=4", "model.bev.depth_bins=4", "train.batch_size=4",
            "train.epochs=2", "train.max_steps_per_epoch=2", "train.checkpoint_every=1000",
            "train.sampling.similarity=false", "data.fov_min=60", "data.heading=random"]
    runner, run = CliRunner(), tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(run), *args])
    assert result.exit_code == 0, result.output

    def steps(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "step"]

    fovs = [r["fov"] for r in steps(run)]
    assert fovs == [batch_fov(0, e, b, 60, 360) for e in range(2) for b in range(2)]
    assert all(r["bev"] > 0 for r in steps(run))  # the wedge-masked SSA term is trained
    # resumed from the end of epoch 1 (`best` when epoch 2 did not beat it, else an old `last`)
    resumed = shutil.copytree(run, tmp_path / "resumed")
    shutil.rmtree(resumed / "checkpoints" / "last")
    best = json.loads((resumed / "checkpoints" / "best" / "progress.json").read_text())
    assert best["step"] == 2, "epoch 2 improved on epoch 1: pick another seed"
    result = runner.invoke(app, ["train", "--resume", str(resumed)])
    assert result.exit_code == 0, result.output
    assert [r["fov"] for r in steps(resumed)] == fovs
    assert [r["loss"] for r in steps(resumed)] == [r["loss"] for r in steps(run)]
    a, b = (load_file(f / "checkpoints" / "last" / "model.safetensors") for f in (run, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
